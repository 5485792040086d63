"""Experts as independent jobs: local processes, printed torchrun commands, a SLURM array, and status / merge
picking up whichever experts have finished."""

from __future__ import annotations

import json
import subprocess

import pytest
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.experts import branch, merge
from lmforge.experts.launch import status
from lmforge.recipe import recipe_from_dict

from conftest import tiny_recipe


@pytest.fixture
def branched(tmp_path, corpus):
    tree = tiny_recipe(corpus, tmp_path / "btm", "clm", max_steps=4, eval_every=0, batch_size=4)
    tree["experts"] = {"seed_steps": 2, "steps": 4}
    return branch(recipe_from_dict(tree), show_progress=False)


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_print_and_slurm_name_one_job_per_expert(branched):
    assert [(r["name"], r["state"]) for r in status(branched)] == [("code", "missing"), ("prose", "missing")]
    done = _cli("experts", "train", branched, "--launch", "print", "--nproc", "2", "--set", "train.eval_batches=1")
    assert done.exit_code == 0, done.output
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("torchrun --standalone --nproc_per_node=2 -m lmforge.cli "
                                                   f"experts train {branched} --domain ") for line in lines)
    assert lines[0].split()[9] == "code" and "--launch inline" in lines[0] and "--set train.eval_batches=1" in lines[0]
    done = _cli("experts", "train", branched, "--launch", "slurm")
    script = branched / "experts" / "train.sbatch"
    assert done.exit_code == 0 and f"sbatch {script}" in done.stdout
    text = script.read_text()
    assert "#SBATCH --array=0-1" in text and text.count("--domain ") == 2 and "SLURM_ARRAY_TASK_ID" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert _cli("experts", "train", branched, "--launch", "cluster").exit_code == 2


@pytest.mark.slow
def test_local_jobs_run_apart_and_merge_takes_the_finished_ones(branched):
    # Break the prose expert's recipe: its job fails on its own, the code expert still trains.
    (branched / "experts" / "prose.yaml").write_text("name: prose\ntrain: {max_steps: -1}\n")
    done = _cli("experts", "train", branched, "--jobs", "2")
    assert done.exit_code == 2
    assert "prose (log: " in done.output and "code" not in done.output.split("failed:")[-1]
    assert "train.max_steps" in (branched / "experts" / "prose.log").read_text()
    rows = {r["name"]: r for r in status(branched)}
    assert rows["code"]["state"] == "trained" and rows["prose"]["state"] == "missing"
    assert rows["prose"]["detail"] == f"lmforge experts train {branched} --domain prose"
    shown = _cli("experts", "status", branched)
    assert shown.exit_code == 0 and "code   trained" in shown.stdout and "prose  missing" in shown.stdout
    left = _cli("experts", "train", branched, "--missing", "--launch", "print")
    assert left.stdout.count("--domain ") == 1 and "--domain prose" in left.stdout
    merge(branched, "ensemble")
    spec = json.loads((branched / "ensemble" / "ensemble.json").read_text())
    assert spec["domains"] == ["code"] and spec["experts"] == ["../experts/code/final"]
