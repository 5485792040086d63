"""Device, precision and the matmul roof that MFU is measured against."""

from __future__ import annotations

import contextlib
import functools
import time

import torch


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        from lmforge.errors import LmforgeError
        raise LmforgeError("train.device: 'cuda' was asked for but no CUDA device is available")
    return requested


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
