"""Akyürek et al.'s probe-based comparison of two learners: SPD and ILWD.

Akyürek et al. (ICLR 2023, "What learning algorithm is in-context learning? Investigations with linear
models", Sec. 4) ask which algorithm an in-context learner implements by comparing its predictions,
for the same support set, with those of a reference algorithm on *probe inputs* x' drawn from the
input distribution:

- SPD, the squared prediction difference: ``E_{D, x'} (ŷ_A(x' | D) − ŷ_B(x' | D))²``;
- ILWD, the implicit linear weight difference: fit a linear model ``ŵ_L = argmin_w Σ_p (x'_pᵀ w −
  ŷ_L(x'_p | D))²`` (minimum-norm least squares) to each learner's predictions on the probes, and
  measure ``E_D ‖ŵ_A − ŵ_B‖²₂`` (squared, so for isotropic probes with ``E x'x'ᵀ = I`` and linear
  learners ILWD equals SPD). For a linear learner ``ŷ = x'ᵀ w`` and at least D probes in general
  position the fit recovers ``w`` exactly.

Probe inputs (our choice, documented): for each task, ``num_probes`` inputs drawn with replacement,
by a seeded generator, from the pool of every support and query input of the episode (all tasks), so
they follow the task family's input distribution without the analysis knowing the family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from metaopt.checks import positive_int
from metaopt.episodes import Episode
from metaopt.learners.base import Learner


def probe_inputs(episode: Episode, num_probes: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """``num_probes`` probe inputs per task, ``[T, P, *x]``, drawn from the episode's own inputs.

    Raises:
        ValueError: if ``num_probes`` is not a positive int.
    """
    positive_int("num_probes", num_probes, owner="probe_inputs")
    pool = torch.cat([episode.x_support, episode.x_query], dim=1).flatten(0, 1)  # [T * (S + Q), *x]
    index = torch.randint(pool.shape[0], (episode.num_tasks * num_probes,), generator=generator)
    return pool[index.to(pool.device)].reshape(episode.num_tasks, num_probes, *episode.x_shape)


def with_queries(episode: Episode, x_query: torch.Tensor) -> Episode:
    """The episode with other query inputs (and zero query labels, which no learner reads)."""
    y_shape = episode.y_query.shape[2:]
    y_query = episode.y_query.new_zeros(x_query.shape[0], x_query.shape[1], *y_shape)
    return episode.replace(x_query=x_query, y_query=y_query)


@torch.no_grad()
def probe_predictions(
    learner: Learner, episode: Episode, probes: torch.Tensor, support_sizes: Sequence[int]
) -> torch.Tensor:
    """``learner``'s predictions on the probe inputs for each support size: ``[K, T, P, y]`` (labels flattened)."""
    was_training = learner.training
    learner.eval()
    try:
        predictions = learner.predict_by_support_size(with_queries(episode, probes), [int(k) for k in support_sizes])
    finally:
        learner.train(was_training)
    return predictions.flatten(3)


def implicit_weights(probes: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
    """Minimum-norm least-squares weights ``[..., T, D, y]`` of predictions ``[..., T, P, y]`` on ``[T, P, *x]``."""
    return torch.linalg.pinv(probes.flatten(2).to(predictions.dtype)) @ predictions


@dataclass
class ProbeDifference:
    """SPD and ILWD of learner A against learner B, one value per support size k (see the module doc)."""

    support_sizes: list[int]
    spd: list[float]
    ilwd: list[float]


def probe_difference(
    predictions_a: torch.Tensor, predictions_b: torch.Tensor, probes: torch.Tensor, support_sizes: Sequence[int]
) -> ProbeDifference:
    """SPD and ILWD from two learners' probe predictions ``[K, T, P, y]`` on probes ``[T, P, *x]``."""
    a, b = predictions_a.double(), predictions_b.double()
    weights_a, weights_b = implicit_weights(probes, a), implicit_weights(probes, b)
    return ProbeDifference(
        support_sizes=[int(k) for k in support_sizes],
        spd=(a - b).pow(2).flatten(1).mean(1).tolist(),
        ilwd=(weights_a - weights_b).pow(2).sum(dim=(-2, -1)).mean(-1).tolist(),
    )


def spd_ilwd(
    a: Learner,
    b: Learner,
    episode: Episode,
    support_sizes: Sequence[int],
    *,
    num_probes: int | None = None,
    generator: torch.Generator | None = None,
) -> ProbeDifference:
    """Akyürek et al.'s SPD and ILWD of ``a`` against ``b`` on the same probes (``4 · D`` by default)."""
    probes = probe_inputs(episode, num_probes or 4 * episode.x_support[0, 0].numel(), generator=generator)
    return probe_difference(
        probe_predictions(a, episode, probes, support_sizes),
        probe_predictions(b, episode, probes, support_sizes),
        probes,
        support_sizes,
    )
