"""Checkpoint files: written atomically (fsync, then rename), read without running code from them.

A checkpoint holds tensors, numbers, strings and plain containers only, so it loads with
``torch.load(weights_only=True)``: a file someone sends you cannot execute code when ``metaopt resume`` or
``metaopt compare`` reads it. A file that needs more is refused with :class:`UnsafeCheckpointError`.
A full disk or an unwritable folder stops the write with :class:`WriteError` naming the path and the
free space; the previous checkpoint is left as it was.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

logger = logging.getLogger(__name__)

__all__ = ["UnsafeCheckpointError", "WriteError", "latest", "load", "newest_readable", "save", "writing"]


class UnsafeCheckpointError(ValueError):
    """A checkpoint that does not load as plain data (tensors and containers): it is not opened."""


class WriteError(OSError):
    """A checkpoint or another run file could not be written: the message names the path and the free space."""


def load(path: Path) -> dict[str, Any]:
    """A checkpoint's contents on the CPU, refusing any file that would unpickle Python objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UnsafeCheckpointError(
            f"{path} is not a plain-data checkpoint and was not opened ({detail}); metaopt writes checkpoints of "
            "tensors and containers only, so this file was written by something else or changed since: loading "
            "it as pickled Python could run code on this machine"
        ) from error


def latest(directory: Path) -> Path | None:
    """The checkpoint ``step_<N>.pt`` with the highest step in ``directory``, if any."""
    found = sorted(directory.glob("step_*.pt")) if directory.exists() else []
    return found[-1] if found else None


def newest_readable(directory: Path, *, owner: str) -> tuple[Path | None, dict[str, Any] | None]:
    """The newest checkpoint in ``directory`` that loads, and its contents; ``(None, None)`` if there is none.

    A truncated or corrupt file is set aside as ``step_N.pt.corrupt`` (kept for inspection, with a warning
    naming ``owner``) and the one before is tried; a file that would run code is refused, not skipped.
    """
    while (path := latest(directory)) is not None:
        try:
            return path, load(path)
        except UnsafeCheckpointError:
            raise
        except Exception as error:  # noqa: BLE001 - any unreadable file: keep it for inspection, try the next
            aside = path.with_name(path.name + ".corrupt")
            path.replace(aside)
            reason = str(error).splitlines()[0] if str(error) else ""
            logger.warning("%s: checkpoint %s does not load (%s: %s); kept as %s, trying the one before",
                           owner, path, type(error).__name__, reason, aside.name)
    return None, None


def free_space(path: Path) -> str:
    """The free space of the file system holding ``path`` (or its nearest existing folder), for messages."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free"
    except OSError:
        return "free space unknown"


def write_error(path: Path, error: OSError) -> WriteError:
    """The error a failed write of ``path`` is reported as: the path, the reason and the free space."""
    return WriteError(error.errno, f"could not write {path}: {error.strerror or error} "
                                             f"({free_space(path)})")


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Report a failed write of ``path`` inside the block as a :class:`WriteError` (path, reason, free space)."""
    try:
        yield
    except WriteError:
        raise
    except OSError as error:
        raise write_error(path, error) from error


def write_text(path: Path, text: str) -> Path:
    """Replace ``path`` with ``text`` atomically (a full disk leaves the old file, never half a new one)."""
    tmp = path.with_name(path.name + ".tmp")
    with writing(path):
        try:
            tmp.write_text(text)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def save(state: Mapping[str, Any], target: Path) -> Path:
    """Write ``state`` to ``target`` atomically: a temporary file, fsync, then a rename over ``target``.

    A failed write (a full disk, a folder that became read-only) removes the temporary file and raises
    :class:`WriteError`; ``target`` and every earlier checkpoint are untouched.
    """
    tmp = target.with_suffix(".tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as file:
            torch.save(dict(state), file)
            file.flush()
            os.fsync(file.fileno())  # on disk before the rename makes it the latest
        tmp.replace(target)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise write_error(target, error) from error
    except RuntimeError as error:  # torch's writer reports a short write as a RuntimeError
        tmp.unlink(missing_ok=True)
        raise write_error(target, OSError(28, str(error).splitlines()[0])) from error
    return target
