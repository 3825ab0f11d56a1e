"""Run any functional optimizer as a ``torch.optim.Optimizer`` in an ordinary training loop.

    opt = as_torch_optimizer(adam(1e-3), model.named_parameters())
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
    for x, y in data:
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step(loss=loss)  # loss only matters to learned optimizers; opt.step() or opt.step(closure) work too
        opt.zero_grad()
        scheduler.step()

It keeps ``torch.optim``'s contract (``docs/torch_optim.md`` says where and why a learned optimizer differs):

- ``group["lr"]`` is the absolute learning rate, read at every step. It starts at the functional optimizer's
  own rate (``adam(1e-3)``: 1e-3) or at ``lr=``. An optimizer without a single rate (a bare direction, a learned
  optimizer, a hand-made chain) takes ``group["lr"]`` (default 1) as the factor on its step; so does one whose
  rate is a schedule of its own.
- An optimizer built by :mod:`optimizers.alias` records its arguments (:class:`~optimizers.base.Hyperparameters`);
  they are the param groups' options under torch's names (``betas``, ``eps``, ``weight_decay``, ``momentum``,
  ``dampening``, ``nesterov``, ``amsgrad``, ``maximize``, ...), and a group's values override them (the
  optimizer is rebuilt for that group). ``maximize`` works on every optimizer. A torch option the group's
  optimizer does not have is refused with an error naming it; other keys (a scheduler's, a user's) are kept.
- A parameter without ``.grad`` is skipped: its state and its step count stay as they are.
- ``optimizer.state[p]`` holds ``p``'s entries of the functional state (the very tensors, named by their place in
  the state); state that belongs to the whole group (a learned optimizer's step count, loss averages,
  coefficients) appears in each of the group's parameters. ``state_dict()`` is torch's layout built from it, so
  it loads by position (other parameter names, a ``module.`` prefix), and hooks see all of it.
- ``copy.deepcopy`` and ``pickle`` keep the state (pickling needs optimizers that record how they were built).
- Complex parameters are stepped as real ones of twice the size (``torch.view_as_real``), as ``torch.optim``.

Each param group keeps its own functional state, keyed by parameter name (``named_parameters()`` or a dict of
parameters give names; plain parameters are keyed ``"0", "1", ...`` within their group). A group may carry its
own functional optimizer under the key ``"optimizer"``. A factory that takes ``names`` (the learned mixture's
``optimizer``) is told each group's parameter names, so a mixture's layers may be spread over groups.

A functional optimizer whose ``update`` is an :class:`~optimizers.base.InPlaceUpdate` (the learned mixture's, the
base directions') is stepped through its in-place kernel: the step needs no autograd graph and the adapter owns the
state, so the state tensors and the parameters are overwritten rather than rebuilt, which is what makes the step
about as cheap as ``torch.optim``'s. Any other optimizer's updates are computed and then added.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from optimizers._checks import non_negative_float
from optimizers.base import GradientTransformation, OptState, Params, Workspace, apply_in_place
from optimizers.transforms import maximize as ascend

__all__ = ["FunctionalOptimizer", "as_torch_optimizer"]

ParamsArg = Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]] | Mapping[str, Tensor]

TORCH_OPTIONS = frozenset({
    "alpha", "amsgrad", "b1", "b2", "betas", "capturable", "centered", "dampening", "decoupled_weight_decay",
    "differentiable", "eps", "eps_root", "etas", "foreach", "fused", "history_size", "initial_accumulator_value",
    "lambd", "line_search_fn", "lr_decay", "max_eval", "max_iter", "maximize", "momentum", "momentum_decay",
    "nesterov", "rho", "step_sizes", "t0", "tolerance_change", "tolerance_grad", "weight_decay",
})
"""Hyper-parameter names of ``torch.optim``'s optimizers (and of ours): in a param group, each must be an option
of the group's optimizer. ``SPEED_FLAGS`` among them are accepted when off (None or False): they change no math."""
SPEED_FLAGS = frozenset({"capturable", "differentiable", "foreach", "fused"})
# recorded arguments, no group options
_BUILD_ONLY = frozenset({"compile", "lr", "meta_params", "missing_loss", "names"})


class FunctionalOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose step is the functional optimizer's update of each param group.

    See the module docstring for the contract; ``functional_states`` holds each group's functional state.
    """

    def __init__(self, params: ParamsArg, optimizer: GradientTransformation, *, lr: float | Tensor | None = None
                 ) -> None:
        _check_transform(optimizer)
        self._default_optimizer = optimizer
        self._optimizers: list[GradientTransformation] = []  # each group's functional optimizer, as given
        self._keys: list[list[str]] = []  # each group's state keys, fixed when it was added
        self._built: list[GradientTransformation | None] = []  # ... rebuilt with the group's options
        self._signatures: list[tuple | None] = []  # the options it was built with
        self._states: list[OptState] = []
        self._workspace = Workspace()
        default_lr = _default_lr(optimizer) if lr is None else _check_lr(lr)
        if isinstance(params, Mapping):
            params = list(params.items())
        super().__init__(params, defaults={"lr": default_lr, **_options(optimizer)})
        self.state = _StateView(self)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its functional optimizer is ``param_group["optimizer"]`` if given, else the default.

        The group's options start at that optimizer's (its rate, ``betas``, ...), unless the group gives them.
        """
        param_group = dict(param_group)
        optimizer = param_group.pop("optimizer", self._default_optimizer)
        _check_transform(optimizer)
        options = _options(optimizer)
        own_lr = self.defaults["lr"] if optimizer is self._default_optimizer else _default_lr(optimizer)
        for key, value in {"lr": own_lr, **options}.items():
            param_group.setdefault(key, value)
        param_group["lr"] = _check_lr(param_group["lr"])
        params = param_group["params"]
        if not isinstance(params, Tensor | set):
            param_group["params"] = params = list(params)
            tensors = [p[1] if isinstance(p, tuple) else p for p in params]
            if len({id(p) for p in tensors}) != len(tensors):
                raise ValueError(f"param group {len(self.param_groups)} lists a parameter more than once; "
                                 "give each parameter once (torch.optim would step it twice)")
        given = set(param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key in set(self.defaults) - given:  # the default optimizer's options, not this group's
            group.pop(key)
        index = len(self.param_groups) - 1
        self._optimizers.append(optimizer)
        self._keys.append(list(group.get("param_names") or [str(i) for i in range(len(group["params"]))]))
        self._built.append(None)
        self._signatures.append(None)
        self._states.append(None)
        try:
            self._prepare(index, group)
        except Exception:
            for column in (self.param_groups, self._optimizers, self._keys, self._built, self._signatures,
                           self._states):
                column.pop()
            raise

    @property
    def functional_states(self) -> list[OptState]:
        """The functional optimizer state of each parameter group (read-only; an in-place step overwrites it)."""
        return list(self._states)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, *, loss: Tensor | float | None = None) -> Any:
        """One update of every group; ``closure`` (re-evaluating the loss, as torch's) or ``loss`` feed learned
        optimizers. Returns the closure's loss."""
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        loss_value = None if loss is None else torch.as_tensor(loss).detach()
        for index, group in enumerate(self.param_groups):
            transform = self._prepare(index, group)
            grads, moving = {}, []
            for key, p in zip(self._keys[index], group["params"]):
                grads[key] = None if p.grad is None else _real(_dense_grad(key, p))
                if p.grad is not None:
                    moving.append(key)
            if not moving:
                continue
            params = self._params(index, group)
            lr = float(group["lr"])
            self._states[index] = apply_in_place(
                transform, {k: params[k] for k in moving}, grads, self._states[index], params, loss=loss_value,
                scale=dict.fromkeys(moving, lr), workspace=self._workspace,
            )
        self.state.stale()
        return loss

    # --- options --------------------------------------------------------------------------------------------

    def _prepare(self, index: int, group: dict[str, Any]) -> GradientTransformation:
        """The group's functional optimizer built with its current options (rebuilt, and its state carried over,
        when they changed); the state is made on the first call."""
        base = self._optimizers[index]
        allowed = _check_options(index, group, base)
        signature = tuple((key, _frozen(group[key])) for key in allowed)
        if signature == self._signatures[index]:
            return self._built[index]
        built = _rebuild(base, {key: group[key] for key in allowed}, self._keys[index], index)
        params = self._params(index, group)
        old = self._states[index]
        self._states[index] = built.init(params) if old is None else _carry_over(old, built, params)
        self._built[index], self._signatures[index] = built, signature
        if isinstance(self.state, _StateView):  # not yet while torch's __init__ adds the first groups
            self.state.stale()
        return built

    def _params(self, index: int, group: dict[str, Any]) -> Params:
        return {k: _real(p.detach()) for k, p in zip(self._keys[index], group["params"])}

    # --- state: views, state_dict, copies ---------------------------------------------------------------------

    def _per_parameter(self) -> dict[Tensor, dict[str, Tensor]]:
        """Each parameter's entries of its group's functional state (group-wide entries in every parameter's)."""
        views: dict[Tensor, dict[str, Tensor]] = {}
        for index, group in enumerate(self.param_groups):
            if self._states[index] is None:
                continue
            keys = self._keys[index]
            leaves, _ = pytree.tree_flatten(self._states[index])
            layout = _layout(self._states[index], keys)
            shared = {name: leaf for (key, name), leaf in zip(layout, leaves) if key is None}
            entries: dict[str, dict[str, Tensor]] = {k: dict(shared) for k in keys}
            for (key, name), leaf in zip(layout, leaves):
                if key is not None:
                    entries[key][name] = leaf
            views.update({p: entries[k] for k, p in zip(keys, group["params"])})
        return views

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state`` / ``param_groups`` layout; the state's tensors are copies, so that a state dict kept
        in memory does not change under later in-place steps."""
        state_dict = super().state_dict()
        state_dict["state"] = {
            k: {name: v.clone() if isinstance(v, Tensor) else v for name, v in entries.items()}
            if isinstance(entries, dict) else entries
            for k, entries in state_dict["state"].items()
        }
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, matching parameters by position (as torch) and checking each one's entries.

        Raises:
            ValueError: the saved state does not have the entries this optimizer's state has (another optimizer,
                other options, or a state dict of ``torch.optim``).
        """
        for index, (saved, base) in enumerate(zip(state_dict["param_groups"], self._optimizers)):
            _check_options(index, saved, base)
        super().load_state_dict(state_dict)  # torch's checks, its position mapping and the saved groups
        loaded, self.state = self.state, _StateView(self)
        for index, group in enumerate(self.param_groups):
            self._signatures[index] = self._states[index] = None
            self._prepare(index, group)
            self._states[index] = _restore(index, self._states[index], self._keys[index], group["params"], loaded)
        self.state.stale()

    def __getstate__(self) -> dict[str, Any]:
        return {
            "defaults": self.defaults, "param_groups": self.param_groups,
            "_default_optimizer": self._default_optimizer, "_optimizers": self._optimizers, "_keys": self._keys,
            "_states": self._states,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_optimizers" in state:  # a copy or an unpickled optimizer (torch's load_state_dict passes only its part)
            count = len(self.param_groups)
            self._built, self._signatures = [None] * count, [None] * count
            self._workspace = Workspace()
            self.state = _StateView(self)


def as_torch_optimizer(
    optimizer: GradientTransformation, params: ParamsArg, *, lr: float | Tensor | None = None
) -> FunctionalOptimizer:
    """Wrap a functional optimizer as a ``torch.optim.Optimizer`` over ``params``.

    Args:
        optimizer: any ``GradientTransformation`` (hand-designed or a learned optimizer's ``.optimizer()``).
        params: parameters, ``named_parameters()``, a ``{name: parameter}`` dict, or torch-style param groups
            (a group may give its own ``"optimizer"``, ``"lr"`` and options).
        lr: the learning rate of every group that gives none; default: the optimizer's own rate, or 1 (the factor
            on the step) for an optimizer without a single rate.

    Raises:
        ValueError: an optimizer without ``init``/``update``, a negative ``lr``, no parameters, a parameter given
            twice, or a group option the optimizer does not have.
    """
    return FunctionalOptimizer(params, optimizer, lr=lr)


# --- helpers ------------------------------------------------------------------------------------------------------


class _StateView(dict):
    """``optimizer.state``: parameter -> its entries of the functional state, rebuilt when read after a change."""

    def __init__(self, owner: FunctionalOptimizer) -> None:
        super().__init__()
        self._owner, self._stale = owner, True

    def stale(self) -> None:
        self._stale = True

    def _fresh(self) -> None:
        if self._stale:
            self._stale = False
            super().clear()
            super().update(self._owner._per_parameter())

    def __getitem__(self, key: Any) -> Any:
        self._fresh()
        return super().setdefault(key, {})

    def __contains__(self, key: object) -> bool:
        self._fresh()
        return super().__contains__(key)

    def __iter__(self):
        self._fresh()
        return super().__iter__()

    def __len__(self) -> int:
        self._fresh()
        return super().__len__()

    def get(self, key: Any, default: Any = None) -> Any:
        self._fresh()
        return super().get(key, default)

    def keys(self):
        self._fresh()
        return super().keys()

    def values(self):
        self._fresh()
        return super().values()

    def items(self):
        self._fresh()
        return super().items()

    def __reduce__(self) -> tuple:
        self._fresh()
        return (dict, (dict(super().items()),))


def _check_transform(optimizer: object) -> None:
    if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
        raise ValueError(f"optimizer must have init and update functions; got {optimizer!r}")


def _check_options(index: int, group: Mapping[str, Any], optimizer: GradientTransformation) -> dict[str, Any]:
    """The optimizer's options; refuses a torch option in ``group`` that the optimizer does not have."""
    allowed = _options(optimizer)
    for key, value in group.items():
        if key in TORCH_OPTIONS and key not in allowed and not (key in SPEED_FLAGS and value in (None, False)):
            raise ValueError(
                f"param group {index}: {key!r} is not an option of {_name(optimizer)}; its options are "
                f"{sorted(allowed)} (give the group its own 'optimizer' for another rule)"
            )
    return allowed


def _check_lr(lr: object) -> float | Tensor:
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"FunctionalOptimizer: lr must be a finite number >= 0 or a one-element float tensor; "
                             f"got {lr!r}")
        non_negative_float("lr", float(lr), owner="FunctionalOptimizer")
        return lr
    return non_negative_float("lr", lr, owner="FunctionalOptimizer")


def _rate(optimizer: GradientTransformation) -> object:
    spec = optimizer.hyperparams if isinstance(optimizer, GradientTransformation) else None
    return None if spec is None else spec.kwargs.get("lr")


def _is_schedule(value: object) -> bool:
    return callable(value) and not isinstance(value, Tensor)


def _default_lr(optimizer: GradientTransformation) -> float | Tensor:
    """The optimizer's own rate; 1 (the factor on its step) when it has none or its rate is a schedule."""
    rate = _rate(optimizer)
    if rate is None or _is_schedule(rate):
        return 1.0
    return rate.detach().clone() if isinstance(rate, Tensor) else float(rate)


def _options(optimizer: GradientTransformation) -> dict[str, Any]:
    """The optimizer's param-group options under torch's names: its recorded arguments, and ``maximize``."""
    spec = optimizer.hyperparams if isinstance(optimizer, GradientTransformation) else None
    options = {} if spec is None else {k: v for k, v in spec.kwargs.items() if k not in _BUILD_ONLY}
    if "b1" in options and "b2" in options:
        options["betas"] = (options.pop("b1"), options.pop("b2"))
    options.setdefault("maximize", False)
    return options


def _name(optimizer: GradientTransformation) -> str:
    spec = optimizer.hyperparams if isinstance(optimizer, GradientTransformation) else None
    return "this optimizer" if spec is None else getattr(spec.factory, "__qualname__", repr(spec.factory))


def _frozen(value: Any) -> Any:
    """A comparable copy of an option's value (tensors as numbers, sequences as tuples)."""
    if isinstance(value, Tensor):
        return tuple(value.detach().reshape(-1).tolist())
    if isinstance(value, tuple | list):
        return tuple(_frozen(v) for v in value)
    return value


def _rebuild(base: GradientTransformation, options: dict[str, Any], keys: list[str], index: int
             ) -> GradientTransformation:
    """``base`` with a group's options; its own rate is replaced by 1, as the group's ``lr`` scales the step."""
    spec = base.hyperparams if isinstance(base, GradientTransformation) else None
    if spec is None:
        return ascend(base) if options["maximize"] else base
    kwargs = dict(spec.kwargs)
    for key, value in options.items():
        if key == "betas":
            if not isinstance(value, tuple | list) or len(value) != 2:
                raise ValueError(f"param group {index}: betas must be a pair (b1, b2); got {value!r}")
            kwargs["b1"], kwargs["b2"] = value
        elif key in kwargs:
            kwargs[key] = value
    if "lr" in kwargs and not _is_schedule(kwargs["lr"]):
        kwargs["lr"] = 1.0
    if "names" in kwargs:
        kwargs["names"] = keys
    built = spec.factory(**kwargs)
    return ascend(built) if options["maximize"] and "maximize" not in spec.kwargs else built


def _real(tensor: Tensor) -> Tensor:
    """A complex tensor as a real one with a trailing dimension of 2 (a view: in-place steps reach the original)."""
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def _dense_grad(name: str, p: Tensor) -> Tensor:
    if p.grad.is_sparse:
        raise ValueError(f"parameter {name!r} has a sparse gradient; functional optimizers need dense gradients")
    return p.grad


def _key_name(entry: Any) -> str:
    for attribute in ("name", "idx", "key"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def _layout(state: OptState, keys: list[str]) -> list[tuple[str | None, str]]:
    """Per leaf of ``state`` (in flattening order): the parameter key it belongs to (None: group-wide) and its
    name, the path to it without that key, positions in tuples dropped where the names stay distinct."""
    known = set(keys)
    paths, _ = pytree.tree_flatten_with_path(state)
    owners, full, short = [], [], []
    for path, _leaf in paths:
        key = next((e.key for e in path if isinstance(e, pytree.MappingKey) and e.key in known), None)
        rest = [e for e in path if not (isinstance(e, pytree.MappingKey) and e.key == key)]
        owners.append(key)
        full.append(".".join(_key_name(e) for e in rest))
        short.append(".".join(_key_name(e) for e in rest if not isinstance(e, pytree.SequenceKey)))
    distinct = len(set(zip(owners, short))) == len(short) and not set(
        s for o, s in zip(owners, short) if o is None) & set(s for o, s in zip(owners, short) if o is not None)
    return list(zip(owners, short if distinct else full))


def _carry_over(old: OptState, built: GradientTransformation, params: Params) -> OptState:
    """``old`` if ``built`` keeps a state of the same structure, else ``built``'s fresh state with every leaf at
    the same place and of the same shape taken from ``old`` (an option that adds state, such as momentum > 0)."""
    shapes = {k: torch.empty_like(p, device="meta") for k, p in params.items()}
    if pytree.tree_structure(built.init(shapes)) == pytree.tree_structure(old):
        return old
    before = {pytree.keystr(path): leaf for path, leaf in pytree.tree_flatten_with_path(old)[0]}
    fresh, spec = pytree.tree_flatten_with_path(built.init(params))
    leaves = []
    for path, leaf in fresh:
        kept = before.get(pytree.keystr(path))
        same = isinstance(kept, Tensor) and isinstance(leaf, Tensor) and kept.shape == leaf.shape
        leaves.append(kept if same else leaf)
    return pytree.tree_unflatten(leaves, spec)


def _restore(index: int, template: OptState, keys: list[str], params: list[Tensor], loaded: Mapping) -> OptState:
    """``template`` with each leaf taken from the loaded per-parameter entries (``loaded[param][name]``)."""
    leaves, spec = pytree.tree_flatten(template)
    layout = _layout(template, keys)
    by_key = dict(zip(keys, params))
    expected = {k: {name for owner, name in layout if owner in (k, None)} for k in keys}
    for position, k in enumerate(keys):
        saved = set(loaded.get(by_key[k], {}))
        if saved and saved != expected[k]:
            raise ValueError(
                f"group {index}: the saved state of parameter {position} ({k!r}) has entries {sorted(saved)}; "
                f"expected {sorted(expected[k])} (a state_dict of as_torch_optimizer with the same optimizer "
                "and options)"
            )
    restored = []
    for (owner, name), now in zip(layout, leaves):
        sources = [by_key[owner]] if owner is not None else list(params)
        saved = next((loaded[p][name] for p in sources if name in loaded.get(p, {})), None)
        if isinstance(now, Tensor) and saved is not None:
            saved = torch.as_tensor(saved)
            if saved.shape != now.shape:
                raise ValueError(f"group {index}: saved state entry {name!r} of shape {tuple(saved.shape)}; "
                                 f"expected {tuple(now.shape)}")
            now = saved.to(device=now.device, dtype=now.dtype).clone()
        restored.append(now)
    return pytree.tree_unflatten(restored, spec)
