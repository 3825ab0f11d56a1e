"""Shared fixtures: deterministic, quiet, single-threaded-ish tests."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("METAOPT_CHECK_FIGURES", "1")  # every figure a test writes is checked (metaopt.plotting)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)  # small tensors: a second thread mostly adds synchronisation
    yield


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draw(path, size, mode, index):
    """An image that encodes ``index``: a bar whose position and colour depend on it."""
    array = np.full((size, size, 3), 255, dtype=np.uint8)
    colour = (0, 0, 0) if mode == "1" else (index * 37 % 200, index * 71 % 200, 40)
    array[2 + index % 8 : 9 + index % 8, 1 : size - 1] = colour
    Image.fromarray(array).convert(mode).save(path)


@pytest.fixture
def omniglot_root(tmp_path):
    index = 0
    for part, alphabets in (("images_background", 3), ("images_evaluation", 2)):
        for a in range(alphabets):
            for c in range(3):
                folder = tmp_path / part / f"Alphabet_{a}" / f"character{c + 1:02d}"
                folder.mkdir(parents=True)
                for drawing in range(4):
                    draw(folder / f"{index:04d}_{drawing:02d}.png", 35, "1", index)
                index += 1
    return tmp_path


@pytest.fixture(scope="session")
def learn2learn():
    """learn2learn (optional extra): skipped when absent, unless METAOPT_REQUIRE_LEARN2LEARN=1 (set by CI)."""
    from metaopt.extras import import_learn2learn

    try:
        return import_learn2learn()
    except ImportError as error:
        if os.environ.get("METAOPT_REQUIRE_LEARN2LEARN") == "1":
            pytest.fail(f"METAOPT_REQUIRE_LEARN2LEARN=1 but {error}")
        pytest.skip(str(error))
