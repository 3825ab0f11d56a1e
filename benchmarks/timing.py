"""Wall-clock timing helpers shared by the benchmarks (CUDA work is waited for, so times are the device's)."""

from __future__ import annotations

import time
from typing import Callable

import torch


def synchronize() -> None:
    """Wait for queued CUDA work, if CUDA is in use in this process (a no-op on CPU-only runs)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def best_of(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """The fastest of ``repeats`` timed calls, in seconds (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_gflops(size: int = 1024, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """This machine's matmul rate (2·n³ flops per product) with the current thread count, in GFLOP/s."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    return 2 * size**3 / best_of(lambda: a @ b, repeats=5) / 1e9
