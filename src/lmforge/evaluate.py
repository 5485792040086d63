"""Perplexity of causal LMs and masked-token loss/perplexity of MLMs, overall and per domain.

Losses are reduced per batch (sums by domain), never by holding logits; under DDP each rank takes
every world-th batch and the sums are all-reduced.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from lmforge.data.blocks import BlockData, build_blocks
from lmforge.engine import distributed as dist
from lmforge.errors import LmforgeError
from lmforge.objectives import build_objective
from lmforge.runs import open_run
from lmforge.stage import callable_stage
from lmforge.tasks.embed import is_embedding_folder
from lmforge.tasks.predict import is_seq2seq_run, is_task_run
from lmforge.tasks.report import evaluate_task_run
from lmforge.tasks.retrieval import evaluate_embedding_run
from lmforge.tasks.seq2seq_eval import evaluate_seq2seq_run

EVAL_EXAMPLE_OFFSET = 10**12  # validation masks never coincide with training masks


def _safe_exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


@torch.no_grad()
def evaluate_blocks(model, objective, data: BlockData, *, split: str = "validation", batch_size: int = 32,
                    max_batches: Optional[int] = None, device=None) -> dict:
    ds = data.validation if split == "validation" else data.train
    if ds is None or len(ds) == 0:
        return {}
    device = device or next(model.parameters()).device
    n_domains = len(data.domains)
    sums = torch.zeros(n_domains, dtype=torch.float64)
    counts = torch.zeros(n_domains, dtype=torch.float64)
    # A capped evaluation uses a fixed random subset, so every domain is represented.
    order = np.random.default_rng(0).permutation(len(ds)) if max_batches else np.arange(len(ds))
    starts = list(range(0, len(ds), batch_size))
    if max_batches:
        starts = starts[:max_batches]
    was_training = model.training
    model.eval()
    take = getattr(objective, "take_tallies", lambda training: {})
    take(False)
    for b, start in enumerate(starts):
        if b % dist.world_size() != dist.rank():
            continue
        rows = order[start:start + batch_size].tolist()
        ids, domains = data.batch(split, rows)
        ids, domains = torch.from_numpy(ids), torch.from_numpy(domains)
        batch = objective.make_batch(ids, torch.tensor(rows) + EVAL_EXAMPLE_OFFSET, domains)
        tokens = objective.token_counts(batch).double()
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        _, _, per_example = objective.loss(model, batch)
        sums.index_add_(0, domains, per_example.double().cpu())
        counts.index_add_(0, domains, tokens)
    model.train(was_training)
    tallies = take(False)
    names = list(getattr(objective, "tally_names", ()))  # the same on every rank, even one without batches
    extra = torch.tensor([x for n in names for x in tallies.get(n, (0.0, 0.0))], dtype=torch.float64)
    totals = dist.all_reduce_sum(torch.cat([sums, counts, extra]).to(device)).cpu()
    extra = totals[2 * n_domains:]
    sums, counts = totals[:n_domains], totals[n_domains:2 * n_domains]
    if counts.sum() == 0:
        return {}
    loss = float(sums.sum() / counts.sum())
    metrics = {"loss": loss, "ppl": _safe_exp(loss), "eval_tokens": int(counts.sum())}
    metrics.update({n: float(extra[2 * i] / extra[2 * i + 1]) for i, n in enumerate(names) if extra[2 * i + 1]})
    for i, name in enumerate(data.domains):
        if counts[i] > 0:
            d_loss = float(sums[i] / counts[i])
            metrics[f"loss/{name}"] = d_loss
            metrics[f"ppl/{name}"] = _safe_exp(d_loss)
    return metrics


def format_table(metrics: dict, title: str = "") -> str:
    """Markdown table: one row per domain plus 'all'."""
    domains = sorted(k.split("/", 1)[1] for k in metrics if k.startswith("loss/"))
    lines = ["| domain | loss | perplexity |", "|---|---:|---:|"]
    for d in domains:
        lines.append(f"| {d} | {metrics[f'loss/{d}']:.4f} | {metrics[f'ppl/{d}']:.2f} |")
    lines.append(f"| **all** | {metrics['loss']:.4f} | {metrics['ppl']:.2f} |")
    return (f"{title}\n\n" if title else "") + "\n".join(lines)


def evaluate_run(run_dir, *, split: str = "validation", which: Optional[str] = None,
                 batch_size: Optional[int] = None, max_batches: Optional[int] = None) -> dict:
    """Evaluate a pretraining run folder's model on its recipe's data."""

    recipe, model, tokenizer = open_run(run_dir, which)
    if recipe is None:
        raise LmforgeError(f"{run_dir}: not an lmforge run folder (no recipe.yaml), so there is no data to "
                           "evaluate on")
    data = build_blocks(recipe.data, tokenizer, recipe.objective)
    if split == "validation" and data.validation is None:
        raise LmforgeError(f"{run_dir}: the recipe's data has no validation documents "
                           "(raise data.validation_fraction or give a source with split: validation)")
    objective = build_objective(recipe.objective, tokenizer, seed=recipe.train.seed)
    metrics = evaluate_blocks(model, objective, data, split=split, batch_size=batch_size or recipe.train.batch_size,
                              max_batches=max_batches)
    metrics["objective"] = recipe.objective.name
    return metrics


def evaluate(run_dir, *, split: str = "validation", which: Optional[str] = None, file: Optional[Path] = None,
             batch_size: Optional[int] = None, max_batches: Optional[int] = None) -> dict:
    """The metrics of a run folder on a split of its recipe's data: a fine-tuning run's task report (accuracy,
    F1, MCC or entity-level scores; `file` scores another file as the split), or a pretraining run's loss and
    perplexity, overall and per domain. An experts run is evaluated by `lmforge.experts.evaluate`."""
    if is_task_run(Path(run_dir)) and is_embedding_folder(Path(run_dir)):
        return evaluate_embedding_run(Path(run_dir), split, file)
    if is_seq2seq_run(Path(run_dir)):
        return evaluate_seq2seq_run(Path(run_dir), split, file, which=which)
    if is_task_run(Path(run_dir)):
        return evaluate_task_run(Path(run_dir), split, file, which=which)
    if file is not None:
        raise LmforgeError("--file: only a fine-tuning run scores a file; a pretraining run reads its recipe's data")
    return evaluate_run(run_dir, split=split, which=which, batch_size=batch_size, max_batches=max_batches)

callable_stage(__name__)  # `from lmforge import evaluate` can be called: evaluate(...)
