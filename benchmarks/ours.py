"""lmforge's side of the benchmarks: run a recipe tree, read back its training and validation records."""

from __future__ import annotations

import peers

from lmforge.engine.logging import read_metrics
from lmforge.pretrain import pretrain
from lmforge.recipe import recipe_from_dict


def train_and_read(tree: dict) -> tuple[list[dict], dict, float]:
    """(training records, final validation record, peak RSS in MB) of one pretraining run."""
    peers.reset_peak_rss()
    run_dir = pretrain(recipe_from_dict(tree), force=True, show_progress=False)
    records = read_metrics(run_dir)
    train = [r for r in records if "split" not in r]
    val = [r for r in records if r.get("split") == "validation"][-1]
    return train, val, peers.peak_rss_mb()
