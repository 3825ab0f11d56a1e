"""Training episodes drawn as a fixed number of streams, so that a run's tasks do not depend on its process count.

The meta-batch of every step is the concatenation of ``shards`` parts, part ``s`` drawn from its own generator
(seeded by :meth:`metaopt.seeds.SeedPlan.training`). Rank r of a distributed run needs only its share of the
meta-batch (:func:`metaopt.distributed.share`), so it draws the parts that overlap its share and keeps that
share. Whatever the number of processes, step t therefore trains on the same tasks:

- ``shards=1`` (the default, and the stream of every single-process run so far): each rank draws the whole
  meta-batch and keeps its share — the same episodes, at the cost of sampling them on every rank;
- ``shards`` a multiple of the number of processes: each rank draws only its own parts.

A checkpoint holds every part's generator state (gathered from the ranks that drew it), so a run resumes with
the same tasks on any number of processes.
"""

from __future__ import annotations

from typing import Optional

import torch

from metaopt.distributed import World, all_gather_objects, world
from metaopt.distributed import share as share_of
from metaopt.episodes import Episode, concatenate
from metaopt.seeds import SeedPlan, generator
from metaopt.tasks.base import TaskFamily

__all__ = ["TrainingStreams"]


class TrainingStreams:
    """This rank's part of the training episodes of every step (see the module docstring).

    Args:
        seeds: the run's seed plan; ``learner`` names the stream's owner (every learner draws the same tasks).
        batch_size: the global meta-batch (tasks per step over all ranks).
        shards: the number of streams the meta-batch is drawn from (1 <= shards <= batch_size).
        current: this process's rank and the world size (the current process group by default).
    """

    def __init__(self, seeds: SeedPlan, batch_size: int, shards: int = 1, *, learner: str = "",
                 current: World | None = None) -> None:
        self.current = current or world()
        if batch_size < self.current.size:
            raise ValueError(f"train.batch_size={batch_size} is smaller than the {self.current.size} processes; "
                             "every process needs at least one task per step")
        if not 1 <= shards <= batch_size:
            raise ValueError(f"train.shards must be between 1 and batch_size={batch_size}; got {shards}")
        self.batch_size = batch_size
        self.generators = [generator(seeds.training(learner, s)) for s in range(shards)]
        sizes = [len(part) for part in torch.arange(batch_size).tensor_split(shards)]
        bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
        mine = share_of(batch_size, self.current)
        self.parts = [(s, size) for s, size in enumerate(sizes) if bounds[s] < mine.stop and bounds[s + 1] > mine.start]
        first = bounds[self.parts[0][0]]
        self.keep = slice(mine.start - first, mine.stop - first)
        self.weight = (mine.stop - mine.start) / batch_size

    @property
    def sampled_per_step(self) -> int:
        """Tasks this rank samples per step (its share, or more where parts straddle two ranks)."""
        return sum(size for _, size in self.parts)

    def draw(self, family: TaskFamily, support: int, query: int, device: torch.device | str) -> Episode:
        """This rank's share of the next step's meta-batch, on ``device``."""
        pieces = [family.sample(size, support, query, generator=self.generators[s]) for s, size in self.parts]
        episode = pieces[0] if len(pieces) == 1 else concatenate(pieces)
        if self.keep != slice(0, episode.num_tasks):
            episode = episode.select_tasks(self.keep)
        return episode.to(device)

    def local_state(self) -> list[Optional[torch.Tensor]]:
        """The generator states of the parts this rank draws (None for the others)."""
        drawn = {s for s, _ in self.parts}
        return [g.get_state() if s in drawn else None for s, g in enumerate(self.generators)]

    def state(self) -> list[torch.Tensor]:
        """Every part's generator state, gathered from the ranks that draw it (a collective: all ranks call it)."""
        states = all_gather_objects(self.local_state())
        return [next(rank[s] for rank in states if rank[s] is not None) for s in range(len(self.generators))]

    def set_state(self, states: list[torch.Tensor]) -> None:
        """Restore every part's generator (from :meth:`state`, possibly written by another number of processes)."""
        if len(states) != len(self.generators):
            raise ValueError(f"the checkpoint has {len(states)} training streams but train.shards="
                             f"{len(self.generators)}; resume with the shards the run was started with")
        for g, state in zip(self.generators, states):
            g.set_state(state)

    def restore_local(self, states: list[Optional[torch.Tensor]]) -> None:
        """Undo draws made since :meth:`local_state` (a step that was interrupted before it completed)."""
        for g, state in zip(self.generators, states):
            if state is not None:
                g.set_state(state)
