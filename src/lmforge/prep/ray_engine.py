"""The ray engine of `lmforge prep`: the local engine's stages as Ray Data operations, so the workers of a
cluster share them and no process holds every document's signature, candidate pair or decision.

Each stage calls the local engine's own functions (`process_unit`, `band_keys`, `true_similarity`,
`choose_survivors`, `assign_split`, `training_repeats`, `doc_totals`), so both engines give the same
dataset by construction. What each stage moves between workers is in brackets:

1. per work unit, `process_unit` — read, normalise, filter, exact hash, MinHash — as a map over the units;
   its files land in the work folder, which every node must see (as the output folder). Boilerplate lines
   first, if asked for: line counts per unit, summed by a groupby on (domain, line) [line counts].
2. ids: a groupby on the id [one id per document], to find an id that names two documents.
3. candidates: each document's LSH band keys (a map), grouped by (band, key) [bands × documents]; exact keys
   are grouped in the same shuffle. A bucket gives the pairs the local engine forms from it.
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
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from lmforge.errors import LmforgeError
from lmforge.prep import mix
from lmforge.prep.config import PrepRecipe
from lmforge.prep.dedup import band_keys, band_layout, run_pairs, similarity, true_similarity
from lmforge.prep.pipeline import (Job, add_totals, discarded_on_bad_input, doc_totals, domains_of,
                                   duplicate_examples, duplicate_id_error, duplicate_line, duplicate_stats,
                                   filtered_lines, finish, finished_units, fresh_output, mixing_plan, progress,
                                   stats_of, training_repeats, write_unit_shards)
from lmforge.prep.read import Unit
from lmforge.prep.worker import count_unit_lines, process_unit, unit_paths
from lmforge.stage import RunResult

FIXED = {"": -1, "train": mix.TRAIN, "validation": mix.VALIDATION}


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


@dataclass
class _Ctx:
    """What every task needs: small and picklable (no per-document data)."""
    recipe: PrepRecipe
    work: str
    units: list[Unit]
    offsets: list[int]  # the global index of each unit's first document; the total last
    domains: list[str]
    run: str  # names this run in per-process caches (a later run may reuse the work folder's names)


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
    ctx = _Ctx(recipe, str(work.resolve()), job.units, offsets, domains_of(results), uuid.uuid4().hex)
    kw = {"fn_kwargs": {"ctx": ctx}}
    tick = time.perf_counter()
    with discarded_on_bad_input(work):
        _check_unique_ids(ctx, units, parts)
    times["ids (shuffle)"] = time.perf_counter() - tick

    tick = time.perf_counter()
    edges = _edges(ctx, units, parts)
    near_pairs = int(edges.sum("near") or 0) if edges is not None else 0
    times["candidate pairs, verification (shuffles)"] = time.perf_counter() - tick
    tick = time.perf_counter()
    decisions, rounds = _survivors(ctx, edges, parts) if edges is not None else (None, 0)
    times[f"clusters ({rounds} rounds), survivors (shuffles)"] = time.perf_counter() - tick

    tick = time.perf_counter()
    for name in ("decisions", "removed"):  # an interrupted run's may hold other settings' answers
        shutil.rmtree(work / name, ignore_errors=True)
        (work / name).mkdir()
    if decisions is not None:
        decisions.groupby("unit", num_partitions=parts).map_groups(_save_decisions, batch_format="pyarrow",
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

    duplicates = duplicate_stats(_cluster_sizes(decisions), near_pairs, recipe.dedup.near and recipe.dedup.verify)
    examples = _examples(ctx, decisions)
    mixing = {"weights": weights, "sizes": active, "ratios": ratios}
    stats = stats_of(recipe, results, job.plan_events, ctx.domains, totals, duplicates, mixing, resumed)
    stats["ray_cpus"] = cpus
    return finish(job, tmp, stats, examples, show_progress)


# ---------------------------------------------------------------- stage 1: work units


def _boilerplate(recipe: PrepRecipe, plan: list[Unit], units, parts: int) -> dict[str, set]:
    counted = units.map_batches(_line_counts, batch_size=1,
                                fn_kwargs={"recipe": recipe, "plan": plan, "cwd": os.getcwd()})
    frequent = _by_key(counted, ["domain", "key"], _frequent_lines, parts,
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
    first = np.flatnonzero(~_same_as_previous(domain, t.column("key").to_numpy()))
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


# ---------------------------------------------------------------- per-unit columns


def _unit_rows(ctx: _Ctx, unit: int, columns: list[str]) -> dict:
    table = pq.read_table(unit_paths(Path(ctx.work), unit)["rows"], columns=columns)
    cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in columns}
    cols["idx"] = ctx.offsets[unit] + np.arange(table.num_rows, dtype=np.int64)
    return cols


def _unit_of(ctx: _Ctx, idx: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.asarray(ctx.offsets), idx, side="right") - 1


@lru_cache(maxsize=32)
def _unit_sets(run: str, work: str, unit: int) -> tuple[np.ndarray, np.ndarray]:
    """A unit's sorted n-gram sets (memory-mapped) and where each document's begins."""
    counts = pq.read_table(unit_paths(Path(work), unit)["rows"], columns=["shingles"]).column(0).to_numpy()
    return np.load(unit_paths(Path(work), unit)["sets"], mmap_mode="r"), np.cumsum(counts) - counts


@lru_cache(maxsize=32)
def _unit_signatures(run: str, work: str, unit: int) -> np.ndarray:
    return np.load(unit_paths(Path(work), unit)["sig"], mmap_mode="r")


class _Sets:
    """`ShingleSets.get` over the work units, by global document index (what `true_similarity` reads)."""

    def __init__(self, ctx: _Ctx):
        self.ctx = ctx

    def get(self, i: int) -> np.ndarray:
        u = int(_unit_of(self.ctx, np.int64(i)))
        sets, starts = _unit_sets(self.ctx.run, self.ctx.work, u)
        row = i - self.ctx.offsets[u]
        end = starts[row + 1] if row + 1 < len(starts) else len(sets)
        return sets[starts[row]:end]


class _Signatures:
    """Signature rows by global document index (what `similarity` reads)."""

    def __init__(self, ctx: _Ctx):
        self.ctx = ctx

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        units = _unit_of(self.ctx, idx)
        return np.stack([_unit_signatures(self.ctx.run, self.ctx.work, int(u))[i - self.ctx.offsets[u]]
                         for i, u in zip(idx.tolist(), units.tolist())])


# ---------------------------------------------------------------- ids


def _check_unique_ids(ctx: _Ctx, units, parts: int) -> None:
    ids = units.map_batches(_unit_ids, batch_size=1, fn_kwargs={"ctx": ctx})
    first = _by_key(ids, ["id"], _second_of_repeated_ids, parts).sort("id").take(1)
    if first:
        raise duplicate_id_error(ctx.recipe, first[0]["id"], int(first[0]["src"]))


def _unit_ids(batch: dict, ctx: _Ctx) -> dict:
    """Ids in the local engine's order: kept documents by index (kind 0), then filtered ones by unit (kind 1)."""
    unit = int(batch["unit"][0])
    kept = _unit_rows(ctx, unit, ["id", "src"])
    filtered = pq.read_table(unit_paths(Path(ctx.work), unit)["filtered"], columns=["id", "src"])
    n = filtered.num_rows
    return {"id": np.concatenate([kept["id"], filtered.column("id").to_numpy(zero_copy_only=False)]).astype(object),
            "src": np.concatenate([kept["src"], filtered.column("src").to_numpy()]).astype(np.int64),
            "kind": np.repeat(np.array([0, 1], np.int64), [len(kept["idx"]), n]),
            "pos": np.concatenate([kept["idx"], (unit << 32) + np.arange(n, dtype=np.int64)])}


def _second_of_repeated_ids(group: pa.Table) -> pa.Table:
    """For each id met more than once, its second document in the local engine's order."""
    t = group.sort_by([("id", "ascending"), ("kind", "ascending"), ("pos", "ascending")])
    ids = np.asarray(t.column("id").to_pylist(), dtype=object)
    same = _same_as_previous(ids)
    second = same & ~np.concatenate([[False], same[:-1]])
    return t.filter(pa.array(second)).select(["id", "src"])


def _same_as_previous(*columns: np.ndarray) -> np.ndarray:
    """Per row of sorted columns: whether it has the previous row's values."""
    n = len(columns[0])
    same = np.ones(max(n - 1, 0), bool)
    for c in columns:
        same &= c[1:] == c[:-1]
    return np.concatenate([[False], same])[:n]


def _by_key(ds, keys: list[str], fn, parts: int, **fn_kwargs):
    """Rows with equal `keys` brought together by a shuffle: the keys are hashed into `parts` partitions, grouped
    on the partition, and `fn` gets all keys of a partition at once (vectorised: a call per key is far slower)."""
    tagged = ds.map_batches(_tag_partition, batch_format="pyarrow", fn_kwargs={"keys": keys, "parts": parts})
    return tagged.groupby("part", num_partitions=parts).map_groups(fn, batch_format="pyarrow", fn_kwargs=fn_kwargs)


def _tag_partition(batch: pa.Table, keys: list[str], parts: int) -> pa.Table:
    h = np.zeros(batch.num_rows, np.uint64)
    for key in keys:
        col = batch.column(key)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            values = np.fromiter((xxhash.xxh64_intdigest(v.encode("utf-8", "surrogatepass")) for v in col.to_pylist()),
                                 np.uint64, batch.num_rows)
        else:
            values = col.to_numpy().astype(np.uint64)
        h = (h * np.uint64(0x100000001B3)) ^ values
    batch = batch.drop_columns(["part"]) if "part" in batch.column_names else batch  # an earlier shuffle's
    return batch.append_column("part", pa.array((mix.uniform(h, 0) * parts).astype(np.int64)))


# ---------------------------------------------------------------- candidate pairs and their verification


def _edges(ctx: _Ctx, units, parts: int):
    """Verified near pairs and exact-copy links (i < j, near, same, sim): materialised, spread over the cluster."""
    d = ctx.recipe.dedup
    if not (d.near or d.exact):
        return None
    keyed = units.map_batches(_bucket_rows, batch_size=1, fn_kwargs={"ctx": ctx})
    pairs = _by_key(keyed, ["band", "key"], _bucket_pairs, parts)
    edges = _by_key(pairs, ["i"], _checked_pairs, parts, ctx=ctx).materialize()
    return edges if edges.count() else None


def _bucket_rows(batch: dict, ctx: _Ctx) -> dict:
    """(band, key, document) per LSH band of every document with words, and (-1, exact key, document)."""
    unit = int(batch["unit"][0])
    d = ctx.recipe.dedup
    cols = _unit_rows(ctx, unit, ["valid", "exact"])
    bands, keys, idx = [], [], []
    valid = cols["valid"].astype(bool)
    if d.near and valid.any():
        b, r = band_layout(d.threshold, d.num_perm, d.bands)
        k = band_keys(np.asarray(_unit_signatures(ctx.run, ctx.work, unit))[valid], b, r)
        bands.append(np.tile(np.arange(b, dtype=np.int64), len(k)))
        keys.append(k.reshape(-1))
        idx.append(np.repeat(cols["idx"][valid], b))
    if d.exact:
        bands.append(np.full(len(cols["idx"]), -1, np.int64))
        keys.append(cols["exact"].astype(np.uint64))
        idx.append(cols["idx"])
    if not idx:
        return {"band": np.zeros(0, np.int64), "key": np.zeros(0, np.uint64), "idx": np.zeros(0, np.int64)}
    return {"band": np.concatenate(bands), "key": np.concatenate(keys), "idx": np.concatenate(idx)}


def _bucket_pairs(group: pa.Table) -> pa.Table:
    """Each bucket's pairs as `candidate_pairs` forms them (`run_pairs`), flagged `same` for exact-key buckets."""
    t = group.sort_by([("band", "ascending"), ("key", "ascending"), ("idx", "ascending")])
    band, key, idx = (t.column(c).to_numpy() for c in ("band", "key", "idx"))
    same = _same_as_previous(band, key)
    found = [run_pairs(idx[band == -1], same[band == -1]), run_pairs(idx[band >= 0], same[band >= 0])]
    flags = np.repeat([True, False], [len(found[0]), len(found[1])])
    pairs = np.concatenate(found)
    return pa.table({"i": pairs[:, 0], "j": pairs[:, 1], "same": flags})


def _checked_pairs(group: pa.Table, ctx: _Ctx) -> pa.Table:
    """Each pair once, LSH candidates checked as `near_pairs` does; exact links kept as they are."""
    d = ctx.recipe.dedup
    t = group.sort_by([("i", "ascending"), ("j", "ascending")])
    i, j, same = (t.column(c).to_numpy() for c in ("i", "j", "same"))
    first = np.flatnonzero(~_same_as_previous(i, j))
    if not len(first):
        return _edge_table(*(np.zeros(0, np.int64),) * 2, *(np.zeros(0, bool),) * 2, np.zeros(0))
    linked = np.maximum.reduceat(same.astype(np.int8), first).astype(bool)
    candidate = np.maximum.reduceat((~same).astype(np.int8), first).astype(bool)
    pairs = np.stack([i[first], j[first]], 1)
    sim = np.full(len(pairs), np.nan)
    if candidate.any():
        found = pairs[candidate]
        sim[candidate] = true_similarity(_Sets(ctx), found) if d.verify else similarity(_Signatures(ctx), found)
    near = candidate & (sim >= d.threshold)
    keep = near | linked
    return _edge_table(pairs[keep, 0], pairs[keep, 1], near[keep], linked[keep], sim[keep])


def _edge_table(i, j, near, same, sim) -> pa.Table:
    return pa.table({"i": pa.array(i, pa.int64()), "j": pa.array(j, pa.int64()), "near": pa.array(near, pa.bool_()),
                     "same": pa.array(same, pa.bool_()), "sim": pa.array(sim, pa.float64())})


# ---------------------------------------------------------------- clusters and survivors


def _survivors(ctx: _Ctx, edges, parts: int):
    """Per document in a cluster: kept or not, the document it copies, why; and the rounds of propagation."""
    nodes = _by_key(edges.map_batches(_both_ways, batch_format="numpy"), ["node"], _adjacency, parts).materialize()
    rounds = 0
    while True:
        rounds += 1
        spread = nodes.map_batches(_spread_labels, batch_format="pyarrow")
        nodes = _by_key(spread, ["node"], _lowest_label, parts).materialize()
        if not nodes.sum("changed"):
            break
    described = nodes.map_batches(_with_unit, batch_format="pyarrow", fn_kwargs={"ctx": ctx}).groupby(
        "unit", num_partitions=parts).map_groups(_with_attributes, batch_format="pyarrow", fn_kwargs={"ctx": ctx})
    return _by_key(described, ["label"], _solve_components, parts, ctx=ctx).materialize(), rounds


def _both_ways(batch: dict) -> dict:
    near = np.concatenate([batch["near"], batch["near"]])
    return {"node": np.concatenate([batch["i"], batch["j"]]), "nbr": np.concatenate([batch["j"], batch["i"]]),
            "near": near, "sim": np.concatenate([batch["sim"], batch["sim"]])}


def _lists(offsets: np.ndarray, values: np.ndarray, kind=pa.int64()) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, kind))


def _node_table(node, label, nbrs: pa.ListArray, near: pa.ListArray, sims: pa.ListArray, changed) -> pa.Table:
    return pa.table({"node": pa.array(node, pa.int64()), "label": pa.array(label, pa.int64()), "nbrs": nbrs,
                     "near": near, "sims": sims, "changed": pa.array(changed, pa.int64())})


def _adjacency(group: pa.Table) -> pa.Table:
    """Per node: its neighbours (all; and those of verified near pairs, with the similarity); its first label."""
    t = group.sort_by([("node", "ascending"), ("nbr", "ascending")])
    node, nbr, sim = (t.column(c).to_numpy() for c in ("node", "nbr", "sim"))
    near = t.column("near").to_numpy(zero_copy_only=False)
    first = np.flatnonzero(~_same_as_previous(node))
    offsets = np.append(first, len(node))
    near_offsets = np.concatenate([[0], np.cumsum(np.add.reduceat(near.astype(np.int64), first))]) if len(first) \
        else np.zeros(1, np.int64)
    return _node_table(node[first], np.minimum(node[first], nbr[first]), _lists(offsets, nbr),
                       _lists(near_offsets, nbr[near]), _lists(near_offsets, sim[near], pa.float64()),
                       np.ones(len(first), np.int64))


def _spread_labels(batch: pa.Table) -> pa.Table:
    """Each node's own row (`own`), and its label sent to each neighbour as a row of its own."""
    nbrs = batch.column("nbrs").combine_chunks()
    sent = np.repeat(batch.column("label").to_numpy(), np.diff(nbrs.offsets.to_numpy()))
    nothing = np.zeros(len(sent) + 1, np.int64)
    messages = _node_table(nbrs.flatten().to_numpy(), sent, _lists(nothing, []), _lists(nothing, []),
                           _lists(nothing, [], pa.float64()), np.zeros(len(sent), np.int64))
    own = pa.concat_tables([batch.select(messages.column_names), messages])
    return own.append_column("own", pa.array(np.arange(own.num_rows) < batch.num_rows))


def _lowest_label(group: pa.Table) -> pa.Table:
    """The lowest label each node heard; `changed` when that lowers its own (propagation stops when none does)."""
    t = group.sort_by([("node", "ascending")])
    node, label = t.column("node").to_numpy(), t.column("label").to_numpy()
    low = np.minimum.reduceat(label, np.flatnonzero(~_same_as_previous(node))) if len(node) else label
    own = t.filter(t.column("own")).sort_by([("node", "ascending")]).drop_columns(["own"])
    changed = (low < own.column("label").to_numpy()).astype(np.int64)
    return own.set_column(1, "label", pa.array(low, pa.int64())).set_column(5, "changed", pa.array(changed))


def _with_unit(batch: pa.Table, ctx: _Ctx) -> pa.Table:
    return batch.append_column("unit", pa.array(_unit_of(ctx, batch.column("node").to_numpy()), pa.int64()))


def _with_attributes(group: pa.Table, ctx: _Ctx) -> pa.Table:
    """The kept rule's inputs for a unit's documents in clusters: exact key, pinned split, length, id."""
    unit = group.column("unit")[0].as_py()
    rows = group.column("node").to_numpy() - ctx.offsets[unit]
    cols = _unit_rows(ctx, unit, ["exact", "fixed", "shingles", "id"])
    fixed = np.array([FIXED[f] for f in cols["fixed"][rows]], np.int64)
    return (group.append_column("exact", pa.array(cols["exact"][rows], pa.uint64()))
            .append_column("fixed", pa.array(fixed)).append_column("length", pa.array(cols["shingles"][rows]))
            .append_column("id", pa.array(cols["id"][rows].tolist(), pa.string())))


def _solve_components(group: pa.Table, ctx: _Ctx) -> pa.Table:
    """`choose_survivors` on whole components, documents in input order: the rule never looks past a component,
    so this decides as the local engine does over all documents."""
    group = group.sort_by("node")
    node = group.column("node").to_numpy()
    near = group.column("near").combine_chunks()
    a = np.repeat(np.arange(len(node)), np.diff(near.offsets.to_numpy()))
    b = np.searchsorted(node, near.flatten().to_numpy())
    sims = group.column("sims").combine_chunks().flatten().to_numpy()
    once = b > a  # each pair is listed by both of its documents
    a, b, sims = a[once], b[once], sims[once]
    order = np.lexsort((b, a))  # the local engine's pairs come sorted (i, j)
    s = mix.choose_survivors(group.column("exact").to_numpy(), np.stack([a[order], b[order]], 1),
                             group.column("fixed").to_numpy() == mix.VALIDATION, ctx.recipe.dedup.exact,
                             group.column("length").to_numpy(), sims[order])
    ids = np.asarray(group.column("id").to_pylist(), dtype=object)
    heads, sizes = np.unique(s.cluster, return_counts=True)
    size = np.zeros(len(node), np.int64)
    size[heads] = sizes
    shown = np.full((len(node), 2), -1, np.int64)  # the report's example members: two removed, in input order
    gone = np.flatnonzero(~s.kept & (s.cluster != np.arange(len(node))))
    gone = gone[np.argsort(s.cluster[gone], kind="stable")]
    rank = np.arange(len(gone)) - np.searchsorted(s.cluster[gone], s.cluster[gone])
    shown[s.cluster[gone[rank < 2]], rank[rank < 2]] = node[gone[rank < 2]]
    return pa.table({
        "idx": node, "unit": group.column("unit"), "kept": s.kept,
        "dup_id": pa.array([ids[k] if k >= 0 else "" for k in s.duplicate_of.tolist()], pa.string()),
        "reason": pa.array([r or "" for r in s.reasons], pa.string()), "sim": s.similarity,
        "cluster": node[s.cluster], "size": size, "ex1": shown[:, 0], "ex2": shown[:, 1]})


def _save_decisions(group: pa.Table, ctx: _Ctx) -> pa.Table:
    unit = group.column("unit")[0].as_py()
    pq.write_table(group.sort_by("idx").select(["idx", "kept", "dup_id", "reason", "sim"]), _decisions_path(ctx, unit))
    return pa.table({"unit": [unit]})


def _decisions_path(ctx: _Ctx, unit: int) -> Path:
    return Path(ctx.work) / "decisions" / f"unit-{unit:05d}.parquet"


def _rows_where(batch: pa.Table, column: str, low: Optional[int] = None,
                among: Optional[np.ndarray] = None) -> pa.Table:
    """The rows whose `column` is at least `low`, or one of `among`."""
    values = batch.column(column).to_numpy()
    return batch.filter(values >= low if among is None else np.isin(values, among))


def _cluster_sizes(decisions) -> Counter:
    if decisions is None:
        return Counter()
    heads = decisions.map_batches(_rows_where, batch_format="pyarrow", fn_kwargs={"column": "size", "low": 1})
    heads = heads.groupby("size").count().take_all()
    return Counter({int(r["size"]): int(r["count()"]) for r in heads})


def _examples(ctx: _Ctx, decisions) -> list[dict]:
    """The report's examples: the largest clusters (ties: the first), as the local engine picks them."""
    limit = ctx.recipe.output.examples
    if decisions is None or limit == 0:
        return []
    heads = decisions.map_batches(_rows_where, batch_format="pyarrow", fn_kwargs={"column": "size", "low": 2})
    heads = heads.sort(["size", "cluster"], descending=[True, False]).take(limit)
    shown = [(int(h["size"]), [int(h["cluster"])] + [int(h[k]) for k in ("ex1", "ex2") if h[k] >= 0]) for h in heads]
    wanted = {m for _, ms in shown for m in ms}
    found = decisions.map_batches(_rows_where, batch_format="pyarrow",
                                  fn_kwargs={"column": "idx", "among": np.array(sorted(wanted))}).take_all()
    members = {int(r["idx"]): (bool(r["kept"]), r["reason"] or None, float(r["sim"])) for r in found}
    return duplicate_examples(Path(ctx.work), ctx.units, np.asarray(ctx.offsets), shown, members)


# ---------------------------------------------------------------- split, mixing, shards


def _unit_plan(ctx: _Ctx, unit: int, held: Optional[np.ndarray]) -> dict:
    """A unit's documents with their decisions and split."""
    cols = _unit_rows(ctx, unit, ["domain", "id", "source", "fixed", "words", "tokens", "exact"])
    n = len(cols["idx"])
    code = {d: i for i, d in enumerate(ctx.domains)}
    cols["dom"] = np.array([code[d] for d in cols["domain"]], np.int64)
    fixed = np.array([FIXED[f] for f in cols["fixed"]], np.int64)
    cols["kept"], cols["reasons"] = np.ones(n, bool), [None] * n
    cols["dup_id"], cols["sim"] = [""] * n, np.full(n, np.nan)
    path = _decisions_path(ctx, unit)
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


def _held_out(ctx: _Ctx, units) -> np.ndarray:
    """`split.validation_count`: each domain's free documents with the smallest draw, chosen from each unit's
    own smallest (a few per domain and unit, gathered here)."""
    found = units.map_batches(_held_out_candidates, batch_size=1, fn_kwargs={"ctx": ctx}).take_all()
    found.sort(key=lambda r: r["idx"])
    idx = np.array([r["idx"] for r in found], np.int64)
    dom = np.array([r["dom"] for r in found], np.int64)
    u = np.array([r["u"] for r in found], np.float64)
    return np.sort(idx[mix.smallest_per_domain(np.arange(len(idx)), dom, u, ctx.recipe.split.validation_count)])


def _held_out_candidates(batch: dict, ctx: _Ctx) -> dict:
    cols = _unit_plan(ctx, int(batch["unit"][0]), np.zeros(0, np.int64))
    chosen = mix.smallest_per_domain(np.flatnonzero(cols["free"]), cols["dom"], cols["u"],
                                     ctx.recipe.split.validation_count)
    return {"idx": cols["idx"][chosen], "dom": cols["dom"][chosen], "u": cols["u"][chosen]}


def _measure(ctx: _Ctx, cols: dict) -> np.ndarray:
    return {"tokens": cols["tokens"], "words": cols["words"], "documents": np.ones(len(cols["idx"]), np.int64)
            }[ctx.recipe.mix.by].astype(np.int64)


def _train_sizes(batch: dict, ctx: _Ctx, held: Optional[np.ndarray]) -> dict:
    cols = _unit_plan(ctx, int(batch["unit"][0]), held)
    train = cols["split"] == mix.TRAIN
    sizes = {d: int(_measure(ctx, cols)[train & (cols["dom"] == i)].sum()) for i, d in enumerate(ctx.domains)}
    return {"sizes": np.array([json.dumps(sizes)], dtype=object)}


def _write_unit(batch: dict, ctx: _Ctx, held: Optional[np.ndarray], ratios: dict, tmp: str) -> dict:
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
