"""One row of the size / speed / quality table for any run or model folder, from its files and from loading it
the way `lmforge predict` / `generate` / `serve` do.

- parameters, sparsity: from the safetensors weights (int8 tensors count as parameters, their scales do not);
- size on disk: the weight files of the model folder (tokenizer and config excluded);
- metric: the run's `eval-SPLIT.json` (accuracy, F1, or perplexity), as `lmforge finetune` / `eval` wrote it;
- latency: the loaded model's forward pass on `seq_len` tokens at each batch size, with `threads` CPU threads,
  after a warm-up, the median of `repeats` timed calls; throughput = rows / latency at the largest batch;
- peak memory: the highest resident set size while loading and running, above the level before loading
  (sampled every millisecond).
"""

from __future__ import annotations

import gc
import json
import re
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import onnx
import psutil
import torch
from safetensors import safe_open

from lmforge.errors import LmforgeError
from lmforge.runs import model_folder, open_run
from lmforge.tasks.predict import is_task_run, open_task_model

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.onnx", "*.onnx.data")
LAYER = re.compile(r"\.(?:layer|h|layers)\.\d+\.")
METRICS = (("accuracy", "max"), ("f1", "max"), ("ppl", "min"))


@dataclass
class Row:
    name: str
    path: str
    params: int = 0
    size_mb: float = 0.0
    sparsity: float = 0.0
    metric: Optional[float] = None
    metric_name: str = ""
    latency_ms: dict = field(default_factory=dict)   # batch size → median milliseconds
    rows_per_s: float = 0.0
    peak_mb: float = 0.0
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def weights_of(folder: Path) -> list[Path]:
    return sorted(p for pattern in WEIGHT_FILES for p in Path(folder).glob(pattern))


def count_weights(folder: Path) -> tuple[int, float]:
    """(parameters, share of zeros among the transformer layers' matrices) from the safetensors files; an ONNX
    graph's parameters are its weight initializers (quantization scales and shape constants left out)."""
    params, zeros, matrix = 0, 0, 0
    for path in weights_of(folder):
        if path.suffix == ".onnx":
            params += onnx_parameters(path)
        if path.suffix != ".safetensors":
            continue
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                if key.endswith("weight_scale"):
                    continue
                t = fh.get_tensor(key)
                params += t.numel()
                if t.dim() == 2 and LAYER.search(f".{key}"):
                    zeros += int((t == 0).sum())
                    matrix += t.numel()
    return params, zeros / matrix if matrix else 0.0


def onnx_parameters(path: Path) -> int:
    weights = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    total = 0
    for t in onnx.load(str(path), load_external_data=False).graph.initializer:
        numel = 1
        for d in t.dims:
            numel *= d
        if t.data_type in weights and numel > 1 and not t.name.endswith(("_scale", "_zero_point")):
            total += numel
    return total


def run_metric(run: Path, split: str) -> tuple[Optional[float], str]:
    path = Path(run) / f"eval-{split}.json"
    if not path.is_file():
        return None, ""
    scores = json.loads(path.read_text())
    for name, _ in METRICS:
        if isinstance(scores.get(name), (int, float)):
            return float(scores[name]), name
    return None, ""


def open_for_inference(run: Path):
    """(model, tokenizer) through lmforge's loaders: a classifier / tagger as `predict` opens it, else an LM."""
    if is_task_run(run) or _architectures(model_folder(run)).endswith("Classification"):
        _, model, tokenizer, _ = open_task_model(run)
    else:
        _, model, tokenizer = open_run(run)
    return model.eval(), tokenizer


def _architectures(folder: Path) -> str:
    archs = json.loads((Path(folder) / "config.json").read_text()).get("architectures") or [""]
    return archs[0]


class PeakRss:
    """The highest resident set size seen while the block runs, sampled in a thread."""

    def __init__(self):
        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def __enter__(self):
        gc.collect()
        self.base = self.process.memory_info().rss
        self.peak = self.base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def above_base_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def synthetic_batch(tokenizer, batch: int, seq_len: int, seed: int = 0) -> dict:
    """Token ids drawn from the vocabulary (no special tokens), all positions attended."""
    g = torch.Generator().manual_seed(seed)
    low = max(tokenizer.all_special_ids or [0]) + 1 if len(tokenizer) > 1000 else 0
    ids = torch.randint(low, len(tokenizer), (batch, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.inference_mode()
def time_forward(model, inputs: dict, repeats: int) -> float:
    """Median milliseconds of `repeats` forward passes after two warm-up passes."""
    for _ in range(2):
        model(**inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def describe(run: Path, *, name: Optional[str] = None, split: str = "validation", threads: int = 1,
             repeats: int = 7, seq_len: int = 64, batch_sizes=(1, 32)) -> Row:
    """Measure one run or model folder."""
    run = Path(run)
    if not run.exists():
        raise LmforgeError(f"{run}: no such run or model folder")
    folder = model_folder(run)
    params, sparsity = count_weights(folder)
    metric, metric_name = run_metric(run, split)
    row = Row(name or run.name, str(run), params, sum(p.stat().st_size for p in weights_of(folder)) / 1e6,
              sparsity, metric, metric_name)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with PeakRss() as memory:
            model, tokenizer = open_for_inference(run)
            length = min(seq_len, _position_limit(model))
            for b in batch_sizes:
                row.latency_ms[b] = time_forward(model, synthetic_batch(tokenizer, b, length), repeats)
        row.peak_mb = memory.above_base_mb
    finally:
        torch.set_num_threads(previous)
    largest = max(batch_sizes)
    row.rows_per_s = largest / (row.latency_ms[largest] / 1000)
    del model
    gc.collect()
    return row


def _position_limit(model) -> int:
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 10**9
