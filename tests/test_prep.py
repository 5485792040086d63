"""Data preparation: normalisation, each quality filter, exact and near dedup, the split's leakage
guarantee, mixing weights, output folder and report, bad input, resume, CLI and the pretraining hand-off."""

from __future__ import annotations

import json
import os
import random
import string
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import lmforge.prep.pipeline as pipeline_mod
from conftest import tiny_recipe
from lmforge.cli import app
from lmforge.data.sources import load_documents
from lmforge.errors import LmforgeError
from lmforge.prep import load_prep_recipe, prep, prep_recipe_from_dict
from lmforge.prep.config import CodeFilterConfig, FilterConfig, NormalizeConfig
from lmforge.prep.dedup import MinHasher, dedup_tokens, lsh_params, near_pairs, shingle_sets, word_hashes
from lmforge.prep.filters import WordTable, first_failure, prose_metrics, prose_rules, quality_reasons
from lmforge.prep.mix import choose_survivors, domain_weights, repeat_counts
from lmforge.prep.normalize import normalize
from lmforge.prep.worker import UNIT_SCHEMA, arrow_table, column_numpy
from lmforge.pretrain import pretrain
from lmforge.recipe import DataConfig, recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
_rng = random.Random(0)
VOCAB = sorted({"".join(_rng.choice(string.ascii_lowercase) for _ in range(_rng.randint(3, 8))) for _ in range(3000)})


def prose(rng: random.Random, n_words: int = 80) -> str:
    """A document every default Gopher rule accepts: varied words, sentences ending in periods."""
    words = [rng.choice(VOCAB) for _ in range(n_words)]
    sentences = [" ".join(words[i:i + 10]).capitalize() + "." for i in range(0, n_words, 10)]
    return "\n".join(" ".join(sentences[i:i + 3]) for i in range(0, len(sentences), 3))


def edit(text: str, rate: float, rng: random.Random) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), max(1, round(rate * len(words)))):
        words[i] = rng.choice(VOCAB)
    return " ".join(words)


def jaccard(a: str, b: str, n: int = 2) -> float:
    def grams(t):
        w = dedup_tokens(t)
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb)


def write_jsonl(path: Path, docs: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return str(path)


def recipe(tmp_path: Path, sources: list, **sections):
    tree = {"sources": sources, "output": {"dir": str(tmp_path / "out"), "plots": False}}
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    return prep_recipe_from_dict(tree)


def run(tmp_path, sources, **sections) -> tuple[Path, dict]:
    out = prep(recipe(tmp_path, sources, **sections), show_progress=False)
    return out, json.loads((out / "stats.json").read_text())


def rows(out: Path, split: str) -> list[dict]:
    files = sorted((out / split).glob("*.parquet"))
    return [r for f in files for r in pq.read_table(f).to_pylist()]


# ---------------------------------------------------------------- normalisation


def test_normalize_unicode_controls_whitespace():
    cfg = NormalizeConfig()
    raw = "ﬁne\u00a0café\u200b  with\t\ttabs   \r\n\r\n\r\n\r\n    indented\x07 line   \n"
    assert normalize(raw, cfg) == "fine café with tabs\n\n    indented line"
    nfc = normalize("ﬁ e\u0301", NormalizeConfig(unicode="NFC"))
    assert nfc == "ﬁ é"  # NFC composes but keeps compatibility ligatures
    assert normalize("ﬁ", NormalizeConfig(unicode="none")) == "ﬁ"
    kept = NormalizeConfig(control_chars=False, whitespace=False)
    assert normalize("a\x07  b ", kept) == "a\x07  b "


def test_boilerplate_lines_are_removed(tmp_path):
    rng = random.Random(1)
    footer = "Copyright 2024 Example Corporation, all rights reserved."
    docs = [prose(rng) + "\n" + footer for _ in range(30)]
    out, stats = run(tmp_path, [{"path": write_jsonl(tmp_path / "a.jsonl", docs)}],
                     normalize={"boilerplate_min_docs": 10}, split={"validation_fraction": 0.0})
    texts = [r["text"] for r in rows(out, "train")]
    assert len(texts) == 30 and not any(footer in t for t in texts)
    assert stats["input_events"]["boilerplate_lines"] == 30


# ---------------------------------------------------------------- quality filters

OFF = dict(min_words=None, max_words=None, min_mean_word_length=None, max_mean_word_length=None,
           max_symbol_word_ratio=None, min_punct_line_fraction=None, max_ellipsis_line_fraction=None,
           max_bullet_line_fraction=None, max_non_alpha_word_fraction=None, max_dup_line_fraction=None,
           max_dup_line_char_fraction=None, max_top_ngram_char_fraction={}, max_dup_ngram_char_fraction={})


def _lines(rng, n, end="."):
    return "\n".join(" ".join(rng.choice(VOCAB) for _ in range(8)) + end for _ in range(n))


RULE_CASES = {  # reason: (only this rule on, a document that breaks it)
    "too_few_words": ({"min_words": 30}, "Only a few words here."),
    "too_many_words": ({"max_words": 60}, " ".join(VOCAB[:70]) + "."),
    "short_mean_word": ({"min_mean_word_length": 3.0}, "a b c d e f g h it is so."),
    "long_mean_word": ({"max_mean_word_length": 10.0}, "incomprehensibilities " * 5),
    "symbol_ratio": ({"max_symbol_word_ratio": 0.1}, "# one # two # three # four ... five six."),
    "bullet_lines": ({"max_bullet_line_fraction": 0.5}, "- first item\n- second item\n- third item\nfine."),
    "ellipsis_lines": ({"max_ellipsis_line_fraction": 0.3}, "and then...\nand so on…\nit ended."),
    "no_terminal_punctuation": ({"min_punct_line_fraction": 0.5}, "no stop here\nnor here\nbut here."),
    "non_alpha_words": ({"max_non_alpha_word_fraction": 0.2}, "1 2 3 4 5 6 7 eight nine ten."),
    "repeated_lines": ({"max_dup_line_fraction": 0.3}, "same line.\nsame line.\nsame line.\nother one."),
    "repeated_line_chars": ({"max_dup_line_char_fraction": 0.2},
                            "a long repeated line of text.\na long repeated line of text.\n" + "x. " * 20),
    "top_2gram": ({"max_top_ngram_char_fraction": {2: 0.2}}, "the cat " * 10 + "sat down today."),
    "repeated_5grams": ({"max_dup_ngram_char_fraction": {5: 0.15}},
                        "one two three four five " * 3 + "and some other words that differ here."),
}


@pytest.mark.parametrize("reason", sorted(RULE_CASES))
def test_each_prose_rule(reason):
    only, bad = RULE_CASES[reason]
    cfg = FilterConfig(**{**OFF, **only})
    good = prose(random.Random(2), 40)
    got, _ = quality_reasons([bad, good], False, WordTable(), cfg, CodeFilterConfig())
    assert got == [reason, None]


def test_default_rules_keep_clean_prose_and_report_first_failure():
    rng = random.Random(3)
    docs = [prose(rng) for _ in range(20)] + ["Too short.", "1 2 3 4 " * 20]
    got, words = quality_reasons(docs, False, WordTable(), FilterConfig(), CodeFilterConfig())
    assert got == [None] * 20 + ["too_few_words", "short_mean_word"]
    assert words.tolist() == [len(d.split()) for d in docs]


def _plain_ngram_fractions(text: str, n: int) -> tuple[float, float]:
    words = text.split()
    chars = sum(map(len, words))
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    top = 0.0
    if counts and max(counts.values()) > 1:
        c = max(counts.values())
        top = c * max(sum(map(len, g)) for g in counts if counts[g] == c) / chars
    seen, covered = set(), [False] * len(words)
    for i, g in enumerate(grams):
        if g in seen:
            covered[i:i + n] = [True] * n
        seen.add(g)
    return top, sum(len(w) for w, c in zip(words, covered) if c) / chars


def test_batched_ngram_metrics_match_a_plain_implementation():
    rng = random.Random(4)
    small = VOCAB[:12]  # a small vocabulary makes repeated n-grams common
    docs = [" ".join(rng.choice(small) for _ in range(rng.randint(1, 60))) for _ in range(40)]
    cfg = FilterConfig()
    m = prose_metrics(docs, WordTable(), cfg)
    for n in (2, 3, 4, 5, 8):
        expected = np.array([_plain_ngram_fractions(d, n) for d in docs])
        assert np.allclose(m[f"top_{n}gram"], expected[:, 0]) and np.allclose(m[f"dup_{n}gram"], expected[:, 1])


def test_filters_compute_only_the_metrics_of_enabled_rules_with_the_same_results():
    rng = random.Random(14)
    docs = [prose(rng, rng.randint(5, 90)) for _ in range(30)] + [bad for _, bad in RULE_CASES.values()]
    configs = [FilterConfig(), FilterConfig(**OFF)]
    configs += [FilterConfig(**{**OFF, **only}) for only, _ in RULE_CASES.values()]
    for cfg in configs:
        rules = prose_rules(cfg)
        full = prose_metrics(docs, WordTable(), cfg)  # every metric
        table = WordTable()
        got, words = quality_reasons(docs, False, table, cfg, CodeFilterConfig())
        assert got == first_failure(full, rules)
        assert words.tolist() == [len(d.split()) for d in docs]
        lean = prose_metrics(docs, WordTable(), cfg, only={r[1] for r in rules})
        assert {"words"} | {r[1] for r in rules} <= set(lean)
        if all(r[1] == "words" for r in rules):
            assert set(lean) == {"words"}
        for name in lean:
            assert np.allclose(lean[name], full[name]), name
        needs_words = any(r[1] in ("mean_word_length", "non_alpha") or "gram" in r[1] for r in rules)
        assert bool(table.index) == needs_words  # no per-word table lookups unless a rule needs them
    assert sorted(prose_metrics(docs, WordTable(), FilterConfig(**OFF), only=set())) == ["words"]


def test_code_rules_replace_prose_rules_in_code_domains():
    code = CodeFilterConfig(min_chars=20, max_line_length=100, max_mean_line_length=60, min_alnum_fraction=0.25)
    docs = ["def f(x):\n    return x + 1\n",                # kept although it has 6 words
            "x",                                             # too short
            "y = 1  # " + "z" * 120,                         # one long line
            "a = 1;\n" + "b" * 90 + "\n" + "c" * 90,         # long mean line length
            "{ } ( ) [ ] ; ; ; ; ; ; ; ; ; ; ; ; ; ; ; ; x"]  # mostly symbols
    got, _ = quality_reasons(docs, True, WordTable(), FilterConfig(), code)
    assert got == [None, "code_too_short", "code_long_line", "code_mean_line_length", "code_alnum_fraction"]


def test_every_removed_document_has_a_reason(tmp_path):
    rng = random.Random(5)
    prose_docs = [prose(rng) for _ in range(20)] + ["tiny doc."] * 3 + ["", "   "]
    code_docs = ["public int get() { return value; }", "x"]
    sources = [{"path": write_jsonl(tmp_path / "p.jsonl", prose_docs), "domain": "web"},
               {"path": write_jsonl(tmp_path / "c.jsonl", code_docs), "domain": "code"}]
    out, stats = run(tmp_path, sources, split={"validation_fraction": 0.0})
    assert stats["removed"]["web"] == {"empty": 2, "too_few_words": 3}
    assert stats["removed"]["code"] == {"code_too_short": 1}
    for d, s in stats["domains"].items():
        removed = sum(stats["removed"].get(d, {}).values())
        assert s["before"]["docs"] == removed + s["train"]["docs"] + s["validation"]["docs"]


# ---------------------------------------------------------------- deduplication


def test_exact_duplicates_ignore_case_punctuation_and_spacing(tmp_path):
    rng = random.Random(6)
    base = prose(rng)
    variants = [base, base.upper(), base.replace(".", " ;"), "  " + base.replace(" ", "   ")]
    docs = variants + [prose(rng) for _ in range(5)]
    out, stats = run(tmp_path, [{"path": write_jsonl(tmp_path / "a.jsonl", docs)}],
                     dedup={"near": False}, split={"validation_fraction": 0.0})
    assert stats["removed"]["default"] == {"exact_duplicate": 3}
    assert [r["text"] for r in rows(out, "train")][0] == normalize(base, NormalizeConfig())


def test_minhash_estimates_jaccard():
    rng = random.Random(7)
    hasher = MinHasher(num_perm=256, ngram=2)
    for rate in (0.02, 0.1, 0.3):
        a = prose(rng, 150)
        b = edit(a, rate, rng)
        sig, valid = hasher.signatures([dedup_tokens(a), dedup_tokens(b)])
        assert valid.all()
        assert abs((sig[0] == sig[1]).mean() - jaccard(a, b)) < 0.08
    b, r = lsh_params(0.5, 128)
    assert b * r <= 128 and 1 - (1 - 0.5 ** r) ** b > 0.4  # the S-curve is centred near the threshold


def _plain_word_hash(word: str) -> int:
    """The definition `word_hashes` computes with numpy: Σ byte_k · P^k mod 2^64 over the word's UTF-8 bytes and
    a trailing space, then splitmix64's finaliser."""
    m, h = 2**64, 0
    for k, byte in enumerate(word.encode("utf-8") + b" "):
        h = (h + byte * pow(0x100000001B3, k, m)) % m
    h ^= h >> 30
    h = h * 0xBF58476D1CE4E5B9 % m
    h ^= h >> 27
    h = h * 0x94D049BB133111EB % m
    return h ^ (h >> 31)


def test_word_hashes_depend_on_the_word_alone():
    words = VOCAB[:500] + ["a", "é", "naïve", "日本語", "x" * 300, "a"]
    h = word_hashes(words)
    assert h.dtype == np.uint64 and h.tolist() == [_plain_word_hash(w) for w in words]
    assert len(set(h[:-1].tolist())) == len(words) - 1 and h[-1] == h[500]  # "a" twice
    shuffled = random.Random(15).sample(words, len(words))
    assert word_hashes(shuffled).tolist() == [_plain_word_hash(w) for w in shuffled]
    assert len(word_hashes([])) == 0
    assert word_hashes(VOCAB * 10).tolist() == [_plain_word_hash(w) for w in VOCAB] * 10  # several passes
    with pytest.raises(ValueError, match="contains a space"):
        word_hashes(["two words"])


def test_shingle_sets_and_signatures_match_a_plain_computation():
    rng = np.random.default_rng(16)
    # Empty documents, one-word ones, and two longer than a signature chunk (4096 shingles).
    sizes = [0, 1, 3, 5000, 0, 40, 9000, 2]
    tokens = [[str(x) for x in rng.integers(0, 200 if n > 100 else 5, n)] for n in sizes]
    hasher = MinHasher(num_perm=64, ngram=2)
    g, d = hasher.shingles(tokens)
    sets, counts = shingle_sets(g, d, len(tokens))
    sig, valid = hasher.signatures(tokens)
    assert valid.tolist() == [n > 0 for n in sizes]
    at = 0
    for i, n in enumerate(sizes):
        mine = np.unique(g[d == i])
        assert counts[i] == len(mine) and (sets[at:at + counts[i]] == mine).all()
        at += counts[i]
        expected = (((mine[:, None] * hasher.a[None, :] + hasher.b[None, :]) >> np.uint64(32)).astype(np.uint32).min(0)
                    if n else np.full(64, 2**32 - 1))
        assert (sig[i] == expected).all()
    assert counts[1] == 1 and counts[2] == 2  # shorter than n: one shingle; else one per n-gram position


def test_near_duplicates_within_and_across_sources(tmp_path):
    rng = random.Random(8)
    originals = [prose(rng, 120) for _ in range(20)]
    copies_a = [edit(d, 0.05, rng) for d in originals[:5]]      # same source
    copies_b = [edit(d, 0.08, rng) for d in originals[5:10]]    # another source
    sources = [{"path": write_jsonl(tmp_path / "a.jsonl", originals + copies_a), "domain": "x"},
               {"path": write_jsonl(tmp_path / "b.jsonl", copies_b), "domain": "y"}]
    out, stats = run(tmp_path, sources, split={"validation_fraction": 0.0})
    assert stats["removed"]["x"] == {"near_duplicate": 5}
    assert stats["removed"]["y"] == {"near_duplicate": 5}
    assert stats["duplicates"]["clusters"] == 10
    kept = {r["text"] for r in rows(out, "train")}
    assert {normalize(d, NormalizeConfig()) for d in originals} == kept
    # Off: every copy stays.
    _, off = run(tmp_path, sources, dedup={"near": False}, split={"validation_fraction": 0.0},
                 output={"dir": str(tmp_path / "off"), "plots": False})
    assert off["domains"]["x"]["train"]["docs"] == 25


def test_survivors_exact_groups_near_pairs_and_no_chaining():
    rng = random.Random(9)
    docs = [prose(rng) for _ in range(6)]
    docs += [docs[0], edit(docs[1], 0.05, rng)]
    tokens = [dedup_tokens(d) for d in docs]
    sig, valid = MinHasher(128, 2).signatures(tokens)
    keys = np.array([hash(" ".join(t)) & (2**63 - 1) for t in tokens], np.uint64)
    pairs, _ = near_pairs(sig, valid, 0.5)
    assert sorted(map(tuple, pairs.tolist())) == [(0, 6), (1, 7)]
    none = np.zeros(8, bool)
    kept, dup_of, why, _, _ = choose_survivors(keys, pairs, none)
    assert kept.tolist() == [True] * 6 + [False, False] and dup_of[6:].tolist() == [0, 1]
    assert why[6:] == ["exact_duplicate", "near_duplicate"]
    # A chain A~B, B~C with A and C unrelated: B goes, C stays (a connected cluster would drop both).
    chain = np.array([[0, 1], [1, 2]])
    kept, dup_of, _, _, cluster = choose_survivors(np.arange(3, dtype=np.uint64), chain, np.zeros(3, bool))
    assert kept.tolist() == [True, False, True] and cluster.tolist() == [0, 0, 0]  # one cluster (union-find)
    # A document of a fixed validation source wins over its earlier training copy.
    kept, dup_of, why, _, _ = choose_survivors(np.arange(2, dtype=np.uint64), np.array([[0, 1]]),
                                               np.array([False, True]))
    assert kept.tolist() == [False, True] and why[0] == "copy_of_validation"
    # Exact groups are resolved whole (one survivor of three equal keys); a near pair with it still counts.
    keys = np.array([5, 5, 5, 9], np.uint64)
    kept, dup_of, _, _, _ = choose_survivors(keys, np.array([[0, 3]]), np.zeros(4, bool))
    assert kept.tolist() == [True, False, False, False] and dup_of.tolist() == [-1, 0, 0, 0]


# ---------------------------------------------------------------- split and mixing


def test_validation_never_holds_a_near_copy_of_training(tmp_path):
    rng = random.Random(10)
    originals = [prose(rng, 100) for _ in range(60)]
    copies = [edit(d, rng.choice([0.01, 0.05, 0.1]), rng) for d in originals for _ in range(2)]
    out, stats = run(tmp_path, [{"path": write_jsonl(tmp_path / "a.jsonl", originals + copies)}],
                     split={"validation_fraction": 0.3, "seed": 3})
    train = [r["text"] for r in rows(out, "train")]
    val = [r["text"] for r in rows(out, "validation")]
    assert len(train) + len(val) == 60 and len(val) > 5
    assert max(jaccard(v, t) for v in val for t in train) < 0.3


def test_fixed_validation_source_removes_its_copies_from_training(tmp_path):
    rng = random.Random(11)
    train_docs = [prose(rng) for _ in range(20)]
    held_out = [edit(d, 0.05, rng) for d in train_docs[:4]] + [prose(rng) for _ in range(2)]
    sources = [{"path": write_jsonl(tmp_path / "t.jsonl", train_docs)},
               {"path": write_jsonl(tmp_path / "v.jsonl", held_out), "split": "validation"}]
    out, stats = run(tmp_path, sources, split={"validation_fraction": 0.0})
    assert stats["removed"]["default"] == {"copy_of_validation": 4}
    assert sorted(r["text"] for r in rows(out, "validation")) == sorted(
        normalize(d, NormalizeConfig()) for d in held_out)
    assert len(rows(out, "train")) == 16


def test_validation_count_per_domain_is_exact_and_seeded(tmp_path):
    rng = random.Random(12)
    sources = [{"path": write_jsonl(tmp_path / f"{d}.jsonl", [prose(rng) for _ in range(n)]), "domain": d}
               for d, n in (("a", 30), ("b", 12))]
    out, _ = run(tmp_path, sources, split={"validation_count": 5, "seed": 1})
    first = sorted(r["text"] for r in rows(out, "validation"))
    assert Counter(r["domain"] for r in rows(out, "validation")) == {"a": 5, "b": 5}
    out = prep(recipe(tmp_path, sources, split={"validation_count": 5, "seed": 1}), force=True, show_progress=False)
    assert sorted(r["text"] for r in rows(out, "validation")) == first
    out = prep(recipe(tmp_path, sources, split={"validation_count": 5, "seed": 2}), force=True, show_progress=False)
    assert sorted(r["text"] for r in rows(out, "validation")) != first


def test_mixing_weights_with_temperature_and_resampling(tmp_path):
    assert domain_weights({"a": 900, "b": 100}, 1.0, None) == pytest.approx({"a": 0.9, "b": 0.1})
    assert domain_weights({"a": 900, "b": 100}, 2.0, None) == pytest.approx({"a": 0.75, "b": 0.25})
    assert domain_weights({"a": 1, "b": 1}, 1.0, {"a": 3, "b": 1}) == pytest.approx({"a": 0.75, "b": 0.25})
    with pytest.raises(LmforgeError, match="no weight for domain"):
        domain_weights({"a": 1, "b": 1}, 1.0, {"a": 1})
    u = np.random.default_rng(0).random(100_000)
    assert repeat_counts(np.full(100_000, 2.3), u).mean() == pytest.approx(2.3, abs=0.01)

    rng = random.Random(13)
    sources = [{"path": write_jsonl(tmp_path / f"{d}.jsonl", [prose(rng) for _ in range(n)]), "domain": d}
               for d, n in (("big", 90), ("small", 10))]
    out, stats = run(tmp_path, sources, split={"validation_fraction": 0.0}, mix={"by": "documents", "temperature": 2.0})
    assert stats["mix"]["big"]["weight"] == pytest.approx(0.75) and stats["mix"]["small"]["ratio"] == pytest.approx(2.5)
    counts = Counter(r["domain"] for r in rows(out, "train"))
    assert counts["big"] == stats["domains"]["big"]["train_mixed"]["docs"] and 60 <= counts["big"] <= 80
    assert 20 <= counts["small"] <= 30


# ---------------------------------------------------------------- output, bad input, resume


def test_output_folder_report_and_figures(tmp_path):
    rng = random.Random(14)
    docs = [prose(rng) for _ in range(40)]
    docs += [docs[0], edit(docs[1], 0.05, rng), "short."]
    tree = {"sources": [{"path": write_jsonl(tmp_path / "a.jsonl", docs), "domain": "web"}],
            "output": {"dir": str(tmp_path / "out")}, "split": {"validation_fraction": 0.2}}
    out = prep(prep_recipe_from_dict(tree), show_progress=False).run_dir
    assert {p.name for p in out.iterdir()} >= {"lmforge-prep.json", "train", "validation", "report.md", "stats.json",
                                              "sizes.png", "removals.png", "lengths.png", "duplicates.png"}
    report = (out / "report.md").read_text()
    for section in ("## Documents, words and tokens per domain", "## Removed documents", "## Duplicates",
                    "## Mixing weights", "| too_few_words | 1 |", "| exact_duplicate | 1 |", "MB/s"):
        assert section in report
    assert "similarity" in report  # duplicate cluster examples
    import datasets
    ds = datasets.load_dataset("parquet", data_dir=str(out))
    assert set(ds) == {"train", "validation"} and ds["train"].column_names == ["text", "domain", "id", "source"]
    assert len(ds["train"]) + len(ds["validation"]) == 40
    assert not list(tmp_path.glob(".out.prep-work*"))  # the work folder is gone


def test_bad_input_is_counted_not_fatal(tmp_path):
    rng = random.Random(15)
    good = [prose(rng) for _ in range(10)]
    folder = tmp_path / "raw"
    (folder / "empty").mkdir(parents=True)
    write_jsonl(folder / "good.jsonl", good)
    (folder / "blob.txt").write_bytes(b"\x00\x01\x02binary\xff" * 100)
    (folder / "nothing.txt").write_bytes(b"")
    latin = prose(rng).replace("e", "\xe9").encode("cp1252")
    (folder / "mixed.txt").write_bytes(prose(rng).encode() + b"\n\n" + latin + b"\n")
    (folder / "long.txt").write_text(" ".join(rng.choice(VOCAB) for _ in range(60_000)) + ".\n")
    (folder / "broken.jsonl").write_text('{"text": "fine words here"}\n{"text": unquoted\n{"other": 1}\n')
    sources = [{"path": str(folder), "sample_by": "paragraph"}, {"path": str(folder / "empty")}]
    out, stats = run(tmp_path, sources, normalize={"max_doc_chars": 100_000}, split={"validation_fraction": 0.0})
    ev = stats["input_events"]
    assert ev["binary_file"] == 1 and ev["empty_file"] == 1 and ev["empty_source"] == 1
    assert ev["decoded_as_cp1252"] == latin.count(b"\n") + 1 and ev["split_long_line"] >= 3
    assert ev["bad_json_line"] == 1 and ev["missing_text_field"] == 1
    texts = [r["text"] for r in rows(out, "train")]
    assert any("\xe9" in t for t in texts)
    assert max(len(t) for t in texts) <= 100_000


def test_failed_run_leaves_no_output_and_force_is_needed(tmp_path):
    src = [{"path": write_jsonl(tmp_path / "a.jsonl", ["too short."] * 5)}]
    with pytest.raises(LmforgeError, match="no training documents survive"):
        prep(recipe(tmp_path, src), show_progress=False)
    assert not (tmp_path / "out").exists()
    rng = random.Random(16)
    good = [{"path": write_jsonl(tmp_path / "b.jsonl", [prose(rng) for _ in range(5)])}]
    prep(recipe(tmp_path, good), show_progress=False)
    with pytest.raises(LmforgeError, match="already exists"):
        prep(recipe(tmp_path, good), show_progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    r = recipe(tmp_path, good)
    r.output.dir = str(tmp_path / "other")
    with pytest.raises(LmforgeError, match="not a prep output folder"):
        prep(r, force=True, show_progress=False)


def test_resume_after_interruption_gives_the_same_output(tmp_path, monkeypatch):
    rng = random.Random(17)
    sources = [{"path": write_jsonl(tmp_path / f"s{i}.jsonl", [prose(rng) for _ in range(15)]), "domain": f"d{i % 2}"}
               for i in range(4)]
    r = recipe(tmp_path, sources, shard_mb=0.001)
    real, calls = pipeline_mod.process_unit, []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(pipeline_mod, "process_unit", flaky)
    with pytest.raises(KeyboardInterrupt):
        prep(r, show_progress=False)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(pipeline_mod, "process_unit", real)
    out = prep(r, show_progress=False)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["resumed_units"] == 2
    fresh = recipe(tmp_path, sources, shard_mb=0.001, output={"dir": str(tmp_path / "fresh"), "plots": False})
    other = prep(fresh, show_progress=False)
    for split in ("train", "validation"):
        assert rows(out, split) == rows(other, split)


def test_two_processes_give_the_same_output(tmp_path):
    rng = random.Random(18)
    docs = [prose(rng) for _ in range(60)]
    docs += [edit(d, 0.05, rng) for d in docs[:10]]
    sources = [{"path": write_jsonl(tmp_path / f"s{i}.jsonl", docs[i::3])} for i in range(3)]
    one = prep(recipe(tmp_path, sources, shard_mb=0.001), show_progress=False)
    two = prep(recipe(tmp_path, sources, shard_mb=0.001, num_proc=2, output={"dir": str(tmp_path / "two")}),
               show_progress=False)
    for split in ("train", "validation"):
        assert rows(one, split) == rows(two, split)


# ---------------------------------------------------------------- recipe, CLI, pretraining


def test_recipe_errors_and_the_example_recipe(tmp_path):
    with pytest.raises(LmforgeError, match="unknown key 'dedup.treshold'; did you mean 'threshold'"):
        prep_recipe_from_dict({"sources": [{"path": "x"}], "dedup": {"treshold": 0.5}})
    with pytest.raises(LmforgeError, match="must divide"):
        prep_recipe_from_dict({"sources": [{"path": "x"}], "dedup": {"bands": 7}})
    with pytest.raises(LmforgeError, match="names no sources"):
        prep_recipe_from_dict({})
    example = load_prep_recipe(ROOT / "recipes" / "prep" / "shared-corpora.yaml", ["num_proc=1"])
    # Paths are read relative to the recipe's folder, normalised.
    expected = os.path.normpath(ROOT / "recipes" / "prep" / "../../../shared/data/domains/code/*.java")
    assert example.num_proc == 1 and example.sources[0].path == expected


def test_cli_prep_and_pretraining_reads_the_output(tmp_path):
    rng = random.Random(19)
    src = write_jsonl(tmp_path / "a.jsonl", [prose(rng) for _ in range(30)])
    src2 = write_jsonl(tmp_path / "b.jsonl", [prose(rng) for _ in range(10)])
    (tmp_path / "r.yaml").write_text(json.dumps({
        "sources": [{"path": "a.jsonl", "domain": "news"}, {"path": "b.jsonl", "domain": "blogs"}],
        "output": {"dir": str(tmp_path / "ready"), "plots": False}, "split": {"validation_count": 3}}))
    runner = CliRunner()
    result = runner.invoke(app, ["prep", str(tmp_path / "r.yaml"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "prepared data" in result.output
    bad = runner.invoke(app, ["prep", str(tmp_path / "r.yaml"), "--set", "dedup.ngramm=3"])
    assert bad.exit_code == 2 and "did you mean 'ngram'" in bad.output
    docs = load_documents(DataConfig(sources=[{"path": str(tmp_path / "ready")}], validation_fraction=0.5,
                                     cache_dir=str(tmp_path / "cache")))
    got = Counter((r["domain"], r["split"]) for r in docs)
    assert got[("news", "validation")] == 3 and got[("blogs", "validation")] == 3
    assert got[("news", "train")] + got[("blogs", "train")] == 34
    del src, src2
    # A run recipe names the folder as its source and trains on it, evaluating per prepared domain.
    tree = tiny_recipe({"ignored": tmp_path / "ready"}, tmp_path / "run", max_steps=2, eval_every=0)
    tree["tokenizer"]["vocab_size"] = 400
    run_dir = pretrain(recipe_from_dict(tree), show_progress=False)
    final = json.loads((run_dir / "results.json").read_text())
    assert {"loss/news", "loss/blogs"} <= set(final["validation"])


# ---------------------------------------------------------------- verified near-dedup, ids, removed.jsonl


def removed(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]


def _copies_with_jaccard(rng, originals, lo, hi, n):
    """Edited copies of `originals` whose true word 5-gram Jaccard with their original lies in [lo, hi)."""
    found = []
    for doc in originals:
        while len(found) < n:
            copy = edit(doc, rng.uniform(0.01, 0.06), rng)
            if lo <= jaccard(doc, copy, 5) < hi:
                found.append((doc, copy))
                break
    return found


def test_verified_pairs_only_just_below_survives_just_above_goes(tmp_path):
    rng = random.Random(20)
    originals = [prose(rng, 200) for _ in range(60)]
    below = _copies_with_jaccard(rng, originals[:30], 0.76, 0.80, 8)
    above = _copies_with_jaccard(rng, originals[30:], 0.80, 0.84, 8)
    docs = originals + [c for _, c in below + above]
    out, stats = run(tmp_path, [{"path": write_jsonl(tmp_path / "a.jsonl", docs)}],
                     dedup={"ngram": 5, "threshold": 0.8}, split={"validation_fraction": 0.0})
    kept = {r["text"] for r in rows(out, "train")}
    norm = lambda t: normalize(t, NormalizeConfig())  # noqa: E731
    assert all(norm(c) in kept for _, c in below)  # just below the threshold: both stay
    assert not any(norm(c) in kept for _, c in above)  # just above: the copy goes
    gone = removed(out)
    assert len(gone) == 8 and {g["reason"] for g in gone} == {"near_duplicate"} and stats["removed_documents"] == 8
    truth = sorted(round(jaccard(o, c, 5), 4) for o, c in above)
    assert sorted(g["similarity"] for g in gone) == pytest.approx(truth, abs=1e-4)  # the true Jaccard, not an estimate
    assert stats["duplicates"]["verified"]
    # The estimate alone decides on its own noise: the run still works and says so.
    _, est = run(tmp_path, [{"path": str(tmp_path / "a.jsonl")}], dedup={"ngram": 5, "threshold": 0.8, "verify": False},
                 split={"validation_fraction": 0.0}, output={"dir": str(tmp_path / "est"), "plots": False})
    assert not est["duplicates"]["verified"]


def test_lsh_bands_reach_recall_at_the_threshold():
    from lmforge.prep.dedup import candidate_probability
    for t in (0.5, 0.7, 0.8, 0.9):
        b, r = lsh_params(t, 128)
        assert b * r <= 128 and candidate_probability(t, b, r) >= 0.99
        assert candidate_probability(t, 128 // (r + 1), r + 1) < 0.99  # the most rows that still reach it
    assert lsh_params(0.8, 128) == (21, 6)


def test_ids_and_removed_jsonl_round_trip(tmp_path):
    rng = random.Random(21)
    docs = [prose(rng) for _ in range(30)]
    docs += [docs[3], "Too short.", edit(docs[5], 0.03, rng)]
    path = write_jsonl(tmp_path / "a.jsonl", docs)
    out, stats = run(tmp_path, [{"path": path, "domain": "web"}], shard_mb=0.002, split={"validation_fraction": 0.0})
    lines = Path(path).read_text().splitlines()
    got = rows(out, "train")
    assert {r["source"] for r in got} == {path}
    for r in got:  # an id names the file and line its text came from, across work units
        file, line = r["id"].rsplit(":", 1)
        assert file == path and normalize(json.loads(lines[int(line) - 1])["text"], NormalizeConfig()) == r["text"]
    gone = {g["id"]: g for g in removed(out)}
    assert gone[f"{path}:32"] == {"id": f"{path}:32", "source": path, "domain": "web", "reason": "too_few_words",
                                 "duplicate_of": None, "similarity": None}
    assert gone[f"{path}:31"]["reason"] == "exact_duplicate" and gone[f"{path}:31"]["duplicate_of"] == f"{path}:4"
    assert gone[f"{path}:31"]["similarity"] == 1.0
    near = gone[f"{path}:33"]
    assert near["reason"] == "near_duplicate" and near["duplicate_of"] == f"{path}:6"
    assert near["similarity"] == pytest.approx(jaccard(docs[5], docs[32]), abs=1e-4)
    assert len(gone) == stats["removed_documents"] == 3 and "3 documents removed" in (out / "report.md").read_text()
    # The user's id column instead, from JSONL and from CSV.
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d, "key": f"doc-{i}"}) + "\n"
                                              for i, d in enumerate(docs[:10] + [docs[2]])))
    with open(tmp_path / "c.csv", "w", newline="") as fh:
        import csv
        csv.writer(fh).writerows([["uid", "text"]] + [[f"c{i}", prose(rng)] for i in range(5)])
    out, _ = run(tmp_path, [{"path": str(tmp_path / "b.jsonl"), "id_column": "key"},
                            {"path": str(tmp_path / "c.csv"), "id_column": "uid"}],
                 split={"validation_fraction": 0.0}, output={"dir": str(tmp_path / "own"), "plots": False})
    assert sorted(r["id"] for r in rows(out, "train")) == sorted([f"doc-{i}" for i in range(10)] +
                                                                 [f"c{i}" for i in range(5)])
    assert removed(out) == [{"id": "doc-10", "source": str(tmp_path / "b.jsonl"), "domain": "default",
                             "reason": "exact_duplicate", "duplicate_of": "doc-2", "similarity": 1.0}]


def test_kept_document_is_the_longest_then_the_first(tmp_path):
    rng = random.Random(22)
    docs = [prose(rng, 100) for _ in range(20)]
    longer = docs[0] + " " + " ".join(rng.choice(VOCAB) for _ in range(6)) + "."
    twin_a, twin_b = edit(docs[1], 0.03, rng), edit(docs[1], 0.03, rng)
    docs = docs + [longer, twin_a, twin_b]
    sources = [{"path": write_jsonl(tmp_path / "a.jsonl", docs[:21])}, {"path": write_jsonl(tmp_path / "b.jsonl",
                                                                                              docs[21:])}]
    out, _ = run(tmp_path, sources, split={"validation_fraction": 0.0})
    gone = {g["id"].rsplit("/", 1)[1]: g["duplicate_of"].rsplit("/", 1)[1] for g in removed(out)}
    # The longer copy wins over an earlier original; equal lengths: the first in input order stays.
    assert gone == {"a.jsonl:1": "a.jsonl:21", "b.jsonl:1": "a.jsonl:2", "b.jsonl:2": "a.jsonl:2"}
    two, _ = run(tmp_path, sources, num_proc=2, shard_mb=0.001, split={"validation_fraction": 0.0},
                 output={"dir": str(tmp_path / "two"), "plots": False})
    assert removed(two) == removed(out)


@pytest.mark.parametrize("setting,message", [
    ("dedup.threshold=0", "dedup.threshold"), ("dedup.threshold=1.5", "dedup.threshold"),
    ("dedup.ngram=0", "dedup.ngram")])
def test_bad_dedup_settings_exit_2(tmp_path, setting, message):
    (tmp_path / "r.yaml").write_text(json.dumps({"sources": [{"path": "a.jsonl"}],
                                                 "output": {"dir": str(tmp_path / "out")}}))
    result = CliRunner().invoke(app, ["prep", str(tmp_path / "r.yaml"), "--no-progress", "--set", setting])
    assert result.exit_code == 2 and result.output.startswith("error:") and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("records,message", [
    ([{"text": "a", "key": "x"}, {"text": "b"}], "a.jsonl:2: no id in 'key'"),
    ([{"text": "a", "key": "x"}, {"text": "b", "key": "x"}], "sources[0].id_column: 'key' is not unique: id 'x'")])
def test_bad_id_column_exit_2_and_nothing_written(tmp_path, records, message):
    rng = random.Random(23)
    lines = [json.dumps({**r, "text": prose(rng)}) for r in records]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "r.yaml").write_text(json.dumps({"sources": [{"path": "a.jsonl", "id_column": "key"}],
                                                 "output": {"dir": str(tmp_path / "out")}}))
    result = CliRunner().invoke(app, ["prep", str(tmp_path / "r.yaml"), "--no-progress"])
    assert result.exit_code == 2 and result.output.startswith("error:") and message in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "r.yaml"]  # no output, no work folder


# ---------------------------------------------------------------- Arrow without pandas


def test_unit_tables_round_trip_through_their_buffers(tmp_path):
    n = 5
    columns = {"text": ["plain", "", "naïve — 日本語", "x" * 1000, "last"], "domain": ["a"] * n,
               "id": [f"d{i}" for i in range(n)], "source": ["f.jsonl"] * n, "src": [0, 1, 2, 3, 4],
               "fixed": ["", "train", "", "validation", ""], "words": [1, 0, 3, 1, 1], "tokens": [1, 0, 5, 1, 1],
               "exact": [0, 2**64 - 1, 2**63, 7, 1], "valid": [True, False, True, True, False],
               "shingles": [1, 0, 2, 1, 1]}
    table = arrow_table(columns, UNIT_SCHEMA)
    assert table.schema == UNIT_SCHEMA and table.to_pydict() == columns
    pq.write_table(table, tmp_path / "t.parquet")
    back = pq.read_table(tmp_path / "t.parquet")
    for name, values in columns.items():
        got = column_numpy(back.column(name))
        assert got.tolist() == values, name
        got = column_numpy(back.slice(2, 2).column(name))  # a slice: its buffers start before its rows
        assert got.tolist() == values[2:4], name


def test_prep_does_not_load_pandas(tmp_path):
    rng = random.Random(17)
    docs = [prose(rng) for _ in range(10)]
    docs.append(edit(docs[0], 0.02, rng))
    corpus = write_jsonl(tmp_path / "a.jsonl", docs)
    code = ("import json, sys; from lmforge.prep import prep, prep_recipe_from_dict; "
            f"prep(prep_recipe_from_dict({{'sources': [{{'path': {corpus!r}}}], "
            f"'output': {{'dir': {str(tmp_path / 'out')!r}, 'plots': False}}}}), show_progress=False); "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'pandas')))")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert json.loads(done.stdout.splitlines()[-1]) == []
    assert len((tmp_path / "out" / "removed.jsonl").read_text().splitlines()) == 1


def test_prep_restores_the_arrow_memory_pool(tmp_path):
    before = pa.default_memory_pool().backend_name
    rng = random.Random(18)
    out, stats = run(tmp_path, [{"path": write_jsonl(tmp_path / "a.jsonl", [prose(rng) for _ in range(5)])}],
                     split={"validation_fraction": 0.0})
    assert stats["domains"]["default"]["train"]["docs"] == 5
    assert pa.default_memory_pool().backend_name == before
