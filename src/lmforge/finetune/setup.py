"""What every fine-tuning run does first, whatever its task: threads, device, the base model's folder and tokenizer,
and the token budget per example checked against the model's position limit."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from lmforge.engine import distributed as dist
from lmforge.engine.checkpoint import load_weights
from lmforge.engine.hardware import pick_device
from lmforge.errors import LmforgeError
from lmforge.tasks import model as tm
from lmforge.tasks.config import FinetuneRecipe


def open_base(recipe: FinetuneRecipe) -> tuple[Path, object, float]:
    """(base model folder, tokenizer, start time); sets `recipe.data.max_length` when the recipe leaves it out."""
    cfg = recipe.train
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    dist.setup(pick_device(cfg.device), recipe.dist.timeout_s)
    folder = tm.resolve_base(recipe.model.path)
    tokenizer = tm.load_task_tokenizer(recipe.model, folder)
    limit = tm.position_limit(json.loads((folder / "config.json").read_text()))
    if recipe.data.max_length is None:
        recipe.data.max_length = min(128, limit)
    elif recipe.data.max_length > limit:
        raise LmforgeError(f"data.max_length: {recipe.data.max_length} is above the model's position limit {limit}")
    return folder, tokenizer, started


def train_settings(recipe: FinetuneRecipe, loader) -> object:
    """The train section the engine runs: steps from epochs when max_steps is unset, an evaluation per epoch when
    eval_every is unset, and the task's dev metric."""
    cfg = recipe.train
    return cfg.model_copy(update={
        "max_steps": cfg.max_steps or max(1, round(cfg.epochs * loader.batches_per_epoch
                                                   / (cfg.grad_accum * dist.world_size()))),
        "eval_every": cfg.eval_every if cfg.eval_every is not None else loader.steps_per_epoch,
        "metric": recipe.metric})


def fit_and_pick(engine, run_dir: Path) -> tuple[object, object, int]:
    """Train; then (state, model, step) for the report: on the main process the model of the dev metric's best
    step when a `best/` checkpoint was kept, else of the last step (under FSDP the gathered, plain model; on
    other processes what `export_model` returns there)."""
    state = engine.fit()
    model = engine.export_model()
    step = state.step
    if dist.is_main():
        model = model.to(engine.device)
        if (Path(run_dir) / "best").is_dir():
            load_weights(model, Path(run_dir) / "best", engine.device)
            step = state.best_step
    return state, model, step
