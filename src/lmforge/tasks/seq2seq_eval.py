"""`lmforge eval` of a seq2seq run: a split of its recipe (or another file) generated and scored again."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lmforge.errors import LmforgeError
from lmforge.tasks.config import SplitFile
from lmforge.tasks.predict import open_task_model
from lmforge.tasks.seq2seq import score_seq2seq, write_seq2seq_report
from lmforge.tasks.seq2seq_data import encode_splits, read_seq2seq_splits
from lmforge.tasks.splits import source_of


def evaluate_seq2seq_run(run_dir: Path, split: str = "validation", file: Optional[Path] = None,
                         which: Optional[str] = None) -> dict:
    """Score the run's model on `split` (or on `file` as that split); writes report-, eval- and predictions-SPLIT."""
    recipe, model, tokenizer, _ = open_task_model(run_dir, which)
    d = recipe.data
    if file is not None:
        setattr(d, split, SplitFile(path=str(file)))
    made = d.split is not None and getattr(d.split, split, 0) > 0
    if getattr(d, split, None) is None and not made:
        raise LmforgeError(f"{run_dir}: the recipe has no {split} file; pass --file")
    for name in ("validation", "test"):  # read only what is scored (and train, when the split is a share of it)
        if name != split:
            setattr(d, name, None)
    splits = {split: read_seq2seq_splits(recipe)[split]}
    encoded = encode_splits(recipe, tokenizer, splits)
    scored = score_seq2seq(model, tokenizer, splits[split], encoded[split], recipe)
    title = f"{recipe.name}: {split} ({source_of(d, split)})"
    return write_seq2seq_report(Path(run_dir), split, title, splits[split], scored)
