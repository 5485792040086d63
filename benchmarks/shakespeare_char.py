"""nanoGPT's Shakespeare-char CPU recipe: lmforge vs transformers.Trainer, measured in the same run.

    python benchmarks/shakespeare_char.py [--iters 2000] [--text PATH]

Both train GPT-2 (4 layers, 4 heads, 128 wide, no dropout) on the first 90 % of the character
stream with batch 12, AdamW lr 1e-3 (betas 0.9/0.99, decay 0.1), 100 warmup steps, cosine to 1e-4,
clip 1.0, 2000 iterations, 64 next-character predictions per sequence. Validation loss is on the
last 10 %. Bars: lmforge validation loss <= 1.90 and training tokens/s >= 1.2x Trainer's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402

from ours import train_and_read  # noqa: E402

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--text", type=Path, default=SHAKESPEARE)
    p.add_argument("--compile", action="store_true", help="also measure lmforge with torch.compile")
    args = p.parse_args()
    if not args.text.exists():
        sys.exit(f"skipped: {args.text} not found")
    torch.set_num_threads(torch.get_num_threads())
    roof = peers.matmul_roof()
    results = {"matmul_roof_gflops": round(roof, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        results["lmforge"] = lmforge_run(args.text, args.iters, Path(tmp), compile_=False)
        if args.compile:
            results["lmforge_compiled"] = lmforge_run(args.text, args.iters, Path(tmp), compile_=True)
    results["trainer"] = peers.trainer_shakespeare_char(str(args.text), args.iters, log=lambda *a: None)
    # model FLOPs per trained token (6N + attention), N = non-embedding parameters of the 4x128 GPT-2
    n_params = 4 * 12 * 128 * 128
    flops_per_token = 6 * n_params + 6 * 128 * 65 + 12 * 4 * 128 * 64
    for name in ("lmforge", "lmforge_compiled", "trainer"):
        if name in results:
            r = results[name]
            r["mfu_vs_roof"] = round(r["tokens_per_s"] * flops_per_token / (roof * 1e9), 4)
    ours = results["lmforge_compiled" if args.compile and
                   results["lmforge_compiled"]["tokens_per_s"] > results["lmforge"]["tokens_per_s"] else "lmforge"]
    results["speed_ratio_vs_trainer"] = round(ours["tokens_per_s"] / results["trainer"]["tokens_per_s"], 3)
    results["bars"] = {"val_loss<=1.90": ours["val_loss"] <= 1.90,
                       "tokens_per_s>=1.2x_trainer": results["speed_ratio_vs_trainer"] >= 1.2}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
