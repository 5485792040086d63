"""Open a finished (or running) run folder: its recipe, model and tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lmforge.engine import checkpoint as ckpt
from lmforge.errors import LmforgeError
from lmforge.models import load_model
from lmforge.recipe import Recipe, load_recipe
from lmforge.tokenizer import load_tokenizer


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
    import json
    archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
    return "mlm" if any("MaskedLM" in a for a in archs) else "clm"
