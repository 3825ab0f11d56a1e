"""Omniglot (Lake et al. 2015) read from its usual folder layout; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Hashable

from metaopt.checks import non_negative_int, positive_int
from metaopt.tasks.images.image_files import decode_images, folder_path, image_files, layout_error, subfolders
from metaopt.tasks.images.source import ClassPool, FiniteImageSource, check_split

OMNIGLOT_LAYOUT = """\
  <root>/images_background/<alphabet>/<character>/<drawing>.png   (30 alphabets, 964 characters)
  <root>/images_evaluation/<alphabet>/<character>/<drawing>.png   (20 alphabets, 659 characters)
(the two zip files of github.com/brendenlake/omniglot, unpacked into <root>)"""


class OmniglotFolder(FiniteImageSource):
    """Omniglot characters as classes, from ``root`` in the layout of ``OMNIGLOT_LAYOUT``.

    Splits follow Lake et al.'s background/evaluation division: ``test`` is every character of
    ``images_evaluation``; ``val`` the characters of the last ``val_alphabets`` background
    alphabets (sorted by name); ``train`` the rest of ``images_background``. Images are resized to
    ``size`` (28 in the HyperTransformer and most few-shot work) and inverted, so strokes are 1 on 0.
    """

    def __init__(self, root: str | Path, *, size: int = 28, val_alphabets: int = 5) -> None:
        self.root = folder_path("OmniglotFolder", root)
        self.size = positive_int("size", size, owner="OmniglotFolder")
        self.val_alphabets = non_negative_int("val_alphabets", val_alphabets, owner="OmniglotFolder")
        self.image_shape = (1, self.size, self.size)
        background = self._alphabets("images_background")
        if val_alphabets >= len(background):
            raise ValueError(
                f"OmniglotFolder: val_alphabets must leave training alphabets; got {val_alphabets!r} "
                f"with {len(background)} background alphabets in {self.root}"
            )
        cut = len(background) - val_alphabets
        self.characters = {
            "train": self._characters(background[:cut]),
            "val": self._characters(background[cut:]),
            "test": self._characters(self._alphabets("images_evaluation")),
        }

    def _alphabets(self, part: str) -> list[Path]:
        folder = self.root / part
        if not self.root.is_dir():
            raise layout_error("OmniglotFolder", f"folder {self.root} does not exist", OMNIGLOT_LAYOUT)
        if not folder.is_dir():
            raise layout_error("OmniglotFolder", f"{folder} is missing", OMNIGLOT_LAYOUT)
        alphabets = subfolders(folder)
        if not alphabets:
            raise layout_error("OmniglotFolder", f"{folder} has no alphabet folders", OMNIGLOT_LAYOUT)
        return alphabets

    def _characters(self, alphabets: list[Path]) -> list[list[Path]]:
        """The drawings of every character of ``alphabets``, one list per character."""
        characters = []
        for alphabet in alphabets:
            folders = subfolders(alphabet)
            if not folders:
                raise layout_error("OmniglotFolder", f"{alphabet} has no character folders", OMNIGLOT_LAYOUT)
            for folder in folders:
                files = image_files(folder)
                if not files:
                    raise layout_error("OmniglotFolder", f"{folder} has no drawings", OMNIGLOT_LAYOUT)
                characters.append(files)
        return characters

    def num_classes(self, split: str) -> int:
        return len(self.characters[check_split("OmniglotFolder", split)])

    def images_per_class(self, split: str) -> int | None:
        return min(len(files) for files in self.characters[check_split("OmniglotFolder", split)])

    def _cache_key(self, split: str) -> Hashable:
        return (str(self.root), self.size, self.val_alphabets, split)

    def _decode(self, split: str) -> ClassPool:
        return ClassPool.from_classes([decode_images(f, self.size, "L", invert=True) for f in self.characters[split]])

    def __repr__(self) -> str:
        return f"OmniglotFolder({str(self.root)!r}, size={self.size}, val_alphabets={self.val_alphabets})"


__all__ = ["OmniglotFolder", "OMNIGLOT_LAYOUT"]
