"""`lmforge export --format hf`: a pruned model in the nearest shape stock `transformers` loads. Heads removed
from a layer, or FFN widths that differ per layer, have no field in a stock config; the export grows them back
with zero units (`lmforge.models.slicing.pad_to_stock`), which leave the outputs as they were, and checks that
`AutoModelFor*.from_pretrained` on the written folder gives the pruned model's logits."""

from __future__ import annotations

from pathlib import Path

import json

import torch
from transformers import (AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification)

from lmforge.errors import LmforgeError
from lmforge.export.onnx import WEIGHT_FILES, random_batch
from lmforge.models.compressed import COMPRESSION_KEY, compression_of, load_pretrained
from lmforge.models.slicing import pad_to_stock, rule_for

# What the reloaded stock model may differ from the pruned one by: the zero units change only the order of
# float32 sums (measured ≤ 1e-6 on MiniLM and GPT-2).
TOLERANCE = 1e-4


HEADS = (("ForSequenceClassification", AutoModelForSequenceClassification),
         ("ForTokenClassification", AutoModelForTokenClassification), ("ForMaskedLM", AutoModelForMaskedLM),
         ("LMHeadModel", AutoModelForCausalLM), ("ForCausalLM", AutoModelForCausalLM))


def stock_class(folder: Path):
    """The transformers auto class of the folder's architecture, for a family with a pruning rule."""
    config = json.loads((folder / "config.json").read_text())
    rule_for(config.get("model_type", "?"))  # a family lmforge cannot prune has nothing to pad
    arch = (config.get("architectures") or ["?"])[0]
    auto = next((auto for suffix, auto in HEADS if arch.endswith(suffix)), None)
    if auto is None:
        raise LmforgeError(f"{folder}: --format hf writes classifiers, taggers, masked and causal LMs; "
                           f"got {arch}")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise LmforgeError(f"{folder}: no weights to export (no {' / '.join(WEIGHT_FILES)})")
    return auto


def write_stock(folder: Path, work: Path, source: Path) -> dict:
    """Write the stock-shaped model of `folder` into `work` and its model card; returns what the card says."""
    if (compression_of(folder) or {}).get("quantization"):
        raise LmforgeError(f"{folder}: the weights are int8 in lmforge's own form, which stock transformers cannot "
                           "load; export the model before the quantize step, or use --format onnx --quantize int8")
    auto = stock_class(folder)
    model = load_pretrained(auto, folder)
    check = random_batch(model.config, ("input_ids", "attention_mask"))
    with torch.no_grad():
        before = model(**check).logits
    params_before = sum(p.numel() for p in model.parameters())
    shape = pad_to_stock(model)
    if hasattr(model.config, COMPRESSION_KEY):
        delattr(model.config, COMPRESSION_KEY)
    model.save_pretrained(str(work))
    reloaded = auto.from_pretrained(str(work), local_files_only=True, trust_remote_code=False).eval()
    with torch.no_grad():
        gap = (reloaded(**check).logits - before).abs().max().item()
    if gap > TOLERANCE:
        raise LmforgeError(f"{folder}: the stock-shaped model's logits differ from the pruned model's by {gap:.2g} "
                           f"(more than {TOLERANCE:g}); nothing was written")
    facts = {"shape": shape, "parameters": params_before,
             "stock_parameters": sum(p.numel() for p in reloaded.parameters()), "max_abs_logit_diff": gap}
    write_card(work, source, facts, model.config)
    return facts


def write_card(work: Path, source: Path, facts: dict, config) -> None:
    shape, full = facts["shape"], config.num_attention_heads
    padded = any(n != full for n in shape["heads"]) or len(set(shape["ffn"])) > 1
    if padded:
        what = (f"The pruned model of `{source}` grown to the nearest shape stock `transformers` describes: every "
                f"layer has its {full} attention heads again (the removed ones as zero heads) and an FFN "
                f"{max(shape['ffn'])} neurons wide (narrower layers padded with zero neurons). Zero units add nothing "
                "to the outputs, so `AutoModelFor*.from_pretrained` on this folder gives the pruned model's logits; "
                "they cost the size and speed the pruning saved. For the pruned speed, use the run itself with "
                "lmforge, or `lmforge export --format onnx`, whose graph keeps the pruned shape.")
    else:
        what = (f"The model of `{source}`, whose shape stock `transformers` already describes (every layer has all "
                f"its heads and the same FFN width); `AutoModelFor*.from_pretrained` loads it.")
    rows = "\n".join(f"| {i} | {h} → {full} | {f} → {max(shape['ffn'])} |"
                     for i, (h, f) in enumerate(zip(shape["heads"], shape["ffn"])))
    text = "\n".join([f"# {source.name} (stock shape)", "", what, "",
                      f"Parameters: {facts['parameters']:,} pruned → {facts['stock_parameters']:,} here. "
                      f"Max |Δ logits| against the pruned model on a check batch: {facts['max_abs_logit_diff']:.2g}.",
                      "", "| layer | heads | FFN neurons |", "|---|---|---|", rows, ""])
    (work / "README.md").write_text(text)


