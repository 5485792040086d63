"""Branch-Train-Merge vs a dense model of equal training tokens, per domain.

    python benchmarks/experts.py            # recipes/experts-domains.yaml (runs `lmforge prep` first if needed)
    python benchmarks/experts.py --steps 100 --seed-steps 100    # shorter

Seed: a GPT-2 4x128 trained on the 7-domain mixture. Experts: the seed trained `steps` on each of 4 domains
(each expert its own process; two at a time on 2 cores). Dense: the seed trained 4 x `steps` on the mixture,
so experts and dense see the same number of training tokens (printed). Out-of-domain: the domains no
expert saw.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from lmforge.experts import branch, evaluate, format_comparison, merge
from lmforge.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="Steps per expert (default: the recipe's).")
    ap.add_argument("--seed-steps", type=int, default=None)
    ap.add_argument("--parallel", type=int, default=2, help="Experts trained at once (separate processes).")
    args = ap.parse_args()
    if not (ROOT / "data" / "shared-corpora" / "lmforge-prep.json").is_file():
        subprocess.run([sys.executable, "-m", "lmforge.cli", "prep", str(ROOT / "recipes/prep/shared-corpora.yaml"),
                        "--no-progress"], check=True, cwd=ROOT)
    overrides = [f"experts.steps={args.steps}"] if args.steps else []
    overrides += [f"experts.seed_steps={args.seed_steps}"] if args.seed_steps else []
    recipe = load_recipe(ROOT / "recipes" / "experts-domains.yaml", overrides)
    recipe.output.dir = str(ROOT / "runs" / "bench-experts")
    t0 = time.perf_counter()
    run = branch(recipe, force=True, show_progress=False)
    t_seed = time.perf_counter() - t0
    info = json.loads((run / "experts.json").read_text())
    threads = max(1, 2 // args.parallel)
    env = {"OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    pending = list(info["domains"])
    while pending:
        batch, pending = pending[:args.parallel], pending[args.parallel:]
        procs = [subprocess.Popen([sys.executable, "-m", "lmforge.cli", "experts", "train", str(run), "--domain", d,
                                   "--no-progress"], cwd=ROOT, env={**__import__("os").environ, **env},
                                  stdout=subprocess.DEVNULL) for d in batch]
        for p in procs:
            if p.wait():
                raise SystemExit(f"expert training failed: {p.args}")
    t_experts = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lmforge.cli", "experts", "train", str(run), "--dense", "--no-progress"],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    t_dense = time.perf_counter() - t0
    merge(run, "ensemble")
    merge(run, "average")
    results = evaluate(run)
    steps = info["steps_per_expert"]
    tokens = steps * recipe.train.batch_size * recipe.objective.block_size
    print(f"seed: {recipe.experts.seed_steps} steps on the mixture ({t_seed:.0f} s)")
    print(f"experts: {len(info['domains'])} x {steps} steps = {len(info['domains']) * tokens:,} tokens "
          f"({t_experts:.0f} s wall, {args.parallel} processes at a time)")
    print(f"dense: {len(info['domains']) * steps} steps = {len(info['domains']) * tokens:,} tokens ({t_dense:.0f} s)\n")
    print(format_comparison(results))
    inside = [d for d in info["domains"]]
    outside = sorted({k.split('/', 1)[1] for k in results["seed"] if k.startswith("ppl/")} - set(inside))
    for name, m in results.items():
        mean_in = sum(m[f"ppl/{d}"] for d in inside) / len(inside)
        mean_out = sum(m[f"ppl/{d}"] for d in outside) / max(len(outside), 1)
        print(f"{name:>9}: in-domain mean ppl {mean_in:8.2f}   out-of-domain mean ppl {mean_out:8.2f}")
    dense_in = sum(results["dense"][f"ppl/{d}"] for d in inside) / len(inside)
    ens_in = sum(results["ensemble"][f"ppl/{d}"] for d in inside) / len(inside)
    print(f"\nensemble vs dense, in-domain: {100 * (ens_in / dense_in - 1):+.1f} % (bar: <= -10 %)")


if __name__ == "__main__":
    main()
