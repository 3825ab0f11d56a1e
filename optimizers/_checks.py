"""Argument checks of the optimizers package.

``optimizers`` is the leaf of the layering and imports nothing of metaopt, so it cannot use
``metaopt.checks``; the number checks it needs are repeated here with the same rules (a bool is not a
number, floats must be finite) and the same messages (``"{owner}: {name} must be ...; got {value!r}"``),
which ``tests/test_checks.py`` pins to metaopt's. ``check_hyperparameter`` is the optimizers' own: a
hyper-parameter of a functional optimizer may be a tensor (a meta-learned one).
"""

from __future__ import annotations

import math
from numbers import Integral, Real

from torch import Tensor


def _refuse(owner: str, name: str, allowed: str, value: object) -> ValueError:
    return ValueError(f"{owner}: {name} must be {allowed}; got {value!r}")


def integer(name: str, value: object, *, owner: str, low: int) -> int:
    """``value`` as an int >= ``low``; a bool is refused."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise _refuse(owner, name, f"an int >= {low}", value)
    return int(value)


def positive_int(name: str, value: object, *, owner: str) -> int:
    """``value`` as an int >= 1."""
    return integer(name, value, owner=owner, low=1)


def non_negative_int(name: str, value: object, *, owner: str) -> int:
    """``value`` as an int >= 0."""
    return integer(name, value, owner=owner, low=0)


def _finite(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, Real) and math.isfinite(value)


def positive_float(name: str, value: object, *, owner: str) -> float:
    """``value`` as a finite float > 0."""
    if not (_finite(value) and value > 0):
        raise _refuse(owner, name, "a finite number > 0", value)
    return float(value)


def non_negative_float(name: str, value: object, *, owner: str) -> float:
    """``value`` as a finite float >= 0."""
    if not (_finite(value) and value >= 0):
        raise _refuse(owner, name, "a finite number >= 0", value)
    return float(value)


def check_hyperparameter(
    name: str, value: float | Tensor, *, low: float | None = None, high: float | None = None,
    high_inclusive: bool = False,
) -> None:
    """Refuse a hyper-parameter outside ``[low, high)`` (or ``[low, high]``) with a readable message.

    Tensor values (meta-learned hyper-parameters) only need a floating dtype; their value is not read, so that
    construction works inside ``torch.func`` transforms.
    """
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise ValueError(f"{name} must be a float or a floating-point tensor; got dtype {value.dtype}")
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number or a tensor; got {value!r}")
    upper = "]" if high_inclusive else ")"
    expected = f"{name} in [{low if low is not None else '-inf'}, {high if high is not None else 'inf'}{upper}"
    too_low = low is not None and value < low
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high or value != value:
        raise ValueError(f"invalid {name}: got {value!r}; expected {expected}")
