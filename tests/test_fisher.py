"""Fisher-weighted averaging: the weights, the identities, and where the Fisher of a language model is large."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lmforge.errors import LmforgeError
from lmforge.experts.fisher import diagonal_fisher, domain_blocks, fisher_average
from lmforge.experts.moe import merge_experts


def tiny_gpt2(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2)).eval()


def test_each_weight_comes_from_the_expert_with_the_larger_fisher():
    a = {"w": torch.tensor([1.0, 1.0, 1.0]), "step": torch.tensor(7)}
    b = {"w": torch.tensor([3.0, 3.0, 3.0]), "step": torch.tensor(9)}
    fa = {"w": torch.tensor([1.0, 0.0, 1.0])}
    fb = {"w": torch.tensor([0.0, 1.0, 3.0])}
    out = fisher_average([a, b], [fa, fb])
    torch.testing.assert_close(out["w"], torch.tensor([1.0, 3.0, 2.5]), atol=1e-6, rtol=0)
    assert int(out["step"]) == 7                      # integer buffers: the first expert's
    # No Fisher anywhere on a weight: the uniform average.
    zero = {"w": torch.zeros(3)}
    torch.testing.assert_close(fisher_average([a, b], [zero, zero | {"w": torch.tensor([0.0, 0.0, 1.0])}])["w"][:2],
                               torch.tensor([2.0, 2.0]))


def test_fisher_average_of_identical_experts_is_the_identity():
    a, b = tiny_gpt2(0), tiny_gpt2(0)
    blocks = np.random.default_rng(0).integers(0, 50, (4, 12))
    fishers = [diagonal_fisher(a, blocks), diagonal_fisher(b, blocks[::-1].copy())]
    merged = fisher_average([a.state_dict(), b.state_dict()], fishers)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(merged[key], value, msg=key)


def test_the_fisher_of_an_embedding_row_follows_its_token():
    model = tiny_gpt2(1)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.transformer.wte.weight.detach().clone())
    blocks = np.random.default_rng(1).integers(0, 25, (6, 16))   # text of tokens 0..24 only
    fisher = diagonal_fisher(model, blocks)
    wte = fisher["transformer.wte.weight"].sum(1)
    assert (wte[:25] > 0).all() and (wte[25:] == 0).all()         # input rows of tokens never read: no Fisher
    assert all((f >= 0).all() for f in fisher.values())
    assert set(fisher) >= {k for k, v in model.state_dict().items() if torch.is_floating_point(v)} - {
        k for k in model.state_dict() if k.endswith("attn.bias") or k.endswith("masked_bias")}
    assert not any(p.grad is not None for p in model.parameters())  # no gradients left behind


def test_tied_weights_share_one_fisher():
    model = tiny_gpt2(2)
    fisher = diagonal_fisher(model, np.random.default_rng(2).integers(0, 50, (2, 8)))
    assert fisher["lm_head.weight"] is fisher["transformer.wte.weight"]


def test_moe_shared_parameters_take_the_fisher_weighted_average():
    a, b = tiny_gpt2(3), tiny_gpt2(4)
    blocks = np.random.default_rng(3).integers(0, 50, (3, 10))
    fishers = [diagonal_fisher(a, blocks), diagonal_fisher(b, blocks)]
    moe = merge_experts([a, b], names=["x", "y"], fishers=fishers).state_dict()
    expected = fisher_average([a.state_dict(), b.state_dict()], fishers)
    key = "transformer.h.0.attn.c_attn.weight"
    torch.testing.assert_close(moe[key], expected[key])
    uniform = merge_experts([a, b], names=["x", "y"]).state_dict()
    assert not torch.allclose(moe[key], uniform[key])
    torch.testing.assert_close(moe["transformer.h.0.mlp.experts.1.c_fc.weight"], b.state_dict()["transformer.h.0.mlp.c_fc.weight"])


def test_domain_blocks_pick_that_domain_and_name_a_missing_one():
    class Data:
        domains = ["code", "prose"]
        train = {"domain": [0, 1, 1, 0, 1]}

        def batch(self, split, rows):
            return np.array(rows)[:, None] * np.ones((1, 4), dtype=np.int64), None
    ids = domain_blocks(Data(), "prose", 10)
    assert sorted(ids[:, 0].tolist()) == [1, 2, 4]
    assert len(domain_blocks(Data(), "prose", 2)) == 2
    with pytest.raises(LmforgeError, match="no blocks tagged 'legal'.*code, prose"):
        domain_blocks(Data(), "legal", 2)
