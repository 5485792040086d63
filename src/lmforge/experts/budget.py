"""The compute budget of an experts run: each expert's steps and batch, and the steps of a model trained on the
mixture (the dense baseline, DEMix) that sees as many tokens as the experts together."""

from __future__ import annotations

from lmforge.recipe import Recipe


def expert_budget(recipe: Recipe) -> tuple[int, int]:
    """(steps, batch size) of each expert: experts.steps and experts.batch_size, by default the recipe's train
    max_steps and batch_size."""
    cfg = recipe.experts
    return (cfg and cfg.steps) or recipe.train.max_steps, (cfg and cfg.batch_size) or recipe.train.batch_size


def mixture_steps(recipe: Recipe, n_experts: int) -> int:
    """Steps at train.batch_size that see as many tokens as `n_experts` experts together (the dense baseline's
    and DEMix's budget): n x experts.steps x experts.batch_size / train.batch_size, rounded to the nearest step."""
    steps, batch = expert_budget(recipe)
    return max(1, round(n_experts * steps * batch / recipe.train.batch_size))
