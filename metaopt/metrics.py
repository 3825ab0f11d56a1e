"""Evaluation metrics per task, their bootstrap bands, and prediction similarity.

A task family names its metric (``TaskFamily.metric``, by default its episode kind's); ``compare``
scores every learner with it. A metric maps predictions ``[..., T, Q, *y]`` and the episode to one
value per task ``[..., T]``. Episode kinds build their default metrics from here, so this module
reads episodes only through their attributes and imports no episode type at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from metaopt.runtime import full_precision

if TYPE_CHECKING:
    from metaopt.episodes import Episode


@dataclass(frozen=True)
class Metric:
    """How ``compare`` scores predictions: ``per_task(predictions, episode) -> [..., T]``."""

    name: str = "metric"
    lower_is_better: bool = True

    def per_task(self, predictions: torch.Tensor, episode: Episode) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def _mean_over_queries(values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Average the trailing query (and label) dimensions of ``values`` shaped like ``[..., *targets.shape]``."""
    return values.flatten(start_dim=values.dim() - targets.dim() + 1).mean(-1)


@dataclass(frozen=True)
class NormalizedError(Metric):
    """Squared error divided by ``scale`` (Garg et al.: d for linear functions, so predicting 0 scores 1)."""

    name: str = "normalized_error"
    lower_is_better: bool = True
    scale: float = 1.0

    def per_task(self, predictions: torch.Tensor, episode: Episode) -> torch.Tensor:
        targets = episode.y_query.to(predictions.device)
        return _mean_over_queries((predictions - targets).pow(2) / self.scale, targets)


@dataclass(frozen=True)
class Accuracy(Metric):
    """Share of correct queries, as the episode kind decides (``logit > 0`` for binary, the arg-max for classes)."""

    name: str = "accuracy"
    lower_is_better: bool = False

    def per_task(self, predictions: torch.Tensor, episode: Episode) -> torch.Tensor:
        targets = episode.y_query.to(predictions.device)
        return episode.kind.correct(predictions, targets).float().mean(-1)


def bootstrap_band(
    per_task: torch.Tensor, *, resamples: int = 1000, level: float = 0.95, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile bootstrap band of the mean over tasks (the last dimension): ``[..., T] -> ([...], [...])``."""
    num_tasks = per_task.shape[-1]
    index = torch.randint(num_tasks, (resamples, num_tasks), generator=generator)
    means = per_task[..., index].mean(-1)  # [..., resamples]
    alpha = (1.0 - level) / 2
    quantiles = torch.tensor([alpha, 1.0 - alpha], dtype=means.dtype)
    low, high = torch.quantile(means, quantiles, dim=-1)
    return low, high


def prediction_similarity(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cosine similarity and mean absolute difference of two learners' predictions ``[K, T, Q, ...]``.

    Prediction vectors are flattened over tasks and queries, one value per support size k. Pass them in
    their comparable form, ``episode.kind.comparable(predictions)``: class probabilities, not logits, for
    classification (logits carry an arbitrary offset per query, and masked classes huge negative numbers).
    """
    a_flat, b_flat = a.flatten(1).double(), b.flatten(1).double()
    return {
        "cosine": F.cosine_similarity(a_flat, b_flat, dim=1, eps=1e-12).float(),
        "mean_abs_diff": (a_flat - b_flat).abs().mean(1).float(),
    }


@full_precision
def ridge_weights(x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Ridge weights ``[T, D, M]`` with one penalty per task: argmin ||X w − y||² + λ_t ||w||².

    ``x`` ``[T, S, D]``, ``y`` ``[T, S, M]``, ``lam`` ``[T]`` >= 0. With every λ > 0 this solves the
    normal equations (XᵀX + λI) w = Xᵀy; otherwise least squares on the augmented system
    [X; √λ I] w = [y; 0] with a pseudo-inverse, so λ = 0 gives the minimum-norm least-squares
    solution and S = 0 gives w = 0. It computes in float32 (or float64) whatever the autocast state.
    """
    num_tasks, _, dim = x.shape
    eye = torch.eye(dim, dtype=x.dtype, device=x.device).expand(num_tasks, dim, dim)
    if bool((lam > 0).all()):
        xt = x.transpose(1, 2)
        return torch.linalg.solve(xt @ x + lam.to(x.dtype)[:, None, None] * eye, xt @ y)
    augmented = torch.cat([x, lam.to(x.dtype).sqrt()[:, None, None] * eye], dim=1)
    targets = torch.cat([y, y.new_zeros(num_tasks, dim, y.shape[-1])], dim=1)
    return torch.linalg.pinv(augmented) @ targets


@dataclass(frozen=True)
class AdjustedLoss(Metric):
    """Squared error minus that of the per-task oracle ridge with λ = σ_τ² (Vladymyrov et al. 2024).

    The oracle knows each task's noise level (``episode.info[noise_key]``, ``[T]``) and fits the
    episode's support set, so ``compare`` scores support size k on ``episode.take_support(k)``. Zero
    means as good as Bayes-optimal ridge for Gaussian weights; the mean over queries is per task.
    """

    name: str = "adjusted_loss"
    lower_is_better: bool = True
    noise_key: str = "noise_std"

    def per_task(self, predictions: torch.Tensor, episode: Episode) -> torch.Tensor:
        if self.noise_key not in episode.info:
            raise ValueError(
                f"AdjustedLoss needs the noise level in episode.info[{self.noise_key!r}]; got info keys "
                f"{sorted(episode.info)}"
            )
        episode = episode.to(predictions.device)
        targets = episode.y_query
        x = episode.x_support.flatten(2).double()
        lam = episode.info[self.noise_key].double().pow(2)
        weights = ridge_weights(x, episode.y_support.flatten(2).double(), lam)
        oracle = (episode.x_query.flatten(2).double() @ weights).reshape(targets.shape)
        oracle_error = _mean_over_queries((oracle - targets).pow(2), targets)
        error = _mean_over_queries((predictions.double() - targets).pow(2), targets)
        return (error - oracle_error).to(predictions.dtype)
