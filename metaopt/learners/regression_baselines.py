"""The explicit regression baselines of Garg et al. 2022, batched over tasks: Lasso, k-NN, averaging."""

from __future__ import annotations

import torch

from metaopt.checks import positive_float, positive_int
from metaopt.episodes import Episode
from metaopt.learners.base import Learner
from metaopt.learners.solvers import LinearSolver


class Lasso(LinearSolver):
    """argmin_w (1 / 2k) ||y − X w||² + α ||w||₁ per task (scikit-learn's scaling, no intercept).

    Cyclic coordinate descent, every task at once: with residual r = y − X w and c_j = ||x_j||² / k,
    ``w_j ← S_α(x_jᵀ r / k + c_j w_j) / c_j`` where S_α(z) = sign(z) max(|z| − α, 0). Sweeps stop
    once no weight of any task moved by more than ``tol`` times the largest weight.
    """

    def __init__(self, alpha: float = 0.1, max_sweeps: int = 1000, tol: float = 1e-6) -> None:
        super().__init__()
        self.alpha = positive_float("alpha", alpha, owner="Lasso")
        self.max_sweeps = positive_int("max_sweeps", max_sweeps, owner="Lasso")
        self.tol = positive_float("tol", tol, owner="Lasso")

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        num_tasks, k, dim = x.shape
        w = x.new_zeros(num_tasks, dim, y.shape[-1])
        if k == 0:
            return w
        curvature = x.pow(2).sum(1) / k  # [T, D]
        safe = curvature.clamp_min(torch.finfo(x.dtype).tiny)
        residual = y.clone()  # [T, k, M]
        for _ in range(self.max_sweeps):
            largest_step = x.new_zeros(())
            for j in range(dim):
                column = x[:, :, j : j + 1]  # [T, k, 1]
                old = w[:, j].clone()  # [T, M]
                rho = (column * residual).sum(1) / k + curvature[:, j : j + 1] * old
                new = torch.sign(rho) * (rho.abs() - self.alpha).clamp_min(0) / safe[:, j : j + 1]
                new = torch.where(curvature[:, j : j + 1] > 0, new, torch.zeros_like(new))
                residual = residual - column * (new - old).unsqueeze(1)
                w[:, j] = new
                largest_step = torch.maximum(largest_step, (new - old).abs().max())
            if largest_step <= self.tol * max(1.0, w.abs().max().item()):
                break
        return w

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class Averaging(LinearSolver):
    """ŵ = (1/k) Σ_i y_i x_i: one step of gradient descent from zero, Garg et al.'s "averaging" baseline."""

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 0:
            return x.new_zeros(x.shape[0], x.shape[2], y.shape[2])
        return x.transpose(1, 2) @ y / x.shape[1]


class NearestNeighbours(Learner):
    """Mean label of the ``k`` support inputs nearest (Euclidean) to each query; 0 with an empty support.

    With fewer than ``k`` support examples, all of them are averaged.
    """

    kinds = ("regression",)

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.k = positive_int("k", k, owner="NearestNeighbours")

    def forward(self, episode: Episode) -> torch.Tensor:
        self.check_episode(episode)
        xs, xq = episode.x_support.flatten(2), episode.x_query.flatten(2)
        ys = episode.y_support.flatten(2)  # [T, S, M]
        num_tasks, support, labels = ys.shape
        if support == 0:
            return episode.y_query.new_zeros(episode.y_query.shape)
        k = min(self.k, support)
        nearest = torch.cdist(xq, xs).topk(k, dim=-1, largest=False).indices  # [T, Q, k]
        index = nearest.reshape(num_tasks, -1, 1).expand(-1, -1, labels)
        chosen = ys.gather(1, index).reshape(num_tasks, xq.shape[1], k, labels)
        return chosen.mean(2).reshape(episode.y_query.shape)

    def extra_repr(self) -> str:
        return f"k={self.k}"


__all__ = ["Lasso", "Averaging", "NearestNeighbours"]
