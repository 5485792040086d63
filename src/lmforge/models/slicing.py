"""Structured slicing of transformer layers: attention heads and FFN neurons removed from the matrices
themselves, so a pruned model is smaller and faster, not just masked.

transformers 5 no longer ships `prune_heads`, so the slicing is ours. Each family's rule names, per layer, the
projections that produce the heads (Q, K, V) and the neurons (the FFN's first matrix), and the projections
that read them (the attention output and the FFN's second matrix). The attention code of both families infers
the head count from the width of Q/K/V (`view(..., -1, head_dim)`), so a layer with fewer heads runs unchanged;
only GPT-2's fused Q|K|V split width is set per layer.

`pad_to_stock` goes the other way, for a loader that reads only stock configs: removed heads come back as zero
heads and narrower FFN layers grow zero neurons, up to the widest layer. A zero head's value rows and its columns
in the output projection are zero, and so are a zero neuron's column in the FFN's second matrix, so whatever the
attention pattern or the activation gives them, they add nothing: the outputs are the pruned model's, at the
cost of the parameters the pruning took away.

The same slicing rebuilds a pruned model's shape at load time: `apply_shape` cuts a fresh model to the saved
counts (keeping the first heads/neurons) before the saved weights are read into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lmforge.errors import LmforgeError


def _slice_weight(module: nn.Module, keep: torch.Tensor, side: str) -> None:
    """Keep rows `keep` of the module's outputs (`side='out'`) or inputs (`'in'`); Linear stores weight as
    (out, in), GPT-2's Conv1D as (in, out)."""
    conv = isinstance(module, Conv1D)
    dim = (1 if conv else 0) if side == "out" else (0 if conv else 1)
    weight = module.weight.data.index_select(dim, keep).clone()
    module.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
    if side == "out" and module.bias is not None:
        module.bias = nn.Parameter(module.bias.data.index_select(0, keep).clone(),
                                   requires_grad=module.bias.requires_grad)
    if conv:
        module.nf = weight.shape[1]
    elif side == "out":
        module.out_features = weight.shape[0]
    else:
        module.in_features = weight.shape[1]


def _grow_weight(module: nn.Module, spans: list[tuple[int, int, int]], size: int, side: str) -> None:
    """Widen the module's outputs (`side='out'`) or inputs (`'in'`) to `size`, zeros everywhere but `spans`, each
    (start in the old, length, start in the new): the inverse of `_slice_weight`."""
    conv = isinstance(module, Conv1D)
    dim = (1 if conv else 0) if side == "out" else (0 if conv else 1)
    old = module.weight.data
    shape = list(old.shape)
    shape[dim] = size
    weight = old.new_zeros(shape)
    for start, length, to in spans:
        weight.narrow(dim, to, length).copy_(old.narrow(dim, start, length))
    module.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
    if side == "out" and module.bias is not None:
        bias = module.bias.data.new_zeros(size)
        for start, length, to in spans:
            bias.narrow(0, to, length).copy_(module.bias.data.narrow(0, start, length))
        module.bias = nn.Parameter(bias, requires_grad=module.bias.requires_grad)
    if conv:
        module.nf = size
    elif side == "out":
        module.out_features = size
    else:
        module.in_features = size


def _features(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + j for h in heads for j in range(head_dim)], dtype=torch.long)


@dataclass(frozen=True)
class FamilyRule:
    """Where a family keeps its heads and neurons (attribute paths from one transformer layer)."""

    layers: Callable[[nn.Module], nn.ModuleList]
    head_inputs: tuple[str, ...]      # projections whose outputs are the heads (Q, K, V; or GPT-2's fused c_attn)
    head_output: str                  # the projection that reads the concatenated heads
    ffn_input: str                    # the FFN's first matrix: its outputs are the neurons
    ffn_output: str                   # the FFN's second matrix: reads the neurons
    fused_qkv: bool = False           # GPT-2: Q|K|V are one matrix, split by `split_size`
    ffn_config_key: str = "intermediate_size"

    def head_dim(self, config) -> int:
        return config.hidden_size // config.num_attention_heads

    def head_count(self, layer: nn.Module, config) -> int:
        width = _get(layer, self.head_inputs[0]).weight.shape[1 if self.fused_qkv else 0]
        return (width // 3 if self.fused_qkv else width) // self.head_dim(config)

    def ffn_count(self, layer: nn.Module) -> int:
        module = _get(layer, self.ffn_input)
        return module.nf if isinstance(module, Conv1D) else module.out_features

    def keep_heads(self, layer: nn.Module, heads: list[int], config) -> None:
        if not heads:
            raise LmforgeError("a layer must keep at least one attention head")
        d = self.head_dim(config)
        cols = _features(heads, d)
        if self.fused_qkv:
            attn = _get(layer, self.head_inputs[0].rsplit(".", 1)[0])
            width = attn.split_size
            _slice_weight(_get(layer, self.head_inputs[0]), torch.cat([cols, cols + width, cols + 2 * width]), "out")
            attn.split_size = len(heads) * d
            attn.num_heads = len(heads)
        else:
            for name in self.head_inputs:
                _slice_weight(_get(layer, name), cols, "out")
        _slice_weight(_get(layer, self.head_output), cols, "in")

    def pad_heads(self, layer: nn.Module, count: int, config) -> None:
        """Append zero heads up to `count` (the kept heads stay first, as slicing leaves them)."""
        d, now = self.head_dim(config), self.head_count(layer, config)
        if count <= now:
            return
        width = now * d
        if self.fused_qkv:
            attn = _get(layer, self.head_inputs[0].rsplit(".", 1)[0])
            spans = [(part * width, width, part * count * d) for part in range(3)]
            _grow_weight(_get(layer, self.head_inputs[0]), spans, 3 * count * d, "out")
            attn.split_size = count * d
            attn.num_heads = count
        else:
            for name in self.head_inputs:
                _grow_weight(_get(layer, name), [(0, width, 0)], count * d, "out")
        _grow_weight(_get(layer, self.head_output), [(0, width, 0)], count * d, "in")

    def pad_neurons(self, layer: nn.Module, count: int) -> None:
        now = self.ffn_count(layer)
        if count > now:
            _grow_weight(_get(layer, self.ffn_input), [(0, now, 0)], count, "out")
            _grow_weight(_get(layer, self.ffn_output), [(0, now, 0)], count, "in")

    def keep_neurons(self, layer: nn.Module, neurons: list[int]) -> None:
        if not neurons:
            raise LmforgeError("a layer must keep at least one FFN neuron")
        idx = torch.tensor(neurons, dtype=torch.long)
        _slice_weight(_get(layer, self.ffn_input), idx, "out")
        _slice_weight(_get(layer, self.ffn_output), idx, "in")


def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


BERT_LIKE = FamilyRule(layers=lambda m: m.base_model.encoder.layer,
                       head_inputs=("attention.self.query", "attention.self.key", "attention.self.value"),
                       head_output="attention.output.dense", ffn_input="intermediate.dense",
                       ffn_output="output.dense")
GPT2 = FamilyRule(layers=lambda m: m.base_model.h, head_inputs=("attn.c_attn",), head_output="attn.c_proj",
                  ffn_input="mlp.c_fc", ffn_output="mlp.c_proj", fused_qkv=True, ffn_config_key="n_inner")

RULES = {"bert": BERT_LIKE, "roberta": BERT_LIKE, "xlm-roberta": BERT_LIKE, "electra": BERT_LIKE, "gpt2": GPT2}


def rule_for(model_type: str) -> FamilyRule:
    """The slicing rule of a family; a family without one is an error naming those that have one."""
    if model_type not in RULES:
        raise LmforgeError(f"model family '{model_type}' has no pruning rule (families with one: "
                           f"{', '.join(sorted(RULES))})")
    return RULES[model_type]


def layer_shape(model) -> dict[str, list[int]]:
    """Heads and FFN neurons per layer, as the model holds them now."""
    rule = rule_for(model.config.model_type)
    layers = rule.layers(model)
    return {"heads": [rule.head_count(layer, model.config) for layer in layers],
            "ffn": [rule.ffn_count(layer) for layer in layers]}


def keep_units(model, heads: Optional[list[list[int]]] = None, neurons: Optional[list[list[int]]] = None) -> None:
    """Slice every layer to the heads / neurons listed for it (None: leave that part)."""
    rule = rule_for(model.config.model_type)
    for i, layer in enumerate(rule.layers(model)):
        if heads is not None:
            rule.keep_heads(layer, heads[i], model.config)
        if neurons is not None:
            rule.keep_neurons(layer, neurons[i])


def apply_shape(model, shape: dict) -> None:
    """Cut a freshly built model to a saved shape ({'heads': [count per layer], 'ffn': [count per layer]}) so the
    saved weights fit it."""
    heads, ffn = shape.get("heads"), shape.get("ffn")
    keep_units(model, [list(range(n)) for n in heads] if heads else None,
               [list(range(n)) for n in ffn] if ffn else None)


def stock_loadable(model) -> dict:
    """Fold what stock transformers can express into the config (FFN width, when every layer has the same) and
    return the rest, which only lmforge's loader rebuilds: {'heads': [...]} when heads were removed, {'ffn': [...]}
    when layers differ in width."""
    rule = rule_for(model.config.model_type)
    shape = layer_shape(model)
    full_heads = model.config.num_attention_heads
    rest = {}
    if any(n != full_heads for n in shape["heads"]):
        rest["heads"] = shape["heads"]
    if len(set(shape["ffn"])) == 1:
        setattr(model.config, rule.ffn_config_key, shape["ffn"][0])
    else:
        rest["ffn"] = shape["ffn"]
    return rest


def pad_to_stock(model) -> dict:
    """Grow a pruned model to the nearest shape a stock config describes: every layer back to the config's head
    count and to the widest layer's FFN width, with zero units that leave the outputs unchanged (module
    docstring). Folds the width into the config and returns {'heads': [...], 'ffn': [...]} as they were."""
    rule = rule_for(model.config.model_type)
    before = layer_shape(model)
    width = max(before["ffn"])
    for layer in rule.layers(model):
        rule.pad_heads(layer, model.config.num_attention_heads, model.config)
        rule.pad_neurons(layer, width)
    rest = stock_loadable(model)
    assert not rest, rest  # every layer now has the config's heads and one FFN width
    return before
