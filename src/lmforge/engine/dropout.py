"""Dropout whose mask costs a fraction of torch's on CPU.

On CPU, `torch.bernoulli_` (behind `nn.Dropout` and SDPA's attention dropout) costs about 15 ns per element
and SDPA with dropout leaves its fused kernel for an unfused one. In a small BERT at block 128 the
attention-probability mask alone has 4x as many elements as the hidden states, so dropout can take a large
part of a training step. Here one 64-bit draw from torch's generator gives four 15-bit uniform numbers, each
compared with a threshold (about a fifth of the cost), and the mask is kept as bytes for the backward pass.
Each element is kept with probability q = round((1 - p) * 2^15) / 2^15 (within 2^-16 of 1 - p) and scaled by
1 / q, so the expectation is exactly the input's. The draws come from torch's generator: seeded runs repeat
and resume exactly. Only training on CPU changes; evaluation, CUDA and compiled models keep torch's own.
"""

from __future__ import annotations

import torch
from torch import nn

ATTENTION = "lmforge_sdpa"
_LEVELS = 1 << 15


def keep_threshold(p: float) -> int:
    return max(1, min(_LEVELS, round((1.0 - p) * _LEVELS)))


def keep_mask(shape, p: float, device=None) -> torch.Tensor:
    """A bool tensor, each element True with probability keep_threshold(p) / 2^15, from torch's generator."""
    shape = torch.Size(shape)
    n = shape.numel()
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()  # uniform on [0, 2^63)
    fifteen = draws.view(torch.int16)[:n].bitwise_and_(_LEVELS - 1)  # four uniform 15-bit numbers per draw
    return (fifteen < keep_threshold(p)).view(shape)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float):
        keep = keep_mask(x.shape, p, x.device)
        ctx.scale = _LEVELS / keep_threshold(p)
        ctx.save_for_backward(keep)
        return x.mul(keep).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    if not training or p <= 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    return _Dropout.apply(x, p)


class FastDropout(nn.Dropout):
    """`nn.Dropout` with the cheaper mask; same `p`, same state dict (none), same behaviour in eval."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
              **kwargs):
    """transformers' SDPA attention, with the probabilities' dropout done here when training on CPU."""
    # transformers' attention internals load only when the CPU dropout path runs
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if (dropout <= 0.0 or query.device.type != "cpu" or kwargs.get("position_bias") is not None
            or kwargs.get("cache") is not None or kwargs.get("softcap") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = q_len > 1 and attention_mask is None and is_causal
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)).mul_(scale)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    elif is_causal:
        future = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).triu_(kv_len - q_len + 1)
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
    probs = fast_dropout(torch.softmax(scores, dim=-1), dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def _register() -> None:
    # transformers' attention registry, touched only when the fast dropout is switched on
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


def _attention_dropout(config) -> float:
    names = ("attention_probs_dropout_prob", "attn_pdrop", "attention_dropout")
    return max((float(getattr(config, n, 0.0) or 0.0) for n in names), default=0.0)


def use_fast_dropout(model: nn.Module) -> int:
    """Swap `model`'s `nn.Dropout` modules for `FastDropout`, and its SDPA attention for `attention` where the
    attention has dropout, in place. Returns how many modules changed; weights and saved files are unchanged."""
    changed = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout and child.p > 0:
                setattr(parent, name, FastDropout(child.p, child.inplace))
                changed += 1
        config = getattr(parent, "config", None)
        if (config is not None and getattr(config, "_attn_implementation", None) == "sdpa"
                and _attention_dropout(config) > 0):
            _register()
            config._attn_implementation = ATTENTION
            changed += 1
    return changed

