"""A lean forward pass for GPT-2 causal LMs, with the same modules, weights and results as transformers'.

transformers' `GPT2LMHeadModel.forward` spends about 2 ms of Python per call on a 4-layer model (mask
building, output capturing, config look-ups, module wrappers): 10-15 % of the forward pass of a small model
on a CPU, the size a laptop trains. `causal_logits` runs the same computation straight through the model's
own submodules (embeddings, layer norms, `Conv1D` projections, SDPA with the causal flag, the activation and
dropout modules, the tied head), in the same order, so logits, gradients and the dropout draws are identical
to `model(input_ids=...).logits` (tested to the bit). It takes this path only when nothing can differ:
a plain `GPT2LMHeadModel` with SDPA attention, no attention dropout
in effect, no position ids, attention mask or cache, no gradient checkpointing, no hooks on the bypassed
modules and no compiled block. Everything else goes through transformers as before, and
`LMFORGE_LEAN_FORWARD=0` sends every model there.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.nn.modules import module as nn_module
from transformers import GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from lmforge.engine.dropout import ATTENTION

LEAN_FORWARD_ENV = "LMFORGE_LEAN_FORWARD"


def _has_hooks(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_compiled_call_impl", None) is not None)


def _global_hooks() -> bool:
    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
                or nn_module._global_backward_hooks)


def lean_applies(model: torch.nn.Module, **kwargs) -> bool:
    """Whether `causal_logits(model, ids, **kwargs)` takes the lean path for this model and these arguments."""
    if (type(model) is not GPT2LMHeadModel or os.environ.get(LEAN_FORWARD_ENV) == "0") or any(v is not None for k, v in kwargs.items() if k != "use_cache"):
        return False
    config, body = model.config, model.transformer
    attention_dropout = config.attn_pdrop if model.training else 0.0
    if (config._attn_implementation not in ("sdpa", ATTENTION) or attention_dropout > 0
            or config.reorder_and_upcast_attn or config.add_cross_attention
            or any(getattr(m, "gradient_checkpointing", False) for m in (body, *body.h)) or _global_hooks()):
        return False
    modules = [model, body, *body.h]
    modules += [m for block in body.h for m in (block.attn, block.mlp)]
    projections = [m for block in body.h for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc,
                                                   block.mlp.c_proj)]
    # int8 projections (lmforge compress) are not Conv1D: they run through transformers' forward
    return not any(_has_hooks(m) for m in modules) and all(isinstance(m, Conv1D) for m in projections)


def _project(conv, x: torch.Tensor) -> torch.Tensor:
    """transformers' `Conv1D`: x @ weight + bias, with the weight stored (in, out)."""
    return conv(x) if _has_hooks(conv) else torch.addmm(conv.bias, x.view(-1, x.size(-1)), conv.weight).view(
        *x.shape[:-1], conv.nf)


def _gpt2_logits(model: GPT2LMHeadModel, input_ids: torch.Tensor) -> torch.Tensor:
    body = model.transformer
    b, t = input_ids.shape
    positions = torch.arange(t, device=input_ids.device).unsqueeze(0)
    hidden = body.drop(body.wte(input_ids) + body.wpe(positions))
    for block in body.h:
        attn = block.attn
        q, k, v = _project(attn.c_attn, block.ln_1(hidden)).split(attn.split_size, dim=2)
        q, k, v = (x.view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling)
        out = attn.resid_dropout(_project(attn.c_proj, out.transpose(1, 2).reshape(b, t, attn.num_heads * attn.head_dim)))
        hidden = out + hidden
        mlp = block.mlp
        hidden = hidden + mlp.dropout(_project(mlp.c_proj, mlp.act(_project(mlp.c_fc, block.ln_2(hidden)))))
    return model.lm_head(body.ln_f(hidden))


def causal_logits(model: torch.nn.Module, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """`model(input_ids=input_ids, **kwargs).logits`, by the lean path when `lean_applies`."""
    if lean_applies(model, **kwargs):
        return _gpt2_logits(model, input_ids)
    return model(input_ids=input_ids, **kwargs).logits
