"""`lmforge tune`: the space is checked before any trial runs; trials are pruned, resumed after SIGKILL without loss
or duplicates, shared by two workers; the best recipe reproduces its trial; several objectives give a front."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

from conftest import tiny_recipe
from lmforge.cli import app
from lmforge.errors import LmforgeError
from lmforge.pretrain import pretrain
from lmforge.tune import tune

LR = {"train.lr": {"categorical": [0.003, 1.0e-07]}}


def recipe_file(corpus, tmp_path: Path, **train) -> Path:
    tree = tiny_recipe(corpus, tmp_path / "run", "clm", **{"max_steps": 20, "eval_every": 5, **train})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def trials_of(folder: Path, name: str = "tiny-clm"):
    storage = next(f"sqlite:///{p}" for p in [folder / "study.db"] if p.exists()) if (folder / "study.db").exists() \
        else optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(folder / "journal.log")))
    return optuna.load_study(study_name=name, storage=storage).trials


@pytest.mark.parametrize("space, message", [
    ({}, "the space is empty"),
    ({"params": {"train.lrr": {"float": [0.1, 0.2]}}}, "'train.lrr' is not a recipe field; did you mean 'train.lr'"),
    ({"params": {"train": {"float": [0.1, 0.2]}}}, "'train' is a section"),
    ({"params": {"train.lr": {"float": [0.2, 0.1]}}}, "low 0.2 must be below high 0.1"),
    ({"params": {"train.batch_size": {"categorical": [16]}}}, "at least two values"),
    ({"params": {"train.lr": {"float": [0.0, 0.1], "log": True}}}, "a log scale needs low > 0"),
    ({"params": {"train.batch_size": {"int": [0, 8]}}}, "the value 0 is not accepted"),
    ({"params": {"train.lr": {"flot": [0.1, 0.2]}}}, "unknown key 'flot'; did you mean 'float'"),
    ({"params": LR, "objectives": ["accuracy"]}, "'accuracy' is not a metric this stage reports"),
    ({"params": LR, "objectives": [{"ppl/prose": "up"}]}, "expected max or min"),
])
def test_a_bad_space_is_one_clear_error_and_writes_nothing(tmp_path, corpus, space, message):
    path = recipe_file(corpus, tmp_path)
    with pytest.raises(LmforgeError, match=message):
        tune(path, space, trials=2, out=tmp_path / "study")
    assert not (tmp_path / "study").exists()


def test_bad_options_exit_2_with_one_line(tmp_path, corpus):
    path = recipe_file(corpus, tmp_path)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"params": LR}))
    runner = CliRunner()
    for args, message in [
        (["--sampler", "bayes"], "--sampler bayes: expected one of tpe, random, grid, cmaes, nsga2"),
        (["--storage", f"sqlite:///{tmp_path}/missing/x.db"], "does not exist"),
        (["--storage", "nosuchdb://x"], "--storage nosuchdb://x: cannot open it"),
        (["--workers", "2", "--storage", f"sqlite:///{tmp_path}/x.db"], "database is locked"),
        (["--pruner", "median", "--space", str(tmp_path / "multi.yaml")], "prunes single-objective studies only"),
    ]:
        (tmp_path / "multi.yaml").write_text(yaml.safe_dump({"params": LR, "objectives": ["loss", "parameters"]}))
        result = runner.invoke(app, ["tune", str(path), "--space", str(space), "--out", str(tmp_path / "s"), *args])
        assert result.exit_code == 2, result.output
        assert message in result.output and result.output.count("\n") == 1
        assert not (tmp_path / "s").exists()


def test_a_pruned_trial_stops_early_and_the_best_recipe_reproduces_its_trial(tmp_path, corpus):
    path = recipe_file(corpus, tmp_path)
    # The grid runs lr 0.003 first (seed 1), then 1e-7: ASHA stops the second at its first evaluation.
    result = tune(path, {"params": LR}, trials=2, sampler="grid", pruner="asha", seed=1, out=tmp_path / "study")
    trials = trials_of(tmp_path / "study")
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert [t.params["train.lr"] for t in trials] == [0.003, 1e-07]
    pruned = Path(trials[1].user_attrs["run_dir"])
    steps = [json.loads(line)["step"] for line in (pruned / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 5 and "pruned at step 5 (40 examples)" in (pruned / "summary.md").read_text()
    assert set(trials[0].intermediate_values) == {40, 80, 120, 160}  # reported by examples read (batch 8)
    done = Path(trials[0].user_attrs["run_dir"])
    assert (done / "final" / "model.safetensors").exists()  # the models stay; the resume state is removed
    assert not (done / "checkpoints").exists() and not (pruned / "checkpoints").exists()

    rows = list(csv.DictReader(open(tmp_path / "study" / "trials.csv")))
    assert [(r["trial"], r["state"]) for r in rows] == [("0", "complete"), ("1", "pruned")]
    assert "pruned at step 5" in (tmp_path / "study" / "trials.md").read_text()
    for plot in ("history.png",):
        assert (tmp_path / "study" / plot).read_bytes()[:4] == b"\x89PNG"
    assert result.metrics["best"][0]["trial"] == 0

    best = yaml.safe_load((tmp_path / "study" / "best.yaml").read_text())
    assert best["train"]["lr"] == 0.003 and best["train"]["eval_every"] == 5
    again = pretrain(tmp_path / "study" / "best.yaml", overrides=[f"output.dir={tmp_path / 'again'}"],
                     show_progress=False)
    assert again.metrics["loss"] == pytest.approx(trials[0].values[0], rel=1e-4)


def test_two_workers_share_a_study_with_two_objectives_and_give_a_front(tmp_path, corpus):
    path = recipe_file(corpus, tmp_path, max_steps=10)
    space = {"params": {"model.d_model": {"categorical": [16, 32]}, **LR}, "objectives": ["loss", "parameters"]}
    result = tune(path, space, trials=4, workers=2, sampler="grid", out=tmp_path / "study")
    trials = trials_of(tmp_path / "study")
    assert (tmp_path / "study" / "journal.log").exists()  # several workers: the journal, not SQLite
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4  # the grid, each point once
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:]))  # two trials ran at the same time
    front = {b["trial"] for b in result.metrics["best"]}
    params = {t.number: t.values[1] for t in trials}
    assert min(params, key=params.get) in front or len(front) >= 1
    for t in front:
        assert (tmp_path / "study" / f"best-{t}.yaml").exists() or len(front) == 1
    assert (tmp_path / "study" / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_a_killed_tuner_resumes_without_losing_or_repeating_a_trial(tmp_path, corpus):
    path = recipe_file(corpus, tmp_path, max_steps=30)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"params": {"train.lr": {"float": [1e-3, 1e-2], "log": True}}}))
    cli = [sys.executable, "-m", "lmforge.cli", "tune", str(path), "--space", str(space), "--trials", "3",
           "--out", str(tmp_path / "study"), "--pruner", "none"]
    tuner = subprocess.Popen(cli, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    try:
        running = tmp_path / "study" / "trials" / "trial-0001" / "metrics.jsonl"
        while time.time() < deadline and not running.exists():  # one worker: trial 0 is done, trial 1 training
            time.sleep(0.2)
        assert running.exists(), "the second trial did not start in time"
    finally:
        os.killpg(tuner.pid, signal.SIGKILL)  # the tuner, its forkserver and the running trial
        tuner.wait()
    before = trials_of(tmp_path / "study")
    killed = before[-1]
    assert killed.state == TrialState.RUNNING

    resumed = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"trials {killed.number} stopped with their process" in (resumed.stdout + resumed.stderr).replace("\n", " ")
    after = trials_of(tmp_path / "study")
    done = [t for t in after if t.state == TrialState.COMPLETE]
    assert len(done) == 3 and after[killed.number].state == TrialState.FAIL
    assert [t.number for t in after if t.state == TrialState.COMPLETE][:len(before) - 1] == \
        [t.number for t in before if t.state == TrialState.COMPLETE]
    retry = [t for t in after if t.user_attrs.get("retry_of") == killed.number]
    assert len(retry) == 1 and retry[0].params == killed.params and retry[0].state == TrialState.COMPLETE
    assert len({t.params["train.lr"] for t in done}) == 3  # nothing ran twice
