"""Memory that autograd keeps for backward passes, counted with ``torch.autograd.graph.saved_tensors_hooks``.

Every tensor saved for a backward pass goes through the pack hook; storages are counted once however many
tensors view them. This is the meta-gradient's memory proper, on any device and allocator. Process-level
figures were tried and dropped for it: ``tracemalloc`` does not see torch's allocations at all, and the
resident set barely moves while glibc reuses freed memory (``metaopt.allocator.keep_freed_memory``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch


class SavedTensors:
    """Bytes of distinct storages autograd holds for backward passes, now and at the peak.

    Use as ``with torch.autograd.graph.saved_tensors_hooks(tracker.pack, SavedTensors.unpack)``; a storage counts
    from the first save of a view of it until the last such saved tensor is freed (its backward ran or its graph
    was dropped).
    """

    def __init__(self) -> None:
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, saved tensors that view it]
        self.now = self.peak = 0

    def pack(self, tensor: torch.Tensor) -> "_Held":
        return _Held(self, tensor)

    @staticmethod
    def unpack(held: "_Held") -> torch.Tensor:
        return held.tensor


class _Held:
    def __init__(self, owner: SavedTensors, tensor: torch.Tensor) -> None:
        self.owner, self.tensor = owner, tensor
        self.key = tensor.untyped_storage().data_ptr()
        entry = owner.live.setdefault(self.key, [tensor.untyped_storage().nbytes(), 0])
        if entry[1] == 0:
            owner.now += entry[0]
            owner.peak = max(owner.peak, owner.now)
        entry[1] += 1

    def __del__(self) -> None:
        entry = self.owner.live[self.key]
        entry[1] -= 1
        if entry[1] == 0:
            self.owner.now -= entry[0]
            del self.owner.live[self.key]


def peak_saved_mib(fn: Callable[[], Any]) -> float:
    """The peak MiB of distinct storages that autograd holds for backward passes while ``fn()`` runs."""
    tracker = SavedTensors()
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, SavedTensors.unpack):
        fn()
    return tracker.peak / 2**20


def saved_megabytes(fn: Callable[[], Any]) -> float:
    """MiB of every distinct storage saved for backward during ``fn()``, whether or not still held (for a single
    forward and backward pass: the graph's memory)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20
