"""FSDP2 (`torch.distributed.fsdp.fully_shard`): each repeated block is its own shard unit, the rest of the model
belongs to the root unit. Parameters, gradients and optimizer state live as DTensor shards, one per process.

The engine finds the blocks by structure (the outermost `nn.ModuleList`s of one module class: GPT-2's `h`, BERT's
`encoder.layer`, T5's `encoder.block` and `decoder.block`, both networks of ELECTRA), so it needs no family's
attribute names. After training, the sharded weights are gathered into an unsharded copy of the model that was
set aside, parameter-less, before sharding: what stages save as one Hugging Face folder or evaluate further.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Optional

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from lmforge.recipe import DistConfig


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules of every outermost `nn.ModuleList` whose items are all of one class: a model's layers."""
    found: list[nn.Module] = []

    def walk(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList) and len(child) and len({type(m) for m in child}) == 1:
                found.extend(child)
            else:
                walk(child)

    walk(model)
    return found


def checkpoint_activations(model: nn.Module) -> int:
    """Recompute each block's activations in the backward pass (torch's composable, non-reentrant checkpoint:
    parameter names do not change, and the RNG state is replayed, so dropout masks are the same). Returns the
    number of blocks."""
    blocks = repeated_blocks(model)
    for block in blocks:
        checkpoint(block)
    return len(blocks)


def shard_policies(cfg: DistConfig, device_type: str) -> dict:
    """fully_shard's precision and offload arguments; both apply to CUDA only (CPU trains fp32 in CPU memory)."""
    cuda = device_type == "cuda"
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if cfg.mixed_precision and cuda else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy() if cfg.cpu_offload and cuda else OffloadPolicy()
    return {"mp_policy": mixed, "offload_policy": offload}


def ignored_settings(cfg: DistConfig, device_type: str, world: int) -> list[str]:
    """One line for each setting of `dist` this run cannot apply, said rather than silently dropped."""
    notes = []
    if cfg.strategy == "fsdp" and world == 1:
        notes.append("dist.strategy fsdp in one process: the model trains unsharded; checkpoints are sharded "
                     "(torch.distributed.checkpoint) and resume under any process count")
    if device_type != "cuda":
        notes += [f"dist.{name} applies on CUDA only; ignored on {device_type}"
                  for name in ("mixed_precision", "cpu_offload") if name in cfg.model_fields_set and getattr(cfg, name)]
    return notes


def shard(root: nn.Module, model: nn.Module, cfg: DistConfig, device_type: str) -> nn.Module:
    """Shard every block of `model`, then `root` (the module whose forward computes the loss, holding `model`):
    the root unit gathers what no block owns (embeddings, heads) even when an objective calls the model's
    parts rather than its forward."""
    policies = shard_policies(cfg, device_type)
    for block in repeated_blocks(model):
        fully_shard(block, reshard_after_forward=cfg.reshard_after_forward, **policies)
    fully_shard(root, reshard_after_forward=cfg.reshard_after_forward, **policies)
    return root


def renamed_groups(groups: Optional[list[dict]], names: dict[int, str], model: nn.Module) -> Optional[list[dict]]:
    """Optimizer parameter groups made before sharding, pointing at the sharded parameters of the same names
    (fully_shard replaces each parameter by a DTensor)."""
    if groups is None:
        return None
    now = dict(model.named_parameters())
    return [{**g, "params": [now[names[id(p)]] for p in g["params"]]} for g in groups]


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Whether this backward reduces gradients across processes: off for all but the last micro-batch of a step
    (DDP's no_sync; FSDP keeps unsharded gradients until the last one)."""
    if enabled:
        yield
    elif isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        with module.no_sync():
            yield


@contextlib.contextmanager
def gathered(root: nn.Module, reshard_after_forward: bool) -> Iterator[None]:
    """Every unit's full weights on every process for the duration (evaluation): forwards then need no
    collective, so processes may run different numbers of evaluation batches."""
    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    root.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        root.set_reshard_after_forward(reshard_after_forward)
        root.set_reshard_after_forward(False, recurse=False)  # as fully_shard leaves the root: it is used first


def parameterless_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters are on the meta device (no memory) and whose buffers are real; tied
    parameters stay tied."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def tie_groups(model: nn.Module) -> list[list[str]]:
    """Names that share one parameter object (tied embeddings), each group in order."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def full_state_dict(model: nn.Module) -> dict:
    """The whole model's state, gathered on process 0 in CPU memory (every process must call this; the others
    get an empty dict)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded(skeleton: nn.Module, state: dict) -> nn.Module:
    """A fresh, plain copy of `skeleton` holding `state` (on CPU), ties restored."""
    model = copy.deepcopy(skeleton)
    ties = tie_groups(model)
    model.load_state_dict(state, assign=True)
    for names in ties:
        shared = model.get_parameter(names[0])
        for name in names[1:]:
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, shared)
    return model.to("cpu")
