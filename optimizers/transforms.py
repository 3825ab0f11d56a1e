"""Small gradient transforms, the building blocks of every optimizer (optax's ``scale_by_*`` pieces).

Each ``scale_by_*`` returns an update *direction* (to be subtracted); :func:`scale_by_learning_rate` ends a
chain with the minus sign and the step size. Every stateful transform keeps its state in the named tuple right
above its factory; dict-valued fields have one tensor per parameter, shaped and typed like it, and ``count``
fields are int64 scalars counting the updates done so far. No operation of an ``update`` is in place.

Each direction also carries its in-place kernel ``apply_`` (:class:`~optimizers.base.InPlaceUpdate`), written
right after its ``update``: the same rule for a caller that keeps no graph, advancing the state tensors in place
and adding ``scale[k] * d_k`` into ``targets[k]``. It exists only for plain-number hyper-parameters (a tensor one may
be meta-learned, so it stays on the pure path). Kernels that use torch's private fused kernels reach them through
:mod:`optimizers._torch_kernels`, and only there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from optimizers import _torch_kernels as kernels
from optimizers._checks import check_hyperparameter
from optimizers.base import (
    GradientTransformation,
    InPlaceFn,
    InPlaceUpdate,
    Params,
    Scalar,
    Schedule,
    identity,
    stateless,
    tree_map,
    zeros_like_tree,
)

__all__ = [
    "ScaleByAdamState",
    "ScaleByLionState",
    "ScaleByRmsState",
    "ScaleByRssState",
    "ScaleByScheduleState",
    "TraceState",
    "add_decayed_weights",
    "maybe",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_lion",
    "scale_by_rms",
    "scale_by_rss",
    "scale_by_schedule",
    "scale_by_sign",
    "trace",
]


def _count() -> Tensor:
    return torch.zeros((), dtype=torch.int64)


def _bias_correction(decay: Scalar, count: Tensor, like: Tensor) -> Tensor:
    """``1 - decay**count`` in the dtype of ``like`` (float64 parameters get a float64 correction, as in torch)."""
    return 1.0 - torch.as_tensor(decay, dtype=like.dtype) ** count.to(like.dtype)


def _columns(grads: Params, *trees: Mapping) -> list[list]:
    """Each tree's values in the key order of ``grads``: the lists a foreach kernel takes."""
    return [[tree[k] for k in grads] for tree in trees]


def _with_kernel(init, update, apply_: InPlaceFn, *hyperparameters: Scalar) -> GradientTransformation:
    """The transform with its in-place kernel, or without it when a hyper-parameter is a tensor."""
    if any(isinstance(h, Tensor) for h in hyperparameters):
        return GradientTransformation(init, update)
    return GradientTransformation(init, InPlaceUpdate(update, apply_))


def _ema(old: Tensor, new: Tensor, decay: Scalar) -> Tensor:
    """``decay * old + (1 - decay) * new`` in one fused, differentiable op (``torch.lerp``, as torch's Adam)."""
    return torch.lerp(old, new, 1.0 - decay)


def scale(factor: Scalar) -> GradientTransformation:
    """Multiply the updates by ``factor``."""
    check_hyperparameter("factor", factor)
    return stateless(lambda updates, params: tree_map(lambda u: factor * u, updates))


class ScaleByScheduleState(NamedTuple):
    """State of :func:`scale_by_schedule`."""

    count: Tensor  # int64 [], updates done so far (the schedule's argument)


def scale_by_schedule(schedule: Schedule) -> GradientTransformation:
    """Multiply the updates by ``schedule(count)``, ``count`` being the number of earlier updates."""
    if not callable(schedule):
        raise ValueError(f"schedule must be callable count -> value; got {schedule!r}")

    def init(params: Params) -> ScaleByScheduleState:
        del params
        return ScaleByScheduleState(count=_count())

    def update(grads, state, params=None, *, loss=None):
        del params, loss
        factor = schedule(state.count)
        updates = tree_map(lambda g: (factor * g).to(g.dtype), grads)
        return updates, ScaleByScheduleState(count=state.count + 1)

    return GradientTransformation(init, update)


def scale_by_learning_rate(lr: Scalar | Schedule, *, flip_sign: bool = True) -> GradientTransformation:
    """Multiply by ``-lr`` (``lr`` a number, a tensor that may require grad, or a schedule of the step count)."""
    sign = -1.0 if flip_sign else 1.0
    if callable(lr) and not isinstance(lr, Tensor):
        return scale_by_schedule(lambda count: sign * lr(count))
    check_hyperparameter("lr", lr, low=0.0)
    return scale(sign * lr)


def add_decayed_weights(weight_decay: Scalar) -> GradientTransformation:
    """Add ``weight_decay * params`` to the updates (decoupled weight decay when placed after the direction)."""
    check_hyperparameter("weight_decay", weight_decay, low=0.0)

    def add(updates, params):
        if params is None:
            raise ValueError("add_decayed_weights needs params; call update(grads, state, params)")
        return tree_map(lambda u, p: u + weight_decay * p, updates, params)

    return stateless(add)


class TraceState(NamedTuple):
    """State of :func:`trace`."""

    trace: Params  # momentum buffer b_t, like params


def trace(decay: Scalar, *, nesterov: bool = False) -> GradientTransformation:
    """Heavy-ball momentum (Polyak 1964) as in ``torch.optim.SGD``: ``b_t = decay * b_{t-1} + g_t``.

    The direction is ``b_t``, or ``g_t + decay * b_t`` with ``nesterov=True`` (Sutskever et al. 2013).
    """
    check_hyperparameter("momentum", decay, low=0.0, high=1.0)

    def init(params: Params) -> TraceState:
        return TraceState(trace=zeros_like_tree(params))

    def update(grads, state, params=None, *, loss=None):
        del params, loss
        new_trace = tree_map(lambda g, b: decay * b + g, grads, state.trace)
        updates = tree_map(lambda g, b: g + decay * b, grads, new_trace) if nesterov else new_trace
        return updates, TraceState(trace=new_trace)

    def apply_(targets, grads, state, params=None, *, loss=None, scale, workspace):
        del params, loss, workspace
        t, g, b, c = _columns(grads, targets, grads, state.trace, scale)
        kernels.momentum_(t, g, b, scales=c, beta=float(decay), nesterov=nesterov)
        return state

    return _with_kernel(init, update, apply_, decay)


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam`."""

    count: Tensor  # int64 [], updates done so far
    mu: Params  # first moment m_t (EMA of gradients), like params
    nu: Params  # second moment v_t (EMA of squared gradients), like params


def scale_by_adam(
    b1: Scalar = 0.9, b2: Scalar = 0.999, eps: Scalar = 1e-8, *, eps_root: Scalar = 0.0
) -> GradientTransformation:
    """Adam's direction (Kingma & Ba 2015): ``m̂_t / (sqrt(v̂_t + eps_root) + eps)`` with bias-corrected moments.

    ``eps_root > 0`` keeps the meta-gradient finite where a gradient entry is exactly zero (``d sqrt(v)/dv``).
    """
    check_hyperparameter("b1", b1, low=0.0, high=1.0)
    check_hyperparameter("b2", b2, low=0.0, high=1.0)
    check_hyperparameter("eps", eps, low=0.0)
    check_hyperparameter("eps_root", eps_root, low=0.0)

    def init(params: Params) -> ScaleByAdamState:
        return ScaleByAdamState(count=_count(), mu=zeros_like_tree(params), nu=zeros_like_tree(params))

    def update(grads, state, params=None, *, loss=None):
        del params, loss
        count = state.count + 1
        mu = tree_map(lambda g, m: _ema(m, g, b1), grads, state.mu)
        nu = tree_map(lambda g, v: _ema(v, g * g, b2), grads, state.nu)

        def direction(m: Tensor, v: Tensor) -> Tensor:
            correction2 = _bias_correction(b2, count, v)
            if isinstance(eps_root, Tensor) or eps_root != 0:
                denom = torch.sqrt(v / correction2 + eps_root) + eps
            else:  # fewer passes over memory, and torch's exact expression
                denom = torch.sqrt(v) / torch.sqrt(correction2) + eps
            return m / denom / _bias_correction(b1, count, m)

        return tree_map(direction, mu, nu), ScaleByAdamState(count=count, mu=mu, nu=nu)

    def apply_(targets, grads, state, params=None, *, loss=None, scale, workspace):
        del params, loss
        count = state.count + 1
        t, g, m, v, tmp, c = _columns(grads, targets, grads, state.mu, state.nu, workspace.like(grads), scale)
        kernels.adam_(t, g, m, v, tmp, scales=c, count=int(count), b1=float(b1), b2=float(b2), eps=float(eps),
                      eps_root=float(eps_root))
        return ScaleByAdamState(count=count, mu=state.mu, nu=state.nu)

    return _with_kernel(init, update, apply_, b1, b2, eps, eps_root)


class ScaleByRmsState(NamedTuple):
    """State of :func:`scale_by_rms`."""

    nu: Params  # EMA of squared gradients, like params
    mu: Params  # EMA of gradients when centered, like params; empty dict otherwise


def scale_by_rms(
    decay: Scalar = 0.99, eps: Scalar = 1e-8, *, centered: bool = False, eps_root: Scalar = 0.0
) -> GradientTransformation:
    """RMSProp's direction (Tieleman & Hinton 2012) as in ``torch.optim.RMSprop``: ``g_t / (sqrt(v_t) + eps)``.

    ``v_t = decay * v_{t-1} + (1 - decay) * g_t^2``; ``centered=True`` subtracts the squared EMA of gradients
    from ``v_t`` (Graves 2013). No bias correction, as in torch.
    """
    check_hyperparameter("alpha", decay, low=0.0, high=1.0)
    check_hyperparameter("eps", eps, low=0.0)
    check_hyperparameter("eps_root", eps_root, low=0.0)

    def init(params: Params) -> ScaleByRmsState:
        return ScaleByRmsState(nu=zeros_like_tree(params), mu=zeros_like_tree(params) if centered else {})

    def update(grads, state, params=None, *, loss=None):
        del params, loss
        nu = tree_map(lambda g, v: _ema(v, g * g, decay), grads, state.nu)
        mu = tree_map(lambda g, m: _ema(m, g, decay), grads, state.mu) if centered else {}
        variance = tree_map(lambda v, m: v - m * m, nu, mu) if centered else nu
        updates = tree_map(lambda g, v: g / (torch.sqrt(v + eps_root) + eps), grads, variance)
        return updates, ScaleByRmsState(nu=nu, mu=mu)

    def apply_(targets, grads, state, params=None, *, loss=None, scale, workspace):
        del params, loss
        if not centered:
            t, g, v, tmp, c = _columns(grads, targets, grads, state.nu, workspace.like(grads), scale)
            kernels.rmsprop_(t, g, v, tmp, scales=c, alpha=float(decay), eps=float(eps), eps_root=float(eps_root))
            return state
        columns = _columns(grads, targets, grads, state.nu, state.mu, workspace.like(grads), scale)
        for target, g, v, m, tmp, c in zip(*columns):
            v.lerp_(torch.mul(g, g, out=tmp), 1.0 - decay)
            m.lerp_(g, 1.0 - decay)
            variance = torch.addcmul(v, m, m, value=-1.0, out=tmp)
            target.addcdiv_(g, variance.add_(eps_root).sqrt_().add_(eps), value=c)
        return state

    return _with_kernel(init, update, apply_, decay, eps, eps_root)


class ScaleByRssState(NamedTuple):
    """State of :func:`scale_by_rss`."""

    sum_of_squares: Params  # running sum of squared gradients, like params


def scale_by_rss(eps: Scalar = 1e-10, *, initial_accumulator_value: Scalar = 0.0) -> GradientTransformation:
    """Adagrad's direction (Duchi et al. 2011) as in ``torch.optim.Adagrad``: ``g_t / (sqrt(sum_s g_s^2) + eps)``."""
    check_hyperparameter("eps", eps, low=0.0)
    check_hyperparameter("initial_accumulator_value", initial_accumulator_value, low=0.0)

    def init(params: Params) -> ScaleByRssState:
        return ScaleByRssState(sum_of_squares=tree_map(lambda p: torch.full_like(p, initial_accumulator_value), params))

    def update(grads, state, params=None, *, loss=None):
        del params, loss
        sos = tree_map(lambda g, s: s + g * g, grads, state.sum_of_squares)
        updates = tree_map(lambda g, s: g / (torch.sqrt(s) + eps), grads, sos)
        return updates, ScaleByRssState(sum_of_squares=sos)

    def apply_(targets, grads, state, params=None, *, loss=None, scale, workspace):
        del params, loss
        for target, g, s, tmp, c in zip(*_columns(grads, targets, grads, state.sum_of_squares, workspace.like(grads),
                                                  scale)):
            target.addcdiv_(g, torch.sqrt(s.addcmul_(g, g), out=tmp).add_(eps), value=c)
        return state

    return _with_kernel(init, update, apply_, eps)


def scale_by_sign() -> GradientTransformation:
    """Sign descent's direction (signSGD, Bernstein et al. 2018): ``sign(g_t)``."""

    def apply_(targets, grads, state, params=None, *, loss=None, scale, workspace):
        del params, loss
        for target, g, tmp, c in zip(*_columns(grads, targets, grads, workspace.like(grads), scale)):
            target.add_(torch.sign(g, out=tmp), alpha=c)
        return state

    return stateless(lambda updates, params: tree_map(torch.sign, updates), apply_=apply_)


class ScaleByLionState(NamedTuple):
    """State of :func:`scale_by_lion`."""

    mu: Params  # momentum m_t (EMA of gradients with rate b2), like params


def scale_by_lion(b1: Scalar = 0.9, b2: Scalar = 0.99) -> GradientTransformation:
    """Lion's direction (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

    ``d_t = sign(b1 * m_{t-1} + (1 - b1) * g_t)`` and then ``m_t = b2 * m_{t-1} + (1 - b2) * g_t``.
    """
    check_hyperparameter("b1", b1, low=0.0, high=1.0)
    check_hyperparameter("b2", b2, low=0.0, high=1.0)

    def init(params: Params) -> ScaleByLionState:
        return ScaleByLionState(mu=zeros_like_tree(params))

    def update(grads, state, params=None, *, loss=None):
        del params, loss
        updates = tree_map(lambda g, m: torch.sign(_ema(m, g, b1)), grads, state.mu)
        mu = tree_map(lambda g, m: _ema(m, g, b2), grads, state.mu)
        return updates, ScaleByLionState(mu=mu)

    def apply_(targets, grads, state, params=None, *, loss=None, scale, workspace):
        del params, loss
        for target, g, m, tmp, c in zip(*_columns(grads, targets, grads, state.mu, workspace.like(grads), scale)):
            target.add_(torch.lerp(m, g, 1.0 - b1, out=tmp).sign_(), alpha=c)
            m.lerp_(g, 1.0 - b2)
        return state

    return _with_kernel(init, update, apply_, b1, b2)


def maybe(condition: bool, transform: Callable[[], GradientTransformation]) -> GradientTransformation:
    """``transform()`` when ``condition`` holds, else :func:`identity` (for optional pieces of a chain)."""
    return transform() if condition else identity()
