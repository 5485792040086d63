"""Text pairs for sentence embeddings: read (query, positive[, negative]) or scored pairs from a table, or make
(sentence, next sentence) pairs from plain text; encode them and batch them for the in-batch loss.

Every text carries a key (equal texts, equal keys) so the loss can tell a duplicate inside a batch from a true
negative. Every error names the file and the line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lmforge.errors import LmforgeError
from lmforge.tasks.config import FinetuneRecipe, SplitFile, TaskData
from lmforge.tasks.encode import TaskLoader
from lmforge.tasks.splits import read_splits
from lmforge.tasks.tables import _check_readable, _records, format_of

SIDES = ("query", "positive", "negative")
HEADING = re.compile(r"^\s*=.*=\s*$")                  # WikiText section titles: " = = History = = "
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
MIN_WORDS = 4                                         # shorter "sentences" (list items, captions) make no pair


@dataclass
class Pair:
    query: str
    positive: str
    negative: Optional[str]
    score: Optional[float]
    line: int


def read_pairs(spec: SplitFile, data: TaskData) -> list[Pair]:
    """The pairs of one split file, as `data.pairs` says; an empty side, a missing column or no pairs is an error."""
    path = Path(spec.path)
    _check_readable(path)
    pairs = next_sentence_pairs(path) if data.pairs == "next_sentence" else _table_pairs(path, spec, data)
    if not pairs:
        raise LmforgeError(f"{path}: no pairs in this file")
    return pairs


def _table_pairs(path: Path, spec: SplitFile, data: TaskData) -> list[Pair]:
    columns = {"query": data.query_column, "positive": data.positive_column, "negative": data.negative_column,
               "score": data.score_column}
    fields = {"query": "query_column", "positive": "positive_column", "negative": "negative_column",
              "score": "score_column"}
    pairs = []
    for line, rec in _records(path, format_of(spec), data.header):
        values = {}
        for side, col in columns.items():
            if col is None:
                values[side] = None
                continue
            if col not in rec:
                raise LmforgeError(f"{path}:{line}: no column {col!r} (columns: {', '.join(map(str, rec))}); "
                                   f"set data.{fields[side]}")
            value = rec[col]
            if value is None or not str(value).strip():
                raise LmforgeError(f"{path}:{line}: pair with an empty {side} (column {col!r})")
            values[side] = str(value).strip()
        score = None
        if values["score"] is not None:
            try:
                score = float(values["score"])
            except ValueError:
                raise LmforgeError(f"{path}:{line}: score {values['score']!r} is not a number "
                                   f"(column {data.score_column!r})") from None
        pairs.append(Pair(values["query"], values["positive"], values["negative"], score, line))
    return pairs


def read_pair_splits(recipe: FinetuneRecipe) -> dict[str, list]:
    return read_splits(recipe, read_pairs)


def split_sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(paragraph.strip()) if s.strip()]


def next_sentence_pairs(path: Path) -> list[Pair]:
    """(sentence, the next sentence of the same paragraph) for every paragraph (line) of a text file; headings
    and sentences under MIN_WORDS words are skipped."""
    pairs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise LmforgeError(f"{path}: not valid UTF-8 (byte offset {err.start})") from None
    for lineno, line in enumerate(lines, 1):
        if HEADING.match(line):
            continue
        sentences = [s for s in split_sentences(line) if len(s.split()) >= MIN_WORDS]
        pairs += [Pair(a, b, None, None, lineno) for a, b in zip(sentences, sentences[1:])]
    return pairs


@dataclass
class EncodedPairs:
    """Token ids and text keys of each side of every pair (negative: None when the split has none)."""
    input_ids: list[list[int]]            # the queries: their lengths group batches
    sides: dict[str, list[list[int]]]
    keys: dict[str, list[int]]
    scores: Optional[list[float]]
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_pairs(tokenizer, pairs: list[Pair], max_length: int) -> EncodedPairs:
    """Tokenize each side, truncated to `max_length`; equal texts (anywhere in the split) get equal keys."""
    sides, keys, truncated, key_of = {}, {}, 0, {}
    for side in SIDES:
        texts = [getattr(p, side) for p in pairs]
        if any(t is None for t in texts):
            continue
        full = tokenizer(texts, add_special_tokens=True, truncation=False, return_attention_mask=False,
                         verbose=False)["input_ids"]
        truncated += sum(len(ids) > max_length for ids in full)
        sides[side] = [ids if len(ids) <= max_length else ids[:max_length - 1] + ids[-1:] for ids in full]
        keys[side] = [key_of.setdefault(t, len(key_of)) for t in texts]
    scores = [p.score for p in pairs] if pairs and pairs[0].score is not None else None
    return EncodedPairs(sides["query"], sides, keys, scores, truncated)


def collate_pairs(data: EncodedPairs, idx: list[int], pad_id: int) -> dict:
    """One padded batch of every side's texts, queries first, then positives, then negatives; each side's keys
    (`query_key`, ...) and the scores of scored pairs."""
    rows = [data.sides[side][i] for side in SIDES if side in data.sides for i in idx]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    for side in data.sides:
        batch[f"{side}_key"] = torch.tensor([data.keys[side][i] for i in idx], dtype=torch.long)
    if data.scores is not None:
        batch["score"] = torch.tensor([data.scores[i] for i in idx], dtype=torch.float)
    return batch


class PairLoader(TaskLoader):
    """TaskLoader's seeded, resumable batch order over pairs instead of labelled examples."""

    def micro_batch(self, step: int, micro: int):
        return collate_pairs(self.data, self.batch_indices(step, micro), self.pad_id), None, None
