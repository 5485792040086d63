"""The near-duplicate graph of the ray engine (see `ray_engine`): ids, LSH candidate pairs and their
verification, connected components by min-label propagation, and the kept rule per component, each a
Ray Data shuffle over datasets the engine passes in (this module never imports Ray itself)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from lmforge.prep import mix
from lmforge.prep.config import PrepRecipe
from lmforge.prep.dedup import band_keys, band_layout, run_pairs, similarity, true_similarity
from lmforge.prep.pipeline import duplicate_examples, duplicate_id_error
from lmforge.prep.read import Unit
from lmforge.prep.worker import unit_paths

FIXED = {"": -1, "train": mix.TRAIN, "validation": mix.VALIDATION}
SHUFFLE_PART_BYTES = 128 * 2**20  # shuffled rows per partition, at most (about), when there are more than CPUs
BUCKET_ROW_BYTES = 2 + 8 + 8 + 4  # band (int16), key, document, partition: one row per document and band


@dataclass
class Ctx:
    """What every task needs: small and picklable (no per-document data)."""
    recipe: PrepRecipe
    work: str
    units: list[Unit]
    offsets: list[int]  # the global index of each unit's first document; the total last
    domains: list[str]
    run: str  # names this run in per-process caches (a later run may reuse the work folder's names)


# ---------------------------------------------------------------- per-unit columns


def unit_rows(ctx: Ctx, unit: int, columns: list[str]) -> dict:
    table = pq.read_table(unit_paths(Path(ctx.work), unit)["rows"], columns=columns)
    cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in columns}
    cols["idx"] = ctx.offsets[unit] + np.arange(table.num_rows, dtype=np.int64)
    return cols


def _unit_of(ctx: Ctx, idx: np.ndarray) -> np.ndarray:
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

    def __init__(self, ctx: Ctx):
        self.ctx = ctx

    def get(self, i: int) -> np.ndarray:
        u = int(_unit_of(self.ctx, np.int64(i)))
        sets, starts = _unit_sets(self.ctx.run, self.ctx.work, u)
        row = i - self.ctx.offsets[u]
        end = starts[row + 1] if row + 1 < len(starts) else len(sets)
        return sets[starts[row]:end]


class _Signatures:
    """Signature rows by global document index (what `similarity` reads)."""

    def __init__(self, ctx: Ctx):
        self.ctx = ctx

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        units = _unit_of(self.ctx, idx)
        return np.stack([_unit_signatures(self.ctx.run, self.ctx.work, int(u))[i - self.ctx.offsets[u]]
                         for i, u in zip(idx.tolist(), units.tolist())])


# ---------------------------------------------------------------- ids


def check_unique_ids(ctx: Ctx, units, parts: int) -> None:
    ids = units.map_batches(_unit_ids, batch_size=1, fn_kwargs={"ctx": ctx})
    first = by_key(ids, ["id"], _second_of_repeated_ids, parts).sort("id").take(1)
    if first:
        raise duplicate_id_error(ctx.recipe, first[0]["id"], int(first[0]["src"]))


def _unit_ids(batch: dict, ctx: Ctx) -> dict:
    """Ids in the local engine's order: kept documents by index (kind 0), then filtered ones by unit (kind 1)."""
    unit = int(batch["unit"][0])
    kept = unit_rows(ctx, unit, ["id", "src"])
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
    same = same_as_previous(ids)
    second = same & ~np.concatenate([[False], same[:-1]])
    return t.filter(pa.array(second)).select(["id", "src"])


def same_as_previous(*columns: np.ndarray) -> np.ndarray:
    """Per row of sorted columns: whether it has the previous row's values."""
    n = len(columns[0])
    same = np.ones(max(n - 1, 0), bool)
    for c in columns:
        same &= c[1:] == c[:-1]
    return np.concatenate([[False], same])[:n]


def by_key(ds, keys: list[str], fn, parts: int, **fn_kwargs):
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
    return batch.append_column("part", pa.array((mix.uniform(h, 0) * parts).astype(np.int32)))


# ---------------------------------------------------------------- candidate pairs and their verification


def shuffle_parts(parts: int, rows: int, row_bytes: int) -> int:
    """Partitions of a shuffle: `parts` (one per CPU) or more, so that one task's share stays near
    SHUFFLE_PART_BYTES whatever the corpus's size (a partition is sorted and grouped in one process)."""
    return max(parts, -(-rows * row_bytes // SHUFFLE_PART_BYTES))


def edges(ctx: Ctx, units, parts: int):
    """Verified near pairs and exact-copy links (i < j, near, same, sim): materialised, spread over the cluster."""
    d = ctx.recipe.dedup
    if not (d.near or d.exact):
        return None
    per_doc = (band_layout(d.threshold, d.num_perm, d.bands)[0] if d.near else 0) + (1 if d.exact else 0)
    parts = shuffle_parts(parts, ctx.offsets[-1] * per_doc, BUCKET_ROW_BYTES)
    keyed = units.map_batches(_bucket_rows, batch_size=1, fn_kwargs={"ctx": ctx})
    pairs = by_key(keyed, ["band", "key"], _bucket_pairs, parts)
    edges = by_key(pairs, ["i"], _checked_pairs, parts, ctx=ctx).materialize()
    return edges if edges.count() else None


def _bucket_rows(batch: dict, ctx: Ctx) -> dict:
    """(band, key, document) per LSH band of every document with words, and (-1, exact key, document)."""
    unit = int(batch["unit"][0])
    d = ctx.recipe.dedup
    cols = unit_rows(ctx, unit, ["valid", "exact"])
    bands, keys, idx = [], [], []
    valid = cols["valid"].astype(bool)
    if d.near and valid.any():
        b, r = band_layout(d.threshold, d.num_perm, d.bands)
        k = band_keys(np.asarray(_unit_signatures(ctx.run, ctx.work, unit))[valid], b, r)
        bands.append(np.tile(np.arange(b, dtype=np.int16), len(k)))
        keys.append(k.reshape(-1))
        idx.append(np.repeat(cols["idx"][valid], b))
    if d.exact:
        bands.append(np.full(len(cols["idx"]), -1, np.int16))
        keys.append(cols["exact"].astype(np.uint64))
        idx.append(cols["idx"])
    if not idx:
        return {"band": np.zeros(0, np.int16), "key": np.zeros(0, np.uint64), "idx": np.zeros(0, np.int64)}
    return {"band": np.concatenate(bands), "key": np.concatenate(keys), "idx": np.concatenate(idx)}


def _bucket_pairs(group: pa.Table) -> pa.Table:
    """Each bucket's pairs as `candidate_pairs` forms them (`run_pairs`), flagged `same` for exact-key buckets.
    Most buckets hold one document: a sort of the keys alone finds the rest, and only they are ordered by
    (band, key, document)."""
    band, key, idx = (group.column(c).to_numpy() for c in ("band", "key", "idx"))
    order = np.argsort(key)
    repeated = same_as_previous(key[order])
    shared = order[repeated | np.append(repeated[1:], False)]  # every row of a key met at least twice
    band, key, idx = band[shared], key[shared], idx[shared]
    order = np.lexsort((idx, key, band))
    band, key, idx = band[order], key[order], idx[order]
    same = same_as_previous(band, key)
    found = [run_pairs(idx[band == -1], same[band == -1]), run_pairs(idx[band >= 0], same[band >= 0])]
    flags = np.repeat([True, False], [len(found[0]), len(found[1])])
    pairs = np.concatenate(found)
    return pa.table({"i": pairs[:, 0], "j": pairs[:, 1], "same": flags})


def _checked_pairs(group: pa.Table, ctx: Ctx) -> pa.Table:
    """Each pair once, LSH candidates checked as `near_pairs` does; exact links kept as they are."""
    d = ctx.recipe.dedup
    t = group.sort_by([("i", "ascending"), ("j", "ascending")])
    i, j, same = (t.column(c).to_numpy() for c in ("i", "j", "same"))
    first = np.flatnonzero(~same_as_previous(i, j))
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


def survivors(ctx: Ctx, edges, parts: int):
    """Per document in a cluster: kept or not, the document it copies, why; and the rounds of propagation."""
    nodes = by_key(edges.map_batches(_both_ways, batch_format="numpy"), ["node"], _adjacency, parts).materialize()
    rounds = 0
    while True:
        rounds += 1
        spread = nodes.map_batches(_spread_labels, batch_format="pyarrow")
        nodes = by_key(spread, ["node"], _lowest_label, parts).materialize()
        if not nodes.sum("changed"):
            break
    described = nodes.map_batches(_with_unit, batch_format="pyarrow", fn_kwargs={"ctx": ctx}).groupby(
        "unit", num_partitions=parts).map_groups(_with_attributes, batch_format="pyarrow", fn_kwargs={"ctx": ctx})
    return by_key(described, ["label"], _solve_components, parts, ctx=ctx).materialize(), rounds


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
    first = np.flatnonzero(~same_as_previous(node))
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
    low = np.minimum.reduceat(label, np.flatnonzero(~same_as_previous(node))) if len(node) else label
    own = t.filter(t.column("own")).sort_by([("node", "ascending")]).drop_columns(["own"])
    changed = (low < own.column("label").to_numpy()).astype(np.int64)
    return own.set_column(1, "label", pa.array(low, pa.int64())).set_column(5, "changed", pa.array(changed))


def _with_unit(batch: pa.Table, ctx: Ctx) -> pa.Table:
    return batch.append_column("unit", pa.array(_unit_of(ctx, batch.column("node").to_numpy()), pa.int64()))


def _with_attributes(group: pa.Table, ctx: Ctx) -> pa.Table:
    """The kept rule's inputs for a unit's documents in clusters: exact key, pinned split, length, id."""
    unit = group.column("unit")[0].as_py()
    rows = group.column("node").to_numpy() - ctx.offsets[unit]
    cols = unit_rows(ctx, unit, ["exact", "fixed", "shingles", "id"])
    fixed = np.array([FIXED[f] for f in cols["fixed"][rows]], np.int64)
    return (group.append_column("exact", pa.array(cols["exact"][rows], pa.uint64()))
            .append_column("fixed", pa.array(fixed)).append_column("length", pa.array(cols["shingles"][rows]))
            .append_column("id", pa.array(cols["id"][rows].tolist(), pa.string())))


def _solve_components(group: pa.Table, ctx: Ctx) -> pa.Table:
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


def save_decisions(group: pa.Table, ctx: Ctx) -> pa.Table:
    unit = group.column("unit")[0].as_py()
    pq.write_table(group.sort_by("idx").select(["idx", "kept", "dup_id", "reason", "sim"]), decisions_path(ctx, unit))
    return pa.table({"unit": [unit]})


def decisions_path(ctx: Ctx, unit: int) -> Path:
    return Path(ctx.work) / "decisions" / f"unit-{unit:05d}.parquet"


def _rows_where(batch: pa.Table, column: str, low: Optional[int] = None,
                among: Optional[np.ndarray] = None) -> pa.Table:
    """The rows whose `column` is at least `low`, or one of `among`."""
    values = batch.column(column).to_numpy()
    return batch.filter(values >= low if among is None else np.isin(values, among))


def cluster_sizes(decisions) -> Counter:
    if decisions is None:
        return Counter()
    heads = decisions.map_batches(_rows_where, batch_format="pyarrow", fn_kwargs={"column": "size", "low": 1})
    heads = heads.groupby("size").count().take_all()
    return Counter({int(r["size"]): int(r["count()"]) for r in heads})


def examples(ctx: Ctx, decisions) -> list[dict]:
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
