"""Normalisation: Unicode normal form, control characters, whitespace, boilerplate lines."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Iterable

import xxhash

from lmforge.prep.config import NormalizeConfig

# C0/C1 controls except tab and newline, plus invisible format characters (zero-width, BOM, soft hyphen)
# that split words without showing, so "co\u200bde" and "code" would count as different words.
_CONTROL = re.compile("[\x00-\x08\x0b-\x0c\x0e-\x1f\x7f-\x9f\u00ad\u200b-\u200d\u2060\ufeff]")
_TRAILING = re.compile(r"[^\S\n]+(?=\n|\Z)")
# Runs after a visible character only: leading indentation (code) is kept. Trailing runs are gone by then.
_INNER = re.compile(r"(\S)(?:[^\S\n]{2,}|[^\S\n ])")
# Anything the two patterns above would change: most documents have none, and skip both.
_ODD_SPACE = re.compile(r"[^\S\n ]| {2}| \n")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize(text: str, cfg: NormalizeConfig) -> str:
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if cfg.unicode != "none" and not unicodedata.is_normalized(cfg.unicode, text):
        text = unicodedata.normalize(cfg.unicode, text)
    if cfg.control_chars:
        text = _CONTROL.sub("", text)
    if cfg.whitespace:
        if _ODD_SPACE.search(text):
            text = _INNER.sub(r"\1 ", _TRAILING.sub("", text))
        if "\n\n\n" in text:
            text = _BLANK_LINES.sub("\n\n", text)
        text = text.strip()
    return text


def line_key(line: str) -> int:
    return xxhash.xxh64_intdigest(line.strip().encode("utf-8", "surrogatepass"))


def count_lines(texts: Iterable[str], min_chars: int) -> Counter:
    """In how many documents each (long enough) line occurs: the input of boilerplate removal."""
    counts: Counter = Counter()
    for text in texts:
        counts.update({line_key(line) for line in text.split("\n") if len(line.strip()) >= min_chars})
    return counts


def strip_boilerplate(text: str, boilerplate: set, min_chars: int) -> tuple[str, int]:
    """The text without its boilerplate lines, and how many lines went."""
    lines = text.split("\n")
    kept = [line for line in lines if len(line.strip()) < min_chars or line_key(line) not in boilerplate]
    if len(kept) == len(lines):
        return text, 0
    return _BLANK_LINES.sub("\n\n", "\n".join(kept)).strip(), len(lines) - len(kept)
