"""Public optimizers, each a chain of its update *direction* and the learning-rate step.

Every base optimizer ``foo(lr, ...)`` is ``chain(foo_direction(...), scale_by_learning_rate(lr))``: the
direction ``d_t`` is what gets subtracted, ``θ_{t+1} = θ_t - lr_t * d_t``. Learned optimizers mix the
directions listed in :data:`DIRECTIONS`. Defaults and conventions follow ``torch.optim`` so that each optimizer
reproduces its torch counterpart step for step; the options torch users expect are here under torch's names
(``weight_decay``, ``dampening``, ``amsgrad``, ``maximize``, ...). ``lr`` may be a number, a tensor (to
meta-learn it) or a schedule from :mod:`optimizers.schedules`. Every optimizer and direction here records its
arguments (:class:`~optimizers.base.Hyperparameters`), which is how ``as_torch_optimizer`` reads its learning
rate and options and rebuilds it with a param group's.

Adding a direction ``foo`` touches this file, ``transforms.py`` and a test:

1. ``transforms.py``: ``scale_by_foo(...)`` with its state named tuple right above it (both named in
   ``__all__``, which the package exports), the pure ``update`` and, beside it, the in-place kernel
   ``apply_(targets, grads, state, params, *, loss, scale, workspace) -> state`` that advances the state tensors
   in place and adds ``scale[k] * d_k`` to each ``targets[k]`` (:class:`~optimizers.base.InPlaceUpdate`;
   temporaries from ``workspace.like(grads)``); return ``_with_kernel(init, update, apply_, *hyper_parameters)``.
   The kernel is optional: without one the direction runs everywhere, and the fast paths (``as_torch_optimizer``,
   :class:`~optimizers.LayerwiseMixture` without a graph) add its pure update instead, correct and slower.
   torch's private kernels are reached only through :mod:`optimizers._torch_kernels`.
2. here: ``foo_direction(...)`` and the optimizer ``foo(lr, ..., *, maximize=False)`` chained from it (in
   ``__all__``), both decorated with ``@_rebuildable`` (so that ``as_torch_optimizer`` reads their rate and
   options and rebuilds them with a param group's; name options as ``torch.optim`` does), and the entries in
   :data:`DIRECTIONS` and :data:`DEFAULT_BASE_LRS`, which is all :class:`~optimizers.LayerwiseMixture` needs.
   A ``None`` gradient must leave its state entries alone (``tree_update``) and give a ``None`` update.
3. the test: a case for ``foo`` against a reference in ``tests/test_optimizers.py`` and a subject in
   ``tests/test_torch_contract.py``;
   ``tests/test_inplace_kernels.py`` already checks every entry of :data:`DIRECTIONS`: its kernel against its
   pure update, and the mixture's fast path against its graph path.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from optimizers._checks import non_negative_float
from optimizers.base import GradientTransformation, Hyperparameters, Scalar, Schedule, chain, identity
from optimizers.transforms import (
    add_decayed_weights,
    maximize as ascend,
    maybe,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_rms,
    scale_by_rss,
    scale_by_sign,
    trace,
)

__all__ = [
    "DEFAULT_BASE_LRS",
    "DIRECTIONS",
    "adagrad",
    "adagrad_direction",
    "adam",
    "adam_direction",
    "adamw",
    "lion",
    "lion_direction",
    "momentum_direction",
    "nesterov_direction",
    "rmsprop",
    "rmsprop_direction",
    "sgd",
    "sgd_direction",
    "sign_descent",
    "sign_direction",
]

LearningRate = Scalar | Schedule


def _rebuildable(factory: Callable[..., GradientTransformation]) -> Callable[..., GradientTransformation]:
    """``factory`` whose transforms record their arguments, every default filled in, as ``hyperparams``."""
    signature = inspect.signature(factory)

    @functools.wraps(factory)
    def build(*args: object, **kwargs: object) -> GradientTransformation:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return factory(*args, **kwargs)._replace(hyperparams=Hyperparameters(build, dict(bound.arguments)))

    return build


# --- directions (before the learning-rate step) -------------------------------------------------------------


@_rebuildable
def sgd_direction() -> GradientTransformation:
    """``d_t = g_t``."""
    return identity()


@_rebuildable
def momentum_direction(beta: Scalar = 0.9) -> GradientTransformation:
    """Heavy ball: ``d_t = b_t = beta * b_{t-1} + g_t``."""
    return trace(beta)


@_rebuildable
def nesterov_direction(beta: Scalar = 0.9) -> GradientTransformation:
    """Nesterov momentum as in torch: ``d_t = g_t + beta * b_t``."""
    return trace(beta, nesterov=True)


@_rebuildable
def adam_direction(
    b1: Scalar = 0.9, b2: Scalar = 0.999, eps: Scalar = 1e-8, *, eps_root: Scalar = 0.0, amsgrad: bool = False
) -> GradientTransformation:
    """Adam (Kingma & Ba 2015): ``d_t = m̂_t / (sqrt(v̂_t) + eps)``."""
    return scale_by_adam(b1, b2, eps, eps_root=eps_root, amsgrad=amsgrad)


@_rebuildable
def rmsprop_direction(
    alpha: Scalar = 0.99, eps: Scalar = 1e-8, *, centered: bool = False, eps_root: Scalar = 0.0
) -> GradientTransformation:
    """RMSProp (Tieleman & Hinton 2012): ``d_t = g_t / (sqrt(v_t) + eps)``."""
    return scale_by_rms(alpha, eps, centered=centered, eps_root=eps_root)


@_rebuildable
def adagrad_direction(eps: Scalar = 1e-10, *, initial_accumulator_value: Scalar = 0.0) -> GradientTransformation:
    """Adagrad (Duchi et al. 2011): ``d_t = g_t / (sqrt(sum_s g_s^2) + eps)``."""
    return scale_by_rss(eps, initial_accumulator_value=initial_accumulator_value)


@_rebuildable
def sign_direction() -> GradientTransformation:
    """signSGD (Bernstein et al. 2018): ``d_t = sign(g_t)``."""
    return scale_by_sign()


@_rebuildable
def lion_direction(b1: Scalar = 0.9, b2: Scalar = 0.99) -> GradientTransformation:
    """Lion (Chen et al. 2023): ``d_t = sign(b1 * m_{t-1} + (1 - b1) * g_t)``."""
    return scale_by_lion(b1, b2)


DIRECTIONS: dict[str, Callable[[], GradientTransformation]] = {
    "sgd": sgd_direction,
    "momentum": momentum_direction,
    "nesterov": nesterov_direction,
    "adam": adam_direction,
    "rmsprop": rmsprop_direction,
    "adagrad": adagrad_direction,
    "sign": sign_direction,
    "lion": lion_direction,
}
"""Base directions with their default hyper-parameters, by name (what :class:`LayerwiseMixture` mixes)."""

DEFAULT_BASE_LRS: dict[str, float] = {
    "sgd": 1e-1,
    "momentum": 1e-2,
    "nesterov": 1e-2,
    "adam": 1e-3,
    "rmsprop": 1e-3,
    "adagrad": 1e-2,
    "sign": 1e-3,
    "lion": 1e-4,
}
"""Each direction's learning rate ``η_b`` in :class:`LayerwiseMixture`, putting the directions on one scale."""


# --- optimizers ---------------------------------------------------------------------------------------------
# ``maximize=True`` runs the optimizer on -g (torch's maximize); coupled (L2) weight decay adds wd * θ to the
# gradient first, decoupled weight decay (AdamW, Lion) adds it to the direction.


@_rebuildable
def sgd(
    lr: LearningRate, momentum: Scalar = 0.0, *, nesterov: bool = False, weight_decay: Scalar = 0.0,
    dampening: Scalar = 0.0, maximize: bool = False,
) -> GradientTransformation:
    """SGD as ``torch.optim.SGD``: coupled weight decay ``g + wd * θ``, then heavy-ball or Nesterov momentum."""
    if nesterov and (isinstance(momentum, float | int) and momentum <= 0):
        raise ValueError(f"nesterov=True needs momentum > 0; got momentum={momentum!r}")
    return _ascending(maximize, chain(
        maybe(_nonzero(weight_decay), lambda: add_decayed_weights(weight_decay)),
        maybe(_nonzero(momentum), lambda: trace(momentum, nesterov=nesterov, dampening=dampening)),
        scale_by_learning_rate(lr),
    ))


@_rebuildable
def adam(
    lr: LearningRate, b1: Scalar = 0.9, b2: Scalar = 0.999, eps: Scalar = 1e-8, *, eps_root: Scalar = 0.0,
    weight_decay: Scalar = 0.0, amsgrad: bool = False, maximize: bool = False,
) -> GradientTransformation:
    """Adam (Kingma & Ba 2015), as ``torch.optim.Adam`` (``weight_decay`` is L2, added to the gradient)."""
    return _ascending(maximize, chain(
        maybe(_nonzero(weight_decay), lambda: add_decayed_weights(weight_decay)),
        scale_by_adam(b1, b2, eps, eps_root=eps_root, amsgrad=amsgrad),
        scale_by_learning_rate(lr),
    ))


@_rebuildable
def adamw(
    lr: LearningRate,
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 1e-2,
    *,
    eps_root: Scalar = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
) -> GradientTransformation:
    """AdamW (Loshchilov & Hutter 2019), as ``torch.optim.AdamW``: ``d_t = adam_t + wd * θ_t`` (decoupled)."""
    return _ascending(maximize, chain(
        scale_by_adam(b1, b2, eps, eps_root=eps_root, amsgrad=amsgrad), add_decayed_weights(weight_decay),
        scale_by_learning_rate(lr),
    ))


@_rebuildable
def rmsprop(
    lr: LearningRate,
    alpha: Scalar = 0.99,
    eps: Scalar = 1e-8,
    momentum: Scalar = 0.0,
    *,
    centered: bool = False,
    eps_root: Scalar = 0.0,
    weight_decay: Scalar = 0.0,
    maximize: bool = False,
) -> GradientTransformation:
    """RMSProp (Tieleman & Hinton 2012), as ``torch.optim.RMSprop`` (momentum applied to the scaled gradient)."""
    return _ascending(maximize, chain(
        maybe(_nonzero(weight_decay), lambda: add_decayed_weights(weight_decay)),
        scale_by_rms(alpha, eps, centered=centered, eps_root=eps_root),
        maybe(_nonzero(momentum), lambda: trace(momentum)),
        scale_by_learning_rate(lr),
    ))


@_rebuildable
def adagrad(
    lr: Scalar,
    lr_decay: float = 0.0,
    eps: Scalar = 1e-10,
    *,
    initial_accumulator_value: Scalar = 0.0,
    weight_decay: Scalar = 0.0,
    maximize: bool = False,
) -> GradientTransformation:
    """Adagrad (Duchi et al. 2011), as ``torch.optim.Adagrad``: step size ``lr / (1 + t * lr_decay)``."""
    non_negative_float("lr_decay", lr_decay, owner="adagrad")
    rate = (lambda count: lr / (1.0 + count.double() * lr_decay)) if lr_decay else lr
    return _ascending(maximize, chain(
        maybe(_nonzero(weight_decay), lambda: add_decayed_weights(weight_decay)),
        scale_by_rss(eps, initial_accumulator_value=initial_accumulator_value),
        scale_by_learning_rate(rate),
    ))


@_rebuildable
def sign_descent(lr: LearningRate, momentum: Scalar = 0.0, *, maximize: bool = False) -> GradientTransformation:
    """signSGD (Bernstein et al. 2018); with ``momentum > 0``, the sign of the heavy-ball buffer (Signum)."""
    return _ascending(maximize, chain(
        maybe(_nonzero(momentum), lambda: trace(momentum)), scale_by_sign(), scale_by_learning_rate(lr)
    ))


@_rebuildable
def lion(
    lr: LearningRate, b1: Scalar = 0.9, b2: Scalar = 0.99, weight_decay: Scalar = 0.0, *, maximize: bool = False
) -> GradientTransformation:
    """Lion (Chen et al. 2023): ``θ_{t+1} = θ_t - lr * (sign(b1 m_{t-1} + (1-b1) g_t) + wd * θ_t)``."""
    return _ascending(maximize, chain(
        scale_by_lion(b1, b2),
        maybe(_nonzero(weight_decay), lambda: add_decayed_weights(weight_decay)),
        scale_by_learning_rate(lr),
    ))


def _ascending(maximize: bool, transform: GradientTransformation) -> GradientTransformation:
    """``transform`` run on ``-g`` when ``maximize`` (keyword-only flag of every optimizer here)."""
    if not isinstance(maximize, bool):
        raise ValueError(f"maximize must be True or False; got {maximize!r}")
    return ascend(transform) if maximize else transform


def _nonzero(value: Scalar) -> bool:
    """Whether an optional piece is switched on: a tensor always is (it may be learned), a number when != 0."""
    return not isinstance(value, float | int) or value != 0
