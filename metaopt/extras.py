"""Optional extras: importing learn2learn (a data bridge and a speed/gradient reference) and transformers (the
benchmarks' Hugging Face reference) where they can run.

learn2learn imports torchvision. The package registries carry only torchvision wheels built against CUDA torch,
so with the CPU torch this project pins, torchvision's C++ extension cannot load (it links libtorch_cuda).
torchvision copes with that (its ``_has_ops()`` is then False and its ops raise "Couldn't load custom C++ ops"),
except that it registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms`` unconditionally, which
fails on an operator nobody declared. :func:`import_learn2learn` declares those two schemas first, without
kernels, so torchvision's Python side imports and learn2learn (which uses none of its C++ ops) works; transformers
imports torchvision too when it is installed, and :func:`import_transformers` does the same first.
``make learn2learn`` installs the extra (see the Makefile for why it is built from its sdist).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["LEARN2LEARN_HINT", "TRANSFORMERS_HINT", "import_learn2learn", "import_transformers",
           "torchvision_extension_loads"]

LEARN2LEARN_HINT = (
    "learn2learn is an optional extra of metaopt: install it with `make learn2learn` (on Python >= 3.11 its "
    "sdist must be rebuilt with current Cython, which that target does; the Makefile says why)"
)
TRANSFORMERS_HINT = (
    "transformers is a benchmark-only extra of metaopt: `make bench` installs it (pip install -e '.[bench]')"
)

# Kept alive for the life of the process: dropping a torch.library.Library removes what it defined.
_torchvision_schemas: list[torch.library.Library] = []


def torchvision_extension_loads() -> bool:
    """Whether torchvision's compiled ops (``torchvision/_C``) load with the installed torch."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    folder = Path(spec.submodule_search_locations[0])
    candidates = [folder / f"_C{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    for path in filter(Path.exists, candidates):
        try:
            torch.ops.load_library(str(path))
        except OSError:
            return False
        return True
    return False


def _declare_torchvision_fake_kernel_targets() -> None:
    """Declare ``torchvision::nms``/``qnms`` when torchvision's extension cannot, so ``import torchvision`` works."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    if torchvision_extension_loads() or _torchvision_schemas:
        return
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision_schemas.append(library)


def import_learn2learn() -> ModuleType:
    """``import learn2learn`` (working around a CUDA-only torchvision), or an ImportError saying how to install it."""
    _declare_torchvision_fake_kernel_targets()
    try:
        import learn2learn
    except ImportError as error:
        raise ImportError(f"learn2learn is not installed. {LEARN2LEARN_HINT}") from error
    return learn2learn


def import_transformers() -> ModuleType:
    """``import transformers`` with its models importable (working around a CUDA-only torchvision), or an
    ImportError saying how to install it."""
    _declare_torchvision_fake_kernel_targets()
    try:
        import transformers
    except ImportError as error:
        raise ImportError(f"transformers is not installed. {TRANSFORMERS_HINT}") from error
    return transformers
