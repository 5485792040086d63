"""ELECTRA vs masked LM at equal training compute, judged by SST-2 after the same fine-tuning recipe.

    python benchmarks/electra_vs_mlm.py [--mlm-steps 2000] [--seeds 3] [--work DIR]

Both encoders are the same ELECTRA-architecture discriminator (4 layers, 128 wide, 4 heads, FFN 512,
block 128), pretrained from scratch on general English text: ../shared/data/wikitext2 (valid + test)
plus the English domain corpora (biomedical abstracts, legal, scientific), with one lowercased WordPiece 8k
tokenizer trained here and shared by everything.

- MLM: 15 % masking, the head at the masked positions only.
- ELECTRA: the same encoder as discriminator plus a generator of a quarter of its width; loss
  MLM(gen) + 50 * RTD(disc).

Training FLOPs are counted, not timed: FLOPs per input token come from `lmforge.models.flops_per_token`
(6 x non-embedding parameters + attention scores + output layer at the masked positions; for ELECTRA
both networks), and ELECTRA gets the number of steps that matches MLM's total. Each encoder is then
fine-tuned on SST-2 (full train split, 1 epoch, batch 32, lr 1e-4, 10 % warmup, linear decay) with
several seeds, and the dev accuracies are reported as mean and spread. A third row fine-tunes the
same architecture from random weights, to show what pretraining buys at this scale.

Each pretraining and fine-tuning run is a fresh `lmforge` process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ENGLISH = [
    {"path": str(SHARED / "wikitext2" / "valid.txt"), "domain": "wiki", "sample_by": "paragraph"},
    {"path": str(SHARED / "wikitext2" / "test.txt"), "domain": "wiki", "sample_by": "paragraph"},
    *({"path": str(SHARED / "domains" / "legal" / task / name), "domain": "legal"}
      for task, name in (("overruling", "test.tsv"), ("unfair_tos", "test.tsv"),
                         ("ssla_individual_defendants", "test_old.tsv"))),
    {"path": str(SHARED / "domains" / "scientific" / "Inspec" / "docsutf8"), "domain": "scientific",
     "sample_by": "document"},
]
MODEL = {"family": "electra", "n_layers": 4, "d_model": 128, "n_heads": 4, "d_ff": 512, "dropout": 0.1}
BATCH, BLOCK = 32, 128


def biomedical_jsonl(work: Path) -> dict:
    """PubMedQA's abstracts (one JSON object keyed by id, CONTEXTS a list of paragraphs) as JSONL lines."""
    target = work / "biomedical.jsonl"
    if not target.exists():
        entries = json.loads((SHARED / "domains" / "biomedical" / "ori_pqal.json").read_text())
        target.write_text("".join(json.dumps({"text": " ".join(e["CONTEXTS"])}) + "\n" for e in entries.values()))
    return {"path": str(target), "domain": "biomedical"}


def lmforge(*args: str) -> None:
    subprocess.run([sys.executable, "-c", "from lmforge.cli import app; app()", *args], check=True)


def pretrain_tree(name: str, objective: str, steps: int, work: Path, tokenizer: Path) -> dict:
    return {
        "name": name,
        "data": {"sources": ENGLISH, "validation_fraction": 0.02, "cache_dir": str(work / "cache"), "num_proc": 2},
        "tokenizer": {"path": str(tokenizer)},
        "model": MODEL,
        "objective": {"name": objective, "block_size": BLOCK},
        "train": {"batch_size": BATCH, "max_steps": steps, "lr": 1e-3, "warmup_steps": 0.05, "schedule": "linear",
                  "min_lr": 0.0, "weight_decay": 0.01, "eval_every": 0, "eval_batches": 20, "log_every": 50,
                  "precision": "fp32", "seed": 0},
        "output": {"dir": str(work / name), "tensorboard": False, "plots": False},
    }


def finetune_tree(name: str, model_path: str, seed: int, work: Path) -> dict:
    return {
        "name": name, "task": "classification",
        "data": {"train": {"path": str(SHARED / "sst2" / "train.tsv")},
                 "validation": {"path": str(SHARED / "sst2" / "dev.tsv")},
                 "text_column": "sentence", "label_column": "label", "max_length": 64},
        "model": {"path": model_path},
        "train": {"epochs": 1, "batch_size": 32, "lr": 1e-4, "warmup_steps": 0.1, "schedule": "linear",
                  "weight_decay": 0.01, "eval_every": 0, "seed": seed, "precision": "fp32"},
        "output": {"dir": str(work / name), "tensorboard": False, "plots": False},
    }


def flops_per_token(tree: dict) -> float:
    """FLOPs per input token of the recipe's model, built exactly as pretraining builds it."""
    from lmforge.models import build_model, flops_per_token as fpt
    from lmforge.pretrain import head_fraction
    from lmforge.recipe import recipe_from_dict
    from lmforge.tokenizer import load_tokenizer
    recipe = recipe_from_dict(tree)
    tokenizer = load_tokenizer(recipe.tokenizer.path)
    model = build_model(recipe.model, recipe.objective, tokenizer)
    return fpt(model, BLOCK, head_fraction(recipe.objective))


def write(tree: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def random_init_folder(work: Path, tokenizer: Path) -> Path:
    """The same architecture with random weights, saved as an HF folder (the no-pretraining baseline)."""
    from lmforge.engine.checkpoint import save_model
    from lmforge.models import build_model
    from lmforge.recipe import recipe_from_dict
    from lmforge.tokenizer import load_tokenizer
    recipe = recipe_from_dict(pretrain_tree("random", "mlm", 1, work, tokenizer))
    tok = load_tokenizer(tokenizer)
    folder = work / "random-init"
    save_model(folder, build_model(recipe.model, recipe.objective, tok), tok)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mlm-steps", type=int, default=2000, help="MLM pretraining steps (ELECTRA's follow from FLOPs)")
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per encoder")
    p.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--no-random-baseline", action="store_true")
    args = p.parse_args()
    if not (SHARED / "wikitext2" / "valid.txt").exists() or not (SHARED / "sst2" / "train.tsv").exists():
        sys.exit(f"skipped: {SHARED} lacks wikitext2 or sst2")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        run(work, args)


def run(work: Path, args) -> None:
    from lmforge.recipe import DataConfig, TokenizerConfig
    from lmforge.pretrain import train_tokenizer_for
    from lmforge.tokenizer import save_tokenizer
    ENGLISH.append(biomedical_jsonl(work))
    tokenizer = work / "tokenizer"
    if not (tokenizer / "tokenizer.json").exists():
        tok = train_tokenizer_for(DataConfig(sources=ENGLISH, validation_fraction=0.02),
                                  TokenizerConfig(kind="wordpiece", vocab_size=8000, lowercase=True))
        save_tokenizer(tok, tokenizer)

    mlm = pretrain_tree("mlm", "mlm", args.mlm_steps, work, tokenizer)
    electra = pretrain_tree("electra", "electra", 1, work, tokenizer)
    fpt = {"mlm": flops_per_token(mlm), "electra": flops_per_token(electra)}
    budget = fpt["mlm"] * args.mlm_steps * BATCH * BLOCK
    electra["train"]["max_steps"] = round(budget / (fpt["electra"] * BATCH * BLOCK))
    steps = {"mlm": args.mlm_steps, "electra": electra["train"]["max_steps"]}
    print(f"FLOPs per input token: MLM {fpt['mlm'] / 1e6:.2f}M, ELECTRA {fpt['electra'] / 1e6:.2f}M; "
          f"budget {budget / 1e15:.3f} PFLOP -> {steps['mlm']} MLM steps, {steps['electra']} ELECTRA steps "
          f"(batch {BATCH} x {BLOCK} tokens)", flush=True)

    results = {"flops_per_token": fpt, "steps": steps, "budget_flops": budget, "pretrain": {}, "sst2": {}}
    encoders = {}
    for name, tree in (("mlm", mlm), ("electra", electra)):
        run_dir = work / name
        if not (run_dir / "final" / "config.json").exists():
            lmforge("pretrain", str(write(tree, work / f"{name}.yaml")), "--force")
        summary = json.loads((run_dir / "results.json").read_text())
        results["pretrain"][name] = {"seconds": summary["seconds"], "validation": summary["validation"]}
        encoders[name] = str(run_dir)
    if not args.no_random_baseline:
        encoders["random init"] = str(random_init_folder(work, tokenizer))

    for name, path in encoders.items():
        accs = []
        for seed in range(args.seeds):
            tag = f"sst2-{name.replace(' ', '-')}-{seed}"
            if not (work / tag / "results.json").exists():
                lmforge("finetune", str(write(finetune_tree(tag, path, seed, work), work / f"{tag}.yaml")), "--force")
            scores = json.loads((work / tag / "results.json").read_text())
            accs.append(_accuracy(scores))
        results["sst2"][name] = accs
        print(f"{name}: SST-2 dev accuracy {accs}", flush=True)

    print()
    print("| encoder | pretraining steps | training PFLOP | pretraining time | SST-2 dev accuracy (mean ± sd, "
          f"{args.seeds} seeds) |")
    print("|---|---:|---:|---:|---:|")
    for name, accs in results["sst2"].items():
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        if name in steps:
            pf = fpt[name] * steps[name] * BATCH * BLOCK / 1e15
            cols = f"{steps[name]} | {pf:.3f} | {results['pretrain'][name]['seconds']:.0f} s"
        else:
            cols = "0 | 0 | -"
        print(f"| {name} | {cols} | {statistics.mean(accs):.4f} ± {sd:.4f} |")
    (work / "electra_vs_mlm.json").write_text(json.dumps(results, indent=2))


def _accuracy(scores: dict) -> float:
    for key in ("validation", "best", "final"):
        block = scores.get(key)
        if isinstance(block, dict) and "accuracy" in block:
            return float(block["accuracy"])
    raise KeyError(f"no accuracy in {scores}")


if __name__ == "__main__":
    main()
