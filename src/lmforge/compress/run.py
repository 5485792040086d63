"""The compress stage: recipe → checks of every step (before any work) → the steps in order, each writing a run
folder → the size / speed / quality report of the model and every step's variant.

    OUT/
      recipe.yaml                 the compress recipe, resolved
      1-prune/  2-finetune/  3-quantize/   one fine-tuning-style run folder per step: final/ (the model),
                                  recipe.yaml (the task's data settings), eval-SPLIT.json, report-SPLIT.* (a
                                  classifier's or tagger's), compression.json (what the step did), README.md
      compress.md  compress.png  compress.json   the table, the plot (Pareto front drawn), the rows
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional, Union

from lmforge.compress.config import CompressRecipe, DistillStep, FinetuneStep, PruneStep, QuantizeStep, load_compress_recipe
from lmforge.compress.gradual import HeldSparsity
from lmforge.compress.lm import LmData, is_causal_lm, lm_recipe, mean_loss_of
from lmforge.compress.magnitude import apply_masks, prune_magnitude, sparsity_by_layer
from lmforge.compress.measure import describe
from lmforge.compress.report import write_report
from lmforge.compress.structured import check_fractions, prune_structured
from lmforge.engine import checkpoint as ckpt
from lmforge.engine.logging import console
from lmforge.errors import LmforgeError
from lmforge.distill import distill
from lmforge.export import export
from lmforge.finetune import finetune
from lmforge.finetune.objective import TaskObjective
from lmforge.models.compressed import COMPRESSION_KEY
from lmforge.models.onnx import is_onnx_folder
from lmforge.models.quantized import quantize_modules
from lmforge.models.slicing import rule_for, stock_loadable
from lmforge.pretrain import pretrain
from lmforge.recipe import Recipe, coerce_recipe, load_recipe
from lmforge.runs import model_folder, open_run
from lmforge.stage import RunResult
from lmforge.tasks.config import FinetuneRecipe, load_finetune_recipe
from lmforge.tasks.encode import collate
from lmforge.tasks.predict import is_task_run, open_task_model
from lmforge.tasks.report import TaskData, write_split_report, write_text_atomic

INT4_REFUSAL = ("quantize.scheme: int4-weight has no CPU kernel here (torchao's int4 CPU path needs a kernel "
                "package that does not install against torch 2.13); use int8-dynamic or int8-weight")
ONNX_SCHEMES = ("int8-dynamic",)  # what ONNX Runtime's quantizer writes: int8 weights, int8 activations at run time


def compress(recipe: Union[CompressRecipe, str, Path, dict], *, overrides=(), force: bool = False,
             show_progress: bool = True) -> RunResult:
    """Run the recipe's steps on its model, each from the previous one's output, and write the report; returns
    the output folder and each variant's metric."""
    recipe = coerce_recipe(recipe, overrides, CompressRecipe, load_compress_recipe)
    task_recipe = check_plan(recipe)
    out = prepare_output(recipe, force)
    current, masks, variants = Path(recipe.model), None, [("base", Path(recipe.model), "")]
    for k, step in enumerate(recipe.steps, 1):
        step_dir = out / f"{k}-{step.kind}"
        console.print(f"[bold]{recipe.name}[/]: step {k} of {len(recipe.steps)}: {step.kind}")
        if step.distill is not None:
            note, masks = distill_step(step.distill, current, step_dir, recipe.eval.split, show_progress), None
        elif step.prune is not None:
            note, masks = prune_step(step.prune, current, step_dir, task_recipe, recipe.eval.split)
        elif step.finetune is not None:
            note, masks = finetune_step(step.finetune, current, step_dir, masks, recipe.eval.split, show_progress,
                                        lm_plan=task_recipe if isinstance(task_recipe, Recipe) else None)
        else:
            note = quantize_step(step.quantize, current, step_dir, task_recipe, recipe.eval.split)
        current = step_dir
        variants.append((step_dir.name, step_dir, note))
    rows = []
    for name, path, note in variants:
        row = describe(path, name=name, split=recipe.eval.split, threads=recipe.bench.threads,
                       repeats=recipe.bench.repeats, seq_len=recipe.bench.seq_len, batch_sizes=recipe.bench.batch_sizes)
        row.note = note
        rows.append(row)
    if rows[0].metric is None and isinstance(task_recipe, Recipe):  # a pretraining run keeps no eval file
        _, model, tokenizer = open_run(Path(recipe.model))
        rows[0].metric, rows[0].metric_name = LmData(task_recipe, tokenizer).scores(model, recipe.eval.split)["ppl"], "ppl"
    report = write_report(rows, out, "compress", f"{recipe.name}: size, speed and quality", recipe.bench.threads,
                          recipe.bench.seq_len)
    console.print(report.read_text())
    return RunResult(out, {r.name: {r.metric_name: r.metric} for r in rows if r.metric is not None})


def check_plan(recipe: CompressRecipe) -> Union[FinetuneRecipe, Recipe]:
    """Refuse, before anything is written, what cannot work; returns the recipe whose data the steps rank and
    evaluate on: the model's run, else the first finetune step's recipe (fine-tuning; pretraining for a causal
    LM)."""
    source = Path(recipe.model)
    if not source.exists():
        raise LmforgeError(f"model: {recipe.model}: no such run or model folder")
    folder = model_folder(source)
    config = json.loads((folder / "config.json").read_text())
    for step in recipe.steps:
        if step.prune is not None:
            check_prune(step.prune, config)
        if step.quantize is not None:
            check_quantize(step.quantize)
    if is_causal_lm(config):
        return check_lm_plan(recipe, source)
    if "Classification" not in " ".join(config.get("architectures") or []):
        raise LmforgeError(f"model: {recipe.model}: compress works on fine-tuned classifiers and taggers and on "
                           f"causal LMs (architectures: {config.get('architectures')})")
    finetunes = [load_finetune_recipe(s.recipe, _set_list(s.set))
                 for s in [s.finetune or s.distill for s in recipe.steps] if s is not None]
    if is_task_run(source):
        return load_finetune_recipe(source / "recipe.yaml")
    if finetunes:
        return finetunes[0]
    raise LmforgeError(f"model: {recipe.model} is a model folder without a recipe; the steps need the task's data: "
                       "give its fine-tuning run folder or a finetune step")


def check_lm_plan(recipe: CompressRecipe, source: Path) -> Recipe:
    """A causal LM's steps: recovery is pretraining, quality is validation perplexity."""
    for step in recipe.steps:
        if step.distill is not None:
            raise LmforgeError("steps: a distill step in a compress recipe trains classifiers and taggers; distil a "
                               "causal LM with `lmforge distill` and a clm recipe, then compress the student")
        if step.quantize is not None and step.quantize.runtime == "onnx":
            raise LmforgeError("quantize.runtime: onnx in a compress recipe is for classifiers and taggers; export a "
                               "causal LM with `lmforge export RUN --quantize int8`")
    if recipe.eval.split != "validation":
        raise LmforgeError(f"eval.split: {recipe.eval.split}: a causal LM is scored on its pretraining recipe's "
                           "validation documents")
    trained = [(s.finetune.recipe, _set_list(s.finetune.set)) for s in recipe.steps if s.finetune is not None]
    for path, overrides in trained:
        if load_recipe(path, overrides).objective.name != "clm":
            raise LmforgeError(f"{path}: a causal LM recovers with a pretraining recipe whose objective is clm")
    return lm_recipe(source, trained)


def check_prune(step: PruneStep, config: dict) -> None:
    if step.heads is not None or step.ffn is not None:
        rule_for(config.get("model_type", ""))
        check_fractions(config, step.heads, step.ffn)


def check_quantize(step: QuantizeStep) -> None:
    if step.scheme == "int4-weight":
        raise LmforgeError(INT4_REFUSAL)
    if step.runtime == "onnx" and step.scheme not in ONNX_SCHEMES:
        raise LmforgeError(f"quantize.scheme: {step.scheme} on runtime onnx: ONNX Runtime's CPU quantization here "
                           f"is {', '.join(ONNX_SCHEMES)}")


def _set_list(values: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in values.items()]


def prepare_output(recipe: CompressRecipe, force: bool) -> Path:
    out = Path(recipe.output.dir)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise LmforgeError(f"output.dir: {out} is not empty; pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "recipe.yaml", recipe.to_yaml())
    return out


def _task_data(task_recipe: FinetuneRecipe, tokenizer, model, split: str, train_rows: int) -> TaskData:
    """The split to score, and the first `train_rows` training rows, labelled as the model is."""
    spec = task_recipe.model_copy(deep=True)
    spec.data.max_examples = train_rows
    for name in ("validation", "test"):
        if name != split and getattr(spec.data, name) is not None:
            setattr(spec.data, name, None)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return TaskData(spec, tokenizer, labels=names)


class TaskScoring:
    """A classifier's or tagger's data for the steps, with the interface of `LmData`: training batches and the
    loss that ranks units, and the split's report."""

    def __init__(self, task_recipe: FinetuneRecipe, tokenizer, model, split: str, train_rows: int):
        self.recipe = task_recipe
        self.data = _task_data(task_recipe, tokenizer, model, split, train_rows)
        self.pad = tokenizer.pad_token_id or 0

    def train_batches(self, count: int, size: int) -> list[dict]:
        train = self.data.encoded["train"]
        return [collate(train, list(range(i, min(i + size, len(train)))), self.pad, self.recipe.data.multi_label)
                for i in range(0, len(train), size)]

    def mean_loss(self):
        return mean_loss_of(TaskObjective(self.recipe.task, self.recipe.data.multi_label))

    def write_scores(self, folder: Path, model, split: str) -> dict:
        return write_split_report(folder, model, self.data, split, self.recipe)


Plan = Union[FinetuneRecipe, Recipe]


def open_step(source: Path, plan: Plan, split: str, train_rows: int = 1):
    """(model, tokenizer, scoring) of a step's input: a task model with its data, or a causal LM with its corpus."""
    if isinstance(plan, Recipe):
        _, model, tokenizer = open_run(source)
        return model, tokenizer, LmData(plan, tokenizer)
    _, model, tokenizer, _ = open_task_model(source)
    return model, tokenizer, TaskScoring(plan, tokenizer, model, split, train_rows)


def prune_step(step: PruneStep, source: Path, step_dir: Path, plan: Plan, split: str):
    model, tokenizer, scoring = open_step(source, plan, split, step.batches * step.batch_size)
    details, notes, masks = {}, [], None
    if step.heads is not None or step.ffn is not None:
        batches = scoring.train_batches(step.batches, step.batch_size)
        details.update(prune_structured(model, step.heads, step.ffn, batches, scoring.mean_loss()))
        shape = details["shape"]
        notes.append(f"heads per layer {shape['heads']}, FFN neurons per layer {shape['ffn']}")
    if step.sparsity is not None:
        masks = prune_magnitude(model, step.sparsity, step.scope)
        details["sparsity"] = sparsity_by_layer(model)
        notes.append(f"{details['sparsity']['all']:.1%} of the layers' weights zero ({step.scope} magnitude)")
    save_step(step_dir, model, tokenizer, plan, scoring, split, details, "; ".join(notes))
    return "; ".join(notes), masks


def finetune_step(step: FinetuneStep, source: Path, step_dir: Path, masks: Optional[dict], split: str,
                  show_progress: bool, lm_plan: Optional[Recipe] = None) -> tuple[str, Optional[dict]]:
    """Fine-tune from `source` (continue pretraining, for a causal LM: `lm_plan` is the recipe whose validation
    data every row is scored on); with `step.sparsity`, prune gradually while training; pruned weights held at
    zero."""
    lm = lm_plan is not None
    overrides = _set_list(step.set) + [f"model.path={model_folder(source)}", f"output.dir={step_dir}"]
    train, read = (pretrain, load_recipe) if lm else (finetune, load_finetune_recipe)
    hold = None
    if step.sparsity is not None or masks:
        grad_accum = read(step.recipe, overrides).train.grad_accum
        initial = _share_zero(masks)
        hold = HeldSparsity(step.sparsity, scope=step.scope, steps=step.prune_steps, every=step.prune_every,
                            grad_accum=grad_accum, initial=initial, masks=masks)

    def held(objective, model, tokenizer):
        hold.attach(model)
        return objective

    train(step.recipe, overrides=overrides, force=True, show_progress=show_progress,
          train_objective=held if hold else None)
    note = "recovered by continued pretraining" if lm else "recovered by fine-tuning"
    if hold is None and not lm:
        return note, None
    model, tokenizer, scoring = open_step(step_dir, lm_plan or load_finetune_recipe(step_dir / "recipe.yaml"), split)
    if hold is not None:
        # The last optimizer step moved the pruned weights (the hook zeroes them only before a forward pass): zero
        # them in the saved model, pruning to the final sparsity exactly where the run ended before the schedule did.
        masks = hold.masks or masks
        if masks:
            apply_masks(model, masks)
        note += ", pruned weights held at zero"
        if step.sparsity is not None:
            if _share_zero(masks) < step.sparsity - 1e-6:  # the run ended before the schedule did
                masks = prune_magnitude(model, step.sparsity, step.scope)
            last = f", the last at step {hold.history[-1][0]}" if hold.history else ""
            note = f"gradual magnitude pruning to {_share_zero(masks):.1%} ({len(hold.history)} pruning events{last})"
        ckpt.save_model(step_dir / "final", model, tokenizer)
    metrics = scoring.write_scores(step_dir, model, split)
    if lm:  # a pretraining run writes no model card
        write_model_card(step_dir, step_dir, model, note, metrics, split, lm=True)
    return note, masks


def _share_zero(masks: Optional[dict]) -> float:
    """Share of weights a set of keep-masks drops."""
    if not masks:
        return 0.0
    return sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def distill_step(step: DistillStep, source: Path, step_dir: Path, split: str, show_progress: bool) -> str:
    """Distil the previous step's model into a student of `step.student_layers` layers (see lmforge.distill)."""
    overrides = _set_list(step.set) + [
        f"distill.teacher={source}", f"distill.student_layers={step.student_layers}",
        f"distill.temperature={step.temperature}", f"distill.alpha={step.alpha}",
        f"distill.hidden_weight={step.hidden_weight}", f"output.dir={step_dir}"]
    distill(step.recipe, overrides=overrides, force=True, show_progress=show_progress)
    recipe, model, tokenizer, _ = open_task_model(step_dir)
    if not (step_dir / f"eval-{split}.json").is_file():
        write_split_report(step_dir, model, _task_data(recipe, tokenizer, model, split, 1), split, recipe)
    return f"distilled into {step.student_layers} layers (T {step.temperature}, alpha {step.alpha})"


def quantize_step(step: QuantizeStep, source: Path, step_dir: Path, plan: Plan, split: str) -> str:
    if step.runtime == "onnx":
        return onnx_quantize_step(source, step_dir, plan, split)
    model, tokenizer, scoring = open_step(source, plan, split)
    record = dict(getattr(model.config, COMPRESSION_KEY, None) or {})
    modules = quantize_modules(model, step.scheme)
    record["quantization"] = {"scheme": step.scheme, "modules": modules}
    setattr(model.config, COMPRESSION_KEY, record)
    kernel = "fbgemm dynamic int8 matmul" if step.scheme == "int8-dynamic" else "fp32 matmul on widened int8 weights"
    note = f"{step.scheme}: {len(modules['linear'])} linear layers ({kernel}), embeddings int8 per row"
    save_step(step_dir, model, tokenizer, plan, scoring, split, {"quantization": record["quantization"]}, note,
              quantized=True)
    return note


def onnx_quantize_step(source: Path, step_dir: Path, task_recipe: FinetuneRecipe, split: str) -> str:
    """The model as a fused ONNX Runtime graph with per-channel int8 weights (`lmforge export --quantize int8`)."""
    staged = step_dir.with_name(f".{step_dir.name}.onnx")
    shutil.rmtree(staged, ignore_errors=True)
    try:
        export(source, staged, quantize="int8", force=True)
        model, tokenizer, scoring = open_step(staged, task_recipe, split)
        note = "int8-dynamic on ONNX Runtime: fused graph, int8 weights per output channel"
        save_step(step_dir, model, tokenizer, task_recipe, scoring, split,
                  {"quantization": {"scheme": "int8-dynamic", "runtime": "onnx"}}, note,
                  write_model=lambda final: os.replace(staged, final))
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return note


def save_step(step_dir: Path, model, tokenizer, plan: Plan, scoring, split: str, details: dict, note: str,
              quantized: bool = False, write_model=None) -> None:
    """A step's run folder, written under a temporary name and renamed into place; `write_model(folder)` writes
    a model that is not a PyTorch one (an ONNX folder)."""
    tmp = step_dir.with_name(f".{step_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if write_model:
            write_model(tmp / "final")
        else:
            if not quantized:
                record = stock_loadable(model)
                if record:
                    setattr(model.config, COMPRESSION_KEY, {"shape": record})
                elif hasattr(model.config, COMPRESSION_KEY):
                    delattr(model.config, COMPRESSION_KEY)
            ckpt.save_model(tmp / "final", model, tokenizer)
        recipe = plan.model_copy(deep=True)
        recipe.model.path, recipe.output.dir = str(step_dir / "final"), str(step_dir)
        write_text_atomic(tmp / "recipe.yaml", recipe.to_yaml())
        write_text_atomic(tmp / "compression.json", json.dumps(details, indent=2))
        metrics = scoring.write_scores(tmp, model, split)
        write_model_card(tmp, step_dir, model, note, metrics, split, lm=isinstance(plan, Recipe))
        os.replace(tmp, step_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_model_card(tmp: Path, step_dir: Path, model, note: str, metrics: dict, split: str, lm: bool = False) -> None:
    record = getattr(model.config, COMPRESSION_KEY, None) or {}
    if is_onnx_folder(tmp / "final"):
        loads = ("An ONNX Runtime folder (`final/model.onnx`, written by `lmforge export`); it opens in a plain "
                 "`onnxruntime.InferenceSession`, and its own model card says what it carries.")
    elif record.get("quantization"):
        loads = ("Stock `transformers` cannot load it: the weights are int8 with per-row scales "
                 "(`lmforge_compression.quantization` in config.json). lmforge's loader rebuilds it.")
    elif record.get("shape"):
        loads = ("Stock `transformers.AutoModel*` cannot represent this shape (attention heads removed, or FFN "
                 "widths differing per layer: `lmforge_compression.shape` in config.json); lmforge's loader "
                 f"rebuilds it. `lmforge export {step_dir} --format hf --out DIR` writes the nearest shape stock "
                 "transformers loads (zero heads and neurons put back, the same logits).")
    else:
        loads = "It loads with stock `transformers` `AutoModelFor*.from_pretrained` (same logits as lmforge's loader)."
    score = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                      if isinstance(v, float) and k != "loss" and "/" not in k)
    use = (f"`lmforge generate {step_dir} --prompt TEXT`, `lmforge eval {step_dir}`, `lmforge serve {step_dir}` (CPU)."
           if lm else f"`lmforge predict {step_dir} --input FILE.txt --output preds.jsonl`, `lmforge eval "
                      f"{step_dir}`, `lmforge serve {step_dir}` (CPU).")
    text = "\n".join([f"# {step_dir.name}", "", f"Made by `lmforge compress`: {note}.", "", loads, "",
                      f"Scores on {split}: {score}.", "", "## Use", "", use, ""])
    write_text_atomic(tmp / "README.md", text)

