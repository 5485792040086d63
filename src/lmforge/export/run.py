"""`lmforge export`: a fine-tuned run (or an HF model folder) as a folder ONNX Runtime serves — model.onnx, the
config, the tokenizer, the run's recipe (so `lmforge eval` finds its data) and a model card that says which
runtime, opset, fusion and quantization it carries. The folder is written under a temporary name and renamed
when complete: a failed export leaves nothing.

`--format hf` writes a Hugging Face folder instead, for a pruned model whose shape stock transformers cannot
describe: the nearest shape it can (`lmforge.export.stock`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import onnxruntime as ort
import torch

from lmforge.engine.logging import console
from lmforge.errors import LmforgeError, disk_full_is_an_error
from lmforge.export.decoder import write_decoder_graph
from lmforge.export.onnx import OPSET, QUANTIZE, export_rule, write_graph
from lmforge.export.stock import write_stock
from lmforge.models.onnx import EXPORT_CARD, ONNX_FILE, is_onnx_folder
from lmforge.runs import model_folder
from lmforge.tokenizer import load_tokenizer

FORMATS = ("onnx", "hf")
COPIED = ("config.json", "generation_config.json")


def export(model_dir, out, fmt: str = "onnx", quantize: Optional[str] = None, which: Optional[str] = None,
           force: bool = False) -> Path:
    """Export the model of `model_dir` (a run folder: its final model, or `which`; or an HF folder) to `out`;
    `quantize="int8"` stores dynamic int8 weights. Returns `out`."""
    if fmt not in FORMATS:
        raise LmforgeError(f"--format: lmforge exports to {', '.join(FORMATS)}; got {fmt!r}")
    if quantize is not None and quantize not in QUANTIZE:
        raise LmforgeError(f"--quantize: expected {', '.join(QUANTIZE)} (or none), got {quantize!r}")
    if fmt == "hf" and quantize is not None:
        raise LmforgeError("--quantize: int8 weights have no stock transformers form; use --format onnx "
                           "--quantize int8, or --format hf without --quantize")
    model_dir, out = Path(model_dir), Path(out)
    folder = source_folder(model_dir, which)
    rule = export_rule(folder)[0] if fmt == "onnx" else None
    check_destination(out, model_dir, force)
    work = out.parent / f".{out.name}.export-tmp"
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.mkdir(parents=True)
        with disk_full_is_an_error(work):
            if fmt == "hf":
                facts = write_stock(folder, work, model_dir)
                copy_companions(model_dir, folder, work, copied=("generation_config.json",))
            else:
                write = write_decoder_graph if rule.task == "generate" else write_graph
                facts = write(folder, work, rule, quantize)
                copy_companions(model_dir, folder, work)
                write_card(work, model_dir, folder, facts, quantize)
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if fmt == "hf":
        console.print(f"exported {folder} to {out} in a stock transformers shape ({facts['parameters']:,} → "
                      f"{facts['stock_parameters']:,} parameters, max |Δ logits| vs the pruned model "
                      f"{facts['max_abs_logit_diff']:.2g})")
    else:
        console.print(f"exported {folder} to {out / ONNX_FILE} ({(out / ONNX_FILE).stat().st_size / 2**20:,.1f} MB, "
                      f"{quantize or 'fp32'}, max |Δ logits| vs PyTorch "
                      f"{facts.get('int8_max_abs_logit_diff', facts['fp32_max_abs_logit_diff']):.2g})")
    return out


def source_folder(model_dir: Path, which: Optional[str]) -> Path:
    if not model_dir.exists():
        raise LmforgeError(f"{model_dir}: no such run or model folder")
    folder = model_folder(model_dir, which)
    if is_onnx_folder(folder):
        raise LmforgeError(f"{folder}: already an ONNX export; export the PyTorch run it came from")
    return folder


def check_destination(out: Path, model_dir: Path, force: bool) -> None:
    if out.resolve() == model_dir.resolve() or model_dir.resolve() in out.resolve().parents:
        raise LmforgeError(f"--out {out}: must not be the source folder or inside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise LmforgeError(f"--out {out}: already exists and is not empty; pass --force to replace it")


def copy_companions(model_dir: Path, folder: Path, work: Path, copied: tuple[str, ...] = COPIED) -> None:
    """The config, the tokenizer and (from a fine-tuning run) its recipe, so eval finds the run's data."""
    for name in copied:
        if (folder / name).is_file():
            shutil.copy2(folder / name, work / name)
    load_tokenizer(folder).save_pretrained(str(work))
    if (model_dir / "recipe.yaml").is_file():
        shutil.copy2(model_dir / "recipe.yaml", work / "recipe.yaml")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.startswith(("model", "pytorch")))


def write_card(work: Path, model_dir: Path, folder: Path, facts: dict, quantize: Optional[str]) -> None:
    """export.json (what the runtime and `lmforge compare` read) and README.md (the same, for a person)."""
    size, source_size = (work / ONNX_FILE).stat().st_size, folder_bytes(folder)
    card = {
        "format": "onnx", "runtime": f"onnxruntime {ort.__version__} (CPUExecutionProvider)", "opset": OPSET,
        "exporter": f"torch.onnx TorchScript exporter (torch {torch.__version__}), eager attention",
        "fusion": f"onnxruntime.transformers optimizer, model_type {facts['fusion']}", "fused_operators": facts["fused"],
        "quantization": ("dynamic int8: QInt8 weights, activations quantized at run time" if quantize == "int8"
                         else None),
        "task": facts["task"], "inputs": facts["inputs"], "outputs": facts.get("outputs", ["logits"]),
        "kv_cache": facts.get("kv_cache", False), "source": str(model_dir), "source_model": str(folder),
        "bytes": size, "source_bytes": source_size, "mask_fill": facts.get("mask_fill"),
        **{k: v for k, v in facts.items() if k.endswith("logit_diff")},
    }
    (work / EXPORT_CARD).write_text(json.dumps(card, indent=2) + "\n")
    fused = ", ".join(f"{n}×{k}" for k, n in facts["fused"].items()) or "none"
    cache = "yes: past_key_values.N.key / .value in, present.N.key / .value out" if card["kv_cache"] else "no"
    check = ("over logits and cache at three (batch, step, past) shapes, an empty cache among them"
             if card["kv_cache"] else "over logits on a check batch")
    gaps = "; ".join(f"{k.split('_')[0]} {v:.2g}" for k, v in card.items() if k.endswith("logit_diff"))
    if card["kv_cache"]:
        what = (f"A causal LM exported by `lmforge export` from `{model_dir}`, with a KV cache: one graph prefills "
                "a prompt (past length 0) and decodes token by token. It runs on ONNX Runtime: `lmforge generate` "
                "and `lmforge serve` take this folder, and `model.onnx` opens in a plain "
                "`onnxruntime.InferenceSession` (inputs: input_ids, attention_mask, position_ids, "
                "past_key_values.N.key / .value; outputs: logits, present.N.key / .value).")
    else:
        what = (f"A {facts['task']} model exported by `lmforge export` from `{model_dir}`. It runs on ONNX Runtime: "
                "`lmforge predict`, `lmforge eval` and `lmforge serve` take this folder, and `model.onnx` opens in a "
                "plain `onnxruntime.InferenceSession` (inputs: " + ", ".join(facts["inputs"]) + "; output: logits).")
    lines = [f"# {model_dir.name} (ONNX)", "", what + " It is inference-only: train from the source run.", "",
             "| | |", "|---|---|",
             f"| runtime | {card['runtime']} |", f"| opset | {OPSET} |", f"| exporter | {card['exporter']} |",
             f"| fusion | {card['fusion']}: {fused} |", f"| quantization | {card['quantization'] or 'none (fp32)'} |",
             f"| KV cache | {cache} |",
             f"| size | {size / 2**20:,.2f} MB ({size / max(source_size, 1):.2f}× the PyTorch weights) |",
             f"| max \\|Δ\\| vs PyTorch {check} | {gaps} |", ""]
    (work / "README.md").write_text("\n".join(lines))
