"""Experts as independent jobs. Branch-Train-Merge's experts never talk to each other while they train, so each
is its own job: local processes on this machine, one torchrun command per expert for the user's scheduler, or
a SLURM job array. Every job is the same command, `lmforge experts train RUN --domain D --launch inline`,
and `experts status` / `experts merge` pick up whichever experts have finished.

    RUN/experts/<name>.log            a local job's output (stdout and stderr)
    RUN/experts/train.sbatch          the SLURM job array (--launch slurm)
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lmforge.engine import checkpoint as ckpt
from lmforge.engine.logging import console
from lmforge.errors import LmforgeError
from lmforge.recipe import load_recipe
from lmforge.runs import manifest

LAUNCHERS = ("local", "inline", "print", "slurm")
DENSE, DEMIX = "dense", "demix"


@dataclass(frozen=True)
class Job:
    """One expert's training: `name` is a domain, or 'dense' / 'demix' for the baselines."""
    name: str
    flags: tuple[str, ...]

    def argv(self, run: Path, set_: list[str]) -> list[str]:
        """The CLI arguments after `lmforge` that train this job alone, in this process."""
        extra = [a for s in set_ for a in ("--set", s)]
        return ["experts", "train", str(run), *self.flags, "--launch", "inline", "--no-progress", *extra]


def jobs_for(run: Path, domains: Optional[list[str]], dense: bool, demix: bool, *,
             missing_only: bool = False) -> list[Job]:
    """The jobs `experts train` was asked for: the named experts (None: all, [] none) and the baselines;
    with `missing_only`, the ones whose final model is not there yet."""
    info = manifest(run)
    names = list(info["domains"] if domains is None else domains)
    unknown = sorted(set(names) - set(info["domains"]))
    if unknown:
        raise LmforgeError(f"--domain: {unknown} not among this run's experts {info['domains']}")
    jobs = [Job(d, ("--domain", d)) for d in names]
    jobs += [Job(DENSE, ("--dense",))] * dense + [Job(DEMIX, ("--demix",))] * demix
    if missing_only:
        finished = {row["name"] for row in status(run) if row["state"] == "trained"}
        jobs = [j for j in jobs if j.name not in finished]
    return jobs


def _final(run: Path, info: dict, name: str) -> tuple[Path, Path]:
    """(the run folder, the folder holding its final model) of an expert or baseline."""
    if name == DEMIX:
        return run / "demix-run", run / "demix"
    folder = run / (info["experts"][name] if name in info["experts"] else name)
    return folder, folder / "final"


def _max_steps(run: Path, info: dict, name: str) -> Optional[int]:
    recipe = run / f"{info['experts'][name]}.yaml" if name in info["experts"] else None
    return load_recipe(recipe).train.max_steps if recipe is not None and recipe.is_file() else None


def status(run: Path) -> list[dict]:
    """One row per expert (and per baseline begun): trained, running or stopped at step N of M, or missing."""
    run = Path(run)
    info = manifest(run)
    names = list(info["domains"]) + [n for n in (DENSE, DEMIX) if _final(run, info, n)[0].exists()]
    rows = []
    for name in names:
        folder, final = _final(run, info, name)
        latest = ckpt.latest_checkpoint(folder / "checkpoints") if folder.is_dir() else None
        if (final / "config.json").is_file():
            state, detail = "trained", str(final)
        elif latest is not None:
            step = int(latest.name.split("-")[1])
            total = _max_steps(run, info, name)
            state, detail = "partial", f"checkpoint at step {step}" + (f" of {total}" if total else "")
        else:
            state, detail = "missing", f"lmforge experts train {run} --domain {name}" if name in info["domains"] \
                else "not trained"
        rows.append({"name": name, "state": state, "detail": detail})
    return rows


def finished_domains(run: Path) -> tuple[list[str], list[str]]:
    """(the experts whose final model exists, the ones still missing), in the run's domain order."""
    states = {row["name"]: row["state"] for row in status(run)}
    info = manifest(run)
    done = [d for d in info["domains"] if states[d] == "trained"]
    return done, [d for d in info["domains"] if d not in done]


def torchrun_commands(run: Path, jobs: list[Job], set_: list[str], nproc: int = 1) -> list[str]:
    """One shell line per job: torchrun on one machine (the job's processes share its GPUs), for any scheduler."""
    head = ["torchrun", "--standalone", f"--nproc_per_node={nproc}", "-m", "lmforge.cli"]
    return [shlex.join(head + job.argv(run, set_)) for job in jobs]


def write_slurm(run: Path, jobs: list[Job], set_: list[str], nproc: int = 1) -> Path:
    """RUN/experts/train.sbatch: a SLURM job array, task i trains job i; submit with `sbatch`."""
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={Path(run).name}-experts",
             f"#SBATCH --array=0-{len(jobs) - 1}",
             "#SBATCH --nodes=1",
             "#SBATCH --ntasks-per-node=1",
             f"#SBATCH --gpus-per-node={nproc}",
             f"#SBATCH --output={Path(run).resolve()}/experts/%x-%a.log",
             "# One expert per array task; the experts never communicate, so tasks may run anywhere, at any time.",
             "set -euo pipefail",
             f"cd {shlex.quote(str(Path.cwd()))}",
             "COMMANDS=("]
    lines += [f"  {shlex.quote(c)}" for c in torchrun_commands(Path(run).resolve(), jobs, set_, nproc)]
    lines += [")", 'srun bash -c "${COMMANDS[$SLURM_ARRAY_TASK_ID]}"', ""]
    path = Path(run) / "experts" / "train.sbatch"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path


def default_parallel(jobs: int) -> int:
    """Jobs at once on this machine: one per two cores (a training process keeps two busy), at least one."""
    return max(1, min(jobs, (os.cpu_count() or 1) // 2))


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def run_local(run: Path, jobs: list[Job], set_: list[str], parallel: Optional[int] = None,
              poll_s: float = 0.5) -> list[str]:
    """Run the jobs as processes on this machine, `parallel` at a time, each on its share of the cores and
    logging to RUN/experts/<name>.log; returns the finished names, or raises naming every failed job and its log."""
    parallel = parallel or default_parallel(len(jobs))
    threads = max(1, (os.cpu_count() or 1) // parallel)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    (Path(run) / "experts").mkdir(parents=True, exist_ok=True)
    waiting, running, done, failed = list(jobs), {}, [], []
    console.print(f"{len(jobs)} expert job(s), {parallel} at a time, {threads} thread(s) each; "
                  f"logs in {Path(run) / 'experts'}/<name>.log")
    while waiting or running:
        while waiting and len(running) < parallel:
            job = waiting.pop(0)
            log = Path(run) / "experts" / f"{job.name}.log"
            with log.open("w") as out:
                proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", *job.argv(run, set_)],
                                        stdout=out, stderr=subprocess.STDOUT, env=env)
            running[job.name] = (proc, log, time.monotonic())
            console.print(f"started {job.name} (pid {proc.pid})")
        for name, (proc, log, started) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            took = time.monotonic() - started
            if proc.returncode == 0:
                done.append(name)
                console.print(f"[green]finished[/] {name} in {took:.0f} s")
            else:
                failed.append((name, log))
                console.print(f"[red]failed[/] {name} (exit {proc.returncode}) after {took:.0f} s: {_last_line(log)}")
        time.sleep(poll_s if running else 0)
    if failed:
        raise LmforgeError("expert job(s) failed: " + ", ".join(f"{n} (log: {log})" for n, log in failed))
    return done
