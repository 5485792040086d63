"""How good sentence vectors are on held-out pairs: each query ranks every distinct held-out positive (recall@k,
MRR), or the cosines of scored pairs are ranked against their scores (Spearman)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from lmforge.engine.logging import console
from lmforge.errors import LmforgeError
from lmforge.tasks.config import FinetuneRecipe, SplitFile, load_finetune_recipe
from lmforge.tasks.embed import SentenceEncoder, open_encoder
from lmforge.tasks.pairs import Pair, read_pair_splits
from lmforge.tasks.report import source_of, write_text_atomic


def gold_ranks(query_vectors: np.ndarray, corpus_vectors: np.ndarray, gold: np.ndarray,
               itself: Optional[np.ndarray] = None) -> np.ndarray:
    """1-based rank of each query's gold row among all corpus rows by dot product (ties count against it);
    `itself[i]` >= 0 is a corpus row holding query i's own text, left out of its ranking."""
    scores = query_vectors @ corpus_vectors.T
    if itself is not None:
        own = itself >= 0
        scores[np.flatnonzero(own), itself[own]] = -np.inf
    gold_scores = scores[np.arange(len(gold)), gold]
    return (scores > gold_scores[:, None]).sum(1) + 1


def ranking_metrics(ranks: np.ndarray, ks: list[int]) -> dict:
    out = {f"recall@{k}": float((ranks <= k).mean()) for k in sorted(ks)}
    out["mrr"] = float((1.0 / ranks).mean())
    return out


def pair_metrics(encoder: SentenceEncoder, pairs: list[Pair], ks: list[int], batch_size: int = 128) -> dict:
    """Scored pairs: Spearman and Pearson of cosine vs score; other pairs: recall@k and MRR of each query's
    positive among the split's distinct positives and negatives (a document that is the query's own text left out)."""
    if pairs[0].score is not None:
        a = encoder.encode([p.query for p in pairs], batch_size)
        b = encoder.encode([p.positive for p in pairs], batch_size)
        cosines = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        scores = np.array([p.score for p in pairs])
        from scipy.stats import pearsonr, spearmanr  # here: scipy.stats costs every other command 0.3 s to import

        return {"spearman": float(spearmanr(cosines, scores).statistic),
                "pearson": float(pearsonr(cosines, scores).statistic), "pairs": len(pairs)}
    corpus = list(dict.fromkeys([p.positive for p in pairs] + [p.negative for p in pairs if p.negative]))
    row = {text: i for i, text in enumerate(corpus)}
    queries = encoder.encode([p.query for p in pairs], batch_size)
    docs = encoder.encode(corpus, batch_size)
    itself = np.array([row.get(p.query, -1) for p in pairs])  # consecutive sentences: a query is a positive too
    ranks = gold_ranks(queries, docs, np.array([row[p.positive] for p in pairs]), itself)
    return {**ranking_metrics(ranks, ks), "queries": len(pairs), "corpus": len(corpus)}


def write_pair_report(run_dir: Path, recipe: FinetuneRecipe, split: str, metrics: dict) -> dict:
    title = f"{recipe.name}: {split} ({source_of(recipe.data, split)})"
    lines = [title, "=" * len(title)] + [f"{k:>15}: {v:.4f}" if isinstance(v, float) else f"{k:>15}: {v}"
                                         for k, v in metrics.items()]
    write_text_atomic(run_dir / f"report-{split}.txt", "\n".join(lines) + "\n")
    write_text_atomic(run_dir / f"eval-{split}.json", json.dumps(metrics, indent=2))
    console.print("\n".join(lines))
    return metrics


def evaluate_embedding_run(run_dir: Path, split: str = "validation", file: Optional[Path] = None) -> dict:
    """Score an embedding run's final model on a split of its recipe (or on `file`); writes report-SPLIT.txt and
    eval-SPLIT.json."""
    run_dir = Path(run_dir)
    recipe = load_finetune_recipe(run_dir / "recipe.yaml")
    if file is not None:
        setattr(recipe.data, split, SplitFile(path=str(file)))
    splits = read_pair_splits(recipe)
    if split not in splits:
        raise LmforgeError(f"{run_dir}: the recipe has no {split} pairs; pass --file")
    encoder = open_encoder(run_dir)
    metrics = pair_metrics(encoder, splits[split], recipe.embedding.recall_at, recipe.train.eval_batch_size)
    return write_pair_report(run_dir, recipe, split, metrics)
