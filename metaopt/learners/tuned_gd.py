"""Explicit GD baselines for the in-context reproductions: GD++ steps, and GD / GD++ tuned on held-out tasks.

- ``GDPlusPlus``: von Oswald et al.'s GD++ as an explicit algorithm (the counterpart of
  ``LinearSelfAttention.from_gdpp``): each step takes a GD step on the residuals, then preconditions
  every input ``x ← (I − γ XᵀX / k) x``.
- ``TunedGradientDescent``: ``GradientDescent(steps, lr)`` with the lr from a grid that fits held-out
  tasks of a family best (the "best GD step" a trained linear self-attention layer is compared with).
- ``TunedGDPlusPlus``: ``GDPlusPlus`` with (lr, γ) chosen the same way.

The tuned learners tune lazily on their first forward pass (or an explicit ``tune()``) on episodes of
their own family and seed, like ``TunedRidge``, so a recipe needs no separate tuning step.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch

from metaopt.checks import non_negative_float, positive_int, sequence_of
from metaopt.episodes import Episode
from metaopt.learners.base import Example, Learner
from metaopt.learners.ridge_variants import TUNING_SEED, HeldOutTuning
from metaopt.learners.solvers import GradientDescent, LinearSolver
from metaopt.tasks.base import TaskFamily
from metaopt.tasks.regression import LinearRegression

DEFAULT_LRS = tuple(round(10 ** (e / 40), 5) for e in range(-80, 81))  # 0.01 .. 100, 40 per decade
DEFAULT_GAMMAS = (0.0,) + tuple(round(10 ** (e / 8), 5) for e in range(-16, 9))  # 0, then 0.01 .. 10
GDPP_LRS = DEFAULT_LRS[::2]  # 20 per decade: the (lr, γ) grid stays ~2000 pairs


class GDPlusPlus(Learner):
    """``steps`` of GD++ from w = 0 (von Oswald et al. 2023): a GD step, then preconditioned inputs.

    Step: with residuals ``r`` (initially y), ``g = Xᵀ r / k``; ``ŷ_q += lr x_qᵀ g``; ``r ← r − lr X g``;
    then ``X ← X (I − γ XᵀX / k)`` and the queries likewise. ``gamma = 0`` is plain GD. Equals
    ``LinearSelfAttention.from_gdpp(d, lr, gamma, layers=steps)``. Not a ``LinearSolver``: the
    preconditioning also moves the queries, so the prediction is not ``x_q`` times one weight vector.
    """

    kinds = ("regression",)

    def __init__(self, steps: int = 1, lr: float = 0.1, gamma: float = 0.0) -> None:
        super().__init__()
        self.steps = positive_int("steps", steps, owner="GDPlusPlus")
        self.lr = non_negative_float("lr", lr, owner="GDPlusPlus")
        self.gamma = non_negative_float("gamma", gamma, owner="GDPlusPlus")

    def forward(self, episode: Episode) -> torch.Tensor:
        self.check_episode(episode)
        x, r = episode.x_support.flatten(2), episode.y_support.flatten(2)  # [T, k, D], [T, k, M]
        xq = episode.x_query.flatten(2)  # [T, Q, D]
        k = x.shape[1]
        prediction = xq.new_zeros(*xq.shape[:2], r.shape[-1])
        if k == 0:
            return prediction.reshape(episode.y_query.shape)
        for _ in range(self.steps):
            g = x.transpose(1, 2) @ r / k  # [T, D, M]
            prediction = prediction + self.lr * xq @ g
            r = r - self.lr * x @ g
            precondition = x.transpose(1, 2) @ x / k  # [T, D, D], symmetric
            x, xq = x - self.gamma * x @ precondition, xq - self.gamma * xq @ precondition
        return prediction.reshape(episode.y_query.shape)

    def extra_repr(self) -> str:
        return f"steps={self.steps}, lr={self.lr:.4g}, gamma={self.gamma:.4g}"


class TunedGradientDescent(LinearSolver):
    """``steps`` of GD with the lr from ``lrs`` that fits held-out tasks of ``family`` best.

    Args:
        family: the task family to tune on (in a recipe, ``family: ${task}`` builds the recipe's own).
        steps: GD steps from w = 0.
        lrs: candidate step sizes (update ``w ← w − lr (1/k) Xᵀ(Xw − y)``).
        support: support size(s) to tune at; with several, each k uses the lr of the nearest one.
        num_tasks, query, seed: the held-out tuning episodes.
    """

    @classmethod
    def example(cls) -> Example:
        family = LinearRegression(dim=3)
        return Example(cls(family, lrs=(0.1, 0.5), support=5, num_tasks=8, query=2), family)

    def __init__(
        self, family: TaskFamily, steps: int = 1, lrs: Sequence[float] = DEFAULT_LRS,
        support: int | Sequence[int] = 10, num_tasks: int = 2000, query: int = 10, seed: int = TUNING_SEED,
    ) -> None:
        super().__init__()
        self.steps = positive_int("steps", steps, owner="TunedGradientDescent")
        self.lrs = sequence_of("lrs", lrs, non_negative_float, owner="TunedGradientDescent")
        self.tuning = HeldOutTuning(family, support, num_tasks, query, seed, "TunedGradientDescent")
        self.chosen: dict[int, float] = {}

    def tune(self) -> dict[int, float]:
        """Choose the lr on the held-out episodes; returns {tuning support size: lr}."""
        best = self.tuning.best([GradientDescent(self.steps, lr) for lr in self.lrs])
        self.chosen = {k: self.lrs[i] for k, i in best.items()}
        return self.chosen

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.chosen:
            self.tune()
        return GradientDescent(self.steps, self.chosen[self.tuning.nearest(x.shape[1])]).fit(x, y)

    def extra_repr(self) -> str:
        return f"steps={self.steps}, chosen={self.chosen or 'not tuned yet'}"


class TunedGDPlusPlus(Learner):
    """``GDPlusPlus(steps)`` with the (lr, γ) grid pair that fits held-out tasks of ``family`` best.

    Arguments as ``TunedGradientDescent``, with ``lrs`` × ``gammas`` as the grid.
    """

    kinds = ("regression",)

    @classmethod
    def example(cls) -> Example:
        family = LinearRegression(dim=3)
        return Example(cls(family, lrs=(0.1, 0.5), gammas=(0.0, 0.1), support=5, num_tasks=8, query=2), family)

    def __init__(
        self, family: TaskFamily, steps: int = 1, lrs: Sequence[float] = GDPP_LRS,
        gammas: Sequence[float] = DEFAULT_GAMMAS, support: int | Sequence[int] = 10, num_tasks: int = 2000,
        query: int = 10, seed: int = TUNING_SEED,
    ) -> None:
        super().__init__()
        self.steps = positive_int("steps", steps, owner="TunedGDPlusPlus")
        lrs = sequence_of("lrs", lrs, non_negative_float, owner="TunedGDPlusPlus")
        gammas = sequence_of("gammas", gammas, non_negative_float, owner="TunedGDPlusPlus")
        self.candidates = [GDPlusPlus(self.steps, lr, g) for lr, g in itertools.product(lrs, gammas)]
        self.tuning = HeldOutTuning(family, support, num_tasks, query, seed, "TunedGDPlusPlus")
        self.chosen: dict[int, tuple[float, float]] = {}

    def tune(self) -> dict[int, tuple[float, float]]:
        """Choose (lr, γ) on the held-out episodes; returns {tuning support size: (lr, γ)}."""
        best = self.tuning.best(self.candidates)
        self.chosen = {k: (self.candidates[i].lr, self.candidates[i].gamma) for k, i in best.items()}
        return self.chosen

    def forward(self, episode: Episode) -> torch.Tensor:
        self.check_episode(episode)
        if not self.chosen:
            self.tune()
        lr, gamma = self.chosen[self.tuning.nearest(episode.num_support)]
        return GDPlusPlus(self.steps, lr, gamma)(episode)

    def extra_repr(self) -> str:
        return f"steps={self.steps}, chosen={self.chosen or 'not tuned yet'}"


__all__ = ["GDPlusPlus", "TunedGradientDescent", "TunedGDPlusPlus", "DEFAULT_LRS", "DEFAULT_GAMMAS", "GDPP_LRS"]
