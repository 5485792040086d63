"""Causal LM on packed blocks, with optional document masking (position ids reset per document)."""

from __future__ import annotations

import torch

from lmforge.models.lean import causal_logits
from lmforge.objectives.base import Objective, token_cross_entropy
from lmforge.recipe import ObjectiveConfig
from lmforge.registry import register_objective
from lmforge.tokenizer import special_ids


def document_position_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Positions restart after every EOS, so each packed document starts at position 0.

    transformers' SDPA path sees the resets (with no attention mask) and builds a block-causal mask.
    """
    b, t = input_ids.shape
    arange = torch.arange(t).expand(b, t)
    after_eos = torch.zeros_like(input_ids, dtype=torch.bool)
    after_eos[:, 1:] = input_ids[:, :-1] == eos_id
    starts = torch.where(after_eos, arange, torch.zeros_like(arange))
    return arange - torch.cummax(starts, dim=1).values


@register_objective("clm", like="clm")
class CausalLM(Objective):
    name = "clm"

    def __init__(self, config: ObjectiveConfig, tokenizer, seed: int = 0):
        self.config = config
        self.eos = special_ids(tokenizer)["eos"]

    def make_batch(self, input_ids, example_ids, domains) -> dict:
        batch = {"input_ids": input_ids, "domains": domains}
        if self.config.document_mask:
            batch["position_ids"] = document_position_ids(input_ids, self.eos)
        return batch

    def token_counts(self, batch):
        ids = batch["input_ids"]
        return torch.full((ids.size(0),), ids.size(1) - 1, dtype=torch.long)

    def forward_kwargs(self, batch) -> dict:
        """Extra keyword arguments of the model's forward (routing, for models that take it)."""
        return {}

    def loss(self, model, batch):
        return self.loss_from_logits(self.forward_logits(model, batch), batch)

    def forward_logits(self, model, batch) -> torch.Tensor:
        """(B, T-1, V): a block of T tokens gives T-1 predictions; the model runs on those T-1 positions only
        (the last token's prediction would have no target)."""
        ids = batch["input_ids"]
        kwargs = {"position_ids": batch["position_ids"][:, :-1]} if "position_ids" in batch else {}
        kwargs.update(self.forward_kwargs(batch))
        return causal_logits(model, ids[:, :-1], use_cache=False, **kwargs)

    def prediction_mask(self, batch) -> None:
        return None  # every position of forward_logits has a target

    def loss_from_logits(self, logits: torch.Tensor, batch):
        ids = batch["input_ids"]
        targets = ids[:, 1:]
        losses = token_cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        per_example = losses.view(ids.size(0), -1).sum(1)
        return per_example.sum(), torch.tensor(targets.numel(), device=ids.device), per_example
