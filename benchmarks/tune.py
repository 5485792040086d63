"""Hyperparameter search on SST-2 with all-MiniLM-L6-v2: pruning and workers, measured in the same run.

A fixed, seeded subset of SST-2 (train rows and dev rows below) is written to the output folder; every study searches
recipes/spaces/sst2-minilm.yaml (lr, batch size, warmup, weight decay) over recipes/sst2-minilm.yaml pointed at it.

    python benchmarks/tune.py --part pruning     # 16 trials unpruned and 16 with the median pruner, side by side
    python benchmarks/tune.py --part workers     # 16 trials with 1 worker, then with 2 workers (1 thread each)

`pruning` runs the two studies at the same time, one thread each, so that whatever else the machine does slows both
alike; it also runs the shipped recipe's defaults once on the subset. `workers` needs the machine to itself: on two
cores, two workers of one thread each against one worker of one thread.
"""
import argparse
import csv
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"


def subset(out: Path, rows: int, dev_rows: int, seed: int) -> dict:
    """Write seeded subsets of SST-2's train and dev splits; return the data section pointing at them."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n, name in (("train", rows, "train.tsv"), ("validation", dev_rows, "dev.tsv")):
        with open(SST2 / name, newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header, *body = list(reader)
        random.Random(seed).shuffle(body)
        target = out / name
        with open(target, "w", newline="") as f:
            w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
            w.writerows([header, *body[:n]])
        paths[split] = {"path": str(target.resolve())}
    return paths


def recipe(out: Path, data: dict, eval_every: int) -> Path:
    tree = yaml.safe_load((ROOT / "recipes" / "sst2-minilm.yaml").read_text())
    tree["data"].update(data)
    tree["data"]["max_length"] = 64
    tree["train"].update({"eval_every": eval_every, "threads": 1, "save_every": 0})
    tree["output"] = {"dir": str(out / "defaults"), "tensorboard": False}
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def study(recipe_file: Path, out: Path, name: str, trials: int, pruner: str, workers: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lmforge.cli", "tune", str(recipe_file), "--space",
           str(ROOT / "recipes" / "spaces" / "sst2-minilm.yaml"), "--trials", str(trials), "--study", name,
           "--out", str(out / name), "--pruner", pruner, "--workers", str(workers), "--threads", "1"]
    log = open(out / f"{name}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def best(out: Path, name: str) -> dict:
    folder = out / name
    rows = list(csv.DictReader(open(folder / "trials.csv")))
    done = [r for r in rows if r["state"] == "complete"]
    top = max(done, key=lambda r: float(r["accuracy"]))
    return {"best_accuracy": float(top["accuracy"]), "complete": len(done),
            "pruned": sum(r["state"] == "pruned" for r in rows), "failed": sum(r["state"] == "fail" for r in rows)}


def wait_all(procs: dict) -> dict:
    """Wait for every study; return each one's wall seconds from the common start."""
    start, walls = time.perf_counter(), {}
    while len(walls) < len(procs):
        for name, p in procs.items():
            if name not in walls and p.poll() is not None:
                if p.returncode:
                    raise SystemExit(f"study {name} failed (exit {p.returncode}); see its log")
                walls[name] = time.perf_counter() - start
        time.sleep(0.5)
    return walls


def defaults(recipe_file: Path) -> float:
    done = subprocess.run([sys.executable, "-m", "lmforge.cli", "finetune", str(recipe_file), "--force"],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the defaults run failed:\n{done.stderr}")
    results = json.loads((recipe_file.parent / "defaults" / "results.json").read_text())
    return results["validation"]["accuracy"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["pruning", "workers"], required=True)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--rows", type=int, default=1000, help="training rows of the subset")
    ap.add_argument("--dev-rows", type=int, default=400, help="dev rows of the subset")
    ap.add_argument("--eval-every", type=int, default=8, help="steps between evaluations (the pruner's rungs)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-tune")
    args = ap.parse_args()
    if not SST2.exists():
        raise SystemExit(f"SST-2 not found at {SST2}")
    out = args.out / args.part
    if out.exists():  # a study left there would be continued, not run again
        shutil.rmtree(out)
    recipe_file = recipe(out, subset(out, args.rows, args.dev_rows, seed=0), args.eval_every)
    if args.part == "pruning":
        walls = wait_all({"unpruned": study(recipe_file, out, "unpruned", args.trials, "none", 1),
                          "pruned": study(recipe_file, out, "pruned", args.trials, "median", 1)})
        figures = {name: {"wall_s": round(walls[name], 1), **best(out, name)} for name in walls}
        figures["defaults_accuracy"] = defaults(recipe_file)
        figures["wall_ratio_pruned"] = round(walls["pruned"] / walls["unpruned"], 3)
        figures["best_gap_points"] = round(100 * (figures["pruned"]["best_accuracy"]
                                                  - figures["unpruned"]["best_accuracy"]), 2)
    else:
        walls = {}
        for name, workers in (("one-worker", 1), ("two-workers", 2)):
            walls.update(wait_all({name: study(recipe_file, out, name, args.trials, "none", workers)}))
        figures = {name: {"wall_s": round(walls[name], 1), **best(out, name)} for name in walls}
        figures["wall_ratio_two_workers"] = round(walls["two-workers"] / walls["one-worker"], 3)
    figures.update({"trials": args.trials, "rows": args.rows, "dev_rows": args.dev_rows})
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
