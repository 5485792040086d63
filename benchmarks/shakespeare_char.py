"""nanoGPT's Shakespeare-char CPU recipe: lmforge vs transformers.Trainer, measured in the same run.

    python benchmarks/shakespeare_char.py [--iters 2000] [--repeats 3] [--text PATH]

Both train GPT-2 (4 layers, 4 heads, 128 wide, no dropout) on the first 90 % of the character
stream with batch 12, AdamW lr 1e-3 (betas 0.9/0.99, decay 0.1), 100 warmup steps, cosine to 1e-4,
clip 1.0, 2000 iterations, 64 next-character predictions per sequence. Validation loss is on the
last 10 %. Both use the exact GELU (nanoGPT's and lmforge's); `--tanh-gelu-row` adds Trainer with GPT2Config's
default tanh approximation as a row of its own. Bar: lmforge validation loss <= 1.90 at Trainer's speed or better.

Each side runs in a fresh Python process, so neither inherits the other's memory or settings. Runs
alternate (lmforge first in odd repeats, Trainer first in even ones); the ratio printed is the median of
the per-repeat ratios, since this machine's timings move by several percent from run to run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402

from ours import train_and_read  # noqa: E402

from lmforge.engine.hardware import KEEP_FREED_MEMORY_ENV  # noqa: E402
from lmforge.models.lean import LEAN_FORWARD_ENV  # noqa: E402

# lmforge with one of its CPU speed-ups turned off, to measure what each is worth
ABLATIONS = {"lmforge_freeing": {KEEP_FREED_MEMORY_ENV: "0"},  # glibc gives freed activations back to the kernel
             "lmforge_hf_forward": {LEAN_FORWARD_ENV: "0"}}  # transformers' GPT-2 forward

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def lmforge_run(text_path: Path, iters: int, work: Path, compile_: bool) -> dict:
    text = text_path.read_text(encoding="utf-8")
    cut = int(0.9 * len(text))
    (work / "train.txt").write_text(text[:cut], encoding="utf-8")
    (work / "val.txt").write_text(text[cut:], encoding="utf-8")
    tree = {
        "name": "shakespeare-char",
        # whole files as single documents: one character stream, split 90/10 by file as nanoGPT does
        "data": {"sources": [{"path": str(work / "train.txt"), "sample_by": "document", "split": "train"},
                             {"path": str(work / "val.txt"), "sample_by": "document", "split": "validation"}],
                 "cache_dir": str(work / "cache")},
        "tokenizer": {"kind": "char"},
        "model": {"family": "gpt2", "n_layers": 4, "n_heads": 4, "d_model": 128, "dropout": 0.0},
        # blocks of 65 tokens: 64 positions in, 64 predictions, as nanoGPT's (x, y) windows
        "objective": {"name": "clm", "block_size": 65},
        "train": {"batch_size": 12, "max_steps": iters, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 100,
                  "betas": [0.9, 0.99], "weight_decay": 0.1, "grad_clip": 1.0, "eval_every": 0,
                  "log_every": 50, "seed": 1337, "compile": compile_, "precision": "fp32"},
        "output": {"dir": str(work / ("run-compiled" if compile_ else "run")), "tensorboard": False,
                   "plots": False},
    }
    train, val, rss = train_and_read(tree)
    seconds = train[-1]["elapsed_s"]
    return {"ms_per_iter": 1000 * seconds / iters, "tokens_per_s": iters * 12 * 64 / seconds,
            "val_loss": val["loss"], "seconds": seconds, "peak_rss_mb": rss, "mfu_logged": train[-1]["mfu"]}


def isolated(side: str, args) -> dict:
    """One side's figures, measured in a fresh Python process."""
    cmd = [sys.executable, __file__, "--side", side, "--iters", str(args.iters), "--text", str(args.text)]
    env = {**os.environ, **ABLATIONS.get(side, {})}
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_side(side: str, args) -> dict:
    if side.startswith("trainer"):
        activation = "gelu_new" if side == "trainer_tanh_gelu" else "gelu"
        return peers.trainer_shakespeare_char(str(args.text), args.iters, log=lambda *a: None, activation=activation)
    with tempfile.TemporaryDirectory() as tmp:
        return lmforge_run(args.text, args.iters, Path(tmp), compile_=side == "lmforge_compiled")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3, help="pairs of runs; the ratio is their median")
    p.add_argument("--text", type=Path, default=SHAKESPEARE)
    p.add_argument("--compile", action="store_true", help="also measure lmforge with torch.compile")
    p.add_argument("--ablate", default="", help="also measure lmforge without these speed-ups, comma-separated: "
                   "freeing (glibc returns freed memory), hf_forward (transformers' GPT-2 forward)")
    p.add_argument("--tanh-gelu-row", action="store_true",
                   help="also measure Trainer with GPT2Config's default tanh GELU (gelu_new)")
    p.add_argument("--side", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.text.exists():
        sys.exit(f"skipped: {args.text} not found")
    if args.side:
        print(json.dumps(run_side(args.side, args)))
        return
    ablations = [name for name in args.ablate.split(",") if name]
    unknown = [name for name in ablations if f"lmforge_{name}" not in ABLATIONS]
    if unknown:
        p.error(f"--ablate: unknown {', '.join(unknown)} (choose from "
                f"{', '.join(k.removeprefix('lmforge_') for k in ABLATIONS)})")
    roofs = []
    ours_name = "lmforge_compiled" if args.compile else "lmforge"
    runs = []
    for i in range(args.repeats):
        order = ["lmforge", "trainer"] if i % 2 == 0 else ["trainer", "lmforge"]
        if args.compile:
            order.insert(order.index("lmforge") + 1, "lmforge_compiled")
        for name in ablations:
            order.insert(order.index("lmforge") + 1, f"lmforge_{name}")
        if args.tanh_gelu_row:
            order.insert(order.index("trainer") + 1, "trainer_tanh_gelu")
        roofs.append(peers.matmul_roof())
        pair = {side: isolated(side, args) for side in order}
        pair["speed_ratio_vs_trainer"] = round(pair[ours_name]["tokens_per_s"] / pair["trainer"]["tokens_per_s"], 3)
        print(f"repeat {i + 1}: " + ", ".join(f"{k} {v['ms_per_iter']:.1f} ms/iter" for k, v in pair.items()
                                              if isinstance(v, dict)) + f", ratio {pair['speed_ratio_vs_trainer']}",
              file=sys.stderr)
        runs.append(pair)
    # model FLOPs per trained token (6N + attention), N = non-embedding parameters of the 4x128 GPT-2
    n_params = 4 * 12 * 128 * 128
    flops_per_token = 6 * n_params + 6 * 128 * 65 + 12 * 4 * 128 * 64
    roof = statistics.median(roofs)
    results = {"matmul_roof_gflops": round(roof, 1), "repeats": runs}
    for name in ("lmforge", "lmforge_compiled", *ABLATIONS, "trainer", "trainer_tanh_gelu"):
        if name in runs[0]:
            ms = statistics.median(r[name]["ms_per_iter"] for r in runs)
            tps = statistics.median(r[name]["tokens_per_s"] for r in runs)
            results[name] = {"median_ms_per_iter": round(ms, 2), "median_tokens_per_s": round(tps),
                             "val_loss": runs[0][name]["val_loss"],
                             "peak_rss_mb": round(max(r[name]["peak_rss_mb"] for r in runs)),
                             "mfu_vs_roof": round(tps * flops_per_token / (roof * 1e9), 4)}
    results["speed_ratio_vs_trainer"] = statistics.median(r["speed_ratio_vs_trainer"] for r in runs)
    results["bars"] = {"val_loss<=1.90": max(r[ours_name]["val_loss"] for r in runs) <= 1.90,
                       "tokens_per_s>=trainer": results["speed_ratio_vs_trainer"] >= 1.0}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
