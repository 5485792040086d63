"""One trial, in a process of its own (`python -m lmforge.tune.trial SPEC.json`): run the stage with the trial's
values, report the metric at every evaluation so the pruner can stop it, and tell the study the outcome.

A process per trial means memory cannot grow from trial to trial, and a trial launched under torchrun gets the
same values on every rank (they come from the spec file, sampled once by the tuner). Without a launcher the tuner
forks each trial from a server process that has imported lmforge once (`multiprocessing`'s forkserver), so a trial
starts in milliseconds instead of the seconds that importing torch and transformers takes.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import optuna
from optuna.trial import TrialState
from safetensors import safe_open

from lmforge.errors import LmforgeError
from lmforge.tune.algorithms import pruner_named
from lmforge.tune.space import Objective
from lmforge.tune.stages import stage_of
from lmforge.tune.storage import HOST, open_storage

EXIT_PRUNED, EXIT_BAD_INPUT = 3, 2


def parameters(folder: Path) -> int:
    """The parameters of the model saved in `folder` (from the safetensors headers: nothing is loaded)."""
    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                n = 1
                for s in shape:
                    n *= s
                total += n
    return total


def objective_values(stage_name: str, result, objectives: list[Objective]) -> list[float]:
    """The trial's value of each objective, from what its run reports."""
    metrics = result.metrics.get("validation", {}) if stage_name == "finetune" else result.metrics
    summary = json.loads((Path(result.run_dir) / "results.json").read_text())
    values = []
    for o in objectives:
        if o.metric == "parameters":
            values.append(float(parameters(Path(result.run_dir) / "final")))
        elif o.metric == "seconds":
            values.append(float(summary["seconds"]))
        elif o.metric in metrics:
            values.append(float(metrics[o.metric]))
        else:
            raise LmforgeError(f"objective '{o.metric}': the run reported no such validation metric "
                               f"(it reported: {', '.join(sorted(metrics)) or 'nothing'}); does the recipe have a "
                               f"validation split?")
    return values


def run_trial(spec: dict) -> int:
    """Run the trial `spec` describes; returns the process exit status (0 done, 3 pruned, 2 bad input, 1 crash)."""
    storage = open_storage(spec["storage"])
    # The study's own pruner: the one the tuner was given decides, not Optuna's default.
    study = optuna.load_study(study_name=spec["study"], storage=storage, pruner=pruner_named(spec["pruner"]))
    trial = optuna.trial.Trial(study, spec["trial_id"])
    main = int(os.environ.get("RANK", 0)) == 0  # under torchrun only rank 0 reports and tells
    if main:
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("host", HOST)
    objectives = [Objective(**o) for o in spec["objectives"]]
    stage = stage_of(spec["recipe"])
    stop = {}
    try:
        recipe = stage.load(spec["recipe"], spec["overrides"])
    except LmforgeError as err:
        return _failed(study, trial, spec, err, main)
    # The pruner compares trials after the same number of training examples, not the same step: a searched batch
    # size would otherwise set a trial at batch 16 against others that have read twice its data.
    per_step = recipe.train.batch_size * recipe.train.grad_accum * int(os.environ.get("WORLD_SIZE", 1))

    def on_eval(step: int, metrics: dict):
        # Only a single objective can be pruned on (Optuna's rule); the pruner sees the first objective's value.
        metric = objectives[0].metric
        if len(objectives) > 1 or metric not in metrics:
            return None
        trial.report(float(metrics[metric]), step * per_step)
        if trial.should_prune():
            stop["reason"] = (f"pruned at step {step} ({step * per_step:,} examples): {metric} {metrics[metric]:.4f} "
                              f"(the {spec['pruner']} pruner)")
            return stop["reason"]
        return None

    try:
        result = stage.run(recipe, show_progress=False, on_eval=on_eval if main else None, force=True)
    except LmforgeError as err:
        return _failed(study, trial, spec, err, main)
    except BaseException as err:
        if main:
            trial.set_user_attr("error", f"{type(err).__name__}: {err}")
            study.tell(spec["trial_id_number"], state=TrialState.FAIL)
        traceback.print_exc()
        return 1
    if not main:
        return 0
    trial.set_user_attr("run_dir", str(result.run_dir))
    if "reason" in stop:
        trial.set_user_attr("stopped", stop["reason"])
        study.tell(spec["trial_id_number"], state=TrialState.PRUNED)
        return EXIT_PRUNED
    try:
        values = objective_values(stage.name, result, objectives)
    except LmforgeError as err:
        return _failed(study, trial, spec, err, main)
    study.tell(spec["trial_id_number"], values)
    return 0


def _failed(study, trial, spec: dict, err: LmforgeError, main: bool) -> int:
    """A trial the user's input stopped: the study records it failed, with the error."""
    if main:
        trial.set_user_attr("error", str(err))
        study.tell(spec["trial_id_number"], state=TrialState.FAIL)
    print(f"error: {err}", file=sys.stderr)
    return EXIT_BAD_INPUT


def trial_process(spec_file: str, log: str) -> None:
    """A forked trial's body: its output goes to the trial's log, its status is the process's exit status."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.exit(run_trial(json.loads(Path(spec_file).read_text())))


if __name__ == "__main__":
    sys.exit(run_trial(json.loads(Path(sys.argv[1]).read_text())))
