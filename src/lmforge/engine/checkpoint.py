"""Checkpoints in Hugging Face format plus the training state needed for exact resume.

    checkpoints/step-000100/
        config.json  model.safetensors  tokenizer files   # loads with AutoModelFor*.from_pretrained
        trainer_state.pt                                  # optimizer, step, RNG, best metric (weights_only)

A checkpoint is written to a temporary folder, flushed to the disk and renamed into place (the parent folder is
flushed after the rename), so neither a crash nor a power loss leaves a half-written checkpoint as the latest one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from lmforge.errors import LmforgeError, disk_full_is_an_error

STATE_FILE = "trainer_state.pt"
STEP_DIR = re.compile(r"^step-(\d+)$")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file of `folder`, then the folder itself, to the disk (a rename is only as durable as this)."""
    for path in folder.rglob("*"):
        if path.is_file():
            _fsync(path)
    for path in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _fsync(path)
    _fsync(folder)


def _state_bytes(model, extra: Optional[dict]) -> int:
    """About what a checkpoint takes on disk: the model's tensors plus those of the extra state."""
    def tensors(obj):
        if torch.is_tensor(obj):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from tensors(v)
    return sum(t.numel() * t.element_size() for t in tensors([model.state_dict(), extra or {}]))


def save_model(folder: Path, model, tokenizer, extra: Optional[dict] = None) -> None:
    """Write model (+ tokenizer, + json files) to `folder` atomically and durably: everything goes to a
    temporary folder that is flushed to the disk and then renamed into place, and the parent is flushed after
    the rename. A full disk is one error naming the folder, with the temporary folder removed."""
    folder = Path(folder)
    tmp = temporary_folder(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with disk_full_is_an_error(folder, _state_bytes(model, extra)):
            tmp.mkdir(parents=True)
            model.save_pretrained(str(tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            for name, payload in (extra or {}).items():
                if name.endswith(".json"):
                    (tmp / name).write_text(json.dumps(payload, indent=2))
                else:
                    torch.save(payload, tmp / name)
            fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    move_into_place(tmp, folder)


def temporary_folder(folder: Path) -> Path:
    """Where `folder` is written before it is renamed into place (a hidden sibling)."""
    return folder.with_name(f".{folder.name}.tmp")


def move_into_place(tmp: Path, folder: Path) -> None:
    """Rename the finished, flushed `tmp` to `folder` (an older `folder` is swapped out first and removed last);
    the parent is flushed after the rename, so a crash leaves the old folder or the new one."""
    old = folder.with_name(f".{folder.name}.old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    _fsync(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainer_state(train_state: dict, scaler=None, optimizer=None, objective: Optional[dict] = None) -> dict:
    """What resuming needs beside the weights: the loop's state, the RNG, the loss scaler, the objective's own
    weights if it has any and, for one-file checkpoints, the optimizer (sharded checkpoints hold it in their
    shards)."""
    state = {"train_state": train_state, "rng": rng_state()}
    if objective is not None:
        state["objective"] = objective
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    return state


def save_checkpoint(root: Path, step: int, model, tokenizer, optimizer, train_state: dict,
                    scaler=None, objective: Optional[dict] = None) -> Path:
    state = trainer_state(train_state, scaler, optimizer, objective)
    target = Path(root) / f"step-{step:06d}"
    save_model(target, model, tokenizer, {STATE_FILE: state})
    return target


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))
             and (p / STATE_FILE).is_file()]
    return sorted(found)


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def prune_checkpoints(root: Path, keep_last: int) -> None:
    for _, path in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def load_state(folder: Path) -> dict:
    # weights_only: a checkpoint can never execute code on load.
    return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)


def load_weights(model, folder: Path, device="cpu") -> None:
    """Load a saved model (model.safetensors) or peft adapter (adapter_model.safetensors) into `model`."""
    folder = Path(folder)
    if hasattr(model, "load_folder"):  # composite models (ELECTRA) load their parts
        model.load_folder(folder, device)
        return
    if (folder / "adapter_model.safetensors").is_file():
        from peft import set_peft_model_state_dict  # peft is imported only for adapter checkpoints
        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors"), device=str(device)))
        return
    weights = load_file(str(folder / "model.safetensors"), device=str(device))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # A tied weight is saved once: a missing key is fine when it shares storage with a loaded one.
    tensors = model.state_dict(keep_vars=True)
    loaded = {tensors[k].data_ptr() for k in weights if k in tensors}
    missing = [m for m in missing if tensors[m].data_ptr() not in loaded]
    if unexpected or missing:
        raise LmforgeError(f"{folder}: checkpoint does not match the model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
