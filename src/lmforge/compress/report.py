"""The size / speed / quality table (Markdown) and plot (quality against batch latency, the Pareto front drawn)
of a set of variants; `compare` builds them for any run or model folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from lmforge.compress.measure import METRICS, Row, describe
from lmforge.errors import LmforgeError
from lmforge.tasks.report import write_text_atomic


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}×" if base else "—"


def higher_is_better(metric_name: str) -> bool:
    return dict(METRICS).get(metric_name, "max") == "max"


def pareto_front(rows: Sequence[Row], batch: int) -> list[Row]:
    """Variants no other beats on both quality and latency at `batch` (rows without a metric are left out)."""
    scored = [r for r in rows if r.metric is not None and batch in r.latency_ms]
    sign = {r.name: (1 if higher_is_better(r.metric_name) else -1) for r in scored}
    quality = {r.name: sign[r.name] * r.metric for r in scored}
    front = []
    for r in scored:
        t, q = r.latency_ms[batch], quality[r.name]
        dominated = any(o is not r and o.latency_ms[batch] <= t and quality[o.name] >= q
                        and (o.latency_ms[batch] < t or quality[o.name] > q) for o in scored)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: r.latency_ms[batch])


def markdown_table(rows: Sequence[Row], title: str, threads: int, seq_len: int) -> str:
    """One line per variant; ratios are against the first row."""
    base = rows[0]
    batches = sorted({b for r in rows for b in r.latency_ms})
    largest = max(batches)
    front = {r.name for r in pareto_front(rows, largest)}
    head = ["variant", "parameters", "size MB", "size ×", "sparsity",
            *[f"ms b{b}" for b in batches], f"b{largest} ×", "rows/s", "peak MB", "metric", "Pareto"]
    lines = [f"# {title}", "",
             f"Latency: forward pass on {seq_len} tokens per row, {threads} CPU thread(s), median of warm repeats; "
             f"ratios against `{base.name}`; peak MB: resident memory above the level before loading.", "",
             "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for r in rows:
        metric = f"{r.metric_name} {r.metric:.4f}" if r.metric is not None else "—"
        lines.append("| " + " | ".join([
            f"`{r.name}`", f"{r.params / 1e6:.2f}M", f"{r.size_mb:.1f}", _ratio(r.size_mb, base.size_mb),
            f"{r.sparsity:.1%}", *[f"{r.latency_ms[b]:.1f}" for b in batches],
            _ratio(r.latency_ms[largest], base.latency_ms[largest]), f"{r.rows_per_s:.0f}", f"{r.peak_mb:.0f}",
            metric, "●" if r.name in front else ""]) + " |")
    notes = [f"- `{r.name}`: {r.note}" for r in rows if r.note]
    return "\n".join(lines + ([""] + notes if notes else []) + [""])


def plot(rows: Sequence[Row], out: Path, title: str) -> None:
    """Quality against latency at the largest batch, one point per variant, the Pareto front as a line."""
    import matplotlib  # matplotlib loads only when a figure is drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scored = [r for r in rows if r.metric is not None]
    if not scored:
        return
    batch = max(b for r in rows for b in r.latency_ms)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in scored:
        ax.scatter(r.latency_ms[batch], r.metric, s=30)
        ax.annotate(r.name, (r.latency_ms[batch], r.metric), fontsize=7, xytext=(4, 3), textcoords="offset points")
    front = pareto_front(scored, batch)
    ax.plot([r.latency_ms[batch] for r in front], [r.metric for r in front], "--", color="grey",
            label="Pareto front")
    ax.set_xlabel(f"latency at batch {batch} (ms)")
    ax.set_ylabel(scored[0].metric_name)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)


def write_report(rows: Sequence[Row], out_dir: Path, stem: str, title: str, threads: int, seq_len: int) -> Path:
    """STEM.md, STEM.png and STEM.json (the rows) in `out_dir`; returns the Markdown file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, title, threads, seq_len)
    write_text_atomic(out_dir / f"{stem}.json", json.dumps([r.as_dict() for r in rows], indent=2))
    plot(rows, out_dir / f"{stem}.png", title)
    write_text_atomic(out_dir / f"{stem}.md", table)
    return out_dir / f"{stem}.md"


def compare(runs: Sequence[Path], out: Optional[Path] = None, *, split: str = "validation", threads: int = 1,
            repeats: int = 7, seq_len: int = 64, batch_sizes=(1, 32)) -> tuple[list[Row], Optional[Path]]:
    """Measure any run or model folders side by side; with `out`, write compare.md / .png / .json there."""
    runs = [Path(r) for r in runs]
    missing = [str(r) for r in runs if not r.exists()]
    if missing:
        raise LmforgeError(f"{missing[0]}: no such run or model folder")
    names = _unique_names(runs)
    rows = [describe(r, name=n, split=split, threads=threads, repeats=repeats, seq_len=seq_len,
                     batch_sizes=batch_sizes) for r, n in zip(runs, names)]
    path = write_report(rows, out, "compare", "lmforge compare", threads, seq_len) if out else None
    return rows, path


def _unique_names(runs: Sequence[Path]) -> list[str]:
    names = [r.name for r in runs]
    return [str(r) if names.count(r.name) > 1 else r.name for r in runs]
