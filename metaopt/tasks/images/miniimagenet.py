"""miniImageNet (Vinyals et al. 2016; Ravi & Larochelle's 64/16/20 class split) read from a local folder."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Hashable

from metaopt.checks import positive_int
from metaopt.tasks.images.image_files import decode_images, folder_path, image_files, layout_error, subfolders
from metaopt.tasks.images.source import SPLITS, ClassPool, FiniteImageSource, check_split

MINIIMAGENET_LAYOUT = """\
either class folders:
  <root>/train/<wnid>/<image>.jpg   (64 classes)
  <root>/val/<wnid>/<image>.jpg     (16 classes)
  <root>/test/<wnid>/<image>.jpg    (20 classes)
or Ravi & Larochelle's split files next to one image folder:
  <root>/train.csv, <root>/val.csv, <root>/test.csv   (header "filename,label", one image per row)
  <root>/images/<filename>"""


class MiniImageNetFolder(FiniteImageSource):
    """miniImageNet classes from ``root`` in either layout of ``MINIIMAGENET_LAYOUT``, RGB at ``size`` × ``size``.

    The layout is detected: split CSVs win when ``train.csv`` exists. Classes are ordered by name.
    Decoded splits are kept as uint8 (the 38,400 training images at 84 × 84 take about 0.8 GB).
    """

    def __init__(self, root: str | Path, *, size: int = 84) -> None:
        self.root = folder_path("MiniImageNetFolder", root)
        self.size = positive_int("size", size, owner="MiniImageNetFolder")
        self.image_shape = (3, self.size, self.size)
        if not self.root.is_dir():
            raise layout_error("MiniImageNetFolder", f"folder {self.root} does not exist", MINIIMAGENET_LAYOUT)
        if (self.root / "train.csv").is_file():
            self.layout = "csv"
            self.classes = {split: self._from_csv(split) for split in SPLITS}
        elif (self.root / "train").is_dir():
            self.layout = "folders"
            self.classes = {split: self._from_folders(split) for split in SPLITS}
        else:
            raise layout_error(
                "MiniImageNetFolder", f"{self.root} has neither train.csv nor a train/ folder", MINIIMAGENET_LAYOUT
            )

    def _from_folders(self, split: str) -> list[list[Path]]:
        folder = self.root / split
        if not folder.is_dir():
            raise layout_error("MiniImageNetFolder", f"{folder} is missing", MINIIMAGENET_LAYOUT)
        classes = [image_files(c) for c in subfolders(folder)]
        if not classes or not all(classes):
            raise layout_error("MiniImageNetFolder", f"{folder} has no class folders of images", MINIIMAGENET_LAYOUT)
        return classes

    def _from_csv(self, split: str) -> list[list[Path]]:
        table, images = self.root / f"{split}.csv", self.root / "images"
        if not table.is_file():
            raise layout_error("MiniImageNetFolder", f"{table} is missing", MINIIMAGENET_LAYOUT)
        if not images.is_dir():
            raise layout_error("MiniImageNetFolder", f"{images} is missing", MINIIMAGENET_LAYOUT)
        by_label: dict[str, list[Path]] = {}
        with table.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not {"filename", "label"} <= set(reader.fieldnames):
                raise layout_error(
                    "MiniImageNetFolder", f"{table} needs the header 'filename,label'; got {reader.fieldnames!r}",
                    MINIIMAGENET_LAYOUT,
                )
            for row in reader:
                by_label.setdefault(row["label"], []).append(images / row["filename"])
        missing = next((p for files in by_label.values() for p in files if not p.is_file()), None)
        if not by_label or missing is not None:
            problem = f"{table} lists no images" if not by_label else f"{missing} (listed in {table.name}) is missing"
            raise layout_error("MiniImageNetFolder", problem, MINIIMAGENET_LAYOUT)
        return [sorted(by_label[label]) for label in sorted(by_label)]

    def num_classes(self, split: str) -> int:
        return len(self.classes[check_split("MiniImageNetFolder", split)])

    def images_per_class(self, split: str) -> int | None:
        return min(len(files) for files in self.classes[check_split("MiniImageNetFolder", split)])

    def _cache_key(self, split: str) -> Hashable:
        return (str(self.root), self.layout, self.size, split)

    def _decode(self, split: str) -> ClassPool:
        return ClassPool.from_classes([decode_images(files, self.size, "RGB") for files in self.classes[split]])

    def __repr__(self) -> str:
        return f"MiniImageNetFolder({str(self.root)!r}, size={self.size})"


__all__ = ["MiniImageNetFolder", "MINIIMAGENET_LAYOUT"]
