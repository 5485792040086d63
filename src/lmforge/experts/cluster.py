"""Fit the clustering an experts recipe asks for (c-BTM's unsupervised domains) on its training documents. The
clustering itself, the labeller that tags documents with clusters and the cluster router are data-side
(`lmforge.data.clusters`)."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np

from lmforge.data.clusters import REPORT, Clustering, fit_clustering, format_report
from lmforge.data.sources import load_documents
from lmforge.engine.logging import console


def _training_texts(data, limit: int, seed: int) -> tuple[list[str], list[str]]:
    """Up to `limit` training documents (texts, source domains): a seeded sample, or the first ones when
    streaming."""
    docs = load_documents(data)
    if data.streaming:
        rows = []
        for row in docs:
            if row["split"] == "train":
                rows.append((row["text"], row["domain"]))
                if len(rows) >= limit:
                    break
        return [r[0] for r in rows], [r[1] for r in rows]
    train = docs.filter(lambda b: [s == "train" for s in b["split"]], batched=True)
    if len(train) > limit:
        train = train.select(sorted(np.random.default_rng(seed).choice(len(train), limit, replace=False).tolist()))
    return list(train["text"]), list(train["domain"])


def cluster_recipe_documents(recipe, folder: Union[str, Path], *, show: bool = True) -> Clustering:
    """Fit the clustering an experts recipe asks for on its training documents; save it and its report to
    `folder` (RUN/clusters)."""
    cfg = recipe.experts
    data = recipe.data.model_copy(update={"domain_clusters": None})  # fit on the text, whatever its labels
    texts, tags = _training_texts(data, cfg.cluster_documents, recipe.train.seed)
    clustering, labels = fit_clustering(texts, cfg.clusters, cfg.cluster_features, cfg.cluster_encoder,
                                        seed=recipe.train.seed, balanced=cfg.cluster_balance)
    clustering.save(folder)
    report = format_report(clustering, texts, labels, tags)
    (Path(folder) / REPORT).write_text(report)
    if show:
        console.print(report, markup=False, highlight=False, soft_wrap=True)
    return clustering
