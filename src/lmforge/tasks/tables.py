"""Read labelled examples: CSV/TSV/JSONL/Parquet rows for classification, CoNLL/JSONL sentences for NER.

Every error names the file and, where there is one, the line.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from lmforge.errors import LmforgeError
from lmforge.tasks.config import SplitFile, TaskData
from lmforge.tasks.conll import read_conll, read_token_jsonl

EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet",
              ".txt": "conll", ".conll": "conll", ".bio": "conll", ".iob": "conll"}


@dataclass
class Row:
    text: str
    pair: Optional[str]
    labels: list[str]          # one label, or several for multi-label
    line: int                  # 1-based line (CSV/TSV/JSONL) or row number (Parquet)


def format_of(spec: SplitFile) -> str:
    if spec.format != "auto":
        return spec.format
    fmt = EXTENSIONS.get(Path(spec.path).suffix.lower())
    if fmt is None:
        raise LmforgeError(f"{spec.path}: unknown file type '{Path(spec.path).suffix}'; set 'format' for this file")
    return fmt


def _check_readable(path: Path) -> None:
    if not path.is_file():
        raise LmforgeError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise LmforgeError(f"{path}: the file is empty")


def label_name_map(data: TaskData) -> Optional[dict[str, str]]:
    """`data.label_names` as {code: name}: the recipe's mapping, or a file whose line i names code i."""
    names = data.label_names
    if names is None:
        return None
    if isinstance(names, dict):
        return {str(code): str(name) for code, name in names.items()}
    path = Path(names)
    if not path.is_file():
        raise LmforgeError(f"data.label_names: {path}: no such file (one label name per line)")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {str(i): name for i, name in enumerate(lines)}


def named_labels(data: TaskData) -> Optional[list[str]]:
    """The label set in code order when the recipe names its codes (code 0 first)."""
    mapping = label_name_map(data)
    if mapping is None:
        return None
    return [mapping[c] for c in sorted(mapping, key=lambda c: (not c.lstrip("-").isdigit(), int(c) if
                                                              c.lstrip("-").isdigit() else 0, c))]


def _records(path: Path, fmt: str, header: bool = True):
    """(line number, dict) for each record of a CSV/TSV/JSONL/Parquet file; a CSV/TSV file without a header gives
    each row as {0: first field, 1: second, ...}."""
    if fmt == "parquet":
        # pyarrow's Parquet reader loads only for Parquet files
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(path)
        except Exception as err:
            raise LmforgeError(f"{path}: not a readable Parquet file ({err})") from None
        for i, rec in enumerate(table.to_pylist(), 1):
            yield i, rec
        return
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            if fmt == "jsonl":
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except ValueError as err:
                        raise LmforgeError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
                    if not isinstance(rec, dict):
                        raise LmforgeError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
                    yield lineno, rec
                return
            # TSV files (GLUE, most corpora) do not quote; CSV files do.
            quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
            delimiter = "\t" if fmt == "tsv" else ","
            if not header:
                rows = csv.reader(fh, delimiter=delimiter, quoting=quoting)
                for fields in rows:
                    if fields:
                        yield rows.line_num, dict(enumerate(fields))
                return
            reader = csv.DictReader(fh, delimiter=delimiter, quoting=quoting)
            for rec in reader:
                if None in rec:  # more fields than the header
                    raise LmforgeError(f"{path}:{reader.line_num}: {len(reader.fieldnames) + len(rec[None])} "
                                       f"fields, the header has {len(reader.fieldnames)}")
                yield reader.line_num, rec
    except UnicodeDecodeError as err:
        raise LmforgeError(f"{path}: not valid UTF-8 (byte {err.object[err.start]:#04x} at offset {err.start})") from None


def _split_labels(value, sep: str) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [p.strip() for p in str(value).split(sep) if p.strip()]


def read_rows(spec: SplitFile, data: TaskData, need_labels: bool = True) -> list[Row]:
    """The rows of a classification file; a missing column, an empty text or label, or no rows is an error."""
    path = Path(spec.path)
    _check_readable(path)
    fmt = format_of(spec)
    if fmt == "conll":
        raise LmforgeError(f"{path}: a CoNLL file holds token tags; classification reads CSV/TSV/JSONL/Parquet")
    rows = []
    columns = [data.text_column] + ([data.text_pair_column] if data.text_pair_column is not None else [])
    columns += [data.label_column] if need_labels else []
    names = label_name_map(data)
    for line, rec in _records(path, fmt, data.header):
        rec = _by_position(rec, columns)
        for col in columns:
            if col not in rec:
                shown = f"column {col}" if isinstance(col, int) else f"column '{col}'"
                what = (f"the row has {len(rec)} fields" if isinstance(col, int) else
                        f"columns: {', '.join(map(str, rec))}")
                raise LmforgeError(f"{path}:{line}: no {shown} ({what}); set data.{_field_of(col, data)}")
        text = rec[data.text_column]
        if text is None or not str(text).strip():
            raise LmforgeError(f"{path}:{line}: row without text (column '{data.text_column}' is empty)")
        pair = None
        if data.text_pair_column is not None:
            pair = rec[data.text_pair_column]
            if pair is None or not str(pair).strip():
                raise LmforgeError(f"{path}:{line}: row without its second text "
                                   f"(column '{data.text_pair_column}' is empty)")
            pair = str(pair).strip()
        labels = []
        if need_labels:
            raw = rec[data.label_column]
            labels = _split_labels(raw, data.label_separator) if data.multi_label else \
                ([str(raw).strip()] if raw is not None and str(raw).strip() else [])
            if not labels and not data.multi_label:
                raise LmforgeError(f"{path}:{line}: row without a label (column '{data.label_column}' is empty)")
            if names is not None:
                unnamed = [label for label in labels if label not in names]
                if unnamed:
                    raise LmforgeError(f"{path}:{line}: label {unnamed[0]!r} has no name in data.label_names "
                                       f"(codes: {', '.join(names)})")
                labels = [names[label] for label in labels]
        rows.append(Row(str(text).strip(), pair, labels, line))
    if not rows:
        raise LmforgeError(f"{path}: no examples in this file")
    return rows


def _by_position(rec: dict, columns: list) -> dict:
    """A record whose integer columns are looked up by position (a headerless file's keys already are)."""
    if not any(isinstance(c, int) for c in columns) or all(isinstance(k, int) for k in rec):
        return rec
    values = list(rec.values())
    return {**rec, **{c: values[c] for c in columns if isinstance(c, int) and -len(values) <= c < len(values)}}


def _field_of(column, data: TaskData) -> str:
    for name in ("text_column", "text_pair_column", "label_column"):
        if getattr(data, name) == column:
            return name
    return "text_column"


def read_sentences(spec: SplitFile, data: TaskData):
    """The sentences of an NER file (CoNLL columns or JSONL tokens + tags), tags converted to BIO."""
    path = Path(spec.path)
    _check_readable(path)
    fmt = format_of(spec)
    if fmt == "conll":
        return read_conll(path, tag_column=data.tag_column, token_column=data.token_column, scheme=data.scheme)
    if fmt == "jsonl":
        return read_token_jsonl(path, tokens_key=data.tokens_key, tags_key=data.tags_key, scheme=data.scheme)
    raise LmforgeError(f"{path}: NER reads CoNLL column files or JSONL (tokens + tags), not {fmt}")


def natural_sorted(values) -> list[str]:
    """Labels in a stable, human order: numbers by value, then text."""
    def key(v: str):
        return (0, float(v), "") if re.fullmatch(r"-?\d+(\.\d+)?", v) else (1, 0.0, v)
    return sorted(set(values), key=key)


class LabelSet:
    """Label names ↔ ids, with the recipe's policy for labels outside the set."""

    def __init__(self, names: list[str], unknown: Optional[str] = None):
        if not names:
            raise LmforgeError("data.labels: the label set is empty")
        self.names = list(names)
        self.index = {n: i for i, n in enumerate(self.names)}
        if unknown is not None and unknown not in self.index:
            raise LmforgeError(f"data.unknown_label: '{unknown}' is not in the label set {self.names}")
        self.unknown = unknown

    def __len__(self) -> int:
        return len(self.names)

    def id(self, label: str, where: str) -> int:
        i = self.index.get(label)
        if i is None:
            if self.unknown is None:
                raise LmforgeError(f"{where}: label '{label}' is not in the label set ({', '.join(self.names[:20])}"
                                   f"{', ...' if len(self.names) > 20 else ''}); add it to data.labels or set "
                                   "data.unknown_label to map such labels")
            i = self.index[self.unknown]
        return i

    @classmethod
    def infer(cls, labels: Union[list[list[str]], list[str]], given: Optional[list[str]], unknown: Optional[str]):
        if given:
            return cls([str(g) for g in given], unknown)
        flat = [lab for item in labels for lab in (item if isinstance(item, list) else [item])]
        return cls(natural_sorted(flat), unknown)
