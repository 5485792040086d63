"""The fine-tuning objectives for the engine (sequence and token classification) and batched inference."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.finetune.encode import Encoded, collate
from lmforge.objectives.base import Objective


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


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
        return self.loss_from_logits(model(**model_inputs(batch)).logits.float(), batch)

    def loss_from_logits(self, logits: torch.Tensor, batch: dict, weighted: bool = True):
        labels = batch["labels"]
        weight = self.class_weights.to(logits.device) if weighted and self.class_weights is not None else None
        if self.multi_label:
            total = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum", pos_weight=weight)
        else:
            flat = logits.reshape(-1, logits.shape[-1])
            total = F.cross_entropy(flat, labels.reshape(-1), weight=weight, ignore_index=-100, reduction="sum")
        return total, self.token_counts(batch).sum(), None


@torch.no_grad()
def predict_encoded(model, data: Encoded, *, task: str, multi_label: bool, pad_id: int, batch_size: int = 128,
                    objective: Optional[TaskObjective] = None) -> dict:
    """Scores for every example, in input order. Batches are sorted by length so padding stays small; only
    the per-example outputs (not all logits of a batch) are kept. With `objective`, also the mean loss."""
    device = next(model.parameters()).device
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    scores: list = [None] * len(data)
    loss_sum, units = 0.0, 0
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = {k: v.to(device) for k, v in collate(data, idx, pad_id, multi_label).items()}
        logits = model(**model_inputs(batch)).logits.float()
        if objective is not None and _has_targets(batch):
            total, n, _ = objective.loss_from_logits(logits, batch, weighted=False)  # plain CE for reports
            loss_sum, units = loss_sum + float(total), units + int(n)
        if task == "ner":
            probs = logits.softmax(-1)
            conf, best = probs.max(-1)
            for r, i in enumerate(idx):
                n = len(data.input_ids[i])
                scores[i] = (best[r, :n].cpu().numpy(), conf[r, :n].cpu().numpy())
        else:
            probs = torch.sigmoid(logits) if multi_label else logits.softmax(-1)
            for r, i in enumerate(idx):
                scores[i] = probs[r].cpu().numpy()
    out = {"scores": scores}
    if units:
        out["loss"] = loss_sum / units
    return out


def _has_targets(batch: dict) -> bool:
    labels = batch["labels"]
    return bool((labels != -100).any()) if labels.dtype == torch.long else True


def word_predictions(data: Encoded, scores: list, n_sentences: int, words_per_sentence: list[int]):
    """NER: the predicted label id and confidence of every word (its first sub-word's), windows joined."""
    labels = [np.zeros(n, dtype=np.int64) for n in words_per_sentence]
    confidence = [np.ones(n, dtype=np.float32) for n in words_per_sentence]
    for i, (best, conf) in enumerate(scores):
        s = data.sentence[i]
        for t, w in enumerate(data.word_of_token[i]):
            if w >= 0:
                labels[s][w] = best[t]
                confidence[s][w] = conf[t]
    return labels, confidence
