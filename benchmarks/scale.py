"""DDP vs FSDP on 2 processes of this machine (gloo, CPU): tokens/s and memory per process, same run.

    python benchmarks/scale.py [--layers 8] [--d-model 512] [--steps 8] [--out runs/bench-scale]

A GPT-2 of --layers blocks, --d-model wide (8 layers x 512: 26.8M parameters, 429 MB of fp32 parameters,
gradients and AdamW moments, large enough that the state, not activations, dominates each process), block
128, batch 4 per process, grad_accum 1, on the quickstart's stdlib corpus with one BPE tokenizer of 4k trained
here. Each strategy runs as `torchrun --standalone --nproc_per_node 2 -m lmforge.cli`-equivalent workers
(this script under torchrun) for --steps steps. Per process it reports:

- state MB: parameters + gradients + AdamW state that the process holds (the local shard of each DTensor
  under FSDP), counted from the tensors themselves; DDP's gradient buckets (one more gradient copy) are
  not counted, so DDP's figure is a lower bound;
- peak RSS growth MB: the kernel's high-water mark (VmHWM) at the end of the last training step minus the
  resident size before the run began: data, the model as built (whole, before sharding), state,
  activations, communication buffers; not the Python and torch libraries loaded before, nor the final
  evaluation and export that follow the last step;
- tokens/s: the median over steps 3.. of the logged rate (input tokens of both processes per second).

The bar: FSDP's state per process <= 0.6x DDP's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import peers  # noqa: E402

from lmforge import pretrain as pretrain_stage  # noqa: E402
from lmforge.engine.logging import read_metrics  # noqa: E402
from lmforge.quickstart import build_corpus  # noqa: E402
from lmforge.recipe import TokenizerConfig  # noqa: E402
from lmforge.tokenizer import save_tokenizer, train_tokenizer  # noqa: E402

TORCHRUN = Path(sys.executable).parent / "torchrun"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def local_bytes(t: torch.Tensor) -> int:
    """Bytes this process holds for `t` (a DTensor's local shard)."""
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def state_bytes(engine) -> int:
    """Parameters + gradients (one per trainable parameter, as between backward and zero_grad) + optimizer
    state held by this process."""
    params = [p for p in engine.model.parameters()]
    optimizer = sum(local_bytes(v) for s in engine.optimizer.state.values() for v in s.values()
                    if torch.is_tensor(v) and v.dim() > 0)
    return sum(local_bytes(p) for p in params) * 2 + optimizer


def worker(args) -> None:
    """Under torchrun: one pretraining run; write this process's memory figures to --report."""
    measured = {}
    peers.reset_peak_rss()
    before = rss_mb()

    class MeasuredEngine(pretrain_stage.Engine):
        def train_step(self):
            step = super().train_step()  # the high-water mark up to here: training, not the final eval/export
            measured["peak_rss_growth_mb"] = peers.peak_rss_mb() - before
            return step

        def fit(self):
            state = super().fit()
            measured["state_mb"] = state_bytes(self) / 2**20
            return state

    pretrain_stage.Engine = MeasuredEngine  # the stage builds this engine; nothing else changes
    pretrain_stage.pretrain(args.recipe, overrides=[f"dist.strategy={args.strategy}",
                                                    f"output.dir={args.report}-run"], show_progress=False)
    rank = int(os.environ.get("RANK", 0))
    Path(f"{args.report}.rank{rank}.json").write_text(json.dumps(measured))


def write_recipe(args, out: Path) -> Path:
    import yaml
    corpus = build_corpus(out / "corpus", 2_000_000)
    tokenizer = out / "tokenizer"
    if not (tokenizer / "tokenizer.json").exists():
        texts = [json.loads(line)["text"] for p in corpus.values() for line in p.open()]
        save_tokenizer(train_tokenizer(texts, TokenizerConfig(kind="bpe", vocab_size=4000)), tokenizer)
    tree = {"name": "scale", "data": {"sources": [{"path": str(p), "domain": d} for d, p in corpus.items()]},
            "tokenizer": {"path": str(tokenizer)},
            "model": {"family": "gpt2", "n_layers": args.layers, "d_model": args.d_model,
                      "n_heads": args.d_model // 64, "dropout": 0.0},
            "objective": {"name": "clm", "block_size": 128},
            "train": {"batch_size": args.batch, "max_steps": args.steps, "eval_every": 0, "eval_batches": 1,
                      "log_every": 1, "threads": 1, "save_every": 10**6},
            "output": {"tensorboard": False, "plots": False}}
    recipe = out / "scale.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    return recipe


def measure(strategy: str, recipe: Path, out: Path) -> dict:
    report = out / strategy
    subprocess.run(["rm", "-rf", f"{report}-run"], check=True)  # a fresh run folder for each measurement
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", __file__, "--worker", "--strategy", strategy,
           "--recipe", str(recipe), "--report", str(report)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ranks = [json.loads(Path(f"{report}.rank{r}.json").read_text()) for r in (0, 1)]
    rates = [r["tokens_per_s"] for r in read_metrics(Path(f"{report}-run")) if "split" not in r and r["step"] >= 3]
    return {"state_mb": max(r["state_mb"] for r in ranks),
            "peak_rss_growth_mb": max(r["peak_rss_growth_mb"] for r in ranks),
            "tokens_per_s": statistics.median(rates)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2, help="Sequences of 128 tokens per process per step.")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-scale"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    ap.add_argument("--recipe", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    recipe = write_recipe(args, args.out)
    results = {s: measure(s, recipe, args.out) for s in ("ddp", "fsdp")}
    ddp = results["ddp"]
    print(f"\nGPT-2 {args.layers} layers x {args.d_model}, 2 processes (gloo, 1 thread each), {args.steps} steps; "
          "per process:")
    print("| strategy | state MB | peak RSS growth MB | tokens/s |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['state_mb']:.0f} ({r['state_mb'] / ddp['state_mb']:.2f}x) | "
              f"{r['peak_rss_growth_mb']:.0f} ({r['peak_rss_growth_mb'] / ddp['peak_rss_growth_mb']:.2f}x) | "
              f"{r['tokens_per_s']:,.0f} ({r['tokens_per_s'] / ddp['tokens_per_s']:.2f}x) |")
    ratio = results["fsdp"]["state_mb"] / ddp["state_mb"]
    print(f"bar: FSDP state per process <= 0.6x DDP's: {ratio:.2f}x {'PASS' if ratio <= 0.6 else 'FAIL'}")


if __name__ == "__main__":
    main()
