"""The TaskFamily contract: a distribution over tasks that samples batched Episodes."""

from __future__ import annotations

import abc
import copy
import os
from typing import ClassVar

import torch

from metaopt.checks import integer
from metaopt.episodes import Episode
from metaopt.kinds import Kind, episode_kind
from metaopt.metrics import Metric


BYTES_PER_VALUE = 4  # float32, what families sample in


def physical_memory() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def sample_device(owner: str, device: object) -> torch.device:
    """``device`` as a ``torch.device`` that exists here; a ``ValueError`` naming it otherwise (before any work)."""
    try:
        resolved = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError):
        raise ValueError(f"{owner}: device must be a torch.device or a name such as 'cpu' or 'cuda:0'; "
                         f"got {device!r}") from None
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if resolved.type == "cuda" and (resolved.index or 0) >= visible:
        raise ValueError(f"{owner}: device={device!r} but {visible} CUDA device(s) are visible; expected cpu or a "
                         "visible cuda:N")
    return resolved


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
    def task_values(self) -> int:
        """About how many numbers sampling holds per task besides its examples (weights, a formula)."""
        return 0

    @property
    def example_values(self) -> int:
        """About how many numbers sampling holds per example: input, label and their intermediates."""
        return 1

    def sample_values(self, num_tasks: int, support: int, query: int) -> int:
        """About how many numbers ``sample`` holds at its peak for these sizes; ``sample`` refuses a request
        that could not fit in this machine's memory before drawing anything (not an out-of-memory later)."""
        return num_tasks * (self.task_values + (support + query) * self.example_values)

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
        """Draw ``num_tasks`` tasks with ``support`` labelled examples and ``query`` queries each.

        Raises:
            ValueError: a size that is not an int (``support`` >= 0, the others >= 1), a request too large
                for this machine's memory, a ``device`` that does not exist here, or drawn values that are
                not finite (:meth:`Episode.check_values`; e.g. an input scale that overflows float32).
            TypeError: a ``generator`` that is not a ``torch.Generator``.
        """
        owner = f"{type(self).__name__}.sample"
        for name, value, low in (("num_tasks", num_tasks, 1), ("support", support, 0), ("query", query, 1)):
            integer(name, value, owner=owner, low=low)
        if generator is None:
            generator = torch.Generator().manual_seed(torch.seed())
        elif not isinstance(generator, torch.Generator):
            raise TypeError(f"{owner}: generator must be a torch.Generator; got {type(generator).__name__}")
        elif generator.device.type != "cpu":
            raise ValueError(f"{owner}: generator must be a CPU torch.Generator (episodes are drawn on the CPU, "
                             f"then moved); got one on {generator.device}")
        target = sample_device(owner, device)
        memory, needed = physical_memory(), self.sample_values(num_tasks, support, query) * BYTES_PER_VALUE
        if memory is not None and needed > memory:
            raise ValueError(
                f"{owner}: num_tasks={num_tasks}, support={support}, query={query} would hold about "
                f"{needed / 2**30:.3g} GiB, more than this machine's {memory / 2**30:.3g} GiB of memory; expected "
                "a smaller num_tasks, support or query (sample a large set in several draws)"
            )
        episode = self._sample(num_tasks, support, query, generator)
        episode.check_values(owner=f"{self!r}.sample")
        return episode.to(target)

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
