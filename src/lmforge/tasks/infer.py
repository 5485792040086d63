"""Run a task model over encoded examples: scores per example (classification) or per sub-word (NER), and
word-level labels from sub-word scores."""

from __future__ import annotations

import numpy as np
import torch

from lmforge.tasks.encode import Encoded, collate


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def device_of(model) -> torch.device:
    """Where a model's inputs go: its `device` (transformers and ONNX Runtime models), else its parameters'."""
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


@torch.no_grad()
def predict_encoded(model, data: Encoded, *, task: str, multi_label: bool, pad_id: int, batch_size: int = 128,
                    objective=None) -> dict:
    """Scores for every example, in input order. Batches are sorted by length so padding stays small; only
    the per-example outputs (not all logits of a batch) are kept. With `objective` (one with `loss_from_logits`,
    as the fine-tuning objective's), also the mean loss."""
    device = device_of(model)
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
