"""Argument checks shared by the constructors of metaopt and hypernets.

Each check returns the value it accepts, so that ``self.k = positive_int("k", k, owner="Lasso")`` is one
line, or raises an :class:`ArgumentError` (a ``ValueError``) that names the owner, the argument, what is
allowed and the value given: ``"Lasso: k must be an int >= 1; got 0"``. One rule for numbers everywhere:
a bool is not a number (``True`` is refused where an int or a float is expected), an int is accepted
where a float is, and floats must be finite.

``optimizers`` is the leaf of the layering and may not import metaopt, so it keeps its own copy of the
few number checks it needs (``optimizers/_checks.py``); ``tests/test_checks.py`` pins both to the same
decisions and messages.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Callable, Collection, Sequence, TypeVar

T = TypeVar("T")


class ArgumentError(ValueError):
    """A refused argument: its ``owner``, ``name``, what is ``allowed`` and the ``value`` given."""

    def __init__(self, owner: str, name: str, allowed: str, value: object) -> None:
        super().__init__(owner, name, allowed, value)  # all four in args, so that it pickles
        self.owner, self.name, self.allowed, self.value = owner, name, allowed, value

    def __str__(self) -> str:
        return f"{self.owner}: {self.name} must be {self.allowed}; got {self.value!r}"


def integer(name: str, value: object, *, owner: str, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]`` (no upper bound when ``high`` is None)."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low or (high is not None and value > high):
        raise ArgumentError(owner, name, f"an int >= {low}" if high is None else f"an int in [{low}, {high}]", value)
    return int(value)


def positive_int(name: str, value: object, *, owner: str) -> int:
    """``value`` as an int >= 1: a size, a count of steps or layers."""
    return integer(name, value, owner=owner, low=1)


def non_negative_int(name: str, value: object, *, owner: str) -> int:
    """``value`` as an int >= 0: a count that may be zero, a seed."""
    return integer(name, value, owner=owner, low=0)


def _finite(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, Real) and math.isfinite(value)


def positive_float(name: str, value: object, *, owner: str) -> float:
    """``value`` as a finite float > 0: a step size, a penalty, a tolerance."""
    if not (_finite(value) and value > 0):
        raise ArgumentError(owner, name, "a finite number > 0", value)
    return float(value)


def non_negative_float(name: str, value: object, *, owner: str) -> float:
    """``value`` as a finite float >= 0: a noise level, a coefficient that may be off."""
    if not (_finite(value) and value >= 0):
        raise ArgumentError(owner, name, "a finite number >= 0", value)
    return float(value)


def probability(name: str, value: object, *, owner: str) -> float:
    """``value`` as a float in ``[0, 1]``."""
    if not (_finite(value) and 0 <= value <= 1):
        raise ArgumentError(owner, name, "a probability in [0, 1]", value)
    return float(value)


def interval(name: str, value: object, *, owner: str, low_bound: float | None = None) -> tuple[float, float]:
    """``value`` as a pair ``(low, high)`` of finite numbers with ``low < high`` (and ``low >= low_bound``)."""
    bound = "" if low_bound is None else f" and low >= {low_bound}"
    allowed = f"a pair (low, high) of finite numbers with low < high{bound}"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ArgumentError(owner, name, allowed, value)
    low, high = value
    if not (_finite(low) and _finite(high) and low < high) or (low_bound is not None and low < low_bound):
        raise ArgumentError(owner, name, allowed, value)
    return float(low), float(high)


def boolean(name: str, value: object, *, owner: str) -> bool:
    """``value`` if it is True or False (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise ArgumentError(owner, name, "a bool", value)
    return value


def one_of(name: str, value: T, allowed: Collection[T], *, owner: str) -> T:
    """``value`` if it is one of ``allowed`` (a bool is not taken for 0 or 1)."""
    choices = tuple(allowed)
    if value not in choices or (isinstance(value, bool) and not any(value is c for c in choices)):
        raise ArgumentError(owner, name, f"one of {choices!r}", value)
    return value


def optional(check: Callable[..., T], name: str, value: object, *, owner: str) -> T | None:
    """None, or ``value`` through ``check``, whose message then also allows None."""
    if value is None:
        return None
    try:
        return check(name, value, owner=owner)
    except ArgumentError as error:
        raise ArgumentError(owner, error.name, f"None or {error.allowed}", error.value) from None


def sequence_of(
    name: str, values: object, check: Callable[..., T], *, owner: str, length: int | None = None
) -> tuple[T, ...]:
    """A non-empty sequence (not a string), each entry through ``check`` as ``name[i]``, as a tuple.

    ``check`` is one of the checks above (``functools.partial`` sets bounds of :func:`integer`);
    ``length`` asks for exactly that many entries.
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ArgumentError(owner, name, "a non-empty sequence", values)
    if length is not None and len(values) != length:
        raise ArgumentError(owner, name, f"a sequence of {length} entries", values)
    return tuple(check(f"{name}[{i}]", v, owner=owner) for i, v in enumerate(values))


__all__ = [
    "ArgumentError",
    "boolean",
    "integer",
    "interval",
    "non_negative_float",
    "non_negative_int",
    "one_of",
    "optional",
    "positive_float",
    "positive_int",
    "probability",
    "sequence_of",
]
