"""Masked-LM throughput: lmforge vs transformers.Trainer (packed and line-by-line), same run.

    python benchmarks/mlm_throughput.py [--steps 500] [--text PATH]

A 4-layer, 128-wide BERT (4 heads, FFN 512) with one WordPiece 8k tokenizer (trained once here and
shared by all three runs), block 128, batch 32, lr 5e-4, 10 % warmup, linear decay, fp32, on the
first 90 % of the text's non-empty lines; masked-token loss on the last 10 %, for every model on the same
targets (the Trainer pipeline's held-out blocks and seeded masks). Bars: non-padding
tokens/s >= 1.2x Trainer on run_mlm's packed pipeline and >= 3x Trainer on padded line-by-line
examples, at equal masked-token loss (+-0.05) after the same number of steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402

from ours import train_and_read  # noqa: E402

from lmforge.recipe import TokenizerConfig  # noqa: E402
from lmforge.tokenizer import train_tokenizer  # noqa: E402

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def lmforge_run(work: Path, tokenizer_dir: Path, steps: int) -> dict:
    tree = {
        "name": "mlm-throughput",
        "data": {"sources": [{"path": str(work / "train.txt"), "sample_by": "line", "split": "train"},
                             {"path": str(work / "held.txt"), "sample_by": "line", "split": "validation"}],
                 "cache_dir": str(work / "cache")},
        "tokenizer": {"path": str(tokenizer_dir)},
        "model": {"family": "bert", "n_layers": 4, "d_model": 128, "n_heads": 4, "d_ff": 512, "dropout": 0.1},
        "objective": {"name": "mlm", "block_size": 128},
        "train": {"batch_size": 32, "max_steps": steps, "lr": 5e-4, "min_lr": 0.0, "warmup_steps": 0.1,
                  "schedule": "linear", "weight_decay": 0.0, "eval_every": 0, "log_every": 1, "seed": 0,
                  "precision": "fp32"},
        "output": {"dir": str(work / "run"), "tensorboard": False, "plots": False},
    }
    train, val, rss = train_and_read(tree)
    seconds = train[-1]["elapsed_s"]
    last = [r["loss"] for r in train[-20:]]
    return {"seconds": seconds, "ms_per_step": 1000 * seconds / steps, "tokens_per_s": steps * 32 * 128 / seconds,
            "train_loss_last20": sum(last) / len(last), "eval_loss": val["loss"], "peak_rss_mb": rss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--text", type=Path, default=SHAKESPEARE)
    args = p.parse_args()
    if not args.text.exists():
        sys.exit(f"skipped: {args.text} not found")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        lines = [l for l in args.text.read_text(encoding="utf-8").splitlines() if l.strip()]
        cut = int(0.9 * len(lines))
        (work / "train.txt").write_text("\n".join(lines[:cut]) + "\n", encoding="utf-8")
        (work / "held.txt").write_text("\n".join(lines[cut:]) + "\n", encoding="utf-8")
        tokenizer = train_tokenizer(lines[:cut], TokenizerConfig(kind="wordpiece", vocab_size=8000, lowercase=True))
        tokenizer.save_pretrained(str(work / "tokenizer"))
        # the peers read the same lines from one file and cut at the same 90 %
        (work / "all.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        results = {"lmforge": lmforge_run(work, work / "tokenizer", args.steps)}
        # the Trainer runs' own held-out targets (blocks and masks from their pipeline), for equal footing
        results["lmforge"]["eval_loss_trainer_targets"] = peers.masked_eval_loss(
            str(work / "run" / "final"), str(work / "all.txt"))
        for mode in ("packed", "padded"):
            results[f"trainer_{mode}"] = peers.trainer_mlm(str(work / "all.txt"), str(work / "tokenizer"), mode,
                                                           args.steps, log=lambda *a: None)
    ours = results["lmforge"]
    for mode in ("packed", "padded"):
        peer = results[f"trainer_{mode}"]
        results[f"ratio_vs_trainer_{mode}"] = round(ours["tokens_per_s"] / peer["tokens_per_s"], 3)
    results["eval_loss_gap_vs_packed"] = round(ours["eval_loss_trainer_targets"]
                                               - results["trainer_packed"]["eval_loss"], 4)
    results["bars"] = {">=1.2x_packed": results["ratio_vs_trainer_packed"] >= 1.2,
                       ">=3x_padded": results["ratio_vs_trainer_padded"] >= 3.0,
                       "loss_within_0.05": abs(results["eval_loss_gap_vs_packed"]) <= 0.05}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
