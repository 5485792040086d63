"""Exact and near-duplicate detection: normalised hashes, MinHash signatures, LSH banding, clusters.

Signatures are computed per batch with numpy: word hashes → word n-gram (shingle) hashes by a
rolling combination → `(a·x + b) >> 32` for every permutation → the minimum per document. Word
hashes are xxhash of the word itself (cached per distinct word), so different processes agree.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Optional

import numpy as np
import xxhash

from lmforge.prep.filters import WordTable

_TOKEN = re.compile(r"\w+")
_MULT = np.uint64(0xBF58476D1CE4E5B9)
_CHUNK = 8192  # shingles per (chunk × permutations) matrix: bounds the temporary memory


def dedup_tokens(text: str) -> list[str]:
    """What near-duplicate detection compares: lower-case word tokens, punctuation dropped."""
    return _TOKEN.findall(text.lower())


def exact_key(tokens: list[str], text: str) -> int:
    # Two documents that differ only in case, punctuation or spacing are exact duplicates.
    joined = " ".join(tokens) if tokens else text
    return xxhash.xxh64_intdigest(joined.encode("utf-8", "surrogatepass"))


class MinHasher:
    def __init__(self, num_perm: int = 128, ngram: int = 2, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, 2**63, num_perm, np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 2**63, num_perm, np.uint64)
        self.num_perm, self.ngram = num_perm, ngram
        self.table = WordTable()

    def shingles(self, token_lists: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """Shingle hashes of all documents, in document order, and the document of each."""
        n = self.ngram
        counts = np.fromiter(map(len, token_lists), np.int64, len(token_lists))
        ids = self.table.ids([t for ts in token_lists for t in ts])  # first: it may grow the table
        h = self.table.code[ids]
        doc = np.repeat(np.arange(len(token_lists)), counts)
        ends = np.cumsum(counts)
        # A document shorter than n words gets one shingle made of all its words.
        width = np.minimum(counts, n)
        pos = np.arange(len(h))
        keep = pos + width[doc] <= ends[doc]
        pos = pos[keep]
        d = doc[pos]
        g = h[pos].copy()
        for k in range(1, n):
            step = k < width[d]
            nxt = h[np.minimum(pos + k, len(h) - 1)]
            g = np.where(step, g * _MULT + nxt, g)
        return g, d

    def signatures(self, token_lists: list[list[str]], shingles: Optional[tuple] = None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """(documents × num_perm) uint32 signatures, and which documents had any token."""
        sig = np.full((len(token_lists), self.num_perm), np.iinfo(np.uint32).max, np.uint32)
        g, d = shingles if shingles is not None else self.shingles(token_lists)
        for lo in range(0, len(g), _CHUNK):
            gs, ds = g[lo:lo + _CHUNK], d[lo:lo + _CHUNK]
            values = ((gs[:, None] * self.a[None, :] + self.b[None, :]) >> np.uint64(32)).astype(np.uint32)
            first = np.flatnonzero(np.concatenate([[True], ds[1:] != ds[:-1]]))
            mins = np.minimum.reduceat(values, first, axis=0)
            rows = ds[first]
            sig[rows] = np.minimum(sig[rows], mins)
        valid = np.zeros(len(token_lists), bool)
        valid[d] = True
        return sig, valid


def shingle_sets(g: np.ndarray, d: np.ndarray, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
    """Each document's distinct shingle hashes, sorted, one after another, and how many each has."""
    order = np.lexsort((g, d))
    g, d = g[order], d[order]
    new = np.concatenate([[True], (g[1:] != g[:-1]) | (d[1:] != d[:-1])]) if len(g) else np.zeros(0, bool)
    return g[new], np.bincount(d[new], minlength=n_docs).astype(np.int64)


def candidate_probability(s, bands: int, rows: int):
    """The LSH S-curve: the chance that a pair of Jaccard similarity s shares at least one band."""
    return 1 - (1 - np.asarray(s, float) ** rows) ** bands


RECALL_AT_THRESHOLD = 0.99


@lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """Bands b and rows r (b·r <= num_perm) with 1 - (1 - t^r)^b >= 0.99 at the threshold t, the most rows
    that reach it (fewest false candidates, each of which costs a check), then the most bands.

    A pair at or above the threshold is missed with probability at most 1 %; with too few permutations
    for that, one row per band."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if candidate_probability(threshold, bands, rows) >= RECALL_AT_THRESHOLD:
            return bands, rows
    return num_perm, 1


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """Each document's key in each band (documents × bands): equal keys, equal band."""
    rng = np.random.default_rng(12345)
    mult = rng.integers(0, 2**63, rows, np.uint64) * np.uint64(2) + np.uint64(1)
    keys = np.empty((len(sig), bands), np.uint64)
    for start in range(0, len(sig), 65536):
        block = np.asarray(sig[start:start + 65536], np.uint64)
        for b in range(bands):
            part = block[:, b * rows:(b + 1) * rows] * mult[None, :]
            keys[start:start + len(block), b] = part.sum(axis=1) ^ np.uint64(b)
    return keys


def band_layout(threshold: float, num_perm: int, bands: Optional[int]) -> tuple[int, int]:
    """Bands and rows per band: the recipe's bands, or those `lsh_params` picks for the threshold."""
    return (bands, num_perm // bands) if bands else lsh_params(threshold, num_perm)


def candidate_pairs(sig: np.ndarray, valid: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """Pairs (i < j) that share at least one LSH band (see `run_pairs` for which pairs of a bucket)."""
    idx = np.flatnonzero(valid)
    if len(idx) < 2:
        return np.zeros((0, 2), np.int64)
    keys = band_keys(sig[idx], bands, rows)
    found = []
    for b in range(bands):
        order = np.argsort(keys[:, b], kind="stable")
        k = keys[order, b]
        found.append(run_pairs(order, np.concatenate([[False], k[1:] == k[:-1]])))
    pairs = idx[np.concatenate(found)]
    pairs = np.sort(pairs, axis=1)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    n = np.int64(len(sig))
    code = np.unique(pairs[:, 0] * n + pairs[:, 1])  # one int64 per pair: a 1-D unique is far faster
    return np.stack([code // n, code % n], 1)


def run_pairs(members: np.ndarray, same: np.ndarray) -> np.ndarray:
    """Pairs inside runs of equal keys (`same[k]`: member k has the key of member k - 1): each member with the
    first of its run and with its predecessor, enough to connect the run without all its pairs."""
    if not same.any():
        return np.zeros((0, 2), np.int64)
    head = np.maximum.accumulate(np.where(~same, np.arange(len(same)), 0))
    at = np.flatnonzero(same)
    return np.concatenate([np.stack([members[head[at]], members[at]], 1), np.stack([members[at - 1], members[at]], 1)])


def similarity(sig: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity of each pair: the fraction of equal signature entries."""
    out = np.empty(len(pairs))
    for lo in range(0, len(pairs), 65536):
        p = pairs[lo:lo + 65536]
        out[lo:lo + 65536] = (np.asarray(sig[p[:, 0]]) == np.asarray(sig[p[:, 1]])).mean(axis=1)
    return out


class ShingleSets:
    """Every document's sorted shingle hashes, read from per-unit files (memory-mapped) on demand."""

    def __init__(self, arrays: list[np.ndarray], counts: np.ndarray):
        self.arrays = arrays
        self.counts = counts
        self.start = np.cumsum(counts) - counts  # where each document's set begins, over all units together
        self.unit_end = np.cumsum([len(a) for a in arrays])

    def get(self, i: int) -> np.ndarray:
        u = int(np.searchsorted(self.unit_end, self.start[i], side="right"))
        lo = self.start[i] - (self.unit_end[u - 1] if u else 0)
        return self.arrays[u][lo:lo + self.counts[i]]


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """True Jaccard similarity of two sorted arrays of distinct values."""
    if len(a) > len(b):
        a, b = b, a
    if not len(a):
        return 0.0
    at = np.searchsorted(b, a)
    same = int(np.count_nonzero(b[np.minimum(at, len(b) - 1)] == a))
    return same / (len(a) + len(b) - same)


def true_similarity(sets: ShingleSets, pairs: np.ndarray) -> np.ndarray:
    """The exact Jaccard similarity of each pair's shingle sets (pairs sorted by their first document)."""
    out = np.empty(len(pairs))
    last, a = -1, None
    for k, (i, j) in enumerate(pairs.tolist()):
        if i != last:
            last, a = i, np.asarray(sets.get(i))
        out[k] = jaccard(a, np.asarray(sets.get(j)))
    return out


def near_pairs(sig: np.ndarray, valid: np.ndarray, threshold: float, bands: Optional[int] = None,
               sets: Optional[ShingleSets] = None) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) of near-duplicates and their similarity: LSH candidates whose true Jaccard (with
    `sets`) or else MinHash estimate reaches the threshold."""
    if len(sig) < 2:
        return np.zeros((0, 2), np.int64), np.zeros(0)
    cand = candidate_pairs(sig, valid, *band_layout(threshold, sig.shape[1], bands))
    sim = true_similarity(sets, cand) if sets is not None else similarity(sig, cand)
    keep = sim >= threshold
    return cand[keep], sim[keep]
