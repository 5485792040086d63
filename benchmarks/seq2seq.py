"""Seq2seq: the span-corruption T5 fine-tuned on WikiText-2 paragraph → section heading (recipes/wikitext2-t5-heading.yaml)
against the lead baseline (the first N words of the paragraph, for N = 1..5: the best N is the peer), the same
held-out pairs, ROUGE-L (and ROUGE-1/2, BLEU) from the same scorer. Also printed: a constant answer, the most
frequent training heading, which is what a model that does not read its source ends up saying.

Needs the pretrained T5 (`lmforge pretrain recipes/wikitext2-t5-span.yaml`, or a shorter run passed as --base).

    python benchmarks/seq2seq.py --base runs/wikitext2-t5-span --steps 400 --eval 500 --threads 2
"""
import argparse
from collections import Counter
import tempfile
import time
from pathlib import Path

from lmforge.finetune import finetune
from lmforge.tasks.config import load_finetune_recipe
from lmforge.tasks.seq2seq import text_metrics
from lmforge.tasks.seq2seq_data import read_seq2seq_splits

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "wikitext2-t5-heading.yaml"


def lead(source: str, n: int) -> str:
    return " ".join(source.split()[:n])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=str(ROOT / "runs" / "wikitext2-t5-span"), help="The pretrained T5 run folder.")
    ap.add_argument("--steps", type=int, default=None, help="Fine-tuning steps (default: the recipe's).")
    ap.add_argument("--lr", type=float, default=None, help="Peak learning rate (default: the recipe's).")
    ap.add_argument("--max-length", type=int, default=None, help="Source tokens kept (default: the recipe's).")
    ap.add_argument("--eval", type=int, default=None, help="Held-out pairs scored (default: the recipe's).")
    ap.add_argument("--beams", type=int, default=None, help="Beams at evaluation (default: the recipe's).")
    ap.add_argument("--pairs", choices=["heading", "title"], default=None,
                    help="heading: the section's heading; title: the article's title (default: the recipe's).")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores).")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="seq2seq-bench-"))
    overrides = [f"model.path={Path(args.base).resolve()}", f"output.dir={out / 'run'}", "output.plots=false",
                 "output.tensorboard=false"]
    overrides += [f"train.max_steps={args.steps}", f"train.eval_every={args.steps}"] if args.steps else []
    overrides += [f"train.lr={args.lr}"] if args.lr else []
    overrides += [f"data.max_eval_examples={args.eval}"] if args.eval else []
    overrides += [f"data.max_length={args.max_length}"] if args.max_length else []
    overrides += [f"seq2seq.num_beams={args.beams}"] if args.beams else []
    overrides += [f"train.threads={args.threads}"] if args.threads else []
    overrides += [f"data.pairs={args.pairs}"] if args.pairs else []
    recipe = load_finetune_recipe(RECIPE, overrides)
    splits = read_seq2seq_splits(recipe)
    pairs = splits["validation"]
    references = [p.target for p in pairs]
    leads = {n: text_metrics([lead(p.source, n) for p in pairs], references) for n in range(1, 6)}
    # a model that ignores its source collapses onto a frequent heading: the most frequent one, said every time
    common = Counter(p.target for p in splits["train"]).most_common(1)[0][0]
    constant = text_metrics([common] * len(pairs), references)
    started = time.perf_counter()
    run = finetune(recipe, show_progress=False)
    seconds = time.perf_counter() - started
    tuned = run.metrics["validation"]
    best = max(leads, key=lambda n: leads[n]["rougeL"])
    target = "its article's title" if recipe.data.pairs == "title" else "heading"
    print(f"WikiText-2 paragraph → {target}, {len(pairs)} held-out pairs (test.txt); fine-tuned "
          f"{recipe.train.max_steps} steps (lr {recipe.train.lr}) from {args.base}, {recipe.seq2seq.num_beams} beams, {seconds:.0f} s")
    print(f"{'model':<24}{'rouge1':>9}{'rouge2':>9}{'rougeL':>9}{'bleu':>8}")
    for n, m in leads.items():
        print(f"{f'lead-{n}':<24}{m['rouge1']:>9.4f}{m['rouge2']:>9.4f}{m['rougeL']:>9.4f}{m['bleu']:>8.2f}")
    print(f"{'constant: ' + common[:14]:<24}{constant['rouge1']:>9.4f}{constant['rouge2']:>9.4f}"
          f"{constant['rougeL']:>9.4f}{constant['bleu']:>8.2f}")
    print(f"{'fine-tuned T5':<24}{tuned['rouge1']:>9.4f}{tuned['rouge2']:>9.4f}{tuned['rougeL']:>9.4f}"
          f"{tuned['bleu']:>8.2f}")
    print(f"ROUGE-L ratio fine-tuned / best lead (lead-{best}): {tuned['rougeL'] / leads[best]['rougeL']:.2f}")
    print(f"predictions: {run / 'predictions-validation.jsonl'}")


if __name__ == "__main__":
    main()
