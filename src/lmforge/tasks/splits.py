"""What every task's data and reports share: the split names, where a split comes from, a seeded split of the
training file, and files written whole (to a temporary name, then renamed)."""

from __future__ import annotations

import os
import random
from pathlib import Path

from lmforge.errors import LmforgeError

SPLITS = ("train", "validation", "test")


def source_of(data, split: str) -> str:
    """Where a split's examples come from: its file, or a seeded share of the training file."""
    spec = getattr(data, split, None)
    if spec is not None:
        return spec.path
    return f"{data.train.path}, {split} share of data.split"


def split_rows(rows: list, shares, by_label: bool) -> dict[str, list]:
    """`rows` split into train / validation / test by `shares` (seeded): each label's rows in proportion when
    `by_label` (single-label: the label; multi-label: the label set), rows keep their file order."""
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        key = tuple(row.labels) if by_label else ()
        groups.setdefault(key, []).append(i)
    rng = random.Random(shares.seed)
    held: dict[str, list[int]] = {"validation": [], "test": []}
    for key in sorted(groups):
        members = groups[key][:]
        rng.shuffle(members)
        n_val, n_test = round(len(members) * shares.validation), round(len(members) * shares.test)
        held["validation"] += members[:n_val]
        held["test"] += members[n_val:n_val + n_test]
    out_of_train = set(held["validation"]) | set(held["test"])
    out = {"train": [r for i, r in enumerate(rows) if i not in out_of_train]}
    for name, picked in held.items():
        if picked:
            out[name] = [rows[i] for i in sorted(picked)]
    if not out["train"]:
        raise LmforgeError("data.split: no training examples left; lower data.split.validation / test")
    return out


def read_splits(recipe, read) -> dict[str, list]:
    """Each split's rows, `read(split_file, recipe.data)` for a split with its own file, else a seeded share of the
    training file; capped by max_examples (train) and max_eval_examples (validation, test)."""
    d = recipe.data
    splits = {name: read(getattr(d, name), d) for name in SPLITS if getattr(d, name) is not None}
    if d.split is not None:
        splits.update(split_rows(splits["train"], d.split, by_label=False))
    for name in splits:
        cap = d.max_examples if name == "train" else d.max_eval_examples
        splits[name] = splits[name][:cap] if cap else splits[name]
    return splits


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
