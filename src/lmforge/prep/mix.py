"""Which document goes where: one survivor per duplicate cluster, the seeded split, mixing weights."""

from __future__ import annotations

from typing import NamedTuple, Optional

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


class Survivors(NamedTuple):
    kept: np.ndarray  # bool per document
    duplicate_of: np.ndarray  # the kept document a removed one copies (-1: kept)
    reasons: list  # why each removed document went (None: kept)
    similarity: np.ndarray  # Jaccard similarity to that document (1 for exact copies, nan: kept)
    cluster: np.ndarray  # the first-visited (kept) document of each document's cluster


def visiting_order(n: int, fixed_validation: np.ndarray, length: Optional[np.ndarray]) -> np.ndarray:
    """The kept rule: sources fixed to validation first, then the longest (most distinct word n-grams, so
    exact copies tie), then input order (sources in recipe order, files and rows in order)."""
    length = np.zeros(n, np.int64) if length is None else length
    return np.lexsort((np.arange(n), -length, ~fixed_validation))


def choose_survivors(exact: np.ndarray, near: np.ndarray, fixed_validation: np.ndarray, dedup_exact: bool = True,
                     length: Optional[np.ndarray] = None, near_similarity: Optional[np.ndarray] = None) -> Survivors:
    """Which documents survive deduplication, which kept document each removed one copies, and why.

    Clusters are the connected components (union-find) of exact groups and the near pairs found (`near`,
    verified unless the recipe says otherwise). Each cluster's documents are visited in `visiting_order`.
    With `dedup_exact`, the first of each group of equal keys stays. Then a document goes if it forms a
    near pair with a document already kept. Unlike keeping one per cluster, this never removes a document
    for resembling a chain of others (A~B, B~C, yet A and C unrelated): every removed document has a kept
    twin, and no two kept documents form a pair, so the split cannot put near copies on both sides. A
    training document that copies a validation one goes as `copy_of_validation`.
    """
    n = len(exact)
    order = visiting_order(n, fixed_validation, length)
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    kept = np.ones(n, bool)
    duplicate_of = np.full(n, -1)
    sim = np.full(n, np.nan)
    rep = np.arange(n)
    if dedup_exact and n:
        by_key = np.lexsort((rank, exact))
        k = exact[by_key]
        head = np.maximum.accumulate(np.where(np.concatenate([[True], k[1:] != k[:-1]]), np.arange(n), 0))
        rep[by_key] = by_key[head]
        kept = rep == np.arange(n)
        duplicate_of[~kept] = rep[~kept]
        sim[~kept] = 1.0
    near_sim = np.ones(len(near)) if near_similarity is None else near_similarity
    if len(near):
        # An exact copy stands for its representative: a pair with it is a pair with the representative.
        a, b = rep[near[:, 0]], rep[near[:, 1]]
        a, b = np.where(rank[a] > rank[b], b, a), np.where(rank[a] > rank[b], a, b)  # a is visited first
        by_later = np.lexsort((rank[a], rank[b]))
        for x, y, s in zip(a[by_later].tolist(), b[by_later].tolist(), near_sim[by_later].tolist()):
            if x != y and kept[y] and kept[x]:
                kept[y] = False
                duplicate_of[y] = x
                sim[y] = s
    reasons: list[Optional[str]] = [None] * n
    for i in np.flatnonzero(~kept):
        k = duplicate_of[i]
        if fixed_validation[k] and not fixed_validation[i]:
            reasons[i] = "copy_of_validation"
        elif exact[i] == exact[k]:
            reasons[i] = "exact_duplicate"
        else:
            reasons[i] = "near_duplicate"
    return Survivors(kept, duplicate_of, reasons, sim, _cluster_heads(rep, near, rank))


def union_find(n: int, edges: np.ndarray) -> np.ndarray:
    """Each node's root (the smallest node of its connected component): union-find run on all edges at once,
    hooking each edge's roots to the smaller one, then compressing paths, until every edge is inside a set."""
    parent = np.arange(n)
    while True:
        pa, pb = parent[edges[:, 0]], parent[edges[:, 1]]
        if (pa == pb).all():
            return parent
        low = np.minimum(pa, pb)
        np.minimum.at(parent, pa, low)
        np.minimum.at(parent, pb, low)
        while True:
            up = parent[parent]
            if (up == parent).all():
                break
            parent = up


def _cluster_heads(rep: np.ndarray, near: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Clusters of exact groups and near pairs: each document's cluster, named by its first-visited member."""
    n = len(rep)
    edges = np.concatenate([np.stack([np.arange(n), rep], 1), np.asarray(near, np.int64).reshape(-1, 2)])
    root = union_find(n, edges)
    first = np.full(n, n, np.int64)
    np.minimum.at(first, root, rank)
    return np.argsort(rank)[first[root]]


def assign_split(kept: np.ndarray, domain: np.ndarray, fixed: np.ndarray, u: np.ndarray,
                 fraction: float, count: Optional[int], held_out: Optional[np.ndarray] = None) -> np.ndarray:
    """TRAIN / VALIDATION / REMOVED per document. `fixed` holds -1 (free) or the split a source forces.

    With `count`, each domain's `count` free documents with the smallest `u` are held out; else those
    with u < fraction. Either way a document's split depends only on its own text and the seed.
    `held_out` (a mask) gives the `count` choice when it was made over more documents than these.
    """
    split = np.where(kept, TRAIN, REMOVED)
    free = kept & (fixed < 0)
    split[kept & (fixed >= 0)] = fixed[kept & (fixed >= 0)]
    if count is None:
        split[free & (u < fraction)] = VALIDATION
    elif held_out is not None:
        split[free & held_out] = VALIDATION
    else:
        split[smallest_per_domain(np.flatnonzero(free), domain, u, count)] = VALIDATION
    return split


def smallest_per_domain(candidates: np.ndarray, domain: np.ndarray, u: np.ndarray, count: int) -> np.ndarray:
    """Of the `candidates` (indices, ascending), each domain's `count` with the smallest `u` (ties: the first)."""
    chosen = []
    for d in np.unique(domain[candidates]):
        members = candidates[domain[candidates] == d]
        chosen.append(members[np.argsort(u[members], kind="stable")[:count]])
    return np.concatenate(chosen) if chosen else np.zeros(0, np.int64)


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
