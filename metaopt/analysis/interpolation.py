"""The loss along the straight line between two learners of the same architecture.

von Oswald et al. (ICML 2023, Fig. 2) check that a trained linear self-attention layer θ_A sits in the
same basin as the gradient-descent construction θ_B (``LinearSelfAttention.from_gd(lr*)``): the loss of
the interpolated model ``θ(α) = (1 − α) θ_A + α θ_B`` stays low at α = ½. ``interpolation_losses``
evaluates the query task loss at ``θ(α)`` through ``torch.func.functional_call``, so neither model changes.

A FULL linear self-attention head computes with the product ``W_PV C W_KQ``, so ``(s W_PV, W_KQ / s)``
is the same function for any s ≠ 0 (a sign flip included), while the straight line between two
parameterisations of the same function generally is not. ``align_scales`` picks, per layer and head,
the s that brings A's factors to the scale and sign of B's before interpolating (our addition; the
paper does not say how it handled this symmetry).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.func import functional_call

from metaopt.episodes import Episode
from metaopt.learners.base import Learner
from metaopt.learners.capabilities import Capability, provides
from metaopt.learners.incontext.linear_attention import LinearSelfAttention


@dataclass
class Interpolation:
    """``loss[i]``: the task loss of ``(1 − alphas[i]) θ_A + alphas[i] θ_B`` on the episode's queries."""

    alphas: list[float]
    loss: list[float]

    @property
    def halfway(self) -> float:
        """The loss at α = ½ (NaN if ½ was not evaluated)."""
        return self.loss[self.alphas.index(0.5)] if 0.5 in self.alphas else float("nan")


def _states(a: Learner, b: Learner) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The floating parameters and buffers of two learners, refusing different architectures."""
    if type(a) is not type(b):
        raise ValueError(
            f"interpolation needs two learners of the same architecture; got {type(a).__name__} and {type(b).__name__}"
        )
    state_a = {k: v for k, v in a.state_dict().items() if v.is_floating_point()}
    state_b = {k: v for k, v in b.state_dict().items() if v.is_floating_point()}
    mismatched = [k for k in state_a if k not in state_b or state_a[k].shape != state_b[k].shape]
    if mismatched or set(state_b) - set(state_a):
        raise ValueError(
            f"interpolation needs learners with the same parameter names and shapes; these differ: "
            f"{sorted(set(mismatched) | (set(state_b) - set(state_a)))}"
        )
    return state_a, state_b


@torch.no_grad()
def interpolation_losses(
    a: Learner, b: Learner, episode: Episode, alphas: Sequence[float] = (0.0, 0.5, 1.0)
) -> Interpolation:
    """The query task loss of ``(1 − α) θ_a + α θ_b`` for each α (θ: every floating parameter and buffer).

    Raises:
        ValueError: if ``a`` and ``b`` differ in class or in parameter names or shapes.
    """
    state_a, state_b = _states(a, b)
    was_training = a.training
    a.eval()
    try:
        losses = []
        for alpha in alphas:
            mixed = {k: torch.lerp(state_a[k], state_b[k].to(state_a[k]), float(alpha)) for k in state_a}
            predictions = functional_call(a, mixed, (episode,))
            losses.append(episode.kind.loss(predictions, episode.y_query).item())
    finally:
        a.train(was_training)
    return Interpolation([float(alpha) for alpha in alphas], losses)


def gd_construction(learner: Learner, lr: float, steps: int) -> Learner | None:
    """The exact ``steps``-step GD construction in ``learner``'s architecture, or None where there is none.

    Learners that declare ``Capability.GD_CONSTRUCTION`` have one for ``steps == learner.gd_steps``
    (``LinearSelfAttention``: ``from_gd`` with its layers, heads and parameterisation), on their device and dtype.
    """
    if not provides(learner, Capability.GD_CONSTRUCTION) or learner.gd_steps != steps:
        return None
    return learner.gd_construction(lr)


@torch.no_grad()
def align_scales(a: Learner, b: Learner) -> Learner:
    """A copy of ``a`` computing the same function, each FULL LSA head rescaled toward ``b``'s factors.

    Per layer and head, ``W_PV ← s W_PV`` and ``W_KQ ← W_KQ / s`` with
    ``|s| = sqrt(‖W_KQ^a‖ ‖W_PV^b‖ / (‖W_PV^a‖ ‖W_KQ^b‖))`` (equal factor-norm ratios) and the sign of
    ``⟨W_PV^a, W_PV^b⟩``. Other learners (and DIAG/GD++ LSA, whose scalars have no such symmetry) come
    back unchanged.
    """
    if not (isinstance(a, LinearSelfAttention) and isinstance(b, LinearSelfAttention)
            and a.parameterization == "full" and b.parameterization == "full"):
        return a
    aligned = copy.deepcopy(a)
    tiny = torch.finfo(a.pv.dtype).tiny
    norm = lambda t: t.flatten(2).norm(dim=-1).clamp_min(tiny)  # noqa: E731  [layers, heads]
    pv_b, kq_b = b.pv.to(a.pv), b.kq.to(a.kq)
    scale = (norm(a.kq) * norm(pv_b) / (norm(a.pv) * norm(kq_b))).sqrt()
    sign = torch.where((a.pv * pv_b).flatten(2).sum(-1) < 0, -1.0, 1.0).to(scale)
    factor = (sign * scale)[..., None, None]
    aligned.pv.copy_(a.pv * factor)
    aligned.kq.copy_(a.kq / factor)
    return aligned
