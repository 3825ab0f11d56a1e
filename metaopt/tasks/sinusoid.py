"""Sinusoid regression, the few-shot regression benchmark of MAML (Finn et al. 2017, §5.1)."""

from __future__ import annotations

import math

import torch

from metaopt.checks import interval, non_negative_float
from metaopt.episodes import Episode
from metaopt.tasks.base import TaskFamily


class Sinusoid(TaskFamily):
    """``y = A sin(x − φ)`` with ``A ~ U(amplitude)``, ``φ ~ U(phase)`` per task and ``x ~ U(x_range)`` per point.

    Defaults are Finn et al.'s: amplitude in [0.1, 5], phase in [0, π], x in [−5, 5], no label noise.
    ``info`` holds each task's ``amplitude`` and ``phase`` (``[T]``). Sampling is one batched draw per tensor.
    """

    kind = "regression"

    def __init__(
        self,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        noise_std: float = 0.0,
    ) -> None:
        self.amplitude = interval("amplitude", amplitude, owner="Sinusoid", low_bound=0.0)
        self.phase = interval("phase", phase, owner="Sinusoid")
        self.x_range = interval("x_range", x_range, owner="Sinusoid")
        self.noise_std = non_negative_float("noise_std", noise_std, owner="Sinusoid")

    @property
    def error_scale(self) -> float:
        """E[y²] = E[A²]/2 over uniform amplitudes (x spans whole periods on average): the zero predictor's error."""
        low, high = self.amplitude
        return (low * low + low * high + high * high) / 6.0

    @property
    def task_values(self) -> int:
        return 2

    @property
    def example_values(self) -> int:
        return 3

    def _sample(self, num_tasks: int, support: int, query: int, generator: torch.Generator) -> Episode:
        def uniform(shape: tuple[int, ...], interval: tuple[float, float]) -> torch.Tensor:
            low, high = interval
            return low + (high - low) * torch.rand(shape, generator=generator)

        amplitude, phase = uniform((num_tasks,), self.amplitude), uniform((num_tasks,), self.phase)
        x = uniform((num_tasks, support + query, 1), self.x_range)
        y = amplitude[:, None, None] * torch.sin(x - phase[:, None, None])
        if self.noise_std > 0:
            y = y + self.noise_std * torch.randn(y.shape, generator=generator)
        return Episode(
            x_support=x[:, :support], y_support=y[:, :support], x_query=x[:, support:], y_query=y[:, support:],
            kind="regression", info={"amplitude": amplitude, "phase": phase},
        )


__all__ = ["Sinusoid"]
