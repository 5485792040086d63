"""Writing an ONNX graph of a GPT-2-family causal LM with a KV cache, so that generation runs on ONNX Runtime.

The graph is one decoding step, `CachedStep`: it takes `input_ids`, `attention_mask` (every column the step
sees: the cache's and its own), `position_ids` and the cache as flat tensors `past_key_values.N.key` /
`past_key_values.N.value` ([batch, heads, past, head_dim]); it returns `logits` for the step's tokens and
`present.N.key` / `present.N.value`, the cache with the step's columns appended. Batch, sequence and past
length are dynamic axes: one graph prefills a prompt (an empty cache, past length 0) and decodes token by token.

`CachedStep` runs the model's own submodules (embeddings, layer norms, `Conv1D` projections, the activation,
the tied head) in transformers' order with its eager attention, but builds the attention mask itself from the
`attention_mask` input — causal over the columns plus padding — with tensor operations only. Tracing
transformers' own forward with cache tensors as inputs does not give a graph that holds at other cache lengths:
its mask is built from shapes the tracer records as constants (measured with transformers 5.23: logits 0.15
apart with an empty cache when traced with a cache of 3).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from transformers import GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from lmforge.errors import LmforgeError
from lmforge.export.onnx import OPSET, ExportRule, fuse, load_for_export, quantize_int8
from lmforge.models.onnx import ONNX_FILE, cache_heads, cache_names, open_session

DECODER_INPUTS = ("input_ids", "attention_mask", "position_ids")


class CachedStep(torch.nn.Module):
    """One decoding step of a `GPT2LMHeadModel` over flat cache tensors (see the module's text)."""

    def __init__(self, model: GPT2LMHeadModel):
        super().__init__()
        self.model = model
        self.layers = model.config.n_layer

    def forward(self, input_ids, attention_mask, position_ids, *past):
        body = self.model.transformer
        hidden = body.wte(input_ids) + body.wpe(position_ids)
        batch = input_ids.shape[0]
        # causal over columns (the cache's, then the step's), and no padded column: an additive mask as eager
        # attention takes it
        columns = torch.ones_like(attention_mask).cumsum(-1)           # [batch, total]: 1 .. total
        rows = columns[:, past[0].shape[2]:]                           # [batch, step]: the step's own columns
        allowed = (columns[:, None, None, :] <= rows[:, None, :, None]) & (attention_mask[:, None, None, :] > 0)
        bias = (~allowed).to(hidden.dtype) * torch.finfo(hidden.dtype).min
        presents = []
        for i, block in enumerate(body.h):
            attn = block.attn
            q, k, v = attn.c_attn(block.ln_1(hidden)).split(attn.split_size, dim=2)
            # a pruned layer keeps fewer heads (lmforge compress): each layer's own count
            q, k, v = (x.reshape(batch, -1, attn.num_heads, attn.head_dim).transpose(1, 2) for x in (q, k, v))
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            weights = torch.matmul(q, k.transpose(-1, -2)) * attn.scaling + bias
            out = torch.matmul(weights.softmax(-1), v).transpose(1, 2)
            out = attn.c_proj(out.reshape(batch, -1, attn.num_heads * attn.head_dim))
            hidden = out + hidden
            mlp = block.mlp
            hidden = hidden + mlp.c_proj(mlp.act(mlp.c_fc(block.ln_2(hidden))))
        return (self.model.lm_head(body.ln_f(hidden)), *presents)


def check_decoder(model) -> None:
    """What `CachedStep` reproduces: a plain GPT-2 with Conv1D projections and no cross-attention."""
    config = model.config
    odd = [name for name, on in (("reorder_and_upcast_attn", config.reorder_and_upcast_attn),
                                 ("add_cross_attention", config.add_cross_attention)) if on]
    if type(model) is not GPT2LMHeadModel or odd:
        with_ = f" with {', '.join(odd)}" if odd else ""
        raise LmforgeError(f"no ONNX export rule for {type(model).__name__}{with_}; lmforge exports GPT-2 causal LMs "
                           "with a KV cache")
    for block in model.transformer.h:
        if not all(isinstance(m, Conv1D) for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc,
                                                  block.mlp.c_proj)):
            raise LmforgeError("the model's projections are not plain Conv1D (int8 or pruned PyTorch weights); "
                               "export the model before that compress step")


def step_inputs(config, batch: int, step: int, past: int, seed: int = 0) -> dict:
    """Inputs of one step: random ids, the first row left-padded by two columns, positions counted from each
    row's first real column, and a random cache of `past` columns."""
    generator = torch.Generator().manual_seed(seed)
    total = past + step
    mask = torch.ones(batch, total, dtype=torch.long)
    mask[0, :min(2, total - 1)] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    feeds = {"input_ids": torch.randint(0, config.vocab_size, (batch, step), generator=generator),
             "attention_mask": mask, "position_ids": positions}
    head_dim = config.n_embd // config.n_head
    heads = [h for h in cache_heads(config) for _ in ("key", "value")]
    for name, count in zip(cache_names(config.n_layer)[0], heads):
        feeds[name] = torch.randn(batch, count, past, head_dim, generator=generator)
    return feeds


def trace_decoder(step: CachedStep, path: Path) -> None:
    config = step.model.config
    sample = step_inputs(config, batch=2, step=3, past=4)
    past_names, present_names = cache_names(config.n_layer)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "position_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "past_sequence + sequence"}, "logits": {0: "batch", 1: "sequence"}}
    axes |= {name: {0: "batch", 2: "past_sequence"} for name in past_names}
    axes |= {name: {0: "batch", 2: "past_sequence + sequence"} for name in present_names}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shapes: the graph is checked at other shapes below
        torch.onnx.export(step, tuple(sample.values()), str(path), input_names=list(sample),
                          output_names=["logits", *present_names], dynamic_axes=axes, opset_version=OPSET,
                          dynamo=False)


def decoder_gap(step: CachedStep, path: Path, shapes=((1, 5, 0), (2, 1, 7), (3, 4, 2))) -> float:
    """Largest |ONNX Runtime − PyTorch| over logits and presents at (batch, step, past) shapes other than the
    traced one, an empty cache among them (the padded columns of the first row's logits excluded)."""
    session, worst = open_session(path), 0.0
    for k, (batch, length, past) in enumerate(shapes):
        feeds = step_inputs(step.model.config, batch, length, past, seed=k + 1)
        with torch.no_grad():
            want = [t.numpy() for t in step(*feeds.values())]
        got = session.run(None, {name: t.numpy() for name, t in feeds.items()})
        real = feeds["attention_mask"][:, past:].numpy().astype(bool)
        worst = max(worst, float(np.abs(got[0] - want[0])[real].max()),
                    *(float(np.abs(g - w).max()) if g.size else 0.0 for g, w in zip(got[1:], want[1:])))
    return worst


def write_decoder_graph(folder: Path, work: Path, rule: ExportRule, quantize: Optional[str]) -> dict:
    """model.onnx in `work` for a causal LM: traced, fused, then int8 if asked; returns the card's facts."""
    model = load_for_export(folder, rule)
    check_decoder(model)
    step = CachedStep(model).eval()
    raw, fused_path = work / "traced.onnx", work / "fused.onnx"
    trace_decoder(step, raw)
    fused = fuse(raw, fused_path, rule, model.config)
    raw.unlink()
    facts = {"fp32_max_abs_logit_diff": decoder_gap(step, fused_path)}
    if quantize == "int8":
        quantize_int8(fused_path, work / ONNX_FILE)
        fused_path.unlink()
        facts["int8_max_abs_logit_diff"] = decoder_gap(step, work / ONNX_FILE)
    else:
        fused_path.rename(work / ONNX_FILE)
    past, present = cache_names(model.config.n_layer)
    facts.update(fused=fused, task=rule.task, fusion=rule.fusion, inputs=[*DECODER_INPUTS, *past],
                 outputs=["logits", *present], kv_cache=True)
    return facts
