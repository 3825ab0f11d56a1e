"""Analyses tracked during meta-training: how an in-context learner's algorithm forms, step by step."""

from __future__ import annotations

from typing import Mapping

import torch
from matplotlib.figure import Figure

from metaopt.analysis.sensitivity import sensitivity_similarity
from metaopt.learners.base import Learner
from metaopt.learners.capabilities import Capability, provides

PREFIX = "sensitivity_cosine/"


def sensitivity_references(learner: Learner, learners: Mapping[str, Learner]) -> dict[str, Learner]:
    """The learners to track ``learner``'s sensitivity cosine against while it trains.

    Every explicit learner without meta-parameters (its algorithm does not move during training), when
    both it and ``learner`` are differentiable in x_query (``Capability.QUERY_GRADIENTS``); none unless
    ``learner`` is an in-context learner.
    """
    if not (learner.implicit and provides(learner, Capability.QUERY_GRADIENTS)):
        return {}
    return {name: other for name, other in learners.items()
            if not other.implicit and not other.is_trainable and provides(other, Capability.QUERY_GRADIENTS)}


def sensitivity_tracker(references: Mapping[str, Learner], num_tasks: int = 64):
    """A ``MetaTrainer`` validation hook: sensitivity cosine (von Oswald et al.) to each reference learner.

    At every validation it compares the learner being trained with each (explicit) reference on the
    first ``num_tasks`` validation episodes at the full training support size, and returns
    ``{"sensitivity_cosine/<reference>": value}`` to be logged with the validation loss.
    """

    def hook(trainer) -> dict[str, float]:
        episode = trainer.val_episode.select_tasks(slice(0, num_tasks))
        was_training = trainer.learner.training
        trainer.learner.eval()
        with torch.enable_grad():
            metrics = {
                f"{PREFIX}{name}": sensitivity_similarity(trainer.learner, reference, episode,
                                                          [episode.num_support]).cosine[0]
                for name, reference in references.items()
            }
        trainer.learner.train(was_training)
        return metrics

    return hook


def plot_tracked(history: list[dict], title: str = "") -> Figure | None:
    """Sensitivity cosine to each reference vs training step, from a trainer's history; None if untracked."""
    rows = [row for row in history if any(key.startswith(PREFIX) for key in row)]
    if not rows:
        return None
    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot()
    for key in sorted({k for row in rows for k in row if k.startswith(PREFIX)}):
        points = [(row["step"], row[key]) for row in rows if key in row]
        ax.plot(*zip(*points), marker="o", markersize=3, label=key.removeprefix(PREFIX))
    ax.set_xlabel("meta-training step")
    ax.set_ylabel("sensitivity cosine")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    ax.set_title(title or "sensitivity cosine vs training step")
    return fig
