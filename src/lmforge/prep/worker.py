"""Stage one, per work unit (in worker processes): read → normalise → filter → hash and sign.

A unit's results are files under the work folder — the kept documents (Parquet), their MinHash
signatures and sorted shingle sets (.npy, for checking candidate pairs exactly), the documents the
filters removed (Parquet: id, source, reason) and its counts (.json, written last: its presence means
the unit is done), so a restarted run skips finished units.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmforge.prep.config import PrepRecipe
from lmforge.prep.dedup import MinHasher, dedup_tokens, exact_key, shingle_sets
from lmforge.prep.filters import WordTable, quality_reasons
from lmforge.prep.normalize import count_lines, normalize, strip_boilerplate
from lmforge.prep.read import Unit, part_bytes, read_part

BATCH_DOCS = 2000
BATCH_CHARS = 4_000_000
HIST_EDGES = np.logspace(0, 6, 49)  # words per document, 1 to 1M, log-spaced
_PIECE = re.compile(r"\w+|[^\w\s]")

UNIT_SCHEMA = pa.schema([("text", pa.string()), ("domain", pa.string()), ("id", pa.string()),
                         ("source", pa.string()), ("src", pa.int64()), ("fixed", pa.string()),
                         ("words", pa.int64()), ("tokens", pa.int64()), ("exact", pa.uint64()),
                         ("valid", pa.bool_()), ("shingles", pa.int64())])
FILTERED_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("src", pa.int64()),
                             ("domain", pa.string()), ("reason", pa.string())])


def unit_paths(work: Path, index: int) -> dict[str, Path]:
    stem = work / "units" / f"unit-{index:05d}"
    return {"rows": stem.with_suffix(".parquet"), "sig": stem.with_suffix(".sig.npy"),
            "sets": stem.with_suffix(".sets.npy"), "filtered": stem.with_suffix(".filtered.parquet"),
            "stats": stem.with_suffix(".json")}


class TokenCounter:
    """Tokens per document: with the recipe's tokenizer, or words and punctuation marks."""

    def __init__(self, folder: Optional[str]):
        self.tokenizer = None
        if folder:
            from tokenizers import Tokenizer  # prep workers load the tokenizer only when counting tokens with it
            self.tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))

    def __call__(self, texts: list[str]) -> np.ndarray:
        if self.tokenizer is None:
            return np.fromiter((len(_PIECE.findall(t)) for t in texts), np.int64, len(texts))
        encoded = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return np.fromiter((len(e.ids) for e in encoded), np.int64, len(texts))


class _Unit:
    def __init__(self, recipe: PrepRecipe, boilerplate: dict):
        self.r = recipe
        self.boilerplate = boilerplate
        self.table = WordTable()
        self.hasher = MinHasher(recipe.dedup.num_perm, recipe.dedup.ngram, recipe.dedup.seed)
        self.count_tokens = TokenCounter(recipe.output.tokenizer)
        self.code_domains = set(recipe.code.domains)
        self.before: dict = defaultdict(Counter)
        self.removed: dict = defaultdict(Counter)
        self.hist: dict = {}
        self.examples: dict = defaultdict(dict)  # domain → reason → the first removed document's start
        self.columns: dict = {name: [] for name in UNIT_SCHEMA.names}
        self.filtered: dict = {name: [] for name in FILTERED_SCHEMA.names}
        self.sigs: list = []
        self.sets: list = []

    def process(self, batch: list[tuple[str, int, str, str]], events: Counter) -> None:
        r = self.r
        texts = [normalize(t, r.normalize) for t, *_ in batch]
        sources = [r.sources[b[1]] for b in batch]
        if self.boilerplate:
            for i, src in enumerate(sources):
                lines = self.boilerplate.get(src.domain)
                if lines:
                    texts[i], dropped = strip_boilerplate(texts[i], lines, r.normalize.boilerplate_min_chars)
                    events["boilerplate_lines"] += dropped
        tokens = self.count_tokens(texts)
        words = np.zeros(len(texts), np.int64)
        reasons: list[Optional[str]] = ["empty" if not t else None for t in texts]
        groups: dict = defaultdict(list)
        for i, t in enumerate(texts):
            if t:
                groups[sources[i].domain in self.code_domains].append(i)
        for is_code, idx in groups.items():
            why, n = quality_reasons([texts[i] for i in idx], is_code, self.table, r.filters, r.code)
            words[idx] = n
            for i, reason in zip(idx, why):
                reasons[i] = reason
        kept = [i for i, reason in enumerate(reasons) if reason is None]
        for i, src in enumerate(sources):
            stats = self.before[src.domain]
            stats["docs"] += 1
            stats["words"] += int(words[i])
            stats["tokens"] += int(tokens[i])
            stats["chars"] += len(texts[i])
            if reasons[i] is not None:
                self.removed[src.domain][reasons[i]] += 1
                self.examples[src.domain].setdefault(reasons[i], texts[i][:300])
                for name, value in zip(FILTERED_SCHEMA.names, (batch[i][2], batch[i][3], batch[i][1], src.domain,
                                                               reasons[i])):
                    self.filtered[name].append(value)
        for domain in {s.domain for s in sources}:
            mask = np.array([s.domain == domain for s in sources])
            counts = np.histogram(np.maximum(words[mask], 1), HIST_EDGES)[0]
            self.hist[domain] = self.hist.get(domain, 0) + counts
        token_lists = [dedup_tokens(texts[i]) for i in kept]
        sets, counts = shingle_sets(*self.hasher.shingles(token_lists), len(kept))
        sig, valid = self.hasher.sign(sets, counts), counts > 0
        self.sigs.append(sig)
        self.sets.append(sets)
        c = self.columns
        for j, i in enumerate(kept):
            c["text"].append(texts[i])
            c["domain"].append(sources[i].domain)
            c["id"].append(batch[i][2])
            c["source"].append(batch[i][3])
            c["src"].append(batch[i][1])
            c["shingles"].append(int(counts[j]))
            c["fixed"].append(sources[i].split or "")
            c["words"].append(int(words[i]))
            c["tokens"].append(int(tokens[i]))
            c["exact"].append(exact_key(token_lists[j], texts[i]))
            c["valid"].append(bool(valid[j]))


def _batches(recipe: PrepRecipe, unit: Unit, events: Counter):
    batch, size = [], 0
    for part in unit.parts:
        src = recipe.sources[part.source]
        for doc_id, text in read_part(src, part, recipe.normalize.max_doc_chars, events):
            batch.append((text, part.source, doc_id, part.file))
            size += len(text)
            if len(batch) >= BATCH_DOCS or size >= BATCH_CHARS:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def arrow_table(columns: dict[str, list], schema: pa.Schema) -> pa.Table:
    """A table from Python lists, each column built from its buffers: `pa.table(dict)` and `pa.array` check
    whether their input is a pandas object, which imports pandas (a quarter of a second and ~45 MB in each
    process); this never loads it. Columns are strings, booleans or 64-bit integers."""
    arrays = []
    for field in schema:
        values, n = columns[field.name], len(columns[field.name])
        if pa.types.is_string(field.type):
            data = [v.encode("utf-8") for v in values]
            offsets = np.zeros(n + 1, np.int64)
            np.cumsum(np.fromiter(map(len, data), np.int64, n), out=offsets[1:])
            if offsets[-1] >= 2**31:
                raise ValueError(f"column {field.name}: over 2 GB of text in one work unit")
            buffers = [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(data))]
        elif pa.types.is_boolean(field.type):
            buffers = [None, pa.py_buffer(np.packbits(np.asarray(values, bool), bitorder="little"))]
        else:
            buffers = [None, pa.py_buffer(np.asarray(values, field.type.to_pandas_dtype()))]
        arrays.append(pa.Array.from_buffers(field.type, n, buffers))
    return pa.Table.from_arrays(arrays, schema=schema)


def arrow_indices(index: np.ndarray) -> pa.Array:
    """Row numbers for `Table.take`, built from their buffer (`pa.array` would import pandas; see `arrow_table`)."""
    index = np.ascontiguousarray(index, np.int64)
    return pa.Array.from_buffers(pa.int64(), len(index), [None, pa.py_buffer(index)])


def column_numpy(column) -> np.ndarray:
    """A column of a table read back (no nulls) as numpy: strings as objects, numbers and booleans from their
    buffers. pyarrow's `to_numpy` would import pandas (see `arrow_table`)."""
    parts = []
    for chunk in column.chunks:
        lo, hi = chunk.offset, chunk.offset + len(chunk)
        if chunk.null_count:
            parts.append(chunk.to_numpy(zero_copy_only=False))
        elif pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type):
            array = np.empty(len(chunk), object)
            array[:] = chunk.to_pylist()
            parts.append(array)
        elif pa.types.is_boolean(chunk.type):
            bits = np.unpackbits(np.frombuffer(chunk.buffers()[1], np.uint8), bitorder="little")
            parts.append(bits[lo:hi].astype(bool))
        else:
            parts.append(np.frombuffer(chunk.buffers()[1], chunk.type.to_pandas_dtype())[lo:hi])
    if not parts:
        return np.zeros(0, object if pa.types.is_string(column.type) else column.type.to_pandas_dtype())
    return np.concatenate(parts)


def read_columns(path: Path, columns: Optional[list[str]] = None) -> pa.Table:
    """One Parquet file's columns, read as a single file: `pq.read_table` goes through pyarrow's dataset layer,
    whose filter expressions import pandas."""
    return pq.ParquetFile(path).read(columns=columns)


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a file object: np.save would append '.npy' to a temp name
        np.save(fh, array)


def process_unit(recipe: PrepRecipe, unit: Unit, work: Path, boilerplate: dict) -> dict:
    t0 = time.perf_counter()
    events: Counter = Counter()
    state = _Unit(recipe, boilerplate)
    for batch in _batches(recipe, unit, events):
        state.process(batch, events)
    paths = unit_paths(work, unit.index)
    paths["rows"].parent.mkdir(parents=True, exist_ok=True)
    table = arrow_table(state.columns, UNIT_SCHEMA)
    _atomic(paths["rows"], lambda p: pq.write_table(table, p))
    filtered = arrow_table(state.filtered, FILTERED_SCHEMA)
    _atomic(paths["filtered"], lambda p: pq.write_table(filtered, p))
    sig = np.concatenate(state.sigs) if state.sigs else np.zeros((0, recipe.dedup.num_perm), np.uint32)
    _atomic(paths["sig"], lambda p: _save_npy(p, sig))
    sets = np.concatenate(state.sets) if state.sets else np.zeros(0, np.uint64)
    _atomic(paths["sets"], lambda p: _save_npy(p, sets))
    stats = {"unit": unit.index, "bytes": sum(part_bytes(p) for p in unit.parts), "rows": table.num_rows,
             "before": {d: dict(c) for d, c in state.before.items()},
             "removed": {d: dict(c) for d, c in state.removed.items()}, "examples": dict(state.examples),
             "events": dict(events), "hist": {d: h.tolist() for d, h in state.hist.items()},
             "seconds": time.perf_counter() - t0}
    _atomic(paths["stats"], lambda p: p.write_text(json.dumps(stats)))
    return stats


def count_unit_lines(recipe: PrepRecipe, unit: Unit) -> dict[str, Counter]:
    """Boilerplate pass: in how many documents of each domain each line occurs."""
    events: Counter = Counter()
    counts: dict[str, Counter] = defaultdict(Counter)
    skip = set(recipe.code.domains)
    for batch in _batches(recipe, unit, events):
        by_domain: dict[str, list] = defaultdict(list)
        for text, s, *_ in batch:
            domain = recipe.sources[s].domain
            if domain not in skip:
                by_domain[domain].append(normalize(text, recipe.normalize))
        for domain, texts in by_domain.items():
            counts[domain].update(count_lines(texts, recipe.normalize.boilerplate_min_chars))
    return dict(counts)
