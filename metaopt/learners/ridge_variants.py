"""The ridge-regression baselines of Vladymyrov et al. 2024 for mixed-noise linear regression.

- ``TunedRidge`` (ConstRR): one λ for every task, chosen on held-out tasks of a family.
- ``AdaptiveRidge`` (AdaRR): λ = σ̂² estimated from each task's least-squares residuals.
- ``TunedAdaptiveRidge`` (TunedRR): AdaRR with a multiplier and a cap on λ chosen on held-out tasks.
- ``OracleRidge``: λ = σ_τ², the task's true noise variance from ``episode.info`` (the reference of the
  adjusted loss; Bayes-optimal for w ~ N(0, I)).

The tuned ones tune lazily, on their first forward pass (or an explicit ``tune()``), by grid search on
episodes drawn from their own family with their own seed, so a recipe needs no separate tuning step.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch

from metaopt.checks import non_negative_float, optional, positive_float, positive_int, sequence_of
from metaopt.episodes import Episode
from metaopt.learners.base import Example, Learner
from metaopt.learners.solvers import LinearSolver, Ridge
from metaopt.metrics import ridge_weights
from metaopt.runtime import full_precision
from metaopt.seeds import SeedPlan
from metaopt.tasks.base import TaskFamily
from metaopt.tasks.noisy import NoisyLinearRegression
from metaopt.tasks.regression import LinearRegression

DEFAULT_LAMBDAS = tuple(round(10 ** (e / 4), 6) for e in range(-12, 13))  # 1e-3 .. 1e3, 4 per decade
TUNING_SEED = SeedPlan().tuning  # recipes pass their own: seed: ${seed:tuning}


class HeldOutTuning:
    """Grid search of a learner's settings on held-out episodes of a family, at each tuning support size.

    The best setting is chosen separately for every support size k in ``support`` (lowest query MSE);
    a tuned learner then uses, for a support set of size k, the setting of the nearest tuning size.
    A single size gives one setting for every k (the paper's fixed-length setting).
    """

    def __init__(
        self, family: TaskFamily, support: int | Sequence[int], num_tasks: int, query: int,
        seed: int, owner: str,
    ) -> None:
        sizes = ((positive_int("support", support, owner=owner),) if isinstance(support, int)
                 else sequence_of("support", support, positive_int, owner=owner))
        positive_int("num_tasks", num_tasks, owner=owner)
        positive_int("query", query, owner=owner)
        if not isinstance(family, TaskFamily):
            raise ValueError(f"{owner}: family must be a TaskFamily (in a recipe, a _target_ block such as "
                             f"family: ${{task}}); got {type(family).__name__}")
        self.family = family
        self.support_sizes, self.num_tasks, self.query, self.seed = sorted(set(sizes)), num_tasks, query, seed

    def best(self, candidates: Sequence[Learner]) -> dict[int, int]:
        """For each tuning support size, the index of the candidate with the lowest query MSE."""
        generator = torch.Generator().manual_seed(self.seed)
        episode = self.family.sample(self.num_tasks, self.support_sizes[-1], self.query, generator=generator)
        choice = {}
        with torch.no_grad():
            for k in self.support_sizes:
                prefix = episode.take_support(k)
                losses = [(c(prefix) - prefix.y_query).pow(2).mean().nan_to_num(math.inf).item() for c in candidates]
                choice[k] = min(range(len(losses)), key=losses.__getitem__)
        return choice

    def nearest(self, k: int) -> int:
        """The tuning support size closest to ``k`` (the smaller one on a tie)."""
        return min(self.support_sizes, key=lambda size: (abs(size - k), size))


class TunedRidge(LinearSolver):
    """ConstRR: ridge with the λ from ``lams`` that fits held-out tasks of ``family`` best (one λ for all tasks).

    Args:
        family: the task family to tune on (in a recipe, ``family: ${task}`` builds the recipe's own).
        lams: candidate penalties (unnormalised, as in ``Ridge``).
        support: support size(s) to tune at; with several, each k uses the λ of the nearest one.
        num_tasks, query, seed: the held-out tuning episodes.
    """

    @classmethod
    def example(cls) -> Example:
        family = LinearRegression(dim=3)
        return Example(cls(family, lams=(0.1, 1.0), support=5, num_tasks=8, query=2), family)

    def __init__(
        self, family: TaskFamily, lams: Sequence[float] = DEFAULT_LAMBDAS,
        support: int | Sequence[int] = 20, num_tasks: int = 2000, query: int = 10, seed: int = TUNING_SEED,
    ) -> None:
        super().__init__()
        self.lams = sequence_of("lams", lams, positive_float, owner="TunedRidge")
        self.tuning = HeldOutTuning(family, support, num_tasks, query, seed, "TunedRidge")
        self.chosen: dict[int, float] = {}

    def tune(self) -> dict[int, float]:
        """Choose λ on the held-out episodes; returns {tuning support size: λ}."""
        best = self.tuning.best([Ridge(lam) for lam in self.lams])
        self.chosen = {k: self.lams[i] for k, i in best.items()}
        return self.chosen

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.chosen:
            self.tune()
        return Ridge(self.chosen[self.tuning.nearest(x.shape[1])]).fit(x, y)

    def extra_repr(self) -> str:
        return f"chosen={self.chosen or 'not tuned yet'}"


class AdaptiveRidge(LinearSolver):
    """AdaRR: ridge with λ_τ = min(multiplier · σ̂_τ², cap) from each task's own residuals.

    σ̂² = ||y − X ŵ_OLS||² / (k − d), the unbiased noise-variance estimate of least squares. With k <= d
    least squares interpolates and σ̂² is undefined: λ is then ``cap`` if given, else 0 (min-norm
    least squares). Both solves run in float32, autocast or not.
    """

    def __init__(self, multiplier: float = 1.0, cap: float | None = None) -> None:
        super().__init__()
        self.multiplier = non_negative_float("multiplier", multiplier, owner="AdaptiveRidge")
        self.cap = optional(non_negative_float, "cap", cap, owner="AdaptiveRidge")

    @staticmethod
    @full_precision
    def noise_variance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """σ̂² per task ``[T]`` (NaN where k <= d)."""
        num_tasks, k, dim = x.shape
        if k <= dim:
            return x.new_full((num_tasks,), math.nan)
        xt = x.transpose(1, 2)
        residual = y - x @ torch.linalg.solve(xt @ x, xt @ y)
        return residual.pow(2).sum((1, 2)) / ((k - dim) * y.shape[-1])

    def penalty(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """λ per task ``[T]``."""
        lam = self.multiplier * self.noise_variance(x, y)
        fallback = 0.0 if self.cap is None else self.cap
        lam = torch.where(torch.isnan(lam), torch.full_like(lam, fallback), lam)
        return lam if self.cap is None else lam.clamp_max(self.cap)

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ridge_weights(x, y, self.penalty(x, y))

    def extra_repr(self) -> str:
        return f"multiplier={self.multiplier:.4g}, cap={self.cap}"


class TunedAdaptiveRidge(LinearSolver):
    """TunedRR: AdaRR with the (multiplier, cap) grid pair that fits held-out tasks of ``family`` best.

    Arguments as ``TunedRidge``, with ``multipliers`` × ``caps`` as the grid.
    """

    @classmethod
    def example(cls) -> Example:
        family = LinearRegression(dim=3)
        return Example(cls(family, multipliers=(1.0,), caps=(1.0, 10.0), support=5, num_tasks=8, query=2), family)

    def __init__(
        self, family: TaskFamily,
        multipliers: Sequence[float] = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0),
        caps: Sequence[float] = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0),
        support: int | Sequence[int] = 20, num_tasks: int = 2000, query: int = 10, seed: int = TUNING_SEED,
    ) -> None:
        super().__init__()
        if not multipliers or not caps:
            raise ValueError(f"TunedAdaptiveRidge: multipliers and caps must be non-empty; got {multipliers!r}, {caps!r}")
        self.candidates = [AdaptiveRidge(m, c) for m, c in itertools.product(multipliers, caps)]  # validates
        self.tuning = HeldOutTuning(family, support, num_tasks, query, seed, "TunedAdaptiveRidge")
        self.chosen: dict[int, tuple[float, float]] = {}

    def tune(self) -> dict[int, tuple[float, float]]:
        """Choose (multiplier, cap) on the held-out episodes; returns {tuning support size: (multiplier, cap)}."""
        best = self.tuning.best(self.candidates)
        self.chosen = {k: (self.candidates[i].multiplier, self.candidates[i].cap) for k, i in best.items()}
        return self.chosen

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.chosen:
            self.tune()
        return AdaptiveRidge(*self.chosen[self.tuning.nearest(x.shape[1])]).fit(x, y)

    def extra_repr(self) -> str:
        return f"chosen={self.chosen or 'not tuned yet'}"


class OracleRidge(Learner):
    """Ridge with each task's true noise variance, λ_τ = σ_τ² from ``episode.info[noise_key]``.

    The solve and the prediction run in float32 whatever the autocast state (``full_precision``).
    """

    kinds = ("regression",)

    @classmethod
    def example(cls) -> Example:
        return Example(cls(), NoisyLinearRegression(dim=3))

    def __init__(self, noise_key: str = "noise_std") -> None:
        super().__init__()
        self.noise_key = noise_key

    @full_precision
    def forward(self, episode: Episode) -> torch.Tensor:
        self.check_episode(episode)
        if self.noise_key not in episode.info:
            raise ValueError(
                f"OracleRidge needs the noise level in episode.info[{self.noise_key!r}] (e.g. NoisyLinearRegression); "
                f"got info keys {sorted(episode.info)}"
            )
        xs, ys = episode.x_support.flatten(2), episode.y_support.flatten(2)
        lam = episode.info[self.noise_key].to(xs.dtype).pow(2)
        return (episode.x_query.flatten(2) @ ridge_weights(xs, ys, lam)).reshape(episode.y_query.shape)


__all__ = ["TunedRidge", "AdaptiveRidge", "TunedAdaptiveRidge", "OracleRidge", "DEFAULT_LAMBDAS"]
