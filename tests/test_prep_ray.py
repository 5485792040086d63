"""The ray engine of `lmforge prep`: the same dataset, removed.jsonl and report as the local engine (a
synthetic corpus with planted exact and near copies; the shared corpora), and bad engine input."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import lmforge.prep.pipeline as pipeline_mod
import lmforge.prep.ray_graph as ray_graph
from conftest import SHARED
from ray_nodes import free_port, node_env, start_node, stop_nodes
from lmforge.cli import app
from lmforge.prep import load_prep_recipe, prep
from test_prep import ROOT, edit, prose, recipe, rows, write_jsonl

ray = pytest.importorskip("ray")

# What may differ between two runs of the same recipe: timings, who ran them, what an earlier run had done.
VOLATILE = {"engine", "num_proc", "ray_cpus", "seconds", "mb_per_s", "stage_seconds", "resumed_units"}


@pytest.fixture(scope="module")
def local_ray():
    """One small Ray for the module (a start costs seconds); the engine uses it instead of starting its own."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield
    ray.shutdown()


def assert_same_dataset(local: Path, other: Path) -> None:
    for split in ("train", "validation"):
        assert sorted(p.name for p in (local / split).iterdir()) == sorted(p.name for p in (other / split).iterdir())
        assert rows(local, split) == rows(other, split)
    assert (local / "removed.jsonl").read_text() == (other / "removed.jsonl").read_text()
    a, b = (json.loads((d / "stats.json").read_text()) for d in (local, other))
    assert {k: v for k, v in a.items() if k not in VOLATILE} == {k: v for k, v in b.items() if k not in VOLATILE}

    def report(folder: Path) -> list[str]:  # without the timings: the first line and the stage table
        lines = (folder / "report.md").read_text().splitlines()
        return [x for x in lines[3:] if not x.startswith("| ") or "|---" in x or not x[2:3].islower()]
    assert report(local) == report(other)


def planted_corpus(tmp_path: Path) -> tuple[list[dict], dict]:
    """Three domains and a held-out source, with exact copies, near copies across files and domains, copies of
    held-out documents, documents the filters remove and a boilerplate footer; and what was planted."""
    rng = random.Random(24)
    footer = "Subscribe to our newsletter for the weekly digest of news."
    base = [prose(rng) for _ in range(50)]
    blogs = [prose(rng) for _ in range(30)]
    held = [prose(rng) for _ in range(4)]
    news = [d + "\n" + footer for d in base + [d.upper() for d in base[:5]]]  # exact copies: case does not matter
    blogs += [edit(d, 0.03, rng) for d in news[10:18]]  # near copies across domains
    news += [edit(d, 0.03, rng) for d in news[20:26]]  # near copies within a domain
    blogs += [edit(d, 0.03, rng) for d in held[:3]]  # copies of held-out documents
    blogs += ["Too short to keep."] * 2 + ["## ## ##"]
    sources = [{"path": write_jsonl(tmp_path / f"news{i}.jsonl", news[i::2]), "domain": "news"} for i in range(2)]
    sources += [{"path": write_jsonl(tmp_path / "blogs.jsonl", blogs), "domain": "blogs"},
                {"path": write_jsonl(tmp_path / "held.jsonl", held), "domain": "blogs", "split": "validation"}]
    return sources, {"exact": 5, "near": 14, "of_validation": 3}


def test_ray_engine_keeps_the_same_documents_as_the_local_engine(tmp_path, local_ray):
    sources, planted = planted_corpus(tmp_path)
    settings = dict(shard_mb=0.004, normalize={"boilerplate_min_docs": 20}, split={"validation_count": 3, "seed": 5},
                    mix={"temperature": 2.0}, dedup={"threshold": 0.7})
    local = prep(recipe(tmp_path, sources, **settings), show_progress=False)
    on_ray = prep(recipe(tmp_path, sources, **settings, output={"dir": str(tmp_path / "ray"), "plots": False}),
                  show_progress=False, engine="ray")
    assert_same_dataset(local, on_ray)
    stats = json.loads((on_ray / "stats.json").read_text())
    assert stats["engine"] == "ray" and stats["input_events"]["boilerplate_lines"] == 55
    assert stats["removed_by_reason"]["exact_duplicate"] == planted["exact"]
    assert stats["removed_by_reason"]["near_duplicate"] == planted["near"]
    assert stats["removed_by_reason"]["copy_of_validation"] == planted["of_validation"]
    assert stats["duplicates"]["clusters"] == planted["exact"] + planted["near"] + planted["of_validation"]
    assert "**Cluster 1**" in (on_ray / "report.md").read_text()
    assert not (tmp_path / ".ray.prep-work").exists()


def test_ray_engine_with_the_minhash_estimate_and_a_fraction_split(tmp_path, local_ray):
    rng = random.Random(25)
    docs = [prose(rng) for _ in range(40)]
    docs += [edit(d, rng.choice([0.02, 0.1, 0.3]), rng) for d in docs[:20]]
    sources = [{"path": write_jsonl(tmp_path / "a.jsonl", docs)}]
    settings = dict(dedup={"verify": False, "threshold": 0.6}, split={"validation_fraction": 0.2},
                    mix={"by": "documents", "resample": False}, output={"plots": False, "examples": 2})
    local = prep(recipe(tmp_path, sources, **settings), show_progress=False)
    settings["output"]["dir"] = str(tmp_path / "ray")
    on_ray = prep(recipe(tmp_path, sources, **settings), show_progress=False, engine="ray")
    assert_same_dataset(local, on_ray)
    duplicates = json.loads((on_ray / "stats.json").read_text())["duplicates"]
    assert not duplicates["verified"] and 10 <= duplicates["near_pairs"] <= 20


@pytest.mark.slow
def test_ray_engine_streams_under_a_memory_limit_ten_times_below_the_corpus(tmp_path, local_ray, monkeypatch):
    """Ray Data's object-store budget at a tenth of the input and blocks of 64 KB: the stages stream (and spill)
    instead of holding the corpus, and the answer does not change. The candidate-pair shuffle is cut into
    partitions of 64 KB, as a corpus a thousand times larger would be cut into partitions of 128 MB."""
    monkeypatch.setattr(ray_graph, "SHUFFLE_PART_BYTES", 64 * 1024)
    assert ray_graph.shuffle_parts(2, 10**6, ray_graph.BUCKET_ROW_BYTES) == 336
    rng = random.Random(27)
    docs = [prose(rng, 150) for _ in range(1500)]
    docs += [edit(d, 0.03, rng) for d in docs[:150]]
    sources = [{"path": write_jsonl(tmp_path / f"s{i}.jsonl", docs[i::4])} for i in range(4)]
    size = sum((tmp_path / f"s{i}.jsonl").stat().st_size for i in range(4))
    local = prep(recipe(tmp_path, sources), show_progress=False)
    data = ray.data.DataContext.get_current()
    saved = data.execution_options.resource_limits, data.target_max_block_size
    data.execution_options.resource_limits = ray.data.ExecutionResources(object_store_memory=size // 10)
    data.target_max_block_size = 64 * 1024
    try:
        on_ray = prep(recipe(tmp_path, sources, output={"dir": str(tmp_path / "ray"), "plots": False}),
                      show_progress=False, engine="ray")
    finally:
        data.execution_options.resource_limits, data.target_max_block_size = saved
    assert_same_dataset(local, on_ray)
    assert size > 1.5 * 2**20 and json.loads((on_ray / "stats.json").read_text())["removed_by_reason"]["near_duplicate"] > 100


def test_a_run_interrupted_on_the_local_engine_resumes_on_the_ray_engine(tmp_path, local_ray, monkeypatch):
    rng = random.Random(26)
    sources = [{"path": write_jsonl(tmp_path / f"s{i}.jsonl", [prose(rng) for _ in range(15)])} for i in range(4)]
    real, calls = pipeline_mod.process_unit, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(pipeline_mod, "process_unit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prep(recipe(tmp_path, sources, shard_mb=0.001), show_progress=False)
    monkeypatch.undo()
    resumed = prep(recipe(tmp_path, sources, shard_mb=0.001), show_progress=False, engine="ray")
    assert json.loads((resumed / "stats.json").read_text())["resumed_units"] == 2
    fresh = prep(recipe(tmp_path, sources, shard_mb=0.001, output={"dir": str(tmp_path / "fresh"), "plots": False}),
                 show_progress=False)
    assert_same_dataset(fresh, resumed)


KILLED_WORKER = r"""
import json, os, sys
from pathlib import Path
import ray
from lmforge.prep import prep, prep_recipe_from_dict

marker = Path(sys.argv[1])


def die_once():  # each Ray worker runs this at its start: the first unit processed anywhere kills its worker
    import lmforge.prep.ray_engine as engine
    real = engine.process_unit

    def dying(*args):
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return real(*args)
        os._exit(1)  # no exception, no cleanup: as when the worker is killed
    engine.process_unit = dying


ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
         runtime_env={"worker_process_setup_hook": die_once})
print("OUT", prep(prep_recipe_from_dict(json.loads(sys.argv[2])), show_progress=False, engine="ray"))
"""


def test_a_killed_ray_worker_is_replaced_and_the_answer_does_not_change(tmp_path):
    """A worker dies in the middle of a work unit (os._exit, as under the OOM killer or a lost node): Ray runs
    the unit again on another worker, and the dataset is the local engine's."""
    rng = random.Random(28)
    docs = [prose(rng) for _ in range(40)]
    docs += [edit(d, 0.03, rng) for d in docs[:6]]
    sources = [{"path": write_jsonl(tmp_path / f"s{i}.jsonl", docs[i::3])} for i in range(3)]
    local = prep(recipe(tmp_path, sources), show_progress=False)
    tree = {"sources": sources, "output": {"dir": str(tmp_path / "ray"), "plots": False}}
    marker = tmp_path / "died"
    result = subprocess.run([sys.executable, "-c", KILLED_WORKER, str(marker), json.dumps(tree)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker.exists()  # a worker did die
    assert_same_dataset(local, tmp_path / "ray")


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "domains").is_dir(), reason="the shared corpora are not beside the checkout")
def test_ray_engine_on_the_shared_corpora(tmp_path, local_ray):
    path = ROOT / "recipes" / "prep" / "shared-corpora.yaml"
    sets = ["num_proc=2", "output.plots=false"]
    local = prep(load_prep_recipe(path, sets + [f"output.dir={tmp_path / 'local'}"]), show_progress=False)
    on_ray = prep(load_prep_recipe(path, sets + [f"output.dir={tmp_path / 'ray'}"]), show_progress=False,
                  engine="ray")
    assert_same_dataset(local, on_ray)
    assert json.loads((on_ray / "stats.json").read_text())["duplicates"]["clusters"] > 100


@pytest.mark.parametrize("args,message", [
    (["--engine", "spark"], "--engine spark: unknown engine; choose local or ray"),
    (["--engine", "ray", "--address", "127.0.0.1:1"], "--address 127.0.0.1:1: no Ray cluster answers there"),
    (["--engine", "ray", "--address", "head"], "--address head: expected HOST:PORT"),
    (["--address", "127.0.0.1:6379"], "--address: only the ray engine runs on a cluster"),
])
def test_bad_engine_input_exits_2_and_writes_nothing(tmp_path, args, message):
    src = write_jsonl(tmp_path / "a.jsonl", ["One document of a few words."])
    (tmp_path / "r.yaml").write_text(json.dumps({"sources": [{"path": src}], "output": {"dir": str(tmp_path / "out")}}))
    result = CliRunner().invoke(app, ["prep", str(tmp_path / "r.yaml"), "--no-progress", *args])
    assert result.exit_code == 2 and f"error: {message}" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "r.yaml"]


@pytest.mark.slow
def test_two_nodes_on_this_machine_give_the_same_dataset(tmp_path):
    """A head and a second node (one CPU each) started with `ray start`, prep run against the head's address
    in another process (this one may already be joined to the module's Ray)."""
    sources, _ = planted_corpus(tmp_path)
    tree = {"sources": sources, "shard_mb": 0.004, "split": {"validation_count": 3},
            "output": {"dir": str(tmp_path / "two-nodes"), "plots": False}}
    (tmp_path / "r.yaml").write_text(json.dumps(tree))
    local = prep(recipe(tmp_path, sources, shard_mb=0.004, split={"validation_count": 3}), show_progress=False)
    port = free_port()
    nodes = []
    try:
        nodes += [start_node(port, head=True), start_node(port, head=False)]
        result = subprocess.run([sys.executable, "-m", "lmforge.cli", "prep", str(tmp_path / "r.yaml"), "--no-progress",
                                 "--engine", "ray", "--address", f"127.0.0.1:{port}"], env=node_env(),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    finally:
        stop_nodes(nodes)
    assert_same_dataset(local, tmp_path / "two-nodes")
    assert json.loads((tmp_path / "two-nodes" / "stats.json").read_text())["ray_cpus"] == 2
