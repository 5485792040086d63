"""Metrics to JSONL (and TensorBoard when installed), a progress bar, loss-curve plots."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lmforge.errors import disk_full_is_an_error

console = Console(stderr=True)


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool = True, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            try:
                # TensorBoard is optional (the tensorboard extra)
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except Exception:  # tensorboard not installed: JSONL only
                self.writer = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with disk_full_is_an_error(self.path.parent), open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            prefix = record.get("split", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])

    def truncate_after(self, step: int) -> None:
        """On resume, drop records logged after the checkpoint so the log has no duplicates."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress_bar(enabled: bool = True) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, disable=not enabled, transient=False)


def plot_losses(run_dir: Path, out: Optional[Path] = None) -> Optional[Path]:
    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if r.get("split", "train") == "train" and "loss" in r]
    val = [(r["step"], r["loss"]) for r in records if r.get("split") == "validation" and "loss" in r]
    if not train:
        return None
    import matplotlib  # matplotlib loads only when a figure is drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = out or Path(run_dir) / "loss.png"
    tmp = out.with_name(f".{out.name}.tmp.png")
    try:
        with disk_full_is_an_error(out.parent):
            fig.savefig(tmp, dpi=110)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return out


class Throughput:
    """Tokens/s and MFU (FLOPs run / time / peak) over the last logging window."""

    def __init__(self, peak_flops: float):
        self.peak = peak_flops
        self.reset()

    def add(self, tokens: int, flops: float) -> None:
        self.tokens += tokens
        self.flops += flops

    def reset(self) -> None:
        self.t0, self.tokens, self.flops = time.perf_counter(), 0, 0.0

    def read(self) -> tuple[float, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tps, mfu = self.tokens / dt, (self.flops / dt / self.peak if self.peak else 0.0)
        self.reset()
        return tps, mfu
