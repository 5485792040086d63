"""The search space of a study: which recipe fields a trial sets, over which values, toward which objectives.

    # space.yaml
    objectives: [accuracy]                     # or [{accuracy: max}, {parameters: min}]; default: the stage's metric
    params:
      train.lr: {float: [1.0e-5, 1.0e-3], log: true}
      train.batch_size: {categorical: [16, 32]}
      train.warmup_steps: {float: [0.0, 0.2]}
      strategy.peft.r: {int: [4, 16], step: 4, when: {strategy.method: peft}}

A field is named by its dotted path in the recipe (as `--set` names it). `when` samples a field only when other
fields (sampled earlier in the file, or fixed in the recipe) hold the given values. Everything is checked against
the recipe's schema before any trial runs.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import BaseModel

from lmforge.errors import LmforgeError
from lmforge.recipe import _section_class, closest_key, read_yaml_mapping, validate_tree

KINDS = ("float", "int", "categorical")
# Objectives every stage can report besides its metrics: the model's size and the trial's wall time.
EXTRA_OBJECTIVES = {"parameters": "min", "seconds": "min"}


@dataclass
class Param:
    path: str
    kind: str                       # float | int | categorical
    low: Any = None
    high: Any = None
    log: bool = False
    step: Optional[float] = None
    choices: list = field(default_factory=list)
    when: dict = field(default_factory=dict)

    def values_to_check(self) -> list:
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def suggest(self, trial):
        if self.kind == "float":
            return trial.suggest_float(self.path, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.path, self.low, self.high, log=self.log, step=int(self.step or 1))
        return trial.suggest_categorical(self.path, self.choices)


@dataclass
class Objective:
    metric: str
    direction: str                  # maximize | minimize


@dataclass
class SearchSpace:
    params: list[Param]
    objectives: list[Objective]
    source: str = "space"

    def fingerprint(self) -> str:
        """What must match for a study to continue: the fields, their ranges and the objectives."""
        return json.dumps({"params": [vars(p) for p in self.params],
                           "objectives": [vars(o) for o in self.objectives]}, sort_keys=True, default=str)

    def sample(self, trial, fixed: dict) -> dict[str, Any]:
        """The values of one trial, in the file's order; a `when` field only where its condition holds."""
        values: dict[str, Any] = {}
        for p in self.params:
            if all(values.get(k, fixed.get(k)) == v for k, v in p.when.items()):
                values[p.path] = p.suggest(trial)
        return values


def _number(value, where: str, integer: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise LmforgeError(f"{where}: expected {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise LmforgeError(f"{where}: expected a finite number, got {value!r}")
    return int(value) if integer else float(value)


def parse_param(path: str, spec, where: str) -> Param:
    if not isinstance(spec, dict):
        raise LmforgeError(f"{where}: expected a mapping like {{float: [low, high]}}, got {spec!r}")
    kinds = [k for k in KINDS if k in spec]
    unknown = sorted(set(spec) - set(KINDS) - {"log", "step", "when"})
    if unknown:
        close = difflib.get_close_matches(unknown[0], [*KINDS, "log", "step", "when"], n=1, cutoff=0.5)
        raise LmforgeError(f"{where}: unknown key '{unknown[0]}'" + (f"; did you mean '{close[0]}'?" if close else
                                                                     f"; valid keys: {', '.join(KINDS)}, log, step, when"))
    if len(kinds) != 1:
        raise LmforgeError(f"{where}: give exactly one of float: [low, high], int: [low, high] or "
                           f"categorical: [values]")
    kind = kinds[0]
    when = spec.get("when") or {}
    if not isinstance(when, dict):
        raise LmforgeError(f"{where}.when: expected a mapping of field: value, got {when!r}")
    if kind == "categorical":
        choices = spec["categorical"]
        if not isinstance(choices, list) or len(choices) < 2:
            raise LmforgeError(f"{where}.categorical: give at least two values to choose from, got {choices!r}")
        if len({json.dumps(c, sort_keys=True) for c in choices}) != len(choices):
            raise LmforgeError(f"{where}.categorical: values repeat: {choices!r}")
        return Param(path, kind, choices=choices, when=when)
    bounds = spec[kind]
    if not isinstance(bounds, list) or len(bounds) != 2:
        raise LmforgeError(f"{where}.{kind}: expected [low, high], got {bounds!r}")
    low, high = (_number(b, f"{where}.{kind}", kind == "int") for b in bounds)
    if low >= high:
        raise LmforgeError(f"{where}.{kind}: low {low} must be below high {high} (bounds reversed or equal?)")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise LmforgeError(f"{where}.{kind}: a log scale needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        step = _number(step, f"{where}.step", kind == "int")
        if step <= 0 or step > high - low:
            raise LmforgeError(f"{where}.step: {step} must be above 0 and at most high - low ({high - low})")
        if log:
            raise LmforgeError(f"{where}: log and step cannot be combined (Optuna samples one or the other)")
    return Param(path, kind, low, high, log, step, when=when)


def field_at(root: type[BaseModel], path: str, where: str) -> None:
    """Check that `path` names a setting (not a section) of recipe class `root`, with a did-you-mean hint."""
    cls, parts = root, path.split(".")
    for i, part in enumerate(parts):
        fields = cls.model_fields if cls is not None else {}
        if part not in fields:
            close = closest_key(part, list(fields))
            prefix = ".".join(parts[:i + 1])
            hint = f"; did you mean '{'.'.join(parts[:i] + [close])}'?" if close else \
                f"; valid keys here: {', '.join(fields)}"
            raise LmforgeError(f"{where}: '{prefix}' is not a recipe field{hint}")
        sub = _section_class(fields[part].annotation)
        if i == len(parts) - 1 and sub is not None and "dict" not in str(fields[part].annotation):
            raise LmforgeError(f"{where}: '{path}' is a section; name one of its fields, e.g. "
                               f"'{path}.{next(iter(sub.model_fields))}'")
        cls = sub


def parse_objectives(raw, where: str, default: Objective, metrics: set[str]) -> list[Objective]:
    if raw is None:
        return [default]
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise LmforgeError(f"{where}: give at least one objective")
    out = []
    for item in items:
        name, direction = (next(iter(item.items())) if isinstance(item, dict) and len(item) == 1 else (item, None))
        if not isinstance(name, str):
            raise LmforgeError(f"{where}: expected a metric name or {{metric: max|min}}, got {item!r}")
        if name not in metrics and name not in EXTRA_OBJECTIVES:
            close = difflib.get_close_matches(name, sorted(metrics | set(EXTRA_OBJECTIVES)), n=1, cutoff=0.5)
            raise LmforgeError(f"{where}: '{name}' is not a metric this stage reports" +
                               (f"; did you mean '{close[0]}'?" if close else
                                f"; it reports: {', '.join(sorted(metrics | set(EXTRA_OBJECTIVES)))}"))
        if direction is None:
            direction = EXTRA_OBJECTIVES.get(name) or (default.direction[:3] if name == default.metric else None)
            if direction is None:
                raise LmforgeError(f"{where}: say whether '{name}' should go up or down: {{{name}: max}} or "
                                   f"{{{name}: min}}")
        if direction not in ("max", "min", "maximize", "minimize"):
            raise LmforgeError(f"{where}: '{name}: {direction}': expected max or min")
        out.append(Objective(name, "maximize" if direction.startswith("max") else "minimize"))
    if len({o.metric for o in out}) != len(out):
        raise LmforgeError(f"{where}: an objective is named twice")
    return out


def load_space(source: Union[str, Path, dict], root: type[BaseModel], recipe_tree: dict, default: Objective,
               metrics: set[str]) -> SearchSpace:
    """Read and check a space (file or dict) against the recipe class `root` and the recipe's own values."""
    name = str(source) if not isinstance(source, dict) else "space"
    tree = source if isinstance(source, dict) else read_yaml_mapping(source, "a space is a mapping with `params:`")
    unknown = sorted(set(tree) - {"params", "objectives"})
    if unknown:
        raise LmforgeError(f"{name}: unknown key '{unknown[0]}'; a space has `params:` and optional `objectives:`")
    raw = tree.get("params")
    if not raw or not isinstance(raw, dict):
        raise LmforgeError(f"{name}: params: the space is empty; name at least one recipe field to search, "
                           f"e.g. params: {{train.lr: {{float: [1.0e-5, 1.0e-3], log: true}}}}")
    params = []
    for path, spec in raw.items():
        where = f"{name}: params.{path}"
        field_at(root, str(path), where)
        param = parse_param(str(path), spec, where)
        for key in param.when:
            field_at(root, str(key), f"{where}.when")
        for value in param.values_to_check():  # each extreme must be a value the recipe accepts
            try:
                validate_tree(root, recipe_tree, name, [f"{path}={json.dumps(value)}"])
            except LmforgeError as err:
                raise LmforgeError(f"{where}: the value {value!r} is not accepted: "
                                   f"{str(err).split(': ', 2)[-1]}") from None
        params.append(param)
    objectives = parse_objectives(tree.get("objectives"), f"{name}: objectives", default, metrics)
    return SearchSpace(params, objectives, name)
