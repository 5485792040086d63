"""Writing an ONNX graph of a model folder: the TorchScript exporter with eager attention (its graph is the
one ONNX Runtime's transformer optimizer recognises and fuses), the family's fusion pass, then dynamic int8.

Each rule below was measured with the pinned versions: the dynamo exporter's SDPA graph is not matched by the
attention fusion, and dynamic quantization of the fused graph needs the float type named for tensors that
shape inference cannot type (the fused contrib ops)."""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import numpy_helper
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.fusion_options import FusionOptions
from onnxruntime.transformers.optimizer import optimize_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

from lmforge.errors import LmforgeError
from lmforge.models.compressed import compression_of, load_pretrained
from lmforge.models.onnx import ONNX_FILE, open_session

OPSET = 17
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
QUANTIZE = ("int8",)
# What a padded key adds to its attention score in the graph, in place of float32's lowest value: e^-30 of a
# real key's weight is below fp32's resolution of a softmax sum, and ONNX Runtime's softmax took 163 ms instead of
# 14 ms per 32×128 int8 batch of padded rows on scores near float32's lowest (profiled), the same graph 1.7× slower.
MASK_FLOOR = -30.0


@dataclass(frozen=True)
class ExportRule:
    """How one architecture goes to ONNX: the transformers class that loads it, the inputs its graph takes and
    the model type ONNX Runtime's optimizer fuses it as."""

    auto: type
    inputs: tuple[str, ...]
    fusion: str
    task: str


ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
RULES = {  # (model_type, head) -> rule; the head is the part of the architecture's name after 'For'
    (family, "SequenceClassification"): ExportRule(AutoModelForSequenceClassification, inputs, "bert", "classification")
    for family, inputs in (("bert", ENCODER_INPUTS), ("roberta", ENCODER_INPUTS[:2]))
} | {
    (family, "TokenClassification"): ExportRule(AutoModelForTokenClassification, inputs, "bert", "ner")
    for family, inputs in (("bert", ENCODER_INPUTS), ("roberta", ENCODER_INPUTS[:2]))
} | {  # a causal LM with its KV cache (`lmforge.export.decoder`); GPT2LMHeadModel's name has no 'For'
    ("gpt2", "LMHeadModel"): ExportRule(AutoModelForCausalLM, ("input_ids", "attention_mask", "position_ids"),
                                        "gpt2", "generate"),
}


def export_rule(folder: Path) -> tuple[ExportRule, dict]:
    """The rule for the model in `folder` (and its config.json), or one line saying why there is none."""
    config = json.loads((folder / "config.json").read_text())
    model_type = config.get("model_type", "?")
    archs = config.get("architectures") or ["?"]
    head = archs[0].partition("For")[2] or ("LMHeadModel" if archs[0].endswith("LMHeadModel") else "")
    rule = RULES.get((model_type, head))
    if rule is None:
        known = ", ".join(f"{t} {h}" for t, h in RULES)
        raise LmforgeError(f"{folder}: no ONNX export rule for {archs[0]} (model_type {model_type!r}); "
                           f"lmforge exports: {known}")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise LmforgeError(f"{folder}: no weights to export (no {' / '.join(WEIGHT_FILES)})")
    return rule, config


def load_for_export(folder: Path, rule: ExportRule):
    """The PyTorch model with eager attention, the one form whose graph ORT's attention fusion matches; a pruned
    folder (heads or FFN neurons removed, `lmforge compress`) comes back in its own shape."""
    if (compression_of(folder) or {}).get("quantization"):
        raise LmforgeError(f"{folder}: the weights are already int8 (PyTorch); export the model before that "
                           f"quantize step, with --quantize int8")
    try:
        model = load_pretrained(rule.auto, folder, attention="eager")
    except (OSError, ValueError) as err:
        raise LmforgeError(f"{folder}: cannot load the model to export: {str(err).splitlines()[0]}") from None
    return model.eval()


def sample_inputs(config, rule: ExportRule, batch: int = 2, length: int = 16) -> dict:
    """A small batch to trace and to check the export with; its second row is padded, so the mask is traced
    as a real input."""
    return random_batch(config, rule.inputs, batch, length)


def random_batch(config, names, batch: int = 2, length: int = 16) -> dict:
    """Random ids (seeded) for the inputs `names`; every row after the first is padded over its second half."""
    length = min(length, getattr(config, "max_position_embeddings", length) - 2)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1:, length // 2:] = 0
    values = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return {name: values[name] for name in names}


def trace_to_onnx(model, rule: ExportRule, sample: dict, path: Path) -> None:
    axes = {name: {0: "batch", 1: "sequence"} for name in rule.inputs}
    axes["logits"] = {0: "batch", 1: "sequence"} if rule.task == "ner" else {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes: checked below
        torch.onnx.export(model, tuple(sample.values()), str(path), input_names=list(rule.inputs),
                          output_names=["logits"], dynamic_axes=axes, opset_version=OPSET, dynamo=False)


def fuse(raw: Path, out: Path, rule: ExportRule, config, for_int8: bool = False) -> dict:
    """ORT's transformer optimizer for the family; returns the count of each fused operator it made.

    An encoder headed for dynamic int8 keeps attention and the residual layer norms unfused: on one CPU thread its
    quantized graph then ran 3.95× / 2.65× PyTorch fp32 at 1×64 / 32×128 tokens, against 3.03× / 1.97× with them
    fused (MiniLM SST-2 classifier, same run); fp32 graphs gain nothing either way."""
    options = None
    if for_int8 and rule.fusion == "bert":
        options = FusionOptions(rule.fusion)
        options.enable_attention = options.enable_skip_layer_norm = False
    quiet = _quiet_logs()
    try:
        optimized = optimize_model(str(raw), model_type=rule.fusion, num_heads=config.num_attention_heads,
                                   hidden_size=config.hidden_size,  # (GPT2Config maps these to n_head, n_embd)
                                   optimization_options=options)
        fused = {name: n for name, n in optimized.get_fused_operator_statistics().items() if n}
        optimized.save_model_to_file(str(out))
    finally:
        _restore_logs(quiet)
    return fused


def soften_mask(path: Path) -> int:
    """Replace the graph's scalar constants at float32's lowest value (the attention mask's fill) by MASK_FLOOR;
    returns how many there were."""
    model = onnx.load(str(path))
    lowest = np.finfo(np.float32).min / 2
    changed = 0
    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT and int(np.prod(tensor.dims)) == 1:
            value = numpy_helper.to_array(tensor)
            if float(value.reshape(-1)[0]) <= lowest:
                tensor.CopyFrom(numpy_helper.from_array(np.full(value.shape, MASK_FLOOR, np.float32), tensor.name))
                changed += 1
    if changed:
        onnx.save(model, str(path))
    return changed


def quantize_int8(fp32: Path, out: Path) -> None:
    """Dynamic int8: weights QInt8 once, one scale per output channel (per-tensor scales cost a fine-tuned
    MiniLM 1.1 points of SST-2 accuracy, per-channel none), activations quantized at run time."""
    quiet = _quiet_logs()
    try:
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        _restore_logs(quiet)


def max_logit_gap(model, path: Path, sample: dict, task: str) -> float:
    """Largest |ONNX Runtime − PyTorch| over the sample's logits (NER: over the real, unpadded tokens)."""
    with torch.no_grad():
        expected = model(**sample).logits.numpy()
    got = open_session(path).run(["logits"], {k: v.numpy() for k, v in sample.items()})[0]
    gap = np.abs(got - expected)
    if task == "ner":
        gap = gap[sample["attention_mask"].numpy().astype(bool)]
    return float(gap.max())


def write_graph(folder: Path, work: Path, rule: ExportRule, quantize: Optional[str]) -> dict:
    """model.onnx in `work` (fused, then int8 if asked); returns what the model card says about it."""
    model = load_for_export(folder, rule)
    sample = sample_inputs(model.config, rule)
    raw, fused_path = work / "traced.onnx", work / "fused.onnx"
    trace_to_onnx(model, rule, sample, raw)
    fused = fuse(raw, fused_path, rule, model.config, for_int8=quantize == "int8")
    raw.unlink()
    softened = soften_mask(fused_path)
    facts = {"fp32_max_abs_logit_diff": max_logit_gap(model, fused_path, sample, rule.task)}
    if quantize == "int8":
        quantize_int8(fused_path, work / ONNX_FILE)
        fused_path.unlink()
        facts["int8_max_abs_logit_diff"] = max_logit_gap(model, work / ONNX_FILE, sample, rule.task)
    else:
        fused_path.rename(work / ONNX_FILE)
    facts.update(fused=fused, task=rule.task, fusion=rule.fusion, inputs=list(rule.inputs),
                 mask_fill=MASK_FLOOR if softened else None)
    return facts


def _quiet_logs() -> dict:
    """ORT's optimizer and quantizer log advice at INFO/WARNING on the root logger; a user needs none of it."""
    names = ("", "onnxruntime", "onnxruntime.transformers", "fusion")
    saved = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    return saved


def _restore_logs(saved: dict) -> None:
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)
