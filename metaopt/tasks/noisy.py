"""Linear regression with one noise level per task (Vladymyrov et al. 2024, "Linear Transformers are
Versatile In-Context Learners")."""

from __future__ import annotations

from typing import Sequence

import torch

from metaopt.checks import non_negative_float, positive_int, sequence_of
from metaopt.episodes import Episode
from metaopt.metrics import AdjustedLoss, Metric
from metaopt.tasks.base import TaskFamily
from metaopt.tasks.function_classes import split_episode


class NoisyLinearRegression(TaskFamily):
    """y = <w, x> + σ_τ ε on the support, y = <w, x> on the queries; x, w ~ N(0, I_d).

    Each task draws its own noise level σ_τ: uniformly from (0, noise) when ``noise`` is a number
    (σ_max), or uniformly from the list when it is a sequence (e.g. ``[1, 3, 5]``). The query targets
    are noiseless, as in the paper. ``info``: ``w`` ``[T, d]`` and ``noise_std`` ``[T]`` (σ_τ). The
    metric is the adjusted loss: squared error minus that of the oracle ridge with λ = σ_τ².
    """

    kind = "regression"

    def __init__(self, dim: int = 10, noise: float | Sequence[float] = 1.0) -> None:
        self.dim = positive_int("dim", dim, owner="NoisyLinearRegression")
        if isinstance(noise, (int, float)) and not isinstance(noise, bool):
            self.noise: float | tuple[float, ...] = non_negative_float("noise", noise, owner="NoisyLinearRegression")
        elif isinstance(noise, Sequence) and not isinstance(noise, str) and len(noise) > 0:
            self.noise = sequence_of("noise", noise, non_negative_float, owner="NoisyLinearRegression")
        else:
            raise ValueError(
                f"NoisyLinearRegression: noise must be σ_max >= 0 (σ_τ ~ U(0, σ_max)) or a non-empty list of "
                f"noise levels to choose from (e.g. [1, 3, 5]); got {noise!r}"
            )

    @property
    def error_scale(self) -> float:
        return float(self.dim)

    @property
    def task_values(self) -> int:
        return self.dim + 1

    @property
    def example_values(self) -> int:
        return 2 * (self.dim + 1)

    @property
    def metric(self) -> Metric:
        return AdjustedLoss(noise_key="noise_std")

    def sample_noise(self, num_tasks: int, generator: torch.Generator) -> torch.Tensor:
        """σ_τ for each of ``num_tasks`` tasks ``[T]``."""
        if isinstance(self.noise, tuple):
            levels = torch.tensor(self.noise)
            return levels[torch.randint(len(levels), (num_tasks,), generator=generator)]
        return self.noise * torch.rand(num_tasks, generator=generator)

    def _sample(self, num_tasks: int, support: int, query: int, generator: torch.Generator) -> Episode:
        w = torch.randn(num_tasks, self.dim, generator=generator)
        x = torch.randn(num_tasks, support + query, self.dim, generator=generator)
        sigma = self.sample_noise(num_tasks, generator)
        y = torch.einsum("tnd,td->tn", x, w).unsqueeze(-1)
        noise = torch.randn(num_tasks, support, 1, generator=generator) * sigma[:, None, None]
        y = torch.cat([y[:, :support] + noise, y[:, support:]], dim=1)
        return split_episode(x, y, support, {"w": w, "noise_std": sigma})


__all__ = ["NoisyLinearRegression"]
