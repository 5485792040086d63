"""The names a recipe can use for its objective, model family and expert routing rule, and what each names.

lmforge registers its own (`clm`, `gpt2`, `posterior`, …) where they are defined; user code adds more without
editing lmforge, before the recipe that names them is validated:

    from lmforge import register_objective
    from lmforge.objectives.mlm import MaskedLM

    @register_objective("my-mlm", like="mlm")     # data, model head and families as `mlm`
    class MyMaskedLM(MaskedLM):
        ...

A registry knows its built-in names from the start (a recipe naming one validates before the module that
defines it is imported); the entry itself is added when that module is imported.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable

from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class Entry:
    name: str
    value: Any                              # the class or factory the name stands for
    info: dict = field(default_factory=dict)


class Registry:
    def __init__(self, kind: str, builtin: tuple[str, ...]):
        self.kind, self.builtin = kind, builtin
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, **info) -> Callable:
        """Decorator: `@REGISTRY.register("name", **info)` over a class or a factory function."""
        def add(value):
            self.add(name, value, **info)
            return value
        return add

    def add(self, name: str, value: Any, **info) -> None:
        if not name or not isinstance(name, str):
            raise LmforgeError(f"{self.kind}: a name must be a non-empty string, got {name!r}")
        self._entries[name] = Entry(name, value, info)

    def names(self) -> list[str]:
        return sorted(set(self.builtin) | set(self._entries))

    def __contains__(self, name: str) -> bool:
        return name in self.builtin or name in self._entries

    def check(self, name: str) -> str:
        """`name` if it is known; a ValueError naming the closest known names otherwise (for recipe validation)."""
        if name not in self:
            close = difflib.get_close_matches(str(name), self.names(), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown {self.kind} {name!r}{hint} (known: {', '.join(self.names())})")
        return name

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            try:
                self.check(name)
            except ValueError as err:
                raise LmforgeError(str(err)) from None
            raise LmforgeError(f"{self.kind} {name!r} is built in but its module was not imported")
        return self._entries[name]

    def info(self, name: str, key: str, default: Any = None) -> Any:
        entry = self._entries.get(name)
        return entry.info.get(key, default) if entry else default


# Objectives: value(config, tokenizer, seed) -> Objective; info `like`: the built-in objective whose data layout,
# model head and model families it shares.
OBJECTIVES = Registry("objective", ("clm", "mlm", "mlm+nsp", "mlm+sop", "electra", "span"))
# Model families: value(dims, model_config, objective_config, tokenizer) -> a transformers PretrainedConfig;
# info `kind`: decoder | encoder | encoder-decoder.
FAMILIES = Registry("model family", ("bert", "roberta", "electra", "gpt2", "llama", "t5"))
# Expert routing rules of an ensemble: value(folder, spec, domains, settings) -> None (the Bayes domain posterior)
# or a callable input_ids (B, T) -> (B, T, n_experts) weights.
ROUTERS = Registry("routing rule", ("posterior", "clusters"))


def register_objective(name: str, *, like: str) -> Callable:
    """Register an objective class or factory `(config, tokenizer, seed) -> Objective` under `name`; `like` is
    the built-in objective whose data layout, model head and families it shares (e.g. 'mlm', 'clm')."""
    if like not in OBJECTIVES.builtin:
        raise LmforgeError(f"register_objective({name!r}): like={like!r} is not a built-in objective "
                           f"({', '.join(OBJECTIVES.builtin)})")
    return OBJECTIVES.register(name, like=like)


def register_family(name: str, *, kind: str) -> Callable:
    """Register a model family: a function `(dims, model_config, objective_config, tokenizer) -> PretrainedConfig`
    (dims: layers, d, heads, ff from the size preset and the recipe); `kind` is decoder, encoder or
    encoder-decoder, which decides the objectives it can train."""
    if kind not in ("decoder", "encoder", "encoder-decoder"):
        raise LmforgeError(f"register_family({name!r}): kind must be decoder, encoder or encoder-decoder")
    return FAMILIES.register(name, kind=kind)


def register_router(name: str) -> Callable:
    """Register an expert routing rule: a factory `(folder, spec, domains, settings) -> router or None`, where a
    router maps input ids (B, T) to per-position expert weights (B, T, n_experts) that sum to one."""
    return ROUTERS.register(name)


def objective_kind(name: str) -> str:
    """The built-in objective `name` behaves like (itself for a built-in)."""
    return name if name in OBJECTIVES.builtin else OBJECTIVES.info(name, "like", name)
