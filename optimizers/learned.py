"""Learned optimizers: meta-parameters in an ``nn.Module`` plus a factory returning an ordinary optimizer.

``module.optimizer()`` is a :class:`GradientTransformation` like any other (so ``as_torch_optimizer`` takes it);
``module.optimizer(meta_params)`` runs the same rule on explicitly given meta-parameters through
``torch.func.functional_call``, for meta-gradients with ``torch.func`` or for evolution-strategy perturbations.
Both need ``update(grads, state, params)``; :class:`LayerwiseMixture` also needs ``loss=`` unless static or built
with ``missing_loss="estimate"``. A ``None`` gradient leaves its parameter and its state alone. Through
``as_torch_optimizer`` a param group's ``lr`` multiplies the learned step (1, the default, is the rule as
meta-trained); see ``docs/torch_optim.md``. :mod:`optimizers.saving` writes a trained one to a single file.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from optimizers import _fused_mix
from optimizers._checks import non_negative_float, positive_float, positive_int
from optimizers._torch_kernels import is_plain
from optimizers.alias import DEFAULT_BASE_LRS, DIRECTIONS
from optimizers.base import (
    GradientTransformation,
    Hyperparameters,
    InPlaceUpdate,
    OptState,
    Params,
    Workspace,
    apply_in_place,
    present,
    tree_update,
    zeros_like_tree,
)
from optimizers.layers import KINDS, layer_groups, layer_kind, layer_kinds

log = logging.getLogger(__name__)

__all__ = [
    "LayerwiseMixture",
    "LayerwiseMixtureState",
    "PerParameterMLP",
    "PerParameterMLPState",
]


def _mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    """Two hidden ReLU layers: the learned optimizers' network (``metaopt.learners.mlp`` is out of reach of this
    torch-only package)."""
    return nn.Sequential(
        nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, outputs)
    )


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
    coefficients: Tensor  # [layers, directions] the α used by the last update (zeros before the first); layers
    # are the mixture's, then those a param group adds by kind (see LayerwiseMixture.optimizer)


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
        layer_kinds: each layer's kind (:mod:`optimizers.layers`); with them, parameters the mixture has no
            layer for take the coefficients of its last layer of the same kind (see :meth:`optimizer`).
            :meth:`for_parameters` sets layers and kinds from a model's parameters.

    ``arguments`` holds the constructor's arguments as plain data (what :func:`optimizers.save` writes).
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
        layer_kinds: Mapping[str, str] | None = None,
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

        kinds_ok = layer_kinds is None or (set(layer_kinds) == set(groups) and set(layer_kinds.values()) <= set(KINDS))
        if not kinds_ok:
            raise ValueError(f"layer_kinds must give each layer {list(groups)!r} one of the kinds {list(KINDS)}; "
                             f"got {dict(layer_kinds)!r}")

        self.layer_names = list(groups)
        self.layer_kinds = None if layer_kinds is None else [layer_kinds[layer] for layer in groups]
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
        self._workspace = Workspace()  # temporaries of the no-grad update
        self._warned_past_horizon = False
        self.arguments: dict[str, Any] = {
            "layers": {layer: list(ks) for layer, ks in groups.items()}, "horizon": horizon,
            "directions": list(directions), "base_lrs": {d: float(lrs[d]) for d in directions},
            "initial": {d: float(v) for d, v in initial.items()}, "static": bool(static),
            "embedding_dim": int(embedding_dim), "hidden": int(hidden), "loss_decays": list(self.loss_decays),
            "direction_kwargs": {d: dict(kw) for d, kw in direction_kwargs.items()},
            "layer_kinds": None if layer_kinds is None else dict(layer_kinds),
        }
        self.base_lrs = tuple(float(lrs[d]) for d in directions)  # fixed, kept in float64 precision
        alpha0 = torch.tensor([initial.get(d, 0.0) for d in directions]).repeat(len(groups), 1)
        if static:
            self.alpha = nn.Parameter(alpha0)
        else:
            self.register_buffer("alpha0", alpha0)
            self.embedding = nn.Parameter(0.1 * torch.randn(len(groups), embedding_dim))
            self.mlp = _mlp(embedding_dim + self.num_features, hidden, len(directions))
            # the last layer starts at zero, so the optimizer starts at its initial rule
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    @classmethod
    def for_parameters(
        cls, params: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]], **kwargs: Any
    ) -> LayerwiseMixture:
        """A mixture with one layer per module of ``params`` (``model.named_parameters()``) and the layers' kinds,
        by the rule of :mod:`optimizers.layers`; ``kwargs`` go to the constructor."""
        params = dict(params)
        groups = layer_groups(params)
        return cls(groups, layer_kinds=layer_kinds(params, groups), **kwargs)

    @property
    def num_features(self) -> int:
        """Training-state features per layer: progress, loss EMAs, log gradient norm, log weight norm."""
        return 1 + len(self.loss_decays) + 2

    def forward(self, features: Tensor, rows: Tensor | None = None) -> Tensor:
        """Coefficients ``α`` of shape [layers, directions] from training-state features [layers, num_features].

        ``rows`` [layers]: the mixture layer whose coefficients each row takes (default: row ``l`` is layer ``l``).
        """
        if self.static:
            return self.alpha if rows is None else self.alpha[rows]
        embedding, alpha0 = (self.embedding, self.alpha0) if rows is None else (self.embedding[rows], self.alpha0[rows])
        return alpha0 + self.mlp(torch.cat([embedding, features.to(embedding.dtype)], dim=-1))

    def optimizer(
        self, meta_params: Mapping[str, Tensor] | None = None, *, names: Sequence[str] | None = None,
        missing_loss: str = "error", compile: bool = False,
    ) -> GradientTransformation:
        """The functional optimizer; with ``meta_params`` (from ``named_parameters``) it uses those instead.

        ``names``: the parameters it steps (default: every layer of this mixture). ``as_torch_optimizer`` passes
        each param group's, so the layers can be spread over groups and added later. A layer of the mixture is
        stepped whole; parameters it has no layer for form layers by :func:`optimizers.layers.layer_groups`, each
        taking the coefficients of the mixture's last layer of the same kind (this needs ``layer_kinds``; the
        kinds are read from the shapes at ``init``). ``missing_loss``: ``"error"`` refuses an update without the
        training loss; ``"estimate"`` holds the loss features at their running estimate, the bias-corrected
        moving averages of the losses given so far (0 before the first), as if the step's loss were that
        estimate. ``update`` is an :class:`~optimizers.base.InPlaceUpdate`, whose in-place step
        ``as_torch_optimizer`` uses; without a graph, ``update`` itself takes the same path on a copy of the state
        (see :meth:`_mix_`). That in-place step warns once when it goes past ``horizon``. ``compile=True`` runs
        it as one ``torch.compile``'d pass over each parameter for all directions together instead of a pass per
        direction, and compiles the features and the coefficient MLP too (on one CPU thread, a 1M-parameter
        MLP's step about 1.5x faster; the first step compiles, which takes up to a minute), falling back to the
        eager step where compiling fails or a direction has no fused form (see :mod:`optimizers._fused_mix`).
        """
        if missing_loss not in ("error", "estimate"):
            raise ValueError(f"missing_loss must be 'error' or 'estimate'; got {missing_loss!r}")
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be True or False; got {compile!r}")
        fused = _fused_mix.plan(self._directions) if compile else None
        decays = torch.tensor(self.loss_decays, dtype=torch.float64)
        expected, extra = self._steps(names)
        layers = len(self.layer_names) + len(extra)
        layer_of = {**self._layer_of,
                    **{k: len(self.layer_names) + i for i, ks in enumerate(extra.values()) for k in ks}}
        mapped: list[Tensor] = []  # the rows of the added layers, fixed by their shapes at the first init

        def rows(params: Params) -> Tensor | None:
            if extra and not mapped:
                mapped.append(torch.tensor([*range(len(self.layer_names)), *self._rows_by_kind(extra, params)]))
            return mapped[0] if extra else None

        def init(params: Params) -> LayerwiseMixtureState:
            self._check_keys(params, expected)
            rows(params)
            dtype = next(iter(params.values())).dtype if params else torch.get_default_dtype()
            return LayerwiseMixtureState(
                count=torch.zeros((), dtype=torch.int64),
                loss_ema=torch.zeros(len(self.loss_decays), dtype=dtype),
                directions=tuple(d.init(params) for d in self._directions),
                coefficients=torch.zeros(layers, len(self.direction_names), dtype=dtype),
            )

        def coefficients(grads, state, params, loss, *, fast: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            """``(count, loss_ema, α, -α η)`` of this update; ``α`` and ``-α η`` are [layers, directions].

            ``fast``: compiled along with the fused step (no graph, plain tensors), when that is on and compiles."""
            if params is None:
                raise ValueError("LayerwiseMixture needs params (a feature); call update(grads, state, params)")
            if loss is None and not self.static and missing_loss == "error":  # the loss moving averages are features
                raise ValueError(
                    "LayerwiseMixture needs the training loss: call update(..., loss=loss); through "
                    "as_torch_optimizer, step(loss=loss) or step(closure) with a closure that returns the loss "
                    "(or build it with optimizer(missing_loss='estimate') to use the running estimate)"
                )
            grads = {k: grads[k] for k in present(grads)}
            rows(params)  # fixed at the first call, outside a compiled region
            if fast and compiled_core:
                try:
                    return compiled_core[0](grads, state.count, state.loss_ema, params, loss)
                except Exception as error:  # torch.compile fails in many ways (backend, C++ compiler, platform)
                    log.warning("compiling the mixture's coefficients failed (%s: %s); computing them eagerly",
                                type(error).__name__, str(error).splitlines()[0] if str(error) else "")
                    compiled_core.clear()
            return core(grads, state.count, state.loss_ema, params, loss)

        def core(grads, state_count, state_loss_ema, params, loss) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            like = next(iter(grads.values()))
            count = state_count + 1
            loss_ema, features = state_loss_ema, like.new_zeros(())  # a static mixture reads no features
            if not self.static:
                rates = decays.to(like.dtype)
                if loss is None:  # a step at the current estimate leaves the bias-corrected averages where they are
                    done = (1.0 - rates ** state_count.to(like.dtype)).clamp_min(torch.finfo(like.dtype).tiny)
                    loss = loss_ema / done
                loss_ema = rates * loss_ema + (1.0 - rates) * loss
                ema_hat = loss_ema / (1.0 - rates ** count.to(like.dtype))
                features = self._features(grads, params, count, ema_hat, layer_of, layers)
            extra_rows = rows(params)
            alpha = (_call(self, meta_params, features) if extra_rows is None
                     else _call(self, meta_params, features, extra_rows)).to(like.dtype)
            step = -alpha * torch.tensor(self.base_lrs, dtype=like.dtype, device=like.device)
            return count, loss_ema, alpha, step

        # with the fused step, the features and the coefficient MLP (tens of small ops) are compiled too
        compiled_core = [torch.compile(core, fullgraph=True)] if fused and hasattr(torch, "compile") else []

        def update(grads, state, params=None, *, loss=None):
            moving = present(grads)
            if not moving:  # nothing moves, nothing advances
                return dict.fromkeys(grads), state
            count, loss_ema, alpha, step = coefficients(grads, state, params, loss)
            if not torch.is_grad_enabled() and all(
                is_plain(t) for t in (step, *(grads[k] for k in moving), *params.values())
            ):
                updates = {k: torch.zeros_like(grads[k]) for k in moving}
                directions = self._mix_(updates, grads, _clone(state.directions), params, loss, step,
                                        dict.fromkeys(moving, 1.0), self._workspace, layer_of, fused)
                return {k: updates.get(k) for k in grads}, LayerwiseMixtureState(count, loss_ema, directions, alpha)
            outs = [d.update(grads, s, params, loss=loss) for d, s in zip(self._directions, state.directions)]
            updates = {
                k: None if grads[k] is None
                else sum(step[layer_of[k], b] * out[0][k] for b, out in enumerate(outs))
                for k in grads
            }
            new_state = LayerwiseMixtureState(count, loss_ema, tuple(out[1] for out in outs), alpha.detach())
            return updates, new_state

        def apply_(targets, grads, state, params=None, *, loss=None, scale, workspace):
            if not present(grads):
                return state
            with torch.no_grad():
                count, loss_ema, alpha, step = coefficients(grads, state, params, loss, fast=True)
                directions = self._mix_(targets, grads, state.directions, params, loss, step, scale, workspace,
                                        layer_of, fused)
            self._warn_past_horizon(count)
            return LayerwiseMixtureState(count, loss_ema, directions, alpha)

        return GradientTransformation(
            init, InPlaceUpdate(update, apply_),
            Hyperparameters(self.optimizer, {"meta_params": meta_params, "names": names, "missing_loss": missing_loss,
                                             "compile": compile}),
        )

    def _warn_past_horizon(self, count: Tensor) -> None:
        """Once per mixture: the in-place step (a plain training loop) went past the meta-training horizon."""
        if self.static or self._warned_past_horizon or int(count) <= self.horizon:
            return
        self._warned_past_horizon = True
        warnings.warn(
            f"LayerwiseMixture: step {int(count)} is past the horizon T={self.horizon} it was meta-trained for. Its "
            "progress feature t/T now exceeds 1, which meta-training never showed it: the coefficient MLP "
            "extrapolates (nothing is clamped), so the rule may drift from what was learned. To run the learned "
            f"schedule over N steps instead, load it with optimizers.load(..., horizon=N), or meta-train at N.",
            UserWarning, stacklevel=_caller_level(),
        )

    def _features(self, grads: Params, params: Params, count: Tensor, ema_hat: Tensor, layer_of: Mapping[str, int],
                  layers: int) -> Tensor:
        """[layers, num_features]: t/T, symlog loss EMAs, log gradient norm, log weight norm of each layer."""
        like = next(iter(grads.values()))
        # BLAS dot products without a graph: a memory-bound pass each, about 2.5x faster than torch's norm kernels
        square = (lambda t: (t * t).sum()) if torch.is_grad_enabled() else _sum_of_squares
        squares = torch.stack([square(t) for k, g in grads.items() for t in (g, params[k])]).view(-1, 2)
        index = torch.tensor([layer_of[k] for k in grads], device=like.device)
        per_layer = like.new_zeros(layers, 2).index_add(0, index, squares)  # [layers, (grad, weight)]
        log_norms = 0.5 * torch.log(per_layer + 1e-16)  # finite value and gradient at zero
        progress = (count.to(like.dtype) / self.horizon).expand(layers, 1)
        shared = _symlog(ema_hat).expand(layers, -1)
        return torch.cat([progress, shared, log_norms], dim=-1)

    def _mix_(
        self, targets: Params, grads: Params, states: tuple, params: Params, loss: Tensor | None, step: Tensor,
        scale: Mapping[str, float], workspace: Workspace, layer_of: Mapping[str, int],
        fused: _fused_mix.Plan | None = None,
    ) -> tuple:
        """Add ``scale_k · Σ_b step_{l(k),b} d_{b,k}`` to each ``targets[k]`` in place; the directions' next states.

        The no-grad path of both ``update`` (into zeros, on a copy of the state) and the in-place step (into the
        parameters): with a ``fused`` plan, the compiled step of all directions at once; otherwise (or when it is
        unavailable) each direction's own in-place kernel (:func:`~optimizers.base.apply_in_place`), which
        advances its state tensors in place; a direction without one adds its pure update.
        """
        keys = present(grads)
        if fused is not None and len({(grads[k].dtype, grads[k].device) for k in keys} | {
                (targets[k].dtype, targets[k].device) for k in keys}) == 1:
            index = torch.tensor([layer_of[k] for k in keys], device=step.device)
            factors = torch.tensor([scale[k] for k in keys], dtype=step.dtype, device=step.device)
            if _fused_mix.compiled_step(fused)([targets[k] for k in keys], [grads[k] for k in keys], states, keys,
                                               factors[:, None] * step[index]):
                return tuple(states)
        rows = step.tolist()  # [layers][directions], Python floats
        layer_rows = {k: rows[layer_of[k]] for k in present(grads)}
        return tuple(
            apply_in_place(
                direction, targets, grads, inner, params, loss=loss,
                scale={k: scale[k] * row[b] for k, row in layer_rows.items()}, workspace=workspace,
            )
            for b, (direction, inner) in enumerate(zip(self._directions, states))
        )

    def _steps(self, names: Sequence[str] | None) -> tuple[set[str], dict[str, list[str]]]:
        """The parameter names an optimizer for ``names`` steps (whole layers of this mixture), and the layers
        ``{layer: [names]}`` of those it has no layer for (refused unless it knows its layers' kinds)."""
        if names is None:
            return set(self._layer_of), {}
        unknown = [k for k in names if k not in self._layer_of]
        if unknown and self.layer_kinds is None:
            raise ValueError(
                f"LayerwiseMixture has no coefficients for parameters {sorted(unknown)!r} (its layers: "
                f"{self.layer_names!r}); build it with layers that include them (layers=list(model_params), or "
                "pass named_parameters()), or with layer_kinds (LayerwiseMixture.for_parameters) to give new "
                "layers the coefficients of a layer of their kind"
            )
        layers = {self._layer_of[k] for k in names if k in self._layer_of}
        split = sorted(k for k, layer in self._layer_of.items() if layer in layers and k not in set(names))
        if split:
            raise ValueError(
                f"names {sorted(names)!r} split a layer of this LayerwiseMixture: also give {split!r} "
                "(the parameters of one layer share its coefficients and norms, so they are stepped together)"
            )
        return set(names), layer_groups(unknown)

    def _rows_by_kind(self, extra: Mapping[str, Sequence[str]], params: Params) -> list[int]:
        """For each added layer, the mixture's last layer of the same kind."""
        last = {kind: index for index, kind in enumerate(self.layer_kinds)}
        rows = []
        for layer, names in extra.items():
            kind = layer_kind([tuple(params[k].shape) for k in names])
            if kind not in last:
                raise ValueError(
                    f"LayerwiseMixture has no coefficients for parameters {sorted(names)!r}: their layer {layer!r} is "
                    f"of kind {kind!r}, and this mixture's layers are of kinds {sorted(last)!r} "
                    "(give the group its own 'optimizer', or meta-train a mixture on a model with such layers)"
                )
            rows.append(last[kind])
        return rows

    def _check_keys(self, params: Params, expected: set[str]) -> None:
        if set(params) != expected:
            missing, extra = sorted(expected - set(params)), sorted(set(params) - expected)
            raise ValueError(
                f"parameter names do not match the layers this LayerwiseMixture was built for: missing {missing!r}, "
                f"unexpected {extra!r}; build it with layers=list(model_params) (or pass named_parameters())"
            )


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside this package and torch, for the caller's ``warnings.warn``:
    the training loop's ``optimizer.step()``, past the adapter and torch's step hooks (a scheduler adds one)."""
    roots = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(2), 2  # level 1 is the function that warns
    while frame is not None and frame.f_code.co_filename.startswith(roots):
        frame, level = frame.f_back, level + 1
    return level


def _clone(tree: OptState) -> OptState:
    """A copy of a state's tensors, in the same nesting of named tuples, tuples, lists and dicts."""
    if isinstance(tree, Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_clone(v) for v in tree))
    if isinstance(tree, tuple | list):
        return type(tree)(_clone(v) for v in tree)
    return tree


def _sum_of_squares(tensor: Tensor) -> Tensor:
    flat = tensor.reshape(-1)
    return torch.dot(flat, flat)


# --- the general per-parameter learned optimizer -----------------------------------------------------------------


class PerParameterMLPState(NamedTuple):
    """State of :meth:`PerParameterMLP.optimizer`."""

    count: Params  # int64 [] per parameter, its updates so far
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
        self.net = _mlp(self.num_features, hidden, 2)
        self.arguments: dict[str, Any] = {  # the constructor's arguments as plain data (what optimizers.save writes)
            "hidden": int(hidden), "momentum_decays": list(self.momentum_decays), "rms_decay": self.rms_decay,
            "step_mult": self.step_mult, "exp_mult": self.exp_mult,
        }
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
                count={k: torch.zeros((), dtype=torch.int64) for k in params},
                momenta=tuple(zeros_like_tree(params) for _ in self.momentum_decays),
                nu=zeros_like_tree(params),
            )

        def update(grads, state, params=None, *, loss=None):
            del loss
            if params is None:
                raise ValueError("PerParameterMLP needs params (a feature); call update(grads, state, params)")
            count = tree_update(lambda g, c: c + 1, grads, state.count)
            momenta = tuple(
                tree_update(lambda g, m, d=d: d * m + (1.0 - d) * g, grads, ms)
                for d, ms in zip(self.momentum_decays, state.momenta)
            )
            nu = tree_update(lambda g, v: self.rms_decay * v + (1.0 - self.rms_decay) * g * g, grads, state.nu)

            def step(k: str) -> Tensor:
                g = grads[k]
                correction = 1.0 - self.rms_decay ** count[k].to(g.dtype)
                normalised = g * torch.rsqrt(nu[k] / correction + 1e-12)
                features = torch.stack([g, params[k], *(m[k] for m in momenta), normalised], dim=-1)
                features = features * torch.rsqrt((features * features).reshape(-1, self.num_features).mean(0) + 1e-12)
                dtype = next(self.parameters()).dtype if meta_params is None else next(iter(meta_params.values())).dtype
                return -_call(self, meta_params, features.to(dtype)).to(g.dtype)

            updates = {k: None if grads[k] is None else step(k) for k in grads}
            return updates, PerParameterMLPState(count, momenta, nu)

        return GradientTransformation(init, update, Hyperparameters(self.optimizer, {"meta_params": meta_params}))
