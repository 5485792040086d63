"""Build a model for an objective from a family and size, or load a local Hugging Face checkpoint folder."""

from __future__ import annotations

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForPreTraining,
                          AutoModelForSeq2SeqLM, ElectraForMaskedLM, ElectraForPreTraining)
from transformers.utils import logging as hf_logging

from lmforge.errors import LmforgeError
from lmforge.models import demix, moe  # noqa: F401  (register the DEMix and MoE models with the Auto classes)
from lmforge.models.compressed import load_pretrained
from lmforge.models.electra import ElectraPretrainer, generator_config
from lmforge.models.families import POSITION_OFFSET, families_for, family_kind, make_config
from lmforge.models.onnx import refuse_inference_only
from lmforge.paths import local_path
from lmforge.recipe import ModelConfig, ObjectiveConfig
from lmforge.registry import objective_kind

hf_logging.disable_progress_bar()  # our own progress bars only


def auto_class(objective: str):
    objective = objective_kind(objective)
    if objective == "clm":
        return AutoModelForCausalLM
    if objective in ("mlm+nsp", "mlm+sop"):
        return AutoModelForPreTraining  # BertForPreTraining: the MLM head plus the two-way pair head
    if objective == "span":
        return AutoModelForSeq2SeqLM
    return AutoModelForMaskedLM


def family_of(model) -> str:
    return getattr(model.config, "model_type", "")


def build_electra(cfg: ModelConfig, objective: ObjectiveConfig, tokenizer) -> ElectraPretrainer:
    """A generator + discriminator from scratch (`model.family: electra`) or from a checkpoint folder."""
    if cfg.path:
        return ElectraPretrainer.from_folder(local_path(cfg.path), objective.generator_fraction)
    if cfg.family != "electra":
        raise LmforgeError(f"model.family: objective 'electra' trains an ELECTRA model; set model.family: electra "
                           f"(got '{cfg.family}')")
    disc_config = make_config(cfg, objective, tokenizer)
    disc = ElectraForPreTraining._from_config(disc_config, attn_implementation="sdpa")
    gen = ElectraForMaskedLM._from_config(generator_config(disc_config, objective.generator_fraction),
                                          attn_implementation="sdpa")
    return ElectraPretrainer(disc, gen)


def build_model(cfg: ModelConfig, objective: ObjectiveConfig, tokenizer, seed: int = 0):
    """A model for `objective`, checked against the tokenizer and block size."""
    torch.manual_seed(seed)
    if objective.kind == "electra":
        model = build_electra(cfg, objective, tokenizer)
    elif cfg.path:
        model = load_model(cfg.path, objective.name)
    else:
        allowed = families_for(objective)
        if cfg.family not in allowed:
            kind = {"decoder": "a decoder", "encoder": "an encoder"}.get(family_kind(cfg.family), "an encoder-decoder")
            raise LmforgeError(f"model.family: '{cfg.family}' is {kind}; objective '{objective.name}' needs "
                               f"{' or '.join(repr(f) for f in allowed)}")
        config = make_config(cfg, objective, tokenizer)
        config._attn_implementation = "sdpa"
        model = auto_class(objective.name).from_config(config, attn_implementation="sdpa")
    if objective.pairs and not hasattr(getattr(model, "cls", None), "seq_relationship"):
        raise LmforgeError(f"{cfg.path or 'model'}: objective '{objective.name}' needs a BERT model (it has the "
                           "two-way sentence-pair head)")
    check_compatible(model, tokenizer, objective.block_size, cfg.path or "model", causal=objective.kind == "clm")
    return model


def load_model(path, objective: str):
    path = local_path(path)
    objective = objective_kind(objective)
    if not (path / "config.json").is_file():
        raise LmforgeError(f"{path}: not a Hugging Face checkpoint folder (no config.json)")
    refuse_inference_only(path, "model")
    if objective == "electra":
        return ElectraPretrainer.from_folder(path)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        return load_pretrained(auto_class(objective), path, config=config)
    except ValueError as err:
        kind = {"clm": "a causal LM", "span": "an encoder-decoder LM"}.get(objective, "a masked LM")
        raise LmforgeError(f"{path}: cannot load as {kind}: "
                           f"{str(err).splitlines()[0]}") from None


def max_block_size(model) -> int:
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return (limit or 10**9) - POSITION_OFFSET.get(family_of(model), 0)


def check_compatible(model, tokenizer, block_size: int, where: str, causal: bool = False) -> None:
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise LmforgeError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary "
                           f"holds {vocab}; use the checkpoint's own tokenizer (tokenizer.path)")
    limit = max_block_size(model)
    positions = block_size - 1 if causal else block_size  # a causal LM never feeds the last token
    if positions > limit:
        raise LmforgeError(f"objective.block_size: {block_size} needs {positions} positions, above the model's "
                           f"position limit {limit}")


def _is_position(name: str) -> bool:
    return "position" in name or name.endswith("wpe.weight")


def count_parameters(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    positions = 0
    for name, p in model.named_parameters():
        if _is_position(name):
            positions += p.numel()
    return {"total": total, "embedding": embed, "positions": positions, "body": total - embed - positions}


def frozen_body_parameters(model) -> int:
    """Body parameters (not the token or position embeddings) that get no weight gradient."""
    embedding = model.get_input_embeddings().weight
    return sum(p.numel() for name, p in model.named_parameters()
               if not p.requires_grad and p is not embedding and not _is_position(name))


def flops_per_token(model, block_size: int, head_fraction: float = 1.0, frozen: int = 0) -> float:
    """Training FLOPs per input token (forward + backward = 3x forward), as in the PaLM/nanoGPT estimate.
    `frozen` body parameters (LoRA's base weights, frozen layers) cost no weight-gradient matmul: 4 FLOPs
    per parameter and token instead of 6."""
    if hasattr(model, "flops_per_token"):  # composite models (ELECTRA) count their parts
        return model.flops_per_token(block_size, head_fraction)
    n = count_parameters(model)
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer")
    d = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
    head = 2 * d * model.get_input_embeddings().num_embeddings * head_fraction
    attention = 2 * 2 * layers * d * block_size  # QK^T and AV (full, unmasked count)
    body = n["body"]
    if getattr(cfg, "is_encoder_decoder", False):
        # An input token passes the encoder, a target token the decoder: about half the body each.
        body, frozen = body / 2, frozen / 2
    return 3 * (2 * body + head + attention) - 2 * min(frozen, body)
