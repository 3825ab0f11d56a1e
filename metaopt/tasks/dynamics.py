"""Trajectories of random linear dynamical systems (von Oswald et al. 2023, "Uncovering
mesa-optimization algorithms in Transformers")."""

from __future__ import annotations

from functools import partial

import torch

from metaopt.checks import integer, non_negative_float, optional, positive_int
from metaopt.episodes import Episode
from metaopt.tasks.base import TaskFamily
from metaopt.tasks.function_classes import split_episode
from metaopt.tasks.regression import random_orthogonal


class LinearDynamics(TaskFamily):
    """s_{t+1} = W* s_t + noise · ε_t with W* random orthogonal per task and s_1 ~ U(−1, 1)^d.

    A task is one trajectory: the support pairs are the transitions (s_t, s_{t+1}) for t = 1..S and the
    queries the next Q transitions, so ``x`` and ``y`` are both ``[T, N, d]`` (vector targets) and a
    learner predicts each next state from the ones before. ``length`` (optional) is the most states a
    trajectory may have: sampling needs S + Q + 1 <= length. ``info``: ``W`` ``[T, d, d]``.
    """

    kind = "regression"

    @classmethod
    def example(cls) -> "LinearDynamics":
        return cls(dim=2)

    def __init__(self, dim: int, length: int | None = None, noise: float = 0.01) -> None:
        self.dim = positive_int("dim", dim, owner="LinearDynamics")
        self.length = optional(partial(integer, low=2), "length", length, owner="LinearDynamics")
        self.noise = non_negative_float("noise", noise, owner="LinearDynamics")

    @property
    def error_scale(self) -> float:
        """E[s_{t,i}²] = 1/3 of the U(−1, 1) start (W* preserves norms; the small noise is neglected)."""
        return 1.0 / 3.0

    @property
    def task_values(self) -> int:
        return 3 * self.dim * self.dim

    @property
    def example_values(self) -> int:
        return 4 * self.dim

    def _sample(self, num_tasks: int, support: int, query: int, generator: torch.Generator) -> Episode:
        steps = support + query
        if self.length is not None and steps + 1 > self.length:
            raise ValueError(
                f"LinearDynamics(length={self.length}): support + query + 1 states are needed, at most "
                f"{self.length}; got support={support}, query={query}"
            )
        w = random_orthogonal(num_tasks, self.dim, generator)
        states = [2 * torch.rand(num_tasks, self.dim, generator=generator) - 1]
        noise = self.noise * torch.randn(steps, num_tasks, self.dim, generator=generator)
        for t in range(steps):  # the recurrence is sequential in time; every task steps at once
            states.append(torch.einsum("tij,tj->ti", w, states[-1]) + noise[t])
        s = torch.stack(states, dim=1)  # [T, steps + 1, d]
        return split_episode(s[:, :-1], s[:, 1:], support, {"W": w})


__all__ = ["LinearDynamics"]
