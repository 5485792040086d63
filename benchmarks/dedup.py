"""Near-duplicate removal against exact ground truth: `lmforge prep` (verified and estimate-only),
datasketch's MinHashLSH and datatrove's MinHash pipeline, on one corpus with seeded injected near-duplicates,
in the same run.

    python benchmarks/dedup.py [--base 4000] [--inject 0.35] [--threshold 0.8] [--ngram 5] [--repeats 3]

Corpus: prose documents of at least 40 words from the shared corpora (WikiText-2 paragraphs, Inspec
abstracts, PubMedQA contexts, legal texts; exact copies dropped), plus seeded copies of random ones of
several kinds: word edits (1-20 %: substituted, deleted or inserted), a dropped sentence, reordered
sentences, an added header and footer, whitespace and case changes, exact copies, and copies of copies.
Everything is shuffled and written as one JSONL file with an `id` per document.

Ground truth: every pair whose word n-gram sets (lower-case words, punctuation dropped, the tokens all
tools are given) have Jaccard >= the threshold, found by All-Pairs prefix filtering (n-grams ordered
rarest first; a pair above the threshold shares one of the first |x| - ceil(t|x|) + 1 n-grams of each
set, so no pair is missed) and checked by brute force against every document for a sample.

Scores: precision = the fraction of removed documents that have a true twin (Jaccard >= threshold)
among the kept ones; recall = the fraction of true pairs of which at most one document is kept.
MB/s: corpus bytes over each tool's own wall-clock seconds, and over its CPU seconds (steadier on a shared
machine); medians of --repeats runs, each in a fresh process, the tools taking turns;
peak RSS: the process's maximum resident memory, what it held after its imports, and the difference;
lmforge's fixed cost is measured by the same run on the first 20 documents.

Peers, each skipped (with a line saying so) when its package is missing: datasketch's MinHashLSH in a
plain one-process script (query, then insert when nothing is found; 128 permutations), and datatrove's
MinHash pipeline (its four stages run in one process on a temporary folder; FineWeb's 14 × 8 hashes).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORD = re.compile(r"\w+")
HEADERS = ["Posted in General | Leave a comment", "Home > Articles > Reading", "Share this page:"]
FOOTERS = ["Copyright (c) 2024. All rights reserved.", "Click here to subscribe to our newsletter.",
           "This article was printed from the archive."]


# ---------------------------------------------------------------- corpus


def base_documents(limit: int, rng: random.Random) -> list[str]:
    from lmforge.prep import load_prep_recipe
    from lmforge.prep.normalize import normalize
    from lmforge.prep.read import plan_units, read_part
    recipe = load_prep_recipe(ROOT / "recipes" / "prep" / "shared-corpora.yaml")
    prose = [s for s in recipe.sources if s.domain not in ("code", "drama", "reviews")]
    units, _ = plan_units(prose, 1e9)
    docs, seen = [], set()
    for unit in units:
        for part in unit.parts:
            for _, text in read_part(prose[part.source], part, 1_000_000, Counter()):
                text = normalize(text, recipe.normalize)
                key = " ".join(WORD.findall(text.lower()))
                if len(key.split()) >= 40 and key not in seen:
                    seen.add(key)
                    docs.append(text)
    rng.shuffle(docs)
    return docs[:limit]


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


def word_edit(text: str, rate: float, rng: random.Random, vocab: list[str]) -> str:
    words = text.split()
    for i in sorted(rng.sample(range(len(words)), max(1, round(rate * len(words)))), reverse=True):
        kind = rng.random()
        if kind < 0.5:
            words[i] = rng.choice(vocab)
        elif kind < 0.75:
            del words[i]
        else:
            words.insert(i, rng.choice(vocab))
    return " ".join(words)


def near_copy(text: str, kind: str, rng: random.Random, vocab: list[str]) -> str:
    parts = sentences(text)
    if kind == "edit":
        return word_edit(text, rng.uniform(0.01, 0.20), rng, vocab)
    if kind == "drop_sentence" and len(parts) > 2:
        del parts[rng.randrange(len(parts))]
        return " ".join(parts)
    if kind == "reorder" and len(parts) > 2:
        i = rng.randrange(len(parts) - 1)
        parts[i], parts[i + 1] = parts[i + 1], parts[i]
        return " ".join(parts)
    if kind == "header_footer":
        return rng.choice(HEADERS) + "\n\n" + text + "\n\n" + rng.choice(FOOTERS)
    if kind == "case_space":
        return "  ".join(w.upper() if rng.random() < 0.3 else w for w in text.split())
    return text  # exact copy


KINDS = ["edit", "edit", "edit", "drop_sentence", "reorder", "header_footer", "case_space", "exact"]


def build_corpus(n_base: int, inject: float, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = base_documents(n_base, rng)
    vocab = sorted({w for d in docs[:500] for w in d.split()})
    copies: list[str] = []
    for _ in range(int(inject * len(docs))):
        if copies and rng.random() < 0.15:  # a copy of a copy
            copies.append(near_copy(rng.choice(copies), "edit", rng, vocab))
        else:
            copies.append(near_copy(rng.choice(docs), rng.choice(KINDS), rng, vocab))
    corpus = docs + copies
    rng.shuffle(corpus)
    return corpus


# ---------------------------------------------------------------- exact ground truth


def shingle_set(text: str, n: int) -> frozenset:
    """What every tool compares: word n-grams of the lower-case words (one shingle for a shorter text)."""
    w = WORD.findall(text.lower())
    if len(w) < n:
        return frozenset([" ".join(w)])
    return frozenset(" ".join(w[i:i + n]) for i in range(len(w) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter) if a or b else 0.0


def all_pairs(sets: list[frozenset], t: float) -> set[tuple[int, int]]:
    """Every pair (i < j) with Jaccard >= t, by prefix filtering: no pair is missed."""
    freq = Counter(g for s in sets for g in s)
    rank = {g: k for k, g in enumerate(sorted(freq, key=lambda g: (freq[g], g)))}
    ordered = [sorted(rank[g] for g in s) for s in sets]
    index: dict[int, list[int]] = defaultdict(list)
    found = set()
    for y in sorted(range(len(sets)), key=lambda i: (len(sets[i]), i)):
        size = len(ordered[y])
        prefix = ordered[y][:size - math.ceil(t * size) + 1]
        candidates = {x for g in prefix for x in index[g] if len(sets[x]) >= t * size}
        for x in candidates:
            if jaccard(sets[x], sets[y]) >= t:
                found.add((min(x, y), max(x, y)))
        for g in prefix:
            index[g].append(y)
    return found


def brute_force_check(sets: list[frozenset], pairs: set, t: float, sample: int, rng: random.Random) -> int:
    """Compare `sample` random documents with every other one; the pairs found must all be in `pairs`."""
    checked = 0
    for i in rng.sample(range(len(sets)), min(sample, len(sets))):
        for j in range(len(sets)):
            if i != j and jaccard(sets[i], sets[j]) >= t:
                assert (min(i, j), max(i, j)) in pairs, f"all-pairs missed ({i}, {j})"
                checked += 1
    return checked


# ---------------------------------------------------------------- the tools (each in its own process)


def rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not carried over from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def file_backed_mb() -> float:
    """Resident pages mapped from files (RssFile): mostly the code of the libraries loaded, shared between
    processes and dropped by the kernel first, unlike the heap."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_lmforge(corpus: Path, args, verify: bool) -> list[str]:
    from lmforge.prep import prep, prep_recipe_from_dict
    off = dict(min_words=None, max_words=None, min_mean_word_length=None, max_mean_word_length=None,
               max_symbol_word_ratio=None, max_ellipsis_line_fraction=None, max_bullet_line_fraction=None,
               max_non_alpha_word_fraction=None, max_dup_line_fraction=None, max_dup_line_char_fraction=None,
               max_top_ngram_char_fraction={}, max_dup_ngram_char_fraction={})
    out = Path(tempfile.mkdtemp()) / "out"
    recipe = prep_recipe_from_dict({
        "sources": [{"path": str(corpus), "id_column": "id"}], "filters": off, "num_proc": 1,
        "dedup": {"ngram": args.ngram, "threshold": args.threshold, "verify": verify},
        "split": {"validation_fraction": 0.0}, "mix": {"resample": False},
        "output": {"dir": str(out), "plots": False, "examples": 0}})
    prep(recipe, show_progress=False)
    return [json.loads(line)["id"] for line in (out / "removed.jsonl").read_text().splitlines()]


def run_datasketch(corpus: Path, args) -> list[str]:
    from datasketch import MinHash, MinHashLSH
    lsh = MinHashLSH(threshold=args.threshold, num_perm=128)
    removed = []
    with open(corpus, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            m = MinHash(num_perm=128)
            m.update_batch([g.encode() for g in shingle_set(row["text"], args.ngram)])
            if lsh.query(m):
                removed.append(row["id"])
            else:
                lsh.insert(row["id"], m)
    return removed


def run_datatrove(corpus: Path, args) -> list[str]:
    """datatrove's four MinHash stages in one process, one task each, on a temporary folder: signatures,
    buckets (one task per bucket), clusters, filter. FineWeb's defaults (14 buckets × 8 hashes, 64-bit) with
    its sha1 shingle hash (its xxhash option hands str to the installed xxhash, which takes only bytes); its
    text normalisation off and a whitespace tokenizer, so it hashes the same word n-grams as the others (the
    documents it is given are the benchmark's tokens, computed inside its timed run)."""
    from datatrove.data import Document
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.text import TextNormConfig
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Whitespace(WordTokenizer):
        def word_tokenize(self, text):
            return text.split()

        def sent_tokenize(self, text):
            return [text]

        def span_tokenize(self, text):
            return [(0, len(text))]

    config = MinhashConfig(n_grams=args.ngram, num_buckets=14, hashes_per_bucket=8,
                           hash_config=HashConfig(precision=64, hash_fc="sha1"),
                           norm_config=TextNormConfig(lowercase=False, norm_whitespace=False, remove_punctuation=False,
                                                      norm_unicode_diacritics=False, norm_numbers=False))
    work = tempfile.mkdtemp()  # datatrove takes folders as str

    def documents():
        with open(corpus, encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                yield Document(text=" ".join(WORD.findall(row["text"].lower())), id=row["id"])
    sigs, buckets, remove = (f"{work}/{name}" for name in ("sigs", "buckets", "remove"))
    MinhashDedupSignature(output_folder=sigs, config=config, language=Whitespace()).run(documents())
    for bucket in range(config.num_buckets):
        MinhashDedupBuckets(input_folder=sigs, output_folder=buckets, config=config).run(
            rank=bucket, world_size=config.num_buckets)
    MinhashDedupCluster(input_folder=buckets, output_folder=remove, config=config).run()
    kept = {doc.id for doc in MinhashDedupFilter(input_folder=remove).run(documents())}
    with open(corpus, encoding="utf-8") as fh:
        return [row["id"] for row in map(json.loads, fh) if row["id"] not in kept]


PEERS = {"datasketch": "datasketch==2.0.0", "datatrove": "datatrove==0.10.1"}  # tool → its package (dev extras)


def child(args) -> None:
    corpus = Path(args.corpus)
    if args.tool == "datasketch":
        import datasketch  # noqa: F401  imports first: the baseline memory
    elif args.tool == "datatrove":
        import datatrove.pipeline.dedup.minhash  # noqa: F401
    else:
        import lmforge.prep  # noqa: F401
    before = rss_mb()
    t0, cpu0 = time.perf_counter(), time.process_time()
    if args.tool in PEERS:
        removed = (run_datasketch if args.tool == "datasketch" else run_datatrove)(corpus, args)
    else:
        removed = run_lmforge(corpus, args, verify=args.tool == "lmforge")
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "removed": removed, "rss_mb": rss_mb(),
                      "rss_before_mb": before, "file_mb": file_backed_mb()}))


def measure(tools: list[str], corpus: Path, args) -> dict[str, dict]:
    """Each tool --repeats times, each run in a fresh process, the tools taking turns (so a change in the
    machine's load falls on all of them): medians of the seconds, the largest memory figures."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    runs: dict[str, list] = {t: [] for t in tools}
    for _ in range(args.repeats):
        for tool in tools:
            cmd = [sys.executable, __file__, "--child", tool, "--corpus", str(corpus), "--ngram", str(args.ngram),
                   "--threshold", str(args.threshold)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            runs[tool].append(json.loads(out.splitlines()[-1]))
    return {t: {**r[0], **{k: statistics.median(x[k] for x in r) for k in ("seconds", "cpu_seconds")},
                **{k: max(x[k] for x in r) for k in ("rss_mb", "rss_before_mb", "file_mb")}} for t, r in runs.items()}


def score(removed: list[str], ids: list[str], pairs: set) -> tuple[float, float]:
    at = {d: i for i, d in enumerate(ids)}
    gone = {at[r] for r in removed}
    twins: dict[int, set] = defaultdict(set)
    for i, j in pairs:
        twins[i].add(j)
        twins[j].add(i)
    right = sum(1 for r in gone if twins[r] - gone)
    both_kept = sum(1 for i, j in pairs if i not in gone and j not in gone)
    return right / max(len(gone), 1), 1 - both_kept / max(len(pairs), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=int, default=4000, help="Distinct documents drawn from the corpora.")
    p.add_argument("--inject", type=float, default=0.35, help="Near copies injected, per base document.")
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--ngram", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample", type=int, default=100, help="Documents checked against all others by brute force.")
    p.add_argument("--child", choices=["lmforge", "lmforge-estimate", *PEERS], dest="tool")
    p.add_argument("--corpus")
    args = p.parse_args()
    if args.tool:
        child(args)
        return
    corpus = build_corpus(args.base, args.inject, args.seed)
    ids = [f"d{i}" for i in range(len(corpus))]
    folder = Path(tempfile.mkdtemp())
    path = folder / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(ids, corpus)), encoding="utf-8")
    mb = path.stat().st_size / 2**20
    t0 = time.perf_counter()
    sets = [shingle_set(t, args.ngram) for t in corpus]
    pairs = all_pairs(sets, args.threshold)
    truth_s = time.perf_counter() - t0
    checked = brute_force_check(sets, pairs, args.threshold, args.sample, random.Random(args.seed + 1))
    print(f"corpus: {len(corpus):,} documents ({args.base:,} drawn, {len(corpus) - args.base:,} injected), "
          f"{mb:.1f} MB; {len(pairs):,} true pairs at Jaccard >= {args.threshold} on word {args.ngram}-grams "
          f"(all-pairs {truth_s:.1f} s; brute force on {args.sample} documents agrees: {checked} pairs); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    tools = ["lmforge", "lmforge-estimate"]
    for tool, package in PEERS.items():
        if importlib.util.find_spec(package.split("==")[0]) is None:
            print(f"{tool} is not installed: skipping the {tool} peer (pip install {package})")
        else:
            tools.append(tool)
    results = measure(tools, path, args)
    # lmforge's fixed memory: the same run on the first 20 documents (imports, pyarrow's first conversion, the
    # Parquet writer), so what the corpus itself costs can be told apart from it.
    tiny = folder / "tiny.jsonl"
    tiny.write_text("".join(path.read_text(encoding="utf-8").splitlines(keepends=True)[:20]), encoding="utf-8")
    fixed = measure(["lmforge"], tiny, argparse.Namespace(**{**vars(args), "repeats": 1}))["lmforge"]
    lean = min(r["rss_mb"] for t, r in results.items() if t in PEERS) if set(results) & set(PEERS) else None
    print("| tool | removed | precision | recall | MB/s | MB per CPU-second | peak RSS (MB) | after imports (MB) "
          "| above imports (MB) | file-backed at the end (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for t, r in results.items():
        precision, recall = score(r["removed"], ids, pairs)
        print(f"| {t} | {len(r['removed']):,} | {precision:.4f} | {recall:.4f} | {mb / r['seconds']:.2f} | "
              f"{mb / r['cpu_seconds']:.2f} | {r['rss_mb']:.0f} | {r['rss_before_mb']:.0f} | "
              f"{r['rss_mb'] - r['rss_before_mb']:.0f} | {r['file_mb']:.0f} |")
    for peer in PEERS:
        if peer in results:
            ratio = results[peer]["seconds"] / results["lmforge"]["seconds"]
            cpu = results[peer]["cpu_seconds"] / results["lmforge"]["cpu_seconds"]
            memory = results["lmforge"]["rss_mb"] / results[peer]["rss_mb"]
            print(f"lmforge (verified) / {peer}: MB/s {ratio:.2f}x, MB per CPU-second {cpu:.2f}x, "
                  f"peak RSS {memory:.2f}x")
    if lean:
        print(f"lmforge (verified) peak RSS / the leanest peer's: {results['lmforge']['rss_mb'] / lean:.2f}x "
              f"(bar: <= 1.2x)")
    print(f"lmforge's fixed cost (the same run on 20 documents): {fixed['seconds']:.2f} s, "
          f"peak RSS {fixed['rss_mb']:.0f} MB, "
          f"{fixed['rss_before_mb']:.0f} MB of it after imports; this corpus adds "
          f"{results['lmforge']['rss_mb'] - fixed['rss_mb']:.0f} MB to it")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
