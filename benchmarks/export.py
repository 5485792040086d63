"""CPU inference of a fine-tuned classifier: ONNX Runtime fp32 and dynamic int8 (`lmforge export`) and
`torch.ao` dynamic int8, each against PyTorch fp32 eager, measured in the same run.

Every variant runs the same fixed-shape batches (1×64 and 32×128 tokens, real SST-2 dev sentences padded or cut
to the length) at the same thread count; the variants take turns within each repeat (interleaved), and each
figure is the median over repeats. Speed-up is PyTorch fp32's median over the variant's. Accuracy is on the whole
SST-2 dev set, size is the file a user ships (safetensors, model.onnx, or torch.save of the torch.ao model,
which `save_pretrained` cannot write).

    python benchmarks/export.py --run runs/sst2-minilm --threads 1
"""
import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from lmforge.export import export
from lmforge.tasks.predict import classify_texts, open_task_model

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT / ".." / "shared" / "data" / "sst2" / "dev.tsv"
SHAPES = ((1, 64), (32, 128))


def dev_set() -> tuple[list[str], list[str]]:
    with open(DEV, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"] for r in rows], [str(r["label"]) for r in rows]


def fixed_batch(tokenizer, texts: list[str], rows: int, length: int) -> dict:
    enc = tokenizer(texts[:rows], padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


def torch_ao_int8(run: Path):
    """PyTorch's own dynamic int8 (Linear layers), the peer that stays in PyTorch."""
    _, model, _, _ = open_task_model(run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notice: this row is the peer, deprecated or not
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def file_mb(path: Path) -> float:
    return path.stat().st_size / 2**20


def accuracy(model, tokenizer, texts: list[str], gold: list[str]) -> float:
    with torch.no_grad():
        predicted = classify_texts(model, tokenizer, texts, max_length=128, batch_size=64)
    return float(np.mean([p["label"] == g for p, g in zip(predicted, gold)]))


def latencies(models: dict, batches: dict, repeats: int) -> dict:
    """{(variant, shape): median seconds}, the variants taking turns within each repeat."""
    times = {(name, shape): [] for name in models for shape in batches}
    with torch.no_grad():
        for name, model in models.items():  # warm every variant and shape once
            for batch in batches.values():
                model(**batch)
        for _ in range(repeats):
            for shape, batch in batches.items():
                for name, model in models.items():
                    t0 = time.perf_counter()
                    model(**batch)
                    times[(name, shape)].append(time.perf_counter() - t0)
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="A fine-tuned classifier run (or HF folder).")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    texts, gold = dev_set()
    with tempfile.TemporaryDirectory() as tmp:
        fp32_dir, int8_dir = export(args.run, Path(tmp) / "fp32"), export(args.run, Path(tmp) / "int8", quantize="int8")
        _, reference, tokenizer, _ = open_task_model(args.run)
        ao = torch_ao_int8(args.run)
        torch.save(ao.state_dict(), Path(tmp) / "ao.pt")
        models = {"PyTorch fp32 eager": reference, "ONNX Runtime fp32 (fused)": open_task_model(fp32_dir)[1],
                  "ONNX Runtime int8 (dynamic, fused)": open_task_model(int8_dir)[1],
                  "torch.ao quantize_dynamic int8": ao}
        source = next(p for p in (args.run / "final" / "model.safetensors", args.run / "model.safetensors")
                      if p.is_file())
        sizes = {"PyTorch fp32 eager": file_mb(source), "ONNX Runtime fp32 (fused)": file_mb(fp32_dir / "model.onnx"),
                 "ONNX Runtime int8 (dynamic, fused)": file_mb(int8_dir / "model.onnx"),
                 "torch.ao quantize_dynamic int8": file_mb(Path(tmp) / "ao.pt")}
        batches = {shape: fixed_batch(tokenizer, texts, *shape) for shape in SHAPES}
        medians = latencies(models, batches, args.repeats)
        scores = {name: accuracy(model, tokenizer, texts, gold) for name, model in models.items()}
    base = "PyTorch fp32 eager"
    print(f"{args.run}: SST-2 dev ({len(texts)} rows), {args.threads} thread(s), median of {args.repeats} "
          f"interleaved repeats; torch {torch.__version__}, cpu count {os.cpu_count()}\n")
    print("| variant | " + " | ".join(f"batch {b}×{n} ms" for b, n in SHAPES) + " | speed-up "
          + " / ".join(f"{b}×{n}" for b, n in SHAPES) + " | size MB (ratio) | accuracy (Δ pt) |")
    print("|---|" + "---:|" * (len(SHAPES) + 3))
    for name in models:
        ms = " | ".join(f"{medians[(name, s)] * 1e3:.1f}" for s in SHAPES)
        speed = " / ".join(f"{medians[(base, s)] / medians[(name, s)]:.2f}×" for s in SHAPES)
        size = f"{sizes[name]:.1f} ({sizes[name] / sizes[base]:.2f}×)"
        acc = f"{scores[name]:.4f} ({(scores[name] - scores[base]) * 100:+.1f})"
        print(f"| {name} | {ms} | {speed} | {size} | {acc} |")


if __name__ == "__main__":
    sys.exit(main())
