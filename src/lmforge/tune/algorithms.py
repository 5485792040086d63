"""The search algorithms a study can use, by name: Optuna's samplers and pruners, seeded."""

from __future__ import annotations

import warnings
from typing import Optional

import optuna

from lmforge.errors import LmforgeError
from lmforge.tune.space import SearchSpace

SAMPLERS = ("tpe", "random", "grid", "cmaes", "nsga2")
PRUNERS = ("median", "asha", "hyperband", "none")


def grid_of(space: SearchSpace) -> dict[str, list]:
    """Every value of each field, for the grid sampler (continuous ranges need a step)."""
    grid = {}
    for p in space.params:
        if p.kind == "categorical":
            grid[p.path] = p.choices
        elif p.step is not None:
            n = int(round((p.high - p.low) / p.step))
            grid[p.path] = [p.low + i * p.step for i in range(n + 1)]
        else:
            raise LmforgeError(f"--sampler grid: {p.path} is a continuous range; give it a step or categorical values")
    return grid


def make_sampler(name: str, seed: int, space: SearchSpace):
    multi = len(space.objectives) > 1
    if name == "tpe":
        with warnings.catch_warnings():
            # Optuna marks `group` experimental; it is what lets TPE model fields that exist only `when` others do.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "cmaes":
        if multi:
            raise LmforgeError("--sampler cmaes: CMA-ES searches one objective; use tpe or nsga2 for several")
        return optuna.samplers.CmaEsSampler(seed=seed)
    return optuna.samplers.GridSampler(grid_of(space), seed=seed)


def make_pruner(name: Optional[str], space: SearchSpace):
    multi = len(space.objectives) > 1
    if name is None:
        name = "none" if multi else "median"
    if name != "none" and multi:
        raise LmforgeError(f"--pruner {name}: Optuna prunes single-objective studies only; use --pruner none")
    return name, pruner_named(name)


def pruner_named(name: str):
    if name == "median":  # prunes from the fifth trial on, at any evaluation below the median of the others
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0)
    # Rungs count training steps from 1 (not Optuna's "auto", which learns nothing from the first trial): a trial
    # goes on at an evaluation only while it is in the best quarter of the trials seen at that rung.
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=4)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=4)
    return optuna.pruners.NopPruner()
