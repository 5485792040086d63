"""Tokenize documents once, pack them into fixed-length blocks, cache the blocks on disk.

Documents are packed within their domain (every block has one domain, so per-domain evaluation is
exact) and joined by their separators: CLM documents end with EOS, MLM documents are [CLS] … [SEP].
The cache holds each split's columns as `.npy` files that every run memory-maps (no `datasets` import and no
copy of the data on a cached run). Under torchrun, rank 0 builds the cache while the other ranks wait, then
everyone memory-maps it; a node whose cache folder is its own disk gets its copy from its first process.
Sentence-pair objectives (NSP/SOP) store pair rows instead of packed blocks (see `lmforge.data.pairs`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch.distributed as tdist

from lmforge.data.pairs import pair_builder
from lmforge.data.sources import fingerprint_sources, load_documents
from lmforge.errors import LmforgeError
from lmforge.paths import cache_root
from lmforge.recipe import DataConfig, ObjectiveConfig
from lmforge.tokenizer import special_ids

SPLITS = ("train", "validation")
CACHE_FORMAT = "npy-1"  # part of the cache key: a cache written in another layout is rebuilt, never misread
SAVE_ROWS = 8192  # rows converted at a time when a split is written (bounds the memory of the conversion)


def default_cache_dir() -> Path:
    return cache_root()


def _affixes(tokenizer, objective: str) -> tuple[list[int], list[int]]:
    ids = special_ids(tokenizer)
    if objective in ("mlm", "electra"):
        return ([ids["cls"]] if ids["cls"] is not None else []), ([ids["sep"]] if ids["sep"] is not None else [])
    if ids["eos"] is None:
        raise LmforgeError("tokenizer: causal-LM packing needs an EOS (or SEP) token; this tokenizer has none")
    return [], [ids["eos"]]


# Memory is bounded by the input's shape, not its size: a document longer than PIECE_CHARS is tokenized in pieces
# (cut just before a whitespace, where every pre-tokenizer splits anyway, so the tokens are those of the whole
# text), at most TOKENIZE_CHARS of text per tokenizer call, and token ids are kept as int32 arrays, never as
# Python lists. A 13 MB document with no line break used to take over 5 GB (tests/test_data.py).
PIECE_CHARS = 50_000
TOKENIZE_CHARS = 1_000_000


def text_pieces(text: str, limit: Optional[int] = None) -> list[str]:
    """`text` cut into pieces of at most `limit` characters, each cut where a run of whitespace starts (after a
    non-space character), so every piece but the first begins with the whole run, as pre-tokenizers see it in the
    whole text; a stretch of `limit` characters with no such place is cut where it ends."""
    limit = limit or PIECE_CHARS
    if len(text) <= limit:
        return [text]
    pieces, start = [], 0
    while len(text) - start > limit:
        cut = start + limit
        while cut > start and not (text[cut].isspace() and not text[cut - 1].isspace()):
            cut -= 1
        if cut == start:  # no whitespace in the window
            cut = start + limit
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def tokenize_documents(tokenizer, texts: list[str]) -> Iterator[np.ndarray]:
    """The token ids (int32) of each text, in order: long texts piece by piece, a bounded amount of text per
    tokenizer call."""
    def ids_of(pieces: list[str]) -> list[np.ndarray]:
        encoded = tokenizer(pieces, add_special_tokens=False, return_attention_mask=False,
                            verbose=False)["input_ids"]
        return [np.asarray(ids, dtype=np.int32) for ids in encoded]

    group: list[str] = []
    owners: list[int] = []
    size, next_out = 0, 0
    done: dict[int, list[np.ndarray]] = {}
    for i, text in enumerate(texts):
        for piece in text_pieces(text):
            group.append(piece)
            owners.append(i)
            size += len(piece)
            if size >= TOKENIZE_CHARS:
                for owner, ids in zip(owners, ids_of(group)):
                    done.setdefault(owner, []).append(ids)
                group, owners, size = [], [], 0
                while next_out < i:  # every piece of the texts before i is tokenized
                    yield _joined(done.pop(next_out, []))
                    next_out += 1
    for owner, ids in zip(owners, ids_of(group) if group else []):
        done.setdefault(owner, []).append(ids)
    while next_out < len(texts):
        yield _joined(done.pop(next_out, []))
        next_out += 1


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype=np.int32)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def pack_documents(token_lists, domains, block_size: int, head=(), tail=()) -> tuple[np.ndarray, list[str]]:
    """Concatenate each domain's documents (each between `head` and `tail`) and cut the stream into full blocks
    (the tail of the stream is dropped): an (n, block_size) int32 array and each block's domain."""
    head, tail = np.asarray(head, dtype=np.int32), np.asarray(tail, dtype=np.int32)
    streams: dict[str, list[np.ndarray]] = {}
    for ids, domain in zip(token_lists, domains):
        streams.setdefault(domain, []).extend((head, np.asarray(ids, dtype=np.int32), tail))
    blocks, block_domains = [], []
    for domain in list(streams):
        stream = np.concatenate(streams.pop(domain))  # one copy; the documents' own arrays go
        usable = len(stream) // block_size * block_size
        blocks.append(stream[:usable].reshape(-1, block_size))
        block_domains += [domain] * (usable // block_size)
    if len(blocks) == 1:
        return blocks[0], block_domains
    return (np.concatenate(blocks) if blocks else np.zeros((0, block_size), dtype=np.int32)), block_domains


def _tokenize_and_pack(tokenizer, objective: str, block_size: int, domain_ids: dict):
    head, tail = _affixes(tokenizer, objective)

    def fn(batch):
        blocks, doms = pack_documents(tokenize_documents(tokenizer, batch["text"]), batch["domain"], block_size,
                                      head, tail)
        return {"input_ids": blocks, "domain": [domain_ids[d] for d in doms]}
    return fn


class Blocks:
    """One split's rows: equal-length numpy columns (`input_ids` (n, block) int32, `domain` (n,) int64), memory-
    mapped from the cache or held in memory. `blocks["input_ids"]` is a column; `blocks[[3, 1]]` a dict of rows."""

    def __init__(self, columns: dict[str, np.ndarray]):
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"columns of unequal length: { {k: len(v) for k, v in columns.items()} }")
        self.columns = columns

    @classmethod
    def from_dict(cls, columns: dict) -> "Blocks":
        return cls({k: np.asarray(v) for k, v in columns.items()})

    @classmethod
    def load(cls, folder: Path) -> "Blocks":
        return cls({f.stem: np.load(f, mmap_mode="r") for f in sorted(Path(folder).glob("*.npy"))})

    @property
    def column_names(self) -> list[str]:
        return list(self.columns)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def __iter__(self) -> Iterator[dict]:
        """Each row as a dict of Python values (lists of ids, an int domain)."""
        for i in range(len(self)):
            yield {k: v[i].tolist() for k, v in self.columns.items()}

    def __getitem__(self, key: Union[str, int, slice, list, np.ndarray]):
        if isinstance(key, str):
            return self.columns[key]
        return {k: v[key] for k, v in self.columns.items()}


@dataclass
class BlockData:
    """Packed blocks of both splits plus the domain names their integer ids refer to."""
    train: Optional[Blocks]
    validation: Optional[Blocks]
    domains: list[str]
    block_size: int
    packed: bool = True  # False: independent rows (sentence pairs) that must not be shifted or joined

    def batch(self, split: str, indices) -> tuple[np.ndarray, np.ndarray]:
        ds = self.train if split == "train" else self.validation
        rows = np.asarray(indices, dtype=np.int64)
        return (np.asarray(ds["input_ids"][rows], dtype=np.int64),
                np.asarray(ds["domain"][rows], dtype=np.int64))


def cache_key(data: DataConfig, tokenizer, objective: ObjectiveConfig) -> str:
    h = hashlib.sha256()
    h.update(fingerprint_sources(data).encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode() if hasattr(tokenizer, "backend_tokenizer") else b"")
    h.update(f"{CACHE_FORMAT}:{objective.name}:{objective.block_size}:{_affixes(tokenizer, objective.kind)}".encode())
    if objective.pairs:
        h.update(f"{objective.segment_by}:{objective.pair_probability}:{data.split_seed}".encode())
    return h.hexdigest()[:20]


def build_blocks(data: DataConfig, tokenizer, objective: ObjectiveConfig, progress=None, *,
                 need_train: bool = True) -> BlockData:
    """Tokenized, packed blocks for both splits, from the on-disk cache when it is already there; with
    `need_train` False (evaluation), a training split without a full block is None instead of an error."""
    root = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
    target = root / "blocks" / cache_key(data, tokenizer, objective)
    # Under torchrun the first process builds the cache while the others wait for it; then, on a node that does
    # not see it (a node-local cache folder), the node's first process builds that node's copy.
    together = tdist.is_available() and tdist.is_initialized()
    rank = tdist.get_rank() if together else 0
    for first in (rank == 0, int(os.environ.get("LOCAL_RANK", rank)) == 0) if together else (True,):
        if first and not (target / "meta.json").exists():
            _build_cache(data, tokenizer, objective, target, progress)
        if together:
            tdist.barrier()
    meta = json.loads((target / "meta.json").read_text())
    if meta["train_blocks"] == 0 and need_train:
        raise LmforgeError(
            f"data: no full block of {objective.block_size} tokens in the training split; "
            "add text or lower objective.block_size")
    train = Blocks.load(target / "train") if meta["train_blocks"] else None
    val = Blocks.load(target / "validation") if meta["validation_blocks"] else None
    return BlockData(train=train, validation=val, domains=meta["domains"], block_size=objective.block_size,
                     packed=meta.get("layout", "packed") == "packed")


def _build_cache(data, tokenizer, objective, target: Path, progress) -> None:
    docs = load_documents(data, streaming=False)
    domains = sorted(set(docs.unique("domain")))
    domain_ids = {d: i for i, d in enumerate(domains)}
    if objective.pairs:
        ids = special_ids(tokenizer)
        if ids["cls"] is None or ids["sep"] is None:
            raise LmforgeError("tokenizer: sentence-pair objectives need [CLS] and [SEP] (or <s> and </s>) tokens")
        fn = pair_builder(tokenizer, block_size=objective.block_size, kind=objective.kind.split("+")[1],
                          segment_by=objective.segment_by, probability=objective.pair_probability,
                          seed=data.split_seed, domain_ids=domain_ids, cls=ids["cls"], sep=ids["sep"],
                          pad=ids["pad"])
    else:
        fn = _tokenize_and_pack(tokenizer, objective.kind, objective.block_size, domain_ids)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {}
    for split in SPLITS:
        part = docs.filter(lambda b, s=split: [x == s for x in b["split"]], batched=True)
        packed = part.map(fn, batched=True, batch_size=1000, remove_columns=part.column_names,
                          with_indices=objective.pairs,
                          num_proc=data.num_proc if data.num_proc > 1 and len(part) > 1000 else None)
        _save_rows(packed, tmp / split)
        counts[split] = len(packed)
    (tmp / "meta.json").write_text(json.dumps(
        {"domains": domains, "block_size": objective.block_size, "layout": "pairs" if objective.pairs else "packed",
         "train_blocks": counts["train"],
         "validation_blocks": counts["validation"]}))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)


def _save_rows(rows, folder: Path) -> None:
    """A `datasets.Dataset` of fixed-length rows as one `.npy` file per column, converted `SAVE_ROWS` at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    if len(rows) == 0:
        return
    rows = rows.with_format("numpy")
    first = rows[:1]
    dtypes = {"input_ids": np.int32, "domain": np.int64}
    files = {k: np.lib.format.open_memmap(folder / f"{k}.npy", mode="w+", dtype=dtypes.get(k, np.asarray(v).dtype),
                                          shape=(len(rows), *np.asarray(v).shape[1:]))
             for k, v in first.items()}
    for start in range(0, len(rows), SAVE_ROWS):
        chunk = rows[start:start + SAVE_ROWS]
        for k, out in files.items():
            out[start:start + len(chunk[k])] = np.asarray(chunk[k])
    for out in files.values():
        out.flush()
    del files


def stream_blocks(data: DataConfig, tokenizer, objective: ObjectiveConfig, split: str = "train",
                  skip: int = 0, seed: int = 0, buffer: int = 10_000) -> Iterator[tuple[list[int], str]]:
    """Streaming mode: blocks are produced on the fly from sources larger than memory."""
    docs = load_documents(data, streaming=True)
    docs = docs.filter(lambda row: row["split"] == split)
    if split == "train":
        docs = docs.shuffle(seed=seed, buffer_size=buffer)
    head, tail = _affixes(tokenizer, objective.kind)
    streams: dict[str, list[int]] = {}
    produced = 0
    for row in docs:
        ids = next(tokenize_documents(tokenizer, [row["text"]])).tolist()
        stream = streams.setdefault(row["domain"], [])
        stream.extend(head + ids + tail)
        while len(stream) >= objective.block_size:
            block = stream[:objective.block_size]
            del stream[:objective.block_size]
            if produced >= skip:
                yield block, row["domain"]
            produced += 1
