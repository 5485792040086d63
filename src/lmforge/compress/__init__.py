"""Compression: structured pruning (attention heads, FFN neurons), unstructured magnitude pruning, recovery by
fine-tuning and int8 quantization, chained as a recipe's steps; a size / speed / quality report of every variant
(`compress`) or of any run folders (`compare`)."""

from lmforge.compress.config import CompressRecipe, load_compress_recipe
from lmforge.compress.report import compare
from lmforge.compress.run import compress
from lmforge.stage import callable_stage

__all__ = ["CompressRecipe", "compare", "compress", "load_compress_recipe"]

callable_stage(__name__)  # `from lmforge import compress` can be called: compress(...)
