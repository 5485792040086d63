"""Greedy generation of a GPT-2 causal LM on ONNX Runtime (`lmforge export`, fp32 and dynamic int8, with a KV
cache) against PyTorch (the run as `lmforge generate` loads it), measured in the same run.

Each variant continues the same prompt with `lmforge.generate` (greedy, batch 1, as many new tokens as the
model's positions allow), at the same thread count; the variants take turns within each repeat (interleaved,
the order rotating), and each figure is the median over repeats. The ratio is the variant's tokens/s over
PyTorch's. The script also checks that ONNX Runtime fp32 gives PyTorch's tokens and counts how many of int8's
tokens agree.

    python benchmarks/export_generate.py --run runs/shakespeare-char --threads 1 --repeats 20

Without --run it first trains the Shakespeare-char recipe (recipes/shakespeare-gpt2-clm.yaml) for --steps steps
into a temporary folder.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmforge import pretrain
from lmforge.export import export
from lmforge.generate import Decoding, context_limit, encode_prompt, generate, open_generator

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "shakespeare-gpt2-clm.yaml"
PROMPT = "ROMEO:\n"


def train(out: Path, steps: int) -> Path:
    return pretrain(RECIPE, overrides=[f"train.max_steps={steps}", f"output.dir={out}", "train.eval_every=1000000"],
                    show_progress=False).run_dir


def tokens_per_second(models: dict, prompt: str, new: int, repeats: int) -> tuple[dict, dict]:
    """{variant: median tokens/s} and {variant: its greedy token ids}, the variants taking turns each repeat."""
    settings = Decoding(max_new_tokens=new, temperature=0)
    rates = {name: [] for name in models}
    tokens = {}
    for name, (model, tokenizer) in models.items():  # warm each once
        tokens[name] = generate(model, tokenizer, [prompt], settings)[0].token_ids
    names = list(models)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            model, tokenizer = models[name]
            t0 = time.perf_counter()
            done = generate(model, tokenizer, [prompt], settings)[0]
            rates[name].append(len(done.token_ids) / (time.perf_counter() - t0))
    return {name: statistics.median(v) for name, v in rates.items()}, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, help="A causal LM run folder (pretraining run or HF folder); default: "
                                             "train the Shakespeare-char recipe briefly.")
    ap.add_argument("--steps", type=int, default=300, help="Training steps when no --run is given.")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=256, help="Lowered to what the model's positions allow.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # ONNX Runtime sessions take PyTorch's thread count when opened
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or train(Path(tmp) / "run", args.steps)
        folders = {"ONNX Runtime fp32": export(run, Path(tmp) / "fp32"),
                   "ONNX Runtime int8": export(run, Path(tmp) / "int8", quantize="int8")}
        models = {"PyTorch fp32": open_generator(run)} | {name: open_generator(f) for name, f in folders.items()}
        lm, tokenizer = models["PyTorch fp32"]
        limit = context_limit(lm) or args.max_new_tokens + 64
        new = min(args.max_new_tokens, limit - len(encode_prompt(tokenizer, lm, PROMPT)))
        rates, tokens = tokens_per_second(models, PROMPT, new, args.repeats)
        sizes = {name: (f / "model.onnx").stat().st_size / 2**20 for name, f in folders.items()}
    base = "PyTorch fp32"
    print(f"{run}: greedy, batch 1, prompt {PROMPT!r}, {new} new tokens, {args.threads} thread(s), median of "
          f"{args.repeats} interleaved repeats; torch {torch.__version__}, cpu count {os.cpu_count()}\n")
    print("| variant | tokens/s | ratio vs PyTorch | greedy tokens equal to PyTorch's | model.onnx MB |")
    print("|---|---:|---:|---:|---:|")
    for name in models:
        same = sum(a == b for a, b in zip(tokens[name], tokens[base]))
        size = f"{sizes[name]:.2f}" if name in sizes else "—"
        print(f"| {name} | {rates[name]:.1f} | {rates[name] / rates[base]:.2f}× | {same}/{len(tokens[base])} "
              f"| {size} |")
    if tokens["ONNX Runtime fp32"] != tokens[base]:
        print("\nONNX Runtime fp32's greedy tokens differ from PyTorch's", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(main())
