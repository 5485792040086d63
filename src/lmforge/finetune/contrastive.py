"""Contrastive losses for sentence embeddings and the objective that trains an encoder with them.

In-batch negatives (multiple-negatives ranking, InfoNCE): query i scores every positive of the batch and every
hard negative, cosines divided by a temperature; the loss is the cross-entropy of its own positive. A row whose
query or positive is the same text as row i's is not a negative of query i (a false negative: two people asking
the same question, one answer to two questions), nor is a text equal to query i itself: their scores are masked
out, as are hard negatives equal to row i's positive or query. Scored pairs: the cosine of the two texts regressed onto score / score_max (squared error).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lmforge.objectives.base import Objective
from lmforge.tasks.config import EmbeddingConfig
from lmforge.tasks.embed import sentence_vectors


def false_negative_mask(query_key: torch.Tensor, positive_key: torch.Tensor,
                        negative_key: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(rows, rows [+ negatives]) True where column j is no true negative of query i, row i's own positive aside:
    positive j is the same text as positive i, or query j the same as query i (its positive then answers query i
    too), or positive j is query i itself (consecutive-sentence pairs: a cosine of 1 no training can lower); and
    where a hard negative is positive i or query i. Keys are shared by all sides: equal texts, equal keys."""
    same = (positive_key[:, None] == positive_key[None, :]) | (query_key[:, None] == query_key[None, :]) | \
           (query_key[:, None] == positive_key[None, :])
    same &= ~torch.eye(len(query_key), dtype=torch.bool, device=query_key.device)
    if negative_key is None:
        return same
    hard = (positive_key[:, None] == negative_key[None, :]) | (query_key[:, None] == negative_key[None, :])
    return torch.cat([same, hard], dim=1)


def in_batch_negatives_loss(queries: torch.Tensor, positives: torch.Tensor, negatives: Optional[torch.Tensor],
                            temperature: float, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-query loss: -log softmax(cos(q_i, ·) / temperature)[positive i] over the batch's positives, then its
    hard negatives; entries where `mask` is True are left out. Vectors must be L2-normalised."""
    candidates = positives if negatives is None else torch.cat([positives, negatives], dim=0)
    logits = queries @ candidates.T / temperature
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    target = torch.arange(len(queries), device=queries.device)
    return F.cross_entropy(logits, target, reduction="none")


def cosine_regression_loss(a: torch.Tensor, b: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pair squared error between cos(a_i, b_i) and target_i."""
    return (F.cosine_similarity(a, b, dim=-1) - target) ** 2


class EmbeddingObjective(Objective):
    """The engine's objective for task `embedding`: one forward over a batch's queries, positives and negatives
    (collated by `tasks.pairs.collate_pairs`), then the recipe's loss; one loss unit per pair."""

    name = "embedding"

    def __init__(self, config: EmbeddingConfig):
        self.config = config

    def make_batch(self, batch, _positions=None, _domains=None) -> dict:
        return batch

    def token_counts(self, batch: dict) -> torch.Tensor:
        return torch.ones(len(batch["query_key"]))

    def loss(self, model, batch: dict):
        cfg = self.config
        n = len(batch["query_key"])
        vectors = sentence_vectors(model, batch, cfg.pooling, normalize=True)
        queries, positives, negatives = vectors[:n], vectors[n:2 * n], vectors[2 * n:] if len(vectors) > 2 * n \
            else None
        if cfg.loss == "cosine":
            per_pair = cosine_regression_loss(queries, positives, batch["score"] / cfg.score_max)
        else:
            mask = false_negative_mask(batch["query_key"], batch["positive_key"], batch.get("negative_key")) \
                if cfg.mask_duplicates else None
            per_pair = in_batch_negatives_loss(queries, positives, negatives, cfg.temperature, mask)
        return per_pair.sum(), torch.tensor(n), None
