from __future__ import annotations

from typing import Optional

import torch

from lmforge.recipe import ObjectiveConfig
from lmforge.registry import OBJECTIVES


class Objective:
    """make_batch(block ids, example ids) → tensors; loss(model, batch) → (loss sum, tokens, extras).

    Objectives with more to report than the loss (accuracies, loss parts) `tally` them during `loss`;
    the engine logs the training tallies and the evaluation reports its own.
    """

    name = "base"
    tally_names: tuple[str, ...] = ()

    def make_batch(self, input_ids: torch.Tensor, example_ids: torch.Tensor, domains: torch.Tensor) -> dict:
        raise NotImplementedError

    def token_counts(self, batch: dict) -> torch.Tensor:
        """Loss tokens per example."""
        raise NotImplementedError

    def count_tokens(self, batch: dict) -> int:
        return int(self.token_counts(batch).sum())

    def count_inputs(self, batch: dict) -> int:
        """Tokens the model reads (for throughput): every non-padding input token."""
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else batch["input_ids"].numel()

    def tally(self, model, name: str, value, count) -> None:
        """Add to a running ratio (e.g. correct / total), kept apart for training and evaluation."""
        store = self.__dict__.setdefault("_tallies", {}).setdefault(bool(model.training), {})
        v, c = store.get(name, (0.0, 0.0))
        store[name] = (v + value.detach().double() if torch.is_tensor(value) else v + value,
                       c + (count.detach().double() if torch.is_tensor(count) else count))

    def take_tallies(self, training: bool) -> dict[str, tuple[float, float]]:
        """The (value, count) sums since the last call, then reset."""
        store = self.__dict__.setdefault("_tallies", {}).pop(bool(training), {})
        return {k: (float(v), float(c)) for k, (v, c) in store.items()}

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Return (sum of token losses, number of loss tokens, per-example loss sums or None)."""
        raise NotImplementedError


def build_objective(config: ObjectiveConfig, tokenizer, seed: int = 0) -> Objective:
    """The objective the recipe names, built-in or registered (`lmforge.register_objective`)."""
    return OBJECTIVES.get(config.name).value(config, tokenizer, seed)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in fp32 (targets == -100 give 0)."""
    return torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="none")
