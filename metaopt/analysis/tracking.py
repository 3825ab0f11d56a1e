"""Analyses tracked during meta-training: how an in-context learner's algorithm forms, step by step."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import torch

from metaopt import plotting
from metaopt.analysis.sensitivity import sensitivity_similarity
from metaopt.learners.base import Learner
from metaopt.learners.capabilities import Capability, provides

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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


TRACKED_TASKS = 64
"""How many validation tasks :func:`sensitivity_tracker` compares on by default."""


def sensitivity_tracker(references: Mapping[str, Learner], num_tasks: int = TRACKED_TASKS):
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
    series = []
    for key in sorted({k for row in rows for k in row if k.startswith(PREFIX)}):
        points = [(row["step"], row[key]) for row in rows if key in row]
        series.append(plotting.Series(key.removeprefix(PREFIX), [p[0] for p in points], [p[1] for p in points]))
    fig, (ax,) = plotting.new_figure()
    plotting.plot_series(ax, series, integer_x=True)
    ax.set_xlabel("meta-training step")
    ax.set_ylabel("sensitivity cosine (1: same algorithm)")
    subtitle = (f"against each explicit learner, at every validation on up to {TRACKED_TASKS} validation tasks "
                "(mean, no interval)")
    name = f"{title}: " if title else ""
    return plotting.finish(fig, f"{name}sensitivity cosine vs meta-training step", subtitle)
