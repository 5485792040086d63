"""What every stage shares: the result its public entry returns, and a module that answers a call.

`from lmforge import pretrain` must give something to call, and the stage's module is named like its entry
(the CLI command, the module and the function share the name). Importing every stage at the package root would
cost each `lmforge --help` seconds of torch and transformers, so the root imports nothing heavy and each stage
module, when called, calls its entry: `pretrain(recipe)` is `lmforge.pretrain.pretrain(recipe)`.
"""

from __future__ import annotations

import inspect
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunResult:
    """What a stage's public entry returns: the run folder and the run's final metrics. It reads as its folder
    (`result / "final"`, `Path(result)`, `str(result)`)."""

    run_dir: Path
    metrics: dict = field(default_factory=dict)

    def __post_init__(self):
        self.run_dir = Path(self.run_dir)

    def __fspath__(self) -> str:
        return str(self.run_dir)

    def __str__(self) -> str:
        return str(self.run_dir)

    def __truediv__(self, other) -> Path:
        return self.run_dir / other


class StageModule(types.ModuleType):
    """A stage's module, callable as its public entry (the function of the same name inside it)."""

    def __call__(self, *args, **kwargs):
        return self._entry()(*args, **kwargs)

    def _entry(self):
        return getattr(self, self.__name__.rsplit(".", 1)[1])

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self._entry())


def callable_stage(name: str) -> None:
    """Make module `name` (a stage's `__name__`) callable as its entry; each stage calls this at its end."""
    sys.modules[name].__class__ = StageModule
