"""A bridge from learn2learn's few-shot task sets to Episodes (learn2learn is an optional extra).

learn2learn samples one task at a time with Python's ``random`` (and torch's global generator for
data transforms); the bridge seeds both from the family's generator inside a saved-and-restored
state, so episodes are deterministic under the generator and the caller's random streams are
untouched. Episodes are laid out exactly like ``FewShotImages`` (``FewShotLayout``).
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch.utils.data import TensorDataset

from metaopt.episodes import Episode
from metaopt.extras import import_learn2learn
from metaopt.tasks.base import TaskFamily
from metaopt.tasks.images.layout import FewShotLayout, LayoutSizes

def group_by_class(
    data: torch.Tensor, labels: torch.Tensor, ways: int, per_class: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One task's examples ``[N, *x]`` grouped by label: ``[ways, per_class, *x]`` and classes ``[ways]`` ascending."""
    labels = torch.as_tensor(labels).long().flatten()
    classes, counts = torch.unique(labels, return_counts=True)
    if len(classes) != ways or int(counts.min()) < per_class:
        raise ValueError(
            f"Learn2LearnTasks: a task must hold {ways} classes with at least {per_class} examples each "
            f"(shots + queries + unlabeled_per_class); got classes {classes.tolist()} with counts {counts.tolist()}; "
            f"build the task set with NWays(n={ways}) and KShots(k={per_class})"
        )
    order = labels.argsort(stable=True)
    starts = torch.cumsum(counts, 0) - counts
    index = order[starts.unsqueeze(-1) + torch.arange(per_class)]
    return data[index], classes


class Learn2LearnTasks(LayoutSizes, TaskFamily):
    """Episodes from a learn2learn ``TaskDataset`` (or anything whose ``sample()`` returns ``(data, labels)``).

    Each task must contain ``ways`` classes with ``shots + queries + unlabeled_per_class`` examples
    each; labels are remapped at random to ``0..ways-1`` and ``info["classes"]`` keeps the task
    set's own labels. ``sample`` takes ``support = ways × shots`` and ``query = ways × queries``.
    Tasks are drawn one by one (learn2learn's interface), so this is a bridge, not a fast path.
    """

    kind = "classification"

    @classmethod
    def example(cls) -> "Learn2LearnTasks":
        images, labels = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(4).repeat(2)
        return cls.from_dataset(TensorDataset(images, labels), ways=2, shots=1, queries=1)

    def __init__(self, taskset: Any, ways: int, shots: int, queries: int, unlabeled_per_class: int = 0) -> None:
        if not callable(getattr(taskset, "sample", None)):
            raise ValueError(
                f"Learn2LearnTasks: taskset must have a sample() method returning (data, labels), like "
                f"learn2learn.data.TaskDataset; got {type(taskset).__name__}"
            )
        self.taskset = taskset
        self.layout = FewShotLayout(ways, shots, queries, unlabeled_per_class)

    @classmethod
    def from_dataset(
        cls, dataset: Any, ways: int, shots: int, queries: int, unlabeled_per_class: int = 0
    ) -> "Learn2LearnTasks":
        """Wrap a labelled torch dataset in learn2learn's ``MetaDataset`` and an N-way/K-shot ``Taskset``."""
        l2l = import_learn2learn()
        layout = FewShotLayout(ways, shots, queries, unlabeled_per_class)
        meta = l2l.data.MetaDataset(dataset)
        transforms = [
            l2l.data.transforms.NWays(meta, n=ways),
            l2l.data.transforms.KShots(meta, k=layout.per_class),
            l2l.data.transforms.LoadData(meta),
        ]
        return cls(l2l.data.Taskset(meta, task_transforms=transforms, num_tasks=-1), ways, shots, queries,
                   unlabeled_per_class)

    def _draw_tasks(self, num_tasks: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        state = random.getstate()
        try:
            random.seed(seed)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return [self.taskset.sample() for _ in range(num_tasks)]
        finally:
            random.setstate(state)

    def _sample(self, num_tasks: int, support: int, query: int, generator: torch.Generator) -> Episode:
        self.layout.check(type(self).__name__, support, query)
        seed = int(torch.randint(2**62, (1,), generator=generator))
        grouped = [
            group_by_class(torch.as_tensor(data), labels, self.layout.ways, self.layout.per_class)
            for data, labels in self._draw_tasks(num_tasks, seed)
        ]
        images = torch.stack([g[0] for g in grouped]).float()
        classes = torch.stack([g[1] for g in grouped])
        return self.layout.arrange(images, classes, generator)

    def __repr__(self) -> str:
        layout = self.layout
        return (
            f"Learn2LearnTasks({type(self.taskset).__name__}, ways={layout.ways}, shots={layout.shots}, "
            f"queries={layout.queries}, unlabeled_per_class={layout.unlabeled_per_class})"
        )


__all__ = ["Learn2LearnTasks", "group_by_class"]
