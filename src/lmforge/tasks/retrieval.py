"""How good sentence vectors are on held-out pairs: each query ranks every distinct held-out positive (recall@k,
MRR), or the cosines of scored pairs are ranked against their scores (Spearman)."""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr

from lmforge.tasks.embed import SentenceEncoder
from lmforge.tasks.pairs import Pair


def gold_ranks(query_vectors: np.ndarray, corpus_vectors: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """1-based rank of each query's gold row among all corpus rows by dot product (ties count against it)."""
    scores = query_vectors @ corpus_vectors.T
    gold_scores = scores[np.arange(len(gold)), gold]
    return (scores > gold_scores[:, None]).sum(1) + 1


def ranking_metrics(ranks: np.ndarray, ks: list[int]) -> dict:
    out = {f"recall@{k}": float((ranks <= k).mean()) for k in sorted(ks)}
    out["mrr"] = float((1.0 / ranks).mean())
    return out


def pair_metrics(encoder: SentenceEncoder, pairs: list[Pair], ks: list[int], batch_size: int = 128) -> dict:
    """Scored pairs: Spearman and Pearson of cosine vs score; other pairs: recall@k and MRR of each query's
    positive among the split's distinct positives and negatives."""
    if pairs[0].score is not None:
        a = encoder.encode([p.query for p in pairs], batch_size)
        b = encoder.encode([p.positive for p in pairs], batch_size)
        cosines = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        scores = np.array([p.score for p in pairs])
        return {"spearman": float(spearmanr(cosines, scores).statistic),
                "pearson": float(pearsonr(cosines, scores).statistic), "pairs": len(pairs)}
    corpus = list(dict.fromkeys([p.positive for p in pairs] + [p.negative for p in pairs if p.negative]))
    row = {text: i for i, text in enumerate(corpus)}
    queries = encoder.encode([p.query for p in pairs], batch_size)
    docs = encoder.encode(corpus, batch_size)
    ranks = gold_ranks(queries, docs, np.array([row[p.positive] for p in pairs]))
    return {**ranking_metrics(ranks, ks), "queries": len(pairs), "corpus": len(corpus)}
