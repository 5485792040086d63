"""Task metrics and reports: accuracy / F1 / MCC / per-class scores / confusion matrix for classification,
entity-level precision / recall / F1 per type (computed by seqeval) and token accuracy for NER."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np


def classification_metrics(gold, pred, names: list[str], multi_label: bool = False) -> dict:
    """gold/pred: label ids (single label) or 0/1 indicator rows (multi-label)."""
    # scikit-learn loads only where it is used
    from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score, matthews_corrcoef,
                                 precision_recall_fscore_support)
    gold, pred = np.asarray(gold), np.asarray(pred)
    ids = list(range(len(names)))
    kw = dict(zero_division=0)
    out = {"examples": int(len(gold)), "accuracy": float(accuracy_score(gold, pred)),
           "macro_f1": float(f1_score(gold, pred, average="macro", labels=ids, **kw)),
           "micro_f1": float(f1_score(gold, pred, average="micro", labels=ids, **kw))}
    if not multi_label:
        out["mcc"] = float(matthews_corrcoef(gold, pred))
        out["confusion"] = confusion_matrix(gold, pred, labels=ids).tolist()
    p, r, f, s = precision_recall_fscore_support(gold, pred, labels=ids, **kw)
    out["per_class"] = {n: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                        for i, n in enumerate(names)}
    return out


def ner_metrics(gold_tags: list[list[str]], pred_tags: list[list[str]]) -> dict:
    """Entity-level scores exactly as seqeval computes them (default mode), plus word-level accuracy."""
    # seqeval loads only for NER reports
    from seqeval.metrics import classification_report
    report = classification_report(gold_tags, pred_tags, output_dict=True, zero_division=0)
    words = sum(len(g) for g in gold_tags)
    correct = sum(a == b for g, p in zip(gold_tags, pred_tags) for a, b in zip(g, p))
    micro = report["micro avg"]
    per_type = {k: {"precision": float(v["precision"]), "recall": float(v["recall"]), "f1": float(v["f1-score"]),
                    "support": int(v["support"])}
                for k, v in report.items() if not k.endswith(" avg")}
    return {"sentences": len(gold_tags), "precision": float(micro["precision"]), "recall": float(micro["recall"]),
            "f1": float(micro["f1-score"]), "macro_f1": float(report["macro avg"]["f1-score"]),
            "token_accuracy": correct / max(words, 1), "per_type": per_type}


def format_report(metrics: dict, title: str) -> str:
    """A plain-text report: headline scores, then the per-class (or per-entity-type) table."""
    lines = [title, "=" * len(title)]
    for key in ("examples", "sentences", "loss", "accuracy", "token_accuracy", "precision", "recall", "f1",
                "macro_f1", "micro_f1", "mcc"):
        if key in metrics:
            v = metrics[key]
            lines.append(f"{key:>15}: {v:.4f}" if isinstance(v, float) else f"{key:>15}: {v}")
    table = metrics.get("per_class") or metrics.get("per_type") or {}
    if table:
        width = max(12, max(len(k) for k in table))
        lines += ["", f"{'label':<{width}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
        for name, row in table.items():
            lines.append(f"{name:<{width}} {row['precision']:9.4f} {row['recall']:9.4f} {row['f1']:9.4f} "
                         f"{row['support']:8d}")
    if "confusion" in metrics and len(metrics["confusion"]) <= 20:
        names = list(metrics["per_class"])
        width = max(6, max(len(n) for n in names))
        lines += ["", "confusion (rows: gold, columns: predicted)",
                  " " * width + " " + " ".join(f"{n[:width]:>{width}}" for n in names)]
        for n, row in zip(names, metrics["confusion"]):
            lines.append(f"{n[:width]:<{width}} " + " ".join(f"{c:>{width}d}" for c in row))
    return "\n".join(lines) + "\n"


def plot_confusion(metrics: dict, out: Path, title: str = "") -> Optional[Path]:
    if "confusion" not in metrics:
        return None
    import matplotlib  # matplotlib loads only when a figure is drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(metrics["per_class"])
    matrix = np.asarray(metrics["confusion"])
    size = max(3.5, 0.5 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    if len(names) <= 30:
        top = matrix.max() or 1
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black", fontsize=8)
    ax.set_title(title or f"accuracy {metrics['accuracy']:.4f}")
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
