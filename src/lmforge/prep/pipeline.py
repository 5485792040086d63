"""`prep`: raw sources → normalised, filtered, deduplicated, split and mixed Parquet dataset + report.

Stages: (0, optional) count lines for boilerplate removal; (1) per work unit, in `num_proc`
processes: read, normalise, filter, hash and sign — saved to a work folder, so a restarted run
resumes with the units still to do; (2) over all signatures: exact and near-duplicate clusters,
survivors, split, mixing weights; (3) write the shards, the marker file, removed.jsonl and the report
into a temporary folder that replaces the output folder only when it is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import pyarrow.parquet as pq

from lmforge.errors import LmforgeError
from lmforge.paths import PREPARED_MARKER as MARKER
from lmforge.prep import mix
from lmforge.prep.config import PrepRecipe, load_prep_recipe
from lmforge.prep.dedup import ShingleSets, near_pairs
from lmforge.prep.read import Unit, plan_units
from lmforge.prep.report import write_report
from lmforge.prep.worker import FILTERED_SCHEMA, HIST_EDGES, count_unit_lines, process_unit, unit_paths
from lmforge.recipe import coerce_recipe
from lmforge.stage import RunResult

FORMAT_VERSION = 2
COLUMNS = ["text", "domain", "id", "source"]
UNIT_LAYOUT = "units-v2"  # what a work unit holds: bump when it changes, so old work folders are not reused


def _fingerprint(recipe: PrepRecipe, units: list[Unit]) -> str:
    """Changes when anything that stage 1 reads or depends on changes (not split or mix settings)."""
    h = hashlib.sha256(UNIT_LAYOUT.encode())
    h.update(recipe.model_dump_json(include={"sources", "normalize", "filters", "code", "output"}).encode())
    h.update(recipe.dedup.model_dump_json(include={"num_perm", "ngram", "seed"}).encode())
    for unit in units:
        for p in unit.parts:
            st = os.stat(p.file)
            h.update(f"{unit.index}:{p.source}:{Path(p.file).resolve()}:{p.start}:{p.end}:{st.st_size}:"
                     f"{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _map(fn: Callable, tasks: list[tuple], num_proc: int, on_result: Callable) -> None:
    if num_proc == 1 or len(tasks) <= 1:
        for task in tasks:
            on_result(fn(*task))
        return
    # fork (as `datasets` does): workers inherit the imported modules — importing lmforge.data pulls in
    # torch, seconds per spawned worker — and use no threads of the parent.
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    with ProcessPoolExecutor(min(num_proc, len(tasks)), mp_context=ctx) as pool:
        for future in as_completed([pool.submit(fn, *task) for task in tasks]):
            on_result(future.result())


def _boilerplate(recipe: PrepRecipe, units: list[Unit]) -> dict[str, set]:
    counts: dict[str, Counter] = {}

    def merge(result):
        for domain, c in result.items():
            counts.setdefault(domain, Counter()).update(c)
    _map(count_unit_lines, [(recipe, u) for u in sorted(units, key=lambda u: -u.bytes)], recipe.num_proc, merge)
    threshold = recipe.normalize.boilerplate_min_docs
    return {d: {k for k, n in c.items() if n >= threshold} for d, c in counts.items()}


def _check_output(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not force:
        raise LmforgeError(f"{out}: already exists; pass --force to replace it")
    if out.is_file() or (any(out.iterdir()) and not (out / MARKER).exists()):
        raise LmforgeError(f"{out}: exists and is not a prep output folder; refusing to replace it")


def _load_rows(work: Path, units: list[Unit], num_perm: int) -> tuple[dict, np.ndarray, list[int]]:
    """The per-document columns of every unit (without text), and all signatures in one memmap."""
    tables = [pq.read_table(unit_paths(work, u.index)["rows"],
                            columns=["domain", "id", "src", "fixed", "words", "tokens", "exact", "valid", "shingles"])
              for u in units]
    sizes = [t.num_rows for t in tables]
    cols = {name: np.concatenate([t.column(name).to_numpy(zero_copy_only=False) for t in tables])
            if tables else np.zeros(0) for name in tables[0].column_names}
    sig = np.lib.format.open_memmap(work / "signatures.npy", "w+", np.uint32, (max(sum(sizes), 1), num_perm))
    at = 0
    for u, n in zip(units, sizes):
        sig[at:at + n] = np.load(unit_paths(work, u.index)["sig"], mmap_mode="r")
        at += n
    return cols, sig, sizes


@contextlib.contextmanager
def _discarded_on_bad_input(work: Path):
    """Bad input (an id missing or repeated) removes the work folder: resuming would meet it again."""
    try:
        yield
    except LmforgeError:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _shingle_sets(work: Path, units: list[Unit], counts: np.ndarray) -> ShingleSets:
    return ShingleSets([np.load(unit_paths(work, u.index)["sets"], mmap_mode="r") for u in units], counts)


def _filtered(work: Path, units: list[Unit]):
    """The documents the filters removed (id, source, src, domain, reason), over all units."""
    import pyarrow as pa  # only the filtered table needs the concatenation
    tables = [pq.read_table(unit_paths(work, u.index)["filtered"]) for u in units]
    return pa.concat_tables(tables) if tables else FILTERED_SCHEMA.empty_table()


def _check_unique_ids(recipe: PrepRecipe, ids: np.ndarray, src: np.ndarray) -> None:
    """Ids name documents in removed.jsonl and the output rows: two documents may not share one."""
    if not len(ids):
        return
    order = np.argsort(ids, kind="stable")
    same = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if not len(same):
        return
    first = order[same[0] + 1]
    i = int(src[first])
    where = (f"sources[{i}].id_column: '{recipe.sources[i].id_column}' is not unique"
             if recipe.sources[i].id_column else f"sources[{i}]: a file is read twice")
    raise LmforgeError(f"{where}: id {ids[first]!r} names more than one document")


def _sum_by(codes: np.ndarray, values: np.ndarray, mask: np.ndarray, names: list[str]) -> dict[str, int]:
    sums = np.bincount(codes[mask], weights=values[mask], minlength=len(names))
    return {d: int(sums[i]) for i, d in enumerate(names)}


def prep(recipe: Union[PrepRecipe, str, Path], *, force: bool = False, show_progress: bool = True,
         overrides: Union[list[str], tuple] = ()) -> RunResult:
    """Run the whole preparation (recipe object, YAML file or dict, plus `--set` style overrides); returns the
    dataset folder (train/ and validation/ Parquet shards) and its statistics (stats.json)."""
    recipe = coerce_recipe(recipe, overrides, PrepRecipe, load_prep_recipe)
    t0 = time.perf_counter()
    out = Path(recipe.output.dir)
    _check_output(out, force)
    if recipe.output.tokenizer and not (Path(recipe.output.tokenizer) / "tokenizer.json").is_file():
        raise LmforgeError(f"output.tokenizer: {recipe.output.tokenizer}: no tokenizer.json there")
    units, plan_events = plan_units(recipe.sources, recipe.shard_mb)
    if not units:
        raise LmforgeError("sources: every source is empty; nothing to prepare")
    work = out.parent / f".{out.name}.prep-work"
    key = _fingerprint(recipe, units)
    if work.exists() and not (work / f"key-{key}").exists():
        shutil.rmtree(work)  # left by a run with other inputs or settings: its units do not apply
    (work / "units").mkdir(parents=True, exist_ok=True)
    (work / f"key-{key}").touch()
    times: dict[str, float] = {}

    tick = time.perf_counter()
    boilerplate = _boilerplate(recipe, units) if recipe.normalize.boilerplate_min_docs else {}
    if boilerplate:
        times["boilerplate"] = time.perf_counter() - tick

    # Stage 1: per unit, resumable.
    tick = time.perf_counter()
    results: dict[int, dict] = {}
    todo = []
    for u in units:
        done = unit_paths(work, u.index)["stats"]
        if done.exists():
            results[u.index] = json.loads(done.read_text())
        else:
            todo.append(u)
    resumed = len(results)
    with _progress(show_progress, len(units), resumed) as advance:
        def collect(stats):
            results[stats["unit"]] = stats
            advance()
        todo.sort(key=lambda u: -u.bytes)  # biggest first: the last unit to finish is a small one
        with _discarded_on_bad_input(work):
            _map(process_unit, [(recipe, u, work, boilerplate) for u in todo], recipe.num_proc, collect)
    times["read, normalise, filter, sign"] = time.perf_counter() - tick

    # Stage 2: duplicates, survivors, split, mixing.
    tick = time.perf_counter()
    cols, sig, sizes = _load_rows(work, units, recipe.dedup.num_perm)
    filtered = _filtered(work, units)
    with _discarded_on_bad_input(work):
        _check_unique_ids(recipe, np.concatenate([cols["id"], filtered.column("id").to_numpy(zero_copy_only=False)]),
                          np.concatenate([cols["src"], filtered.column("src").to_numpy()]))
    domains = sorted({d for r in results.values() for d in r["before"]} | set(cols["domain"].tolist()))
    sets = _shingle_sets(work, units, cols["shingles"]) if recipe.dedup.verify else None
    plan = _decide(recipe, cols, sig, domains, sets)
    times["deduplicate, split, mix"] = time.perf_counter() - tick

    # Stage 3: write everything into a temporary folder, then swap it in.
    tick = time.perf_counter()
    tmp = work / "output"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "train").mkdir(parents=True)
    (tmp / "validation").mkdir()
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    examples = _duplicate_examples(plan, work, units, offsets, recipe.output.examples)
    _write_removed(tmp / "removed.jsonl", plan, cols, work, units, filtered)
    for u, lo, hi in zip(units, offsets[:-1], offsets[1:]):
        if hi == lo:
            continue
        table = pq.read_table(unit_paths(work, u.index)["rows"], columns=COLUMNS)
        take_train = np.repeat(np.arange(hi - lo), plan["repeats"][lo:hi])
        take_val = np.flatnonzero(plan["split"][lo:hi] == mix.VALIDATION)
        for name, take in (("train", take_train), ("validation", take_val)):
            if len(take):
                pq.write_table(table.take(take), tmp / name / f"part-{u.index:05d}.parquet")
    times["write"] = time.perf_counter() - tick

    stats = _stats(recipe, results, plan_events, domains, plan, resumed)
    stats["input_bytes"] = int(sum(r["bytes"] for r in results.values()))
    stats["seconds"] = time.perf_counter() - t0
    stats["mb_per_s"] = stats["input_bytes"] / 2**20 / max(stats["seconds"], 1e-9)
    stats["stage_seconds"] = times
    (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
    write_report(tmp, stats, examples, plots=recipe.output.plots)
    (tmp / MARKER).write_text(json.dumps({
        "format": FORMAT_VERSION, "name": recipe.name, "domains": domains, "splits": ["train", "validation"],
        "columns": COLUMNS, "recipe": recipe.model_dump(mode="json")}, indent=1))
    _swap_in(tmp, out)
    shutil.rmtree(work, ignore_errors=True)
    if show_progress:
        # rich loads only when there is something to show
        from rich.console import Console
        read = sum(s["before"].get("docs", 0) for s in stats["domains"].values())
        train = sum(s["train"]["docs"] for s in stats["domains"].values())
        val = sum(s["validation"]["docs"] for s in stats["domains"].values())
        Console(stderr=True).print(
            f"[bold]{recipe.name}[/]: kept {train + val:,} of {read:,} documents ({train:,} train, "
            f"{val:,} validation); {stats['input_bytes'] / 2**20:,.1f} MB at {stats['mb_per_s']:.2f} MB/s")
    return RunResult(out, stats)


def _decide(recipe: PrepRecipe, cols: dict, sig: np.ndarray, domains: list[str],
            sets: Optional[ShingleSets] = None) -> dict:
    """Per document: survives deduplication or not (and why), its split, its copies in the training stream."""
    n = len(cols["exact"])
    code = {d: i for i, d in enumerate(domains)}
    dom = np.array([code[d] for d in cols["domain"]], np.int64)
    fixed = np.array([{"": -1, "train": mix.TRAIN, "validation": mix.VALIDATION}[f] for f in cols["fixed"]],
                     np.int64)
    exact = cols["exact"].astype(np.uint64)
    d = recipe.dedup
    words = cols["words"].astype(np.int64)
    pairs, sims = (near_pairs(sig[:n], cols["valid"].astype(bool), d.threshold, d.bands, sets) if d.near
                   else (np.zeros((0, 2), np.int64), np.zeros(0)))
    survivors = mix.choose_survivors(exact, pairs, fixed == mix.VALIDATION, d.exact,
                                     cols["shingles"].astype(np.int64), sims)
    kept = survivors.kept
    s = recipe.split
    split = mix.assign_split(kept, dom, fixed, mix.uniform(exact, s.seed), s.validation_fraction, s.validation_count)
    tokens = cols["tokens"].astype(np.int64)
    train = split == mix.TRAIN
    measure = {"tokens": tokens, "words": words, "documents": np.ones(n, np.int64)}[recipe.mix.by]
    active = {dm: v for dm, v in _sum_by(dom, measure, train, domains).items() if v > 0}
    if not active:
        raise LmforgeError("no training documents survive the filters and deduplication; "
                           "relax the filters or add data")
    weights = mix.domain_weights(active, recipe.mix.temperature, recipe.mix.weights)
    total = sum(active.values())
    ratio_by_domain = {dm: weights[dm] * total / active[dm] for dm in active}
    ratio = np.array([ratio_by_domain.get(dm, 0.0) for dm in domains])[dom]
    draw = mix.uniform(np.arange(n, dtype=np.uint64), recipe.mix.seed + 7919)
    repeats = np.where(train, mix.repeat_counts(ratio, draw), 0) if recipe.mix.resample else train.astype(np.int64)
    return {"dom": dom, "words": words, "tokens": tokens, "kept": kept, "reasons": survivors.reasons,
            "duplicate_of": survivors.duplicate_of, "similarity": survivors.similarity,
            "cluster": survivors.cluster, "candidate_pairs_verified": bool(d.near and sets is not None),
            "near_pairs": int(len(pairs)), "split": split, "repeats": repeats,
            "weights": weights, "sizes": active, "ratios": ratio_by_domain}


def _swap_in(tmp: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _texts(work: Path, units: list[Unit], offsets: np.ndarray, rows: list[int]) -> dict[int, str]:
    texts: dict[int, str] = {}
    for u, lo, hi in zip(units, offsets[:-1], offsets[1:]):
        inside = [m for m in rows if lo <= m < hi]
        if inside:
            col = pq.read_table(unit_paths(work, u.index)["rows"], columns=["text"]).column("text")
            for m in inside:
                texts[m] = col[m - lo].as_py()
    return texts


def _duplicate_examples(plan: dict, work: Path, units: list[Unit], offsets: np.ndarray, limit: int) -> list[dict]:
    """The largest clusters (their first document and documents removed in them), with a few members' text."""
    cluster, kept = plan["cluster"], plan["kept"]
    if limit == 0:
        return []
    sizes = np.bincount(cluster, minlength=len(cluster))
    big = [c for c in np.argsort(-sizes, kind="stable")[:limit] if sizes[c] > 1]
    wanted = {}
    for c in big:
        others = [m for m in np.flatnonzero(cluster == c) if m != c and not kept[m]][:2]
        wanted[int(c)] = [int(c)] + [int(m) for m in others]
    texts = _texts(work, units, offsets, sorted({m for ms in wanted.values() for m in ms}))
    return [{"size": int(sizes[c]), "members": [
        {"kept": bool(kept[m]), "reason": plan["reasons"][m], "text": texts[m],
         "similarity": float(plan["similarity"][m])} for m in ms]} for c, ms in wanted.items()]


def _write_removed(path: Path, plan: dict, cols: dict, work: Path, units: list[Unit], filtered) -> None:
    """One JSON line per removed document: its id, source file, domain, reason, the kept document it
    duplicated and their similarity (null for filter removals)."""
    sources = np.concatenate([pq.read_table(unit_paths(work, u.index)["rows"], columns=["source"])
                              .column("source").to_numpy(zero_copy_only=False) for u in units])
    ids, dup_of, sim = cols["id"], plan["duplicate_of"], plan["similarity"]
    with open(path, "w", encoding="utf-8") as fh:
        for row in filtered.select(["id", "source", "domain", "reason"]).to_pylist():
            fh.write(json.dumps({**row, "duplicate_of": None, "similarity": None}, ensure_ascii=False) + "\n")
        for i in np.flatnonzero(~plan["kept"]).tolist():
            fh.write(json.dumps({"id": ids[i], "source": sources[i], "domain": cols["domain"][i],
                                 "reason": plan["reasons"][i], "duplicate_of": ids[dup_of[i]],
                                 "similarity": round(float(sim[i]), 4)}, ensure_ascii=False) + "\n")


def _stats(recipe: PrepRecipe, results: dict, plan_events: Counter, domains: list[str], plan: dict,
           resumed: int) -> dict:
    dom, words, tokens, kept = plan["dom"], plan["words"], plan["tokens"], plan["kept"]
    split, repeats, dup_reasons, cluster = plan["split"], plan["repeats"], plan["reasons"], plan["cluster"]
    weights, active, ratio_by_domain = plan["weights"], plan["sizes"], plan["ratios"]
    before: dict = {d: Counter() for d in domains}
    removed: dict = {d: Counter() for d in domains}
    events: Counter = Counter(plan_events)
    hist_before = {d: np.zeros(len(HIST_EDGES) - 1, np.int64) for d in domains}
    examples: dict = {d: {} for d in domains}
    for _, r in sorted(results.items()):
        for d, ex in r.get("examples", {}).items():
            for reason, text in ex.items():
                examples[d].setdefault(reason, text)
        for d, c in r["before"].items():
            before[d].update(c)
        for d, c in r["removed"].items():
            removed[d].update(c)
        events.update(r["events"])
        for d, h in r["hist"].items():
            hist_before[d] += np.asarray(h, np.int64)
    for i in np.flatnonzero(~kept):
        removed[domains[dom[i]]][dup_reasons[i]] += 1
    per_domain = {}
    for i, d in enumerate(domains):
        mine = dom == i
        part = {}
        for name, weight in (("train", split == mix.TRAIN), ("validation", split == mix.VALIDATION),
                             ("train_mixed", repeats)):
            w = np.where(mine, weight, 0).astype(np.int64)
            part[name] = {"docs": int(w.sum()), "words": int(w @ words), "tokens": int(w @ tokens)}
        per_domain[d] = {"before": {k: int(v) for k, v in before[d].items()}, **part,
                         "hist_before": hist_before[d].tolist(),
                         "hist_after": np.histogram(np.maximum(words[mine & kept], 1), HIST_EDGES)[0].tolist()}
    sizes = np.bincount(cluster, minlength=len(cluster))
    clusters = sizes[sizes > 1]
    natural = {d: v / sum(active.values()) for d, v in active.items()}
    return {
        "name": recipe.name, "num_proc": recipe.num_proc, "resumed_units": resumed,
        "tokens_counted_with": recipe.output.tokenizer or "regex \\w+|[^\\w\\s]",
        "domains": per_domain,
        "removed": {d: dict(c) for d, c in removed.items() if c},
        "removed_examples": {d: ex for d, ex in examples.items() if ex},
        "input_events": dict(events),
        "removed_documents": int(sum(sum(c.values()) for c in removed.values())),
        "removed_by_reason": dict(sum(removed.values(), Counter())),
        "duplicates": {"clusters": int(len(clusters)), "documents_in_clusters": int(clusters.sum()),
                       "near_pairs": plan["near_pairs"], "verified": plan["candidate_pairs_verified"],
                       "largest": int(clusters.max()) if len(clusters) else 0,
                       "size_counts": {int(k): int(v) for k, v in zip(*np.unique(clusters, return_counts=True))}},
        "mix": {d: {"size": int(active[d]), "natural": natural[d], "weight": weights[d],
                    "ratio": ratio_by_domain[d]} for d in active},
        "mix_by": recipe.mix.by,
        "hist_edges": HIST_EDGES.tolist(),
    }


class _progress:
    """A rich progress bar over work units (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, done: int):
        self.enabled, self.total, self.done = enabled, total, done

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        self.bar = Progress(TextColumn("[bold]prep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=Console(stderr=True))
        self.bar.__enter__()
        task = self.bar.add_task("units", total=self.total, completed=self.done)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
        return False
