"""Synthetic regression task families (Garg et al. 2022)."""

from __future__ import annotations

import math
from functools import partial

import torch

from metaopt.checks import integer, interval, non_negative_float, one_of, optional, positive_float, positive_int
from metaopt.episodes import Episode
from metaopt.tasks.base import TaskFamily

X_DISTRIBUTIONS = ("normal", "uniform")
COVARIANCES = ("identity", "skewed", "half_subspace")
QUERY_MODES = ("standard", "orthogonal", "copied")


def random_orthogonal(num: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """``num`` Haar-random orthogonal matrices ``[num, dim, dim]``: QR of a Gaussian, signs fixed by diag(R)."""
    q, r = torch.linalg.qr(torch.randn(num, dim, dim, generator=generator))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def covariance_eigenvalues(covariance: str, dim: int) -> torch.Tensor:
    """Eigenvalues of the input transformation of Garg et al.'s prompt variants, scaled so E|x|² is unchanged.

    ``skewed``: 1/i; ``half_subspace``: 1 on d // 2 directions, 0 elsewhere; both multiplied by
    sqrt(d / Σλ²) so the transformed inputs keep the trace of the original covariance.
    """
    if covariance == "identity":
        return torch.ones(dim)
    if covariance == "skewed":
        values = 1.0 / torch.arange(1, dim + 1, dtype=torch.float32)
    else:
        values = (torch.arange(dim) < dim // 2).float()
    return values * math.sqrt(dim / values.pow(2).sum().item())


def orthogonalise_queries(x_support: torch.Tensor, x_query: torch.Tensor) -> torch.Tensor:
    """Queries projected onto the orthogonal complement of the support span, keeping their norms.

    Needs fewer support examples than dimensions (Garg et al.'s "orthogonal query" prompts).
    """
    if x_support.shape[1] == 0:
        return x_query
    basis, _ = torch.linalg.qr(x_support.transpose(1, 2))  # [T, d, S], orthonormal columns
    projected = x_query - (x_query @ basis) @ basis.transpose(1, 2)
    scale = x_query.norm(dim=-1, keepdim=True) / projected.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return projected * scale


class LinearRegression(TaskFamily):
    """y = <w, x> + noise with w ~ N(0, I_d) per task.

    Args:
        dim: input dimension d.
        noise_std: standard deviation of Gaussian label noise (on support and query labels).
        x_dist: ``"normal"`` (x ~ N(0, I_d), as in Garg et al.) or ``"uniform"`` (x ~ U(x_range)^d,
            as in von Oswald et al.).
        x_range: the interval of the uniform distribution.

    Keyword-only options give Garg et al.'s out-of-distribution prompts (all off by default):
        covariance: ``"identity"``; ``"skewed"`` (x ← U diag(λ) Uᵀ x with λ_i ∝ 1/i); or
            ``"half_subspace"`` (inputs confined to a random d/2-dimensional subspace); U is a random
            rotation per task and λ is scaled so E|x|² stays d E[x_i²].
        query_mode: ``"standard"``; ``"orthogonal"`` (each query projected orthogonally to the span of
            the support inputs, norm kept; needs support < dim); or ``"copied"`` (each query is a
            uniformly chosen support input; needs support >= 1).
        x_scale: multiplies every input (Garg et al.'s "scaled x").
        y_scale: multiplies w, hence every label (their "scaled y").
    Label noise is ``noise_std``. ``error_scale`` stays the in-distribution scale, so the normalised
    error of a shifted prompt is comparable with the standard one.
    """

    kind = "regression"
    curriculum_dims = True

    @classmethod
    def example(cls) -> "LinearRegression":
        return cls(dim=3)

    def __init__(
        self,
        dim: int,
        noise_std: float = 0.0,
        x_dist: str = "normal",
        x_range: tuple[float, float] = (-1.0, 1.0),
        *,
        covariance: str = "identity",
        query_mode: str = "standard",
        x_scale: float = 1.0,
        y_scale: float = 1.0,
        active_dims: int | None = None,
    ) -> None:
        owner = "LinearRegression"
        dim = positive_int("dim", dim, owner=owner)
        noise_std = non_negative_float("noise_std", noise_std, owner=owner)
        one_of("x_dist", x_dist, X_DISTRIBUTIONS, owner=owner)
        low, high = interval("x_range", x_range, owner=owner)
        one_of("covariance", covariance, COVARIANCES, owner=owner)
        if covariance == "half_subspace" and dim < 2:
            raise ValueError(f"LinearRegression: covariance='half_subspace' needs dim >= 2; got dim={dim!r}")
        one_of("query_mode", query_mode, QUERY_MODES, owner=owner)
        self.dim = dim
        self.active_dims = optional(partial(integer, low=1, high=dim), "active_dims", active_dims, owner=owner)
        self.noise_std = noise_std
        self.x_dist = x_dist
        self.x_range = (low, high)
        self.covariance = covariance
        self.query_mode = query_mode
        self.x_scale = positive_float("x_scale", x_scale, owner=owner)
        self.y_scale = positive_float("y_scale", y_scale, owner=owner)

    @property
    def x_second_moment(self) -> float:
        """E[x_i^2] of one input coordinate."""
        if self.x_dist == "normal":
            return 1.0
        low, high = self.x_range
        return (low * low + low * high + high * high) / 3.0

    @property
    def error_scale(self) -> float:
        """E[<w, x>^2] = d E[x_i^2]: d for normal inputs, as in Garg et al."""
        return self.dim * self.x_second_moment

    @property
    def task_values(self) -> int:
        return self.dim * (1 if self.covariance == "identity" else 3 * self.dim)

    @property
    def example_values(self) -> int:
        return 3 * (self.dim + 1)

    def _sample_x(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        if self.x_dist == "normal":
            return torch.randn(shape, generator=generator)
        low, high = self.x_range
        return low + (high - low) * torch.rand(shape, generator=generator)

    def _sample(self, num_tasks: int, support: int, query: int, generator: torch.Generator) -> Episode:
        self._check_sizes(support)
        d, n = self.dim, support + query
        w = torch.randn(num_tasks, d, generator=generator)
        x = self._sample_x((num_tasks, n, d), generator)
        x, w = self._shift(x, w, support, generator)
        x = self.mask_inputs(x)  # Garg et al.'s curriculum: only the first active_dims coordinates
        y = torch.einsum("tnd,td->tn", x, w).unsqueeze(-1)
        if self.noise_std > 0:
            y = y + self.noise_std * torch.randn(y.shape, generator=generator)
        return Episode(
            x_support=x[:, :support],
            y_support=y[:, :support],
            x_query=x[:, support:],
            y_query=y[:, support:],
            kind="regression",
            info={"w": w},
        )

    def _check_sizes(self, support: int) -> None:
        if self.query_mode == "orthogonal" and support >= self.dim:
            raise ValueError(
                f"LinearRegression(query_mode='orthogonal') needs support < dim={self.dim} (the queries must "
                f"leave the span of the support inputs); got support={support}"
            )
        if self.query_mode == "copied" and support < 1:
            raise ValueError("LinearRegression(query_mode='copied') needs support >= 1 to copy a query from; got 0")

    def _shift(
        self, x: torch.Tensor, w: torch.Tensor, support: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the out-of-distribution options to inputs ``[T, N, d]`` and weights ``[T, d]``."""
        num_tasks, d = w.shape
        if self.covariance != "identity":
            rotation = random_orthogonal(num_tasks, d, generator)
            transform = rotation * covariance_eigenvalues(self.covariance, d) @ rotation.transpose(1, 2)
            x = x @ transform  # symmetric, so rows x_i ← transform x_i
        if self.query_mode == "orthogonal":
            x = torch.cat([x[:, :support], orthogonalise_queries(x[:, :support], x[:, support:])], dim=1)
        elif self.query_mode == "copied":
            index = torch.randint(support, (num_tasks, x.shape[1] - support), generator=generator)
            copies = x[:, :support].gather(1, index.unsqueeze(-1).expand(-1, -1, d))
            x = torch.cat([x[:, :support], copies], dim=1)
        return x * self.x_scale, w * self.y_scale


__all__ = ["LinearRegression", "X_DISTRIBUTIONS", "COVARIANCES", "QUERY_MODES", "random_orthogonal"]
