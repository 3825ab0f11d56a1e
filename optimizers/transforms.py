"""Small gradient transforms, the building blocks of every optimizer (optax's ``scale_by_*`` pieces).

Each ``scale_by_*`` returns an update *direction* (to be subtracted); :func:`scale_by_learning_rate` ends a
chain with the minus sign and the step size. Every stateful transform keeps its state in the named tuple right
above its factory; dict-valued fields have one tensor per parameter, shaped and typed like it, and ``count``
fields hold one int64 scalar per parameter counting the updates of that parameter so far (a parameter whose
gradient is ``None`` is not updated, as in ``torch.optim``). No operation of an ``update`` is in place.

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
    apply_in_place,
    Scalar,
    Schedule,
    check_real,
    identity,
    present,
    stateless,
    tree_map,
    tree_update,
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
    "maximize",
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


def _counts(params: Params) -> Params:
    return {k: torch.zeros((), dtype=torch.int64) for k in params}


def _advance(grads: Params, counts: Params) -> Params:
    """Each parameter's count plus one, where it has a gradient."""
    return tree_update(lambda g, c: c + 1, grads, counts)


def _sqrt(value: Tensor, floor: Scalar = 0.0) -> Tensor:
    """``sqrt(value)``; under autograd its gradient at 0 is 0 rather than inf, unless ``value >= floor > 0``.

    Where a gradient entry is exactly 0 the second moment is 0, and ``d sqrt(v)/dv = inf`` times ``dv/dg = 0``
    would make a meta-gradient NaN (MAML through Adam with ``eps_root = 0``). The value is the same to the bit.
    A positive number ``floor`` (``eps_root``, Adagrad's initial accumulator) bounds ``value`` away from 0: then
    the plain square root, which keeps no mask for the backward pass.
    """
    if not torch.is_grad_enabled() or (isinstance(floor, float | int) and floor > 0):
        return torch.sqrt(value)
    zero = value == 0
    return torch.where(zero, 0.0, torch.sqrt(torch.where(zero, 1.0, value)))


def _bias_correction(decay: Scalar, count: Tensor, like: Tensor) -> Tensor:
    """``1 - decay**count`` in the dtype of ``like`` (float64 parameters get a float64 correction, as in torch)."""
    return 1.0 - torch.as_tensor(decay, dtype=like.dtype) ** count.to(like.dtype)


def _columns(grads: Params, *trees: Mapping) -> list[list]:
    """Each tree's values for the keys of ``grads`` that have a gradient, in order: the lists a foreach kernel takes."""
    keys = present(grads)
    return [[tree[k] for k in keys] for tree in trees]


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

    count: Params  # int64 [] per parameter, its updates so far (the schedule's argument)


def scale_by_schedule(schedule: Schedule) -> GradientTransformation:
    """Multiply each parameter's update by ``schedule(count)``, ``count`` being the number of its earlier updates."""
    if not callable(schedule):
        raise ValueError(f"schedule must be callable count -> value; got {schedule!r}")

    def init(params: Params) -> ScaleByScheduleState:
        return ScaleByScheduleState(count=_counts(params))

    def update(grads, state, params=None, *, loss=None):
        del params, loss
        updates = tree_map(lambda g, c: (schedule(c) * g).to(g.dtype), grads, state.count)
        return updates, ScaleByScheduleState(count=_advance(grads, state.count))

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
    count: Params  # with dampening: int64 [] per parameter, its updates so far; empty dict otherwise


def trace(decay: Scalar, *, nesterov: bool = False, dampening: Scalar = 0.0) -> GradientTransformation:
    """Heavy-ball momentum (Polyak 1964) as in ``torch.optim.SGD``: ``b_t = decay * b_{t-1} + (1 - dampening) g_t``.

    The first step sets ``b_1 = g_1`` (undamped, as torch). The direction is ``b_t``, or ``g_t + decay * b_t``
    with ``nesterov=True`` (Sutskever et al. 2013), which needs ``dampening = 0``.
    """
    check_hyperparameter("momentum", decay, low=0.0, high=1.0)
    check_hyperparameter("dampening", dampening, low=0.0, high=1.0, high_inclusive=True)
    damped = not isinstance(dampening, float | int) or dampening != 0
    if nesterov and damped:
        raise ValueError(f"nesterov=True needs dampening=0 (as torch.optim.SGD); got dampening={dampening!r}")

    def init(params: Params) -> TraceState:
        return TraceState(trace=zeros_like_tree(params), count=_counts(params) if damped else {})

    def step(g: Tensor, b: Tensor, count: Tensor) -> Tensor:
        return torch.where(count == 0, g, decay * b + (1.0 - dampening) * g)

    def update(grads, state, params=None, *, loss=None):
        del params, loss
        if damped:
            new_trace = tree_update(step, grads, state.trace, state.count)
        else:
            new_trace = tree_update(lambda g, b: decay * b + g, grads, state.trace)
        if nesterov:
            updates = tree_map(lambda g, b: g + decay * b, grads, new_trace)
        else:
            updates = tree_map(lambda g, b: b, grads, new_trace)
        return updates, TraceState(trace=new_trace, count=_advance(grads, state.count) if damped else {})

    def apply_(targets, grads, state, params=None, *, loss=None, scale, workspace):
        del params, loss, workspace
        t, g, b, c = _columns(grads, targets, grads, state.trace, scale)
        kernels.momentum_(t, g, b, scales=c, beta=float(decay), nesterov=nesterov)
        return state

    if damped:
        return GradientTransformation(init, update)
    return _with_kernel(init, update, apply_, decay)


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam`."""

    count: Params  # int64 [] per parameter, its updates so far
    mu: Params  # first moment m_t (EMA of gradients), like params
    nu: Params  # second moment v_t (EMA of squared gradients), like params
    nu_max: Params  # with amsgrad: the running maximum of v_t, like params; empty dict otherwise


def scale_by_adam(
    b1: Scalar = 0.9, b2: Scalar = 0.999, eps: Scalar = 1e-8, *, eps_root: Scalar = 0.0, amsgrad: bool = False
) -> GradientTransformation:
    """Adam's direction (Kingma & Ba 2015): ``m̂_t / (sqrt(v̂_t + eps_root) + eps)`` with bias-corrected moments.

    ``amsgrad=True`` divides by the running maximum of ``v_t`` instead (Reddi et al. 2018, as torch). The
    meta-gradient stays finite where a gradient entry is exactly zero (see :func:`_sqrt`); ``eps_root > 0``
    also bounds ``d sqrt(v)/dv`` near zero.
    """
    check_hyperparameter("b1", b1, low=0.0, high=1.0)
    check_hyperparameter("b2", b2, low=0.0, high=1.0)
    check_hyperparameter("eps", eps, low=0.0)
    check_hyperparameter("eps_root", eps_root, low=0.0)

    def init(params: Params) -> ScaleByAdamState:
        return ScaleByAdamState(count=_counts(params), mu=zeros_like_tree(params), nu=zeros_like_tree(params),
                                nu_max=zeros_like_tree(params) if amsgrad else {})

    def update(grads, state, params=None, *, loss=None):
        del params, loss
        count = _advance(grads, state.count)
        mu = tree_update(lambda g, m: _ema(m, g, b1), grads, state.mu)
        nu = tree_update(lambda g, v: _ema(v, g * g, b2), grads, state.nu)
        nu_max = tree_update(lambda g, top, v: torch.maximum(top, v), grads, state.nu_max, nu) if amsgrad else {}
        second = nu_max if amsgrad else nu

        def direction(g: Tensor, m: Tensor, v: Tensor, c: Tensor) -> Tensor:
            correction2 = _bias_correction(b2, c, v)
            if isinstance(eps_root, Tensor) or eps_root != 0:
                denom = _sqrt(v / correction2 + eps_root, eps_root) + eps
            else:  # fewer passes over memory, and torch's exact expression
                denom = _sqrt(v) / torch.sqrt(correction2) + eps
            return m / denom / _bias_correction(b1, c, m)

        updates = tree_map(direction, grads, mu, second, count)
        return updates, ScaleByAdamState(count=count, mu=mu, nu=nu, nu_max=nu_max)

    def apply_(targets, grads, state, params=None, *, loss=None, scale, workspace):
        del params, loss
        t, g, m, v, tmp, c, n = _columns(grads, targets, grads, state.mu, state.nu, workspace.like(grads), scale,
                                         state.count)
        for count in n:
            count.add_(1)
        kernels.adam_(t, g, m, v, tmp, scales=c, count=[int(k) for k in n], b1=float(b1), b2=float(b2),
                      eps=float(eps), eps_root=float(eps_root))
        return state

    if amsgrad:
        return GradientTransformation(init, update)
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
        nu = tree_update(lambda g, v: _ema(v, g * g, decay), grads, state.nu)
        mu = tree_update(lambda g, m: _ema(m, g, decay), grads, state.mu) if centered else {}

        def direction(g: Tensor, v: Tensor, k: str) -> Tensor:
            variance = v - mu[k] * mu[k] if centered else v
            return g / (_sqrt(variance + eps_root, eps_root) + eps)

        updates = {k: None if g is None else direction(g, nu[k], k) for k, g in grads.items()}
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
        check_real(params)
        return ScaleByRssState(sum_of_squares=tree_map(lambda p: torch.full_like(p, initial_accumulator_value), params))

    def update(grads, state, params=None, *, loss=None):
        del params, loss
        sos = tree_update(lambda g, s: s + g * g, grads, state.sum_of_squares)
        updates = tree_map(lambda g, s: g / (_sqrt(s, initial_accumulator_value) + eps), grads, sos)
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

    def sign(updates, params):
        del params
        check_real(updates)
        return tree_map(torch.sign, updates)

    return stateless(sign, apply_=apply_)


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
        mu = tree_update(lambda g, m: _ema(m, g, b2), grads, state.mu)
        return updates, ScaleByLionState(mu=mu)

    def apply_(targets, grads, state, params=None, *, loss=None, scale, workspace):
        del params, loss
        for target, g, m, tmp, c in zip(*_columns(grads, targets, grads, state.mu, workspace.like(grads), scale)):
            target.add_(torch.lerp(m, g, 1.0 - b1, out=tmp).sign_(), alpha=c)
            m.lerp_(g, 1.0 - b2)
        return state

    return _with_kernel(init, update, apply_, b1, b2)


def maximize(transform: GradientTransformation) -> GradientTransformation:
    """Ascend instead of descend: ``transform`` run on ``-g`` (``torch.optim``'s ``maximize=True``).

    The loss a learned optimizer reads is negated too, so it sees the objective it minimises.
    """

    def negated(grads: Params) -> Params:
        return tree_map(torch.neg, grads)

    def update(grads, state, params=None, *, loss=None):
        return transform.update(negated(grads), state, params, loss=None if loss is None else -loss)

    def apply_(targets, grads, state, params=None, *, loss=None, scale, workspace):
        return apply_in_place(transform, targets, negated(grads), state, params,
                              loss=None if loss is None else -loss, scale=scale, workspace=workspace)

    if isinstance(transform.update, InPlaceUpdate):
        return GradientTransformation(transform.init, InPlaceUpdate(update, apply_))
    return GradientTransformation(transform.init, update)


def maybe(condition: bool, transform: Callable[[], GradientTransformation]) -> GradientTransformation:
    """``transform()`` when ``condition`` holds, else :func:`identity` (for optional pieces of a chain)."""
    return transform() if condition else identity()
