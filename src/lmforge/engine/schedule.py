"""Learning-rate schedules: linear warmup, then cosine, linear or constant decay to min_lr."""

from __future__ import annotations

import math


def warmup_steps(warmup: float, max_steps: int) -> int:
    """A value below 1 is a fraction of the run (the transformers 5 convention)."""
    return int(round(warmup * max_steps)) if 0 < warmup < 1 else int(warmup)


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, max_steps: int, schedule: str) -> float:
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if schedule == "linear":
        return lr + (min_lr - lr) * progress
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
