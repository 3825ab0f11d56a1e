"""N-way K-shot image classification episodes from any class-indexed image set."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from metaopt.checks import boolean, positive_int
from metaopt.episodes import Episode
from metaopt.tasks.base import TaskFamily
from metaopt.tasks.images.glyphs import Glyphs
from metaopt.tasks.images.layout import FewShotLayout, LayoutSizes
from metaopt.tasks.images.rotations import RotatedClasses
from metaopt.tasks.images.source import ImageSource, check_split


def _image_size(value: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if value is None:
        return None
    size = (value, value) if isinstance(value, int) else value
    if isinstance(size, (str, bytes)) or not isinstance(size, Sequence) or len(size) != 2:
        raise ValueError(f"FewShotImages: image_size must be an int or (height, width); got {value!r}")
    return tuple(positive_int("image_size", s, owner="FewShotImages") for s in size)  # type: ignore[return-value]


class FewShotImages(LayoutSizes, TaskFamily):
    """Few-shot classification tasks: ``ways`` classes of one split of ``source``, ``shots`` labelled images each.

    ``sample(T, support=ways * shots, query=ways * queries)`` (``support_size``, ``query_size``)
    gives ``x_support`` ``[T, ways·shots, C, H, W]`` with labels ``0..ways-1`` assigned to the task's
    classes at random, ``x_query`` ``[T, ways·queries, C, H, W]``, ``x_unlabeled`` ``[T,
    ways·unlabeled_per_class, ...]`` when asked for, and ``info["classes"]`` ``[T, ways]`` the
    class of each label (ids of ``self.source``). See ``FewShotLayout.arrange`` for the ordering.

    Args:
        source: the image set (``Glyphs``, ``Digits``, ``OmniglotFolder``, ``MiniImageNetFolder``, ...).
        split: which class split tasks are drawn from: "train", "val" or "test".
        rotations: count every 90° rotation of a class as its own class (4× the classes, the
            augmentation of Omniglot few-shot work and the HyperTransformer); ``self.source`` is
            then ``RotatedClasses(source)``.
        image_size: resize sampled images to this (bilinear, anti-aliased); ``None`` keeps the
            source's size.

    Sampling is batched: the classes of all tasks are one ``topk`` over random keys, the images of
    all tasks one call to ``source.sample`` (a gather from the decoded pool, or one render call).
    """

    kind = "classification"

    @classmethod
    def example(cls) -> "FewShotImages":
        return cls(Glyphs((8, 4, 4), size=16, samples_per_class=4), ways=2, shots=1, queries=2, rotations=False)

    def __init__(
        self,
        source: ImageSource,
        ways: int,
        shots: int,
        queries: int,
        split: str = "train",
        unlabeled_per_class: int = 0,
        rotations: bool = True,
        image_size: int | tuple[int, int] | None = None,
    ) -> None:
        if not isinstance(source, ImageSource):
            raise ValueError(f"FewShotImages: source must be an ImageSource; got {type(source).__name__}")
        self.layout = FewShotLayout(ways, shots, queries, unlabeled_per_class)
        self.split = check_split("FewShotImages", split)
        self.rotations = boolean("rotations", rotations, owner="FewShotImages")
        self.base_source = source
        self.source = RotatedClasses(source) if self.rotations else source
        self.image_size = _image_size(image_size)
        available = self.source.num_classes(split)
        if ways > available:
            raise ValueError(
                f"FewShotImages: ways={ways} needs {ways} classes, but split {split!r} of {self.source!r} has "
                f"{available}; expected ways <= {available}"
            )
        per_class, have = self.layout.per_class, self.source.images_per_class(split)
        if have is not None and per_class > have:
            raise ValueError(
                f"FewShotImages: shots + queries + unlabeled_per_class = {per_class} images per class, but a "
                f"class of split {split!r} has only {have}; expected at most {have}"
            )

    def replace(self, **changes: object) -> "FewShotImages":
        """The same family with some of ``ways``, ``shots``, ``queries``, ``split``, ``unlabeled_per_class`` changed
        (e.g. more ways for a continual-learning sequence of several tasks); the image source is shared."""
        layout = self.layout
        current = {"ways": layout.ways, "shots": layout.shots, "queries": layout.queries, "split": self.split,
                   "unlabeled_per_class": layout.unlabeled_per_class}
        unknown = sorted(set(changes) - set(current))
        if unknown:
            raise ValueError(f"FewShotImages.replace: unknown argument(s) {unknown}; expected some of {list(current)}")
        return FewShotImages(self.base_source, **(current | changes), rotations=self.rotations,
                             image_size=self.image_size)

    @property
    def image_values(self) -> int:
        """Eight numbers per pixel: the image, its resized copy, the rendering intermediates of procedural sources."""
        channels, height, width = self.source.image_shape
        resized = 0 if self.image_size is None else self.image_size[0] * self.image_size[1]
        return 8 * channels * (height * width + resized)

    def _sample(self, num_tasks: int, support: int, query: int, generator: torch.Generator) -> Episode:
        self.layout.check(type(self).__name__, support, query)
        ways = self.layout.ways
        keys = torch.rand(num_tasks, self.source.num_classes(self.split), generator=generator)
        classes = keys.topk(ways, dim=-1).indices  # [T, ways], distinct per task
        images = self.source.sample(self.split, classes, self.layout.per_class, generator)
        if self.image_size is not None and tuple(images.shape[-2:]) != self.image_size:
            flat = images.flatten(0, 2)
            flat = F.interpolate(flat, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
            images = flat.unflatten(0, images.shape[:3])
        return self.layout.arrange(images, classes, generator)

    def __repr__(self) -> str:
        layout = self.layout
        return (
            f"FewShotImages({self.source!r}, ways={layout.ways}, shots={layout.shots}, queries={layout.queries}, "
            f"split={self.split!r}, unlabeled_per_class={layout.unlabeled_per_class}, image_size={self.image_size})"
        )


__all__ = ["FewShotImages"]
