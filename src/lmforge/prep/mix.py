"""Which document goes where: one survivor per duplicate cluster, the seeded split, mixing weights."""

from __future__ import annotations

from typing import Optional

import numpy as np

from lmforge.errors import LmforgeError

TRAIN, VALIDATION, REMOVED = 0, 1, -1


def uniform(keys: np.ndarray, seed: int) -> np.ndarray:
    """A seeded, order-free number in [0, 1) per key (splitmix64 finaliser)."""
    x = keys.astype(np.uint64) ^ np.uint64((seed * 0x9E3779B97F4A7C15) & (2**64 - 1))
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / 2.0**53


def choose_survivors(exact: np.ndarray, near: np.ndarray, fixed_validation: np.ndarray, dedup_exact: bool = True
                     ) -> tuple[np.ndarray, np.ndarray, list[Optional[str]]]:
    """Which documents survive deduplication, which kept document each removed one copies, and why.

    Documents are visited in order — those of sources fixed to validation first. With `dedup_exact`,
    the first of each group of equal keys stays. Then a document goes if it is a near-duplicate pair
    (`near`) with a document already kept. Unlike keeping one per connected cluster, this never
    removes a document for resembling a chain of others (A~B, B~C, yet A and C unrelated), and no two
    kept documents form a found pair, so the split cannot put near copies on both sides. A training
    document that copies a validation one goes as `copy_of_validation`.
    """
    n = len(exact)
    order = np.lexsort((np.arange(n), ~fixed_validation))
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    kept = np.ones(n, bool)
    duplicate_of = np.full(n, -1)
    rep = np.arange(n)
    if dedup_exact and n:
        by_key = np.lexsort((rank, exact))
        k = exact[by_key]
        head = np.maximum.accumulate(np.where(np.concatenate([[True], k[1:] != k[:-1]]), np.arange(n), 0))
        rep[by_key] = by_key[head]
        kept = rep == np.arange(n)
        duplicate_of[~kept] = rep[~kept]
    if len(near):
        # An exact copy stands for its representative: a pair with it is a pair with the representative.
        a, b = rep[near[:, 0]], rep[near[:, 1]]
        a, b = np.where(rank[a] > rank[b], b, a), np.where(rank[a] > rank[b], a, b)  # a is visited first
        by_later = np.lexsort((rank[a], rank[b]))
        for x, y in zip(a[by_later].tolist(), b[by_later].tolist()):
            if x != y and kept[y] and kept[x]:
                kept[y] = False
                duplicate_of[y] = x
    reasons: list[Optional[str]] = [None] * n
    for i in np.flatnonzero(~kept):
        k = duplicate_of[i]
        if fixed_validation[k] and not fixed_validation[i]:
            reasons[i] = "copy_of_validation"
        elif exact[i] == exact[k]:
            reasons[i] = "exact_duplicate"
        else:
            reasons[i] = "near_duplicate"
    return kept, duplicate_of, reasons


def assign_split(kept: np.ndarray, domain: np.ndarray, fixed: np.ndarray, u: np.ndarray,
                 fraction: float, count: Optional[int]) -> np.ndarray:
    """TRAIN / VALIDATION / REMOVED per document. `fixed` holds -1 (free) or the split a source forces.

    With `count`, each domain's `count` free documents with the smallest `u` are held out; else those
    with u < fraction. Either way a document's split depends only on its own text and the seed.
    """
    split = np.where(kept, TRAIN, REMOVED)
    free = kept & (fixed < 0)
    split[kept & (fixed >= 0)] = fixed[kept & (fixed >= 0)]
    if count is None:
        split[free & (u < fraction)] = VALIDATION
        return split
    for d in np.unique(domain[free]):
        members = np.flatnonzero(free & (domain == d))
        split[members[np.argsort(u[members], kind="stable")[:count]]] = VALIDATION
    return split


def domain_weights(sizes: dict[str, float], temperature: float, weights: Optional[dict[str, float]]
                   ) -> dict[str, float]:
    """Sampling probability per domain: explicit weights, or size^(1/T) normalised (T=1: natural)."""
    if weights is not None:
        missing = sorted(set(sizes) - set(weights))
        if missing:
            raise LmforgeError(f"mix.weights: no weight for domain(s) {', '.join(missing)}")
        raw = {d: float(weights[d]) for d in sizes}
    else:
        raw = {d: (s / max(sum(sizes.values()), 1)) ** (1.0 / temperature) if s > 0 else 0.0
               for d, s in sizes.items()}
    total = sum(raw.values())
    if total <= 0:
        raise LmforgeError("mix: every domain has zero weight or no training data")
    return {d: w / total for d, w in raw.items()}


def repeat_counts(ratio: np.ndarray, u: np.ndarray) -> np.ndarray:
    """How many copies of each document the training stream gets: ⌊r⌋, plus one with probability r − ⌊r⌋."""
    whole = np.floor(ratio)
    return (whole + (u < ratio - whole)).astype(np.int64)
