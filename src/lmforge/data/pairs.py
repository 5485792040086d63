"""Sentence-pair examples for next-sentence (NSP) and sentence-order (SOP) prediction, as in BERT and ALBERT.

A document is split into segments (sentences or lines). Segments are gathered until they fill the
block ([CLS] A [SEP] B [SEP]), and the gathered chunk is cut at a random segment boundary into A and B.

- NSP: with probability p, B is replaced by segments from another document (label 1, "random next");
  the true segments it displaced are put back and start the next pair, so no text is wasted.
- SOP: with probability p, A and B swap places (label 1, "swapped").

A chunk of one long segment is cut in the middle of its tokens. When A + B is too long, the longer
side loses tokens first, always on the side away from the A|B boundary (A from its front, B from its
back, before an SOP swap), so the two segments of a pair always touch in the original text.

Each row is stored as block_size token ids (padded) followed by one slot holding the pair label.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+")


def split_segments(text: str, by: str = "sentence") -> list[str]:
    """A document's segments: its non-empty lines, or the sentences of each line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if by == "line":
        return lines
    return [s.strip() for line in lines for s in _SENTENCE_END.split(line) if s.strip()]


def _flat(parts: Sequence[Sequence[int]]) -> list[int]:
    return [t for part in parts for t in part]


def truncate_pair(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Drop tokens from the longer side until len(a) + len(b) <= budget, away from the A|B boundary."""
    over = len(a) + len(b) - budget
    while over > 0:
        if len(a) > len(b):
            cut = min(over, len(a) - len(b))
            a = a[cut:]
        else:
            cut = min(over, max(len(b) - len(a), 1))
            b = b[:len(b) - cut]
        over -= cut
    return a, b


def document_pairs(segments: list[list[int]], others: list[list[list[int]]], *, budget: int, kind: str,
                   probability: float, rng: np.random.Generator) -> list[tuple[list[int], list[int], int]]:
    """(A, B, label) pairs from one document's token segments; `others` are documents to draw random
    next segments from (NSP)."""
    segments = [s for s in segments if s]
    pairs = []
    j = 0
    while j < len(segments):
        chunk, length = [], 0
        while j < len(segments) and (length < budget or not chunk):
            chunk.append(segments[j])
            length += len(segments[j])
            j += 1
        if len(chunk) == 1:
            tokens = chunk[0]
            if len(tokens) < 2:
                continue
            half = len(tokens) // 2
            a_parts, b_parts = [tokens[:half]], [tokens[half:]]
        else:
            cut = int(rng.integers(1, len(chunk)))
            a_parts, b_parts = chunk[:cut], chunk[cut:]
        a, b, label = _flat(a_parts), _flat(b_parts), 0
        swap = False
        if rng.random() < probability:
            if kind == "sop":
                swap, label = True, 1
            elif others:
                other = others[int(rng.integers(len(others)))]
                start = int(rng.integers(len(other)))
                need = max(budget - len(a), 1)
                b = []
                for segment in other[start:]:
                    b.extend(segment)
                    if len(b) >= need:
                        break
                label = 1
                if len(chunk) > 1:
                    j -= len(b_parts)  # the displaced true segments begin the next pair
        a, b = truncate_pair(a, b, budget)  # before a swap, so the trimmed ends are the outer ones
        if swap:
            a, b = b, a
        if a and b:
            pairs.append((a, b, label))
    return pairs


def encode_pair(a: list[int], b: list[int], label: int, *, cls: int, sep: int, pad: int,
                block_size: int) -> list[int]:
    """[CLS] A [SEP] B [SEP], padded to block_size, then the label slot."""
    row = [cls, *a, sep, *b, sep]
    return row + [pad] * (block_size - len(row)) + [label]


def pair_builder(tokenizer, *, block_size: int, kind: str, segment_by: str, probability: float, seed: int,
                 domain_ids: dict, cls: int, sep: int, pad: int):
    """A batched `datasets.map` function: documents → pair rows (random next segments come from the
    other documents of the same map batch)."""

    def fn(batch, indices):
        rng = np.random.default_rng([seed, indices[0] if indices else 0])
        texts = [split_segments(t, segment_by) for t in batch["text"]]
        flat = [s for segs in texts for s in segs]
        encoded = tokenizer(flat, add_special_tokens=False, return_attention_mask=False,
                            verbose=False)["input_ids"] if flat else []
        docs, pos = [], 0
        for segs in texts:
            docs.append(encoded[pos:pos + len(segs)])
            pos += len(segs)
        rows, domains = [], []
        for i, (segments, domain) in enumerate(zip(docs, batch["domain"])):
            others = [d for k, d in enumerate(docs) if k != i and d]
            for a, b, label in document_pairs(segments, others, budget=block_size - 3, kind=kind,
                                              probability=probability, rng=rng):
                rows.append(encode_pair(a, b, label, cls=cls, sep=sep, pad=pad, block_size=block_size))
                domains.append(domain_ids[domain])
        return {"input_ids": rows, "domain": domains}
    return fn
