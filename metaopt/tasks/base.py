"""The TaskFamily contract: a distribution over tasks that samples batched Episodes."""

from __future__ import annotations

import abc
import copy
from typing import ClassVar

import torch

from metaopt.checks import integer
from metaopt.episodes import Episode
from metaopt.kinds import Kind, episode_kind
from metaopt.metrics import Metric


class TaskFamily(abc.ABC):
    """A distribution over tasks. ``sample`` draws ``num_tasks`` tasks as one Episode.

    Randomness enters only through the ``generator`` argument (a CPU ``torch.Generator``):
    the same generator state gives the same episodes, whatever ``device`` they are moved to.
    """

    kind: Kind = "regression"
    curriculum_dims: ClassVar[bool] = False
    active_dims: int | None = None

    @property
    def error_scale(self) -> float:
        """Expected squared error of the zero predictor; normalises errors (Garg et al.'s metric)."""
        return 1.0

    @property
    def metric(self) -> Metric:
        """How ``compare`` scores learners on this family (override for e.g. adjusted loss)."""
        return episode_kind(self.kind).metric(self.error_scale)

    def with_active_dims(self, dims: int) -> "TaskFamily":
        """This family with inputs zero beyond the first ``dims`` coordinates (Garg et al.'s curriculum).

        Families opt in with ``curriculum_dims = True``, a ``dim`` attribute, and by passing their
        inputs through ``mask_inputs`` before computing labels.
        """
        if not self.curriculum_dims:
            raise ValueError(f"{type(self).__name__} does not support a dimension curriculum (train.curriculum.dims)")
        dim = getattr(self, "dim")
        stage = copy.copy(self)
        stage.active_dims = integer("active dims", dims, owner=type(self).__name__, low=1, high=dim)
        return stage

    def mask_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Zero the input coordinates beyond ``active_dims`` (all kept when it is None)."""
        if self.active_dims is None:
            return x
        return x * (torch.arange(x.shape[-1], device=x.device) < self.active_dims).to(x.dtype)

    def sample(
        self,
        num_tasks: int,
        support: int,
        query: int = 1,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> Episode:
        """Draw ``num_tasks`` tasks with ``support`` labelled examples and ``query`` queries each."""
        for name, value, low in (("num_tasks", num_tasks, 1), ("support", support, 0), ("query", query, 1)):
            integer(name, value, owner=f"{type(self).__name__}.sample", low=low)
        if generator is None:
            generator = torch.Generator().manual_seed(torch.seed())
        return self._sample(num_tasks, support, query, generator).to(device)

    @abc.abstractmethod
    def _sample(self, num_tasks: int, support: int, query: int, generator: torch.Generator) -> Episode:
        """Sample on the CPU with ``generator``; arguments are already validated."""

    @classmethod
    def example(cls) -> "TaskFamily":
        """A small instance; the contract tests sample every exported family through it.

        The default is ``cls()``; a family whose constructor needs arguments overrides it with small ones.
        """
        return cls()

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"
