"""FGM and PGD adversarial training: the perturbation's size and direction, the embeddings restored bit for bit after every
step, a tiny classifier that still learns with it, its cost logged, and the strategies it cannot run with."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
from pathlib import Path

import pytest
import torch

from lmforge.engine.adversarial import FGM, PGD
from lmforge.errors import LmforgeError
from lmforge.finetune import finetune

from test_ddp import TORCHRUN, _run
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


class TinyWithBias(Tiny):
    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(2))


def test_pgd_steps_project_onto_the_epsilon_ball_keep_the_last_gradient_and_restore():
    """Hand-computed: clean gradient e_x on row 1; the first pass's gradient e_y, the second's 2 e_z. Move 1:
    0.6 e_x (inside the 0.8 ball); move 2: 0.6 e_x + 0.6 e_y, norm 0.849 > 0.8, projected to 0.4*sqrt(2) (e_x + e_y).
    The gradient left for the optimizer: the clean one plus the last pass's (the first pass's only steered)."""
    model = TinyWithBias()
    before = model.emb.weight.detach().clone()
    clean = torch.zeros(5, 3)
    clean[1, 0] = 1.0
    model.emb.weight.grad = clean.clone()
    model.bias.grad = torch.tensor([1.0, 1.0])
    seen = []

    def forward_backward():
        seen.append(model.emb.weight.detach() - before)
        k = len(seen)
        g = torch.zeros(5, 3)
        g[1, k] = float(k)  # pass 1: e_y, pass 2: 2 e_z
        model.emb.weight.grad = g if model.emb.weight.grad is None else model.emb.weight.grad + g
        model.bias.grad = torch.tensor([10.0 * k, 0.0]) if model.bias.grad is None else model.bias.grad + 10.0 * k

    assert PGD(epsilon=0.8, alpha=0.6, steps=2).attack(model, forward_backward)
    assert len(seen) == 2
    assert torch.allclose(seen[0][1], torch.tensor([0.6, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(seen[1][1], torch.tensor([0.4 * 2 ** 0.5, 0.4 * 2 ** 0.5, 0.0]), atol=1e-6)
    assert seen[1].norm().item() == pytest.approx(0.8, rel=1e-6)
    assert seen[1][[0, 2, 3, 4]].abs().sum() == 0
    assert torch.equal(model.emb.weight, before)  # restored bit for bit
    expected = clean.clone()
    expected[1, 2] = 2.0
    assert torch.equal(model.emb.weight.grad, expected)
    assert torch.equal(model.bias.grad, torch.tensor([21.0, 1.0]))  # clean 1 + the last pass's 20


def test_pgd_with_a_constant_gradient_stops_at_epsilon():
    torch.manual_seed(0)
    model = Tiny()
    before = model.emb.weight.detach().clone()
    c = torch.tensor([1.0, -2.0, 2.0])
    norms = []

    def forward_backward():
        norms.append((model.emb.weight.detach() - before).norm().item())
        (model.emb(torch.tensor([1, 3])) * c).sum().backward()

    forward_backward()  # the clean pass
    norms.clear()
    PGD(epsilon=1.0, alpha=0.6, steps=3).attack(model, forward_backward)
    assert norms == pytest.approx([0.6, 1.0, 1.0], rel=1e-6)  # 0.6, 1.2 → 1.0, 1.6 → 1.0
    assert torch.equal(model.emb.weight, before)
    assert torch.allclose(model.emb.weight.grad[1], 2 * c)  # clean + last pass, the inner one dropped


def test_pgd_without_a_gradient_moves_nothing():
    model = Tiny()
    calls = []
    assert not PGD(1.0, 0.3, 3).attack(model, lambda: calls.append(1))
    assert not calls


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
    # about one more forward and backward per step (a wall-clock share: the median, as one step can be descheduled)
    assert shares and 0.2 < statistics.median(shares) < 0.8


def test_fgm_needs_trainable_embeddings(tmp_path, base_dir):  # noqa: F811
    train, dev = sentiment(tmp_path, n_train=64, n_dev=16)
    r = recipe(base_dir, tmp_path / "run", data={"train": {"path": str(train)}, "text_column": "sentence"},
               strategy={"freeze_embeddings": True}, adversarial="fgm")
    with pytest.raises(LmforgeError, match="train.adversarial: fgm perturbs the word embeddings"):
        finetune(r, show_progress=False)
    assert not (tmp_path / "run").exists()


def test_pgd_training_learns_restores_and_logs_a_larger_cost(tmp_path, base_dir, monkeypatch):  # noqa: F811
    train, dev = sentiment(tmp_path, n_train=320, n_dev=100)
    attacks = []
    attack = PGD.attack

    def spying(self, model, forward_backward):
        weight = FGM.embedding_weight(model)
        saved = weight.detach().clone()
        passes = []

        def counted():
            passes.append(float((weight.detach() - saved).norm()))
            forward_backward()

        moved = attack(self, model, counted)
        attacks.append((moved, passes, torch.equal(weight, saved)))
        return moved

    monkeypatch.setattr(PGD, "attack", spying)
    r = recipe(base_dir, tmp_path / "run", data={"train": {"path": str(train)}, "validation": {"path": str(dev)},
                                                 "text_column": "sentence"},
               epochs=2, adversarial="pgd", adversarial_epsilon=0.05, adversarial_alpha=0.02, adversarial_steps=3,
               threads=1)
    run = finetune(r, show_progress=False)
    steps = json.loads((run / "results.json").read_text())["steps"]
    assert len(attacks) == steps
    assert all(moved and len(p) == 3 and max(p) <= 0.05 + 1e-5 and restored for moved, p, restored in attacks)
    assert run.metrics["validation"]["accuracy"] > 0.9
    shares = [json.loads(line)["adversarial_share"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "adversarial_share" in line]
    # about three more forwards and backwards per step (the median, as for FGM)
    assert shares and 0.5 < statistics.median(shares) < 0.9
    assert "PGD adversarial training (epsilon 0.05, alpha 0.02, 3 steps)" in (run / "README.md").read_text()


def test_with_gradient_accumulation_each_attack_follows_its_own_micro_batch(tmp_path, base_dir, monkeypatch):  # noqa: F811
    """The direction of an attack is the gradient of its micro-batch alone: only the rows of the tokens that
    micro-batch holds have one, not those of the step's earlier micro-batches."""
    from lmforge.engine.loop import Engine
    train, dev = sentiment(tmp_path, n_train=64, n_dev=16)
    strays = []
    adversarial_pass = Engine._adversarial_pass

    def spying(self, batch, scale):
        grad = FGM.embedding_weight(self.model).grad
        rows = set(torch.nonzero(grad.abs().sum(1)).flatten().tolist())
        strays.append(rows - set(batch["input_ids"].flatten().tolist()))
        return adversarial_pass(self, batch, scale)

    monkeypatch.setattr(Engine, "_adversarial_pass", spying)
    r = recipe(base_dir, tmp_path / "run", data={"train": {"path": str(train)}, "text_column": "sentence"},
               epochs=1, batch_size=4, grad_accum=2, adversarial="fgm", threads=1)
    finetune(r, show_progress=False)
    assert len(strays) >= 8 and not any(strays)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
@pytest.mark.parametrize("set_aside", [False, True])
def test_under_ddp_the_set_aside_gradient_is_averaged_like_the_rest(tmp_path, set_aside):
    """Every process ends with the same embedding gradient, the one DDP gives without the set-aside."""
    out = tmp_path / "ddp" / "g"
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(Path(__file__).parent / "ddp_set_aside.py"),
           str(out), "set-aside" if set_aside else "plain"]
    result = _run(cmd, {**os.environ, "OMP_NUM_THREADS": "1"}, out.parent, timeout=60.0)
    assert result.returncode == 0, result.stderr[-2000:]
    grads = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0][[0, 1, 2, 3]].abs().sum() > 0  # the first micro-batch's rows, from both processes, averaged


def test_fsdp_with_gradient_accumulation_is_refused(tmp_path, base_dir):  # noqa: F811
    train, _ = sentiment(tmp_path, n_train=64, n_dev=16)
    r = recipe(base_dir, tmp_path / "run", data={"train": {"path": str(train)}, "text_column": "sentence"},
               grad_accum=2, adversarial="fgm")
    r.dist.strategy = "fsdp"
    with pytest.raises(LmforgeError, match="with dist.strategy fsdp needs train.grad_accum 1"):
        finetune(r, show_progress=False)
    assert not (tmp_path / "run").exists()
