"""A LayerwiseMixture's in-place step as one compiled pass over memory (``optimizer(compile=True)``).

Eagerly, each base direction runs its own in-place kernel, so a five-direction mixture walks every parameter,
gradient and state tensor five times (1.9x the time of ``torch.optim.Adam(foreach=True)`` on a 1M-parameter
MLP). Compiled, the directions' pure updates, their weighted sum and the writes of parameters and states fuse
into one loop per tensor (inductor), which reads and writes each tensor about once: about Adam's own time
(``benchmarks/bench_optimizers.py``). Compiling takes seconds at the first step (and again for new shapes); it
needs inductor's backend for the device (a C++ compiler on CPU). When compiling fails, the eager step runs from
then on, with one logged warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from optimizers.base import GradientTransformation, OptState, Params

__all__ = ["FusedMix"]

log = logging.getLogger(__name__)


def _mix_(directions: Sequence[GradientTransformation], targets: Params, grads: Params, states: Sequence[OptState],
          params: Params, step: Tensor, scales: Tensor, rows: Sequence[int]) -> None:
    """``targets[k] += scales[i] · Σ_b step[rows[i], b] · d_b[k]`` for the ``i``-th key ``k`` of ``targets`` (those
    with a gradient; ``grads`` holds None for the others), and each direction's state advanced in place: the
    directions' pure updates, written back."""
    outs = [direction.update(grads, state, params) for direction, state in zip(directions, states)]
    for i, k in enumerate(targets):
        total = step[rows[i], 0] * outs[0][0][k]
        for b in range(1, len(outs)):
            total = total + step[rows[i], b] * outs[b][0][k]
        targets[k].add_((total * scales[i]).to(targets[k].dtype))
    for state, (_, new_state) in zip(states, outs):
        for old, new in zip(state, new_state):  # each field of the state: a tree {name: tensor}
            for k, tensor in new.items():
                if tensor is not None and old[k] is not tensor:
                    old[k].copy_(tensor)


class FusedMix:
    """The compiled step of one mixture optimizer; ``__call__`` returns False (run the eager step) once compiling
    has failed."""

    def __init__(self, directions: Sequence[GradientTransformation]) -> None:
        self.directions = list(directions)
        self.compiled: Callable[..., None] | None = torch.compile(_mix_, fullgraph=True)  # one graph: all or nothing

    def __call__(self, targets: Params, grads: Params, states: Sequence[OptState], params: Params, step: Tensor,
                 scales: Sequence[float], rows: Sequence[int]) -> bool:
        if self.compiled is None:
            return False
        try:
            self.compiled(self.directions, targets, grads, states, params, step,
                          torch.tensor(list(scales), dtype=step.dtype, device=step.device), list(rows))
        except (RuntimeError, torch._dynamo.exc.TorchDynamoException) as error:
            log.warning("compiling the LayerwiseMixture step failed (%s); running it eagerly from now on",
                        str(error).splitlines()[0] if str(error) else type(error).__name__)
            self.compiled = None
            return False
        return True
