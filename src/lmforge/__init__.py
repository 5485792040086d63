"""lmforge: the whole life of a transformer language model, from raw text to a served model.

Each stage's public entry takes a recipe (an object, a YAML file or a dict) plus `--set` style overrides and
returns a `RunResult` (the run folder and its metrics); the CLI is a thin shell over exactly these:

    from lmforge import prep, pretrain, finetune, index, evaluate, generate, experts, tune, compress, distill, export

Objectives, model families and expert routing rules are looked up by name; `register_objective`,
`register_family` and `register_router` add new ones from user code.

The stages load on first use (`from lmforge import pretrain` imports `lmforge.pretrain`, whose module is callable
as its entry; see `lmforge.stage`), so `import lmforge` stays light.
"""

import importlib

from lmforge.errors import LmforgeError
from lmforge.recipe import Recipe, load_recipe
from lmforge.registry import register_family, register_objective, register_router
from lmforge.stage import RunResult

__all__ = ["LmforgeError", "Recipe", "RunResult", "compress", "distill", "evaluate", "experts", "export", "finetune",
           "generate", "index", "load_recipe", "prep", "pretrain", "register_family", "register_objective", "register_router",
           "tune", "__version__"]
__version__ = "0.1.0"

_STAGES = ("compress", "distill", "evaluate", "experts", "export", "finetune", "generate", "index", "prep", "pretrain", "tune")


def __getattr__(name: str):
    # `import lmforge; lmforge.pretrain(...)`: a stage loads when first named.
    if name in _STAGES:
        return importlib.import_module(f"lmforge.{name}")
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
