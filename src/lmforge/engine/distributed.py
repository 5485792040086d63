"""torchrun-aware helpers: the same code runs in one process or many (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as tdist


def world_size() -> int:
    return tdist.get_world_size() if tdist.is_initialized() else 1


def rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def setup(device_type: str, timeout_s: Optional[float] = None) -> torch.device:
    """Join the process group when started by torchrun; return this process's device. A collective that waits
    longer than `timeout_s` for the other processes (one died or hangs) raises instead of waiting forever."""
    if launched_by_torchrun() and not tdist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        local = int(os.environ.get("LOCAL_RANK", 0))
        if device_type == "cuda":
            torch.cuda.set_device(local)
        timeout = timedelta(seconds=timeout_s) if timeout_s else None
        tdist.init_process_group(backend=backend, timeout=timeout)
    if device_type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if tdist.is_initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if tdist.is_initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t


def lost_peer(err: BaseException) -> bool:
    """Whether `err` is a collective that failed because another process died (its connection closed) or stalled
    past the process group's timeout."""
    signs = ("gloo", "NCCL", "Timed out", "Connection closed", "Connection reset")
    return world_size() > 1 and (isinstance(err, tdist.DistError) or any(s in str(err) for s in signs))


def teardown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()
