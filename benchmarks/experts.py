"""Domain experts vs a dense model of equal training tokens, per domain: BTM ensemble, BTM average, DEMix and
Branch-Train-MiX.

    python benchmarks/experts.py            # recipes/experts-domains.yaml (runs `lmforge prep` first if needed)
    python benchmarks/experts.py --steps 100 --seed-steps 100    # shorter

Every model trains on the four expert domains only (biomedical, code, legal, scientific); wiki, drama and
reviews are out of domain for all of them. Seed: a GPT-2 4x128 trained `seed-steps` on the four-domain mixture.
Then, each from the seed, with the same number of training tokens (printed):
  experts  `steps` on each domain alone at batch experts.batch_size (4: BTM's compute matching gives each of
           the 4 experts a quarter of the hardware, so a quarter of the batch and the dense run's updates),
           each expert its own process (two at a time on 2 cores);
  dense    on the mixture at train.batch_size (16), as many tokens as the four experts together;
  DEMix    the same steps, domains in equal shares, each row through its domain's FFN expert;
  dense, small batch: the seed on the mixture at the experts' batch for 4 x `steps` (as many tokens, 4x the
           updates): does a smaller batch alone explain the experts' gain? (--no-small-batch-dense skips it)
and after the experts, BTX: the experts merged into a top-2 MoE trained `--btx-steps` on the mixture (every
parameter, or only the routers with --btx-train router; tokens on top of the experts', printed). Dense and DEMix
train at the same time, one process each.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lmforge.experts import branch, evaluate, format_comparison, merge
from lmforge.experts.run import dense_recipe, mixture_steps
from lmforge.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
IN_DOMAIN = ["biomedical", "code", "legal", "scientific"]


def cli(*args: str, threads: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lmforge.cli", *args, "--no-progress"], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)}, stdout=subprocess.DEVNULL)


def wait(procs: list) -> None:
    for p in procs:
        if p.wait():
            raise SystemExit(f"failed: {' '.join(p.args)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="Steps per expert (default: the recipe's).")
    ap.add_argument("--seed-steps", type=int, default=None)
    ap.add_argument("--btx-steps", type=int, default=None, help="BTX training steps (default: the seed steps).")
    ap.add_argument("--btx-train", default="all", choices=["all", "router"],
                    help="What BTX trains after merging: every parameter, as in the paper (default), or the routers.")
    ap.add_argument("--weights", default="uniform", choices=["uniform", "fisher"],
                    help="How the BTM average and BTX's shared parameters average the experts: uniformly, or "
                         "Fisher-weighted (each weight from the experts whose domain relies on it; the uniform "
                         "average is then evaluated too).")
    ap.add_argument("--fisher-blocks", type=int, default=None,
                    help="--weights fisher: blocks of its domain per expert's Fisher (default: merge's, 256).")
    ap.add_argument("--router-init", default="random", choices=["random", "centroids"],
                    help="BTX routers: random (the paper's) or at the domains' mean hidden states.")
    ap.add_argument("--merge-only", action="store_true",
                    help="Reuse the trained run in --out (seed, experts, dense, DEMix): only merge and evaluate.")
    ap.add_argument("--parallel", type=int, default=2, help="Experts trained at once (separate processes).")
    ap.add_argument("--no-small-batch-dense", dest="small_batch_dense", action="store_false",
                    help="Skip the dense control trained at the experts' batch size.")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="Recipe override, e.g. --set model.d_model=64 (repeatable).")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-experts"))
    args = ap.parse_args()
    if not (ROOT / "data" / "shared-corpora" / "lmforge-prep.json").is_file():
        subprocess.run([sys.executable, "-m", "lmforge.cli", "prep", str(ROOT / "recipes/prep/shared-corpora.yaml"),
                        "--no-progress"], check=True, cwd=ROOT)
    overrides = list(args.overrides) + ([f"experts.steps={args.steps}"] if args.steps else [])
    overrides += [f"experts.seed_steps={args.seed_steps}"] if args.seed_steps else []
    recipe = load_recipe(ROOT / "recipes" / "experts-domains.yaml", overrides)
    all_data = recipe.data.model_copy(deep=True)
    recipe.data.only_domains = IN_DOMAIN  # seed, dense, experts, DEMix and BTX see these four domains only
    recipe.experts.domains = IN_DOMAIN
    recipe.output.dir = args.out
    if args.merge_only:
        merge_only(recipe, all_data, args)
        return
    t0 = time.perf_counter()
    run = branch(recipe, force=True, show_progress=False)
    t_seed = time.perf_counter() - t0
    info = json.loads((run / "experts.json").read_text())
    threads = max(1, 2 // args.parallel)
    t0 = time.perf_counter()
    pending = list(info["domains"])
    while pending:
        batch, pending = pending[:args.parallel], pending[args.parallel:]
        wait([cli("experts", "train", str(run), "--domain", d, threads=threads) for d in batch])
    t_experts = time.perf_counter() - t0
    t0 = time.perf_counter()
    wait([cli("experts", "train", str(run), "--dense", threads=1),
          cli("experts", "train", str(run), "--demix", threads=1)])
    t_dense_demix = time.perf_counter() - t0
    extra, t_small = {}, 0.0
    expert_batch = info.get("expert_batch_size", recipe.train.batch_size)
    n = len(info["domains"])
    if args.small_batch_dense and expert_batch != recipe.train.batch_size:
        r = dense_recipe(recipe, info["domains"], run / info["seed"], run / "dense-small-batch")
        r.train.batch_size, r.train.max_steps = expert_batch, n * info["steps_per_expert"]
        (run / "dense-small-batch.yaml").write_text(r.to_yaml())
        t0 = time.perf_counter()
        wait([cli("pretrain", str(run / "dense-small-batch.yaml"), "--force", threads=2)])
        t_small = time.perf_counter() - t0
        extra["dense, small batch"] = run / "dense-small-batch" / "final"
    btx_steps, t_btx, results, t_eval = merge_and_evaluate(run, recipe, all_data, args, extra)
    steps = info["steps_per_expert"]
    block = recipe.objective.block_size
    step_tokens = recipe.train.batch_size * block
    mixed = mixture_steps(recipe, n)
    expert_tokens = n * steps * expert_batch * block
    print(f"seed: {recipe.experts.seed_steps} steps on the {n}-domain mixture ({t_seed:.0f} s)")
    print(f"experts: {n} x {steps} steps at batch {expert_batch} = {expert_tokens:,} tokens "
          f"({t_experts:.0f} s wall, {args.parallel} processes at a time)")
    print(f"dense and DEMix: {mixed} steps at batch {recipe.train.batch_size} = {mixed * step_tokens:,} tokens each "
          f"({t_dense_demix:.0f} s wall, both at once)")
    if extra:
        print(f"dense, small batch: {n * steps} steps at batch {expert_batch} = {expert_tokens:,} tokens "
              f"({t_small:.0f} s)")
    print(f"BTX: the experts' tokens + {btx_steps} steps ({args.btx_train}) = {btx_steps * step_tokens:,} more "
          f"({t_btx:.0f} s)")
    print(f"evaluation: {t_eval:.0f} s\n")
    report(run, results, "benchmark.json")


def merge_and_evaluate(run: Path, recipe, all_data, args, extra: dict):
    """Ensemble, average and BTX merges of a trained run, then every model's per-domain perplexity."""
    merge(run, "ensemble")
    if args.weights == "fisher":  # the uniform average too, for comparison
        merge(run, "average")
        uniform = run / "average-uniform"
        if uniform.exists():
            shutil.rmtree(uniform)
        (run / "average").rename(uniform)
        extra = {**extra, "BTM average (uniform)": uniform}
    merge(run, "average", weights=args.weights, fisher_blocks=args.fisher_blocks, show_progress=False)
    btx_steps = args.btx_steps or recipe.experts.seed_steps
    t0 = time.perf_counter()
    merge(run, "moe", weights=args.weights, steps=btx_steps, train=args.btx_train, fisher_blocks=args.fisher_blocks,
          router_init=args.router_init, show_progress=False)
    t_btx = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = evaluate(run, data_config=all_data, extra=extra)
    t_eval = time.perf_counter() - t0
    suffix = " (Fisher)" if args.weights == "fisher" else ""
    results = {{"ensemble": "BTM ensemble", "average": "BTM average" + suffix, "moe": "BTX" + suffix,
                "demix": "DEMix"}.get(k, k): v for k, v in results.items()}
    return btx_steps, t_btx, results, t_eval


def merge_only(recipe, all_data, args) -> None:
    run = Path(args.out)
    if not (run / "experts.json").is_file():
        raise SystemExit(f"--merge-only: {run} holds no trained experts run (run without --merge-only first)")
    extra = {}
    if (run / "dense-small-batch" / "final" / "config.json").is_file():
        extra["dense, small batch"] = run / "dense-small-batch" / "final"
    btx_steps, t_btx, results, t_eval = merge_and_evaluate(run, load_recipe(run / "recipe.yaml"), all_data, args,
                                                           extra)
    step_tokens = recipe.train.batch_size * recipe.objective.block_size
    print(f"{run}: merges of the trained experts ({args.weights} weights)")
    print(f"BTX: the experts' tokens + {btx_steps} steps ({args.btx_train}) = {btx_steps * step_tokens:,} more "
          f"({t_btx:.0f} s)")
    print(f"evaluation: {t_eval:.0f} s\n")
    report(run, results, f"benchmark-merge-{args.weights}.json")


def report(run: Path, results: dict, name: str) -> None:
    print(format_comparison(results))
    outside = sorted({k.split('/', 1)[1] for k in results["seed"] if k.startswith("ppl/")} - set(IN_DOMAIN))
    summary = {}
    for name, m in results.items():
        mean_in = sum(m[f"ppl/{d}"] for d in IN_DOMAIN) / len(IN_DOMAIN)
        mean_out = sum(m[f"ppl/{d}"] for d in outside) / max(len(outside), 1)
        summary[name] = (mean_in, mean_out)
        print(f"{name:>12}: in-domain mean ppl {mean_in:8.2f}   out-of-domain mean ppl {mean_out:8.2f}")
    dense_in = summary["dense"][0]
    print()
    for name in (n for n in results if n not in ("seed", "dense")):
        print(f"{name} vs dense, in-domain: {100 * (summary[name][0] / dense_in - 1):+.1f} %"
              + ("  (bar: <= -10 %)" if name == "BTM ensemble" else "  (bar: < 0 %)" if name.startswith("BTX") else ""))
    (run / name).write_text(json.dumps({"results": results, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
