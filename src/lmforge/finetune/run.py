"""The fine-tuning stage: recipe → task data → task model (+ strategy) → engine → evaluated, exported run folder.

    RUN/
      recipe.yaml  metrics.jsonl  loss.png
      final/              the fine-tuned model (merged, for peft) + tokenizer: AutoModelFor*Classification loads it
      adapter/            peft runs: the adapter alone, in peft's format
      best/ checkpoints/  best dev checkpoint and resumable step checkpoints
      eval-{split}.json  report-{split}.txt  report-{split}.png
      README.md           model card: data, recipe, scores
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import torch

from lmforge.engine import checkpoint as ckpt
from lmforge.engine import distributed as dist
from lmforge.engine.hardware import pick_device
from lmforge.engine.loop import Engine, load_weights
from lmforge.engine.logging import console
from lmforge.errors import LmforgeError
from lmforge.finetune import model as tm
from lmforge.finetune.config import FinetuneRecipe
from lmforge.finetune.fast import first_position_only
from lmforge.finetune.encode import Encoded, TaskLoader, encode_classification, encode_ner
from lmforge.finetune.metrics import classification_metrics, format_report, ner_metrics, plot_confusion
from lmforge.finetune.objective import TaskObjective, predict_encoded, word_predictions
from lmforge.finetune.tables import LabelSet, read_rows, read_sentences
from lmforge.models import flops_per_token, frozen_body_parameters

SPLITS = ("train", "validation", "test")


class TaskData:
    """The recipe's splits, read and encoded, with the label set."""

    def __init__(self, recipe: FinetuneRecipe, tokenizer, labels: Optional[list[str]] = None):
        d, self.task = recipe.data, recipe.task
        self.raw, self.encoded = {}, {}
        for split in SPLITS:
            spec = getattr(d, split)
            if spec is not None:
                self.raw[split] = read_rows(spec, d) if self.task == "classification" else read_sentences(spec, d)
        if d.max_examples:
            self.raw["train"] = self.raw["train"][:d.max_examples]
        if labels is None:
            if self.task == "classification":
                labels = LabelSet.infer([r.labels for r in self.raw["train"]], d.labels, d.unknown_label).names
            else:
                from lmforge.finetune.conll import label_list
                labels = d.labels or label_list(self.raw["train"])
        self.labels = LabelSet(labels, d.unknown_label)
        for split, raw in self.raw.items():
            where = getattr(d, split).path
            if self.task == "classification":
                enc = encode_classification(tokenizer, raw, self.labels, d.max_length, d.multi_label, where)
            else:
                enc = encode_ner(tokenizer, raw, self.labels, d.max_length, where)
            self.encoded[split] = enc
            if enc.truncated:
                console.print(f"[yellow]{where}: {enc.truncated} of {len(raw)} examples truncated to "
                              f"{d.max_length} tokens")
            if enc.windows:
                console.print(f"{where}: {enc.windows} of {len(raw)} sentences longer than {d.max_length} tokens "
                              "split into windows")


def class_weights(recipe: FinetuneRecipe, data: TaskData) -> Optional[torch.Tensor]:
    spec = recipe.train.class_weights
    if spec is None:
        return None
    names = data.labels.names
    if spec == "balanced":  # n / (k * count): sklearn's 'balanced'
        if data.task == "ner":
            counts = Counter(t for s in data.raw["train"] for t in s.tags)
        else:
            counts = Counter(lab for r in data.raw["train"] for lab in r.labels)
        total = sum(counts.values())
        return torch.tensor([total / (len(names) * max(counts.get(n, 0), 1)) for n in names])
    unknown = set(spec) - set(names)
    if unknown:
        raise LmforgeError(f"train.class_weights: {sorted(unknown)} not in the label set {names}")
    return torch.tensor([float(spec.get(n, 1.0)) for n in names])


def finetune(recipe: FinetuneRecipe, *, resume: bool = False, force: bool = False, show_progress: bool = True) -> Path:
    from lmforge.pretrain import prepare_run_dir
    cfg = recipe.train
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    dist.setup(pick_device(cfg.device))
    folder = tm.resolve_base(recipe.model.path)
    tokenizer = tm.load_task_tokenizer(recipe.model, folder)
    limit = tm.position_limit(json.loads((folder / "config.json").read_text()))
    if recipe.data.max_length is None:
        recipe.data.max_length = min(128, limit)
    elif recipe.data.max_length > limit:
        raise LmforgeError(f"data.max_length: {recipe.data.max_length} is above the model's position limit {limit}")
    data = TaskData(recipe, tokenizer)
    if "train" not in data.encoded or not len(data.encoded["train"]):
        raise LmforgeError(f"{recipe.data.train.path}: the training split is empty")
    run_dir = prepare_run_dir(recipe, resume, force)
    model = tm.build_task_model(folder, recipe.task, data.labels.names, recipe.data.multi_label, tokenizer,
                                recipe.model.dropout, seed=cfg.seed)
    strategy = recipe.strategy
    tm.apply_freezing(model, strategy)
    if strategy.method == "peft":
        model = tm.apply_peft(model, strategy, recipe.task)
    if recipe.task == "classification":
        first_position_only(model)  # the last layer runs for [CLS] only: the head reads nothing else
    trainable, total = tm.trainable_counts(model)
    if not trainable:
        raise LmforgeError("strategy: every parameter is frozen; nothing would train")

    loader = TaskLoader(data.encoded["train"], cfg.batch_size, cfg.grad_accum, cfg.seed, tokenizer.pad_token_id,
                        recipe.data.multi_label, cfg.group_by_length, dist.world_size(), dist.rank())
    train_cfg = cfg.model_copy(update={
        "max_steps": cfg.max_steps or max(1, round(cfg.epochs * loader.batches_per_epoch
                                                   / (cfg.grad_accum * dist.world_size()))),
        "eval_every": cfg.eval_every if cfg.eval_every is not None else loader.steps_per_epoch,
        "metric": recipe.metric})
    objective = TaskObjective(recipe.task, recipe.data.multi_label, class_weights(recipe, data))

    def evaluate(m):
        if "validation" not in data.encoded:
            return {}
        return score_split(m, data, "validation", recipe, objective)["metrics_flat"]

    # Throughput counts the non-padding input tokens read; attention's cost follows the mean example length.
    train_enc = data.encoded["train"]
    mean_len = sum(map(len, train_enc.input_ids)) / max(len(train_enc), 1)
    engine = Engine(model, tokenizer, objective, loader, train_cfg, run_dir, evaluate=evaluate,
                    flops_per_token=flops_per_token(model, max(8, round(mean_len)), head_fraction=0.0,
                                                    frozen=frozen_body_parameters(model)),
                    tensorboard=recipe.output.tensorboard, plots=recipe.output.plots, show_progress=show_progress,
                    param_groups=tm.param_groups(model, cfg.weight_decay, strategy, cfg.lr))
    if resume:
        engine.resume()
    if dist.is_main():
        console.print(f"[bold]{recipe.name}[/]: {recipe.task} with {len(data.labels)} labels, "
                      f"{len(data.raw['train']):,} training examples, {trainable / 1e6:.2f}M of {total / 1e6:.2f}M "
                      f"parameters trained ({strategy.method}), {train_cfg.max_steps} steps "
                      f"({loader.steps_per_epoch} per epoch) on {engine.device_type}")
    state = engine.fit()
    if dist.is_main():
        if (run_dir / "best").is_dir():  # the dev metric's best step, not the last one
            load_weights(model, run_dir / "best", engine.device)
        results = {}
        for split in ("validation", "test"):
            if split in data.encoded:
                results[split] = write_split_report(run_dir, model, data, split, recipe, objective)
        export(run_dir, model, tokenizer, strategy.method == "peft")
        seconds = time.perf_counter() - t0
        write_model_card(run_dir, recipe, data, results, state, seconds, trainable, total)
        (run_dir / "results.json").write_text(json.dumps(
            {"steps": state.step, "seconds": seconds, "best_step": state.best_step,
             **{s: {k: v for k, v in r.items() if k not in ("per_class", "per_type", "confusion")}
                for s, r in results.items()}}, indent=2))
    dist.barrier()
    dist.teardown()
    return run_dir


def score_split(model, data: TaskData, split: str, recipe: FinetuneRecipe, objective=None) -> dict:
    """Predict a split and score it; returns metrics (nested) and metrics_flat (headline numbers only)."""
    enc: Encoded = data.encoded[split]
    multi = recipe.data.multi_label
    out = predict_encoded(model, enc, task=data.task, multi_label=multi, pad_id=model.config.pad_token_id or 0,
                          batch_size=recipe.train.eval_batch_size, objective=objective)
    names = data.labels.names
    if data.task == "classification":
        import numpy as np
        scores = np.stack(out["scores"])
        pred = (scores >= 0.5).astype(int) if multi else scores.argmax(1)
        gold = np.asarray(enc.labels, dtype=int) if multi else np.asarray(enc.labels)
        metrics = classification_metrics(gold, pred, names, multi)
    else:
        sentences = data.raw[split]
        labels, _ = word_predictions(enc, out["scores"], len(sentences), [len(s.tokens) for s in sentences])
        pred_tags = [[names[i] for i in row] for row in labels]
        metrics = ner_metrics([s.tags for s in sentences], pred_tags)
    if "loss" in out:
        metrics["loss"] = out["loss"]
    flat = {k: v for k, v in metrics.items() if isinstance(v, float)}
    return {"metrics": metrics, "metrics_flat": flat}


def write_split_report(run_dir: Path, model, data: TaskData, split: str, recipe: FinetuneRecipe, objective=None) -> dict:
    model.eval()
    metrics = score_split(model, data, split, recipe, objective)["metrics"]
    title = f"{recipe.name}: {split} ({getattr(recipe.data, split).path})"
    _atomic_write(run_dir / f"report-{split}.txt", format_report(metrics, title))
    _atomic_write(run_dir / f"eval-{split}.json", json.dumps(metrics, indent=2))
    plot_report(metrics, run_dir / f"report-{split}.png", title)
    console.print(format_report(metrics, title))
    return metrics


def plot_report(metrics: dict, out: Path, title: str) -> None:
    if "confusion" in metrics:
        plot_confusion(metrics, out, title)
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    table = metrics.get("per_class") or metrics.get("per_type") or {}
    if not table:
        return
    names = list(table)
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(names) + 2), 3.5))
    xs = range(len(names))
    for k, (key, offset) in enumerate((("precision", -0.27), ("recall", 0.0), ("f1", 0.27))):
        ax.bar([x + offset for x in xs], [table[n][key] for n in names], width=0.27, label=key)
    ax.set_xticks(list(xs), names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"{title}\nF1 {metrics.get('f1', metrics.get('macro_f1', 0)):.4f}", fontsize=9)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)


def export(run_dir: Path, model, tokenizer, is_peft: bool) -> None:
    """final/ holds a plain HF model (adapters merged); adapter/ the peft adapter alone."""
    if is_peft:
        ckpt.save_model(run_dir / "adapter", model, tokenizer)
        merged = model.merge_and_unload()
        ckpt.save_model(run_dir / "final", merged, tokenizer)
    else:
        ckpt.save_model(run_dir / "final", model, tokenizer)


def write_model_card(run_dir, recipe, data, results, state, seconds, trainable, total) -> None:
    d = recipe.data
    lines = [f"# {recipe.name}", "",
             f"A {recipe.task} model fine-tuned with lmforge from `{recipe.model.path}`.", "",
             "## Data", ""]
    for split in SPLITS:
        if split in data.raw:
            lines.append(f"- {split}: `{getattr(d, split).path}` ({len(data.raw[split]):,} "
                         f"{'examples' if data.task == 'classification' else 'sentences'})")
    lines += ["", f"Labels ({len(data.labels)}): " + ", ".join(f"`{n}`" for n in data.labels.names[:50]), "",
              "## Training", "",
              f"- strategy: {recipe.strategy.method}; {trainable:,} of {total:,} parameters trained",
              f"- {state.step} steps, batch {recipe.train.batch_size} x {recipe.train.grad_accum}, lr {recipe.train.lr}, "
              f"{recipe.train.schedule} schedule, {seconds:.0f} s wall time",
              f"- best {recipe.metric} on validation at step {state.best_step}: {state.best_metric}", "",
              "## Scores", ""]
    keys = ("accuracy", "macro_f1", "mcc") if data.task == "classification" else ("precision", "recall", "f1",
                                                                                    "token_accuracy")
    lines += ["| split | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for split, m in results.items():
        lines.append(f"| {split} | " + " | ".join(f"{m[k]:.4f}" if k in m else "" for k in keys) + " |")
    lines += ["", "Reports: `report-*.txt` / `report-*.png`; the full recipe: `recipe.yaml`.", "",
              "## Use", "", "```python",
              f"from transformers import AutoModelFor{'Sequence' if data.task == 'classification' else 'Token'}"
              "Classification, AutoTokenizer",
              f"model = AutoModelFor{'Sequence' if data.task == 'classification' else 'Token'}Classification"
              f".from_pretrained('{run_dir}/final')", "```", "",
              f"or `lmforge predict {run_dir} --input FILE.jsonl --output preds.jsonl`.", ""]
    _atomic_write(Path(run_dir) / "README.md", "\n".join(lines))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
