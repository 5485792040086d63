"""The fine-tuning objective for the engine: sequence classification (single- and multi-label) and token
classification, with optional class weights."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lmforge.objectives.base import Objective
from lmforge.tasks.infer import model_inputs


class TaskObjective(Objective):
    """Loss = sum over loss units / units of the whole step (the engine normalises across micro-batches):
    units are examples (single label), example × label pairs (multi-label) or labelled words (NER)."""

    def __init__(self, task: str, multi_label: bool = False, class_weights: Optional[torch.Tensor] = None):
        self.name, self.task, self.multi_label = task, task, multi_label
        self.class_weights = class_weights

    def make_batch(self, batch, _positions=None, _domains=None) -> dict:
        return batch

    def token_counts(self, batch: dict) -> torch.Tensor:
        labels = batch["labels"]
        if self.task == "ner":
            return (labels != -100).sum(dim=1)
        if self.multi_label:
            return torch.full((labels.shape[0],), labels.shape[1])
        return (labels >= 0).long()

    def loss(self, model, batch: dict):
        return self.loss_from_logits(self.forward_logits(model, batch), batch)

    def forward_logits(self, model, batch: dict) -> torch.Tensor:
        return model(**model_inputs(batch)).logits.float()

    def prediction_mask(self, batch: dict) -> Optional[torch.Tensor]:
        """Which rows of forward_logits are loss units: labelled words (NER), labelled examples (single label)."""
        labels = batch["labels"]
        if self.task == "ner":
            return labels != -100
        return None if self.multi_label else labels >= 0

    def loss_from_logits(self, logits: torch.Tensor, batch: dict, weighted: bool = True):
        labels = batch["labels"]
        weight = self.class_weights.to(logits.device) if weighted and self.class_weights is not None else None
        if self.multi_label:
            total = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum", pos_weight=weight)
        else:
            flat = logits.reshape(-1, logits.shape[-1])
            total = F.cross_entropy(flat, labels.reshape(-1), weight=weight, ignore_index=-100, reduction="sum")
        return total, self.token_counts(batch).sum(), None
