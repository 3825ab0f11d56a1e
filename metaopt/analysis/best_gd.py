"""The gradient-descent step size (and number of steps) that best matches a learner.

von Oswald et al. (ICML 2023, Sec. 3) compare a trained in-context learner with the *best-matching*
gradient descent: plain GD from w = 0 on ½·mean squared error (``metaopt.learners.GradientDescent``,
update ``w ← w − lr (1/k) Xᵀ(Xw − y)``), with the step size tuned. Here "best matching" means the
smallest squared prediction difference to A on probe inputs (Akyürek et al.'s SPD, see ``probes``):

    (steps*, lr*) = argmin_{steps ∈ S, lr > 0}  mean_{t, p} (ŷ_A(x'_p | D_t) − ŷ_GD(steps, lr)(x'_p | D_t))².

The search is vectorised: a log-spaced grid of step sizes runs through one ``GradientDescent`` under
``torch.func.vmap`` (its ``lr`` buffer swapped in with ``functional_call``), then golden-section search
refines every bracket around the grid minimum at once. It is done for each support size k ≥ 1 on its
own and for all of them pooled (the mean SPD over k); at k = 0 GD predicts 0 whatever its step size.
For one step the objective is a quadratic in lr, so the search recovers a GD construction's lr to
numerical precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.func import functional_call, vmap

from metaopt.analysis.probes import with_queries
from metaopt.checks import positive_int, sequence_of
from metaopt.episodes import Episode
from metaopt.learners.solvers import GradientDescent

_INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0  # 1/φ, the golden-section shrink factor


@dataclass
class BestGD:
    """The best-matching GD per support size and pooled over them.

    ``support_sizes`` are the k ≥ 1 searched; ``lr_per_k``/``steps_per_k``/``spd_per_k`` the best step
    size, number of steps and the SPD they reach at each k; ``lr``/``steps``/``spd`` the single setting
    that minimises the mean SPD over those k, and ``spd_by_steps`` that minimum for each step count tried
    (``{steps: [lr, spd]}``).
    """

    support_sizes: list[int]
    lr_per_k: list[float]
    steps_per_k: list[int]
    spd_per_k: list[float]
    lr: float
    steps: int
    spd: float
    spd_by_steps: dict[int, list[float]]


def _gd_spd(
    gd: GradientDescent, episodes: Sequence[Episode], target: torch.Tensor, lrs: torch.Tensor
) -> torch.Tensor:
    """SPD ``[K, G]`` between ``target`` ``[K, T, P, y]`` and GD at each step size ``lrs`` ``[G]``, per episode."""

    def predict(lr: torch.Tensor, episode: Episode) -> torch.Tensor:
        return functional_call(gd, {"lr": lr}, (episode,))

    rows = []
    for episode, wanted in zip(episodes, target):
        predictions = vmap(predict, in_dims=(0, None))(lrs, episode).flatten(3)  # [G, T, P, y]
        rows.append((predictions - wanted).pow(2).flatten(1).mean(1))
    return torch.nan_to_num(torch.stack(rows), nan=math.inf)


def _search(objective, lo: float, hi: float, grid: int, iterations: int, dtype: torch.dtype) -> tuple:
    """Minimise R objectives of one step size each; ``objective(lrs [n]) -> [R, n]`` evaluates all of them.

    A shared log grid, then golden-section search in each row's bracket around its grid minimum.
    Returns the best step sizes ``[R]`` and their objective values ``[R]``.
    """
    candidates = torch.logspace(math.log10(lo), math.log10(hi), grid, dtype=dtype)
    values = objective(candidates)  # [R, G]
    rows = torch.arange(values.shape[0])
    best = values.argmin(1)
    left = candidates[(best - 1).clamp_min(0)]
    right = candidates[(best + 1).clamp_max(grid - 1)]

    def own(lrs: torch.Tensor) -> torch.Tensor:  # row r at its own step size lrs[r]
        return objective(lrs)[rows, rows]

    for _ in range(iterations):
        c = right - _INV_PHI * (right - left)
        d = left + _INV_PHI * (right - left)
        keep_left = own(c) <= own(d)  # the minimum lies in [left, d], else in [c, right]
        right = torch.where(keep_left, d, right)
        left = torch.where(keep_left, left, c)
    lr = (left + right) / 2
    return lr, own(lr)


def best_gd(
    target: torch.Tensor,
    episode: Episode,
    probes: torch.Tensor,
    support_sizes: Sequence[int],
    *,
    steps: Sequence[int] = (1,),
    lr_range: tuple[float, float] = (1e-3, 1e2),
    grid: int = 64,
    iterations: int = 40,
) -> BestGD:
    """The GD (``steps`` options × step size) with the smallest SPD to ``target`` predictions.

    Args:
        target: learner A's predictions on ``probes`` for each support size, ``[K, T, P, y]``
            (``probes.probe_predictions``).
        episode: the episode A saw; size k uses its first k support examples.
        probes: probe inputs ``[T, P, *x]``.
        support_sizes: the K support sizes of ``target``; sizes 0 are skipped.
        steps: numbers of GD steps to try.
        lr_range: the interval ``(low, high)`` of step sizes searched (log grid).
        grid, iterations: grid points and golden-section iterations.

    Raises:
        ValueError: on an empty or non-positive ``steps``, a bad ``lr_range``, or no support size ≥ 1.
    """
    steps = list(sequence_of("steps", steps, positive_int, owner="best_gd"))
    low, high = (float(v) for v in lr_range)
    if not 0 < low < high:
        raise ValueError(f"best_gd: lr_range must be (low, high) with 0 < low < high; got {lr_range!r}")
    sizes = [int(k) for k in support_sizes]
    index = [i for i, k in enumerate(sizes) if k >= 1]
    if not index:
        raise ValueError(f"best_gd needs a support size >= 1; got {sizes!r}")
    target = target[index].double()
    probing = with_queries(episode, probes)
    episodes = [probing.take_support(sizes[i]) for i in index]
    episodes = [e.replace(x_support=e.x_support.double(), y_support=e.y_support.double(),
                          x_query=e.x_query.double(), y_query=e.y_query.double()) for e in episodes]
    results = []
    for n in steps:
        gd = GradientDescent(n).double()

        def objective(lrs: torch.Tensor) -> torch.Tensor:
            # rows 0..K-1: one support size each; row K: the mean over support sizes
            spd = _gd_spd(gd, episodes, target, lrs)  # [K, n]
            return torch.cat([spd, spd.mean(0, keepdim=True)])  # [K + 1, n]

        results.append(_search(objective, low, high, grid, iterations, torch.float64))
    lrs = torch.stack([lr for lr, _ in results])  # [len(steps), K + 1]
    spds = torch.stack([spd for _, spd in results])
    choice = spds.argmin(0)  # best step count per row
    rows = torch.arange(len(index) + 1)
    best_lr, best_spd = lrs[choice, rows], spds[choice, rows]
    return BestGD(
        support_sizes=[sizes[i] for i in index],
        lr_per_k=best_lr[:-1].tolist(),
        steps_per_k=[steps[c] for c in choice[:-1].tolist()],
        spd_per_k=best_spd[:-1].tolist(),
        lr=best_lr[-1].item(),
        steps=steps[choice[-1].item()],
        spd=best_spd[-1].item(),
        spd_by_steps={n: [lrs[i, -1].item(), spds[i, -1].item()] for i, n in enumerate(steps)},
    )
