"""Hyperparameter search over any recipe field with Optuna: `tune(recipe, space)` runs a study whose trials are
ordinary run folders; `show_study(name)` rewrites and prints the results of one. See docs/tuning.md."""

from lmforge.stage import callable_stage
from lmforge.tune.study import show_study, tune

__all__ = ["show_study", "tune"]

callable_stage(__name__)  # `from lmforge import tune` can be called: tune(recipe, space)
