"""Learned optimizers: meta-parameters in an ``nn.Module`` plus a factory returning an ordinary optimizer.

``module.optimizer()`` is a :class:`GradientTransformation` like any other (so ``as_torch_optimizer`` takes it);
``module.optimizer(meta_params)`` runs the same rule on explicitly given meta-parameters through
``torch.func.functional_call``, for meta-gradients with ``torch.func`` or for evolution-strategy perturbations.
Both need ``update(grads, state, params)``; :class:`LayerwiseMixture` also needs ``loss=`` unless static.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils import _pytree as pytree

from optimizers._checks import non_negative_float, positive_float, positive_int
from optimizers.alias import DIRECTIONS
from optimizers.base import GradientTransformation, Params, tree_map, zeros_like_tree
from optimizers.torch_adapter import InPlaceUpdate

__all__ = [
    "LayerwiseMixture",
    "LayerwiseMixtureState",
    "PerParameterMLP",
    "PerParameterMLPState",
]

DEFAULT_BASE_LRS = {
    "sgd": 1e-1,
    "momentum": 1e-2,
    "nesterov": 1e-2,
    "adam": 1e-3,
    "rmsprop": 1e-3,
    "adagrad": 1e-2,
    "sign": 1e-3,
    "lion": 1e-4,
}


def _mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    """Two hidden ReLU layers; the last layer starts at zero so the optimizer starts at its initial rule."""
    net = nn.Sequential(
        nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, outputs)
    )
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


def _symlog(x: Tensor) -> Tensor:
    return torch.sign(x) * torch.log1p(torch.abs(x))


def _call(module: nn.Module, meta_params: Mapping[str, Tensor] | None, *args: Tensor) -> Tensor:
    return module(*args) if meta_params is None else functional_call(module, dict(meta_params), args)


# --- the specialized optimizer ---------------------------------------------------------------------------------


class LayerwiseMixtureState(NamedTuple):
    """State of :meth:`LayerwiseMixture.optimizer`."""

    count: Tensor  # int64 [], updates done so far
    loss_ema: Tensor  # [len(loss_decays)] EMAs of the training loss (not bias-corrected), parameter dtype
    directions: tuple  # the base directions' own states, in the order of ``directions``
    coefficients: Tensor  # [layers, directions] the α used by the last update (zeros before the first)


class LayerwiseMixture(nn.Module):
    """The specialized optimizer of Kristiansen et al. 2024 ("Narrowing the Focus: Learned Optimizers for
    Pretrained Models"): per layer ``l``, ``Δθ_l = -Σ_b α_{l,b}(t) · η_b · d_{b,t}``.

    ``d_b`` are base-optimizer directions (:data:`optimizers.DIRECTIONS`), ``η_b`` fixed base learning rates
    that put them on one scale, and ``α = α_0 + MLP([e_l, features_l(t)])`` with a learned embedding ``e_l``
    per layer and the training-state features ``t/T``, symlog of the loss EMAs, log gradient norm and log weight
    norm of the layer; the MLP is shared by all layers and its last layer starts at zero, so training starts
    from the mix ``α_0``. With ``static=True``, ``α`` is one learned number per layer and direction.

    Args:
        layers: parameter names, each its own layer, or ``{layer: [parameter names]}`` groups.
        horizon: the training length ``T`` for the progress feature (not needed when static).
        directions: names of the mixed base directions.
        base_lrs: ``η_b`` by direction name (defaults in ``DEFAULT_BASE_LRS``).
        initial: ``α_0`` by direction name, the same for every layer (default: 1 on Adam, plain Adam).
        static: one constant α per layer and direction instead of the MLP.
        embedding_dim, hidden: sizes of the layer embedding and of the MLP's hidden layers.
        loss_decays: decays of the loss moving averages used as features.
        direction_kwargs: hyper-parameters of the base directions by name, e.g. ``{"adam": {"eps_root": 1e-16}}``;
            meta-training needs ``eps_root > 0`` on Adam and RMSProp when some gradient entries are exactly zero,
            otherwise ``d sqrt(v) / dv`` at ``v = 0`` makes the meta-gradient NaN.
    """

    def __init__(
        self,
        layers: Sequence[str] | Mapping[str, Sequence[str]],
        *,
        horizon: int | None = None,
        directions: Sequence[str] = ("sgd", "momentum", "adam", "rmsprop", "sign"),
        base_lrs: Mapping[str, float] | None = None,
        initial: Mapping[str, float] | None = None,
        static: bool = False,
        embedding_dim: int = 8,
        hidden: int = 32,
        loss_decays: Sequence[float] = (0.9, 0.99),
        direction_kwargs: Mapping[str, Mapping[str, object]] | None = None,
    ) -> None:
        super().__init__()
        groups = dict(layers) if isinstance(layers, Mapping) else {name: [name] for name in layers}
        keys = [k for ks in groups.values() for k in ks]
        if not groups or any(isinstance(ks, str) or not ks for ks in groups.values()):
            raise ValueError(
                f"layers must name at least one layer, each a non-empty list of parameter names; got {layers!r}"
            )
        if len(set(keys)) != len(keys):
            raise ValueError(f"every parameter name must belong to exactly one layer; got {layers!r}")
        unknown = [d for d in directions if d not in DIRECTIONS]
        if unknown or not directions:
            raise ValueError(
                f"unknown directions {unknown!r} in {list(directions)!r}; expected names from {sorted(DIRECTIONS)}"
            )
        if not static:
            positive_int("horizon", horizon, owner="LayerwiseMixture")
        lrs = {**DEFAULT_BASE_LRS, **(base_lrs or {})}
        initial = {"adam": 1.0} if initial is None else dict(initial)
        if not set(initial) <= set(directions) or not set(lrs) >= set(directions):
            raise ValueError(f"initial {sorted(initial)!r} and base_lrs must refer to directions {list(directions)!r}")
        if any(not 0.0 < lrs[d] for d in directions) or any(not 0.0 < d < 1.0 for d in loss_decays):
            raise ValueError(f"base_lrs must be > 0 and loss_decays in (0, 1); got {lrs!r} and {list(loss_decays)!r}")

        self.layer_names = list(groups)
        self.direction_names = list(directions)
        self.static = static
        self.horizon = horizon
        self.loss_decays = tuple(float(d) for d in loss_decays)
        self._layer_of = {k: i for i, ks in enumerate(groups.values()) for k in ks}
        direction_kwargs = dict(direction_kwargs or {})
        if not set(direction_kwargs) <= set(directions):
            raise ValueError(
                f"direction_kwargs names {sorted(direction_kwargs)!r}; expected some of {list(directions)!r}"
            )
        self._directions = [DIRECTIONS[d](**direction_kwargs.get(d, {})) for d in directions]
        self._fast = _fast_hyperparameters(self.direction_names, direction_kwargs)
        self._scratch = _Scratch()
        self.base_lrs = tuple(float(lrs[d]) for d in directions)  # fixed, kept in float64 precision
        alpha0 = torch.tensor([initial.get(d, 0.0) for d in directions]).repeat(len(groups), 1)
        if static:
            self.alpha = nn.Parameter(alpha0)
        else:
            self.register_buffer("alpha0", alpha0)
            self.embedding = nn.Parameter(0.1 * torch.randn(len(groups), embedding_dim))
            self.mlp = _mlp(embedding_dim + self.num_features, hidden, len(directions))

    @property
    def num_features(self) -> int:
        """Training-state features per layer: progress, loss EMAs, log gradient norm, log weight norm."""
        return 1 + len(self.loss_decays) + 2

    def forward(self, features: Tensor) -> Tensor:
        """Coefficients ``α`` of shape [layers, directions] from training-state features [layers, num_features]."""
        if self.static:
            return self.alpha
        return self.alpha0 + self.mlp(torch.cat([self.embedding, features.to(self.embedding.dtype)], dim=-1))

    def optimizer(self, meta_params: Mapping[str, Tensor] | None = None) -> GradientTransformation:
        """The functional optimizer; with ``meta_params`` (from ``named_parameters``) it uses those instead.

        When every direction has a fused form (:func:`_fast_hyperparameters`), ``update`` is an
        :class:`~optimizers.torch_adapter.InPlaceUpdate`, whose in-place step ``as_torch_optimizer`` uses.
        """
        decays = torch.tensor(self.loss_decays, dtype=torch.float64)

        def init(params: Params) -> LayerwiseMixtureState:
            self._check_keys(params)
            dtype = next(iter(params.values())).dtype
            return LayerwiseMixtureState(
                count=torch.zeros((), dtype=torch.int64),
                loss_ema=torch.zeros(len(self.loss_decays), dtype=dtype),
                directions=tuple(d.init(params) for d in self._directions),
                coefficients=torch.zeros(len(self.layer_names), len(self.direction_names), dtype=dtype),
            )

        def coefficients(grads, state, params, loss) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            """``(count, loss_ema, α, -α η)`` of this update; ``α`` and ``-α η`` are [layers, directions]."""
            if params is None:
                raise ValueError("LayerwiseMixture needs params (a feature); call update(grads, state, params)")
            if loss is None and not self.static:  # the loss moving averages are features
                raise ValueError("LayerwiseMixture needs the training loss: call update(..., loss=loss)")
            like = next(iter(grads.values()))
            count = state.count + 1
            loss_ema, features = state.loss_ema, like.new_zeros(())  # a static mixture reads no features
            if not self.static:
                rates = decays.to(like.dtype)
                loss_ema = rates * loss_ema + (1.0 - rates) * loss
                ema_hat = loss_ema / (1.0 - rates ** count.to(like.dtype))
                features = self._features(grads, params, count, ema_hat)
            alpha = _call(self, meta_params, features).to(like.dtype)
            step = -alpha * torch.tensor(self.base_lrs, dtype=like.dtype, device=like.device)
            return count, loss_ema, alpha, step

        def update(grads, state, params=None, *, loss=None):
            count, loss_ema, alpha, step = coefficients(grads, state, params, loss)
            if self._fast is not None and not torch.is_grad_enabled() and not _batched(next(iter(grads.values()))):
                updates = zeros_like_tree(grads)
                directions = self._mix_(updates, grads, pytree.tree_map(torch.clone, state.directions), step)
                return updates, LayerwiseMixtureState(count, loss_ema, directions, alpha)
            outs = [d.update(grads, s, params, loss=loss) for d, s in zip(self._directions, state.directions)]
            updates = {k: sum(step[self._layer_of[k], b] * out[0][k] for b, out in enumerate(outs)) for k in grads}
            new_state = LayerwiseMixtureState(count, loss_ema, tuple(out[1] for out in outs), alpha.detach())
            return updates, new_state

        def apply_(grads, state, params, *, loss, lr, frozen):
            with torch.no_grad():
                count, loss_ema, alpha, step = coefficients(grads, state, params, loss)
                targets = {k: torch.zeros_like(g) if k in frozen else params[k] for k, g in grads.items()}
                directions = self._mix_(targets, grads, state.directions, lr * step)
            return LayerwiseMixtureState(count, loss_ema, directions, alpha)

        if self._fast is None:
            return GradientTransformation(init, update)
        return GradientTransformation(init, InPlaceUpdate(update, apply_))

    def _features(self, grads: Params, params: Params, count: Tensor, ema_hat: Tensor) -> Tensor:
        """[layers, num_features]: t/T, symlog loss EMAs, log gradient norm, log weight norm of each layer."""
        layers = len(self.layer_names)
        like = next(iter(grads.values()))
        # BLAS dot products without a graph: a memory-bound pass each, about 2.5x faster than torch's norm kernels
        square = (lambda t: (t * t).sum()) if torch.is_grad_enabled() else _sum_of_squares
        squares = torch.stack([square(t) for k, g in grads.items() for t in (g, params[k])]).view(-1, 2)
        index = torch.tensor([self._layer_of[k] for k in grads], device=like.device)
        per_layer = like.new_zeros(layers, 2).index_add(0, index, squares)  # [layers, (grad, weight)]
        log_norms = 0.5 * torch.log(per_layer + 1e-16)  # finite value and gradient at zero
        progress = (count.to(like.dtype) / self.horizon).expand(layers, 1)
        shared = _symlog(ema_hat).expand(layers, -1)
        return torch.cat([progress, shared, log_norms], dim=-1)

    def _mix_(self, targets: Params, grads: Params, states: tuple, step: Tensor) -> tuple:
        """Add ``Σ_b step_{l,b} d_b`` to each ``targets[k]`` in place; return the directions' next states.

        The no-grad path of both ``update`` (into zeros, on a copy of the state) and the in-place step (into the
        parameters): the directions' own rule up to rounding, but their state tensors are advanced in place and
        reused, and momentum, Adam and RMSProp run through torch's fused optimizer kernels where they apply.
        Tensor by tensor, all directions at once (sign just before RMSProp, which reuses its output, see
        :func:`_rmsprop_`).
        """
        scale, scratch = step.tolist(), self._scratch.views(grads)
        fused = _fusable(targets, grads, states)
        states = [s._replace(count=s.count + 1) if n == "adam" else s for n, s in zip(self.direction_names, states)]
        like = next(iter(grads.values()))
        counts = [  # the step t of the fused Adam kernel (RMSProp runs it at t = 1), in its format
            torch.full((), float(s.count) if n == "adam" else 1.0, dtype=torch.float32, device=like.device)
            for n, s in zip(self.direction_names, states)
        ]
        rank = {"sign": 0, "rmsprop": 1}
        order = sorted(range(len(states)), key=lambda b: rank.get(self.direction_names[b], 2))
        for k, g in grads.items():
            target, coefficients, temporary, signs = targets[k], scale[self._layer_of[k]], scratch[k], False
            for b in order:
                name, state, hp, c = self.direction_names[b], states[b], self._fast[b], coefficients[b]
                if name == "sgd":
                    target.add_(g, alpha=c)
                elif name == "sign":
                    target.add_(torch.sign(g, out=temporary), alpha=c)
                    signs = True
                elif name == "momentum":
                    _momentum_(target, g, state.trace[k], c, fused, **hp)
                elif name == "rmsprop":
                    _rmsprop_(target, g, state.nu[k], c, temporary, counts[b], fused, holds_signs=signs, **hp)
                else:
                    _adam_(target, g, state.mu[k], state.nu[k], c, counts[b], temporary, fused, **hp)
                signs = signs and name == "sign"
        return tuple(states)

    def _check_keys(self, params: Params) -> None:
        if set(params) != set(self._layer_of):
            missing, extra = sorted(set(self._layer_of) - set(params)), sorted(set(params) - set(self._layer_of))
            raise ValueError(
                f"parameter names do not match the layers this LayerwiseMixture was built for: missing {missing!r}, "
                f"unexpected {extra!r}; build it with layers=list(model_params) (or pass named_parameters())"
            )


def _batched(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``torch.func.vmap`` batched tensor (the fused path's foreach ops are not vmapped)."""
    return torch._C._functorch.is_batchedtensor(tensor)


_FAST_DIRECTIONS = ("sgd", "momentum", "adam", "rmsprop", "sign")


def _sum_of_squares(tensor: Tensor) -> Tensor:
    flat = tensor.reshape(-1)
    return torch.dot(flat, flat)


class _Scratch:
    """Temporaries shaped like the gradients, cut from one buffer kept across steps.

    Kept rather than allocated per step: a large fresh allocation is fresh pages, and faulting them in costs about
    as much as the arithmetic done on them.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        self._views: tuple[tuple, dict[str, Tensor]] = ((), {})

    def views(self, grads: Params) -> dict[str, Tensor]:
        layout = tuple((k, g.shape, g.dtype, g.device) for k, g in grads.items())
        if layout == self._views[0]:
            return self._views[1]
        views = {}
        for k, g in grads.items():
            key = (g.dtype, g.device)
            buffer = self._buffers.get(key)
            if buffer is None or buffer.numel() < g.numel():
                buffer = self._buffers[key] = g.new_empty(max(x.numel() for x in grads.values()))
            views[k] = buffer[: g.numel()].view(g.shape)
        self._views = (layout, views)
        return views


def _fusable(targets: Params, grads: Params, states: Sequence[NamedTuple]) -> bool:
    """Whether torch's fused optimizer kernels may take these tensors: they walk raw memory, so one layout, dtype and
    device (the step counts, integer scalars, are not walked)."""
    tensors = [*targets.values(), *grads.values()]
    for state in states:
        for field in state:
            tensors.extend(field.values() if isinstance(field, Mapping) else [field])
    floats = [t for t in tensors if t.is_floating_point()]
    return (floats[0].device.type in ("cpu", "cuda") and all(t.is_contiguous() for t in floats)
            and len({(t.dtype, t.device) for t in floats}) == 1)


def _fused_adam(
    target: Tensor, g: Tensor, mu: Tensor, nu: Tensor, c: float, step: Tensor, *, b1: float, b2: float, eps: float
) -> None:
    """``target += c · m̂_t / (sqrt(v̂_t) + eps)`` by torch's fused Adam kernel, advancing ``mu`` and ``nu`` in place.

    ``step`` holds ``t`` as a float32 scalar tensor, the kernel's own format.
    """
    torch._fused_adam_(
        [target], [g], [mu], [nu], [], [step],
        lr=-c, beta1=b1, beta2=b2, weight_decay=0.0, eps=eps, amsgrad=False, maximize=False,
    )


def _momentum_(target: Tensor, g: Tensor, trace: Tensor, c: float, fused: bool, *, beta: float) -> None:
    """``target += c · b_t`` with ``b_t = beta · b_{t-1} + g_t`` (heavy ball), advancing ``trace`` in place.

    torch's fused SGD kernel (``torch.optim.SGD(fused=True)``) does it in one pass where it applies.
    """
    if fused:
        torch._fused_sgd_(
            [target], [g], [trace],
            weight_decay=0.0, momentum=beta, lr=-c, dampening=0.0, nesterov=False, maximize=False, is_first_step=False,
        )
        return
    target.add_(torch.add(g, trace, alpha=beta, out=trace), alpha=c)


def _adam_(
    target: Tensor, g: Tensor, mu: Tensor, nu: Tensor, c: float, step: Tensor, scratch: Tensor, fused: bool, *,
    b1: float, b2: float, eps: float, eps_root: float,
) -> None:
    """``target += c · m̂_t / (sqrt(v̂_t + eps_root) + eps)`` (Adam's direction), advancing ``mu`` and ``nu`` in place.

    torch's fused Adam kernel (``torch.optim.Adam(fused=True)``) does it in one pass when ``eps_root = 0``; it
    leaves a third of the time of the separate in-place ops. ``step`` holds ``t`` (float32 scalar tensor).
    """
    if eps_root == 0 and fused:
        _fused_adam(target, g, mu, nu, c, step, b1=b1, b2=b2, eps=eps)
        return
    t = float(step)
    mu.lerp_(g, 1.0 - b1)
    nu.lerp_(torch.mul(g, g, out=scratch), 1.0 - b2)
    denom = torch.div(nu, 1.0 - b2**t, out=scratch).add_(eps_root).sqrt_().add_(eps)
    target.addcdiv_(mu, denom, value=c / (1.0 - b1**t))


def _rmsprop_(
    target: Tensor, g: Tensor, nu: Tensor, c: float, scratch: Tensor, one: Tensor, fused: bool, *, holds_signs: bool,
    alpha: float, eps: float, eps_root: float,
) -> None:
    """``target += c · g_t / (sqrt(v_t + eps_root) + eps)`` (RMSProp's direction), advancing ``nu`` in place.

    With ``eps_root = 0`` this is Adam with ``b1 = 0`` (so ``m_t = g_t``) and ``b2 = alpha`` at step 1, whose bias
    correction ``sqrt(1 - alpha)`` of ``sqrt(v)`` is undone by dividing ``lr`` and ``eps`` by it: the fused kernel.
    Its first moment ``m`` is ``0 · m + g``: any ``m`` finite where ``g`` is gives ``g``, so ``scratch`` need not be
    zeroed when it ``holds_signs`` of ``g`` (the sign direction's output). ``one`` is the step t = 1 (float32 tensor).
    """
    if eps_root == 0 and fused:
        k = math.sqrt(1.0 - alpha)
        first_moment = scratch if holds_signs else scratch.zero_()
        _fused_adam(target, g, first_moment, nu, c / k, one, b1=0.0, b2=alpha, eps=eps / k)
        return
    nu.lerp_(torch.mul(g, g, out=scratch), 1.0 - alpha)
    target.addcdiv_(g, torch.add(nu, eps_root, out=scratch).sqrt_().add_(eps), value=c)


def _fast_hyperparameters(names: Sequence[str], kwargs: Mapping[str, Mapping[str, Any]]) -> list[dict] | None:
    """Each direction's hyper-parameters (defaults filled in) when the fused no-grad path covers them all, else None.

    Covered: sgd, momentum (heavy ball), adam and non-centered rmsprop with plain-number hyper-parameters, sign.
    """
    resolved = []
    for name in names:
        if name not in _FAST_DIRECTIONS:
            return None
        bound = inspect.signature(DIRECTIONS[name]).bind(**kwargs.get(name, {}))
        bound.apply_defaults()
        values = dict(bound.arguments)
        if values.get("centered") or any(isinstance(v, Tensor) for v in values.values()):
            return None
        resolved.append({k: float(v) for k, v in values.items() if k != "centered"})
    return resolved


# --- the general per-parameter learned optimizer -----------------------------------------------------------------


class PerParameterMLPState(NamedTuple):
    """State of :meth:`PerParameterMLP.optimizer`."""

    count: Tensor  # int64 [], updates done so far
    momenta: tuple  # one Params per decay in ``momentum_decays``: EMAs of gradients, like params
    nu: Params  # EMA of squared gradients (decay ``rms_decay``), like params


class PerParameterMLP(nn.Module):
    """A small general learned optimizer in the style of Metz et al. (2020, 2022; the per-parameter MLP of VeLO).

    For every parameter entry, features ``[g, θ, m_1..m_K, g / sqrt(v̂)]`` (momenta at several timescales, each
    feature channel divided by its root mean square over the tensor) go through an MLP with two outputs, a
    direction ``o_d`` and a magnitude ``o_m``: ``Δθ = -step_mult · o_d · exp(exp_mult · o_m)``.
    """

    def __init__(
        self,
        *,
        hidden: int = 32,
        momentum_decays: Sequence[float] = (0.5, 0.9, 0.99),
        rms_decay: float = 0.999,
        step_mult: float = 1e-3,
        exp_mult: float = 1e-3,
    ) -> None:
        super().__init__()
        if not momentum_decays or any(not 0.0 <= d < 1.0 for d in (*momentum_decays, rms_decay)):
            raise ValueError(
                f"decays must lie in [0, 1); got momentum_decays={momentum_decays!r}, rms_decay={rms_decay!r}"
            )
        self.momentum_decays = tuple(float(d) for d in momentum_decays)
        self.rms_decay = float(rms_decay)
        self.step_mult = positive_float("step_mult", step_mult, owner="PerParameterMLP")
        self.exp_mult = non_negative_float("exp_mult", exp_mult, owner="PerParameterMLP")
        self.net = nn.Sequential(
            nn.Linear(self.num_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2)
        )
        with torch.no_grad():  # start near a small normalised-gradient step rather than at zero
            self.net[-1].weight.mul_(0.1)
            self.net[-1].bias.zero_()

    @property
    def num_features(self) -> int:
        return 3 + len(self.momentum_decays)

    def forward(self, features: Tensor) -> Tensor:
        """Per-entry step ``[..., num_features] -> [...]`` (the minus sign is applied by the optimizer)."""
        out = self.net(features)
        return self.step_mult * out[..., 0] * torch.exp(self.exp_mult * out[..., 1])

    def optimizer(self, meta_params: Mapping[str, Tensor] | None = None) -> GradientTransformation:
        """The functional optimizer; with ``meta_params`` (from ``named_parameters``) it uses those instead."""

        def init(params: Params) -> PerParameterMLPState:
            return PerParameterMLPState(
                count=torch.zeros((), dtype=torch.int64),
                momenta=tuple(zeros_like_tree(params) for _ in self.momentum_decays),
                nu=zeros_like_tree(params),
            )

        def update(grads, state, params=None, *, loss=None):
            del loss
            if params is None:
                raise ValueError("PerParameterMLP needs params (a feature); call update(grads, state, params)")
            count = state.count + 1
            momenta = tuple(
                tree_map(lambda g, m, d=d: d * m + (1.0 - d) * g, grads, ms)
                for d, ms in zip(self.momentum_decays, state.momenta)
            )
            nu = tree_map(lambda g, v: self.rms_decay * v + (1.0 - self.rms_decay) * g * g, grads, state.nu)

            def step(k: str) -> Tensor:
                g = grads[k]
                correction = 1.0 - self.rms_decay ** count.to(g.dtype)
                normalised = g * torch.rsqrt(nu[k] / correction + 1e-12)
                features = torch.stack([g, params[k], *(m[k] for m in momenta), normalised], dim=-1)
                features = features * torch.rsqrt((features * features).reshape(-1, self.num_features).mean(0) + 1e-12)
                dtype = next(self.parameters()).dtype if meta_params is None else next(iter(meta_params.values())).dtype
                return -_call(self, meta_params, features.to(dtype)).to(g.dtype)

            return {k: step(k) for k in grads}, PerParameterMLPState(count, momenta, nu)

        return GradientTransformation(init, update)
