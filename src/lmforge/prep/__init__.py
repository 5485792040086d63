"""Data preparation: raw text → normalised, filtered, deduplicated, split and mixed Parquet dataset."""

from lmforge.prep.config import PrepRecipe, load_prep_recipe, prep_recipe_from_dict
from lmforge.prep.pipeline import MARKER
from lmforge.prep.run import prep
from lmforge.stage import callable_stage

__all__ = ["PrepRecipe", "load_prep_recipe", "prep_recipe_from_dict", "prep", "MARKER"]

callable_stage(__name__)  # `from lmforge import prep` can be called: prep(...)
