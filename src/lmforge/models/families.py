"""The model families lmforge builds from scratch, each a transformers config from the recipe's sizes.

A family is registered with its kind (decoder, encoder, encoder-decoder), which decides the objectives it can
train; `lmforge.register_family` adds one from user code. Every builder gets `dims` (layers, d, heads, ff from
the size preset and the recipe), the model and objective sections, and the tokenizer.
"""

from __future__ import annotations

from transformers import BertConfig, ElectraConfig, GPT2Config, LlamaConfig, RobertaConfig, T5Config

from lmforge.errors import LmforgeError
from lmforge.recipe import ModelConfig, ObjectiveConfig
from lmforge.registry import FAMILIES, register_family
from lmforge.tokenizer import special_ids

PRESETS = {  # layers, hidden size, heads
    "tiny": (2, 128, 2),
    "small": (4, 256, 4),
    "base": (12, 768, 12),
}
# Models whose position table reserves slots for the padding offset.
POSITION_OFFSET = {"roberta": 2}
# The family kind each built-in objective trains; objectives that need one particular head name its families.
OBJECTIVE_KINDS = {"clm": "decoder", "mlm": "encoder", "span": "encoder-decoder"}
OBJECTIVE_FAMILIES = {"mlm+nsp": ("bert",), "mlm+sop": ("bert",), "electra": ("electra",)}


def dimensions(cfg: ModelConfig) -> dict:
    layers, d, heads = PRESETS[cfg.size]
    d = cfg.d_model or d
    heads = cfg.n_heads or (heads if d % heads == 0 else 1)
    if d % heads:
        raise LmforgeError(f"model.n_heads: {heads} does not divide model.d_model {d}")
    return {"layers": cfg.n_layers or layers, "d": d, "heads": heads, "ff": cfg.d_ff or 4 * d}


def _positions(cfg: ModelConfig, objective: ObjectiveConfig) -> int:
    # A causal LM never feeds the last token of a block; ELECTRA's discriminator reads the whole block.
    return cfg.max_positions or (objective.block_size - (objective.kind == "clm"))


def _common(tokenizer) -> dict:
    ids = special_ids(tokenizer)
    return dict(vocab_size=len(tokenizer), pad_token_id=ids["pad"], bos_token_id=ids["bos"], eos_token_id=ids["eos"])


@register_family("bert", kind="encoder")
def bert_config(dims: dict, cfg: ModelConfig, objective: ObjectiveConfig, tokenizer) -> BertConfig:
    return BertConfig(hidden_size=dims["d"], num_hidden_layers=dims["layers"], num_attention_heads=dims["heads"],
                      intermediate_size=dims["ff"], max_position_embeddings=_positions(cfg, objective),
                      hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout, **_common(tokenizer))


@register_family("roberta", kind="encoder")
def roberta_config(dims: dict, cfg: ModelConfig, objective: ObjectiveConfig, tokenizer) -> RobertaConfig:
    return RobertaConfig(hidden_size=dims["d"], num_hidden_layers=dims["layers"], num_attention_heads=dims["heads"],
                         intermediate_size=dims["ff"],
                         max_position_embeddings=_positions(cfg, objective) + POSITION_OFFSET["roberta"],
                         hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                         **_common(tokenizer))


@register_family("electra", kind="encoder")
def electra_config(dims: dict, cfg: ModelConfig, objective: ObjectiveConfig, tokenizer) -> ElectraConfig:
    return ElectraConfig(embedding_size=dims["d"], hidden_size=dims["d"], num_hidden_layers=dims["layers"],
                         num_attention_heads=dims["heads"], intermediate_size=dims["ff"],
                         max_position_embeddings=cfg.max_positions or objective.block_size,
                         hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                         **_common(tokenizer))


@register_family("gpt2", kind="decoder")
def gpt2_config(dims: dict, cfg: ModelConfig, objective: ObjectiveConfig, tokenizer) -> GPT2Config:
    # Exact (erf) GELU: one vectorised kernel, twice as fast on CPU as GPT-2's tanh approximation
    # (gelu_new, eight element-wise ops), which only existed because erf was slow on 2018 TPUs.
    p = cfg.dropout
    return GPT2Config(n_embd=dims["d"], n_layer=dims["layers"], n_head=dims["heads"], n_inner=dims["ff"],
                      n_positions=_positions(cfg, objective), resid_pdrop=p, embd_pdrop=p, attn_pdrop=p,
                      activation_function="gelu", **_common(tokenizer))


@register_family("llama", kind="decoder")
def llama_config(dims: dict, cfg: ModelConfig, objective: ObjectiveConfig, tokenizer) -> LlamaConfig:
    return LlamaConfig(hidden_size=dims["d"], num_hidden_layers=dims["layers"], num_attention_heads=dims["heads"],
                       num_key_value_heads=dims["heads"],
                       intermediate_size=cfg.d_ff or int(8 * dims["d"] / 3) // 8 * 8 or 8,
                       max_position_embeddings=_positions(cfg, objective), attention_dropout=cfg.dropout,
                       tie_word_embeddings=True, **_common(tokenizer))


@register_family("t5", kind="encoder-decoder")
def t5_config(dims: dict, cfg: ModelConfig, objective: ObjectiveConfig, tokenizer) -> T5Config:
    # Relative position buckets: no position limit. decoder_start_token_id is the pad token, as in T5.
    ids = special_ids(tokenizer)
    return T5Config(d_model=dims["d"], d_kv=dims["d"] // dims["heads"], d_ff=dims["ff"], num_layers=dims["layers"],
                    num_decoder_layers=dims["layers"], num_heads=dims["heads"], dropout_rate=cfg.dropout,
                    feed_forward_proj="relu", decoder_start_token_id=ids["pad"], vocab_size=len(tokenizer),
                    pad_token_id=ids["pad"], eos_token_id=ids["eos"])


def family_kind(family: str) -> str:
    return FAMILIES.get(family).info["kind"]


def families_for(objective: ObjectiveConfig) -> list[str]:
    """The families `objective` can train from scratch."""
    kind = objective.kind
    if kind in OBJECTIVE_FAMILIES:
        return list(OBJECTIVE_FAMILIES[kind])
    return [name for name in FAMILIES.names() if FAMILIES.info(name, "kind") == OBJECTIVE_KINDS[kind]]


def make_config(cfg: ModelConfig, objective: ObjectiveConfig, tokenizer):
    """The transformers config of `cfg.family` at the recipe's sizes."""
    return FAMILIES.get(cfg.family).value(dimensions(cfg), cfg, objective, tokenizer)
