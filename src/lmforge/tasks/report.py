"""A task run's data and reports: the recipe's splits read and encoded (`TaskData`), a split predicted and scored
(`score_split`), and the report files of a split (report-SPLIT.txt/.png, eval-SPLIT.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from lmforge.engine.logging import console
from lmforge.errors import LmforgeError
from lmforge.tasks.config import FinetuneRecipe, SplitFile
from lmforge.tasks.conll import label_list
from lmforge.tasks.encode import Encoded, encode_classification, encode_ner
from lmforge.tasks.infer import predict_encoded, word_predictions
from lmforge.tasks.metrics import classification_metrics, format_report, ner_metrics, plot_confusion
from lmforge.tasks.predict import open_task_model
from lmforge.tasks.splits import SPLITS, source_of, split_rows, write_text_atomic  # noqa: F401  (also imported from here)
from lmforge.tasks.tables import LabelSet, named_labels, read_rows, read_sentences

class TaskData:
    """The recipe's splits, read and encoded, with the label set."""

    def __init__(self, recipe: FinetuneRecipe, tokenizer, labels: Optional[list[str]] = None):
        d, self.task = recipe.data, recipe.task
        self.raw, self.encoded = {}, {}
        for split in SPLITS:
            spec = getattr(d, split)
            if spec is not None:
                self.raw[split] = read_rows(spec, d) if self.task == "classification" else read_sentences(spec, d)
        if d.split is not None:
            self.raw.update(split_rows(self.raw["train"], d.split, by_label=self.task == "classification"))
            console.print(f"{d.train.path}: split by data.split (seed {d.split.seed}"
                          f"{', stratified by label' if self.task == 'classification' else ''}): "
                          + ", ".join(f"{len(rows):,} {name}" for name, rows in self.raw.items()))
        if d.max_examples:
            self.raw["train"] = self.raw["train"][:d.max_examples]
        if labels is None:
            if self.task == "classification":
                labels = LabelSet.infer([r.labels for r in self.raw["train"]], d.labels or named_labels(d),
                                        d.unknown_label).names
            else:
                labels = d.labels or label_list(self.raw["train"])
        self.labels = LabelSet(labels, d.unknown_label)
        for split, raw in self.raw.items():
            where = source_of(d, split)
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


def score_split(model, data: TaskData, split: str, recipe: FinetuneRecipe, objective=None) -> dict:
    """Predict a split and score it; returns metrics (nested) and metrics_flat (headline numbers only)."""
    enc: Encoded = data.encoded[split]
    multi = recipe.data.multi_label
    out = predict_encoded(model, enc, task=data.task, multi_label=multi, pad_id=model.config.pad_token_id or 0,
                          batch_size=recipe.train.eval_batch_size, objective=objective)
    names = data.labels.names
    if data.task == "classification":
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


def write_split_report(run_dir: Path, model, data: TaskData, split: str, recipe: FinetuneRecipe, objective=None,
                       metrics: Optional[dict] = None) -> dict:
    """Score `split` (or take `metrics`, the scores of these very weights on it) and write its report files."""
    model.eval()
    if metrics is None:
        metrics = score_split(model, data, split, recipe, objective)["metrics"]
    title = f"{recipe.name}: {split} ({source_of(recipe.data, split)})"
    write_text_atomic(run_dir / f"report-{split}.txt", format_report(metrics, title))
    write_text_atomic(run_dir / f"eval-{split}.json", json.dumps(metrics, indent=2))
    plot_report(metrics, run_dir / f"report-{split}.png", title)
    console.print(format_report(metrics, title))
    return metrics


def plot_report(metrics: dict, out: Path, title: str) -> None:
    if "confusion" in metrics:
        plot_confusion(metrics, out, title)
        return
    import matplotlib  # matplotlib loads only when a figure is drawn
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


def evaluate_task_run(run_dir: Path, split: str = "validation", file: Optional[Path] = None,
                      which: Optional[str] = None) -> dict:
    """Score the run's model on a split of its recipe (or on `file`); writes report-SPLIT.txt/.png, eval-SPLIT.json."""
    recipe, model, tokenizer, task = open_task_model(run_dir, which)
    if recipe is None:
        raise LmforgeError(f"{run_dir}: no recipe.yaml; evaluation needs the run's data settings")
    if file is not None:
        setattr(recipe.data, split, SplitFile(path=str(file)))
    made = recipe.data.split is not None and getattr(recipe.data.split, split, 0) > 0
    if getattr(recipe.data, split, None) is None and not made:
        raise LmforgeError(f"{run_dir}: the recipe has no {split} file; pass --file")
    keep = {"train": recipe.data.train, split: getattr(recipe.data, split)}
    for name in ("validation", "test"):
        if name not in keep:
            setattr(recipe.data, name, None)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    data = TaskData(recipe, tokenizer, labels=names)
    return write_split_report(Path(run_dir), model, data, split, recipe)
