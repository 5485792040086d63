"""Start-up: from process start to the first training step of `lmforge pretrain` on a cached dataset, against
the time Python takes to import torch alone, each in a fresh process (the budget: torch's import + 3 s).

    python benchmarks/startup.py [--repeats 3]

The recipe is the Shakespeare-char one (GPT-2 4x4x128, character tokenizer). The first run fills the caches
(tokenized data, the trained tokenizer, the machine's matmul roof); the figures are the medians of the runs
after it, each run interleaved with a torch-only process; the cached runs' peak resident memory is reported
beside torch's own. Each figure is the parent's clock at launch to the child's clock at that point (same machine clock).
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

CHILD = r"""
import json, sys, time
launched = float(sys.argv[1])
from lmforge.pretrain import pretrain
imported = time.time()
tree = json.loads(sys.argv[2])
run = pretrain(tree, force=True, show_progress=False)
first = next(json.loads(l) for l in open(run.run_dir / "metrics.jsonl") if '"split"' not in l)
import resource
print(json.dumps({"import_s": imported - launched, "to_first_step_s": imported - launched + first["elapsed_s"],
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "datasets_imported": "datasets" in sys.modules}))
"""

TORCH = r"""
import json, sys, time
launched = float(sys.argv[1])
import torch
import resource
print(json.dumps({"torch_import_s": time.time() - launched,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def fresh(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, str(time.time()), *args], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not TEXT.exists():
        raise SystemExit(f"skipped: {TEXT} not found")
    with tempfile.TemporaryDirectory() as tmp:
        tree = {"name": "startup", "data": {"sources": [{"path": str(TEXT), "sample_by": "document"}],
                                            "cache_dir": str(Path(tmp) / "cache")},
                "tokenizer": {"kind": "char"},
                "model": {"family": "gpt2", "n_layers": 4, "n_heads": 4, "d_model": 128, "dropout": 0.0},
                "objective": {"name": "clm", "block_size": 65},
                "train": {"batch_size": 12, "max_steps": 1, "eval_every": 0, "log_every": 1, "precision": "fp32"},
                "output": {"dir": str(Path(tmp) / "run"), "tensorboard": False, "plots": False}}
        first = fresh(CHILD, json.dumps(tree))  # fills the caches
        runs, torches = [], []
        for _ in range(args.repeats):  # interleaved, so load from other jobs falls on both alike
            torches.append(fresh(TORCH))
            runs.append(fresh(CHILD, json.dumps(tree)))
    torch_s = statistics.median(t["torch_import_s"] for t in torches)
    to_step = statistics.median(r["to_first_step_s"] for r in runs)
    print(json.dumps({"torch_import_s": round(torch_s, 2),
                      "lmforge_import_s": round(statistics.median(r["import_s"] for r in runs), 2),
                      "start_to_first_step_s": round(to_step, 2),
                      "over_torch_s": round(to_step - torch_s, 2), "budget_over_torch_s": 3.0,
                      "first_run_uncached_s": round(first["to_first_step_s"], 2),
                      "peak_rss_mib_cached_run": round(statistics.median(r["peak_rss_mib"] for r in runs)),
                      "peak_rss_mib_torch_alone": round(statistics.median(t["peak_rss_mib"] for t in torches)),
                      "datasets_imported_on_cached_run": any(r["datasets_imported"] for r in runs)}, indent=2))


if __name__ == "__main__":
    main()
