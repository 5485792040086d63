"""`prep`: the recipe, then the engine that runs its stages — local processes or Ray Data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from lmforge.errors import LmforgeError
from lmforge.prep import pipeline, ray_engine
from lmforge.prep.config import PrepRecipe, load_prep_recipe
from lmforge.recipe import coerce_recipe
from lmforge.stage import RunResult

ENGINES = ("local", "ray")


def prep(recipe: Union[PrepRecipe, str, Path], *, force: bool = False, show_progress: bool = True,
         overrides: Union[list[str], tuple] = (), engine: Optional[str] = None,
         address: Optional[str] = None) -> RunResult:
    """Run the whole preparation (recipe object, YAML file or dict, plus `--set` style overrides); returns the
    dataset folder (train/ and validation/ Parquet shards) and its statistics (stats.json).

    `engine` overrides `prep.engine`; `address` names a running Ray cluster (HOST:PORT) for the ray engine,
    which otherwise starts a Ray on this machine with `num_proc` CPUs (at least 2)."""
    if engine is not None and engine not in ENGINES:
        raise LmforgeError(f"--engine {engine}: unknown engine; choose {' or '.join(ENGINES)}")
    overrides = [*overrides, f"engine={engine}"] if engine else overrides
    recipe = coerce_recipe(recipe, overrides, PrepRecipe, load_prep_recipe)
    if recipe.engine == "local":
        if address:
            raise LmforgeError("--address: only the ray engine runs on a cluster (add --engine ray)")
        return pipeline.run_local(pipeline.start(recipe, force), show_progress)
    with ray_engine.connected(address, max(2, recipe.num_proc)):
        return ray_engine.run(pipeline.start(recipe, force), show_progress)
