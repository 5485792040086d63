"""Quality filters: Gopher-style rules for prose, The Stack-style rules for code.

Metrics are computed for a whole batch of documents at once: words become integer ids through a
per-process table (so per-word properties are computed once per distinct word), and the n-gram
repetition rules — the costly ones — are a few numpy sorts over the batch instead of a Counter per
document and per n. A document's removal reason is the first rule it breaks, in `PROSE_RULES` /
`CODE_RULES` order, so the same document always gets the same reason.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np
import xxhash

from lmforge.prep.config import CodeFilterConfig, FilterConfig

_ALPHA = re.compile(r"[^\W\d_]")
_NON_ALNUM = re.compile(r"[\W_]+")
BULLETS = ("•", "‣", "⁃", "◦", "●", "▪", "-", "*")
TERMINAL = (".", "!", "?", '"', "'", "”", "’", "»", ")")
_MIX = np.uint64(0x9E3779B97F4A7C15)
_MULT = np.uint64(0xBF58476D1CE4E5B9)


def has_alpha(word: str) -> bool:
    return _ALPHA.search(word) is not None


def alnum_count(text: str) -> int:
    return len(_NON_ALNUM.sub("", text))


class WordTable:
    """Word → id, with each distinct word's length, alphabetic flag and 64-bit hash (xxhash of the
    word, so every process gives a word the same hash)."""

    MAX_WORDS = 4_000_000  # beyond this the table starts over (between batches), bounding memory

    def __init__(self):
        self.index: dict[str, int] = {}
        self.length = np.zeros(0, np.int64)
        self.alpha = np.zeros(0, bool)
        self.code = np.zeros(0, np.uint64)

    def ids(self, words: list[str]) -> np.ndarray:
        if len(self.index) > self.MAX_WORDS:
            self.__init__()
        get = self.index.get
        ids = [get(w) for w in words]
        if None in ids:
            new: list[str] = []
            for i, v in enumerate(ids):
                if v is None:
                    w = words[i]
                    v = self.index.get(w)
                    if v is None:
                        v = self.index[w] = len(self.index)
                        new.append(w)
                    ids[i] = v
            self.length = np.concatenate([self.length, np.fromiter(map(len, new), np.int64, len(new))])
            self.alpha = np.concatenate([self.alpha, np.fromiter(map(has_alpha, new), bool, len(new))])
            hashes = (xxhash.xxh64_intdigest(w.encode("utf-8", "surrogatepass")) for w in new)
            self.code = np.concatenate([self.code, np.fromiter(hashes, np.uint64, len(new))])
        return np.fromiter(ids, np.int64, len(ids))


def _line_metrics(text: str) -> tuple[float, float, float, float, float]:
    lines = [line.strip() for line in text.split("\n")]
    lines = [line for line in lines if line]
    n = len(lines)
    bullets = sum(line.startswith(BULLETS) for line in lines)
    ellipsis = sum(line.endswith(("...", "…")) for line in lines)
    punct = sum(line.endswith(TERMINAL) for line in lines)
    seen: set = set()
    dup = dup_chars = chars = 0
    for line in lines:
        chars += len(line)
        if line in seen:
            dup += 1
            dup_chars += len(line)
        else:
            seen.add(line)
    return bullets / n, ellipsis / n, punct / n, dup / n, dup_chars / max(chars, 1)


def _repetition(code: np.ndarray, lengths: np.ndarray, doc: np.ndarray, ends: np.ndarray, chars: np.ndarray,
                ns: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per n and document: characters in its most frequent repeated word n-gram, and in repeated n-grams.

    'Most frequent' breaks ties by length; 'repeated' covers every occurrence after the first,
    counting each word once however many repeated n-grams overlap it. Both are fractions of the
    characters in the document's words. An (n+1)-gram can only repeat where its n-gram prefix does,
    so after the smallest n only those positions are sorted again: a handful in ordinary text.
    """
    D, W = len(chars), len(code)
    out = {n: (np.zeros(D), np.zeros(D)) for n in ns}
    lo, hi = min(ns), max(ns)
    pos = np.arange(W)
    pos = pos[pos + lo <= ends[doc[pos]]]  # n-grams inside one document
    g = code[pos]
    for k in range(1, lo):
        g = g * _MULT + code[pos + k]
    cum = np.concatenate([[0], np.cumsum(lengths)])
    safe = np.maximum(chars, 1)
    for n in range(lo, hi + 1):
        if n > lo:
            inside = pos + n <= ends[doc[pos]]
            pos, g = pos[inside], g[inside] * _MULT + code[pos[inside] + n - 1]
        if not len(pos):
            break
        d = doc[pos]
        key = g ^ (d.astype(np.uint64) * _MIX)
        order = np.argsort(key, kind="stable")  # stable: the first of a group is the first occurrence
        k = key[order]
        starts = np.concatenate([[True], k[1:] != k[:-1]])
        group = np.cumsum(starts) - 1
        occurrences = np.empty(len(pos), np.int64)
        occurrences[order] = np.bincount(group)[group]
        first = np.empty(len(pos), bool)
        first[order] = starts
        if n in out:
            score = np.where(occurrences > 1, (occurrences << 32) + cum[pos + n] - cum[pos], 0)
            best = np.zeros(D, np.int64)
            np.maximum.at(best, d, score)
            top = (best >> 32) * (best & 0xFFFFFFFF) / safe
            dup = np.zeros(D)
            repeated = pos[~first]
            if len(repeated):
                delta = np.bincount(repeated, minlength=W + 1) - np.bincount(repeated + n, minlength=W + 1)
                covered = np.cumsum(delta)[:W] > 0
                dup = np.bincount(doc, weights=lengths * covered, minlength=D) / safe
            out[n] = (top, dup)
        again = occurrences > 1
        pos, g = pos[again], g[again]
    return out


LINE_METRICS = ("bullet_lines", "ellipsis_lines", "punct_lines", "dup_lines", "dup_line_chars")


def prose_metrics(texts: list[str], table: WordTable, cfg: FilterConfig, skip_decided: bool = False,
                  only: Optional[set] = None) -> dict[str, np.ndarray]:
    """The prose metrics per document: every one, or with `only` the word count and those named there (the
    metrics of the enabled rules: the others, the per-word table lookups and per-line passes they need, are
    not computed). With `skip_decided`, the n-gram repetition metrics (the last rules, and the costly ones)
    are left at 0 for documents that already break a cheaper rule."""
    want = (lambda name: True) if only is None else only.__contains__
    words = [t.split() for t in texts]
    counts = np.fromiter(map(len, words), np.int64, len(words))
    safe = np.maximum(counts, 1)
    out = {"words": counts}
    ns = sorted(set(cfg.max_top_ngram_char_fraction) | set(cfg.max_dup_ngram_char_fraction))
    ns = [n for n in ns if want(f"top_{n}gram") or want(f"dup_{n}gram")]
    if ns or want("mean_word_length") or want("non_alpha"):
        ids = table.ids([w for ws in words for w in ws])
        doc = np.repeat(np.arange(len(texts)), counts)
        lengths = table.length[ids]
        chars = np.bincount(doc, weights=lengths, minlength=len(texts))
        if want("mean_word_length"):
            out["mean_word_length"] = chars / safe
        if want("non_alpha"):
            out["non_alpha"] = 1.0 - np.bincount(doc, weights=table.alpha[ids], minlength=len(texts)) / safe
    if want("symbol_ratio"):
        out["symbol_ratio"] = np.array([t.count("#") + t.count("...") + t.count("…") for t in texts]) / safe
    if any(want(name) for name in LINE_METRICS):
        lines = np.array([_line_metrics(t) for t in texts]).reshape(len(texts), 5)
        for j, name in enumerate(LINE_METRICS):
            out[name] = lines[:, j]
    if not ns:
        return out
    sub = np.ones(len(texts), bool)
    if skip_decided:
        cheap = [r for r in prose_rules(cfg) if "gram" not in r[1] and r[1] in out]
        sub = np.array([r is None for r in first_failure(out, cheap)], bool)
    keep = sub[doc]
    sub_counts = counts[sub]
    found = _repetition(table.code[ids[keep]], lengths[keep], np.repeat(np.arange(len(sub_counts)), sub_counts),
                        np.cumsum(sub_counts), chars[sub], ns)
    for n, (top, dup) in found.items():
        out[f"top_{n}gram"], out[f"dup_{n}gram"] = np.zeros(len(texts)), np.zeros(len(texts))
        out[f"top_{n}gram"][sub], out[f"dup_{n}gram"][sub] = top, dup
    return out


def prose_rules(cfg: FilterConfig) -> list[tuple[str, str, str, Optional[float]]]:
    """(reason, metric, 'min'|'max', threshold) in the order rules are checked; null thresholds are off."""
    rules = [
        ("too_few_words", "words", "min", cfg.min_words),
        ("too_many_words", "words", "max", cfg.max_words),
        ("short_mean_word", "mean_word_length", "min", cfg.min_mean_word_length),
        ("long_mean_word", "mean_word_length", "max", cfg.max_mean_word_length),
        ("symbol_ratio", "symbol_ratio", "max", cfg.max_symbol_word_ratio),
        ("bullet_lines", "bullet_lines", "max", cfg.max_bullet_line_fraction),
        ("ellipsis_lines", "ellipsis_lines", "max", cfg.max_ellipsis_line_fraction),
        ("no_terminal_punctuation", "punct_lines", "min", cfg.min_punct_line_fraction),
        ("non_alpha_words", "non_alpha", "max", cfg.max_non_alpha_word_fraction),
        ("repeated_lines", "dup_lines", "max", cfg.max_dup_line_fraction),
        ("repeated_line_chars", "dup_line_chars", "max", cfg.max_dup_line_char_fraction),
    ]
    rules += [(f"top_{n}gram", f"top_{n}gram", "max", v) for n, v in sorted(cfg.max_top_ngram_char_fraction.items())]
    rules += [(f"repeated_{n}grams", f"dup_{n}gram", "max", v)
              for n, v in sorted(cfg.max_dup_ngram_char_fraction.items())]
    return [r for r in rules if r[3] is not None]


def code_metrics(texts: list[str]) -> dict[str, np.ndarray]:
    chars = np.fromiter(map(len, texts), np.int64, len(texts))
    line_lengths = [list(map(len, t.split("\n"))) for t in texts]
    return {
        "chars": chars,
        "words": np.fromiter((len(t.split()) for t in texts), np.int64, len(texts)),
        "max_line": np.array([max(ls) for ls in line_lengths]),
        "mean_line": np.array([sum(ls) / len(ls) for ls in line_lengths]),
        "alnum": np.array([alnum_count(t) for t in texts]) / np.maximum(chars, 1),
    }


def code_rules(cfg: CodeFilterConfig) -> list[tuple[str, str, str, Optional[float]]]:
    rules = [
        ("code_too_short", "chars", "min", cfg.min_chars),
        ("code_long_line", "max_line", "max", cfg.max_line_length),
        ("code_mean_line_length", "mean_line", "max", cfg.max_mean_line_length),
        ("code_alnum_fraction", "alnum", "min", cfg.min_alnum_fraction),
    ]
    return [r for r in rules if r[3] is not None]


def first_failure(metrics: dict[str, np.ndarray], rules) -> list[Optional[str]]:
    n = len(metrics["words"])
    reason: list[Optional[str]] = [None] * n
    undecided = np.ones(n, bool)
    for name, metric, kind, threshold in rules:
        values = metrics[metric]
        bad = undecided & ((values < threshold) if kind == "min" else (values > threshold))
        for i in np.flatnonzero(bad):
            reason[i] = name
        undecided &= ~bad
    return reason


def quality_reasons(texts: list[str], is_code: bool, table: WordTable, prose: FilterConfig,
                    code: CodeFilterConfig) -> tuple[list[Optional[str]], np.ndarray]:
    """Per document: the first rule it breaks (None: kept), and its word count."""
    if not texts:
        return [], np.zeros(0, np.int64)
    if is_code:
        metrics = code_metrics(texts)
        return first_failure(metrics, code_rules(code)), metrics["words"]
    rules = prose_rules(prose)
    metrics = prose_metrics(texts, table, prose, skip_decided=True, only={r[1] for r in rules})
    return first_failure(metrics, rules), metrics["words"]
