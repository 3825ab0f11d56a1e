"""The N-way K-shot layout: from ``n`` images of each of ``ways`` classes per task to an Episode.

Shared by every few-shot image family (``FewShotImages``, the learn2learn bridge), so they all
order and label their episodes the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metaopt.checks import integer, non_negative_int, positive_int
from metaopt.episodes import Episode


def _shuffled(
    values: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Permute examples ``[T, N, ...]`` and their labels ``[T, N]`` independently per task."""
    order = torch.rand(labels.shape, generator=generator).argsort(-1)
    rows = torch.arange(labels.shape[0]).unsqueeze(-1)
    return values[rows, order], labels[rows, order]


@dataclass(frozen=True)
class FewShotLayout:
    """``ways`` classes per task, ``shots`` labelled and ``queries`` query images per class, plus unlabelled ones.

    ``sample(num_tasks, support, query)`` of an N-way K-shot family takes ``support = ways × shots``
    and ``query = ways × queries`` (``support_size`` and ``query_size``), which ``check`` enforces.
    """

    ways: int
    shots: int
    queries: int
    unlabeled_per_class: int = 0

    def __post_init__(self) -> None:
        integer("ways", self.ways, owner="FewShotLayout", low=2)
        positive_int("shots", self.shots, owner="FewShotLayout")
        positive_int("queries", self.queries, owner="FewShotLayout")
        non_negative_int("unlabeled_per_class", self.unlabeled_per_class, owner="FewShotLayout")

    @property
    def support_size(self) -> int:
        return self.ways * self.shots

    @property
    def query_size(self) -> int:
        return self.ways * self.queries

    @property
    def per_class(self) -> int:
        """Images drawn per class and task: shots + queries + unlabelled."""
        return self.shots + self.queries + self.unlabeled_per_class

    def check(self, owner: str, support: int, query: int) -> None:
        """Refuse ``sample`` sizes that are not this layout's ``support_size`` and ``query_size``."""
        if (support, query) != (self.support_size, self.query_size):
            raise ValueError(
                f"{owner}: support and query count examples, ways × shots = {self.ways} × {self.shots} and "
                f"ways × queries = {self.ways} × {self.queries}; got support={support!r}, query={query!r}; "
                f"expected support={self.support_size}, query={self.query_size}"
            )

    def arrange(self, images: torch.Tensor, classes: torch.Tensor, generator: torch.Generator) -> Episode:
        """An Episode from ``images`` ``[T, ways, per_class, *x]`` of the classes ``classes`` ``[T, ways]``.

        Class slots are shuffled per task, and slot ``j`` gets label ``j``: the labels are a random
        relabelling of the classes. The support set is ``shots`` blocks of ``ways`` images, one per
        class in a random order in each block, so ``episode.take_support(ways * k)`` is a k-shot
        episode. Queries and unlabelled images are shuffled. ``info["classes"]`` holds the class of
        each label ``[T, ways]`` and ``info["unlabeled_labels"]`` the hidden labels of ``x_unlabeled``.
        """
        num_tasks, ways = classes.shape
        rows = torch.arange(num_tasks).unsqueeze(-1)
        slots = torch.rand(num_tasks, ways, generator=generator).argsort(-1)
        images, classes = images[rows, slots], classes[rows, slots]
        shots, queries = self.shots, self.queries

        blocks = images[:, :, :shots].transpose(1, 2)  # [T, shots, ways, *x]
        order = torch.rand(num_tasks, shots, ways, generator=generator).argsort(-1)
        x_support = blocks[rows.unsqueeze(-1), torch.arange(shots).view(1, -1, 1), order].flatten(1, 2)
        y_support = order.flatten(1)

        def pooled(start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
            x = images[:, :, start : start + count].flatten(1, 2)  # class-major [T, ways * count, *x]
            y = torch.arange(ways).repeat_interleave(count).expand(num_tasks, -1)
            return _shuffled(x, y, generator)

        x_query, y_query = pooled(shots, queries)
        info = {"classes": classes}
        x_unlabeled = None
        if self.unlabeled_per_class > 0:
            x_unlabeled, info["unlabeled_labels"] = pooled(shots + queries, self.unlabeled_per_class)
        return Episode(
            x_support=x_support,
            y_support=y_support,
            x_query=x_query,
            y_query=y_query,
            kind="classification",
            x_unlabeled=x_unlabeled,
            info=info,
            num_classes=ways,
        )


__all__ = ["FewShotLayout"]


class LayoutSizes:
    """Mixin for N-way K-shot task families holding a ``layout``: the sizes ``sample`` expects."""

    layout: FewShotLayout

    @property
    def num_classes(self) -> int:
        """Labels per episode (``ways``)."""
        return self.layout.ways

    @property
    def support_size(self) -> int:
        """The ``support`` argument ``sample`` takes: ways × shots."""
        return self.layout.support_size

    @property
    def query_size(self) -> int:
        """The ``query`` argument ``sample`` takes: ways × queries."""
        return self.layout.query_size

    @property
    def image_values(self) -> int:
        """About how many numbers sampling holds per image (1 where the image size is known only once drawn)."""
        return 1

    def sample_values(self, num_tasks: int, support: int, query: int) -> int:
        """Numbers held for ``num_tasks`` tasks of the layout's images (``support`` and ``query`` are the layout's,
        which ``sample`` checks)."""
        del support, query
        return num_tasks * self.layout.ways * self.layout.per_class * self.image_values
