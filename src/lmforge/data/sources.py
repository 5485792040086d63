"""Read text, JSONL, CSV/TSV and Parquet sources into `datasets` tables of (text, domain, split)."""

from __future__ import annotations

import hashlib
import contextlib
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Union

from lmforge.data.clusters import ClusterLabeler, clustering_fingerprint
from lmforge.data.files import EXTENSIONS, expand_paths
from lmforge.errors import LmforgeError
from lmforge.paths import PREPARED_MARKER
from lmforge.recipe import DataConfig, SourceConfig

if TYPE_CHECKING:
    import datasets


def _datasets():
    """The `datasets` library, imported on first use: a run whose token blocks are cached never needs it (it costs
    about half a second and 80 MB of memory to import)."""
    import datasets

    datasets.disable_progress_bars()
    return datasets


def _features():
    """Declared so a numeric, null or mixed-type text column becomes strings (else `datasets` keeps e.g. Json/int)."""
    v = _datasets().Value
    return _datasets().Features({"text": v("string"), "domain": v("string"), "split": v("string")})


def _format_of(src: SourceConfig, file: Path) -> str:
    if src.format != "auto":
        return src.format
    fmt = EXTENSIONS.get(file.suffix.lower())
    if fmt is None:
        raise LmforgeError(f"{file}: unknown file type '{file.suffix}'; set 'format' on this source")
    return fmt


def _check_file(file: Path, fmt: str) -> None:
    if file.stat().st_size == 0:
        raise LmforgeError(f"{file}: the file is empty")
    if fmt == "parquet":
        return
    # Find undecodable bytes before `datasets` does, so the message names the file and line.
    with open(file, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise LmforgeError(
                    f"{file}: line {lineno}: not valid UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1})"
                ) from None


def _bad_json_line(files: list[Path]) -> Optional[str]:
    """After a JSON parse failure: the first unparsable line of a .jsonl file, as 'FILE: line N: ...'."""
    for file in files:
        if file.suffix.lower() != ".jsonl":  # a .json file may be one document spanning many lines
            continue
        with open(file, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    return (f"{file}: line {lineno}, column {err.pos + 1}: not valid JSON "
                            f"({err.msg.removesuffix(' at')})")
    return None


@contextlib.contextmanager
def _datasets_quiet():
    logger = _datasets().utils.logging.get_logger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load_files(src: SourceConfig, files: list[Path], fmt: str, streaming: bool, cache_dir: Optional[str]):
    names = [str(f) for f in files]
    kwargs = dict(data_files=names, split="train", streaming=streaming, cache_dir=cache_dir)
    if fmt == "text":
        ds = _datasets().load_dataset("text", sample_by=src.sample_by, **kwargs)
        column = "text"
        if src.sample_by == "paragraph":
            # `datasets` splits on an exact blank line; a line of spaces (as in WikiText) also ends a paragraph.
            ds = ds.map(_split_paragraphs, batched=True)
    elif fmt == "jsonl":
        with _datasets_quiet():  # a parse error is reported by the caller, with its line; no log line before it
            ds = _datasets().load_dataset("json", **kwargs)
        column = src.text_column
    elif fmt in ("csv", "tsv"):
        ds = _datasets().load_dataset("csv", delimiter="\t" if fmt == "tsv" else ",", **kwargs)
        column = src.text_column
    else:
        ds = _datasets().load_dataset("parquet", **kwargs)
        column = src.text_column
    columns = ds.column_names if not streaming else list(next(iter(ds)).keys())
    if column not in columns:
        raise LmforgeError(
            f"{files[0]}: no column '{column}' (columns: {', '.join(map(str, columns))}); "
            "set 'text_column' on this source")
    return ds.select_columns([column]).rename_column(column, "text") if column != "text" else ds.select_columns(["text"])


_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")


def _split_paragraphs(batch: dict) -> dict:
    return {"text": [p for text in batch["text"] for p in _PARAGRAPH_BREAK.split(text) if p.strip()]}


def split_of(text: str, seed: int, fraction: float) -> str:
    """Seeded, order-free split: a document's split depends only on its text (duplicates stay together)."""
    if fraction <= 0:
        return "train"
    digest = hashlib.blake2b(f"{seed}\0{text}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return "validation" if int.from_bytes(digest, "little") / 2**64 < fraction else "train"


def _load_prepared(src: SourceConfig, streaming: bool, cache_dir: Optional[str]) -> list:
    parts = []
    for split in ("train", "validation"):
        files = sorted(str(f) for f in (Path(src.path) / split).glob("*.parquet"))
        if not files:
            continue
        ds = _datasets().load_dataset("parquet", data_files=files, split="train", streaming=streaming,
                                   cache_dir=cache_dir).select_columns(["text", "domain"])
        fixed = src.split or split
        parts.append(ds.map(lambda b, s=fixed: {"split": [s] * len(b["text"])}, batched=True, features=_features()))
    if not parts:
        raise LmforgeError(f"{src.path}: prepared folder holds no Parquet shards")
    return parts


def load_documents(config: DataConfig, streaming: Optional[bool] = None):
    """All sources as one table with columns text, domain, split (rows with empty text dropped).

    Returns a `datasets.Dataset`, or an `IterableDataset` in streaming mode.
    """
    if not config.sources:
        raise LmforgeError("data.sources: the recipe names no data sources")
    streaming = config.streaming if streaming is None else streaming
    parts = []
    for i, src in enumerate(config.sources):
        if (Path(src.path) / PREPARED_MARKER).is_file():
            parts.extend(_load_prepared(src, streaming, config.cache_dir))
            continue
        files = expand_paths(src.path, f"data.sources[{i}].path")
        by_format: dict[str, list[Path]] = {}
        for f in files:
            by_format.setdefault(_format_of(src, f), []).append(f)
        for fmt, group in by_format.items():
            for f in group:
                _check_file(f, fmt)
            try:
                ds = _load_files(src, group, fmt, streaming, config.cache_dir)
            except LmforgeError:
                raise
            except Exception as err:  # datasets/pyarrow parse errors: name the file (and line) if we can
                located = _bad_json_line(group) if fmt == "jsonl" else None
                if located:
                    raise LmforgeError(located) from None
                # `datasets` wraps the parser's error in a generic one; its cause says what was wrong.
                cause = err.__cause__ or err
                raise LmforgeError(
                    f"{src.path}: could not read as {fmt}: {(str(cause) or str(err)).splitlines()[0]}") from None
            seed, frac, fixed, domain = config.split_seed, config.validation_fraction, src.split, src.domain

            def tag(batch, seed=seed, frac=frac, fixed=fixed, domain=domain):
                texts = [t if isinstance(t, str) else ("" if t is None else str(t)) for t in batch["text"]]
                return {"text": texts, "domain": [domain] * len(texts),
                        "split": [fixed or split_of(t, seed, frac) for t in texts]}

            kw = {} if streaming else {"num_proc": config.num_proc if config.num_proc > 1 else None}
            ds = ds.map(tag, batched=True, features=_features(), **kw)
            ds = ds.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True, **kw)
            if not streaming and len(ds) == 0:
                raise LmforgeError(f"{src.path}: no non-empty documents")
            parts.append(ds)
    if config.domain_clusters:  # unsupervised domains (c-BTM): a document's domain is its nearest cluster
        labeler = ClusterLabeler(config.domain_clusters)
        parts = [p.map(labeler, batched=True, features=_features()) for p in parts]
    if config.only_domains:
        keep = set(config.only_domains)
        parts = [p.filter(lambda b: [d in keep for d in b["domain"]], batched=True) for p in parts]
        if not streaming:
            parts = [p for p in parts if len(p)] or parts[:1]
            if sum(len(p) for p in parts) == 0:
                raise LmforgeError(f"data.only_domains: no documents of {sorted(keep)} in the sources")
    if streaming:
        # Mix the sources, but keep going until every one is exhausted: the default strategy
        # ('first_exhausted') silently dropped the rest of the longer sources.
        return (_datasets().interleave_datasets(parts, stopping_strategy="all_exhausted_without_replacement")
                if len(parts) > 1 else parts[0])
    return _datasets().concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def iter_texts(docs, split: str = "train", limit: Optional[int] = None) -> Iterable[str]:
    n = 0
    for row in docs:
        if row["split"] != split:
            continue
        yield row["text"]
        n += 1
        if limit is not None and n >= limit:
            return


def fingerprint_sources(config: DataConfig) -> str:
    """A key that changes when any source file, split setting, format or document clustering changes."""
    h = hashlib.sha256()
    h.update(config.model_dump_json(exclude={"num_proc", "cache_dir", "streaming"}).encode())
    if config.domain_clusters:  # the clustering's content, not only its path, decides the domains
        h.update(clustering_fingerprint(config.domain_clusters).encode())
    for i, src in enumerate(config.sources):
        for f in expand_paths(src.path, f"data.sources[{i}].path"):
            st = f.stat()
            h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


Documents = Union["datasets.Dataset", "datasets.IterableDataset"]
