"""Class-indexed image sets with train/validation/test class splits.

An ``ImageSource`` answers three questions per split: how many classes, how many images each class
has at least (``None`` for generative sources), and "give me ``n`` images of each of these classes"
as one batched call. Finite sources decode their images once per process into a pool tensor per
split and gather from it with index arithmetic, so sampling never loops over images.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Hashable

import torch

from metaopt.checks import one_of

SPLITS: tuple[str, ...] = ("train", "val", "test")


def check_split(owner: str, split: object) -> str:
    """``split`` if it is one of ``SPLITS``, else a ``ValueError`` naming the owner."""
    return one_of("split", split, SPLITS, owner=owner)  # type: ignore[return-value]


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """Images as float32 in [0, 1]: uint8 pools are divided by 255, float pools pass through."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


class ImageSource(abc.ABC):
    """A class-indexed image set: ``num_classes(split)`` classes per split, images ``[C, H, W]`` in [0, 1].

    Class ids are local to a split (``0 .. num_classes(split) - 1``).
    """

    image_shape: tuple[int, int, int]

    @abc.abstractmethod
    def num_classes(self, split: str) -> int:
        """Number of classes in ``split``."""

    @abc.abstractmethod
    def images_per_class(self, split: str) -> int | None:
        """The fewest images any class of ``split`` has; ``None`` when a class has unboundedly many."""

    @abc.abstractmethod
    def class_images(self, split: str, index: int) -> torch.Tensor:
        """Images of one class as a float tensor ``[N, C, H, W]`` in [0, 1]."""

    @abc.abstractmethod
    def sample(self, split: str, classes: torch.Tensor, per_class: int, generator: torch.Generator) -> torch.Tensor:
        """``per_class`` distinct images of every class in ``classes`` (long ``[*B]``): ``[*B, per_class, C, H, W]``."""

    def _check_class(self, split: str, index: int) -> int:
        check_split(type(self).__name__, split)
        count = self.num_classes(split)
        if not 0 <= index < count:
            raise ValueError(
                f"{type(self).__name__}: class index must be in [0, {count}) for split {split!r}; got {index!r}"
            )
        return index


@dataclass(frozen=True)
class ClassPool:
    """All images of one split, class after class: ``images[offsets[c] : offsets[c] + counts[c]]`` is class c.

    ``images`` is ``[N, C, H, W]``, uint8 (decoded files; 4× less memory) or float in [0, 1].
    """

    images: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor

    @staticmethod
    def from_classes(per_class: list[torch.Tensor]) -> "ClassPool":
        """Concatenate per-class image tensors ``[N_c, C, H, W]`` into one pool."""
        counts = torch.tensor([len(images) for images in per_class], dtype=torch.long)
        offsets = torch.cumsum(counts, 0) - counts
        return ClassPool(torch.cat(per_class), offsets, counts)


_POOLS: dict[Hashable, ClassPool] = {}


def clear_pool_cache() -> None:
    """Forget every decoded pool (they are otherwise kept for the life of the process)."""
    _POOLS.clear()


def distinct_indices(counts: torch.Tensor, per_class: int, generator: torch.Generator) -> torch.Tensor:
    """``per_class`` distinct indices below ``counts[...]`` for every entry: ``[*B] -> [*B, per_class]``.

    Random keys, with the slots past each count pushed to +inf, then the ``per_class`` smallest.
    """
    width = int(counts.max())
    keys = torch.rand(*counts.shape, width, generator=generator)
    keys = keys.masked_fill(torch.arange(width) >= counts.unsqueeze(-1), float("inf"))
    return keys.topk(per_class, dim=-1, largest=False).indices


class FiniteImageSource(ImageSource):
    """A source with a fixed list of images per class, decoded once per process and sampled from a pool.

    Subclasses list their classes cheaply at construction (``num_classes``, ``images_per_class``) and
    implement ``_decode(split) -> ClassPool`` (slow: reads files) and ``_cache_key(split)`` (what
    identifies that decoding across instances: the folder, the image size, the class list).
    """

    @abc.abstractmethod
    def _decode(self, split: str) -> ClassPool:
        """Decode every image of ``split``."""

    @abc.abstractmethod
    def _cache_key(self, split: str) -> Hashable:
        """A key that two instances decoding the same images of ``split`` share."""

    def pool(self, split: str) -> ClassPool:
        """The decoded images of ``split``, decoded on first use and cached for the process."""
        check_split(type(self).__name__, split)
        key = (type(self).__name__, self._cache_key(split))
        if key not in _POOLS:
            _POOLS[key] = self._decode(split)
        return _POOLS[key]

    def class_images(self, split: str, index: int) -> torch.Tensor:
        self._check_class(split, index)
        pool = self.pool(split)
        start, count = int(pool.offsets[index]), int(pool.counts[index])
        return to_unit_float(pool.images[start : start + count])

    def sample(self, split: str, classes: torch.Tensor, per_class: int, generator: torch.Generator) -> torch.Tensor:
        pool = self.pool(split)
        counts = pool.counts[classes]
        if per_class > int(counts.min()):
            raise ValueError(
                f"{type(self).__name__}: {per_class} images per class requested, but a class of split "
                f"{split!r} has only {int(counts.min())}; expected per_class <= images_per_class"
            )
        index = pool.offsets[classes].unsqueeze(-1) + distinct_indices(counts, per_class, generator)
        return to_unit_float(pool.images[index])


__all__ = ["SPLITS", "ImageSource", "FiniteImageSource", "ClassPool", "check_split", "clear_pool_cache"]
