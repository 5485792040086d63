"""The student: the teacher's architecture with fewer layers, each starting as one of the teacher's (DistilBERT
takes every other layer), saved as an ordinary model folder with the teacher's tokenizer."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
import transformers

from lmforge.errors import LmforgeError
from lmforge.paths import cache_root


def evenly_spaced(teacher_layers: int, student_layers: int) -> list[int]:
    """Student layer i starts as teacher layer round(i · (L_t − 1) / (L_s − 1)): the first and the last are kept."""
    if student_layers == 1:
        return [teacher_layers - 1]
    return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


def layer_stack(model: torch.nn.Module) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    """(owner, attribute, list) of the model's repeated transformer blocks: the ModuleList as long as the config's
    layer count (BERT's encoder.layer, GPT-2's transformer.h, Llama's model.layers)."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        for attr, child in module.named_children():
            if isinstance(child, torch.nn.ModuleList) and len(child) == n and attr in ("layer", "h", "layers"):
                return module, attr, child
    raise LmforgeError(f"distill.student_layers: no rule to remove layers from a {type(model).__name__} "
                       f"(give the student in model: instead)")


def load_hf_model(folder: Path) -> torch.nn.Module:
    """A model folder as its own transformers class (the `architectures` its config names); no remote code."""
    config = json.loads((folder / "config.json").read_text())
    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise LmforgeError(f"{folder}: config.json names no transformers class lmforge can load ({arch!r})")
    return cls.from_pretrained(str(folder))


def make_student(teacher_folder: Path, layers: Optional[list[int]], count: int) -> Path:
    """The teacher with `count` layers (teacher layers `layers`, default evenly spaced), saved once in the cache."""
    teacher = load_hf_model(teacher_folder)
    total = teacher.config.num_hidden_layers
    layers = layers or evenly_spaced(total, count)
    if max(layers) >= total:
        raise LmforgeError(f"distill.init_layers: the teacher has layers 0..{total - 1}; got {layers}")
    weights = sorted(teacher_folder.glob("*.safetensors"))
    key = hashlib.sha256(json.dumps([str(teacher_folder.resolve()), layers] +
                                    [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]).encode())
    folder = cache_root() / "students" / key.hexdigest()[:16]
    if (folder / "config.json").is_file():
        return folder
    owner, attr, stack = layer_stack(teacher)
    kept = torch.nn.ModuleList(stack[i] for i in layers)
    for index, block in enumerate(kept):
        for module in block.modules():  # the KV cache indexes layers by position
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    setattr(owner, attr, kept)
    teacher.config.num_hidden_layers = len(layers)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # A folder of this build's own: two runs of the same teacher started at once build the student side by side
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    teacher.save_pretrained(str(tmp))
    for f in teacher_folder.iterdir():  # the tokenizer's files: the student reads text as its teacher does
        if f.is_file() and f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            shutil.copy2(f, tmp / f.name)
    (tmp / "student.json").write_text(json.dumps({"teacher": str(teacher_folder.resolve()), "layers": layers}))
    if (folder / "config.json").is_file():  # the other build finished first: the same weights, kept
        shutil.rmtree(tmp)
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    try:
        tmp.rename(folder)
    except OSError:  # the other build's rename came in between
        if not (folder / "config.json").is_file():
            raise
        shutil.rmtree(tmp)
    return folder
