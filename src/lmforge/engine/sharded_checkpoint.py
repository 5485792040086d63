"""Sharded checkpoints with torch.distributed.checkpoint (DCP), written when `dist.strategy` is fsdp.

    checkpoints/step-000100/
        .metadata  __0_0.distcp  __1_0.distcp   # model + optimizer: each process writes its own shards
        trainer_state.pt                          # step, RNG, best metric (weights_only), from process 0

Every process writes into the hidden `.step-000100.tmp`; after a barrier, process 0 adds the trainer state,
flushes the folder and renames it into place: the same atomic rename as the one-file checkpoints, so the
latest `step-*` folder is always complete. DCP reshards on load: a checkpoint written by N processes loads
into M, or into one unsharded process. Frozen parameters (a LoRA run's base model) are left out; they come back
unchanged from the base model. The folder must be on a file system every process sees.
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from lmforge.engine import distributed as dist
from lmforge.engine.checkpoint import STATE_FILE, fsync_tree, move_into_place, temporary_folder
from lmforge.errors import LmforgeError

METADATA = ".metadata"
OPTIONS = StateDictOptions(ignore_frozen_params=True)


@contextlib.contextmanager
def _one_process_is_fine() -> Iterator[None]:
    """DCP warns on every save and load without a process group; one process is an intended case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def is_sharded(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / METADATA).exists() or any(folder.glob("*.distcp"))


def save_sharded(root: Path, step: int, model, optimizer, state: dict) -> Path:
    """Every process: write this process's shards of the model and optimizer; process 0 adds `state` (torch.save)
    and renames the finished folder into place. Returns the checkpoint folder."""
    target = Path(root) / f"step-{step:06d}"
    tmp = temporary_folder(target)
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer, options=OPTIONS)
    with _one_process_is_fine():
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp, no_dist=dist.world_size() == 1)
    dist.barrier()  # every shard is on the disk before the folder becomes the latest checkpoint
    if dist.is_main():
        torch.save(state, tmp / STATE_FILE)
        fsync_tree(tmp)
        move_into_place(tmp, target)
    dist.barrier()
    return target


def check_complete(folder: Path) -> None:
    """Refuse, by name, a checkpoint whose metadata or one of whose shard files is missing or cut short."""
    folder = Path(folder)
    if not (folder / METADATA).is_file():
        raise LmforgeError(f"{folder}: incomplete sharded checkpoint: '{METADATA}' is missing (process 0 writes "
                           "it once every shard is saved); resume from an earlier checkpoint")
    needed: dict[str, int] = {}
    for info in FileSystemReader(str(folder)).read_metadata().storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    bad = [name for name, size in sorted(needed.items())
           if not (folder / name).is_file() or (folder / name).stat().st_size < size]
    if bad:
        raise LmforgeError(f"{folder}: incomplete sharded checkpoint: shard file {', '.join(bad)} missing or cut "
                           f"short (__R_*.distcp is written by process R); resume from an earlier checkpoint")


def load_sharded(folder: Path, model, optimizer) -> None:
    """Every process: load its part of the model and optimizer state, whatever process count wrote them."""
    check_complete(folder)
    model_state, optim_state = get_state_dict(model, optimizer, options=OPTIONS)
    state = {"model": model_state, "optimizer": optim_state}
    with _one_process_is_fine():
        dcp.load(state, checkpoint_id=folder, no_dist=dist.world_size() == 1)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=OPTIONS)
