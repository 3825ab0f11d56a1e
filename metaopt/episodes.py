"""The Episode: a batch of tasks, each with a labelled support set and a query set.

Every tensor carries the task dimension first, so every learner is batched over tasks
by construction. Episodes validate their shapes when built and never change afterwards.
"""

from __future__ import annotations

import dataclasses
from numbers import Integral
from types import MappingProxyType
from typing import Mapping, Sequence

import torch

from metaopt.kinds import REGRESSION, EpisodeKind, Kind, episode_kind


def _shape(t: torch.Tensor | None) -> str:
    return "None" if t is None else str(tuple(t.shape))


@dataclasses.dataclass(frozen=True)
class Episode:
    """`T` tasks: support `[T, S, *x]`/`[T, S, *y]`, queries `[T, Q, *x]`/`[T, Q, *y]`.

    ``kind`` (an ``EpisodeKind``, given by object or name, see ``metaopt.kinds``) fixes the labels:
      - ``regression``: float labels of shape ``[T, N, 1]`` (or ``[T, N, *y]`` for vector targets);
      - ``binary``: float labels in {0, 1} of shape ``[T, N, 1]``;
      - ``classification``: integer class ids of shape ``[T, N]`` below ``num_classes``.
    It also carries the task loss (``episode.kind.loss``), the default metric and the probabilities.

    ``info`` holds the tasks' ground truth where known (true weights, noise level, ...),
    each value a tensor with the task dimension first.

    Construction checks the structure, which costs nothing: tensor types, ranks, shapes, task counts,
    floating inputs (one dtype for ``x_support``, ``x_query`` and ``x_unlabeled``), label dtypes and the
    class count. It does not read values, so an episode holding NaN or inf, or labels outside their kind's
    range, is built: a pass over the values would wait for an accelerator (undoing the overlapped copy of
    ``to``) and is not allowed inside ``torch.func`` transforms, which build episodes from traced query
    tensors (``metaopt.analysis.sensitivity``). :meth:`check_values` reads them: ``TaskFamily.sample`` runs it
    on every episode it draws, on the CPU before the move, so no sampled episode holds such values.
    """

    x_support: torch.Tensor
    y_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor
    kind: EpisodeKind | Kind = REGRESSION
    x_unlabeled: torch.Tensor | None = None
    info: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    num_classes: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", episode_kind(self.kind, name="Episode.kind"))
        self._validate()
        object.__setattr__(self, "info", MappingProxyType(dict(self.info)))

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        fields = {
            "x_support": self.x_support,
            "y_support": self.y_support,
            "x_query": self.x_query,
            "y_query": self.y_query,
        }
        for name, value in fields.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"Episode.{name} must be a torch.Tensor; got {type(value).__name__}")
        for name in ("x_support", "x_query"):
            if not fields[name].is_floating_point():
                raise ValueError(f"Episode.{name} must be a floating tensor (inputs are real); got dtype "
                                 f"{fields[name].dtype}")
            if fields[name].dim() < 3:
                raise ValueError(
                    f"Episode.{name} must have shape [tasks, examples, *features] (rank >= 3); "
                    f"got shape {_shape(fields[name])}"
                )
        if self.x_support.shape[2:] != self.x_query.shape[2:]:
            raise ValueError(
                "Episode.x_support and Episode.x_query must share their feature shape; got "
                f"x_support {_shape(self.x_support)} and x_query {_shape(self.x_query)}"
            )
        num_tasks = self.x_support.shape[0]
        tensors = dict(fields)
        if self.x_unlabeled is not None:
            tensors["x_unlabeled"] = self.x_unlabeled
            if self.x_unlabeled.dim() < 3 or self.x_unlabeled.shape[2:] != self.x_support.shape[2:]:
                raise ValueError(
                    "Episode.x_unlabeled must have shape [tasks, unlabeled, *features] matching x_support "
                    f"{_shape(self.x_support)}; got {_shape(self.x_unlabeled)}"
                )
        for name, value in {**tensors, **{f"info[{k!r}]": v for k, v in self.info.items()}}.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != num_tasks:
                raise ValueError(
                    f"Episode.{name} must have the task dimension first ({num_tasks} tasks, as x_support "
                    f"{_shape(self.x_support)}); got {_shape(value) if isinstance(value, torch.Tensor) else value!r}"
                )
        for split in ("support", "query"):
            x, y = fields[f"x_{split}"], fields[f"y_{split}"]
            if y.dim() < 2 or y.shape[:2] != x.shape[:2]:
                raise ValueError(
                    f"Episode.y_{split} must have shape [tasks, examples, ...] matching x_{split} "
                    f"{_shape(x)} in its first two dimensions; got {_shape(y)}"
                )
            self.kind.validate_labels(y, name=f"Episode.y_{split}")
        self.kind.validate_num_classes(self.num_classes)
        if self.y_support.shape[2:] != self.y_query.shape[2:]:
            raise ValueError(
                "Episode.y_support and Episode.y_query must share their label shape; got "
                f"y_support {_shape(self.y_support)} and y_query {_shape(self.y_query)}"
            )
        for other in ("x_query", "x_unlabeled", "y_query"):
            first, value = ("y_support" if other == "y_query" else "x_support"), getattr(self, other)
            if value is not None and value.dtype != getattr(self, first).dtype:
                raise ValueError(f"Episode.{first} and Episode.{other} must share one dtype; got "
                                 f"{getattr(self, first).dtype} and {value.dtype}")

    def check_values(self, *, owner: str = "Episode") -> None:
        """Refuse NaN or inf in the inputs or real labels, binary labels outside {0, 1}, class ids outside
        ``[0, num_classes)``: a ``ValueError`` from ``owner`` naming the field. One pass over the values."""
        tensors = {"x_support": self.x_support, "x_query": self.x_query, "x_unlabeled": self.x_unlabeled,
                   "y_support": self.y_support, "y_query": self.y_query}
        for name, value in tensors.items():
            if value is None or value.numel() == 0:
                continue
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{owner}: Episode.{name} holds NaN or inf values")
            if name.startswith("y") and self.kind == "binary" and not bool(((value == 0) | (value == 1)).all()):
                raise ValueError(f"{owner}: Episode.{name} must hold binary labels 0 or 1 (kind='binary')")
            if name.startswith("y") and self.kind == "classification" and not (
                    0 <= int(value.min()) and int(value.max()) < self.num_classes):
                raise ValueError(f"{owner}: Episode.{name} must hold class ids in [0, {self.num_classes}) "
                                 f"(num_classes); got labels in [{int(value.min())}, {int(value.max())}]")

    # ------------------------------------------------------------------ accessors
    @property
    def num_tasks(self) -> int:
        return self.x_support.shape[0]

    @property
    def num_support(self) -> int:
        return self.x_support.shape[1]

    @property
    def num_query(self) -> int:
        return self.x_query.shape[1]

    @property
    def x_shape(self) -> tuple[int, ...]:
        """Shape of one input example (without the task and example dimensions)."""
        return tuple(self.x_support.shape[2:])

    @property
    def device(self) -> torch.device:
        return self.x_support.device

    @property
    def prediction_shape(self) -> torch.Size:
        """The shape of a learner's query predictions: ``[T, Q, *y]``, or ``[T, Q, num_classes]`` for classes."""
        return self.kind.prediction_shape(self.y_query.shape, self.num_classes)

    # ------------------------------------------------------------------ transforms
    def replace(self, **changes) -> "Episode":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str) -> "Episode":
        """The same episode on another device.

        A host-to-CUDA move goes through pinned memory and does not wait for the copy, so sampling the next
        batch on the CPU overlaps the device's work (CUDA orders the copy before any kernel that reads it).
        """
        device = torch.device(device)
        if device.type != "cuda":
            return self._map(lambda t: t.to(device))
        return self._map(lambda t: t.pin_memory().to(device, non_blocking=True) if t.device.type == "cpu"
                         else t.to(device))

    def take_support(self, k: int) -> "Episode":
        """The episode restricted to the first ``k`` support examples (queries unchanged)."""
        if isinstance(k, bool) or not isinstance(k, Integral) or not 0 <= k <= self.num_support:
            raise ValueError(f"take_support(k) needs an int 0 <= k <= {self.num_support} (the support size); "
                             f"got k={k!r}")
        return self.replace(x_support=self.x_support[:, :k], y_support=self.y_support[:, :k])

    def select_tasks(self, index: slice | torch.Tensor) -> "Episode":
        """A sub-batch of tasks (a slice or an index tensor over the task dimension)."""
        return self._map(lambda t: t[index])

    def _map(self, fn) -> "Episode":
        return Episode(
            x_support=fn(self.x_support),
            y_support=fn(self.y_support),
            x_query=fn(self.x_query),
            y_query=fn(self.y_query),
            kind=self.kind,
            x_unlabeled=None if self.x_unlabeled is None else fn(self.x_unlabeled),
            info={k: fn(v) for k, v in self.info.items()},
            num_classes=self.num_classes,
        )

    def __repr__(self) -> str:
        info = ", ".join(f"{k}={_shape(v)}" for k, v in self.info.items())
        return (
            f"Episode(kind={self.kind!r}, tasks={self.num_tasks}, support={self.num_support}, "
            f"query={self.num_query}, x={self.x_shape}, info={{{info}}})"
        )


def concatenate(episodes: Sequence[Episode]) -> Episode:
    """One episode holding the tasks of several (same kind, shapes and class count), in order."""
    if not episodes:
        raise ValueError("concatenate needs at least one episode")
    first = episodes[0]
    if any(e.kind != first.kind or e.num_classes != first.num_classes or set(e.info) != set(first.info)
           or (e.x_unlabeled is None) != (first.x_unlabeled is None) for e in episodes):
        raise ValueError("concatenate needs episodes of one kind, class count and info keys")

    def cat(name: str) -> torch.Tensor | None:
        parts = [getattr(e, name) for e in episodes]
        return None if parts[0] is None else torch.cat(parts)

    return Episode(x_support=cat("x_support"), y_support=cat("y_support"), x_query=cat("x_query"),
                   y_query=cat("y_query"), kind=first.kind, x_unlabeled=cat("x_unlabeled"),
                   info={k: torch.cat([e.info[k] for e in episodes]) for k in first.info},
                   num_classes=first.num_classes)
