"""Ignore-k update pruning (Sun et al. 2025, "How new data permeates LLM knowledge and how to dilute it").

Learning one surprising fact moves a few weights a lot, and those large moves are what spreads the fact into
unrelated contexts ("priming"). Ignore-k drops them: of each parameter's update, the ``fraction`` of coordinates
with the largest magnitude are set to zero and the rest are applied unchanged. Our reading of the paper, stated
because it is a choice: the pruned quantity is the *final* update (after the optimizer's rule and its learning
rate, i.e. the change of the weights), the largest ones are dropped (not the smallest, as in sparsification),
per parameter tensor, and the kept coordinates are not rescaled. Since a param group's ``lr`` scales every
coordinate alike, pruning before or after it drops the same coordinates, so :func:`pruned` works unchanged
through ``as_torch_optimizer``.

    opt = pruned(adam(1e-3), 0.1)   # Adam, with the top 10% of each tensor's update ignored
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from optimizers._checks import non_negative_float
from optimizers.base import GradientTransformation, Hyperparameters, chain, stateless, tree_map

__all__ = ["ignore_top_k", "pruned", "top_k_mask"]


def _check_fraction(fraction: float, owner: str) -> float:
    fraction = non_negative_float("fraction", fraction, owner=owner)
    if fraction >= 1:
        raise ValueError(f"{owner}: fraction must be in [0, 1) (the share of each update's coordinates dropped); "
                         f"got {fraction!r}")
    return fraction


def top_k_mask(update: Tensor, fraction: float) -> Tensor:
    """1 where ``update`` is kept, 0 on its ``floor(fraction * numel)`` largest-magnitude coordinates (ties broken
    by position, so exactly that many are dropped)."""
    count = int(fraction * update.numel())
    flat = update.detach().reshape(-1)
    mask = torch.ones_like(flat)
    if count:
        mask = mask.scatter(0, flat.abs().topk(count).indices, 0.0)
    return mask.view_as(update)


def ignore_top_k(fraction: float) -> GradientTransformation:
    """Zero the largest-magnitude ``fraction`` of each parameter's update (place it last in a chain).

    The kept coordinates pass through unchanged, so the transform is differentiable in the updates (and in
    whatever they are made from, such as a tensor learning rate) with gradient 1 on kept and 0 on dropped ones.
    """
    fraction = _check_fraction(fraction, "ignore_top_k")
    return stateless(lambda updates, params: tree_map(lambda u: u * top_k_mask(u, fraction), updates))


class _Pruned(NamedTuple):
    """The factory recorded by :func:`pruned`: the inner optimizer's factory, then the same pruning."""

    factory: Callable[..., GradientTransformation]
    fraction: float

    def __call__(self, **kwargs: Any) -> GradientTransformation:
        return pruned(self.factory(**kwargs), self.fraction)


def pruned(optimizer: GradientTransformation, fraction: float) -> GradientTransformation:
    """``optimizer`` whose every update has its top ``fraction`` of coordinates ignored (:func:`ignore_top_k`).

    The options ``as_torch_optimizer`` reads (learning rate, betas, ...) stay ``optimizer``'s.
    """
    fraction = _check_fraction(fraction, "pruned")
    transform = chain(optimizer, ignore_top_k(fraction))
    spec = optimizer.hyperparams if isinstance(optimizer, GradientTransformation) else None
    recorded = None if spec is None else Hyperparameters(_Pruned(spec.factory, fraction), dict(spec.kwargs))
    return transform._replace(hyperparams=recorded)
