"""The ray engine of `lmforge prep`: the local engine's stages as Ray Data operations, so the workers of a
cluster share them and no process holds every document's signature, candidate pair or decision.

Each stage calls the local engine's own functions (`process_unit`, `band_keys`, `true_similarity`,
`choose_survivors`, `assign_split`, `training_repeats`, `doc_totals`), so both engines give the same
dataset by construction. What each stage moves between workers is in brackets:

1. per work unit, `process_unit` — read, normalise, filter, exact hash, MinHash — as a map over the units;
   its files land in the work folder, which every node must see (as the output folder). Boilerplate lines
   first, if asked for: line counts per unit, summed by a groupby on (domain, line) [line counts].
2. ids: a groupby on the id [one id per document], to find an id that names two documents.
3. candidates: each document's LSH band keys (a map), grouped by (band, key) [bands × documents, in
   partitions of at most about 128 MB, one per CPU at least]; exact keys are grouped in the same shuffle.
   A bucket gives the pairs the local engine forms from it.
4. verification: pairs grouped by their first document [candidate pairs], each checked with the true Jaccard
   of the n-gram sets (or the MinHash estimate), read memory-mapped from the work units.
5. clusters: connected components of the pair edges by min-label propagation, one groupby per round [the
   documents in some pair]; then each document's kept-rule attributes, grouped by work unit.
6. survivors: documents grouped by component, where the local rule runs on the component alone — its
   decisions never depend on documents outside it — then grouped by work unit [documents in clusters].
7. split, mixing sizes, repeats, shards: maps over the work units (two or three passes of a few columns).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmforge.errors import LmforgeError
from lmforge.prep import mix
from lmforge.prep.config import PrepRecipe
from lmforge.prep.pipeline import (Job, add_totals, discarded_on_bad_input, doc_totals, domains_of, duplicate_line,
                                   duplicate_stats, filtered_lines, finish, finished_units, fresh_output,
                                   mixing_plan, progress, stats_of, training_repeats, write_unit_shards)
from lmforge.prep.ray_graph import (FIXED, Ctx, by_key, check_unique_ids, cluster_sizes, decisions_path, edges,
                                    examples, same_as_previous, save_decisions, survivors, unit_rows)
from lmforge.prep.read import Unit
from lmforge.prep.worker import count_unit_lines, process_unit, unit_paths
from lmforge.stage import RunResult


@contextlib.contextmanager
def connected(address: Optional[str], num_cpus: int):
    """A Ray to run on: the one this process already joined, the cluster at `address`, or one started here
    with `num_cpus` CPUs (shut down afterwards)."""
    try:
        import ray  # the optional `ray` extra, seconds to import: loaded only when the ray engine runs
    except ImportError:
        raise LmforgeError("engine: 'ray' needs Ray Data, an optional extra: pip install 'lmforge[ray]'") from None
    if address:
        _check_reachable(address)
    if ray.is_initialized():
        yield
        return
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **quiet)  # never a stale cluster
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as err:
        raise LmforgeError(f"--address {address}: no Ray cluster answers there ({str(err).splitlines()[0]})") from None
    try:
        yield
    finally:
        ray.shutdown()


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds on an address where nothing listens: Ray itself retries for minutes."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise LmforgeError(f"--address {address}: expected HOST:PORT of a Ray head node (e.g. 10.0.0.5:6379)")
    try:
        socket.create_connection((host, int(port)), timeout).close()
    except OSError as err:
        raise LmforgeError(f"--address {address}: no Ray cluster answers there ({err.strerror or err})") from None


def run(job: Job, show_progress: bool = True) -> RunResult:
    """The whole preparation on the Ray this process is connected to (see `connected`)."""
    import ray  # the optional extra, as in `connected`
    data = ray.data.DataContext.get_current()
    data.enable_progress_bars = False
    # Shuffles as tasks on the worker pool: the hash shuffle's aggregators are new processes per groupby, and
    # each pays for importing lmforge again.
    data.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # one line per execution otherwise
    cpus = int(ray.cluster_resources().get("CPU", 1))
    recipe, work, times = job.recipe, job.work, job.times
    parts = max(2, cpus)
    units = ray.data.from_items([{"unit": u.index} for u in job.units], override_num_blocks=len(job.units))

    tick = time.perf_counter()
    boilerplate = _boilerplate(recipe, job.units, units, parts) if recipe.normalize.boilerplate_min_docs else {}
    if boilerplate:
        times["boilerplate"] = time.perf_counter() - tick
    tick = time.perf_counter()
    results, todo = finished_units(job)
    resumed = len(results)
    with discarded_on_bad_input(work):
        results.update(_process_units(ray, recipe, work, todo, boilerplate, show_progress, len(job.units), resumed))
    times["read, normalise, filter, sign"] = time.perf_counter() - tick

    offsets = np.concatenate([[0], np.cumsum([results[u.index]["rows"] for u in job.units])]).astype(int).tolist()
    ctx = Ctx(recipe, str(work.resolve()), job.units, offsets, domains_of(results), uuid.uuid4().hex)
    kw = {"fn_kwargs": {"ctx": ctx}}
    tick = time.perf_counter()
    with discarded_on_bad_input(work):
        check_unique_ids(ctx, units, parts)
    times["ids (shuffle)"] = time.perf_counter() - tick

    tick = time.perf_counter()
    linked = edges(ctx, units, parts)
    near_pairs = int(linked.sum("near") or 0) if linked is not None else 0
    times["candidate pairs, verification (shuffles)"] = time.perf_counter() - tick
    tick = time.perf_counter()
    decisions, rounds = survivors(ctx, linked, parts) if linked is not None else (None, 0)
    times[f"clusters ({rounds} rounds), survivors (shuffles)"] = time.perf_counter() - tick

    tick = time.perf_counter()
    for name in ("decisions", "removed"):  # an interrupted run's may hold other settings' answers
        shutil.rmtree(work / name, ignore_errors=True)
        (work / name).mkdir()
    if decisions is not None:
        decisions.groupby("unit", num_partitions=parts).map_groups(save_decisions, batch_format="pyarrow",
                                                                   **kw).materialize()
    held = _held_out(ctx, units) if recipe.split.validation_count is not None else None
    sizes = Counter()
    for row in units.map_batches(_train_sizes, batch_size=1, fn_kwargs={"ctx": ctx, "held": held}).iter_rows():
        sizes.update(json.loads(row["sizes"]))
    active, weights, ratios = mixing_plan(recipe, {d: sizes.get(d, 0) for d in ctx.domains})
    tmp = fresh_output(work).resolve()
    written = units.map_batches(_write_unit, batch_size=1,
                                fn_kwargs={"ctx": ctx, "held": held, "ratios": ratios, "tmp": str(tmp)})
    totals = doc_totals(ctx.domains, *(np.zeros(0, np.int64),) * 3, np.zeros(0, bool), [], np.zeros(0), np.zeros(0))
    for row in sorted(written.take_all(), key=lambda r: r["unit"]):
        add_totals(totals, _totals_from_json(row["totals"]))
    _write_removed(tmp / "removed.jsonl", work, job.units)
    times["split, mix, write"] = time.perf_counter() - tick

    duplicates = duplicate_stats(cluster_sizes(decisions), near_pairs, recipe.dedup.near and recipe.dedup.verify)
    shown = examples(ctx, decisions)
    mixing = {"weights": weights, "sizes": active, "ratios": ratios}
    stats = stats_of(recipe, results, job.plan_events, ctx.domains, totals, duplicates, mixing, resumed)
    stats["ray_cpus"] = cpus
    return finish(job, tmp, stats, shown, show_progress)


# ---------------------------------------------------------------- stage 1: work units


def _boilerplate(recipe: PrepRecipe, plan: list[Unit], units, parts: int) -> dict[str, set]:
    counted = units.map_batches(_line_counts, batch_size=1,
                                fn_kwargs={"recipe": recipe, "plan": plan, "cwd": os.getcwd()})
    frequent = by_key(counted, ["domain", "key"], _frequent_lines, parts,
                       threshold=recipe.normalize.boilerplate_min_docs)
    lines: dict[str, set] = {}
    for row in frequent.iter_rows():
        lines.setdefault(row["domain"], set()).add(int(row["key"]))
    return lines


def _line_counts(batch: dict, recipe: PrepRecipe, plan: list[Unit], cwd: str) -> dict:
    os.chdir(cwd)  # the recipe's paths are relative to the driver's folder; a worker starts elsewhere
    counts = count_unit_lines(recipe, plan[int(batch["unit"][0])])
    rows = [(d, k, n) for d, c in counts.items() for k, n in c.items()]
    return {"domain": np.array([r[0] for r in rows], dtype=object),
            "key": np.array([r[1] for r in rows], np.uint64), "n": np.array([r[2] for r in rows], np.int64)}


def _frequent_lines(group: pa.Table, threshold: int) -> pa.Table:
    t = group.sort_by([("domain", "ascending"), ("key", "ascending")])
    domain = np.asarray(t.column("domain").to_pylist(), dtype=object)
    first = np.flatnonzero(~same_as_previous(domain, t.column("key").to_numpy()))
    total = np.add.reduceat(t.column("n").to_numpy(), first) if len(first) else np.zeros(0, np.int64)
    return t.take(pa.array(first[total >= threshold], pa.int64())).select(["domain", "key"])


def _process_units(ray, recipe: PrepRecipe, work: Path, todo: list[Unit], boilerplate: dict, show_progress: bool,
                   total: int, resumed: int) -> dict[int, dict]:
    """`process_unit` on every unit still to do, as a map; bad input (an id column missing) comes back as
    the worker's error message, raised here."""
    results = {}
    if not todo:
        return results
    ds = ray.data.from_items([{"unit": u.index} for u in todo], override_num_blocks=len(todo))
    done = ds.map_batches(_process_unit_task, batch_size=1,
                          fn_kwargs={"recipe": recipe, "work": str(work.resolve()), "cwd": os.getcwd(),
                                     "plan": {u.index: u for u in todo}, "boilerplate": boilerplate})
    with progress(show_progress, total, resumed) as advance:
        for row in done.iter_rows():
            if row["error"]:
                raise LmforgeError(row["error"])
            stats = json.loads(row["stats"])
            results[stats["unit"]] = stats
            advance()
    return results


def _process_unit_task(batch: dict, recipe: PrepRecipe, work: str, cwd: str, plan: dict, boilerplate: dict) -> dict:
    os.chdir(cwd)  # as in `_line_counts`
    try:
        stats, error = json.dumps(process_unit(recipe, plan[int(batch["unit"][0])], Path(work), boilerplate)), ""
    except LmforgeError as err:
        stats, error = "", str(err)
    return {"stats": np.array([stats], dtype=object), "error": np.array([error], dtype=object)}


# ---------------------------------------------------------------- split, mixing, shards


def _unit_plan(ctx: Ctx, unit: int, held: Optional[np.ndarray]) -> dict:
    """A unit's documents with their decisions and split."""
    cols = unit_rows(ctx, unit, ["domain", "id", "source", "fixed", "words", "tokens", "exact"])
    n = len(cols["idx"])
    code = {d: i for i, d in enumerate(ctx.domains)}
    cols["dom"] = np.array([code[d] for d in cols["domain"]], np.int64)
    fixed = np.array([FIXED[f] for f in cols["fixed"]], np.int64)
    cols["kept"], cols["reasons"] = np.ones(n, bool), [None] * n
    cols["dup_id"], cols["sim"] = [""] * n, np.full(n, np.nan)
    path = decisions_path(ctx, unit)
    if path.exists():
        dec = pq.read_table(path).to_pydict()
        for i, kept, dup, reason, sim in zip(dec["idx"], dec["kept"], dec["dup_id"], dec["reason"], dec["sim"]):
            row = i - ctx.offsets[unit]
            cols["kept"][row], cols["reasons"][row], cols["dup_id"][row], cols["sim"][row] = kept, reason or None, dup, sim
    s = ctx.recipe.split
    cols["u"] = mix.uniform(cols["exact"].astype(np.uint64), s.seed)
    cols["free"] = cols["kept"] & (fixed < 0)
    held_mask = np.isin(cols["idx"], held) if held is not None else None
    cols["split"] = mix.assign_split(cols["kept"], cols["dom"], fixed, cols["u"], s.validation_fraction,
                                     s.validation_count, held_mask)
    return cols


def _held_out(ctx: Ctx, units) -> np.ndarray:
    """`split.validation_count`: each domain's free documents with the smallest draw, chosen from each unit's
    own smallest (a few per domain and unit, gathered here)."""
    found = units.map_batches(_held_out_candidates, batch_size=1, fn_kwargs={"ctx": ctx}).take_all()
    found.sort(key=lambda r: r["idx"])
    idx = np.array([r["idx"] for r in found], np.int64)
    dom = np.array([r["dom"] for r in found], np.int64)
    u = np.array([r["u"] for r in found], np.float64)
    return np.sort(idx[mix.smallest_per_domain(np.arange(len(idx)), dom, u, ctx.recipe.split.validation_count)])


def _held_out_candidates(batch: dict, ctx: Ctx) -> dict:
    cols = _unit_plan(ctx, int(batch["unit"][0]), np.zeros(0, np.int64))
    chosen = mix.smallest_per_domain(np.flatnonzero(cols["free"]), cols["dom"], cols["u"],
                                     ctx.recipe.split.validation_count)
    return {"idx": cols["idx"][chosen], "dom": cols["dom"][chosen], "u": cols["u"][chosen]}


def _measure(ctx: Ctx, cols: dict) -> np.ndarray:
    return {"tokens": cols["tokens"], "words": cols["words"], "documents": np.ones(len(cols["idx"]), np.int64)
            }[ctx.recipe.mix.by].astype(np.int64)


def _train_sizes(batch: dict, ctx: Ctx, held: Optional[np.ndarray]) -> dict:
    cols = _unit_plan(ctx, int(batch["unit"][0]), held)
    train = cols["split"] == mix.TRAIN
    sizes = {d: int(_measure(ctx, cols)[train & (cols["dom"] == i)].sum()) for i, d in enumerate(ctx.domains)}
    return {"sizes": np.array([json.dumps(sizes)], dtype=object)}


def _write_unit(batch: dict, ctx: Ctx, held: Optional[np.ndarray], ratios: dict, tmp: str) -> dict:
    """A unit's train and validation shards, its duplicates' removed.jsonl lines, and its stats totals."""
    unit = int(batch["unit"][0])
    cols = _unit_plan(ctx, unit, held)
    repeats = training_repeats(ctx.recipe, ctx.domains, ratios, cols["dom"], cols["split"] == mix.TRAIN,
                               cols["idx"])
    if len(cols["idx"]):
        write_unit_shards(Path(tmp), Path(ctx.work), unit, repeats, cols["split"])
    gone = np.flatnonzero(~cols["kept"])
    if len(gone):
        with open(Path(ctx.work) / "removed" / f"unit-{unit:05d}.jsonl", "w", encoding="utf-8") as fh:
            for i in gone.tolist():
                fh.write(duplicate_line(cols["id"][i], cols["source"][i], cols["domain"][i], cols["reasons"][i],
                                        cols["dup_id"][i], cols["sim"][i]))
    totals = doc_totals(ctx.domains, cols["dom"], cols["words"].astype(np.int64), cols["tokens"].astype(np.int64),
                        cols["kept"], cols["reasons"], cols["split"], repeats)
    return {"unit": np.array([unit]), "totals": np.array([_totals_to_json(totals)], dtype=object)}


def _totals_to_json(totals: dict) -> str:
    return json.dumps({"removed": {d: dict(c) for d, c in totals["removed"].items()}, "parts": totals["parts"],
                       "hist_after": {d: h.tolist() for d, h in totals["hist_after"].items()}})


def _totals_from_json(text: str) -> dict:
    t = json.loads(text)
    return {"removed": {d: Counter(c) for d, c in t["removed"].items()}, "parts": t["parts"],
            "hist_after": {d: np.asarray(h, np.int64) for d, h in t["hist_after"].items()}}


def _write_removed(path: Path, work: Path, units: list[Unit]) -> None:
    """removed.jsonl as the local engine writes it: filter removals of every unit, then duplicates in order."""
    with open(path, "w", encoding="utf-8") as fh:
        for u in units:
            fh.writelines(filtered_lines(pq.read_table(unit_paths(work, u.index)["filtered"])))
        for u in units:
            part = work / "removed" / f"unit-{u.index:05d}.jsonl"
            if part.exists():
                with open(part, encoding="utf-8") as src:
                    shutil.copyfileobj(src, fh)
