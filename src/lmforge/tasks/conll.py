"""Read token-tagged NER data (CoNLL columns or token JSONL) into sentences with BIO tags.

Every reader returns BIO (IOB2) tags whatever the file's scheme, so the rest of the pipeline knows one
scheme only; entity spans follow seqeval's default (lenient) mode, the metric every NER paper reports.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

from lmforge.errors import LmforgeError

SCHEMES = ("iob1", "bio", "iobes")
PREFIXES = {"iob1": "BI", "bio": "BI", "iobes": "BIES"}

# Columns are separated by spaces or tabs only: str.split() would also split tokens at NBSP, \x1c or \u2028.
_SEPARATOR = re.compile(r"[ \t]+")

PathLike = Union[str, os.PathLike]


@dataclass
class Sentence:
    """One sentence: its tokens, their BIO tags and where it starts in its file."""

    tokens: list[str]
    tags: list[str]
    source: str  # file path as given
    line: int  # 1-based line of the first token (for JSONL: the record's line)


def validate_tag(tag: str, scheme: str) -> bool:
    """True if `tag` is 'O' or PREFIX-TYPE with a prefix the scheme allows (iob1/bio: B, I; iobes: B, I, E, S)."""
    prefixes = PREFIXES[_checked(scheme)]
    return tag == "O" or (len(tag) > 2 and tag[1] == "-" and tag[0] in prefixes)


def entity_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, start, end_exclusive) spans of BIO (or IOBES) tags, exactly as seqeval's `get_entities` finds them.

    Lenient like seqeval's default mode: an I- after O, or after a tag of another type, starts an entity.
    """
    spans = []
    start, prev_prefix, prev_type = None, "O", ""
    for i, tag in enumerate([*tags, "O"]):
        prefix, type_ = tag[0], tag[2:]
        if start is not None and (prefix in "BSO" or prev_prefix in "ES" or type_ != prev_type):
            spans.append((prev_type, start, i))
            start = None
        if start is None and prefix != "O":
            start = i
        prev_prefix, prev_type = prefix, type_
    return spans


def convert_tags(tags: list[str], source: str, target: str) -> list[str]:
    """Convert one sentence's tags between iob1, bio and iobes (any direction, identity included).

    IOB1 marks inside tokens with I-; B- only starts an entity that directly follows one of the same type.
    Malformed input (an I- tag starting an entity) is read as seqeval's default mode reads it, so the output
    is always well formed: bio → bio rewrites `O I-PER` as `O B-PER`.
    """
    _checked(source)
    _checked(target)
    for tag in tags:
        if not validate_tag(tag, source):
            raise LmforgeError(f"invalid {source} tag {tag!r}")
    # In IOB1 an I- after an entity of the same type continues it and a B- always starts one: exactly the
    # lenient BIO reading, so one span finder serves all three schemes.
    return _write(entity_spans(tags), len(tags), target)


def _to_bio(tags: list[str]) -> list[str]:
    """convert_tags(tags, any scheme, "bio") for tags already validated."""
    return _write(entity_spans(tags), len(tags), "bio")


def _write(spans: list[tuple[str, int, int]], n: int, scheme: str) -> list[str]:
    out = ["O"] * n
    prev_type, prev_end = None, -1
    for type_, start, end in spans:
        for i in range(start, end):
            out[i] = "I-" + type_
        if scheme == "bio" or (scheme == "iob1" and prev_end == start and prev_type == type_):
            out[start] = "B-" + type_
        elif scheme == "iobes":
            if end - start == 1:
                out[start] = "S-" + type_
            else:
                out[start], out[end - 1] = "B-" + type_, "E-" + type_
        prev_type, prev_end = type_, end
    return out


def label_list(sentences: Iterable[Sentence]) -> list[str]:
    """'O', then B- and I- of every entity type seen in the sentences' BIO tags, types sorted."""
    types = {tag[2:] for sentence in sentences for tag in sentence.tags if tag != "O"}
    return ["O"] + [f"{prefix}-{type_}" for type_ in sorted(types) for prefix in "BI"]


def read_conll(path: PathLike, *, tag_column: int = -1, token_column: int = 0,
               scheme: str = "bio") -> list[Sentence]:
    """Sentences of a CoNLL column file (space or tab separated), tags converted to BIO.

    `-DOCSTART-` lines are skipped; blank or whitespace-only lines end a sentence. Every token line must have
    as many columns as the first; column indices may be negative (counted from the end).
    """
    _checked(scheme)
    name, lines = str(path), _read_lines(path)
    sentences: list[Sentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    first = n_columns = 0
    valid: set[str] = set()  # tags already checked: a file has few distinct tags and many tokens

    def flush() -> None:
        nonlocal tokens, tags
        if tokens:
            sentences.append(Sentence(tokens, _to_bio(tags), name, first))
            tokens, tags = [], []

    for lineno, line in enumerate(lines, 1):
        fields = _SEPARATOR.split(line.strip(" \t\r"))
        if not line.strip() or fields[0] == "-DOCSTART-":
            flush()
            continue
        if not n_columns:
            n_columns = len(fields)
            token_column = _resolve(token_column, n_columns, "token_column", f"{name}:{lineno}")
            tag_column = _resolve(tag_column, n_columns, "tag_column", f"{name}:{lineno}")
            if token_column == tag_column:
                raise LmforgeError(f"{name}:{lineno}: token_column and tag_column are both column "
                                   f"{token_column + 1} of {n_columns}")
        elif len(fields) != n_columns:
            raise LmforgeError(f"{name}:{lineno}: expected {n_columns} columns, found {len(fields)}")
        tag = fields[tag_column]
        if tag not in valid:
            if not validate_tag(tag, scheme):
                raise LmforgeError(f"{name}:{lineno}: invalid {scheme} tag {tag!r}")
            valid.add(tag)
        if not tokens:
            first = lineno
        tokens.append(fields[token_column])
        tags.append(tag)
    flush()
    if not sentences:
        raise LmforgeError(f"{name}: no sentences found")
    return sentences


def read_token_jsonl(path: PathLike, *, tokens_key: str = "tokens", tags_key: str = "tags",
                     scheme: str = "bio") -> list[Sentence]:
    """Sentences of a JSONL file, one object per line holding a list of tokens and a list of string tags.

    Blank lines and records whose lists are both empty are skipped; tags are converted to BIO.
    """
    _checked(scheme)
    name, sentences = str(path), []
    for lineno, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise LmforgeError(f"{where}: expected a JSON object, found {type(record).__name__}")
        tokens, tags = (_string_list(record, key, where) for key in (tokens_key, tags_key))
        if len(tokens) != len(tags):
            raise LmforgeError(f"{where}: {len(tokens)} tokens but {len(tags)} tags")
        for tag in tags:
            if not validate_tag(tag, scheme):
                raise LmforgeError(f"{where}: invalid {scheme} tag {tag!r}")
        if tokens:
            sentences.append(Sentence(tokens, _to_bio(tags), name, lineno))
    if not sentences:
        raise LmforgeError(f"{name}: no sentences found")
    return sentences


def _checked(scheme: str) -> str:
    if scheme not in PREFIXES:
        raise LmforgeError(f"unknown tag scheme {scheme!r} (expected one of {', '.join(SCHEMES)})")
    return scheme


def _read_lines(path: PathLike) -> list[str]:
    """The file's lines, decoded as UTF-8 (a BOM is dropped); errors name the file and the line."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise LmforgeError(f"{path}: no such file") from None
    except OSError as e:
        raise LmforgeError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise LmforgeError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x})") from None
    # Split on \n only: str.splitlines() would also break lines at \x1c, \x85 or \u2028 inside a token.
    return text.removeprefix("\ufeff").split("\n")


def _resolve(column: int, n_columns: int, what: str, where: str) -> int:
    if not -n_columns <= column < n_columns:
        raise LmforgeError(f"{where}: {what} {column} is out of range for a line of {n_columns} columns")
    return column % n_columns


def _string_list(record: dict, key: str, where: str) -> list[str]:
    if key not in record:
        raise LmforgeError(f"{where}: missing key {key!r}")
    value = record[key]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise LmforgeError(f"{where}: {key!r} must be a list of strings")
    return value
