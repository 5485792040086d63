"""torchrun with 2 processes (gloo) at the same global batch follows the 1-process loss curve."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import yaml

from conftest import tiny_recipe
from lmforge.data.sources import load_documents
from lmforge.recipe import recipe_from_dict
from lmforge.tokenizer import train_tokenizer

TORCHRUN = Path(sys.executable).parent / "torchrun"
# Float sums are reduced in another order across processes; 1e-4 nats/token over 12 steps is far below
# any real divergence (a wrong normalisation or data split moves the loss by > 1e-2).
TOLERANCE = 1e-4


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _run(cmd: list[str], env: dict, out_dir: Path, timeout: float = 150.0,
         attempts: int = 2) -> subprocess.CompletedProcess:
    """Run a training command; a run that hangs has its workers' Python stacks dumped (faulthandler on
    SIGABRT) and is tried once more. torch's process-group shutdown can rarely hang at exit on gloo; the
    stacks say where, and a hang that repeats still fails the test."""
    env = {**env, "PYTHONFAULTHANDLER": "1"}
    stacks = []
    for _ in range(attempts):
        shutil.rmtree(out_dir, ignore_errors=True)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
            if stacks:
                warnings.warn("a run hung and passed when tried again; its stacks:\n" + stacks[-1][-4000:])
            return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        except subprocess.TimeoutExpired:
            for pid in _children(proc.pid) + [proc.pid]:
                try:
                    os.kill(pid, signal.SIGABRT)
                except ProcessLookupError:
                    pass
            time.sleep(2)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, err = proc.communicate()
            stacks.append(err)
    pytest.fail(f"{' '.join(cmd)} hung {attempts} times; the last run's output:\n{stacks[-1][-6000:]}")


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(l)["loss"] for l in lines if '"split"' not in l]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
@pytest.mark.parametrize("objective", ["clm", "mlm", "mlm+sop"])
def test_two_processes_match_one(tmp_path, corpus, objective):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # One tokenizer for both runs: WordPiece/Unigram training in `tokenizers` breaks ties by hash order,
    # so two trainings can differ; a run trains once (rank 0) and every process reuses the saved files.
    tree = tiny_recipe(corpus, tmp_path / "unused", objective)
    tokenizer_dir = tmp_path / "tokenizer"
    recipe = recipe_from_dict(tree)
    train_tokenizer([d["text"] for d in load_documents(recipe.data)], recipe.tokenizer).save_pretrained(tokenizer_dir)
    runs = {}
    for procs, batch in ((1, 8), (2, 4)):
        tree = tiny_recipe(corpus, tmp_path / f"p{procs}", objective, batch_size=batch, grad_accum=2,
                           max_steps=12, eval_every=6, threads=1)
        tree["tokenizer"] = {"path": str(tokenizer_dir)}
        recipe = tmp_path / f"p{procs}.yaml"
        recipe.write_text(yaml.safe_dump(tree))
        if procs == 1:
            cmd = [sys.executable, "-m", "lmforge.cli", "pretrain", str(recipe), "--no-progress"]
        else:
            cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "lmforge.cli", "pretrain",
                   str(recipe), "--no-progress"]
        result = _run(cmd, env, tmp_path / f"p{procs}")
        assert result.returncode == 0, result.stderr[-2000:]
        runs[procs] = tmp_path / f"p{procs}"
    one, two = _losses(runs[1]), _losses(runs[2])
    assert len(one) == len(two) == 12
    assert max(abs(a - b) for a, b in zip(one, two)) < TOLERANCE, (one, two)
    assert one[-1] < one[0]  # and it learns
    val = [json.loads(l) for l in (runs[2] / "metrics.jsonl").read_text().splitlines() if '"split"' in l]
    ref = [json.loads(l) for l in (runs[1] / "metrics.jsonl").read_text().splitlines() if '"split"' in l]
    assert abs(val[-1]["loss"] - ref[-1]["loss"]) < TOLERANCE
    if objective == "mlm+sop":  # the objective's own training tallies are summed over both ranks
        logged = [[json.loads(l) for l in (runs[p] / "metrics.jsonl").read_text().splitlines()
                   if '"split"' not in l] for p in (1, 2)]
        for name in ("mlm_accuracy", "sop_accuracy", "sop_loss"):
            a, b = [r[name] for r in logged[0]], [r[name] for r in logged[1]]
            assert max(abs(x - y) for x, y in zip(a, b)) < 0.02, (name, a, b)
