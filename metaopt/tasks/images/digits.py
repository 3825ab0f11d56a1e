"""scikit-learn's bundled 8×8 handwritten digits as a class-indexed image set (no download)."""

from __future__ import annotations

from functools import partial
from typing import Hashable, Mapping, Sequence

import torch
import torch.nn.functional as F

from metaopt.checks import integer, sequence_of
from metaopt.tasks.images.source import SPLITS, ClassPool, FiniteImageSource, check_split

# 6 and 9 share a split: with the rotation augmentation a 6 turned by 180° is a 9
DIGIT_SPLITS: Mapping[str, tuple[int, ...]] = {"train": (0, 1, 2, 3, 6, 9), "val": (4, 7), "test": (5, 8)}


class Digits(FiniteImageSource):
    """``sklearn.datasets.load_digits`` (1797 images, about 180 per digit), upsampled to ``size`` × ``size``.

    Classes are split by digit (``splits``: digits per split). With ``FewShotImages(...,
    rotations=True)`` (its default) each digit also counts once per 90° rotation: 10 × 4 = 40 classes,
    24 / 8 / 8 with the default split, as in the HyperTransformer's rotation augmentation.
    Intensities 0..16 are scaled to [0, 1] and resized bilinearly.
    """

    def __init__(self, size: int = 28, splits: Mapping[str, Sequence[int]] = DIGIT_SPLITS) -> None:
        self.size = integer("size", size, owner="Digits", low=8)
        if not isinstance(splits, Mapping) or set(splits) != set(SPLITS):
            raise ValueError(f"Digits: splits must map each of {SPLITS} to digits; got {splits!r}")
        self.splits = {name: sequence_of(f"splits[{name!r}]", splits[name], partial(integer, low=0, high=9),
                                         owner="Digits") for name in SPLITS}
        used = [d for name in SPLITS for d in self.splits[name]]
        if len(set(used)) != len(used) or not set(used) <= set(range(10)):
            raise ValueError(f"Digits: splits must use distinct digits 0..9; got {dict(self.splits)!r}")
        self.image_shape = (1, self.size, self.size)

    def num_classes(self, split: str) -> int:
        return len(self.splits[check_split("Digits", split)])

    def images_per_class(self, split: str) -> int | None:
        counts = self.pool(split).counts  # decoding the digits takes milliseconds
        return int(counts.min())

    def _cache_key(self, split: str) -> Hashable:
        return (self.size, self.splits[split])

    def _decode(self, split: str) -> ClassPool:
        from sklearn.datasets import load_digits  # scikit-learn is needed only for this source

        data = load_digits()
        images = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8]
        images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)
        targets = torch.as_tensor(data.target)
        return ClassPool.from_classes([images[targets == digit].clamp(0.0, 1.0) for digit in self.splits[split]])

    def __repr__(self) -> str:
        return f"Digits(size={self.size}, splits={self.splits!r})"


__all__ = ["Digits", "DIGIT_SPLITS"]
