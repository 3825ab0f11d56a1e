"""Closed-form regression solvers, batched over tasks with ``torch.linalg``.

They compute in float32 under autocast (:func:`metaopt.runtime.full_precision`): a Gram matrix and its solve
lose most of their digits in bfloat16 / float16.
"""

from __future__ import annotations

import torch

from metaopt.checks import boolean, positive_float, positive_int
from metaopt.episodes import Episode
from metaopt.learners.base import Learner
from metaopt.runtime import full_precision


def _flat_inputs(episode: Episode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Support inputs ``[T, S, D]``, support labels ``[T, S, 1]`` and query inputs ``[T, Q, D]``."""
    xs = episode.x_support.flatten(2)
    xq = episode.x_query.flatten(2)
    return xs, episode.y_support.flatten(2), xq


class LinearSolver(Learner):
    """A learner that fits weights ``w`` of a linear model per task and predicts ``x_q w``.

    The prediction runs in float32 whatever the autocast state (``full_precision``).
    """

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Weights ``[T, D, 1]`` from support inputs ``[T, S, D]`` and labels ``[T, S, 1]``."""
        raise NotImplementedError

    @full_precision
    def forward(self, episode: Episode) -> torch.Tensor:
        self.check_episode(episode)
        xs, ys, xq = _flat_inputs(episode)
        return xq @ self.fit(xs, ys)


class LeastSquares(LinearSolver):
    """Minimum-norm least squares: ``w = X⁺ y`` (interpolates when k < d); the pseudo-inverse runs in float32."""

    @full_precision
    def fit(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 0:
            return x.new_zeros(x.shape[0], x.shape[2], y.shape[2])
        return torch.linalg.pinv(x) @ y


class Ridge(LinearSolver):
    """Ridge regression: ``w = (XᵀX + λI)⁻¹ Xᵀ y`` with an unnormalised penalty λ.

    With fewer examples than features it solves the equivalent, better conditioned dual
    ``w = Xᵀ (XXᵀ + λI)⁻¹ y`` (k×k instead of d×d). The solve runs in float32, autocast or not.
    """

    def __init__(self, lam: float = 1.0) -> None:
        super().__init__()
        self.lam = positive_float("lam", lam, owner="Ridge")  # lam = 0 is LeastSquares

    @full_precision
    def fit(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k, d = x.shape[1], x.shape[2]
        xt = x.transpose(1, 2)
        if k < d:
            kernel = x @ xt + self.lam * torch.eye(k, dtype=x.dtype, device=x.device)
            return xt @ torch.linalg.solve(kernel, y)
        gram = xt @ x + self.lam * torch.eye(d, dtype=x.dtype, device=x.device)
        return torch.linalg.solve(gram, xt @ y)

    def extra_repr(self) -> str:
        return f"lam={self.lam}"


class GradientDescent(LinearSolver):
    """``steps`` of full-batch gradient descent on ½·mean squared error of a linear model from w = 0.

    Update: ``w ← w − lr · (1/k) Xᵀ(X w − y)``. Explicit optimisation, batched over tasks and
    differentiable; with ``learn_lr=True`` the step size is a meta-parameter.
    """

    def __init__(self, steps: int = 1, lr: float = 0.1, learn_lr: bool = False) -> None:
        super().__init__()
        self.steps = positive_int("steps", steps, owner="GradientDescent")
        lr_tensor = torch.tensor(positive_float("lr", lr, owner="GradientDescent"))
        if boolean("learn_lr", learn_lr, owner="GradientDescent"):
            self.lr = torch.nn.Parameter(lr_tensor)
        else:
            self.register_buffer("lr", lr_tensor)

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = x.new_zeros(x.shape[0], x.shape[2], y.shape[2])
        k = x.shape[1]
        if k == 0:
            return w
        xt = x.transpose(1, 2)
        for _ in range(self.steps):
            w = w - (self.lr / k) * (xt @ (x @ w - y))
        return w

    def extra_repr(self) -> str:
        return f"steps={self.steps}, lr={self.lr.item():.4g}"
