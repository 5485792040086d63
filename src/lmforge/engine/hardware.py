"""Device, precision and the matmul roof that MFU is measured against."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import time
from typing import Optional

import torch

from lmforge.errors import LmforgeError


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise LmforgeError("train.device: 'cuda' was asked for but no CUDA device is available")
    return requested


# glibc's mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_FREED_MEMORY_ENV = "LMFORGE_KEEP_FREED_MEMORY"


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """Let the process keep the memory a training step frees, to reuse at the next step.

    glibc serves every allocation above its mmap threshold (128 KiB at start) with fresh pages from
    the kernel and hands them back when it is freed. A CPU training step frees and re-allocates the same
    activation buffers at every step, so each step page-faults and zeroes them all again: about 1,000
    faults a step for a 4-layer, 128-wide GPT-2 at batch 12, several percent of the step. Raising the
    mmap and trim thresholds makes freed blocks stay in the heap, where the next step finds them. The
    cost is that the process keeps its peak memory until it exits, which a training run reaches at every
    step anyway.

    Linux with glibc only (a no-op elsewhere); `LMFORGE_KEEP_FREED_MEMORY=0` turns it off. Returns
    whether it applied.
    """
    if not sys.platform.startswith("linux") or os.environ.get(KEEP_FREED_MEMORY_ENV, "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Older glibc caps the mmap threshold at 32 MiB; newer ones take 1 GiB.
    if not any(mallopt(_M_MMAP_THRESHOLD, limit) for limit in (1 << 30, 32 << 20)):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def pick_precision(requested: str, device: str) -> str:
    if requested == "auto":
        return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return requested


def autocast(device: str, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device, dtype=dtype)


@functools.lru_cache(maxsize=None)
def matmul_roof(device: str = "cpu", precision: str = "fp32", seconds: float = 0.3) -> float:
    """Measured peak FLOP/s of a large square matmul (the MFU denominator)."""
    n = 1024 if device == "cpu" else 8192
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if device == "cpu":
        dtype = torch.float32  # CPU runs are fp32 (bf16 matmul is ~100x slower on typical CPUs)
    gen = torch.Generator(device=device).manual_seed(0)  # never touch the global RNG (exact resume)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while True:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t))
        if time.perf_counter() > deadline:
            return best


def threads_note(asked: Optional[int], device_type: str) -> str:
    """How many CPU threads the run uses and why, for its first line: on a machine shared with other jobs,
    torch's default (one per core) can run several times slower per step than `train.threads: 1`."""
    if device_type != "cpu":
        return ""
    why = "train.threads" if asked else "torch's default, one per core; set train.threads on a shared machine"
    return f", {torch.get_num_threads()} CPU threads ({why})"
