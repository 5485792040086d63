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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmforge.errors import LmforgeError
from lmforge.paths import PREPARED_MARKER as MARKER
from lmforge.prep import mix
from lmforge.prep.config import PrepRecipe, load_prep_recipe
from lmforge.prep.dedup import ShingleSets, near_pairs
from lmforge.prep.read import Unit, part_bytes, plan_units
from lmforge.prep.report import write_report
from lmforge.prep.worker import (FILTERED_SCHEMA, HIST_EDGES, arrow_indices, column_numpy, count_unit_lines,
                                  process_unit, read_columns, unit_paths)
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
    tables = [read_columns(unit_paths(work, u.index)["rows"],
                            columns=["domain", "id", "src", "fixed", "words", "tokens", "exact", "valid", "shingles"])
              for u in units]
    sizes = [t.num_rows for t in tables]
    cols = {name: np.concatenate([column_numpy(t.column(name)) for t in tables])
            if tables else np.zeros(0) for name in tables[0].column_names}
    sig = np.lib.format.open_memmap(work / "signatures.npy", "w+", np.uint32, (max(sum(sizes), 1), num_perm))
    at = 0
    for u, n in zip(units, sizes):
        sig[at:at + n] = np.load(unit_paths(work, u.index)["sig"], mmap_mode="r")
        at += n
    return cols, sig, sizes


@contextlib.contextmanager
def discarded_on_bad_input(work: Path):
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
    tables = [read_columns(unit_paths(work, u.index)["filtered"]) for u in units]
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
    raise duplicate_id_error(recipe, ids[first], int(src[first]))


def duplicate_id_error(recipe: PrepRecipe, doc_id: str, i: int) -> LmforgeError:
    """The error for an id that names two documents (the second of them read from `sources[i]`)."""
    where = (f"sources[{i}].id_column: '{recipe.sources[i].id_column}' is not unique"
             if recipe.sources[i].id_column else f"sources[{i}]: a file is read twice")
    return LmforgeError(f"{where}: id {doc_id!r} names more than one document")


def _sum_by(codes: np.ndarray, values: np.ndarray, mask: np.ndarray, names: list[str]) -> dict[str, int]:
    sums = np.bincount(codes[mask], weights=values[mask], minlength=len(names))
    return {d: int(sums[i]) for i, d in enumerate(names)}


@dataclass
class Job:
    """One run's fixed inputs, whichever engine runs it: the recipe, output and work folders, work units."""
    recipe: PrepRecipe
    out: Path
    work: Path
    units: list[Unit]
    plan_events: Counter
    t0: float = field(default_factory=time.perf_counter)
    times: dict = field(default_factory=dict)  # stage → seconds, in the order the stages ran


def start(recipe: PrepRecipe, force: bool = False) -> Job:
    """Check the output folder and tokenizer, plan the work units and open the work folder (kept from an
    interrupted run with the same inputs and stage-1 settings, so its finished units are reused)."""
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
    return Job(recipe, out, work, units, plan_events, t0)


def finished_units(job: Job) -> tuple[dict[int, dict], list[Unit]]:
    """The counts of the units an earlier run finished, and the units still to do (biggest first: the last
    unit to finish is a small one)."""
    results: dict[int, dict] = {}
    todo = []
    for u in job.units:
        done = unit_paths(job.work, u.index)["stats"]
        if done.exists():
            results[u.index] = json.loads(done.read_text())
        else:
            todo.append(u)
    return results, sorted(todo, key=lambda u: -u.bytes)


def domains_of(results: dict[int, dict]) -> list[str]:
    """Every domain read, sorted: documents are coded by their position in this list."""
    return sorted({d for r in results.values() for d in r["before"]})


def fresh_output(work: Path) -> Path:
    """The temporary output folder, inside the work folder (moved into place by `finish`)."""
    tmp = work / "output"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "train").mkdir(parents=True)
    (tmp / "validation").mkdir()
    return tmp


@contextlib.contextmanager
def system_arrow_pool():
    """Arrow allocates from the C library's allocator for the duration: pyarrow's default mimalloc pool keeps
    the pages of the unit tables read and written (about 30 MB more peak memory on a 7 MB corpus). Buffers
    keep the pool they came from, so switching back afterwards is safe."""
    before = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(before)


def run_local(job: Job, show_progress: bool = True) -> RunResult:
    """Stage 1 in `num_proc` processes, stages 2 and 3 in this one (signatures in a memory-mapped file)."""
    with system_arrow_pool():
        return _run_local(job, show_progress)


def _run_local(job: Job, show_progress: bool = True) -> RunResult:
    recipe, work, units, times = job.recipe, job.work, job.units, job.times
    tick = time.perf_counter()
    boilerplate = _boilerplate(recipe, units) if recipe.normalize.boilerplate_min_docs else {}
    if boilerplate:
        times["boilerplate"] = time.perf_counter() - tick

    # Stage 1: per unit, resumable.
    tick = time.perf_counter()
    results, todo = finished_units(job)
    resumed = len(results)
    with progress(show_progress, len(units), resumed) as advance:
        def collect(stats):
            results[stats["unit"]] = stats
            advance()
        with discarded_on_bad_input(work):
            _map(process_unit, [(recipe, u, work, boilerplate) for u in todo], recipe.num_proc, collect)
    times["read, normalise, filter, sign"] = time.perf_counter() - tick

    # Stage 2: duplicates, survivors, split, mixing.
    tick = time.perf_counter()
    cols, sig, sizes = _load_rows(work, units, recipe.dedup.num_perm)
    filtered = _filtered(work, units)
    with discarded_on_bad_input(work):
        _check_unique_ids(recipe, np.concatenate([cols["id"], column_numpy(filtered.column("id"))]),
                          np.concatenate([cols["src"], column_numpy(filtered.column("src"))]))
    domains = domains_of(results)
    sets = _shingle_sets(work, units, cols["shingles"]) if recipe.dedup.verify else None
    plan = _decide(recipe, cols, sig, domains, sets)
    times["deduplicate, split, mix"] = time.perf_counter() - tick

    # Stage 3: write everything into a temporary folder, then swap it in.
    tick = time.perf_counter()
    tmp = fresh_output(work)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    examples = _duplicate_examples(plan, work, units, offsets, recipe.output.examples)
    _write_removed(tmp / "removed.jsonl", plan, cols, work, units, filtered)
    for u, lo, hi in zip(units, offsets[:-1], offsets[1:]):
        if hi > lo:
            write_unit_shards(tmp, work, u.index, plan["repeats"][lo:hi], plan["split"][lo:hi])
    times["write"] = time.perf_counter() - tick
    totals = doc_totals(domains, plan["dom"], plan["words"], plan["tokens"], plan["kept"], plan["reasons"],
                        plan["split"], plan["repeats"])
    sizes_of = Counter(np.bincount(plan["cluster"], minlength=len(plan["cluster"])).tolist())
    duplicates = duplicate_stats(sizes_of, plan["near_pairs"], plan["candidate_pairs_verified"])
    mixing = {k: plan[k] for k in ("weights", "sizes", "ratios")}
    stats = stats_of(recipe, results, job.plan_events, domains, totals, duplicates, mixing, resumed)
    return finish(job, tmp, stats, examples, show_progress)


def write_unit_shards(tmp: Path, work: Path, index: int, repeats: np.ndarray, split: np.ndarray) -> None:
    """One unit's kept documents into train/ (each repeated as the mixing says) and validation/."""
    table = read_columns(unit_paths(work, index)["rows"], columns=COLUMNS)
    take_train = np.repeat(np.arange(len(repeats)), repeats)
    take_val = np.flatnonzero(split == mix.VALIDATION)
    for name, take in (("train", take_train), ("validation", take_val)):
        if len(take):
            pq.write_table(table.take(arrow_indices(take)), tmp / name / f"part-{index:05d}.parquet")


def finish(job: Job, tmp: Path, stats: dict, examples: list[dict], show_progress: bool) -> RunResult:
    """stats.json, the report and the marker into the temporary folder, which then replaces the output."""
    recipe = job.recipe
    stats["input_bytes"] = int(sum(part_bytes(p) for u in job.units for p in u.parts))
    stats["seconds"] = time.perf_counter() - job.t0
    stats["mb_per_s"] = stats["input_bytes"] / 2**20 / max(stats["seconds"], 1e-9)
    stats["stage_seconds"] = job.times
    (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
    write_report(tmp, stats, examples, plots=recipe.output.plots)
    (tmp / MARKER).write_text(json.dumps({
        "format": FORMAT_VERSION, "name": recipe.name, "domains": list(stats["domains"]),
        "splits": ["train", "validation"], "columns": COLUMNS, "recipe": recipe.model_dump(mode="json")}, indent=1))
    _swap_in(tmp, job.out)
    shutil.rmtree(job.work, ignore_errors=True)
    if show_progress:
        # rich loads only when there is something to show
        from rich.console import Console
        read = sum(s["before"].get("docs", 0) for s in stats["domains"].values())
        train = sum(s["train"]["docs"] for s in stats["domains"].values())
        val = sum(s["validation"]["docs"] for s in stats["domains"].values())
        Console(stderr=True).print(
            f"[bold]{recipe.name}[/]: kept {train + val:,} of {read:,} documents ({train:,} train, "
            f"{val:,} validation); {stats['input_bytes'] / 2**20:,.1f} MB at {stats['mb_per_s']:.2f} MB/s")
    return RunResult(job.out, stats)


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
    active, weights, ratio_by_domain = mixing_plan(recipe, _sum_by(dom, measure, train, domains))
    repeats = training_repeats(recipe, domains, ratio_by_domain, dom, train, np.arange(n))
    return {"dom": dom, "words": words, "tokens": tokens, "kept": kept, "reasons": survivors.reasons,
            "duplicate_of": survivors.duplicate_of, "similarity": survivors.similarity,
            "cluster": survivors.cluster, "candidate_pairs_verified": bool(d.near and sets is not None),
            "near_pairs": int(len(pairs)), "split": split, "repeats": repeats,
            "weights": weights, "sizes": active, "ratios": ratio_by_domain}


def mixing_plan(recipe: PrepRecipe, train_sizes: dict[str, int]) -> tuple[dict, dict, dict]:
    """From each domain's training size (in `mix.by` units): the domains with data, their weights, and how many
    copies of each of its training documents the stream gets on average."""
    active = {dm: v for dm, v in train_sizes.items() if v > 0}
    if not active:
        raise LmforgeError("no training documents survive the filters and deduplication; "
                           "relax the filters or add data")
    weights = mix.domain_weights(active, recipe.mix.temperature, recipe.mix.weights)
    total = sum(active.values())
    return active, weights, {dm: weights[dm] * total / active[dm] for dm in active}


def training_repeats(recipe: PrepRecipe, domains: list[str], ratio_by_domain: dict, dom: np.ndarray,
                     train: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Copies of each document in the training stream: seeded by its position in the input (`index`), so any
    slice of the documents gets the counts the whole would."""
    if not recipe.mix.resample:
        return train.astype(np.int64)
    ratio = np.array([ratio_by_domain.get(dm, 0.0) for dm in domains])[dom]
    draw = mix.uniform(index.astype(np.uint64), recipe.mix.seed + 7919)
    return np.where(train, mix.repeat_counts(ratio, draw), 0)


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
            col = read_columns(unit_paths(work, u.index)["rows"], columns=["text"]).column("text")
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
    shown = [(int(sizes[c]), [int(c)] + [int(m) for m in np.flatnonzero(cluster == c) if m != c and not kept[m]][:2])
             for c in big]
    members = {m: (bool(kept[m]), plan["reasons"][m], float(plan["similarity"][m])) for _, ms in shown for m in ms}
    return duplicate_examples(work, units, offsets, shown, members)


def duplicate_examples(work: Path, units: list[Unit], offsets: np.ndarray, shown: list[tuple[int, list[int]]],
                       members: dict[int, tuple]) -> list[dict]:
    """The report's cluster examples: (size, member documents) per cluster, each member's (kept, reason,
    similarity), and the members' text read from the work units."""
    texts = _texts(work, units, offsets, sorted(members))
    return [{"size": size, "members": [
        {"kept": members[m][0], "reason": members[m][1], "text": texts[m], "similarity": members[m][2]}
        for m in ms]} for size, ms in shown]


def filtered_lines(filtered) -> Iterator[str]:
    """removed.jsonl's lines for the documents the filters removed (a table: id, source, domain, reason)."""
    for row in filtered.select(["id", "source", "domain", "reason"]).to_pylist():
        yield json.dumps({**row, "duplicate_of": None, "similarity": None}, ensure_ascii=False) + "\n"


def duplicate_line(doc_id: str, source: str, domain: str, reason: str, duplicate_of: str, sim: float) -> str:
    """removed.jsonl's line for a duplicate: the kept document it copies and their similarity."""
    return json.dumps({"id": doc_id, "source": source, "domain": domain, "reason": reason,
                       "duplicate_of": duplicate_of, "similarity": round(float(sim), 4)}, ensure_ascii=False) + "\n"


def _write_removed(path: Path, plan: dict, cols: dict, work: Path, units: list[Unit], filtered) -> None:
    """One JSON line per removed document: filter removals first, then duplicates in input order."""
    sources = np.concatenate([column_numpy(read_columns(unit_paths(work, u.index)["rows"], ["source"]).column(0))
                              for u in units])
    ids, dup_of, sim = cols["id"], plan["duplicate_of"], plan["similarity"]
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(filtered_lines(filtered))
        for i in np.flatnonzero(~plan["kept"]).tolist():
            fh.write(duplicate_line(ids[i], sources[i], cols["domain"][i], plan["reasons"][i], ids[dup_of[i]],
                                    sim[i]))


def doc_totals(domains: list[str], dom: np.ndarray, words: np.ndarray, tokens: np.ndarray, kept: np.ndarray,
               reasons: list, split: np.ndarray, repeats: np.ndarray) -> dict:
    """The per-document sums of stats.json over some of the documents: the totals of slices add up
    (`add_totals`) to the totals of the whole."""
    removed: dict = {d: Counter() for d in domains}
    for i in np.flatnonzero(~kept):
        removed[domains[dom[i]]][reasons[i]] += 1
    parts, hist = {}, {}
    for i, d in enumerate(domains):
        mine = dom == i
        parts[d] = {}
        for name, weight in (("train", split == mix.TRAIN), ("validation", split == mix.VALIDATION),
                             ("train_mixed", repeats)):
            w = np.where(mine, weight, 0).astype(np.int64)
            parts[d][name] = {"docs": int(w.sum()), "words": int(w @ words), "tokens": int(w @ tokens)}
        hist[d] = np.histogram(np.maximum(words[mine & kept], 1), HIST_EDGES)[0]
    return {"removed": removed, "parts": parts, "hist_after": hist}


def add_totals(total: dict, more: dict) -> dict:
    for d, c in more["removed"].items():
        total["removed"][d].update(c)
    for d, part in more["parts"].items():
        for name, sums in part.items():
            for key, v in sums.items():
                total["parts"][d][name][key] += v
    for d, h in more["hist_after"].items():
        total["hist_after"][d] = total["hist_after"][d] + h
    return total


def duplicate_stats(cluster_sizes: Counter, near_pairs: int, verified: bool) -> dict:
    """stats.json's duplicates section from how many clusters have each size."""
    sizes = {int(k): int(v) for k, v in sorted(cluster_sizes.items()) if k > 1}
    return {"clusters": sum(sizes.values()), "documents_in_clusters": sum(k * v for k, v in sizes.items()),
            "near_pairs": int(near_pairs), "verified": bool(verified), "largest": max(sizes, default=0),
            "size_counts": sizes}


def stats_of(recipe: PrepRecipe, results: dict, plan_events: Counter, domains: list[str], totals: dict,
           duplicates: dict, mixing: dict, resumed: int) -> dict:
    weights, active, ratio_by_domain = mixing["weights"], mixing["sizes"], mixing["ratios"]
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
    for d, c in totals["removed"].items():
        removed[d].update(c)
    per_domain = {d: {"before": {k: int(v) for k, v in before[d].items()}, **totals["parts"][d],
                      "hist_before": hist_before[d].tolist(), "hist_after": totals["hist_after"][d].tolist()}
                  for d in domains}
    natural = {d: v / sum(active.values()) for d, v in active.items()}
    return {
        "name": recipe.name, "engine": recipe.engine, "num_proc": recipe.num_proc, "resumed_units": resumed,
        "tokens_counted_with": recipe.output.tokenizer or "regex \\w+|[^\\w\\s]",
        "domains": per_domain,
        "removed": {d: dict(c) for d, c in removed.items() if c},
        "removed_examples": {d: ex for d, ex in examples.items() if ex},
        "input_events": dict(events),
        "removed_documents": int(sum(sum(c.values()) for c in removed.values())),
        "removed_by_reason": dict(sum(removed.values(), Counter())),
        "duplicates": duplicates,
        "mix": {d: {"size": int(active[d]), "natural": natural[d], "weight": weights[d],
                    "ratio": ratio_by_domain[d]} for d in active},
        "mix_by": recipe.mix.by,
        "hist_edges": HIST_EDGES.tolist(),
    }


class progress:
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
