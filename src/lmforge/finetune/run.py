"""The fine-tuning stage: recipe → task data → task model (+ strategy) → engine → evaluated, exported run folder.
Sentence embeddings (task `embedding`) take the same path in `finetune.embedding`.

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
from collections import Counter
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from lmforge.engine import checkpoint as ckpt
from lmforge.engine import distributed as dist
from lmforge.engine.adversarial import FGM, PGD
from lmforge.engine.hardware import threads_note
from lmforge.engine.logging import console
from lmforge.engine.loop import Engine
from lmforge.errors import LmforgeError
from lmforge.finetune.embedding import finetune_embedding
from lmforge.finetune.fast import first_position_only
from lmforge.finetune.flops import task_batch_flops
from lmforge.finetune.objective import TaskObjective
from lmforge.finetune.seq2seq import finetune_seq2seq
from lmforge.finetune.setup import fit_and_pick, open_base, train_settings
from lmforge.recipe import coerce_recipe
from lmforge.runs import start_run
from lmforge.stage import RunResult
from lmforge.tasks import model as tm
from lmforge.tasks.config import FinetuneRecipe, load_finetune_recipe
from lmforge.tasks.encode import TaskLoader
from lmforge.tasks.report import (SPLITS, TaskData, score_split, source_of, write_split_report,
                                  write_text_atomic)


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


def adversarial_method(cfg, model, strategy: str = "ddp") -> Optional[FGM]:
    """FGM or PGD on the word embeddings when the recipe asks for it; the embeddings must train (they get a
    gradient)."""
    if cfg.adversarial == "none":
        return None
    if strategy == "fsdp" and cfg.grad_accum > 1:
        raise LmforgeError(f"train.adversarial: {cfg.adversarial} with dist.strategy fsdp needs train.grad_accum 1 "
                           "(FSDP keeps no embedding gradient between micro-batches to attack along)")
    if not FGM.embedding_weight(model).requires_grad:
        raise LmforgeError(f"train.adversarial: {cfg.adversarial} perturbs the word embeddings along their gradient, "
                           "but the strategy freezes them (freeze_embeddings, head_only, frozen layers or peft)")
    if cfg.adversarial == "pgd":
        return PGD(cfg.adversarial_epsilon, cfg.adversarial_alpha, cfg.adversarial_steps)
    return FGM(cfg.adversarial_epsilon)


def adversarial_note(cfg) -> str:
    """The model card's words for the recipe's adversarial training ('' when there is none)."""
    if cfg.adversarial == "fgm":
        return f", FGM adversarial training (epsilon {cfg.adversarial_epsilon})"
    if cfg.adversarial == "pgd":
        return (f", PGD adversarial training (epsilon {cfg.adversarial_epsilon}, alpha {cfg.adversarial_alpha}, "
                f"{cfg.adversarial_steps} steps)")
    return ""


def finetune(recipe: Union[FinetuneRecipe, str, Path, dict], *, overrides: Union[list[str], tuple] = (),
             resume: bool = False, force: bool = False, show_progress: bool = True,
             on_eval: Optional[Callable[[int, dict], Optional[str]]] = None,
             train_objective: Optional[Callable] = None) -> RunResult:
    """Fine-tune as the recipe (object, YAML file or dict, plus `--set` style overrides) says; returns the run
    folder and the headline metrics of each evaluated split. `on_eval(step, metrics)` sees each evaluation and may
    stop the run by returning a reason (a tuner's pruner). `train_objective(objective, model, tokenizer)` gives the
    objective training uses in place of the task's own (a distiller's); evaluation keeps the task's."""
    recipe = coerce_recipe(recipe, overrides, FinetuneRecipe, load_finetune_recipe)
    if recipe.distill and train_objective is None:
        raise LmforgeError("distill: this recipe distils from a teacher; run it with `lmforge distill`")
    if recipe.task == "embedding":
        if train_objective is not None:
            raise LmforgeError("distill: task embedding cannot be distilled; fine-tune it with `lmforge finetune`")
        return finetune_embedding(recipe, resume=resume, force=force, show_progress=show_progress, on_eval=on_eval)
    if recipe.task == "seq2seq":
        if train_objective is not None:
            raise LmforgeError("distill: task seq2seq cannot be distilled; fine-tune it with `lmforge finetune`")
        return finetune_seq2seq(recipe, resume=resume, force=force, show_progress=show_progress, on_eval=on_eval)
    cfg = recipe.train
    folder, tokenizer, t0 = open_base(recipe)
    data = TaskData(recipe, tokenizer)
    if "train" not in data.encoded or not len(data.encoded["train"]):
        raise LmforgeError(f"{recipe.data.train.path}: the training split is empty")
    with start_run(recipe, resume, force) as run_dir:  # a failed set-up leaves nothing
        model = tm.build_task_model(folder, recipe.task, data.labels.names, recipe.data.multi_label, tokenizer,
                                    recipe.model.dropout, seed=cfg.seed)
        strategy = recipe.strategy
        tm.apply_freezing(model, strategy)
        if strategy.method == "peft":
            model = tm.apply_peft(model, strategy, recipe.task)
        # The last layer runs for [CLS] only: a sequence classifier's head reads nothing else.
        first_position = recipe.task == "classification" and first_position_only(model)
        trainable, total = tm.trainable_counts(model)
        if not trainable:
            raise LmforgeError("strategy: every parameter is frozen; nothing would train")

        loader = TaskLoader(data.encoded["train"], cfg.batch_size, cfg.grad_accum, cfg.seed, tokenizer.pad_token_id,
                            recipe.data.multi_label, cfg.group_by_length, dist.world_size(), dist.rank())
        train_cfg = train_settings(recipe, loader)
        objective = TaskObjective(recipe.task, recipe.data.multi_label, class_weights(recipe, data))

        scored_at = {}  # validation scores by step: the final report reuses those of the weights it reports on

        def evaluate(m):
            if "validation" not in data.encoded:
                return {}
            scored = score_split(m, data, "validation", recipe, objective)
            scored_at[engine.state.step] = scored["metrics"]
            return scored["metrics_flat"]

        adversarial = adversarial_method(cfg, model, recipe.dist.strategy)
        # Throughput counts the non-padding input tokens read; MFU the FLOPs of the padded shapes run.
        trained_by = train_objective(objective, model, tokenizer) if train_objective else objective
        engine = Engine(model, tokenizer, trained_by, loader, train_cfg, run_dir, evaluate=evaluate, started=t0,
                        on_eval=on_eval, dist_cfg=recipe.dist,
                        batch_flops=task_batch_flops(model, recipe.task, first_position),
                        tensorboard=recipe.output.tensorboard, plots=recipe.output.plots, show_progress=show_progress,
                        param_groups=tm.param_groups(model, cfg.weight_decay, strategy, cfg.lr),
                        adversarial=adversarial)
        if resume:
            engine.resume()
        if dist.is_main():
            console.print(f"[bold]{recipe.name}[/]: {recipe.task} with {len(data.labels)} labels, "
                          f"{len(data.raw['train']):,} training examples, {trainable / 1e6:.2f}M of {total / 1e6:.2f}M "
                          f"parameters trained ({strategy.method}), {train_cfg.max_steps} steps "
                          f"({loader.steps_per_epoch} per epoch) on {engine.device_type}"
                          f"{threads_note(cfg.threads, engine.device_type)}")
    state, model, reported_step = fit_and_pick(engine, run_dir)
    results = {}
    if dist.is_main():
        for split in ("validation", "test"):
            if split in data.encoded:
                known = scored_at.get(reported_step) if split == "validation" else None
                results[split] = write_split_report(run_dir, model, data, split, recipe, objective, metrics=known)
        export(run_dir, model, tokenizer, strategy.method == "peft")
        seconds = engine.wall_seconds()
        write_model_card(run_dir, recipe, data, results, state, seconds, trainable, total)
        (run_dir / "results.json").write_text(json.dumps(
            {"steps": state.step, "seconds": seconds, "best_step": state.best_step,
             **{s: {k: v for k, v in r.items() if k not in ("per_class", "per_type", "confusion")}
                for s, r in results.items()}}, indent=2))
    dist.barrier()
    dist.teardown()
    return RunResult(run_dir, {split: {k: v for k, v in r.items() if isinstance(v, float)}
                               for split, r in results.items()})


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
            lines.append(f"- {split}: `{source_of(d, split)}` ({len(data.raw[split]):,} "
                         f"{'examples' if data.task == 'classification' else 'sentences'})")
    lines += ["", f"Labels ({len(data.labels)}): " + ", ".join(f"`{n}`" for n in data.labels.names[:50]), "",
              "## Training", "",
              f"- strategy: {recipe.strategy.method}; {trainable:,} of {total:,} parameters trained",
              f"- {state.step} steps, batch {recipe.train.batch_size} x {recipe.train.grad_accum}, lr {recipe.train.lr}, "
              f"{recipe.train.schedule} schedule, {seconds:.0f} s wall time"
              + adversarial_note(recipe.train) + "; stopped: "
              f"{next((h['stop_reason'] for h in reversed(state.history) if 'stop_reason' in h), 'max_steps')}",
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
    write_text_atomic(Path(run_dir) / "README.md", "\n".join(lines))
