"""A recipe's learner and meta-trainer as the recipe builds them, for the benchmarks that time meta-training."""

from __future__ import annotations

from typing import Any, Sequence

import torch

import metaopt.distributed as distributed
from metaopt.config import build_instance
from metaopt.episodes import Episode
from metaopt.learners.base import Learner
from metaopt.pipelines import load
from metaopt.pipelines.episodes import train_settings
from metaopt.tasks.base import TaskFamily
from metaopt.train import Curriculum, MetaTrainer

NEVER = 10**9  # log, validate and checkpoint only after the last step


def recipe_learner(recipe: str, name: str, *, dtype: torch.dtype = torch.float32, overrides: Sequence[str] = (),
                   **changes: Any) -> Learner:
    """Learner ``name`` of ``recipe`` under ``overrides`` (``key=value``; seeded with 0), its constructor arguments
    updated with ``changes``."""
    config = load(recipe, list(overrides))
    torch.manual_seed(0)
    spec = {k: v for k, v in config.learners[name].items() if k != "train"} | changes
    return build_instance(spec, f"learners.{name}", Learner).to(dtype)


def recipe_trainer(recipe: str, name: str, batch_size: int, steps: int, device: torch.device, *, shards: int = 1,
                   dtype: torch.dtype = torch.float32, overrides: Sequence[str] = (), **changes: Any) -> MetaTrainer:
    """Learner ``name`` of ``recipe`` (under ``overrides``) and the recipe's task under a ``MetaTrainer`` with the
    recipe's settings (no curriculum, no warm-up, nothing logged, validated or saved before the last step);
    ``changes`` replace training settings."""
    config = load(recipe, list(overrides))
    family = build_instance(config.task, "task", TaskFamily)
    learner = recipe_learner(recipe, name, dtype=dtype, overrides=overrides)
    return MetaTrainer(learner, family, train_settings(config, name), name=name, device=device, progress=False,
                       batch_size=batch_size, shards=shards, steps=steps, warmup_steps=0, curriculum=Curriculum(),
                       val_tasks=distributed.world().size, val_every=NEVER, log_every=NEVER,
                       checkpoint_every=NEVER, **changes)


def always(trainer: MetaTrainer, episode: Episode) -> MetaTrainer:
    """``trainer`` drawing ``episode`` at every step (the same batch for timing or checking)."""
    trainer.streams.draw = lambda *args: episode
    return trainer
