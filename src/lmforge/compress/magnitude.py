"""Unstructured magnitude pruning, one shot: the smallest weights of the transformer layers' matrices set to
zero — over all layers together (`global`) or in each matrix (`layer`) — to exactly the target share.

The zeros are written into the weights (no mask re-parametrisation left behind), so the saved model is a plain
dense checkpoint: the same size on disk and the same speed on CPU, since dense kernels multiply zeros too. What
sparsity buys is a smaller *compressed* file and, with a sparse kernel, speed at high sparsity;
docs/compression.md gives the measured figures.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

LAYER = re.compile(r"\.(?:layer|h|layers)\.(\d+)\.")


def prunable(model) -> dict[str, torch.Tensor]:
    """The weight matrices of the transformer layers (not embeddings, norms or the task head)."""
    return {f"{name}.weight": m.weight for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D)) and LAYER.search(f".{name}.")}


def _smallest(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Indexes of exactly the k smallest entries (ties broken by position)."""
    return torch.argsort(magnitudes, stable=True)[:k]


@torch.no_grad()
def prune_magnitude(model, sparsity: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """Zero the smallest weights in place; returns the keep-masks (True = kept) by weight name."""
    weights = prunable(model)
    masks = {}
    if scope == "global":
        flat = torch.cat([w.detach().abs().flatten() for w in weights.values()])
        mask = torch.ones_like(flat, dtype=torch.bool)
        mask[_smallest(flat, round(sparsity * flat.numel()))] = False
        start = 0
        for name, w in weights.items():
            masks[name] = mask[start:start + w.numel()].view_as(w)
            start += w.numel()
    else:
        for name, w in weights.items():
            mask = torch.ones(w.numel(), dtype=torch.bool)
            mask[_smallest(w.detach().abs().flatten(), round(sparsity * w.numel()))] = False
            masks[name] = mask.view_as(w)
    apply_masks(model, masks)
    return masks


@torch.no_grad()
def apply_masks(model, masks: dict[str, torch.Tensor]) -> None:
    """Zero the weights a mask drops (again, e.g. after recovery fine-tuning moved them)."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].dtype))


def sparsity_by_layer(model) -> dict[str, float]:
    """Share of zero weights in each transformer layer's prunable matrices, and 'all' over them."""
    zeros: dict[str, list[int]] = {}
    for name, w in prunable(model).items():
        layer = LAYER.search(f".{name}").group(1)
        z = zeros.setdefault(layer, [0, 0])
        z[0] += int((w == 0).sum())
        z[1] += w.numel()
    out = {f"layer {k}": v[0] / v[1] for k, v in sorted(zeros.items(), key=lambda kv: int(kv[0]))}
    out["all"] = sum(v[0] for v in zeros.values()) / max(1, sum(v[1] for v in zeros.values()))
    return out
