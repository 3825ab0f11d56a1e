"""The functional optimizer contract: a pair of pure functions on dicts of tensors.

An optimizer is a :class:`GradientTransformation`, a named tuple of ``init(params) -> state`` and
``update(grads, state, params=None, *, loss=None) -> (updates, state)``, as in optax
(``optax/_src/base.py``). Nothing is modified in place, so the functions run under ``torch.func.grad`` /
``torch.func.vmap`` and meta-gradients flow through them into tensor-valued hyper-parameters. ``loss`` is
the current training loss; hand-designed transforms ignore it, learned optimizers use it as a feature.

A gradient may be ``None`` (an unused parameter, as TorchOpt passes it): its update is ``None``, its state
entries and its step count stay as they were, and :func:`apply_updates` leaves the parameter alone, which is
what ``torch.optim`` does for a parameter without ``.grad``. Optimizers work on real tensors; a complex
parameter is refused at ``init`` (``as_torch_optimizer`` views complex parameters as real, as ``torch.optim``).

A transform may also carry an in-place kernel (:class:`InPlaceUpdate`): the same rule, advancing its state
tensors in place and adding its updates into given tensors, for a caller that keeps no autograd graph (the
``torch.optim`` bridge, :class:`~optimizers.LayerwiseMixture` without a graph). :func:`apply_in_place` uses the
kernel where there is one and the pure update otherwise, so a transform without a kernel is slower, never wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
    "Hyperparameters",
    "InPlaceUpdate",
    "OptState",
    "Params",
    "Scalar",
    "Schedule",
    "Updates",
    "Workspace",
    "apply_in_place",
    "apply_updates",
    "chain",
    "check_real",
    "identity",
    "present",
    "stateless",
    "tree_map",
    "tree_update",
    "zeros_like_tree",
]


class InitFn(Protocol):
    def __call__(self, params: Params) -> OptState: ...


class UpdateFn(Protocol):
    def __call__(
        self, grads: Updates, state: OptState, params: Params | None = None, *, loss: Tensor | None = None
    ) -> tuple[Updates, OptState]: ...


class Hyperparameters(NamedTuple):
    """How a transform was built: ``factory(**kwargs)`` builds it again.

    The public optimizers and directions (:mod:`optimizers.alias`) and the learned optimizers' ``optimizer()``
    record it, so that ``as_torch_optimizer`` can rebuild them with a param group's options (``betas``,
    ``weight_decay``, ...) and a pickled optimizer can be rebuilt from a module-level factory.
    """

    factory: Callable[..., GradientTransformation]
    kwargs: dict[str, Any]


class GradientTransformation(NamedTuple):
    """A functional optimizer (or a piece of one): ``init`` builds the state, ``update`` maps gradients to updates.

    The updates are *added* to the parameters (:func:`apply_updates`), so a descent step carries its minus sign.
    ``hyperparams`` says how to build it again (``None`` for a hand-made chain); with it the transform pickles
    as its factory and arguments.
    """

    init: InitFn
    update: UpdateFn
    hyperparams: Hyperparameters | None = None

    def __reduce__(self) -> tuple:
        if self.hyperparams is None:
            return (GradientTransformation, tuple(self))
        return (_rebuild, tuple(self.hyperparams))


def _rebuild(factory: Callable[..., GradientTransformation], kwargs: dict[str, Any]) -> GradientTransformation:
    return factory(**kwargs)


class EmptyState(NamedTuple):
    """State of a stateless transform."""


def tree_map(fn: Callable[..., Tensor], tree: Params, *rest: Params) -> Params:
    """Apply ``fn`` key by key to one or more dicts with the same keys; a ``None`` in ``tree`` stays ``None``."""
    return {k: None if v is None else fn(v, *(r[k] for r in rest)) for k, v in tree.items()}


def tree_update(fn: Callable[..., Tensor], grads: Updates, state: Params, *rest: Params) -> Params:
    """``fn(grads[k], state[k], *rest[k])`` key by key, keeping ``state[k]`` where the gradient is ``None``."""
    return {k: s if grads[k] is None else fn(grads[k], s, *(r[k] for r in rest)) for k, s in state.items()}


def apply_updates(params: Params, updates: Updates) -> Params:
    """Return ``params + updates`` key by key (out of place, so differentiable); a ``None`` update leaves it."""
    return {k: p if updates[k] is None else p + updates[k].to(p.dtype) for k, p in params.items()}


def identity() -> GradientTransformation:
    """The transform that returns the gradients unchanged (the plain SGD direction)."""

    def add_(targets, grads, state, params=None, *, loss=None, scale, workspace):
        del params, loss, workspace
        for k, target in targets.items():
            target.add_(grads[k], alpha=scale[k])
        return state

    return stateless(lambda updates, params: updates, apply_=add_)


def stateless(
    fn: Callable[[Updates, Params | None], Updates], *, apply_: InPlaceFn | None = None
) -> GradientTransformation:
    """Wrap ``fn(updates, params) -> updates`` as a transform with an empty state (and ``apply_`` its kernel)."""

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(grads, state, params=None, *, loss=None):
        del loss
        return fn(grads, params), state

    return GradientTransformation(init, update if apply_ is None else InPlaceUpdate(update, apply_))


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
    """Zeros shaped like each parameter (detached from nothing: they are fresh leaves); complex ones are refused."""
    check_real(params)
    return {k: torch.zeros_like(p) for k, p in params.items()}


def check_real(params: Params) -> None:
    """Refuse complex parameters: the optimizers' rules are written for real tensors."""
    for k, p in params.items():
        if p is not None and p.is_complex():
            raise ValueError(
                f"parameter {k!r} is complex ({p.dtype}); functional optimizers take real tensors: pass "
                "torch.view_as_real(p) (what torch.optim and as_torch_optimizer do with a complex parameter)"
            )


# --- the in-place fast path ------------------------------------------------------------------------------------------


class Workspace:
    """Temporaries lent to in-place kernels and kept across steps: per dtype and device one buffer, cut per key.

    Kept, because a large fresh allocation is fresh pages, and faulting them in costs about as much as the
    arithmetic done on them. A kernel may overwrite what :meth:`like` returns, during its own call only.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        self._views: tuple[tuple, Params] = ((), {})

    def like(self, tensors: Params) -> Params:
        """A tensor shaped and typed like each of ``tensors`` (``None`` ones skipped), none sharing memory with
        another; contents undefined."""
        tensors = {k: t for k, t in tensors.items() if t is not None}
        layout = tuple((k, t.shape, t.dtype, t.device) for k, t in tensors.items())
        if layout == self._views[0]:
            return self._views[1]
        sizes: dict[tuple[torch.dtype, torch.device], int] = {}
        for t in tensors.values():
            sizes[t.dtype, t.device] = sizes.get((t.dtype, t.device), 0) + t.numel()
        for key, size in sizes.items():
            if key not in self._buffers or self._buffers[key].numel() < size:
                self._buffers[key] = torch.empty(size, dtype=key[0], device=key[1])
        offsets = dict.fromkeys(sizes, 0)
        views = {}
        for k, t in tensors.items():
            start = offsets[t.dtype, t.device]
            views[k] = self._buffers[t.dtype, t.device][start : start + t.numel()].view(t.shape)
            offsets[t.dtype, t.device] = start + t.numel()
        self._views = (layout, views)
        return views


class InPlaceFn(Protocol):
    def __call__(
        self, targets: Params, grads: Updates, state: OptState, params: Params | None = None, *,
        loss: Tensor | None = None, scale: Mapping[str, float], workspace: Workspace,
    ) -> OptState: ...


class InPlaceUpdate:
    """An ``update`` that carries its in-place kernel ``apply_``, the fast path of a step that keeps no graph.

    Calling it is the pure ``update(grads, state, params, *, loss) -> (updates, state)``.
    ``apply_(targets, grads, state, params, *, loss, scale, workspace) -> state`` adds ``scale[k] * updates[k]``
    to ``targets[k]`` in place for every key of ``grads`` whose gradient is not ``None`` (``targets`` and
    ``scale`` hold those keys) (foreach-style, over all of them in one call) and returns
    the next state, which may hold the very tensors of ``state``, overwritten. It is only for a caller that owns
    the state, runs under ``torch.no_grad()`` and holds ordinary tensors (not ``torch.func`` wrappers); its
    temporaries come from ``workspace``. Up to rounding it must equal the pure update, which
    ``tests/test_inplace_kernels.py`` checks for every direction in :data:`optimizers.DIRECTIONS`.
    """

    def __init__(self, update: UpdateFn, apply_: InPlaceFn) -> None:
        self._update = update
        self.apply_ = apply_

    def __call__(
        self, grads: Updates, state: OptState, params: Params | None = None, *, loss: Tensor | None = None
    ) -> tuple[Updates, OptState]:
        return self._update(grads, state, params, loss=loss)


def apply_in_place(
    transform: GradientTransformation, targets: Params, grads: Updates, state: OptState, params: Params | None = None,
    *, loss: Tensor | None = None, scale: Mapping[str, float], workspace: Workspace,
) -> OptState:
    """``targets[k] += scale[k] * updates[k]`` in place; return the next state (see :class:`InPlaceUpdate`).

    Through the transform's kernel when its ``update`` is an :class:`InPlaceUpdate`, else through its pure update.
    """
    if isinstance(transform.update, InPlaceUpdate):
        return transform.update.apply_(targets, grads, state, params, loss=loss, scale=scale, workspace=workspace)
    updates, state = transform.update(grads, state, params, loss=loss)
    for k, target in targets.items():
        target.add_(updates[k].to(target.dtype), alpha=scale[k])
    return state


def present(grads: Updates) -> list[str]:
    """The keys whose gradient is not ``None`` (the ones an update moves)."""
    return [k for k, g in grads.items() if g is not None]
