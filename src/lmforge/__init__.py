"""lmforge: the whole life of a transformer language model, from raw text to a served model."""

from lmforge.errors import LmforgeError
from lmforge.recipe import Recipe, load_recipe

__all__ = ["LmforgeError", "Recipe", "load_recipe", "__version__"]
__version__ = "0.1.0"
