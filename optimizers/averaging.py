"""Averages of the iterates: EMA, SWA and two-point averaging, composable with every optimizer.

``averaged(optimizer, ema=ema_averaging(0.999), swa=swa_averaging(start=1000, every=5))`` is the optimizer
itself (same updates, same inner state) plus one running average of the weights per named averaging. The
averages follow the weights *after* each step: on the pure path ``θ_{t+1} = params + updates`` (the updates
applied as :func:`~optimizers.base.apply_updates` does), on the in-place path (``as_torch_optimizer``) the
parameters once the inner optimizer has stepped them, so a param group's ``lr`` is taken into account. A parameter
whose gradient is ``None`` is not stepped, so its count and its averages stay as they were.

Sandler, Zhmoginov, Vladymyrov & Miller (2023), "Training trajectories, mini-batch losses and the curious role of
the learning rate", relate these averages to learning-rate schedules (:mod:`metaopt.analysis.trajectory`).

    opt = as_torch_optimizer(averaged(sgd(0.05, momentum=0.9), ema=ema_averaging(0.99)), model.named_parameters())
    ...
    with swap_averaged(opt):              # the parameters hold the EMA weights inside the block
        recompute_batchnorm(model, train_batches)   # BN statistics for the averaged weights (SWA needs this)
        evaluate(model)

The state (:class:`AveragedState`) round-trips through the adapter's ``state_dict`` (each average is a
per-parameter entry, ``average.<name>``), and the transform pickles when its optimizer records how it was built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from optimizers._checks import integer, non_negative_float, positive_int
from optimizers.base import (
    GradientTransformation,
    Hyperparameters,
    InPlaceUpdate,
    OptState,
    Params,
    apply_in_place,
    check_real,
    present,
)

__all__ = [
    "AveragedState",
    "EMAAveraging",
    "SWAAveraging",
    "TwoPointAveraging",
    "averaged",
    "averaged_params",
    "ema_averaging",
    "recompute_batchnorm",
    "swa_averaging",
    "swap_averaged",
    "two_point_averaging",
]


class EMAAveraging(NamedTuple):
    """``a_t = d_t a_{t-1} + (1 - d_t) θ_t`` from ``a_0 = θ_0``; see :func:`ema_averaging`."""

    decay: float
    bias_correction: bool = False
    warmup: int = 0

    def init(self, params: Params) -> Params:
        return {k: torch.zeros_like(p) for k, p in params.items()} if self.bias_correction else {}

    def step(self, theta: Tensor, average: Tensor, memory: Tensor | None, t: Tensor, *, in_place: bool = False
             ) -> tuple[Tensor, Tensor | None]:
        del in_place
        if self.bias_correction:
            memory = torch.lerp(memory, theta, 1.0 - self.decay)
            return memory / (1.0 - torch.as_tensor(self.decay, dtype=theta.dtype) ** t.to(theta.dtype)), memory
        decay = self.decay
        if self.warmup:
            steps = t.to(theta.dtype)
            decay = torch.clamp(steps / (steps + self.warmup), max=self.decay)
        return torch.lerp(average, theta, 1.0 - decay), memory


class SWAAveraging(NamedTuple):
    """The uniform average of ``θ_t`` for ``t = start, start + every, ...``; see :func:`swa_averaging`."""

    start: int = 1
    every: int = 1

    def init(self, params: Params) -> Params:
        del params
        return {}

    def step(self, theta: Tensor, average: Tensor, memory: Tensor | None, t: Tensor, *, in_place: bool = False
             ) -> tuple[Tensor, Tensor | None]:
        del in_place
        started = t >= self.start
        due = started & ((t - self.start) % self.every == 0)
        averaged = torch.where(started, (t - self.start) // self.every + 1, 0)  # iterates in the average now
        weight = torch.where(due, 1.0 / averaged.clamp(min=1).to(theta.dtype), (~started).to(theta.dtype))
        return average + weight * (theta - average), memory


class TwoPointAveraging(NamedTuple):
    """``(θ_t + θ_{t-delta}) / 2`` (``θ_0`` standing for iterates before the first); see :func:`two_point_averaging`."""

    delta: int

    def init(self, params: Params) -> Params:
        return {k: p.detach().clone().unsqueeze(0).repeat(self.delta, *(1,) * p.dim()) for k, p in params.items()}

    def step(self, theta: Tensor, average: Tensor, memory: Tensor | None, t: Tensor, *, in_place: bool = False
             ) -> tuple[Tensor, Tensor | None]:
        del average
        slot = (t % self.delta).view(1)
        old = memory.index_select(0, slot)[0]  # θ_{t-delta}, the slot's occupant
        average = 0.5 * (theta + old)
        if in_place:  # the torch.optim path owns the state: overwrite one slot instead of copying them all
            return average, memory.index_copy_(0, slot, theta.unsqueeze(0))
        return average, memory.index_copy(0, slot, theta.unsqueeze(0))


Averaging = EMAAveraging | SWAAveraging | TwoPointAveraging


def ema_averaging(decay: float, *, bias_correction: bool = False, warmup: int = 0) -> EMAAveraging:
    """Exponential moving average of the iterates, ``a_t = d_t a_{t-1} + (1 - d_t) θ_t``, ``a_0 = θ_0``.

    Args:
        decay: ``d`` in [0, 1).
        bias_correction: start the average at zero instead and divide by ``1 - d^t`` (as Adam's moments), so that
            early averages are not pulled towards ``θ_0``.
        warmup: ``d_t = min(d, t / (t + warmup))`` (0: ``d_t = d``); ``warmup=1`` with ``d → 1`` is the uniform
            average of ``θ_0 … θ_t``. Not together with ``bias_correction``.
    """
    decay = non_negative_float("decay", decay, owner="ema_averaging")
    if decay >= 1:
        raise ValueError(f"ema_averaging: decay must be in [0, 1); got {decay!r}")
    if not isinstance(bias_correction, bool):
        raise ValueError(f"ema_averaging: bias_correction must be True or False; got {bias_correction!r}")
    warmup = integer("warmup", warmup, owner="ema_averaging", low=0)
    if warmup and bias_correction:
        raise ValueError("ema_averaging: give bias_correction=True or warmup > 0, not both (each one handles the "
                         f"first steps); got warmup={warmup}")
    return EMAAveraging(decay, bias_correction, warmup)


def swa_averaging(start: int = 1, every: int = 1) -> SWAAveraging:
    """Stochastic weight averaging (Izmailov et al. 2018): the uniform average of ``θ_start, θ_{start+every}, …``.

    Before ``start`` the average is the current iterate (nothing is averaged yet). Averaged weights of a model
    with batch norm need their statistics recomputed (:func:`recompute_batchnorm`).
    """
    return SWAAveraging(positive_int("start", start, owner="swa_averaging"),
                        positive_int("every", every, owner="swa_averaging"))


def two_point_averaging(delta: int) -> TwoPointAveraging:
    """The mean of the current iterate and the one ``delta`` steps earlier (Sandler et al. 2023, section 5).

    Keeps the last ``delta`` iterates (``delta`` copies of the weights); before step ``delta`` the earlier point
    is ``θ_0``.
    """
    return TwoPointAveraging(positive_int("delta", delta, owner="two_point_averaging"))


class AveragedState(NamedTuple):
    """State of :func:`averaged`."""

    inner: OptState  # the wrapped optimizer's state
    average: dict[str, Params]  # per averaging name, the averaged weights, like params
    count: Params  # int64 [] per parameter, its steps so far
    memory: dict[str, Params]  # per averaging name: EMA with bias correction its biased average, two-point its
    #                            last delta iterates [delta, *shape]; otherwise an empty dict


class _Averaged(NamedTuple):
    """The factory recorded by :func:`averaged`: the inner optimizer's factory, then the same averagings."""

    factory: Callable[..., GradientTransformation]
    averagings: dict[str, Averaging]

    def __call__(self, **kwargs: Any) -> GradientTransformation:
        return averaged(self.factory(**kwargs), **self.averagings)


def averaged(optimizer: GradientTransformation, **averagings: Averaging) -> GradientTransformation:
    """``optimizer`` with running averages of its iterates, one per named averaging (see the module docstring).

    The updates and the inner state are ``optimizer``'s; ``update`` needs ``params``. The options that
    ``as_torch_optimizer`` reads (learning rate, ``momentum``, ...) are ``optimizer``'s.

    Raises:
        ValueError: no averaging, one that is not built by ``ema_averaging`` / ``swa_averaging`` /
            ``two_point_averaging``, or (at ``init``) an averaging named like a parameter.
    """
    if not averagings:
        raise ValueError("averaged needs at least one averaging, e.g. averaged(opt, ema=ema_averaging(0.999))")
    for name, averaging in averagings.items():
        if not isinstance(averaging, EMAAveraging | SWAAveraging | TwoPointAveraging):
            raise ValueError(f"averaged: {name}={averaging!r} is not an averaging; build it with ema_averaging, "
                             "swa_averaging or two_point_averaging")

    def init(params: Params) -> AveragedState:
        check_real(params)
        clash = sorted(set(averagings) & set(params))
        if clash:
            raise ValueError(f"averaged: averaging name {clash[0]!r} is also a parameter name; rename the averaging")
        return AveragedState(
            inner=optimizer.init(params),
            average={name: {k: p.detach().clone() for k, p in params.items()} for name in averagings},
            count={k: torch.zeros((), dtype=torch.int64, device=p.device) for k, p in params.items()},
            memory={name: averaging.init(params) for name, averaging in averagings.items()},
        )

    def advance(state: AveragedState, inner: OptState, thetas: Params, in_place: bool) -> AveragedState:
        """The state after the step that moved the keys of ``thetas`` to those values (``in_place``: the caller
        owns ``state``, which may be overwritten)."""
        count = {k: c + 1 if k in thetas else c for k, c in state.count.items()}
        average, memory = {}, {}
        for name, averaging in averagings.items():
            average[name], memory[name] = dict(state.average[name]), dict(state.memory[name])
            for k, theta in thetas.items():
                average[name][k], new_memory = averaging.step(theta, state.average[name][k],
                                                              state.memory[name].get(k), count[k],
                                                              in_place=in_place)
                if new_memory is not None:
                    memory[name][k] = new_memory
        return AveragedState(inner, average, count, memory)

    def update(grads, state, params=None, *, loss=None):
        if params is None:
            raise ValueError("averaged needs params (the averages follow params + updates); "
                             "call update(grads, state, params)")
        updates, inner = optimizer.update(grads, state.inner, params, loss=loss)
        return updates, advance(state, inner, {k: params[k] + updates[k] for k in present(grads)}, False)

    def apply_(targets, grads, state, params=None, *, loss=None, scale, workspace):
        inner = apply_in_place(optimizer, targets, grads, state.inner, params, loss=loss, scale=scale,
                               workspace=workspace)
        return advance(state, inner, {k: targets[k] for k in present(grads)}, True)

    spec = optimizer.hyperparams if isinstance(optimizer, GradientTransformation) else None
    recorded = None if spec is None else Hyperparameters(_Averaged(spec.factory, dict(averagings)), dict(spec.kwargs))
    return GradientTransformation(init, InPlaceUpdate(update, apply_), recorded)


def averaged_params(state: AveragedState, name: str | None = None) -> Params:
    """The averaged weights named ``name`` (may be omitted when there is one averaging) of an :func:`averaged` state."""
    if not isinstance(state, AveragedState):
        raise ValueError(f"averaged_params takes the state of an averaged(...) optimizer; got {type(state).__name__}")
    if name is None:
        if len(state.average) != 1:
            raise ValueError(f"averaged_params: name one of the averagings {sorted(state.average)}")
        (name,) = state.average
    if name not in state.average:
        raise ValueError(f"averaged_params: no averaging named {name!r}; the state has {sorted(state.average)}")
    return state.average[name]


@contextlib.contextmanager
def swap_averaged(optimizer: torch.optim.Optimizer, name: str | None = None) -> Iterator[None]:
    """Inside the block every parameter of ``optimizer`` (an ``as_torch_optimizer`` of an :func:`averaged`
    optimizer) holds its averaged weights; on exit, and on an exception, its own weights again.

    Raises:
        ValueError: an optimizer without ``functional_states``, or a group whose optimizer is not averaged.
    """
    states = getattr(optimizer, "functional_states", None)
    if states is None:
        raise ValueError("swap_averaged takes the optimizer made by as_torch_optimizer(averaged(...), params)")
    pairs = []
    for index, (state, group) in enumerate(zip(states, optimizer.param_groups)):
        if not isinstance(state, AveragedState):
            raise ValueError(f"swap_averaged: param group {index} is not stepped by an averaged(...) optimizer")
        pairs += list(zip(group["params"], averaged_params(state, name).values()))
    saved = [p.detach().clone() for p, _ in pairs]
    with torch.no_grad():
        for p, average in pairs:
            _real(p).copy_(average)
    try:
        yield
    finally:
        with torch.no_grad():
            for (p, _), own in zip(pairs, saved):
                p.copy_(own)


def _real(p: Tensor) -> Tensor:
    return torch.view_as_real(p) if p.is_complex() else p


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: Iterable[Any]) -> None:
    """Recompute the running statistics of every batch-norm layer of ``model`` over ``batches``.

    Averaged weights come with no statistics of their own (SWA's point: the statistics of the last iterate do not
    fit them). Each batch is an input tensor or a sequence whose first item is one; the statistics become the
    cumulative average over all batches (``momentum=None``), as ``torch.optim.swa_utils.update_bn``. The model's
    mode and the layers' momenta are restored afterwards.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for batch in batches:
            model(batch[0] if isinstance(batch, list | tuple) else batch)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(training)
