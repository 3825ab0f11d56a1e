"""Run any functional optimizer as a ``torch.optim.Optimizer`` in an ordinary training loop.

    opt = as_torch_optimizer(adam(1e-3), model.named_parameters())
    for x, y in data:
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step(loss=loss)  # loss only matters to learned optimizers; opt.step() is fine otherwise
        opt.zero_grad()

Each parameter group keeps its own functional state, keyed by parameter name (``named_parameters()`` or a dict
of parameters give names; plain parameters are keyed ``"0", "1", ...`` within their group). A group may carry
its own functional optimizer under the key ``"optimizer"``. The group's ``"lr"`` (1.0 by default) multiplies the
functional optimizer's updates, so ``torch.optim.lr_scheduler`` schedulers work on top of it.

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

__all__ = ["FunctionalOptimizer", "as_torch_optimizer"]

ParamsArg = Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]] | Mapping[str, Tensor]


class FunctionalOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose step is ``optimizer.update`` on the group's parameters.

    Parameters without a gradient at a step are left unchanged; the functional state still advances with a
    zero gradient for them (a functional state moves as a whole). ``state_dict()`` stores a copy of the functional
    state's tensors, ``load_state_dict()`` restores them into the structure that ``optimizer.init`` builds.
    """

    def __init__(self, params: ParamsArg, optimizer: GradientTransformation, *, lr: float = 1.0) -> None:
        if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
            raise ValueError(f"optimizer must have init and update functions; got {optimizer!r}")
        non_negative_float("lr", lr, owner="FunctionalOptimizer")
        self._default_optimizer = optimizer
        self._optimizers: list[GradientTransformation] = []
        self._states: list[OptState] = []
        self._workspace = Workspace()
        if isinstance(params, Mapping):
            params = list(params.items())
        super().__init__(params, defaults={"lr": float(lr)})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its functional optimizer is ``param_group["optimizer"]`` if given, else the default."""
        param_group = dict(param_group)
        optimizer = param_group.pop("optimizer", self._default_optimizer)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._optimizers.append(optimizer)
        self._states.append(optimizer.init({n: p.detach() for n, p in _named(group).items()}))

    @property
    def functional_states(self) -> list[OptState]:
        """The functional optimizer state of each parameter group (read-only; an in-place step overwrites it)."""
        return list(self._states)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, *, loss: Tensor | float | None = None) -> Any:
        """One update of every group; ``closure`` (re-evaluating the loss) or ``loss`` feed learned optimizers."""
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        loss_value = None if loss is None else torch.as_tensor(loss).detach()
        for index, group in enumerate(self.param_groups):
            named = _named(group)
            if all(p.grad is None for p in named.values()):
                continue
            grads = {n: _dense_grad(n, p) for n, p in named.items()}
            params = {n: p.detach() for n, p in named.items()}
            # a parameter without a gradient stays put: its update goes to a throw-away tensor
            targets = {n: p if named[n].grad is not None else torch.zeros_like(p) for n, p in params.items()}
            self._states[index] = apply_in_place(
                self._optimizers[index], targets, grads, self._states[index], params, loss=loss_value,
                scale=dict.fromkeys(targets, group["lr"]), workspace=self._workspace,
            )
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The usual ``state`` / ``param_groups`` plus ``functional_state``: per group, copies of the state's leaves.

        Copies, so that a state dict kept in memory does not change under later in-place steps.
        """
        state_dict = super().state_dict()
        state_dict["functional_state"] = [
            [leaf.clone() if isinstance(leaf, Tensor) else leaf for leaf in pytree.tree_leaves(state)]
            for state in self._states
        ]
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, checking that each group's functional state has the same layout."""
        state_dict = dict(state_dict)
        saved = state_dict.pop("functional_state", None)
        if saved is None:
            raise ValueError("state_dict has no 'functional_state'; expected one from FunctionalOptimizer.state_dict()")
        if len(saved) != len(self._states):
            raise ValueError(f"state_dict has {len(saved)} functional states; expected {len(self._states)} (per group)")
        restored = [_restore(i, leaves, state) for i, (leaves, state) in enumerate(zip(saved, self._states))]
        super().load_state_dict(state_dict)
        self._states = restored


def as_torch_optimizer(optimizer: GradientTransformation, params: ParamsArg, *, lr: float = 1.0) -> FunctionalOptimizer:
    """Wrap a functional optimizer as a ``torch.optim.Optimizer`` over ``params``.

    Args:
        optimizer: any ``GradientTransformation`` (hand-designed or a learned optimizer's ``.optimizer()``).
        params: parameters, ``named_parameters()``, a ``{name: parameter}`` dict, or torch-style param groups
            (a group may give its own ``"optimizer"`` and ``"lr"``).
        lr: default multiplier on the updates (the functional optimizer already carries its learning rate).
    """
    return FunctionalOptimizer(params, optimizer, lr=lr)


def _named(group: dict[str, Any]) -> Params:
    names = group.get("param_names") or [str(i) for i in range(len(group["params"]))]
    return dict(zip(names, group["params"]))


def _dense_grad(name: str, p: Tensor) -> Tensor:
    if p.grad is None:
        return torch.zeros_like(p)
    if p.grad.is_sparse:
        raise ValueError(f"parameter {name!r} has a sparse gradient; functional optimizers need dense gradients")
    return p.grad


def _restore(index: int, leaves: list[Any], template: OptState) -> OptState:
    current, spec = pytree.tree_flatten(template)
    if len(leaves) != len(current):
        raise ValueError(
            f"group {index}: saved functional state has {len(leaves)} tensors; expected {len(current)} "
            "(was it saved with the same optimizer and parameters?)"
        )
    restored = []
    for saved, now in zip(leaves, current):
        if isinstance(now, Tensor):
            saved = torch.as_tensor(saved)
            if saved.shape != now.shape:
                raise ValueError(
                    f"group {index}: saved state tensor of shape {tuple(saved.shape)}; expected {tuple(now.shape)}"
                )
            saved = saved.to(device=now.device, dtype=now.dtype).clone()
        restored.append(saved)
    return pytree.tree_unflatten(restored, spec)
