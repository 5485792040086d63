"""Sentence embeddings: all-MiniLM-L6-v2 fine-tuned with in-batch negatives vs the untuned model on held-out pairs,
measured in the same run, and the fine-tuned folder's vectors against sentence-transformers' encoding of it.

The pairs are recipes/pairs-minilm-embed.yaml's: each WikiText-2 sentence and the next sentence of its paragraph,
training pairs from valid.txt, held-out pairs from test.txt (other articles). The untuned figures are the run's
evaluation at step 0 (`train.eval_at_start`), on the same 1,000 held-out pairs as the tuned ones.

    python benchmarks/finetune_more.py                       # the recipe as shipped
    python benchmarks/finetune_more.py --steps 60 --eval-pairs 500 --threads 2
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from lmforge.engine.logging import read_metrics
from lmforge.finetune import finetune
from lmforge.finetune.embedding import read_pair_splits
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="Training steps (default: the recipe's).")
    ap.add_argument("--eval-pairs", type=int, default=None, help="Held-out pairs (default: the recipe's).")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores).")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="embed-bench-"))
    overrides = [f"output.dir={out / 'run'}", "output.plots=false", "output.tensorboard=false"]
    overrides += [f"train.max_steps={args.steps}", f"train.eval_every={args.steps}"] if args.steps else []
    overrides += [f"data.max_eval_examples={args.eval_pairs}"] if args.eval_pairs else []
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
          f"({recipe.train.max_steps} steps of {recipe.train.batch_size} pairs, {seconds:.0f} s)")
    print(f"{'model':<28}{'recall@1':>10}{'recall@10':>11}{'MRR':>8}")
    for name, m in (("all-MiniLM-L6-v2 (untuned)", before), ("fine-tuned (in-batch)", after)):
        print(f"{name:<28}{m['recall@1']:>10.4f}{m['recall@10']:>11.4f}{m['mrr']:>8.4f}")
    print(f"recall@10 ratio tuned / untuned: {after['recall@10'] / before['recall@10']:.3f}")
    print(f"sentence-transformers parity (400 texts): max |difference| {gap:.2e}")


if __name__ == "__main__":
    main()
