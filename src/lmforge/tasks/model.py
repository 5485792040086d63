"""The task model: a base checkpoint with a classification head, and the training strategy applied to it
(frozen parts, layer-wise learning-rate decay, peft adapters)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification
from transformers.utils import logging as hf_logging

from lmforge.errors import LmforgeError
from lmforge.models.compressed import is_quantized, load_pretrained
from lmforge.models.onnx import refuse_inference_only
from lmforge.paths import package_path
from lmforge.runs import model_folder
from lmforge.tasks.config import BaseModelSpec, StrategyConfig
from lmforge.tokenizer import load_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model")
LAYER = re.compile(r"\.(?:layer|h|layers)\.(\d+)\.")
EMBEDDINGS = ("embeddings", "wte", "wpe", "embed_tokens", "embed_positions")
HEADS = ("classifier", "score", "pooler")  # the pooler is new for most encoders' sentence task: train it as head


def resolve_base(path: str) -> Path:
    """A model folder: an HF folder as is, or the model inside an lmforge run folder (final, then best)."""
    folder = package_path(path) if path.startswith("package:") else Path(path)
    if not folder.exists():
        raise LmforgeError(f"model.path: {path}: no such folder")
    folder = folder if (folder / "config.json").is_file() else model_folder(folder)
    refuse_inference_only(folder, "model.path")
    return folder


def load_task_tokenizer(spec: BaseModelSpec, folder: Path):
    source = Path(spec.tokenizer) if spec.tokenizer else folder
    if not any((source / f).exists() for f in TOKENIZER_FILES):
        raise LmforgeError(f"{source}: the checkpoint folder has no tokenizer (tokenizer.json / vocab.txt); "
                           "set model.tokenizer to the folder of the tokenizer it was trained with")
    tokenizer = load_tokenizer(source)
    if tokenizer.pad_token_id is None:  # GPT-2 and Llama tokenizers: pad with EOS (masked out anyway)
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    return tokenizer


def build_task_model(folder: Path, task: str, label_names: list[str], multi_label: bool, tokenizer,
                     dropout: Optional[float] = None, seed: int = 0):
    torch.manual_seed(seed)
    if is_quantized(folder):
        raise LmforgeError(f"{folder}: an int8 model is for inference only; fine-tune the model it was quantized "
                           "from, then quantize again")
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForTokenClassification
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    config.num_labels = len(label_names)
    config.id2label = dict(enumerate(label_names))
    config.label2id = {n: i for i, n in enumerate(label_names)}
    config.problem_type = ("multi_label_classification" if multi_label else "single_label_classification") \
        if task == "classification" else None
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    if dropout is not None:
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop",
                     "attn_pdrop", "attention_dropout", "classifier_dropout"):
            if hasattr(config, name):
                setattr(config, name, dropout)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new head is expected to be missing from the checkpoint
    try:
        model, info = load_pretrained(auto, folder, config=config, with_info=True)
    except (ValueError, KeyError) as err:
        raise LmforgeError(f"{folder}: cannot load for {task}: {str(err).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    # Modules the checkpoint lacked (the head; a pooler for MLM checkpoints): an adapter must save them too.
    model.new_modules = sorted({key.rsplit(".", 1)[0] for key in info.get("missing_keys", ()) if "." in key})
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise LmforgeError(f"{folder}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary holds "
                           f"{model.get_input_embeddings().num_embeddings}; use the checkpoint's own tokenizer")
    return model


def position_limit(config) -> int:
    """Longest input the model takes (a config object or config.json's dict)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    limit = get("max_position_embeddings") or get("n_positions") or 10**9
    return limit - (2 if get("model_type") in ("roberta", "xlm-roberta") else 0)


def depth_of(name: str, n_layers: int) -> int:
    """0 for embeddings, i + 1 for transformer layer i, n_layers + 1 for everything above (head, final norm)."""
    m = LAYER.search(name)
    if m:
        return int(m.group(1)) + 1
    if any(part in name for part in EMBEDDINGS):
        return 0
    return n_layers + 1


def is_head(name: str) -> bool:
    return any(name.startswith(h) or f".{h}." in name for h in HEADS)


def apply_freezing(model, strategy: StrategyConfig) -> None:
    if strategy.method != "frozen" and not (strategy.freeze_embeddings or strategy.freeze_layers or strategy.head_only):
        return
    n = model.config.num_hidden_layers
    if strategy.freeze_layers > n:
        raise LmforgeError(f"strategy.freeze_layers: {strategy.freeze_layers} but the model has {n} layers")
    for name, p in model.named_parameters():
        depth = depth_of(name, n)
        frozen = (strategy.head_only and not is_head(name)) or \
                 (strategy.freeze_embeddings and depth == 0) or \
                 (strategy.freeze_layers and depth <= strategy.freeze_layers)
        if frozen:
            p.requires_grad_(False)


def apply_peft(model, strategy: StrategyConfig, task: str):
    # peft loads only for parameter-efficient runs
    import peft
    spec = strategy.peft
    task_type = peft.TaskType.SEQ_CLS if task == "classification" else peft.TaskType.TOKEN_CLS
    # Newly initialised modules (the head, a pooler the checkpoint lacked) are trained and saved with the adapter,
    # so the adapter alone plus the base checkpoint rebuilds the model.
    common = dict(task_type=task_type, target_modules=spec.target_modules,
                  modules_to_save=list(getattr(model, "new_modules", [])) or None)
    if spec.method == "lora":
        config = peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, **common)
    elif spec.method == "ia3":
        config = peft.IA3Config(**common)
    elif spec.method == "loha":
        config = peft.LoHaConfig(r=spec.r, alpha=spec.alpha, module_dropout=spec.dropout, **common)
    else:
        config = peft.LoKrConfig(r=spec.r, alpha=spec.alpha, module_dropout=spec.dropout, **common)
    try:
        return peft.get_peft_model(model, config)
    except ValueError as err:
        raise LmforgeError(f"strategy.peft: {str(err).splitlines()[0]}; set strategy.peft.target_modules") from None


def param_groups(model, weight_decay: float, strategy: StrategyConfig, lr: float) -> list[dict]:
    """AdamW groups: decay on 2-D weights only; with layer-wise decay, layer i of n gets lr * decay**(n + 1 - depth)
    and the head lr (or head_lr); groups carry `lr_scale`, which the engine multiplies into the schedule."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", 0)
    groups: dict[tuple, list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        clean = name.replace("base_model.model.", "")
        head = is_head(clean) or "modules_to_save" in name
        scale = strategy.layer_lr_decay ** (n + 1 - depth_of(clean, n)) if not head else 1.0
        if head and strategy.head_lr:
            scale = strategy.head_lr / lr
        decay = weight_decay if p.dim() >= 2 else 0.0
        groups.setdefault((round(scale, 12), decay), []).append(p)
    return [{"params": ps, "lr_scale": scale, "weight_decay": decay} for (scale, decay), ps in groups.items()]


def trainable_counts(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def label_names_of(folder: Path) -> list[str]:
    config = json.loads((Path(folder) / "config.json").read_text())
    id2label = config.get("id2label") or {}
    return [id2label[str(i)] if str(i) in id2label else id2label[i] for i in range(len(id2label))]
