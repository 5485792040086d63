"""Tolerant, streaming readers: raw files → (source index, text) records, in work units.

Unlike `lmforge.data.sources`, which stops at the first bad byte (a run recipe should name clean
data), prep meets raw data: binary files, mixed encodings, a 50 MB line, empty sources. Each is
skipped or split and counted under a named reason; nothing here raises on bad content.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from lmforge.data.files import EXTENSIONS, expand_paths
from lmforge.errors import LmforgeError
from lmforge.prep.config import PrepSourceConfig as SourceConfig

# Formats whose records are single lines: a big file can be split into byte ranges at line ends.
LINE_FORMATS = ("jsonl", "text-line")
SNIFF_BYTES = 8192


@dataclass
class Part:
    """A byte range of one file of one source; end < 0 means to the end of the file. `first_line` is the
    1-based number of the first line that starts in the range (documents' ids count lines from it)."""
    source: int
    file: str
    start: int = 0
    end: int = -1
    first_line: int = 1


@dataclass
class Unit:
    """What one worker reads and processes in one go; its results are saved under its index."""
    index: int
    parts: list[Part] = field(default_factory=list)
    bytes: int = 0


def file_format(src: SourceConfig, file: Path) -> Optional[str]:
    fmt = src.format if src.format != "auto" else EXTENSIONS.get(file.suffix.lower())
    if fmt == "text":
        return f"text-{src.sample_by}"
    if fmt == "jsonl" and file.suffix.lower() == ".json":
        return "json"  # one JSON document (a list or a mapping of records), read whole
    return fmt


def plan_units(sources: list[SourceConfig], shard_mb: float) -> tuple[list[Unit], Counter]:
    """Cut the inputs into work units of about `shard_mb`, or smaller: at least ~16 units in all, so
    that processes stay busy. The plan depends only on the inputs, so a resumed run finds its units."""
    events: Counter = Counter()
    files: list[tuple[int, Path, int]] = []
    for i, src in enumerate(sources):
        try:
            found = expand_paths(src.path, f"sources[{i}].path")
        except LmforgeError as err:
            if "no data files found" not in str(err):
                raise  # a path that does not exist is a typo in the recipe, not bad data
            events["empty_source"] += 1
            continue
        for f in found:
            size = f.stat().st_size
            if size == 0:
                events["empty_file"] += 1
            else:
                files.append((i, f, size))
    total = sum(size for _, _, size in files)
    target = int(min(shard_mb * 2**20, max(2**20, total / 16)))
    units: list[Unit] = []
    for i, f, size in files:
        # Line-per-record files are cut into byte ranges; other formats go whole.
        step = target if file_format(sources[i], f) in LINE_FORMATS else size
        starts = list(range(0, size, step))
        for start, first_line in zip(starts, _first_lines(f, starts)):
            if not units or units[-1].bytes >= target:
                units.append(Unit(len(units)))
            units[-1].parts.append(Part(i, str(f), start, min(size, start + step) if step < size else -1, first_line))
            units[-1].bytes += min(step, size - start)
    return units, events


def _first_lines(file: Path, starts: list[int]) -> list[int]:
    """The line number of the first line beginning at or after each start (one pass over the file)."""
    if starts == [0]:
        return [1]
    # A part starting at s > 0 begins after the first newline at or after s - 1.
    out, seen, at = [], 0, 0
    with open(file, "rb") as fh:
        for start in starts:
            if start == 0:
                out.append(1)
                continue
            while at < start - 1:
                chunk = fh.read(min(2**22, start - 1 - at))
                seen += chunk.count(b"\n")
                at += len(chunk)
            out.append(seen + 2)
    return out


def decode(raw: bytes, events: Counter) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # Mixed encodings: a Latin-1/Windows-1252 line inside a UTF-8 file is the common case.
        events["decoded_as_cp1252"] += 1
        return raw.decode("cp1252", errors="replace")


def _is_binary(file: str) -> bool:
    with open(file, "rb") as fh:
        head = fh.read(SNIFF_BYTES)
    return b"\x00" in head and not head.startswith((b"\xff\xfe", b"\xfe\xff"))


def _lines(fh, part: Part, limit: int, events: Counter) -> Iterator[tuple[bytes, bool, int]]:
    """Lines whose first byte lies in the part's range, each at most `limit` bytes, with their line number.

    A longer line comes out in pieces (`True` = more of the same line follows), cut at a space
    when there is one near the end, else at a UTF-8 character boundary.
    """
    if part.start > 0:
        fh.seek(part.start - 1)
        while not fh.readline(limit).endswith(b"\n"):  # the line in progress belongs to the previous part
            if fh.tell() >= os.fstat(fh.fileno()).st_size:
                return
    end = part.end if part.end >= 0 else float("inf")
    carry, mid_line, line = b"", False, part.first_line
    while True:
        if not mid_line and fh.tell() >= end:  # a line that began inside the range is read to its end
            return
        chunk = carry + fh.readline(limit - len(carry))
        carry = b""
        if not chunk:
            return
        if chunk.endswith(b"\n") or len(chunk) < limit:
            mid_line = False
            yield chunk, False, line
            line += 1
            continue
        cut = chunk.rfind(b" ", len(chunk) - len(chunk) // 8)
        if cut <= 0:
            cut = len(chunk)
            while cut > len(chunk) - 4 and (chunk[cut - 1] & 0xC0) == 0x80:
                cut -= 1
            if cut > 0 and chunk[cut - 1] >= 0xC0:  # a lead byte whose continuation was cut off
                cut -= 1
        events["split_long_line"] += 1
        carry, mid_line = chunk[cut:], True
        yield chunk[:cut], True, line


def _cut(text: str, limit: int, events: Counter) -> Iterator[str]:
    if len(text) <= limit:
        yield text
        return
    events["split_long_record"] += 1
    start = 0
    while start < len(text):
        stop = min(len(text), start + limit)
        if stop < len(text):
            space = text.rfind(" ", start + limit // 2, stop)
            stop = space + 1 if space > 0 else stop
        yield text[start:stop]
        start = stop


def _text_value(value) -> Optional[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return " ".join(value)  # e.g. PubMedQA's CONTEXTS: a list of paragraphs
    if value is None or isinstance(value, (dict, list)):
        return None
    return str(value)


Record = tuple[int, str, Optional[str]]  # line or row number, text, the id column's value


def _read_text(fh, part: Part, mode: str, limit: int, events: Counter) -> Iterator[Record]:
    pieces: list[str] = []
    size, first = 0, 0
    for raw, more, at in _lines(fh, part, limit, events):
        line = decode(raw, events)
        if mode == "line":
            yield at, line, None
            continue
        if mode == "paragraph" and not more and not line.strip():
            if pieces:
                yield first, "".join(pieces), None
            pieces, size = [], 0
            continue
        if not pieces:
            first = at
        pieces.append(line)
        size += len(line)
        if size >= limit:  # a paragraph or document too big for one record
            events["split_long_record"] += 1
            yield first, "".join(pieces), None
            pieces, size = [], 0
    if pieces:
        yield first, "".join(pieces), None


def _id_value(record, src: SourceConfig, where: str) -> Optional[str]:
    """The record's id from the source's id column (None without one); a record without it is an error."""
    if src.id_column is None:
        return None
    value = record.get(src.id_column) if isinstance(record, dict) else None
    if value is None or isinstance(value, (dict, list)):
        raise LmforgeError(f"{where}: no id in '{src.id_column}' (the source's id_column)")
    return str(value)


def _read_jsonl(fh, part: Part, src: SourceConfig, limit: int, events: Counter) -> Iterator[Record]:
    skipping, column = False, src.text_column
    for raw, more, at in _lines(fh, part, 8 * limit, events):
        if skipping or more:  # a JSON record cannot be parsed in pieces
            if not skipping:
                events["record_too_long"] += 1
            skipping = more
            continue
        if not raw.strip():
            continue
        try:
            obj = json.loads(decode(raw, events))
        except ValueError:
            events["bad_json_line"] += 1
            continue
        text = _text_value(obj.get(column) if isinstance(obj, dict) else obj)
        if text is None:
            events["missing_text_field"] += 1
            continue
        yield at, text, _id_value(obj, src, f"{part.file}:{at}")


def _read_json(file: str, src: SourceConfig, events: Counter) -> Iterator[Record]:
    try:
        with open(file, "rb") as fh:
            obj = json.loads(decode(fh.read(), events))
    except ValueError:
        events["bad_json_file"] += 1
        return
    column = src.text_column
    records = obj if isinstance(obj, list) else list(obj.values()) if isinstance(obj, dict) else [obj]
    if isinstance(obj, dict) and column in obj:
        records = [obj]
    for row, rec in enumerate(records, 1):
        text = _text_value(rec.get(column) if isinstance(rec, dict) else rec)
        if text is None:
            events["missing_text_field"] += 1
            continue
        yield row, text, _id_value(rec, src, f"{file} record {row}")


def _read_csv(fh, part: Part, delimiter: str, src: SourceConfig, limit: int, events: Counter) -> Iterator[Record]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    column = src.text_column
    lines = (decode(raw, events) for raw, _, _ in _lines(fh, part, 8 * limit, events))
    reader = csv.reader(lines, delimiter=delimiter)
    try:
        header = next(reader)
    except (StopIteration, csv.Error):
        return
    if column not in header:
        events["missing_text_column"] += 1
        return
    if src.id_column is not None and src.id_column not in header:
        raise LmforgeError(f"{part.file}: no column '{src.id_column}' (the source's id_column)")
    at = header.index(column)
    id_at = header.index(src.id_column) if src.id_column is not None else None
    number = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error:
            events["bad_csv_row"] += 1
            continue
        number += 1
        if len(row) <= max(at, id_at or 0):
            if row:
                events["bad_csv_row"] += 1
            continue
        yield number, row[at], row[id_at] if id_at is not None else None


def _read_parquet(file: str, src: SourceConfig, events: Counter) -> Iterator[Record]:
    # pyarrow's Parquet reader loads only for Parquet sources
    import pyarrow.parquet as pq
    column, id_column = src.text_column, src.id_column
    try:
        pf = pq.ParquetFile(file)
        if column not in pf.schema_arrow.names:
            events["missing_text_column"] += 1
            return
        if id_column is not None and id_column not in pf.schema_arrow.names:
            raise LmforgeError(f"{file}: no column '{id_column}' (the source's id_column)")
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=[column] + ([id_column] if id_column else [])):
            table = batch.to_pylist()
            for record in table:
                row += 1
                text = _text_value(record[column])
                if text is None:
                    events["missing_text_field"] += 1
                    continue
                yield row, text, _id_value(record, src, f"{file} row {row}")
    except (OSError, ValueError):  # pyarrow's errors derive from these
        events["unreadable_file"] += 1
        return


def read_part(src: SourceConfig, part: Part, limit: int, events: Counter) -> Iterator[tuple[str, str]]:
    """Every text record of one part with its id, each at most `limit` characters (longer ones are cut).

    The id is the id column's value, or `FILE:N` with N the record's line (text, JSONL) or row (CSV/TSV,
    JSON, Parquet; 1-based, header excluded); the second and later pieces of a cut record get `#2`, `#3`...
    """
    fmt = file_format(src, Path(part.file))
    if fmt is None:
        events["unknown_file_type"] += 1
        return
    if fmt != "parquet" and _is_binary(part.file):
        events["binary_file"] += 1
        return
    try:
        with contextlib.ExitStack() as stack:
            if fmt == "parquet":
                records = _read_parquet(part.file, src, events)
            elif fmt == "json":
                records = _read_json(part.file, src, events)
            else:
                fh = stack.enter_context(open(part.file, "rb"))
                if fmt.startswith("text-"):
                    records = _read_text(fh, part, fmt[5:], limit, events)
                elif fmt == "jsonl":
                    records = _read_jsonl(fh, part, src, limit, events)
                else:
                    records = _read_csv(fh, part, "\t" if fmt == "tsv" else ",", src, limit, events)
            last, piece = None, 0
            for at, text, user_id in records:
                base = user_id if user_id is not None else f"{part.file}:{at}"
                # The pieces of one long line share its number (a repeated id of the user's is their error).
                piece = piece + 1 if user_id is None and at == last else 0
                last = at if user_id is None else None
                for k, cut in enumerate(_cut(text, limit, events), piece):
                    yield (f"{base}#{k + 1}" if k else base), cut
                    piece = k
    except OSError:
        events["unreadable_file"] += 1


def part_bytes(part: Part) -> int:
    size = os.path.getsize(part.file)
    return (part.end if part.end >= 0 else size) - part.start
