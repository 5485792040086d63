from __future__ import annotations

from typing import Optional

import torch

from lmforge.recipe import ObjectiveConfig


class Objective:
    """make_batch(block ids, example ids) → tensors; loss(model, batch) → (loss sum, tokens, extras)."""

    name = "base"

    def make_batch(self, input_ids: torch.Tensor, example_ids: torch.Tensor, domains: torch.Tensor) -> dict:
        raise NotImplementedError

    def token_counts(self, batch: dict) -> torch.Tensor:
        """Loss tokens per example."""
        raise NotImplementedError

    def count_tokens(self, batch: dict) -> int:
        return int(self.token_counts(batch).sum())

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Return (sum of token losses, number of loss tokens, per-example loss sums or None)."""
        raise NotImplementedError


def build_objective(config: ObjectiveConfig, tokenizer, seed: int = 0) -> Objective:
    if config.name == "clm":
        from lmforge.objectives.clm import CausalLM
        return CausalLM(config, tokenizer)
    from lmforge.objectives.mlm import MaskedLM
    return MaskedLM(config, tokenizer, seed=seed)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in fp32 (targets == -100 give 0)."""
    return torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="none")
