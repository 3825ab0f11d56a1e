"""The functional optimizer contract: a pair of pure functions on dicts of tensors.

An optimizer is a :class:`GradientTransformation`, a named tuple of ``init(params) -> state`` and
``update(grads, state, params=None, *, loss=None) -> (updates, state)``, as in optax
(``optax/_src/base.py``). Nothing is modified in place, so the functions run under ``torch.func.grad`` /
``torch.func.vmap`` and meta-gradients flow through them into tensor-valued hyper-parameters. ``loss`` is
the current training loss; hand-designed transforms ignore it, learned optimizers use it as a feature.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

Params = dict[str, Tensor]
Updates = dict[str, Tensor]
OptState = Any  # a pytree of named tuples, tuples, dicts and tensors
Scalar = float | Tensor
Schedule = Callable[[Tensor], Scalar]

__all__ = [
    "EmptyState",
    "GradientTransformation",
    "OptState",
    "Params",
    "Scalar",
    "Schedule",
    "Updates",
    "apply_updates",
    "chain",
    "identity",
    "stateless",
    "tree_map",
    "zeros_like_tree",
]


class InitFn(Protocol):
    def __call__(self, params: Params) -> OptState: ...


class UpdateFn(Protocol):
    def __call__(
        self, grads: Updates, state: OptState, params: Params | None = None, *, loss: Tensor | None = None
    ) -> tuple[Updates, OptState]: ...


class GradientTransformation(NamedTuple):
    """A functional optimizer (or a piece of one): ``init`` builds the state, ``update`` maps gradients to updates.

    The updates are *added* to the parameters (:func:`apply_updates`), so a descent step carries its minus sign.
    """

    init: InitFn
    update: UpdateFn


class EmptyState(NamedTuple):
    """State of a stateless transform."""


def tree_map(fn: Callable[..., Tensor], tree: Params, *rest: Params) -> Params:
    """Apply ``fn`` key by key to one or more dicts with the same keys."""
    return {k: fn(v, *(r[k] for r in rest)) for k, v in tree.items()}


def apply_updates(params: Params, updates: Updates) -> Params:
    """Return ``params + updates`` key by key (out of place, so differentiable)."""
    return {k: p + updates[k].to(p.dtype) for k, p in params.items()}


def identity() -> GradientTransformation:
    """The transform that returns the gradients unchanged (the plain SGD direction)."""
    return stateless(lambda updates, params: updates)


def stateless(fn: Callable[[Updates, Params | None], Updates]) -> GradientTransformation:
    """Wrap ``fn(updates, params) -> updates`` as a transform with an empty state."""

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(grads, state, params=None, *, loss=None):
        del loss
        return fn(grads, params), state

    return GradientTransformation(init, update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Compose transforms left to right; the state is the tuple of their states."""

    def init(params: Params) -> tuple:
        return tuple(t.init(params) for t in transforms)

    def update(grads, state, params=None, *, loss=None):
        if len(state) != len(transforms):
            raise ValueError(f"chain state has {len(state)} entries; expected {len(transforms)}, one per transform")
        new_state = []
        for transform, inner in zip(transforms, state):
            grads, inner = transform.update(grads, inner, params, loss=loss)
            new_state.append(inner)
        return grads, tuple(new_state)

    return GradientTransformation(init, update)


def zeros_like_tree(params: Params) -> Params:
    """Zeros shaped like each parameter (detached from nothing: they are fresh leaves)."""
    return {k: torch.zeros_like(p) for k, p in params.items()}
