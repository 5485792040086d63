"""Structured pruning: attention heads and FFN neurons ranked by how much the loss depends on them, then cut out
of the matrices (`lmforge.models.slicing`).

Importance follows Michel et al. (2019), "Are Sixteen Heads Really Better than One?": a gate ξ multiplies each
head's output (and each FFN neuron's activation); the importance of a unit is E_x |∂L(x)/∂ξ| at ξ = 1,
accumulated over a few batches of the task's training data. The gates sit on the inputs of the projections
that read the heads / neurons, so the same hooks give the masked forward the tests compare slicing against.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional, Union

import torch

from lmforge.errors import LmforgeError
from lmforge.models.slicing import keep_units, layer_shape, rule_for


@contextlib.contextmanager
def gates(model, head_gate: Optional[torch.Tensor] = None, ffn_gate: Optional[torch.Tensor] = None):
    """Multiply each head's output by head_gate[layer, head] and each FFN neuron by ffn_gate[layer, neuron]
    while the block runs (a 0 gate is a pruned unit)."""
    rule = rule_for(model.config.model_type)
    head_dim = rule.head_dim(model.config)
    handles = []

    def scale(gate_row, repeat):
        return lambda _module, args: (args[0] * gate_row.repeat_interleave(repeat).to(args[0].dtype), *args[1:])

    for i, layer in enumerate(rule.layers(model)):
        if head_gate is not None:
            handles.append(_module(layer, rule.head_output).register_forward_pre_hook(scale(head_gate[i], head_dim)))
        if ffn_gate is not None:
            handles.append(_module(layer, rule.ffn_output).register_forward_pre_hook(scale(ffn_gate[i], 1)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _module(layer, path: str):
    return layer.get_submodule(path)


def importance(model, batches: Iterable[dict], loss_of) -> tuple[torch.Tensor, torch.Tensor]:
    """(head importance [layers, heads], neuron importance [layers, neurons]): sum over batches of |∂L/∂ξ|.
    `loss_of(model, batch)` returns the batch's mean loss."""
    shape = layer_shape(model)
    if len(set(shape["ffn"])) != 1 or len(set(shape["heads"])) != 1:
        raise LmforgeError("prune: the model is pruned already with differing layers; prune the unpruned model")
    layers = len(shape["heads"])
    head_gate = torch.ones(layers, shape["heads"][0], requires_grad=True)
    ffn_gate = torch.ones(layers, shape["ffn"][0], requires_grad=True)
    head_score, ffn_score = torch.zeros_like(head_gate), torch.zeros_like(ffn_gate)
    was_training = model.training
    model.eval()  # no dropout: the gradient of the model that will be served
    with gates(model, head_gate, ffn_gate):
        for batch in batches:
            head_gate.grad = ffn_gate.grad = None
            loss_of(model, batch).backward()
            head_score += head_gate.grad.abs()
            ffn_score += ffn_gate.grad.abs()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return head_score, ffn_score


def per_layer(fraction: Union[float, list[float], None], layers: int, field: str) -> Optional[list[float]]:
    if fraction is None:
        return None
    if isinstance(fraction, list):
        if len(fraction) != layers:
            raise LmforgeError(f"prune.{field}: {len(fraction)} values for a model with {layers} layers")
        return fraction
    return [fraction] * layers


def units_kept(scores: torch.Tensor, fractions: list[float], what: str, field: str) -> list[list[int]]:
    """Per layer, the indexes (in order) of the units that stay: the round(f * n) least important go."""
    kept = []
    for i, (row, f) in enumerate(zip(scores, fractions)):
        n = row.numel()
        drop = round(f * n)
        if drop >= n:
            raise LmforgeError(f"prune.{field}: {f} leaves layer {i} with no {what} ({n} × {f} rounds to {drop})")
        order = torch.argsort(row, descending=True, stable=True)
        kept.append(sorted(order[:n - drop].tolist()))
    return kept


def check_fractions(config: dict, heads, ffn) -> None:
    """Refuse, from the config alone, fractions that would empty a layer (before any work starts)."""
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    n_heads = config.get("num_attention_heads") or config.get("n_head")
    n_ffn = config.get("intermediate_size") or config.get("n_inner") or 4 * (config.get("n_embd") or 0)
    for fraction, field, n, what in ((heads, "heads", n_heads, "attention heads"), (ffn, "ffn", n_ffn, "FFN neurons")):
        for i, f in enumerate(per_layer(fraction, layers, field) or []):
            if round(f * n) >= n:
                raise LmforgeError(f"prune.{field}: {f} leaves layer {i} with no {what} ({n} × {f} rounds to "
                                   f"{round(f * n)})")


def prune_structured(model, heads, ffn, batches: Iterable[dict], loss_of) -> dict:
    """Rank and remove heads / neurons in place; returns what each layer kept."""
    layers = len(layer_shape(model)["heads"])
    head_fr, ffn_fr = per_layer(heads, layers, "heads"), per_layer(ffn, layers, "ffn")
    head_score, ffn_score = importance(model, batches, loss_of)
    keep_heads = units_kept(head_score, head_fr, "attention heads", "heads") if head_fr else None
    keep_ffn = units_kept(ffn_score, ffn_fr, "FFN neurons", "ffn") if ffn_fr else None
    keep_units(model, keep_heads, keep_ffn)
    return {"heads_kept": keep_heads, "ffn_kept": keep_ffn, "shape": layer_shape(model)}
