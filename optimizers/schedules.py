"""Learning-rate schedules: functions from the step count (an integer tensor, 0 at the first update) to a value.

Values are computed in float64 with tensor operations only (no Python branching on the count), so a schedule
runs under ``torch.func.vmap`` and its tensor-valued arguments (a learned peak rate) receive gradients.
Schedules compose with :func:`join_schedules`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from optimizers._checks import check_hyperparameter, non_negative_int, positive_int
from optimizers.base import Scalar, Schedule

__all__ = [
    "constant_schedule",
    "cosine_decay_schedule",
    "join_schedules",
    "linear_schedule",
    "warmup_cosine_decay_schedule",
]


def _steps(count: Tensor | int) -> Tensor:
    return torch.as_tensor(count).to(torch.float64)


def constant_schedule(value: Scalar) -> Schedule:
    """``value`` at every step."""
    check_hyperparameter("value", value)

    def schedule(count: Tensor) -> Tensor:
        return torch.zeros_like(_steps(count)) + value

    return schedule


def linear_schedule(
    init_value: Scalar, end_value: Scalar, transition_steps: int, *, transition_begin: int = 0
) -> Schedule:
    """Hold ``init_value`` until ``transition_begin``, go linearly to ``end_value`` over ``transition_steps``, hold.

    ``v(t) = init + (end - init) * clip((t - begin) / transition_steps, 0, 1)``; a linear warm-up is
    ``linear_schedule(0.0, peak, warmup_steps)``.
    """
    check_hyperparameter("init_value", init_value)
    check_hyperparameter("end_value", end_value)
    positive_int("transition_steps", transition_steps, owner="linear_schedule")
    non_negative_int("transition_begin", transition_begin, owner="linear_schedule")

    def schedule(count: Tensor) -> Tensor:
        frac = ((_steps(count) - transition_begin) / transition_steps).clamp(0.0, 1.0)
        return init_value + (end_value - init_value) * frac

    return schedule


def cosine_decay_schedule(init_value: Scalar, decay_steps: int, *, end_value: Scalar = 0.0) -> Schedule:
    """Cosine annealing (Loshchilov & Hutter 2017, SGDR) from ``init_value`` to ``end_value``, then constant.

    ``v(t) = end + (init - end) * (1 + cos(pi * min(t, T) / T)) / 2`` with ``T = decay_steps``; the closed form
    of ``torch.optim.lr_scheduler.CosineAnnealingLR`` over its first half-period.
    """
    check_hyperparameter("init_value", init_value)
    check_hyperparameter("end_value", end_value)
    positive_int("decay_steps", decay_steps, owner="cosine_decay_schedule")

    def schedule(count: Tensor) -> Tensor:
        frac = _steps(count).clamp(max=decay_steps) / decay_steps
        return end_value + (init_value - end_value) * 0.5 * (1.0 + torch.cos(math.pi * frac))

    return schedule


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Run ``schedules[i]`` from ``boundaries[i-1]`` (0 for the first) on, each seeing its own count from 0.

    All pieces are evaluated and selected with ``torch.where``, so the join stays vmap-friendly.
    """
    if len(schedules) != len(boundaries) + 1:
        raise ValueError(
            f"join_schedules got {len(schedules)} schedules and {len(boundaries)} boundaries; "
            "expected exactly one boundary between consecutive schedules"
        )
    for i, b in enumerate(boundaries):
        positive_int(f"boundaries[{i}]", b, owner="join_schedules")
    if list(boundaries) != sorted(set(boundaries)):
        raise ValueError(f"boundaries must be strictly increasing; got {list(boundaries)!r}")

    def schedule(count: Tensor) -> Tensor:
        steps = _steps(count)
        value = torch.as_tensor(schedules[0](steps))
        for start, piece in zip(boundaries, schedules[1:]):
            value = torch.where(steps >= start, torch.as_tensor(piece(steps - start)), value)
        return value

    return schedule


def warmup_cosine_decay_schedule(
    peak_value: Scalar, warmup_steps: int, decay_steps: int, *, init_value: Scalar = 0.0, end_value: Scalar = 0.0
) -> Schedule:
    """Linear warm-up from ``init_value`` to ``peak_value`` over ``warmup_steps``, then cosine decay to ``end_value``.

    ``decay_steps`` counts the whole schedule, warm-up included (as in optax).
    """
    positive_int("warmup_steps", warmup_steps, owner="warmup_cosine_decay_schedule")
    if positive_int("decay_steps", decay_steps, owner="warmup_cosine_decay_schedule") <= warmup_steps:
        raise ValueError(
            f"warmup_cosine_decay_schedule: decay_steps must be an int > warmup_steps={warmup_steps}; "
            f"got {decay_steps!r}"
        )
    return join_schedules(
        [
            linear_schedule(init_value, peak_value, warmup_steps),
            cosine_decay_schedule(peak_value, decay_steps - warmup_steps, end_value=end_value),
        ],
        [warmup_steps],
    )
