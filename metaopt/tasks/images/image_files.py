"""Reading image folders: layout checks with messages that name the expected layout, and Pillow decoding."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def layout_error(owner: str, problem: str, layout: str) -> FileNotFoundError:
    """A ``FileNotFoundError`` saying what is wrong and which folder layout ``owner`` expects."""
    return FileNotFoundError(f"{owner}: {problem}; expected this layout:\n{layout}")


def folder_path(owner: str, root: object) -> Path:
    """``root`` (a ``str`` or path-like) as an absolute path, ``~`` expanded; a ``TypeError`` naming it otherwise."""
    if isinstance(root, bool) or not isinstance(root, (str, os.PathLike)) or root == "":
        raise TypeError(f"{owner}: root must be a folder path (a str or os.PathLike); got {root!r}")
    return Path(root).expanduser().resolve()


def subfolders(folder: Path) -> list[Path]:
    """The sub-folders of ``folder``, sorted by name (hidden ones skipped)."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def decode_images(paths: Sequence[Path], size: int, mode: str, *, invert: bool = False) -> torch.Tensor:
    """Decode and resize images with Pillow: uint8 ``[N, C, size, size]`` (C = 1 for mode "L", 3 for "RGB").

    Resizing uses Pillow's bilinear filter, which widens its support when shrinking (anti-aliased).
    ``invert`` turns dark ink on white paper into bright ink on black, like the other sources.
    """
    import numpy as np
    from PIL import Image, ImageOps

    channels = 1 if mode == "L" else 3
    out = np.empty((len(paths), size, size, channels), dtype=np.uint8)
    for i, path in enumerate(paths):  # file decoding is inherently per file; done once per process
        try:
            with Image.open(path) as image:
                image = image.convert(mode)
                if image.size != (size, size):
                    image = image.resize((size, size), Image.Resampling.BILINEAR)
                if invert:
                    image = ImageOps.invert(image)
                out[i] = np.asarray(image).reshape(size, size, channels)
        except (OSError, SyntaxError) as error:  # Pillow: UnidentifiedImageError, truncated files, bad headers
            raise ValueError(f"could not decode image {path}: {error}; remove or replace the file") from error
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


__all__ = ["folder_path", "layout_error", "subfolders", "image_files", "decode_images", "IMAGE_SUFFIXES"]
