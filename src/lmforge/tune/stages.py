"""What tuning needs to know of each stage it can search: how to read its recipe, what it reports, how to run it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

from pydantic import BaseModel

from lmforge.finetune import finetune
from lmforge.pretrain import pretrain
from lmforge.recipe import Recipe, load_recipe, read_yaml_mapping
from lmforge.tasks.config import FinetuneRecipe, load_finetune_recipe
from lmforge.tune.space import Objective

TASK_METRICS = {"classification": {"accuracy", "macro_f1", "micro_f1", "mcc", "loss"},
                "ner": {"f1", "precision", "recall", "macro_f1", "token_accuracy", "loss"}}


@dataclass
class Stage:
    name: str                                 # finetune | pretrain
    root: type[BaseModel]                     # the recipe class
    load: Callable                            # (path, overrides) -> recipe
    run: Callable                             # the stage's entry: run(recipe, show_progress=..., on_eval=...)
    metrics: set[str]                         # what its evaluation reports
    default: Objective                        # what a study optimises when the space names nothing


STAGES = {"finetune": FinetuneRecipe, "pretrain": Recipe}  # recipe class of each stage a study can search


def direction_of(metric: str) -> str:
    return "minimize" if metric.split("/")[0] in ("loss", "ppl") else "maximize"


def stage_of(recipe_file: Union[str, Path], tree: dict = None) -> Stage:
    """The stage a recipe belongs to: fine-tuning recipes have a `task:`, pretraining recipes do not."""
    tree = tree if tree is not None else read_yaml_mapping(recipe_file, "a recipe is a mapping of sections")
    if "task" in tree:
        recipe = load_finetune_recipe(recipe_file) if recipe_file else None
        task = tree["task"]
        metric = recipe.metric if recipe else ("accuracy" if task == "classification" else "f1")
        mode = recipe.train.metric_mode if recipe else "max"
        return Stage("finetune", FinetuneRecipe, load_finetune_recipe, finetune,
                     TASK_METRICS.get(task, set()) | {metric},
                     Objective(metric, "maximize" if mode == "max" else "minimize"))
    recipe = load_recipe(recipe_file)
    domains = sorted({s.domain for s in recipe.data.sources if getattr(s, "domain", None)})
    metrics = {"loss", "ppl"} | {f"{kind}/{d}" for d in domains for kind in ("loss", "ppl")}
    return Stage("pretrain", Recipe, load_recipe, pretrain, metrics, Objective("loss", "minimize"))
