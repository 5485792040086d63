"""What one training step of a recipe needs in memory, estimated from the recipe alone (before a tokenizer or a
model is built), so a recipe that cannot fit is refused before any work starts.

    parameters, gradients and AdamW's two moments   16 bytes per parameter (fp32)
    activations kept for the backward pass          about 68 * d_model bytes per token and layer (fp32; the
                                                    34-bytes-per-token-and-width term of Korthikanti et al. 2022,
                                                    doubled for fp32), attention scores not stored (SDPA)
    output layer                                    logits, their softmax and gradient: 12 bytes per token and
                                                    vocabulary entry, at the positions the loss reads

It is an estimate of the step alone (a process's fixed costs — imports, the data — come on top and dominate for
small models); it exists to catch recipes that are off by orders of magnitude (a block of 100,000 tokens on a
laptop took 554 s for its first step), not to pack a machine to the last byte.
"""

from __future__ import annotations

import json
from typing import Optional

import psutil
import torch

from lmforge.errors import LmforgeError
from lmforge.models.families import dimensions
from lmforge.paths import local_path
from lmforge.recipe import Recipe

REFUSE_SHARE = 0.9   # refuse a step estimated above this share of the machine's memory
CHAR_VOCAB = 512     # a character tokenizer's vocabulary, before it is trained


def _shape(recipe: Recipe) -> dict:
    """Layers, width, FFN width, vocabulary and learned positions of the recipe's model."""
    cfg, objective = recipe.model, recipe.objective
    if cfg.path:
        config = json.loads((local_path(cfg.path) / "config.json").read_text())
        d = config.get("hidden_size") or config.get("n_embd") or config.get("d_model") or 0
        layers = config.get("num_hidden_layers") or config.get("n_layer") or config.get("num_layers") or 0
        ff = config.get("intermediate_size") or config.get("n_inner") or config.get("d_ff") or 4 * d
        return {"layers": layers, "d": d, "ff": ff, "vocab": config.get("vocab_size", 0),
                "positions": config.get("max_position_embeddings") or config.get("n_positions") or 0}
    dims = dimensions(cfg)
    vocab = CHAR_VOCAB if recipe.tokenizer.kind == "char" and not recipe.tokenizer.path else \
        recipe.tokenizer.vocab_size
    positions = 0 if cfg.family in ("llama", "t5") else (cfg.max_positions or objective.block_size)
    layers = dims["layers"] * (2 if cfg.family == "t5" else 1)
    return {"layers": layers, "d": dims["d"], "ff": dims["ff"], "vocab": vocab, "positions": positions}


def step_memory(recipe: Recipe) -> dict:
    """Estimated bytes of one training step: parameters and optimizer state, activations, output layer."""
    s = _shape(recipe)
    params = s["layers"] * (4 * s["d"] ** 2 + 2 * s["d"] * s["ff"]) + (s["vocab"] + s["positions"]) * s["d"]
    if recipe.objective.kind == "electra":
        params *= 1 + recipe.objective.generator_fraction
    tokens = recipe.train.batch_size * recipe.objective.block_size
    read = 1.0 if recipe.objective.kind in ("clm", "span") else recipe.objective.mlm_probability
    out = {"parameters": 16 * params, "activations": 68 * s["d"] * s["layers"] * tokens,
           "output": 12 * tokens * read * s["vocab"]}
    out["total"] = sum(out.values())
    return out


def machine_memory(device_type: str) -> tuple[int, str]:
    """(bytes, what) of the memory a run on `device_type` has."""
    if device_type.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, f"GPU memory of {torch.cuda.get_device_name(0)}"
    return psutil.virtual_memory().total, "memory of this machine"


def check_fits(recipe: Recipe, device_type: str, available: Optional[int] = None) -> dict:
    """Refuse a recipe whose training step cannot fit, with the numbers and what to lower."""
    need = step_memory(recipe)
    have, what = machine_memory(device_type) if available is None else (available, "memory given")
    if need["total"] > REFUSE_SHARE * have:
        gb = 2 ** 30
        t = recipe.train
        raise LmforgeError(
            f"objective.block_size {recipe.objective.block_size} x train.batch_size {t.batch_size}: one training "
            f"step needs about {need['total'] / gb:,.1f} GB (activations {need['activations'] / gb:,.1f} GB, output "
            f"layer {need['output'] / gb:,.1f} GB, parameters and optimizer {need['parameters'] / gb:,.1f} GB), "
            f"more than the {have / gb:,.1f} GB {what}; lower objective.block_size or train.batch_size (and raise "
            "train.grad_accum to keep the batch)")
    return need
