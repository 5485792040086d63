"""Exact and near-duplicate detection: normalised hashes, MinHash signatures, LSH banding, clusters.

Signatures are computed per batch with numpy: word hashes (a polynomial hash of each word's bytes,
computed for the whole batch at once) → word n-gram (shingle) hashes by a rolling combination → each
document's distinct shingles, sorted once (also what exact verification compares) → `(a·x + b) >> 32`
for every permutation → the minimum per document. A word's hash depends on the word alone, so
different processes agree.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Optional

import numpy as np
import xxhash

_TOKEN = re.compile(r"\w+")
_MULT = np.uint64(0xBF58476D1CE4E5B9)


def dedup_tokens(text: str) -> list[str]:
    """What near-duplicate detection compares: lower-case word tokens, punctuation dropped."""
    return _TOKEN.findall(text.lower())


def exact_key(tokens: list[str], text: str) -> int:
    # Two documents that differ only in case, punctuation or spacing are exact duplicates.
    joined = " ".join(tokens) if tokens else text
    return xxhash.xxh64_intdigest(joined.encode("utf-8", "surrogatepass"))


_P = np.uint64(0x100000001B3)  # the multiplier of the words' polynomial byte hash (odd)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_CHUNK = 4096  # shingles per (permutations × chunk) block of the signature math: 4 MB at 128 permutations


def _finalize(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place: every input bit reaches every output bit."""
    h ^= h >> np.uint64(30)
    h *= _MIX1
    h ^= h >> np.uint64(27)
    h *= _MIX2
    h ^= h >> np.uint64(31)
    return h


_WORDS_PER_PASS = 16384  # words hashed per numpy pass: bounds the per-byte temporaries (~40 bytes a byte)


def word_hashes(words: list[str]) -> np.ndarray:
    """A 64-bit hash of each word, from its UTF-8 bytes, for a whole batch in a few numpy passes (no Python
    call per word): the words joined by spaces, a polynomial hash of each word's bytes and its trailing
    space mod 2^64 (Σ byte_k · P^k), then splitmix64's finaliser. It depends on the word alone, so processes
    agree."""
    if len(words) > _WORDS_PER_PASS:
        return np.concatenate([word_hashes(words[lo:lo + _WORDS_PER_PASS])
                               for lo in range(0, len(words), _WORDS_PER_PASS)])
    if not words:
        return np.zeros(0, np.uint64)
    data = np.frombuffer((" ".join(words) + " ").encode("utf-8", "surrogatepass"), np.uint8)
    ends = np.flatnonzero(data == 32)  # a word is \w+: no space in it, and no UTF-8 byte of a letter is 32
    if len(ends) != len(words):
        raise ValueError("word_hashes: a word contains a space")
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    size = ends - starts + 1
    powers = np.ones(int(size.max()), np.uint64)  # P^0, P^1, ... (wrapping mod 2^64)
    powers[1:] = np.cumprod(np.full(len(powers) - 1, _P, np.uint64))
    at = np.arange(len(data)) - np.repeat(starts, size)  # each byte's place in its word
    h = np.add.reduceat(data * powers[at], starts)
    return _finalize(h)


class MinHasher:
    def __init__(self, num_perm: int = 128, ngram: int = 2, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, 2**63, num_perm, np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 2**63, num_perm, np.uint64)
        self.num_perm, self.ngram = num_perm, ngram
        self._a, self._b = self.a[:, None], self.b[:, None]
        self._buffer = np.empty((num_perm, _CHUNK), np.uint64)  # reused by every chunk of every batch

    def shingles(self, token_lists: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """Shingle hashes of all documents, in document order, and the document of each."""
        n = self.ngram
        counts = np.fromiter(map(len, token_lists), np.int64, len(token_lists))
        h = word_hashes([t for ts in token_lists for t in ts])
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
        g, d = shingles if shingles is not None else self.shingles(token_lists)
        sets, counts = shingle_sets(g, d, len(token_lists))
        return self.sign(sets, counts), counts > 0

    def sign(self, sets: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Signatures from each document's distinct shingle hashes (`shingle_sets`' output): per permutation,
        the least of `(a·x + b) >> 32` over the document's shingles x. The math runs on (permutations × chunk)
        blocks of one preallocated buffer, so no temporary is allocated per block, and the per-document minimum
        is a reduction along contiguous memory."""
        sig = np.full((len(counts), self.num_perm), np.iinfo(np.uint32).max, np.uint32)
        doc = np.repeat(np.arange(len(counts)), counts)
        for lo in range(0, len(sets), _CHUNK):
            x, ds = sets[lo:lo + _CHUNK], doc[lo:lo + _CHUNK]
            v = self._buffer[:, :len(x)]
            np.multiply(self._a, x[None, :], out=v)
            v += self._b
            v >>= np.uint64(32)
            first = np.flatnonzero(np.concatenate([[True], ds[1:] != ds[:-1]]))
            mins = np.minimum.reduceat(v, first, axis=1).T.astype(np.uint32)
            rows = ds[first]
            if lo and rows[0] == doc[lo - 1]:  # a document that began in the last chunk
                mins[0] = np.minimum(mins[0], sig[rows[0]])
            sig[rows] = mins
        return sig


def shingle_sets(g: np.ndarray, d: np.ndarray, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
    """Each document's distinct shingle hashes, sorted, one after another, and how many each has (`d`, the
    document of each hash, is non-decreasing, as `MinHasher.shingles` gives it). Each document's run is
    sorted in place: many small contiguous sorts are far faster than one two-key sort of the batch."""
    counts = np.bincount(d, minlength=n_docs)
    if not len(g):
        return g.copy(), counts.astype(np.int64)
    g = g.copy()
    ends = np.cumsum(counts)
    for lo, hi in zip((ends - counts).tolist(), ends.tolist()):
        if hi - lo > 1:
            g[lo:hi].sort()
    new = np.empty(len(g), bool)
    new[0] = True
    new[1:] = (g[1:] != g[:-1]) | (d[1:] != d[:-1])
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
