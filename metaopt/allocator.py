"""Keep large CPU allocations in glibc's heap, so that every step reuses the memory the previous one freed.

glibc serves an allocation above its mmap threshold (128 KiB, raised automatically up to 32 MiB) with fresh
pages from the kernel and unmaps them again on free. A meta-step whose activations are larger than that,
such as MAML's task-folded convolutions (``metaopt/learners/task_folding.py``: ~120 MB per layer for 16 tasks),
then pays a page fault and the zeroing of every page in every step: on a 2-core CPU that was a fifth of the
meta-step (``benchmarks/bench_maml.py``). Raising the threshold and the heap's trim threshold keeps freed memory
for reuse, as the allocators PyTorch's CPU tuning guide recommends (jemalloc, tcmalloc) do.

The cost is memory: the process keeps its peak heap rather than returning it to the system. The CLI and
the benchmarks turn it on; set ``METAOPT_MALLOC_TUNING=0`` to keep glibc's defaults. In your own scripts, call
:func:`keep_freed_memory` once at start-up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1


def keep_freed_memory(mmap_threshold: int = 1 << 30) -> bool:
    """Ask glibc's malloc to serve allocations below ``mmap_threshold`` bytes from its heap and never trim it.

    Returns whether the settings took effect: False off Linux/glibc, when glibc refuses them, or when the
    environment variable ``METAOPT_MALLOC_TUNING`` is ``0``.
    """
    if os.environ.get("METAOPT_MALLOC_TUNING", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    threshold = min(int(mmap_threshold), _INT_MAX)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
