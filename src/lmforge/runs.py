"""Run folders: prepare one for a stage to write, describe a finished run (`RunResult`), and open any run's
model — a pretraining or fine-tuning run, a plain HF folder, or an experts run (its ensemble, MoE, DEMix,
average, dense or seed model)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import yaml

from lmforge.engine import checkpoint as ckpt
from lmforge.engine import distributed as dist
from lmforge.engine.logging import console
from lmforge.errors import LmforgeError
from lmforge.models import load_model
from lmforge.models.ensemble import EnsembleForCausalLM, ExpertEnsemble
from lmforge.models.routers import ensemble_router
from lmforge.recipe import Recipe, load_recipe
from lmforge.tokenizer import load_tokenizer

MANIFEST = "experts.json"


RUN_ARTEFACTS = {"recipe.yaml", "metrics.jsonl", "tensorboard", "tokenizer", "best", "checkpoints", "final",
                 "loss.png", "summary.md", "results.json", "eval-validation.json", "eval-train.json",
                 ".tokenizer.tmp", ".recipe.yaml.tmp", "adapter", "README.md", "eval-test.json",
                 *(f"report-{s}.{ext}" for s in ("train", "validation", "test") for ext in ("txt", "png"))}


# What a changed field does to a resumed run (the optimizer state and the step counter come from the checkpoint).
RESUME_EFFECTS = {
    "train.max_steps": "the schedule is recomputed: warmup and decay now end at the new last step",
    "train.epochs": "the number of steps changes, and with it the schedule's end",
    "train.lr": "the learning rate jumps to the new schedule at the checkpoint's step",
    "train.min_lr": "the decay now ends at the new value",
    "train.warmup_steps": "the schedule is recomputed from the checkpoint's step",
    "train.schedule": "the schedule's shape changes from the checkpoint's step on",
    "train.batch_size": "later steps read other samples than an uninterrupted run would",
    "train.grad_accum": "later steps read other samples than an uninterrupted run would",
    "train.seed": "later batches (and masks) differ from an uninterrupted run's",
}


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def recipe_changes(saved: dict, current: dict) -> list[str]:
    """Lines naming each field whose value differs between a run's saved recipe and the one it resumes with,
    and what that does to the run."""
    before, after = _flatten(saved), _flatten(current)
    lines = []
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            effect = RESUME_EFFECTS.get(key)
            lines.append(f"{key}: {before.get(key)!r} -> {after.get(key)!r}" + (f" ({effect})" if effect else ""))
    return lines


def prepare_run_dir(recipe: Recipe, resume: bool, force: bool) -> Path:
    run_dir = Path(recipe.output.dir)
    if dist.is_main() and run_dir.is_dir() and not resume:
        entries = {p.name for p in run_dir.iterdir()}
        trained = entries & {"checkpoints", "final"}
        if (trained or entries - RUN_ARTEFACTS) and not force:
            what = "holds a trained run" if trained else "holds files lmforge did not write"
            raise LmforgeError(f"{run_dir}: the run folder {what}; pass --resume to continue it "
                               "or --force to start over")
        if trained or force:
            shutil.rmtree(run_dir)
        else:  # leftovers of a run that failed before its first checkpoint
            for name in entries:
                shutil.rmtree(run_dir / name) if (run_dir / name).is_dir() else (run_dir / name).unlink()
    if dist.is_main() and resume and (run_dir / "recipe.yaml").is_file():
        changes = recipe_changes(yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {},
                                 recipe.model_dump(mode="json"))
        if changes:
            console.print("[yellow]resuming with a changed recipe:[/]\n" + "\n".join(f"  {line}" for line in changes))
    if dist.is_main():
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise LmforgeError(f"{run_dir}: cannot write the run folder ({err.strerror})") from None
        tmp = run_dir / ".recipe.yaml.tmp"
        tmp.write_text(recipe.to_yaml())
        os.replace(tmp, run_dir / "recipe.yaml")
    dist.barrier()
    return run_dir




@contextlib.contextmanager
def start_run(recipe, resume: bool, force: bool):
    """`prepare_run_dir`, then the run's set-up in the `with` block: an error there removes what this run wrote,
    so a run that fails before it starts leaves nothing behind (a resumed run keeps its folder)."""
    existed = Path(recipe.output.dir).exists()
    run_dir = prepare_run_dir(recipe, resume, force)
    try:
        yield run_dir
    except BaseException:
        if not resume and dist.is_main():
            if existed:  # the folder was the user's: empty it again, keep it
                for entry in run_dir.iterdir():
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            else:
                shutil.rmtree(run_dir, ignore_errors=True)
        raise


def model_folder(run_dir: Path, which: Optional[str] = None) -> Path:
    """'final', 'best', 'latest' or an explicit folder; by default the first of final/best/latest that exists."""
    run_dir = Path(run_dir)
    if which and Path(which).is_dir():
        return Path(which)
    candidates = [which] if which else ["final", "best", "latest"]
    for name in candidates:
        folder = ckpt.latest_checkpoint(run_dir / "checkpoints") if name == "latest" else run_dir / name
        if folder is not None and (Path(folder) / "config.json").is_file():
            return Path(folder)
    if (run_dir / "config.json").is_file():  # a plain HF folder
        return run_dir
    raise LmforgeError(f"{run_dir}: no model found (looked for {', '.join(candidates)})")


def open_run(run_dir: Path, which: Optional[str] = None) -> tuple[Optional[Recipe], object, object]:
    """(recipe or None for a plain HF folder, model, tokenizer)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise LmforgeError(f"{run_dir}: no such run folder")
    recipe = load_recipe(run_dir / "recipe.yaml") if (run_dir / "recipe.yaml").is_file() else None
    folder = model_folder(run_dir, which)
    objective = recipe.objective.name if recipe else _objective_of(folder)
    return recipe, load_model(folder, objective), load_tokenizer(folder)


def _objective_of(folder: Path) -> str:
    archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
    return "mlm" if any("MaskedLM" in a for a in archs) else "clm"


def manifest(run: Path) -> dict:
    path = Path(run) / MANIFEST
    if not path.is_file():
        raise LmforgeError(f"{run}: not an experts run (no {MANIFEST}); run `lmforge experts branch` first")
    return json.loads(path.read_text())


def load_ensemble(folder: Path) -> ExpertEnsemble:
    """An ensemble folder (ensemble/ensemble.json) back as an ExpertEnsemble; routed by the distance to the
    routing rule its run names (`experts.routing`; see `lmforge.models.routers`)."""
    folder = Path(folder)
    spec = json.loads((folder / "ensemble.json").read_text())
    experts = [load_model((folder / p).resolve(), "clm").eval() for p in spec["experts"]]
    return ExpertEnsemble(experts, spec["domains"], torch.tensor(spec["prior"]), spec.get("top_k"),
                          router=ensemble_router(folder, spec, spec["domains"]))


GENERATORS = ("ensemble", "moe", "demix", "average", "dense", "seed")  # an experts run's models, default order


def open_experts_model(folder: Path, which: Optional[str] = None):
    """(model, tokenizer) for generation and serving from an experts run (`which`: one of GENERATORS; default the
    first that exists) or from its ensemble/ folder; the ensemble comes as an EnsembleForCausalLM."""
    folder = Path(folder)
    if (folder / "ensemble.json").is_file():
        spec = json.loads((folder / "ensemble.json").read_text())
        tokenizer = load_tokenizer((folder / spec["experts"][0]).resolve())
        return EnsembleForCausalLM(load_ensemble(folder)).eval(), tokenizer
    info = manifest(folder)
    places = {"ensemble": folder / "ensemble" / "ensemble.json", "moe": folder / "moe" / "config.json",
              "demix": folder / "demix" / "config.json", "average": folder / "average" / "config.json",
              "dense": folder / "dense" / "final" / "config.json", "seed": folder / info["seed"] / "config.json"}
    if which is not None and which not in places:
        raise LmforgeError(f"--model: an experts run holds {', '.join(GENERATORS)}; got {which!r}")
    present = [name for name in GENERATORS if places[name].is_file()]
    if which is not None and which not in present:
        raise LmforgeError(f"{folder}: no '{which}' model in this experts run yet (it has: {', '.join(present)})")
    name = which or present[0]
    if name == "ensemble":
        return open_experts_model(folder / "ensemble")
    model_dir = places[name].parent
    return load_model(model_dir, "clm").eval(), load_tokenizer(model_dir)
