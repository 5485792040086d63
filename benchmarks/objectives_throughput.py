"""Training throughput of every pretraining objective beside plain MLM, same run, same-sized models.

    python benchmarks/objectives_throughput.py [--steps 80] [--repeats 3]

Each objective trains a 4-layer, 128-wide model (4 heads, FFN 512; BERT for mlm / mlm+nsp / mlm+sop,
ELECTRA for electra — plus its quarter-width generator —, T5 for span with 4 encoder and 4 decoder
layers, GPT-2 for clm) on WikiText-2 (valid + test) with one byte-level BPE 8k tokenizer, block 128,
batch 32, fp32, for `--steps` steps, in a fresh process each. Throughput is input tokens read per second
(non-padding tokens; span: encoder + decoder tokens), from the engine's own log, the first 20 steps
excluded; the median over `--repeats` runs is reported with the ratio to MLM measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"
OBJECTIVES = {"mlm": "bert", "mlm+nsp": "bert", "mlm+sop": "bert", "electra": "electra", "span": "t5",
              "clm": "gpt2"}


def tree(objective: str, steps: int, work: Path) -> dict:
    return {
        "name": f"throughput-{objective}",
        "data": {"sources": [{"path": str(WIKI / f), "domain": "wiki"} for f in ("valid.txt", "test.txt")],
                 "validation_fraction": 0.01, "cache_dir": str(work / "cache")},
        "tokenizer": {"path": str(work / "tokenizer")},
        "model": {"family": OBJECTIVES[objective], "n_layers": 4, "d_model": 128, "n_heads": 4, "d_ff": 512,
                  "dropout": 0.1},
        "objective": {"name": objective, "block_size": 128},
        "train": {"batch_size": 32, "max_steps": steps, "lr": 5e-4, "eval_every": 0, "eval_batches": 1,
                  "log_every": 10, "precision": "fp32", "seed": 0},
        "output": {"dir": str(work / f"run-{objective}"), "tensorboard": False, "plots": False},
    }


def one(objective: str, steps: int, work: Path) -> dict:
    from lmforge.engine.logging import read_metrics
    from lmforge.pretrain import pretrain
    from lmforge.recipe import recipe_from_dict
    run = pretrain(recipe_from_dict(tree(objective, steps, work)), force=True, show_progress=False)
    logs = [r for r in read_metrics(run) if "tokens_per_s" in r and r["step"] > 20]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in logs),
            "mfu": statistics.median(r["mfu"] for r in logs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.steps, args.work)))
        return
    if not (WIKI / "valid.txt").exists():
        sys.exit(f"skipped: {WIKI} not found")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from lmforge.objectives.span import add_sentinels
        from lmforge.recipe import DataConfig, TokenizerConfig
        from lmforge.pretrain import train_tokenizer_for
        from lmforge.tokenizer import save_tokenizer
        tok = train_tokenizer_for(DataConfig(sources=tree("mlm", 1, work)["data"]["sources"]),
                                  TokenizerConfig(kind="bpe", vocab_size=8000))
        save_tokenizer(add_sentinels(tok, 100), work / "tokenizer")  # one vocabulary for every objective
        results: dict[str, list[dict]] = {o: [] for o in OBJECTIVES}
        for r in range(args.repeats):
            for objective in OBJECTIVES:
                out = subprocess.run([sys.executable, __file__, "--one", objective, "--steps", str(args.steps),
                                      "--work", str(work)], check=True, stdout=subprocess.PIPE, text=True).stdout
                results[objective].append(json.loads(out.strip().splitlines()[-1]))
                print(f"repeat {r + 1}: {objective}: {results[objective][-1]}", flush=True)
    base = statistics.median(x["tokens_per_s"] for x in results["mlm"])
    print("\n| objective | model | input tokens/s | MFU | vs MLM |\n|---|---|---:|---:|---:|")
    for objective, runs in results.items():
        tps = statistics.median(x["tokens_per_s"] for x in runs)
        mfu = statistics.median(x["mfu"] for x in runs)
        print(f"| {objective} | {OBJECTIVES[objective]} | {tps:,.0f} | {mfu:.0%} | {tps / base:.2f}x |")


if __name__ == "__main__":
    main()
