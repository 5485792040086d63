"""Int8 weights for CPU inference, stored as plain int8 tensors with one float scale per output row, so a
quantized model saves to and loads from safetensors like any other.

- `int8-dynamic`: linear layers run fbgemm's dynamic int8 matmul (`torch.ops.quantized.linear_dynamic`:
  activations quantized per batch at run time, int8 x int8 → int32); the kernel behind
  `torch.ao.quantization.quantize_dynamic`, whose modules cannot be saved with `save_pretrained` — here the
  module keeps its int8 weight and scales as buffers and packs them for the kernel when built or loaded.
- `int8-weight`: weight-only; the int8 weight is widened to float in each forward and multiplied by its scales.
  It saves disk and resident memory, not time (no CPU kernel beats fp32 here: torch's `_weight_int8pack_mm` ran
  ~35x slower than the fp32 matmul on this CPU).

Token embeddings are int8 per row in both schemes (the largest matrix of a small encoder); the task head
stays in float.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

SCHEMES = ("int8-dynamic", "int8-weight")
HEAD_MODULES = ("classifier", "score", "lm_head", "qa_outputs")


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (int8 values in [-127, 127], float32 scale per row)."""
    scale = weight.detach().abs().amax(dim=1).clamp(min=1e-12).float() / 127.0
    q = torch.round(weight.detach().float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """A linear layer whose weight is int8 with a scale per output row (`dynamic`: fbgemm int8 matmul)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dynamic: bool):
        super().__init__()
        self.in_features, self.out_features, self.dynamic = in_features, out_features, dynamic
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed = None
        self.register_load_state_dict_post_hook(lambda module, _keys: module.pack())

    @classmethod
    def from_linear(cls, linear: nn.Module, dynamic: bool) -> "Int8Linear":
        """From an nn.Linear, or a GPT-2 Conv1D (its weight is stored transposed)."""
        weight = linear.weight.t() if isinstance(linear, Conv1D) else linear.weight
        module = cls(weight.shape[1], weight.shape[0], linear.bias is not None, dynamic)
        module.weight, module.weight_scale = int8_rows(weight)
        if linear.bias is not None:
            module.bias = linear.bias.detach().float().clone()
        module.pack()
        return module

    def pack(self) -> None:
        """The fbgemm kernel's packed weight, from the int8 buffers (after building or loading)."""
        if not self.dynamic:
            return
        zeros = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensors are deprecated, the fbgemm kernel is not replaced yet
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(self.weight, self.weight_scale.double(), zeros, 0)
            self._packed = torch.ops.quantized.linear_prepack(qweight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            return torch.ops.quantized.linear_dynamic(x.float(), self._packed, True).to(x.dtype)
        weight = self.weight.to(x.dtype) * self.weight_scale.to(x.dtype)[:, None]
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, int8 {'dynamic' if self.dynamic else 'weight-only'}"


class Int8Embedding(nn.Module):
    """Token embeddings stored int8 per row; a lookup widens only the rows it reads."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> "Int8Embedding":
        module = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx)
        module.weight, module.weight_scale = int8_rows(embedding.weight)
        return module

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).float() * self.weight_scale[ids].unsqueeze(-1)


def _is_head(name: str) -> bool:
    return name.split(".")[0] in HEAD_MODULES


def quantize_modules(model: nn.Module, scheme: str, names: Optional[dict] = None) -> dict:
    """Replace the model's linear layers (all but the task head; GPT-2's Conv1D too) and its token embeddings
    (unless tied to the LM head) by int8 ones, in place.
    `names` ({'linear': [...], 'embedding': [...]}) picks the modules, as a saved model lists them; returns the
    names replaced. Modules are quantized from their current weights (at load time they are then overwritten)."""
    if scheme not in SCHEMES:
        raise ValueError(scheme)
    if names is None:
        embedding = model.get_input_embeddings()
        output = model.get_output_embeddings()
        tied = output is not None and output.weight is embedding.weight  # a tied LM head reads them in float
        names = {"linear": [n for n, m in model.named_modules()
                            if isinstance(m, (nn.Linear, Conv1D)) and not _is_head(n)],
                 "embedding": [] if tied else [n for n, m in model.named_modules() if m is embedding]}
    for name in names["linear"]:
        _replace(model, name, Int8Linear.from_linear(model.get_submodule(name), scheme == "int8-dynamic"))
    for name in names["embedding"]:
        _replace(model, name, Int8Embedding.from_embedding(model.get_submodule(name)))
    return names


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)

