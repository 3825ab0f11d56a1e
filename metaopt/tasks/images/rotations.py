"""The rotation augmentation of few-shot image benchmarks: every 90° rotation of a class is a new class."""

from __future__ import annotations

import torch

from metaopt.tasks.images.source import ImageSource, check_split

QUARTERS = 4


def rotate_quarters(images: torch.Tensor, quarters: torch.Tensor) -> torch.Tensor:
    """Rotate each image ``[*B, C, H, W]`` counter-clockwise by ``quarters[*B]`` × 90° (exact)."""
    out = images.clone()
    for k in range(1, QUARTERS):
        chosen = quarters == k
        if chosen.any():
            out[chosen] = torch.rot90(images[chosen], k, dims=(-2, -1))
    return out


class RotatedClasses(ImageSource):
    """``source`` with four classes per class: class ``4 c + k`` is class ``c`` rotated by ``k`` × 90°.

    The rotations stay inside the split of their class, so no split sees a rotation of another
    split's class. Images must be square.
    """

    def __init__(self, source: ImageSource) -> None:
        if not isinstance(source, ImageSource):
            raise TypeError(f"RotatedClasses: source must be an ImageSource; got {type(source).__name__}")
        _, height, width = source.image_shape
        if height != width:
            raise ValueError(f"RotatedClasses: images must be square to rotate by 90°; got {source.image_shape!r}")
        self.source = source
        self.image_shape = source.image_shape

    def num_classes(self, split: str) -> int:
        return QUARTERS * self.source.num_classes(split)

    def images_per_class(self, split: str) -> int | None:
        return self.source.images_per_class(split)

    def class_images(self, split: str, index: int) -> torch.Tensor:
        self._check_class(split, index)
        return torch.rot90(self.source.class_images(split, index // QUARTERS), index % QUARTERS, dims=(-2, -1))

    def sample(self, split: str, classes: torch.Tensor, per_class: int, generator: torch.Generator) -> torch.Tensor:
        check_split("RotatedClasses", split)
        images = self.source.sample(split, classes // QUARTERS, per_class, generator)
        quarters = (classes % QUARTERS).unsqueeze(-1).expand(*classes.shape, per_class)
        return rotate_quarters(images, quarters)

    def __repr__(self) -> str:
        return f"RotatedClasses({self.source!r})"


__all__ = ["RotatedClasses", "rotate_quarters", "QUARTERS"]
