"""Data preparation: near-duplicate recall/precision on injected copies, and whole-pipeline throughput
against a plain single-process Python reference of the same filters, measured in the same run.

    python benchmarks/prep.py [--recipe RECIPE] [--per-domain 1000] [--copies 300]
    python benchmarks/prep.py --engines [--synthetic-mb 50] [--repeats 3] [--object-store-mb 100]
                                                                             # local engine against ray engine
    python benchmarks/prep.py --nodes [--synthetic-mb 50] [--repeats 3]     # ray engine on 1 and 2 nodes

Quality: base documents (>= 20 words, exact duplicates dropped) are drawn from every source of the
recipe (the shared corpora); for each edit rate, copies of random base documents get that fraction
of their words edited (half substituted, a quarter deleted, a quarter inserted, words drawn from the
same domain). The corpora's own near-duplicates are removed from the base set first, so originals are
distinct. The pipeline's dedup (recipe settings) then runs over originals and copies together.
Recall: the fraction of copies removed as a duplicate of their original (or of a sibling copy).
Precision: of the copies removed, the fraction removed for their original or a sibling, or for a
document whose original has a true word n-gram Jaccard >= the threshold with theirs. Bar:
recall >= 0.95 at precision >= 0.95 for every rate <= 10 %.

Throughput: `prep` on the recipe (num_proc from the recipe, 2 here) against `reference()`: the same
reader, normalisation, filter definitions, exact dedup, MinHash near dedup (per document, shingles
hashed one by one, dict buckets), seeded split and a JSONL writer, written the plain way — one
process, a Python loop per document. MB/s are input megabytes over wall-clock seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import xxhash

from lmforge.data.sources import split_of
from lmforge.prep import load_prep_recipe, prep, prep_recipe_from_dict
from lmforge.prep.dedup import (MinHasher, ShingleSets, dedup_tokens, exact_key, lsh_params, near_pairs,
                                shingle_sets)
from lmforge.prep.filters import _line_metrics, alnum_count, code_rules, has_alpha, prose_rules
from lmforge.prep.mix import choose_survivors
from lmforge.prep.normalize import count_lines, normalize, strip_boilerplate
from lmforge.prep.read import plan_units, read_part

ROOT = Path(__file__).resolve().parents[1]
RATES = (0.01, 0.03, 0.05, 0.10, 0.20, 0.30)


# ---------------------------------------------------------------- near-duplicate quality


def base_documents(recipe, per_domain: int, rng: random.Random) -> list[tuple[str, str]]:
    units, _ = plan_units(recipe.sources, 1e9)
    by_domain: dict[str, list[str]] = defaultdict(list)
    seen = set()
    for unit in units:
        for part in unit.parts:
            src = recipe.sources[part.source]
            for _, text in read_part(src, part, recipe.normalize.max_doc_chars, Counter()):
                text = normalize(text, recipe.normalize)
                tokens = dedup_tokens(text)
                key = " ".join(tokens)
                if len(text.split()) >= 20 and key not in seen:
                    seen.add(key)
                    by_domain[src.domain].append(text)
    docs = []
    for domain, texts in sorted(by_domain.items()):
        docs += [(domain, t) for t in rng.sample(texts, min(per_domain, len(texts)))]
    return docs


def edit(text: str, rate: float, vocab: list[str], rng: random.Random) -> str:
    words = text.split()
    for _ in range(max(1, round(rate * len(words)))):
        op, i = rng.random(), rng.randrange(len(words))
        if op < 0.5:
            words[i] = rng.choice(vocab)
        elif op < 0.75 and len(words) > 1:
            del words[i]
        else:
            words.insert(i, rng.choice(vocab))
    return " ".join(words)


def shingle_set(text: str, n: int) -> set:
    w = dedup_tokens(text)
    return {tuple(w[i:i + n]) for i in range(max(1, len(w) - n + 1))}


def dedup(texts: list[str], d) -> tuple[np.ndarray, np.ndarray]:
    """The pipeline's own decisions: (kept, duplicate_of) with the recipe's dedup settings."""
    tokens = [dedup_tokens(t) for t in texts]
    sig, valid = MinHasher(d.num_perm, d.ngram, d.seed).signatures(tokens)
    keys = np.array([exact_key(t, text) for t, text in zip(tokens, texts)], np.uint64)
    g, doc = MinHasher(d.num_perm, d.ngram, d.seed).shingles(tokens)
    sets, counts = shingle_sets(g, doc, len(texts))
    pairs, sims = near_pairs(sig, valid, d.threshold, d.bands, ShingleSets([sets], counts) if d.verify else None)
    chosen = choose_survivors(keys, pairs, np.zeros(len(texts), bool), d.exact, counts, sims)
    return chosen.kept, chosen.duplicate_of


def quality(recipe, per_domain: int, copies: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    d = recipe.dedup
    candidates = base_documents(recipe, per_domain, rng)
    # Originals must be distinct: drop the corpora's own near-duplicates first.
    kept, _ = dedup([t for _, t in candidates], d)
    base = [c for c, k in zip(candidates, kept) if k]
    vocab: dict[str, list[str]] = defaultdict(list)
    for domain, text in base:
        vocab[domain].extend(text.split()[:50])
    texts = [t for _, t in base]
    origin = list(range(len(base)))
    rate_of = [0.0] * len(base)
    for rate in RATES:
        for i in rng.sample(range(len(base)), copies):
            texts.append(edit(base[i][1], rate, vocab[base[i][0]], rng))
            origin.append(i)
            rate_of.append(rate)
    t0 = time.perf_counter()
    kept, duplicate_of = dedup(texts, d)
    seconds = time.perf_counter() - t0
    sets: dict[int, set] = {}

    def jaccard(a: int, b: int) -> float:
        sa = sets.setdefault(a, shingle_set(texts[a], d.ngram))
        sb = sets.setdefault(b, shingle_set(texts[b], d.ngram))
        return len(sa & sb) / len(sa | sb)

    def true_pair(a: int, b: int) -> bool:
        return origin[a] == origin[b] or jaccard(origin[a], origin[b]) >= d.threshold

    out = {}
    for rate in RATES:
        ids = [i for i in range(len(base), len(texts)) if rate_of[i] == rate]
        removed = [i for i in ids if not kept[i]]
        right = sum(true_pair(i, duplicate_of[i]) for i in removed)
        out[rate] = {"recall": right / len(ids), "precision": right / max(len(removed), 1),
                     "median_jaccard": float(np.median([jaccard(i, origin[i]) for i in ids]))}
    wrong_base = sum(not kept[i] for i in range(len(base)))
    return {"rates": out, "base_docs": len(base), "candidates": len(candidates), "copies": len(texts) - len(base),
            "seconds": seconds, "originals_removed": wrong_base,
            "bands_rows": (d.bands, d.num_perm // d.bands) if d.bands else lsh_params(d.threshold, d.num_perm)}


# ---------------------------------------------------------------- the plain reference


def _ngram_fractions(words: list[str], n: int) -> tuple[float, float]:
    chars = sum(len(w) for w in words)
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    top = 0.0
    if counts:
        best = max(counts.values())
        if best > 1:
            top = best * max(sum(len(w) for w in g) for g, c in counts.items() if c == best) / chars
    seen, covered = set(), [False] * len(words)
    for i, g in enumerate(grams):
        if g in seen:
            for k in range(i, i + n):
                covered[k] = True
        seen.add(g)
    return top, sum(len(w) for w, c in zip(words, covered) if c) / chars


def reference_reason(text: str, is_code: bool, recipe) -> str | None:
    if not text:
        return "empty"
    if is_code:
        lines = [len(line) for line in text.split("\n")]
        m = {"chars": len(text), "max_line": max(lines), "mean_line": sum(lines) / len(lines),
             "alnum": alnum_count(text) / len(text)}
        rules = code_rules(recipe.code)
    else:
        words = text.split()
        n = len(words)
        m = {"words": n, "mean_word_length": sum(len(w) for w in words) / n,
             "symbol_ratio": (text.count("#") + text.count("...") + text.count("…")) / n,
             "non_alpha": 1 - sum(has_alpha(w) for w in words) / n}
        names = ("bullet_lines", "ellipsis_lines", "punct_lines", "dup_lines", "dup_line_chars")
        m.update(zip(names, _line_metrics(text)))
        f = recipe.filters
        for k in sorted(set(f.max_top_ngram_char_fraction) | set(f.max_dup_ngram_char_fraction)):
            m[f"top_{k}gram"], m[f"dup_{k}gram"] = _ngram_fractions(words, k)
        rules = prose_rules(recipe.filters)
    for name, metric, kind, threshold in rules:
        if (m[metric] < threshold) if kind == "min" else (m[metric] > threshold):
            return name
    return None


def reference(recipe, out_file: Path) -> dict:
    """Plain Python, one process: read → (boilerplate pass) → normalise → filter → exact + MinHash/LSH
    dedup → split → JSONL."""
    t0 = time.perf_counter()
    units, _ = plan_units(recipe.sources, recipe.shard_mb)
    d = recipe.dedup
    rng = np.random.default_rng(d.seed)
    a = rng.integers(0, 2**63, d.num_perm, np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, d.num_perm, np.uint64)
    bands, rows = (d.bands, d.num_perm // d.bands) if d.bands else lsh_params(d.threshold, d.num_perm)
    code_domains = set(recipe.code.domains)
    removed: Counter = Counter()
    seen_exact: set = set()
    buckets: list[dict] = [dict() for _ in range(bands)]
    docs: list[tuple[str, str]] = []
    sigs: list[np.ndarray] = []
    nbytes = 0
    parts = [part for unit in units for part in unit.parts]
    boilerplate: dict[str, set] = {}
    min_chars, min_docs = recipe.normalize.boilerplate_min_chars, recipe.normalize.boilerplate_min_docs
    if min_docs:  # first pass: in how many documents of its domain each line occurs
        counts: dict[str, Counter] = defaultdict(Counter)
        for part in parts:
            src = recipe.sources[part.source]
            if src.domain in code_domains:
                continue
            for _, raw in read_part(src, part, recipe.normalize.max_doc_chars, Counter()):
                counts[src.domain].update(count_lines([normalize(raw, recipe.normalize)], min_chars))
        boilerplate = {d: {k for k, v in c.items() if v >= min_docs} for d, c in counts.items()}
    for part in parts:
        src = recipe.sources[part.source]
        nbytes += Path(part.file).stat().st_size if part.end < 0 else part.end - part.start
        for _, raw in read_part(src, part, recipe.normalize.max_doc_chars, Counter()):
            text = normalize(raw, recipe.normalize)
            if boilerplate.get(src.domain):
                text = strip_boilerplate(text, boilerplate[src.domain], min_chars)[0]
            reason = reference_reason(text, src.domain in code_domains, recipe)
            if reason:
                removed[reason] += 1
                continue
            tokens = dedup_tokens(text)
            key = hashlib.blake2b(" ".join(tokens).encode("utf-8", "surrogatepass"), digest_size=8).digest()
            if d.exact and key in seen_exact:
                removed["exact_duplicate"] += 1
                continue
            seen_exact.add(key)
            n = min(d.ngram, len(tokens))
            shingles = {" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)} if tokens else {text}
            h = np.array([xxhash.xxh64_intdigest(s.encode("utf-8", "surrogatepass")) for s in shingles], np.uint64)
            sig = ((h[:, None] * a[None, :] + b[None, :]) >> np.uint64(32)).astype(np.uint32).min(axis=0)
            duplicate = False
            for band in range(bands):
                k = sig[band * rows:(band + 1) * rows].tobytes()
                for j in buckets[band].get(k, ()):
                    if (sigs[j] == sig).mean() >= d.threshold:
                        duplicate = True
                        break
                if duplicate:
                    break
            if duplicate and d.near:
                removed["near_duplicate"] += 1
                continue
            for band in range(bands):
                buckets[band].setdefault(sig[band * rows:(band + 1) * rows].tobytes(), []).append(len(sigs))
            sigs.append(sig)
            docs.append((text, src.domain))
    with open(out_file, "w", encoding="utf-8") as fh:
        for text, domain in docs:
            split = split_of(text, recipe.split.seed, recipe.split.validation_fraction)
            fh.write(json.dumps({"text": text, "domain": domain, "split": split}) + "\n")
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "mb": nbytes / 2**20, "mb_per_s": nbytes / 2**20 / seconds, "kept": len(docs),
            "removed": dict(removed)}


# ---------------------------------------------------------------- local engine against the ray engine


def synthetic_corpus(folder: Path, mb: float, seed: int = 0) -> dict[str, str]:
    """JSONL files of random prose, a tenth of the documents near copies (3 % of words edited) or exact copies
    (upper-cased) of another; returns each copy's id → its original's id."""
    rng = random.Random(seed)
    vocab = sorted({"".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
                    for _ in range(20000)})
    planted, written, file_no = {}, 0, 0
    while written < mb * 2**20:
        path = folder / f"synthetic-{file_no:03d}.jsonl"
        lines = []
        for n in range(1, 5001):
            if lines and rng.random() < 0.1:
                k = rng.randrange(len(lines))
                base = json.loads(lines[k])["text"]
                text = base.upper() if rng.random() < 0.3 else edit(base, 0.03, vocab, rng)
                planted[f"{path}:{n}"] = planted.get(f"{path}:{k + 1}", f"{path}:{k + 1}")
            else:
                words = [rng.choice(vocab) for _ in range(rng.randint(80, 300))]
                text = ". ".join(" ".join(words[i:i + 12]).capitalize() for i in range(0, len(words), 12)) + "."
            lines.append(json.dumps({"text": text}))
        path.write_text("\n".join(lines) + "\n")
        written += path.stat().st_size
        file_no += 1
    return planted


def planted_scores(out: Path, planted: dict[str, str]) -> tuple[float, float]:
    """Recall: of the planted copies, the share removed with a member of their own group (original and copies);
    precision: of the documents removed as duplicates, the share removed for a member of their own group."""
    group = lambda doc: planted.get(doc, doc)  # noqa: E731 - a copy's group is named by its original
    dups = [r for r in map(json.loads, (out / "removed.jsonl").read_text().splitlines()) if r["duplicate_of"]]
    right = sum(group(r["id"]) == group(r["duplicate_of"]) for r in dups)
    return right / max(len(planted), 1), right / max(len(dups), 1)


class PeakMemory:
    """Samples, twice a second, the memory of this process and of every process under it: the largest unique set
    size of one Ray worker (its own pages, not the object store's shared ones), and the largest proportional set
    size (shared pages split among the processes that map them) summed over this process and its non-Ray children
    (the local engine's pool), and over all of them (with Ray's raylet, object store and workers when this process
    started Ray)."""

    def __init__(self):
        import psutil
        self.me, self.worker, self.own, self.total = psutil.Process(), 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil
        while not self._stop.wait(0.5):
            own = total = self.me.memory_full_info().pss
            worker = 0
            for p in self.me.children(recursive=True):
                try:
                    name, cmd = p.name(), " ".join(p.cmdline())
                    mem = p.memory_full_info()
                except psutil.Error:
                    continue
                is_ray = name.startswith("ray::") or name in ("raylet", "gcs_server") or "/ray/" in cmd
                total += mem.pss
                own += 0 if is_ray else mem.pss
                if name.startswith("ray::"):
                    worker = max(worker, mem.uss)
            self.worker, self.own, self.total = max(self.worker, worker), max(self.own, own), max(self.total, total)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def ray_started(num_cpus: int, object_store_mb: float | None):
    """A Ray on this machine for the whole comparison, its object store capped when asked (Ray's floor: 75 MB)."""
    import logging
    import ray
    kwargs = {"object_store_memory": int(object_store_mb * 2**20)} if object_store_mb else {}
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=False, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def spilled_mb() -> float:
    """MB that Ray's object store has spilled to disk so far (0 when it never filled)."""
    from ray._private.internal_api import memory_summary
    import re
    found = re.search(r"Spilled (\d+) MiB", memory_summary(stats_only=True))
    return float(found.group(1)) if found else 0.0


def compare_engines(recipe, repeats: int) -> dict:
    """Both engines on one recipe, alternating, `repeats` times each, on the Ray this process has started: median
    seconds and MB/s, same output, the peak memory of each engine's processes and what the object store spilled."""
    runs = {"local": [], "ray": []}
    peaks = {"local": [], "ray": []}
    spilled = spilled_mb()
    for _ in range(repeats):
        for engine in runs:
            recipe.output.dir = str(Path(recipe.output.dir).with_name(engine))
            with PeakMemory() as peak:
                out = prep(recipe, show_progress=False, force=True, engine=engine)
            peaks[engine].append(peak)
            runs[engine].append(json.loads((out / "stats.json").read_text()))
    spilled = spilled_mb() - spilled
    same = all((Path(recipe.output.dir).with_name("local") / f).read_bytes()
               == (Path(recipe.output.dir).with_name("ray") / f).read_bytes() for f in ("removed.jsonl",))
    med = {e: {"seconds": float(np.median([r["seconds"] for r in rs])), "mb": rs[0]["input_bytes"] / 2**20,
               "stages": {k: float(np.median([r["stage_seconds"].get(k, 0) for r in rs])) for k in rs[0]["stage_seconds"]},
               "worker_mb": max(p.worker for p in peaks[e]) / 2**20, "own_mb": max(p.own for p in peaks[e]) / 2**20,
               "total_mb": max(p.total for p in peaks[e]) / 2**20}
           for e, rs in runs.items()}
    for m in med.values():
        m["mb_per_s"] = m["mb"] / m["seconds"]
    return {**med, "same_removed": same, "ratio": med["ray"]["mb_per_s"] / med["local"]["mb_per_s"],
            "spilled_mb": spilled}


def engines(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shared = load_prep_recipe(args.recipe, [f"output.dir={tmp}/shared/out", "output.plots=false"])
        (Path(tmp) / "synthetic").mkdir()
        planted = synthetic_corpus(Path(tmp) / "synthetic", args.synthetic_mb)
        synthetic = prep_recipe_from_dict({
            "sources": [{"path": f"{tmp}/synthetic/*.jsonl", "domain": "synthetic"}], "num_proc": shared.num_proc,
            "output": {"dir": f"{tmp}/synthetic-out/out", "plots": False}})
        # One Ray for both corpora, as a cluster serves many runs: its start and a first run, which starts the
        # workers (each imports lmforge), are not counted.
        with ray_started(max(2, shared.num_proc), args.object_store_mb):
            prep(shared, show_progress=False, force=True, engine="ray")
            rows.append(("shared corpora", compare_engines(shared, args.repeats), None))
            result = compare_engines(synthetic, args.repeats)
        scores = {e: planted_scores(Path(tmp) / "synthetic-out" / e, planted) for e in ("local", "ray")}
        rows.append((f"synthetic ({len(planted):,} planted copies)", result, scores))
    print(f"| corpus | MB | local s | local MB/s | ray s | ray MB/s | ray / local | same removed.jsonl | "
          f"planted copies: recall, precision (local; ray) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r, scores in rows:
        pr = "—" if scores is None else "; ".join(f"{rc:.3f}, {pc:.3f}" for rc, pc in scores.values())
        print(f"| {name} | {r['local']['mb']:.1f} | {r['local']['seconds']:.1f} | {r['local']['mb_per_s']:.2f} | "
              f"{r['ray']['seconds']:.1f} | {r['ray']['mb_per_s']:.2f} | {r['ratio']:.2f}x | {r['same_removed']} | {pr} |")
    mb, local_s, ray_s = (sum(r[e][k] for _, r, _ in rows) for e, k in (("local", "mb"), ("local", "seconds"),
                                                                       ("ray", "seconds")))
    print(f"| both | {mb:.1f} | {local_s:.1f} | {mb / local_s:.2f} | {ray_s:.1f} | {mb / ray_s:.2f} | "
          f"{local_s / ray_s:.2f}x | | |")
    for name, r, _ in rows:
        for e in ("local", "ray"):
            print(f"{name}, {e} stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in r[e]["stages"].items()))
    cap = f"{args.object_store_mb:g} MB" if args.object_store_mb else "Ray's default"
    print(f"\nPeak memory (MB; sums of proportional set sizes, one worker's own pages), object store: {cap}\n")
    print("| corpus | corpus MB | local: driver and pool | ray: driver | ray: largest worker | ray: all processes | "
          "object store spilled MB |")
    print("|---|---|---|---|---|---|---|")
    for name, r, _ in rows:
        print(f"| {name} | {r['local']['mb']:.0f} | {r['local']['own_mb']:.0f} | {r['ray']['own_mb']:.0f} | "
              f"{r['ray']['worker_mb']:.0f} | "
              f"{r['ray']['total_mb']:.0f} | {r['spilled_mb']:.0f} |")


def scaling(args) -> None:
    """The synthetic corpus on a Ray of 1 and then 2 nodes of one CPU each (started here), time per stage, and a
    projection to 1 TB of text from the measured per-stage rates."""
    sys.path.insert(0, str(ROOT / "tests"))
    from ray_nodes import free_port, node_env, start_node, stop_nodes
    os.environ.update(node_env())
    port, nodes, stages = free_port(), [], {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "synthetic").mkdir()
        synthetic_corpus(Path(tmp) / "synthetic", args.synthetic_mb)
        recipe = prep_recipe_from_dict({"sources": [{"path": f"{tmp}/synthetic/*.jsonl"}],
                                        "output": {"dir": f"{tmp}/out", "plots": False}})
        try:
            for count in (1, 2):
                nodes.append(start_node(port, head=not nodes))
                # the first run starts the new node's workers (each imports lmforge): not counted
                runs = [json.loads((prep(recipe, force=True, show_progress=False, engine="ray",
                                         address=f"127.0.0.1:{port}") / "stats.json").read_text())
                        for _ in range(args.repeats + 1)][1:]
                assert runs[0]["ray_cpus"] == count
                stages[count] = {k: float(np.median([r["stage_seconds"][k] for r in runs])) for k in runs[0]["stage_seconds"]}
                stages[count]["whole run"] = float(np.median([r["seconds"] for r in runs]))
                mb = runs[0]["input_bytes"] / 2**20
        finally:
            stop_nodes(nodes)
    print(f"synthetic corpus, {mb:.1f} MB; medians of {args.repeats} runs per cluster size after a warm-up run\n")
    print("| stage | 1 node s | 2 nodes s | speed-up | MB/s per node (2 nodes) | 1 TB on 64 nodes, h |")
    print("|---|---|---|---|---|---|")
    for (k, one), two in zip(stages[1].items(), stages[2].values()):
        per_node = mb / two / 2
        print(f"| {k} | {one:.1f} | {two:.1f} | {one / two:.2f}x | {per_node:.2f} | {2**20 / (per_node * 64) / 3600:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "prep" / "shared-corpora.yaml"))
    ap.add_argument("--per-domain", type=int, default=1000, help="Base documents per domain (quality test).")
    ap.add_argument("--copies", type=int, default=300, help="Injected copies per edit rate.")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--engines", action="store_true", help="Only the local engine against the ray engine.")
    ap.add_argument("--synthetic-mb", type=float, default=50.0, help="Size of the synthetic corpus (--engines).")
    ap.add_argument("--object-store-mb", type=float, default=None,
                    help="Cap Ray's object store at this many MB (--engines; Ray refuses less than 75).")
    ap.add_argument("--repeats", type=int, default=3, help="Runs per engine or cluster size (--engines, --nodes).")
    ap.add_argument("--nodes", action="store_true", help="Only the ray engine on 1 and 2 local nodes of 1 CPU.")
    args = ap.parse_args()
    if args.engines:
        return engines(args)
    if args.nodes:
        return scaling(args)
    recipe = load_prep_recipe(args.recipe)

    q = quality(recipe, args.per_domain, args.copies)
    d = recipe.dedup
    print(f"near-duplicate detection: {q['base_docs']} distinct base documents (of {q['candidates']}) + "
          f"{q['copies']} copies; word {d.ngram}-grams, threshold {d.threshold}, {d.num_perm} permutations, "
          f"bands x rows {q['bands_rows']}; {q['seconds']:.1f} s; originals removed: {q['originals_removed']}")
    print("| words edited | recall | precision | median true Jaccard to the original |")
    print("|---|---|---|---|")
    for rate, r in q["rates"].items():
        print(f"| {rate:.0%} | {r['recall']:.3f} | {r['precision']:.3f} | {r['median_jaccard']:.2f} |")
    ok = all(r["recall"] >= 0.95 and r["precision"] >= 0.95 for rate, r in q["rates"].items() if rate <= 0.10)
    print(f"bar (recall >= 0.95 at precision >= 0.95 up to 10 % edits): {'met' if ok else 'NOT met'}")

    with tempfile.TemporaryDirectory() as tmp:
        recipe.output.dir = str(Path(tmp) / "out")
        out = prep(recipe, show_progress=False)
        stats = json.loads((out / "stats.json").read_text())
        ours = {"mb": stats["input_bytes"] / 2**20, "seconds": stats["seconds"], "mb_per_s": stats["mb_per_s"]}
        removed = Counter()
        for c in stats["removed"].values():
            removed.update(c)
        kept = sum(s["train"]["docs"] + s["validation"]["docs"] for s in stats["domains"].values())
        print(f"\nlmforge prep ({recipe.num_proc} processes): {ours['mb']:.1f} MB in {ours['seconds']:.1f} s = "
              f"{ours['mb_per_s']:.2f} MB/s; kept {kept:,} documents")
        print("  stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in stats["stage_seconds"].items()))
        recipe.output.dir = str(Path(tmp) / "one")
        recipe.num_proc = 1
        one = json.loads((prep(recipe, show_progress=False) / "stats.json").read_text())
        print(f"lmforge prep (1 process): {one['seconds']:.1f} s = {one['mb_per_s']:.2f} MB/s")
        if args.skip_reference:
            return
        ref = reference(recipe, Path(tmp) / "reference.jsonl")
        print(f"plain Python reference (1 process): {ref['mb']:.1f} MB in {ref['seconds']:.1f} s = "
              f"{ref['mb_per_s']:.2f} MB/s; kept {ref['kept']:,} documents")
        print(f"speed-up: {ours['mb_per_s'] / ref['mb_per_s']:.1f}x ({one['mb_per_s'] / ref['mb_per_s']:.1f}x "
              "with 1 process)")
        filt = {k: v for k, v in removed.items() if "duplicate" not in k and k != "copy_of_validation"}
        ref_filt = {k: v for k, v in ref["removed"].items() if "duplicate" not in k}
        print(f"same filter decisions: {filt == ref_filt}"
              + ("" if filt == ref_filt else f" (lmforge {filt} vs reference {ref_filt})"))
        print(f"duplicates removed: lmforge exact {removed['exact_duplicate']}, near {removed['near_duplicate']}; "
              f"reference exact {ref['removed'].get('exact_duplicate', 0)}, "
              f"near {ref['removed'].get('near_duplicate', 0)}")


if __name__ == "__main__":
    sys.exit(main())
