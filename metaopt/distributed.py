"""torch.distributed for metaopt runs: the process group, who does what, and the few collectives the runs need.

A run started by ``torchrun`` (or ``metaopt run RECIPE --nproc N``, which starts the same thing through
``torch.distributed.run``) finds ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` in its environment; :func:`session`
then joins the process group with ``gloo`` on CPU or ``nccl`` on CUDA. Without those variables a run is one
process and nothing here communicates: every function below is then the identity or a no-op, so the same code
path serves 1 and N processes.

The division of work (``docs/scaling.md``):

- **meta-training** — the recipe's ``batch_size`` is the *global* meta-batch; rank r computes the meta-gradient
  of its contiguous share of the tasks (:func:`share`) and the shares are combined by one all-reduce of a flat
  buffer (:func:`all_reduce_mean_`), weighted by each share's size, so the update equals the single-process one
  up to float summation order. metaopt reduces explicitly instead of wrapping learners in DDP: a learner is
  trained through ``learner.loss(episode)``, not ``forward``, and MAML-style learners differentiate through
  ``torch.autograd.grad(..., create_graph=True)`` in their inner loop, which DDP's reducer hooks do not support.
- **comparison** — held-out tasks are split over ranks in whole chunks (:func:`share` of the chunks) and the
  predictions gathered, so every number in ``results.json`` is bit-identical to a single-process run's.
- **writing** — rank 0 alone writes the run folder, checkpoints, figures and the W&B run (:func:`is_main`).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "World", "all_gather_objects", "all_reduce_mean_", "backend", "barrier", "threads_per_process", "broadcast_object", "broadcast_parameters",
    "is_main", "launched", "session", "share", "world",
]

logger = logging.getLogger(__name__)

TIMEOUT = datetime.timedelta(minutes=10)
"""How long a collective waits for a peer before failing (a dead rank is normally reported by torchrun first)."""


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes (rank 0 of 1 when not distributed)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """The current process group's rank and size; (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def is_main() -> bool:
    """Whether this process writes (rank 0, or the only process)."""
    return world().is_main


def launched() -> bool:
    """Whether this process was started by torchrun with more than one process in the job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def threads_per_process(threads: int) -> int:
    """A recipe's ``threads`` (the machine's budget) shared by the processes torchrun started on this machine."""
    return max(1, threads // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def backend() -> str:
    """The process group's backend (``none`` for a single process)."""
    return dist.get_backend() if world().size > 1 else "none"


def backend_for(device: torch.device) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def session(device: torch.device | str = "cpu") -> Iterator[World]:
    """Join torchrun's process group for the duration of a run (a no-op for a single process).

    A process group that the caller initialised already is used as it is and left open.
    """
    device = torch.device(device)
    if not launched() or dist.is_initialized():
        yield world()
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), timeout=TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    try:
        current = world()
        logger.debug("rank %d of %d joined (%s)", current.rank, current.size, dist.get_backend())
        yield current
    finally:
        dist.destroy_process_group()


def share(total: int, current: World | None = None) -> slice:
    """Rank r's contiguous share of ``total`` items: sizes differ by at most one, lower ranks first."""
    current = current or world()
    base, extra = divmod(total, current.size)
    start = current.rank * base + min(current.rank, extra)
    return slice(start, start + base + (current.rank < extra))


def all_reduce_mean_(tensors: Sequence[torch.Tensor], weight: float) -> None:
    """Replace each tensor, in place, by the sum over ranks of ``weight * tensor`` (one all-reduce of a flat buffer).

    With ``weight`` = this rank's share of the items, the result is the mean over all items of a quantity
    each rank averaged over its own share. A no-op for a single process (``weight`` is then 1).
    """
    if world().size == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors]).mul_(weight)
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (as DDP does when it wraps a module)."""
    if world().size == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object, e.g. the run folder's path)."""
    if world().size == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (a list of one for a single process)."""
    if world().size == 1:
        return [value]
    gathered: list[Any] = [None] * world().size
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    """Wait for every rank (a no-op for a single process)."""
    if world().size > 1:
        dist.barrier()
