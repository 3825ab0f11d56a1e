"""The two collective operations the estimators need, on ``torch.distributed``'s default process group.

Kept here, torch-only, so that ``optimizers`` stays a leaf package; with no process group (or a group of one)
both are no-ops and nothing is communicated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum_(tensors: Sequence[Tensor]) -> None:
    """Sum every tensor over the ranks, in place, with one ``all_reduce`` of a single flat buffer.

    The buffer has the promoted dtype of the tensors (float64 if any is), so float32 values are summed in float64
    and rounded once when copied back. On the NCCL backend a CPU buffer is moved to the current CUDA device for the
    reduction. A no-op on one process.
    """
    if world()[1] == 1 or not tensors:
        return
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    device = tensors[0].device
    if device.type == "cpu" and dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    buffer = torch.cat([t.detach().reshape(-1).to(device=device, dtype=dtype) for t in tensors])
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        t.copy_(buffer[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
