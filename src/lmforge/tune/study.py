"""`lmforge tune`: an Optuna study over the fields of any recipe. The tuner samples each trial's values, runs the
trial as an ordinary run folder in a process of its own (`lmforge.tune.trial`), and writes the results.

Several workers (threads here, each waiting on its own trial process) or several tuners (on other machines, with a
shared database) share one study; each asks for a trial only while the study holds fewer than `trials` trials that
finished, were pruned or are running.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import shlex
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Optional, Union

import optuna
import yaml
from optuna.trial import TrialState

from lmforge.engine.logging import console
from lmforge.errors import LmforgeError, RunInterrupted
from lmforge.recipe import read_yaml_mapping, validate_tree
from lmforge.stage import RunResult
from lmforge.tune.algorithms import PRUNERS, SAMPLERS, grid_of, make_pruner, make_sampler
from lmforge.tune.results import write_results
from lmforge.tune.space import SearchSpace, load_space
from lmforge.tune.stages import STAGES, stage_of
from lmforge.tune.storage import HOST, open_storage, recover_dead_trials, storage_url
from lmforge.tune.trial import trial_process

FAILURES_IN_A_ROW = 3  # then the study stops: the same error would most likely repeat


_FORKSERVER = None


def forkserver():
    """A multiprocessing context whose server process has imported the trial code once."""
    global _FORKSERVER
    if _FORKSERVER is None:
        _FORKSERVER = multiprocessing.get_context("forkserver")
        _FORKSERVER.set_forkserver_preload(["lmforge.tune.trial"])
    return _FORKSERVER


def _flat(tree, prefix: str = "") -> dict:
    out = {}
    for k, v in (tree or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Tuner:
    def __init__(self, study: optuna.Study, space: SearchSpace, folder: Path, recipe_file: Path, trials: int,
                 fixed_overrides: list[str], spec: dict, launcher: Optional[list[str]]):
        self.study, self.space, self.folder, self.recipe_file = study, space, folder, recipe_file
        self.trials, self.fixed_overrides, self.spec = trials, fixed_overrides, spec
        self.launcher = launcher  # None: fork each trial from the forkserver
        self.fixed = _flat(read_yaml_mapping(recipe_file, "a recipe"))
        self.lock, self.stop, self.failures, self.last_error = threading.Lock(), False, 0, None

    def _held(self) -> int:
        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        return len(self.study.get_trials(deepcopy=False, states=states))

    def _next(self):
        with self.lock:
            if self.stop or self._held() >= self.trials:
                return None
            trial = self.study.ask()
            trial.set_user_attr("tuner_pid", os.getpid())
            trial.set_user_attr("host", HOST)
            values = self.space.sample(trial, self.fixed)
            return trial, values

    def worker(self) -> None:
        while True:
            nxt = self._next()
            if nxt is None:
                return
            self.run_one(*nxt)

    def run_one(self, trial, values: dict) -> None:
        name = f"trial-{trial.number:04d}"
        run_dir = self.folder / "trials" / name
        overrides = [f"{k}={json.dumps(v)}" for k, v in values.items()] + self.fixed_overrides + \
                    [f"output.dir={run_dir}"]
        spec = {**self.spec, "trial_id": trial._trial_id, "trial_id_number": trial.number, "overrides": overrides}
        spec_file = self.folder / "trials" / f"{name}.json"
        spec_file.parent.mkdir(parents=True, exist_ok=True)
        spec_file.write_text(json.dumps(spec, indent=2))
        log = self.folder / "trials" / f"{name}.log"
        started = time.perf_counter()
        if self.launcher:
            with open(log, "w") as out:
                code = subprocess.run(self.launcher + [str(spec_file)], stdout=out, stderr=subprocess.STDOUT,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
        else:
            process = forkserver().Process(target=trial_process, args=(str(spec_file), str(log)), daemon=False)
            process.start()
            process.join()
            code = process.exitcode if process.exitcode >= 0 else 128 - process.exitcode
        seconds = time.perf_counter() - started
        frozen = self.study._storage.get_trial(trial._trial_id)
        if frozen.state == TrialState.RUNNING and code < 128:  # died before telling (not a signal: resume retries)
            self.study._storage.set_trial_user_attr(trial._trial_id, "error",
                                                    f"the trial process exited with status {code}; see {log}")
            self.study.tell(trial.number, state=TrialState.FAIL)
            frozen = self.study._storage.get_trial(trial._trial_id)
        if frozen.state in (TrialState.COMPLETE, TrialState.PRUNED):
            # A finished trial is never resumed (a dead one is run again from the start): its training state
            # (optimizer moments, several times the model's size) only fills the disk. Its models stay.
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        shown = ", ".join(f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                          for k, v in values.items())
        with self.lock:
            if frozen.state == TrialState.COMPLETE:
                self.failures = 0
                result = ", ".join(f"{o.metric} {v:.4f}" for o, v in zip(self.space.objectives, frozen.values))
                console.print(f"trial {trial.number}: {result}  ({shown})  {seconds:.0f} s")
            elif frozen.state == TrialState.PRUNED:
                self.failures = 0
                console.print(f"trial {trial.number}: {frozen.user_attrs.get('stopped', 'pruned')}  ({shown})  "
                              f"{seconds:.0f} s")
            elif code >= 128 or frozen.state == TrialState.RUNNING:
                self.stop = True  # interrupted: the next tuner retries it
            else:
                self.failures += 1
                self.last_error = frozen.user_attrs.get("error", f"see {log}")
                console.print(f"[red]trial {trial.number} failed: {self.last_error}  (log: {log})")
                if self.failures >= FAILURES_IN_A_ROW:
                    self.stop = True


def tune(recipe: Union[str, Path], space: Union[str, Path, dict], *, trials: int = 20, study: Optional[str] = None,
         storage: Optional[str] = None, workers: int = 1, sampler: str = "tpe", pruner: Optional[str] = None,
         seed: int = 0, eval_every: Optional[int] = None, threads: Optional[int] = None,
         out: Optional[Union[str, Path]] = None, launcher: Optional[str] = None,
         overrides: Union[list[str], tuple] = ()) -> RunResult:
    """Search `space` over the fields of `recipe` (a fine-tuning or pretraining recipe file) with Optuna; each trial
    is a run folder under the study's folder. Returns the study folder and a summary of the best trial(s)."""
    if trials < 1:
        raise LmforgeError(f"--trials: expected at least 1, got {trials}")
    if workers < 1:
        raise LmforgeError(f"--workers: expected at least 1, got {workers}")
    if sampler not in SAMPLERS:
        raise LmforgeError(f"--sampler {sampler}: expected one of {', '.join(SAMPLERS)}")
    if pruner is not None and pruner not in PRUNERS:
        raise LmforgeError(f"--pruner {pruner}: expected one of {', '.join(PRUNERS)}")
    recipe_file = Path(recipe)
    stage = stage_of(recipe_file)
    base = stage.load(recipe_file, list(overrides))  # the recipe (with --set) must be valid before any trial
    tree = base.model_dump(mode="json")
    name = study or base.name
    folder = Path(out) if out else Path("runs") / "tune" / name
    searched = load_space(space, stage.root, tree, stage.default, stage.metrics)
    fixed_overrides = [f"train.threads={threads}"] if threads else []
    if workers > 1 and not threads:
        fixed_overrides = [f"train.threads={max(1, (os.cpu_count() or 1) // workers)}"]
    if eval_every is not None:
        if eval_every < 1:
            raise LmforgeError(f"--eval-every: expected at least 1 step, got {eval_every}")
        fixed_overrides.append(f"train.eval_every={eval_every}")
    validate_tree(stage.root, tree, str(recipe_file), fixed_overrides)
    make_sampler(sampler, seed, searched)  # a sampler that cannot take this space fails before anything is written
    if sampler == "grid":
        points = len(list(itertools.product(*grid_of(searched).values())))
        if trials > points:
            console.print(f"the grid has {points} points: {points} trials, not {trials}")
            trials = points
    pruner_name, the_pruner = make_pruner(pruner, searched)
    url = storage_url(storage, folder, workers)

    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        the_storage = open_storage(url)
        the_study = open_study(the_storage, name, url, searched, stage.name, sampler, seed, the_pruner)
    except BaseException:
        if created:
            for f in folder.iterdir():
                f.unlink()
            folder.rmdir()
        raise
    recipe_copy = folder / "recipe.yaml"  # the trials read the recipe as resolved now (paths, --set)
    tmp = folder / ".recipe.yaml.tmp"
    tmp.write_text(yaml.safe_dump(tree, sort_keys=False))
    tmp.replace(recipe_copy)
    info = {"study": name, "stage": stage.name, "recipe": str(recipe_file), "storage": url,
            "metrics": [o.metric for o in searched.objectives],
            "directions": [o.direction for o in searched.objectives], "sampler": sampler, "pruner": pruner_name,
            "seed": seed, "fixed_overrides": fixed_overrides, "space": json.loads(searched.fingerprint())}
    (folder / "study.json").write_text(json.dumps(info, indent=2))
    for key in ("recipe_tree", "info"):
        the_study.set_user_attr(key, tree if key == "recipe_tree" else info)

    recovered = recover_dead_trials(the_study)
    if recovered:
        console.print(f"trials {', '.join(map(str, recovered))} stopped with their process; marked failed and "
                      f"queued again")
    done = len(the_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    console.print(f"[bold]study {name}[/]: {stage.name} recipe {recipe_file}, {len(searched.params)} fields, "
                  f"{' and '.join(f'{o.metric} ({o.direction})' for o in searched.objectives)}; {sampler} sampler, "
                  f"{pruner_name} pruner; {done} of {trials} trials done; {workers} worker(s)"
                  + (f", {fixed_overrides[0].split('=')[1]} thread(s) each" if fixed_overrides and
                     fixed_overrides[0].startswith("train.threads") else "") + f"; storage {url}")
    spec = {"storage": url, "study": name, "recipe": str(recipe_copy), "pruner": pruner_name,
            "objectives": [vars(o) for o in searched.objectives]}
    command = shlex.split(launcher) + ["-m", "lmforge.tune.trial"] if launcher else None
    tuner = Tuner(the_study, searched, folder, recipe_copy, trials, fixed_overrides, spec, command)
    threads_ = [threading.Thread(target=tuner.worker, daemon=True) for _ in range(workers)]
    for t in threads_:
        t.start()
    try:
        for t in threads_:
            while t.is_alive():
                t.join(0.5)
    except KeyboardInterrupt:
        tuner.stop = True
        for t in threads_:
            t.join()
        raise RunInterrupted(2, f"tuning stopped; the study is kept in {url}: run the same command to continue")
    summary = summarize(the_study, info, folder)
    if tuner.failures >= FAILURES_IN_A_ROW:
        raise LmforgeError(f"study {name}: {FAILURES_IN_A_ROW} trials in a row failed; the last: {tuner.last_error}")
    return RunResult(folder, summary)


def open_study(storage, name: str, url: str, space: SearchSpace, stage: str, sampler_name: str, seed: int,
               pruner) -> optuna.Study:
    """Create the study, or load it when it exists with the same space, stage and objectives.

    The sampler's seed moves on by the trials the study already holds: a restarted tuner must not draw the values
    its first run drew again."""
    directions = [o.direction for o in space.objectives]
    held = 0
    if name in optuna.get_all_study_names(storage):
        old = optuna.load_study(study_name=name, storage=storage)
        info = old.user_attrs.get("info", {})
        fingerprint = json.loads(space.fingerprint())
        if info.get("space") != fingerprint or info.get("stage") != stage:
            raise LmforgeError(f"--study {name}: a study of that name in {url} has a different "
                               f"{'stage' if info.get('stage') != stage else 'space or objectives'}; "
                               f"give another --study name (or remove it)")
        held = len(old.trials)
    sampler = make_sampler(sampler_name, seed + held, space)
    try:
        return optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                   directions=directions, load_if_exists=True)
    except ValueError as err:  # e.g. directions differ from the stored study's
        raise LmforgeError(f"--study {name}: {err}") from None


def summarize(study: optuna.Study, info: dict, folder: Path) -> dict:
    info = {**info, "root": STAGES[info["stage"]], "recipe_tree": study.user_attrs["recipe_tree"]}
    summary = write_results(study, info, folder)
    best = summary["best"]
    if best:
        for b in best:
            console.print(f"best trial {b['trial']}: " + ", ".join(f"{k} {v:.4f}" for k, v in b["values"].items())
                          + f"; run folder {b['run_dir']}")
        console.print(f"best recipe: {folder / ('best.yaml' if len(best) == 1 else 'best-<trial>.yaml')}; table: "
                      f"{folder / 'trials.md'}")
    return summary


def show_study(study: str, *, storage: Optional[str] = None, out: Optional[Union[str, Path]] = None) -> RunResult:
    """Rewrite and print the results of an existing study (best trial, table, plots) from its storage."""
    folder = Path(out) if out else Path("runs") / "tune" / study
    if storage is None:
        found = [u for u, f in ((f"sqlite:///{folder / 'study.db'}", folder / "study.db"),
                                (f"journal:{folder / 'journal.log'}", folder / "journal.log")) if f.exists()]
        if not found:
            raise LmforgeError(f"{folder}: no study.db or journal.log here; give --storage URL (and --out FOLDER)")
        storage = found[0]
    the_storage = open_storage(storage)
    if study not in optuna.get_all_study_names(the_storage):
        names = optuna.get_all_study_names(the_storage)
        raise LmforgeError(f"--study {study}: no such study in {storage}"
                           + (f"; it holds: {', '.join(names)}" if names else " (it holds none)"))
    the_study = optuna.load_study(study_name=study, storage=the_storage)
    folder.mkdir(parents=True, exist_ok=True)
    return RunResult(folder, summarize(the_study, the_study.user_attrs["info"], folder))
