"""Sentence embeddings: all-MiniLM-L6-v2 fine-tuned with in-batch negatives vs the untuned model on held-out pairs,
measured in the same run, and the fine-tuned folder's vectors against sentence-transformers' encoding of it.

The pairs are recipes/pairs-minilm-embed.yaml's: each WikiText-2 sentence and the next sentence of its paragraph,
training pairs from valid.txt, held-out pairs from test.txt (other articles). The untuned figures are the run's
evaluation at step 0 (`train.eval_at_start`), on the same 1,000 held-out pairs as the tuned ones.

    python benchmarks/finetune_more.py                       # the recipe as shipped
    python benchmarks/finetune_more.py --steps 60 --eval-pairs 500 --threads 2

`--fgm` measures adversarial training instead: recipes/sst2-minilm.yaml on a slice of SST-2, with and
without `train.adversarial=fgm` (or each of `--methods`, e.g. `none fgm pgd`), the same seeds; dev accuracy (mean ± half the spread over the seeds) and
seconds per training step of each (between the first and the last training log line).

    python benchmarks/finetune_more.py --fgm --examples 2000 --seeds 0 1 --threads 2
    python benchmarks/finetune_more.py --fgm --methods none fgm pgd --examples 1000 --seeds 0 1 --threads 1
    python benchmarks/finetune_more.py --fgm --task conll --examples 2000 --seeds 0 1 --threads 1   # entity F1

`--task conll` runs recipes/conll2003-minilm.yaml (one epoch on the first `--examples` sentences) and reports
entity-level F1 on the validation set.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from lmforge.engine.logging import read_metrics
from lmforge.finetune import finetune
from lmforge.tasks.pairs import read_pair_splits
from lmforge.tasks.config import load_finetune_recipe
from lmforge.tasks.embed import open_encoder

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "pairs-minilm-embed.yaml"


def sentence_transformers_gap(run_dir: Path, texts: list[str]) -> float:
    """Largest difference between lmforge's vectors and sentence-transformers' for the run's final/ folder."""
    # sentence-transformers is the peer here, loaded only for this check
    from sentence_transformers import SentenceTransformer
    ours = open_encoder(run_dir).encode(texts)
    theirs = SentenceTransformer(str(run_dir / "final"), device="cpu", local_files_only=True).encode(
        texts, batch_size=64, convert_to_numpy=True)
    return float(np.abs(ours - theirs).max())


TASKS = {"sst2": ("sst2-minilm.yaml", "accuracy", "SST-2", ["data.max_length=64"]),
         "conll": ("conll2003-minilm.yaml", "f1", "CoNLL-2003", ["train.epochs=1"])}


def fgm_comparison(examples: int, seeds: list[int], threads, methods=("none", "fgm"), task: str = "sst2") -> None:
    """A task with each adversarial method (and without), each seed every way, the same data slice and schedule."""
    recipe, metric, title, settings = TASKS[task]
    rows = {}
    for method in methods:
        for seed in seeds:
            out = Path(tempfile.mkdtemp(prefix="fgm-bench-"))
            overrides = [f"output.dir={out / 'run'}", "output.plots=false", "output.tensorboard=false",
                         f"data.max_examples={examples}", f"train.seed={seed}",
                         f"train.adversarial={method}", "train.eval_every=0", *settings]
            overrides += [f"train.threads={threads}"] if threads else []
            run = finetune(load_finetune_recipe(ROOT / "recipes" / recipe, overrides), show_progress=False)
            train = [r for r in read_metrics(run) if "split" not in r]
            share = [r["adversarial_share"] for r in train if "adversarial_share" in r]
            rows.setdefault(method, []).append((run.metrics["validation"][metric],
                                                (train[-1]["elapsed_s"] - train[0]["elapsed_s"])
                                                / (train[-1]["step"] - train[0]["step"]),
                                                float(np.mean(share)) if share else 0.0))
    per_step = {method: np.mean([s for _, s, _ in found]) for method, found in rows.items()}
    print(f"{title}, first {examples} training rows, 1 epoch, dev set; seeds {seeds}")
    print(f"{'training':<12}{'dev ' + metric:>22}{'s / step':>10}{'adversarial share':>19}")
    for method, found in rows.items():
        acc = np.array([a for a, _, _ in found])
        print(f"{method:<12}{acc.mean():>14.4f} ± {(acc.max() - acc.min()) / 2:.4f}"
              f"{per_step[method]:>10.2f}{np.mean([h for _, _, h in found]):>19.3f}")
    for method in methods:
        if method != "none" and "none" in per_step:
            print(f"s / step ratio {method} / none: {per_step[method] / per_step['none']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="Training steps (default: the recipe's).")
    ap.add_argument("--lr", type=float, default=None, help="Peak learning rate (default: the recipe's).")
    ap.add_argument("--eval-pairs", type=int, default=None, help="Held-out pairs (default: the recipe's).")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores).")
    ap.add_argument("--fgm", action="store_true", help="Measure adversarial training (SST-2 or --task conll) instead.")
    ap.add_argument("--methods", nargs="+", default=["none", "fgm"], choices=["none", "fgm", "pgd"],
                    help="--fgm: train.adversarial values compared (pgd with the recipe defaults).")
    ap.add_argument("--examples", type=int, default=2000, help="--fgm: training rows.")
    ap.add_argument("--task", choices=sorted(TASKS), default="sst2", help="--fgm: the task (SST-2 or CoNLL-2003).")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="--fgm: seeds, each run both ways.")
    args = ap.parse_args()
    if args.fgm:
        fgm_comparison(args.examples, args.seeds, args.threads, args.methods, args.task)
        return
    out = Path(tempfile.mkdtemp(prefix="embed-bench-"))
    overrides = [f"output.dir={out / 'run'}", "output.plots=false", "output.tensorboard=false"]
    overrides += [f"train.max_steps={args.steps}", f"train.eval_every={args.steps}"] if args.steps else []
    overrides += [f"data.max_eval_examples={args.eval_pairs}"] if args.eval_pairs else []
    overrides += [f"train.lr={args.lr}"] if args.lr else []
    overrides += [f"train.threads={args.threads}"] if args.threads else []
    recipe = load_finetune_recipe(RECIPE, overrides)
    started = time.perf_counter()
    run = finetune(recipe, show_progress=False)
    seconds = time.perf_counter() - started
    evals = [r for r in read_metrics(run) if r.get("split") == "validation"]
    before, after = evals[0], json.loads((run / "results.json").read_text())["validation"]
    held = read_pair_splits(recipe)["validation"]
    gap = sentence_transformers_gap(run.run_dir, [p.query for p in held[:200]] + [p.positive for p in held[:200]])
    print(f"held-out pairs: {after['queries']} queries ranking {after['corpus']} next sentences "
          f"({recipe.train.max_steps} steps of {recipe.train.batch_size} pairs, lr {recipe.train.lr:g}, "
          f"{seconds:.0f} s)")
    print(f"{'model':<28}{'recall@1':>10}{'recall@10':>11}{'MRR':>8}")
    for name, m in (("all-MiniLM-L6-v2 (untuned)", before), ("fine-tuned (in-batch)", after)):
        print(f"{name:<28}{m['recall@1']:>10.4f}{m['recall@10']:>11.4f}{m['mrr']:>8.4f}")
    print(f"recall@10 ratio tuned / untuned: {after['recall@10'] / before['recall@10']:.3f}")
    print(f"sentence-transformers parity (400 texts): max |difference| {gap:.2e}")


if __name__ == "__main__":
    main()
