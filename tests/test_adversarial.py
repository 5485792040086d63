"""FGM adversarial training: the perturbation's size and direction, the embeddings restored bit for bit after every
step, a tiny classifier that still learns with it, its cost logged, and the strategies it cannot run with."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from lmforge.engine.adversarial import FGM
from lmforge.errors import LmforgeError
from lmforge.finetune import finetune

from test_finetune import base_dir, recipe, sentiment  # noqa: F401  (the tiny BERT fixture)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(5, 3)

    def get_input_embeddings(self):
        return self.emb


def test_fgm_moves_the_embeddings_by_epsilon_along_the_gradient_and_restores_them():
    torch.manual_seed(0)
    model = Tiny()
    before = model.emb.weight.detach().clone()
    model.emb(torch.tensor([1, 3])).pow(2).sum().backward()
    grad = model.emb.weight.grad.clone()
    with FGM(0.5).perturbed(model) as moved:
        assert moved
        delta = model.emb.weight.detach() - before
        assert delta.norm().item() == pytest.approx(0.5, rel=1e-5)
        assert torch.allclose(delta, 0.5 * grad / grad.norm(), atol=1e-6)
        assert delta[[0, 2, 4]].abs().sum() == 0  # rows the batch did not use have no gradient, so do not move
    assert torch.equal(model.emb.weight, before)


def test_fgm_without_a_gradient_moves_nothing():
    model = Tiny()
    before = model.emb.weight.detach().clone()
    with FGM(1.0).perturbed(model) as moved:
        assert not moved and torch.equal(model.emb.weight, before)


def test_fgm_training_restores_the_embeddings_after_each_step_and_logs_its_cost(tmp_path, base_dir, monkeypatch):  # noqa: F811
    train, dev = sentiment(tmp_path, n_train=320, n_dev=100)
    checks = []
    perturbed = FGM.perturbed

    @contextlib.contextmanager
    def spying(self, model):
        weight = FGM.embedding_weight(model)
        saved = weight.detach().clone()
        with perturbed(self, model) as moved:
            checks.append(moved and not torch.equal(weight, saved))
            yield moved
        checks[-1] = checks[-1] and torch.equal(weight, saved)  # moved inside, bit-identical after

    monkeypatch.setattr(FGM, "perturbed", spying)
    r = recipe(base_dir, tmp_path / "run", data={"train": {"path": str(train)}, "validation": {"path": str(dev)},
                                                 "text_column": "sentence"},
               epochs=2, adversarial="fgm", adversarial_epsilon=0.1, threads=1)
    run = finetune(r, show_progress=False)
    steps = json.loads((run / "results.json").read_text())["steps"]
    assert len(checks) == steps and all(checks)
    assert run.metrics["validation"]["accuracy"] > 0.9
    shares = [json.loads(line)["adversarial_share"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "adversarial_share" in line]
    assert shares and all(0.2 < s < 0.8 for s in shares)  # about one more forward and backward per step


def test_fgm_needs_trainable_embeddings(tmp_path, base_dir):  # noqa: F811
    train, dev = sentiment(tmp_path, n_train=64, n_dev=16)
    r = recipe(base_dir, tmp_path / "run", data={"train": {"path": str(train)}, "text_column": "sentence"},
               strategy={"freeze_embeddings": True}, adversarial="fgm")
    with pytest.raises(LmforgeError, match="train.adversarial: fgm perturbs the word embeddings"):
        finetune(r, show_progress=False)
    assert not (tmp_path / "run").exists()
