"""Seq2seq examples: (source, target) pairs read from a table's columns or made from a WikiText-style file
(each paragraph and the heading of its section), encoded for teacher forcing and batched.

Targets end with the tokenizer's end-of-sequence token (the model learns where to stop); padding in the labels is
-100, so no loss falls on it. Every error names the file and the line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.engine.logging import console
from lmforge.errors import LmforgeError
from lmforge.tasks.config import FinetuneRecipe, SplitFile, TaskData
from lmforge.tasks.encode import TaskLoader, _is_byte_level
from lmforge.tasks.pairs import HEADING
from lmforge.tasks.splits import read_splits, source_of
from lmforge.tasks.tables import _check_readable, _records, format_of

UNKNOWN_WORD = "<unk>"  # WikiText's stand-in for a rare word


@dataclass
class TextPair:
    source: str
    target: str
    line: int


def read_text_pairs(spec: SplitFile, data: TaskData) -> list[TextPair]:
    """The pairs of one split file, as `data.pairs` says; a missing column, an empty side or no pairs is an error."""
    path = Path(spec.path)
    _check_readable(path)
    if data.pairs in ("heading", "title"):
        pairs = heading_pairs(path, titles_only=data.pairs == "title")
    else:
        pairs = _table_pairs(path, spec, data)
    if not pairs:
        raise LmforgeError(f"{path}: no source/target pairs in this file")
    return pairs


def _table_pairs(path: Path, spec: SplitFile, data: TaskData) -> list[TextPair]:
    pairs = []
    for line, rec in _records(path, format_of(spec), data.header):
        values = []
        for side, col in (("source", data.source_column), ("target", data.target_column)):
            if col not in rec:
                raise LmforgeError(f"{path}:{line}: no {side} column {col!r} (columns: {', '.join(map(str, rec))}); "
                                   f"set data.{side}_column")
            value = rec[col]
            if value is None or not str(value).strip():
                raise LmforgeError(f"{path}:{line}: empty {side} (column {col!r})")
            values.append(str(value).strip())
        pairs.append(TextPair(values[0], values[1], line))
    return pairs


def heading_text(line: str) -> str:
    """' = = Early life = = ' → 'Early life'."""
    return line.strip("= \t")


def heading_pairs(path: Path, titles_only: bool = False) -> list[TextPair]:
    """(paragraph, the nearest heading above it) for every paragraph line of a WikiText-style file: an article's
    title (' = Title = ') for its lead paragraphs, a section's heading (' = = Section = = ', any depth) for the
    paragraphs under it; with `titles_only`, the article's title for every paragraph of the article. Paragraphs
    before any heading make no pair, nor do those under a heading holding WikiText's `<unk>` (a rare word it
    replaced): no text can tell which word that was, and as the most frequent heading word it would teach a model
    to answer `<unk>` to everything."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise LmforgeError(f"{path}: not valid UTF-8 (byte offset {err.start})") from None
    pairs, heading = [], None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if HEADING.match(line):
            if titles_only and line.strip().startswith("= ="):
                continue  # a section's heading: the article's title stands
            heading = heading_text(line) or None
            heading = None if heading and UNKNOWN_WORD in heading else heading
        elif heading is not None:
            pairs.append(TextPair(line.strip(), heading, lineno))
    return pairs


def read_seq2seq_splits(recipe: FinetuneRecipe) -> dict[str, list[TextPair]]:
    return read_splits(recipe, read_text_pairs)


@dataclass
class EncodedSeq2Seq:
    input_ids: list[list[int]]     # sources: their lengths group batches
    labels: list[list[int]]        # targets, each closed by EOS
    truncated_sources: int = 0
    truncated_targets: int = 0
    unknown_targets: int = 0       # targets holding the tokenizer's unknown token

    def __len__(self) -> int:
        return len(self.input_ids)


def _cut(ids: list[int], limit: int, eos: int) -> list[int]:
    """At most `limit` ids, still closed by EOS when the text was."""
    if len(ids) <= limit:
        return ids
    return ids[:limit - 1] + [eos] if ids[-1] == eos else ids[:limit]


def encode_sources(tokenizer, sources: list[str], max_length: int, prefix: str = "") -> tuple[list[list[int]], int]:
    """Token ids of the sources (with the tokenizer's special tokens: T5's close with EOS), cut at `max_length`."""
    ids = tokenizer([prefix + s for s in sources], add_special_tokens=True, truncation=False,
                    return_attention_mask=False, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [_cut(x, max_length, eos) for x in ids], sum(len(x) > max_length for x in ids)


def encode_seq2seq(tokenizer, pairs: list[TextPair], max_length: int, max_target_length: int,
                   prefix: str = "") -> EncodedSeq2Seq:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LmforgeError("model.tokenizer: seq2seq needs a tokenizer with an end-of-sequence token (eos_token)")
    sources, cut_sources = encode_sources(tokenizer, [p.source for p in pairs], max_length, prefix)
    # Byte-level BPE marks a word start with a space: a target's words get the ids they have inside a source
    # text (and that span-corruption targets had), not those of a text's first word.
    lead = " " if _is_byte_level(tokenizer) else ""
    targets = tokenizer([lead + p.target for p in pairs], add_special_tokens=False, truncation=False,
                        return_attention_mask=False, verbose=False)["input_ids"]
    targets = [t + [eos] for t in targets]  # closed by EOS whatever the tokenizer's template adds
    unk = tokenizer.unk_token_id
    return EncodedSeq2Seq(sources, [_cut(t, max_target_length, eos) for t in targets], cut_sources,
                          sum(len(t) > max_target_length for t in targets),
                          sum(unk in t for t in targets) if unk is not None else 0)


def encode_splits(recipe: FinetuneRecipe, tokenizer, splits: dict[str, list[TextPair]]) -> dict[str, EncodedSeq2Seq]:
    """Every split encoded; what was truncated (and targets holding the unknown token) said once per split."""
    d, out = recipe.data, {}
    for name, pairs in splits.items():
        enc = encode_seq2seq(tokenizer, pairs, d.max_length, d.max_target_length, recipe.seq2seq.source_prefix)
        where = source_of(d, name)
        if enc.truncated_targets:
            console.print(f"[yellow]{where}: {enc.truncated_targets} of {len(pairs)} targets longer than "
                          f"data.max_target_length={d.max_target_length} tokens, truncated")
        if enc.truncated_sources:
            console.print(f"[yellow]{where}: {enc.truncated_sources} of {len(pairs)} sources truncated to "
                          f"data.max_length={d.max_length} tokens")
        if enc.unknown_targets:
            console.print(f"[yellow]{where}: {enc.unknown_targets} of {len(pairs)} targets hold the tokenizer's "
                          f"unknown token {tokenizer.unk_token!r}; the model learns to generate it")
        out[name] = enc
    return out


def collate_seq2seq(data: EncodedSeq2Seq, idx: list[int], pad_id: int) -> dict:
    """Right-padded sources with their mask, and labels padded with -100 (the model shifts them right, starting
    from its decoder start token, to make the decoder's inputs)."""
    width = max(len(data.input_ids[i]) for i in idx)
    target_width = max(len(data.labels[i]) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    labels = torch.full((len(idx), target_width), -100, dtype=torch.long)
    for r, i in enumerate(idx):
        n, m = len(data.input_ids[i]), len(data.labels[i])
        ids[r, :n] = torch.tensor(data.input_ids[i])
        mask[r, :n] = 1
        labels[r, :m] = torch.tensor(data.labels[i])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class Seq2SeqLoader(TaskLoader):
    """TaskLoader's seeded, resumable batch order over (source, target) pairs."""

    def micro_batch(self, step: int, micro: int):
        return collate_seq2seq(self.data, self.batch_indices(step, micro), self.pad_id), None, None
