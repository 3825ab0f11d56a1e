"""The learned mixture's in-place step as one compiled pass over each parameter (``torch.compile``).

Each base direction's own kernel is a pass over the parameters of its own (five directions: five reads and writes of
every parameter and gradient). Here the directions' elementwise rules are written once, summed with the mixture's
coefficients and handed to ``torch.compile``, whose inductor backend emits one loop per parameter that reads the
gradient, the parameter and each state tensor once and writes each once. The first step compiles (tens of seconds
on a CPU, with a C++ compiler); a compiled step is cached per set of directions and reused for every model, dtype
and device that one compile covers (torch recompiles for new shapes).

Only directions whose rule is known here, with plain-number hyper-parameters, are fused (:func:`plan`); when
compiling fails (no C++ compiler, an unsupported platform or device), the failure is logged once and the mixture
runs the directions' own kernels from then on. Callers run under ``torch.no_grad()`` on plain tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from optimizers import alias

__all__ = ["compiled_step", "plan"]

log = logging.getLogger(__name__)

Plan = tuple[tuple[str, tuple[tuple[str, float], ...]], ...]

# each fusable direction: its factory, the state fields (of each per-parameter dict) its rule reads and advances,
# and the hyper-parameter values it must have (the other variants keep their own kernels)
_KINDS: dict[str, tuple[Callable, tuple[str, ...], dict[str, object]]] = {
    "sgd": (alias.sgd_direction, (), {}),
    "momentum": (alias.momentum_direction, ("trace",), {}),
    "nesterov": (alias.nesterov_direction, ("trace",), {}),
    "adam": (alias.adam_direction, ("mu", "nu"), {"amsgrad": False}),
    "rmsprop": (alias.rmsprop_direction, ("nu",), {"centered": False}),
    "adagrad": (alias.adagrad_direction, ("sum_of_squares",), {}),
    "sign": (alias.sign_direction, (), {}),
    "lion": (alias.lion_direction, ("mu",), {}),
}


def plan(directions: Sequence[object]) -> Plan | None:
    """The directions as ``((kind, ((hyper-parameter, value), ...)), ...)``, or None if one cannot be fused."""
    out = []
    for direction in directions:
        spec = getattr(direction, "hyperparams", None)
        kind = next((k for k, (factory, _, _) in _KINDS.items() if spec is not None and spec.factory is factory), None)
        if kind is None:
            return None
        required = _KINDS[kind][2]
        if any(spec.kwargs.get(k) != v for k, v in required.items()):
            return None
        numbers = {k: v for k, v in spec.kwargs.items() if k not in required}
        if not all(isinstance(v, float | int) and not isinstance(v, bool) for v in numbers.values()):
            return None
        out.append((kind, tuple(sorted((k, float(v)) for k, v in numbers.items()))))
    return tuple(out)


def _state_columns(steps: Plan, states: Sequence[object], keys: Sequence[str]) -> list[list[list[Tensor]]]:
    """Per direction, per state field its rule uses, the tensors of ``keys`` (the lists the compiled step takes)."""
    return [[[getattr(state, field)[k] for k in keys] for field in _KINDS[kind][1]]
            for (kind, _), state in zip(steps, states)]


def _advance_counts(steps: Plan, states: Sequence[object], keys: Sequence[str], like: Tensor) -> list[Tensor | None]:
    """Advance Adam's step counts; per direction, the per-parameter numbers its rule needs (Adam: [keys, 3], the
    bias corrections ``1 - b1^t``, ``1 - b2^t`` and the square root of the second), computed once per tensor here
    rather than per element in the compiled loop."""
    out: list[Tensor | None] = []
    for (kind, h), state in zip(steps, states):
        if kind != "adam":
            out.append(None)
            continue
        counts = [state.count[k] for k in keys]
        torch._foreach_add_(counts, 1)
        # in float64, then the parameters' dtype: in bfloat16 0.999 rounds to 1, and 1 - b2^t would be 0
        t = torch.stack(counts).to(device=like.device, dtype=torch.float64)
        b1, b2 = dict(h)["b1"], dict(h)["b2"]
        correction1, correction2 = 1.0 - b1 ** t, 1.0 - b2 ** t
        out.append(torch.stack([correction1, correction2, torch.sqrt(correction2)], dim=-1).to(like.dtype))
    return out


def _direction(kind: str, h: dict[str, float], g: Tensor, fields: list[Tensor], numbers: Tensor | None) -> Tensor:
    """One direction's ``d_t`` of one parameter, advancing its state tensors (``copy_``: inductor fuses it).

    The same expressions as the directions' pure updates in :mod:`optimizers.transforms`.
    """
    if kind == "sgd":
        return g
    if kind in ("momentum", "nesterov"):
        (trace,) = fields
        new = h["beta"] * trace + g
        trace.copy_(new)
        return g + h["beta"] * new if kind == "nesterov" else new
    if kind == "adam":
        mu, nu = fields
        m, v = torch.lerp(mu, g, 1.0 - h["b1"]), torch.lerp(nu, g * g, 1.0 - h["b2"])
        mu.copy_(m)
        nu.copy_(v)
        correction1, correction2, root2 = numbers[0], numbers[1], numbers[2]
        if h["eps_root"] != 0:
            denom = torch.sqrt(v / correction2 + h["eps_root"]) + h["eps"]
        else:
            denom = torch.sqrt(v) / root2 + h["eps"]
        return m / denom / correction1
    if kind == "rmsprop":
        (nu,) = fields
        v = torch.lerp(nu, g * g, 1.0 - h["alpha"])
        nu.copy_(v)
        return g / (torch.sqrt(v + h["eps_root"]) + h["eps"])
    if kind == "adagrad":
        (total,) = fields
        s = total + g * g
        total.copy_(s)
        return g / (torch.sqrt(s) + h["eps"])
    if kind == "sign":
        return torch.sign(g)
    if kind == "lion":
        (mu,) = fields
        d = torch.sign(torch.lerp(mu, g, 1.0 - h["b1"]))
        mu.copy_(torch.lerp(mu, g, 1.0 - h["b2"]))
        return d
    raise AssertionError(kind)


def _make(steps: Plan) -> Callable[..., None]:
    rules = [(kind, dict(h)) for kind, h in steps]

    def mix_(targets: list[Tensor], grads: list[Tensor], columns: list[list[list[Tensor]]],
             numbers: list[Tensor | None], coef: Tensor) -> None:
        """``targets[i] += Σ_b coef[i, b] · d_b(grads[i])``, each direction's state advanced in place."""
        for i, (target, g) in enumerate(zip(targets, grads)):
            total = None
            for b, (kind, h) in enumerate(rules):
                row = None if numbers[b] is None else numbers[b][i]
                term = coef[i, b] * _direction(kind, h, g, [field[i] for field in columns[b]], row)
                total = term if total is None else total + term
            target.add_(total)

    return mix_


_COMPILED: dict[Plan, Callable[..., None] | None] = {}  # None: compiling failed, use the directions' kernels


def compiled_step(steps: Plan) -> Callable[..., bool]:
    """``run(targets, grads, states, keys, coef) -> bool``: ``targets[k] += Σ_b coef[i, b] · d_b`` for the ``i``-th
    key, the directions' ``states`` advanced in place, by the compiled fused step; False (nothing done, the states
    as they were) when compiling is unavailable or failed (logged once; the caller then runs the directions' own
    kernels)."""

    def run(targets: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[object], keys: Sequence[str],
            coef: Tensor) -> bool:
        if steps not in _COMPILED:
            compile_ = getattr(torch, "compile", None)
            _COMPILED[steps] = None if compile_ is None else compile_(_make(steps), fullgraph=True)
        fn = _COMPILED[steps]
        if fn is None:
            return False
        numbers = _advance_counts(steps, states, keys, grads[0])
        try:
            fn(list(targets), list(grads), _state_columns(steps, states, keys), numbers, coef)
        except Exception as error:  # torch.compile fails in many ways (backend, C++ compiler, platform, device)
            log.warning("compiling the fused mixture step failed (%s: %s); using the directions' own kernels",
                        type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            _COMPILED[steps] = None
            for (kind, _), state in zip(steps, states):
                if kind == "adam":
                    torch._foreach_sub_([state.count[k] for k in keys], 1)
            return False
        return True

    return run
