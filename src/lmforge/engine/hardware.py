"""Device, precision and the matmul roof that MFU is measured against."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import platform
import sys
import time
from typing import Optional

import torch

from lmforge.errors import LmforgeError
from lmforge.paths import cache_root


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


REFRESH_ROOF_ENV = "LMFORGE_REFRESH_ROOF"  # set to 1 to measure the matmul roof again (e.g. on a quiet machine)


def _machine(device: str) -> str:
    """What the roof depends on: the processor (or GPU), the threads torch uses and torch's version."""
    if device == "cuda":
        chip = torch.cuda.get_device_name()
    else:
        chip = platform.machine()
        try:
            chip = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return f"{chip} | {os.cpu_count()} cpus | {torch.get_num_threads()} threads | torch {torch.__version__}"


@functools.lru_cache(maxsize=None)
def matmul_roof(device: str = "cpu", precision: str = "fp32", seconds: float = 0.3) -> float:
    """Peak FLOP/s of a large square matmul on this machine (the MFU denominator), measured once and cached in
    `$LMFORGE_CACHE/roof.json`: a roof measured again by every run costs each start-up its time, and one measured while
    other jobs share the cores reads low (an MFU logged against it reads high)."""
    precision = "fp32" if device == "cpu" else precision  # CPU runs are fp32
    key = f"{device} {precision} | {_machine(device)}"
    path = cache_root() / "roof.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known and os.environ.get(REFRESH_ROOF_ENV, "0") in ("", "0"):
        return float(known[key])
    known[key] = measure_matmul_roof(device, precision, seconds)
    try:  # a read-only home or a full disk costs only the cache
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".roof.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(path)
    except OSError:
        pass
    return known[key]


def measure_matmul_roof(device: str, precision: str, seconds: float) -> float:
    n = 1024 if device == "cpu" else 8192
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
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
