"""The CPU dropout: its mask statistics, its gradient, its attention, and models that use it."""

import copy
import math

import pytest
import torch
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lmforge.engine.dropout import ATTENTION, FastDropout, attention, fast_dropout, keep_mask, keep_threshold, \
    use_fast_dropout


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_the_mask_keeps_each_element_with_probability_one_minus_p(p):
    torch.manual_seed(0)
    n = 4_000_001  # not a multiple of four: the last draw is cut
    keep = keep_mask((n,), p)
    q = keep_threshold(p) / 2 ** 15
    assert abs(q - (1 - p)) <= 2 ** -16
    sigma = math.sqrt(q * (1 - q) / n)
    assert abs(keep.float().mean().item() - q) < 5 * sigma
    # each of the four numbers cut from one 64-bit draw is uniform, and neighbours are independent
    lanes = keep[: n - 1].view(-1, 4).float()
    for lane in lanes.T:
        assert abs(lane.mean().item() - q) < 5 * math.sqrt(q * (1 - q) / len(lane))
    both = (keep[:-1] & keep[1:]).float().mean().item()
    assert abs(both - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / n)


def test_the_mask_follows_torch_seed():
    torch.manual_seed(3)
    a = keep_mask((64, 33), 0.1)
    b = keep_mask((64, 33), 0.1)
    torch.manual_seed(3)
    assert torch.equal(a, keep_mask((64, 33), 0.1)) and not torch.equal(a, b)


def test_dropout_scales_kept_values_and_its_gradient_uses_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(300, 70, requires_grad=True)
    y = fast_dropout(x, 0.2)
    kept = y != 0
    scale = 2 ** 15 / keep_threshold(0.2)
    assert torch.allclose(y[kept], x[kept] * scale)
    assert 0.17 < 1 - kept.float().mean().item() < 0.23
    y.backward(torch.full_like(y, 2.0))
    assert torch.allclose(x.grad, kept.float() * 2 * scale)
    assert fast_dropout(x, 0.2, training=False) is x and fast_dropout(x, 0.0) is x
    layer = FastDropout(0.3).eval()
    assert layer(x) is x and layer.p == 0.3 and isinstance(layer, torch.nn.Dropout)


class _Attn(torch.nn.Module):
    def __init__(self, groups=1, causal=False):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, causal


def _reference(q, k, v, allowed, keep, p):
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, -1) * keep * (2 ** 15 / keep_threshold(p))
    return (probs @ v).transpose(1, 2)


@pytest.mark.parametrize("case", ["padding", "causal", "grouped"])
def test_attention_with_dropout_is_softmax_attention_with_that_mask(case):
    torch.manual_seed(1)
    b, h, t, d = 3, 4, 9, 8
    kv_heads = 2 if case == "grouped" else h
    q = torch.randn(b, h, t, d)
    k, v = torch.randn(b, kv_heads, t, d), torch.randn(b, kv_heads, t, d)
    module = _Attn(groups=h // kv_heads, causal=case != "padding")
    if case == "padding":
        mask = torch.ones(b, 1, t, t, dtype=torch.bool)
        mask[0, :, :, 6:] = False
        allowed = mask
    else:
        mask = None
        allowed = torch.ones(t, t, dtype=torch.bool).tril()
    torch.manual_seed(7)
    keep = keep_mask((b, h, t, t), 0.25)
    torch.manual_seed(7)
    out, _ = attention(module, q, k, v, mask, dropout=0.25)
    full_k = k.repeat_interleave(h // kv_heads, dim=1)
    full_v = v.repeat_interleave(h // kv_heads, dim=1)
    assert torch.allclose(out, _reference(q, full_k, full_v, allowed, keep, 0.25), atol=1e-5)
    # without dropout it is transformers' SDPA attention itself
    plain, _ = attention(module, q, k, v, mask, dropout=0.0)
    expected, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0)
    assert torch.equal(plain, expected)


def _bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    return BertForMaskedLM._from_config(config, attn_implementation="sdpa")


def test_a_model_with_fast_dropout_evaluates_as_before_and_saves_plain_sdpa(tmp_path):
    model = _bert()
    fast = copy.deepcopy(model)
    assert use_fast_dropout(fast) > 0
    assert fast.config._attn_implementation == ATTENTION
    assert not any(type(m) is torch.nn.Dropout for m in fast.modules())
    ids = torch.randint(5, 200, (4, 16))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    model.eval(), fast.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits,
                              fast(input_ids=ids, attention_mask=mask).logits, atol=1e-5)
    fast.save_pretrained(tmp_path)
    assert ATTENTION not in (tmp_path / "config.json").read_text()
    back = AutoModelForMaskedLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, fast(input_ids=ids).logits)


def test_training_with_fast_dropout_repeats_under_a_seed_and_drops():
    torch.manual_seed(0)
    model = GPT2LMHeadModel._from_config(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=16),
                                         attn_implementation="sdpa")
    use_fast_dropout(model)
    model.train()
    ids = torch.randint(0, 100, (2, 16))
    losses = []
    for _ in range(2):
        torch.manual_seed(5)
        losses.append(model(input_ids=ids, labels=ids).loss)
    assert torch.equal(losses[0], losses[1])
    assert not torch.equal(losses[0], model(input_ids=ids, labels=ids).loss)  # a new mask, a new loss
    losses[0].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
