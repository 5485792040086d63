"""Compression of a fine-tuned SST-2 classifier (or, with --recipe, the CoNLL-2003 tagger or the Shakespeare GPT-2),
every variant measured side by side in one process.

    python benchmarks/compress.py --base runs/sst2-minilm --out runs/bench-compress [--examples 8000]
    python benchmarks/compress.py --base runs/sst2-minilm --examples 3200 --ffn 0.5 --onnx   # + ONNX Runtime int8
    python benchmarks/compress.py --recipe recipes/compress-conll2003.yaml --base runs/conll2003-minilm --examples 4000
    python benchmarks/compress.py --recipe recipes/compress-shakespeare.yaml --base runs/shakespeare-char

Runs recipes/compress-sst2.yaml (heads 50 %, FFN 30 %, one recovery epoch on --examples training rows,
int8-dynamic), the recovery step alone on the unpruned model (what the extra training gives without pruning), then
int8-dynamic and int8-weight of the unpruned model and 50 % unstructured magnitude sparsity
(no recovery), and prints one table (`lmforge compare` of all variants: ratios against the base model) plus the
zip-compressed size of each weight file (what unstructured sparsity buys on disk). `--onnx` adds ONNX Runtime
int8 (`quantize: {runtime: onnx}`) of the base model and of the pruned, recovered one; `--ffn` sets the share of
FFN neurons pruned. `--recipe` takes another compress recipe of the same three steps; a causal LM's recovery is
continued pretraining (`--examples` does not apply) and its quality column is validation perplexity."""

from __future__ import annotations

import argparse
import subprocess
import sys
import zlib
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lmforge.compress import compare, compress  # noqa: E402
from lmforge.compress.report import markdown_table  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "compress-sst2.yaml"


def deflated_mb(folder: Path) -> float:
    """Size of the model's weight file after zlib level 6, in MB: zeros compress, dense weights barely do."""
    weights = folder / "final" / "model.safetensors"
    if not weights.is_file():
        weights = folder / "final" / "model.onnx"
    return len(zlib.compress(weights.read_bytes(), 6)) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=Path, required=True, help="The run the recipe compresses (default recipe: a "
                    "fine-tuned SST-2 run folder).")
    ap.add_argument("--recipe", type=Path, default=RECIPE, help="A compress recipe: prune, finetune, quantize.")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-compress"))
    ap.add_argument("--examples", type=int, default=None, help="Training rows of the recovery epoch (default all).")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--ffn", type=float, default=None, help="Share of FFN neurons pruned (default: the recipe's).")
    ap.add_argument("--onnx", action="store_true", help="Also ONNX Runtime int8 of the base and of the pruned, "
                    "recovered model.")
    ap.add_argument("--measure-only", action="store_true", help="Only measure the variants an earlier run left in "
                    "--out again (e.g. on a quiet machine).")
    args = ap.parse_args()
    recipe = yaml.safe_load(args.recipe.read_text())
    if args.ffn is not None:
        recipe["steps"][0]["prune"]["ffn"] = args.ffn
    recipe.update(model=str(args.base), output={"dir": str(args.out / "pruned")},
                  bench={"threads": args.threads, "repeats": 1})
    recovery = recipe["steps"][1]["finetune"]["set"]
    recovery["train.threads"] = args.threads  # more threads than free cores stalls a shared machine
    if args.examples:
        recovery["data.max_examples"] = args.examples
    if not (args.base / "eval-validation.json").is_file():  # a pretraining run: its perplexity, as `lmforge eval` writes it
        subprocess.run([sys.executable, "-m", "lmforge.cli", "eval", str(args.base)], check=True)
    # the recovery step alone, on the unpruned model: what the extra training gives without any pruning
    singles = (("recovered-only", {"finetune": recipe["steps"][1]["finetune"]}),
               ("int8-dynamic", {"quantize": {"scheme": "int8-dynamic"}}),
               ("int8-weight", {"quantize": {"scheme": "int8-weight"}}), ("sparse-50", {"prune": {"sparsity": 0.5}}))
    if args.measure_only:
        runs = {name: args.out / name for name in ("pruned", *(n for n, _ in singles), "onnx-int8", "pruned-onnx-int8")}
    else:
        runs = {"pruned": compress(recipe, force=True)}
        for name, step in singles:
            runs[name] = compress({"name": name, "model": str(args.base), "steps": [step], "bench": {"repeats": 1},
                                   "output": {"dir": str(args.out / name)}}, force=True)
    folders = [args.base, runs["recovered-only"] / "1-finetune",
               *(runs["pruned"] / s for s in ("1-prune", "2-finetune", "3-quantize")),
               runs["int8-dynamic"] / "1-quantize", runs["int8-weight"] / "1-quantize", runs["sparse-50"] / "1-prune"]
    labels = ["base", "base+recovery step (no pruning)", "pruned", "pruned+recovered", "pruned+recovered+int8-dynamic",
              "int8-dynamic", "int8-weight", "50% magnitude sparsity"]
    if args.onnx:
        onnx = {"quantize": {"scheme": "int8-dynamic", "runtime": "onnx"}}
        for name, model in (("onnx-int8", args.base), ("pruned-onnx-int8", runs["pruned"] / "2-finetune")):
            if args.measure_only:
                folders.append(runs[name] / "1-quantize")
                continue
            runs[name] = compress({"name": name, "model": str(model), "steps": [onnx], "bench": {"repeats": 1},
                                   "output": {"dir": str(args.out / name)}}, force=True)
            folders.append(runs[name] / "1-quantize")
        labels += ["ONNX Runtime int8", "pruned+recovered+ONNX Runtime int8"]
    rows, path = compare(folders, args.out, threads=args.threads, repeats=args.repeats)
    for row, label in zip(rows, labels):
        row.name = label
    print(markdown_table(rows, f"{recipe['name']}: compression variants", args.threads, 64))
    for label, folder in zip(labels, folders):
        print(f"{label}: {deflated_mb(folder):.1f} MB deflated")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
