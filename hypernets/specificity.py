"""How much of a generated CNN is the episode's own: each generated layer's spread and the swap test.

A hypernetwork writes task-specific weights only where it matters which episode wrote them. For every
:class:`~hypernets.HyperTransformer` and every layer it generates, on held-out episodes:

- ``spread``: how much the layer's weights differ between episodes, the RMS over their entries of the standard
  deviation across episodes, over the RMS of the weights (0: the same layer for every episode). Each conv
  block ends in batch norm, so a per-channel rescaling of a conv layer changes nothing: a spread above 0 need
  not change the function, which is what the swap test asks;
- ``swapped``: the accuracy when only that layer comes from another episode (the episodes' weights rolled by
  one), beside the accuracy with each episode's own weights, with a paired bootstrap interval of the
  difference over the episodes;
- ``conv_mean``: the accuracy with every generated layer but the last replaced by its mean over the episodes,
  i.e. one task-independent CNN under the episode's own last layer.

A layer that can be swapped with no loss is, in effect, a meta-learned layer that a network happens to write:
the accuracy it brings does not come from adapting it to the episode.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Mapping

import torch
from torch import Tensor

from hypernets.cnn import Params
from hypernets.hypertransformer import HyperTransformer
from metaopt import plotting
from metaopt.checks import integer
from metaopt.compare import LEVEL, paired_bootstrap
from metaopt.episodes import Episode
from metaopt.learners.base import Learner
from metaopt.log import Run
from metaopt.seeds import SeedPlan
from metaopt.tasks.images.few_shot import FewShotImages

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Swap:
    """Accuracy with some generated weights taken from elsewhere, against the episodes' own: the difference
    (``accuracy - own``) and its paired bootstrap interval over the episodes."""

    accuracy: float
    difference: float
    low: float
    high: float


@dataclass(frozen=True)
class LayerSpecificity:
    """One generated layer: its relative ``spread`` across episodes and the accuracy with it ``swapped``."""

    spread: float
    swapped: Swap


@dataclass(frozen=True)
class Specificity:
    """One learner's report: accuracy with its own weights, each generated layer, and the conv layers' mean."""

    episodes: int
    accuracy: float
    layers: dict[str, LayerSpecificity]
    conv_mean: Swap | None


def _per_episode_accuracy(learner: HyperTransformer, episode: Episode, params: Params) -> Tensor:
    """``[T]``: the share of each episode's queries that the CNN under ``params`` classifies right."""
    images = torch.cat([episode.x_support, episode.x_query], dim=1)
    logits = learner.cnn(params, images, norm_examples=episode.num_support)[:, episode.num_support:]
    return (logits.argmax(-1) == episode.y_query).float().mean(-1).cpu()  # bootstrapped on the CPU


def _swap(own: Tensor, other: Tensor, generator: torch.Generator) -> Swap:
    a, b = paired_bootstrap(other, own, generator=generator)
    tail = (1.0 - LEVEL) / 2
    low, high = torch.quantile(a - b, torch.tensor([tail, 1.0 - tail], dtype=a.dtype)).tolist()
    return Swap(other.mean().item(), (other - own).mean().item(), low, high)


def _spread(weight: Tensor) -> float:
    """RMS over entries of the standard deviation across episodes (dimension 0), over the weights' RMS."""
    return (weight.std(0).pow(2).mean().sqrt() / weight.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def specificity(learner: HyperTransformer, episode: Episode, *, seed: int = 0) -> Specificity:
    """The spread and swap tests of every layer ``learner`` generates, on the tasks of ``episode`` (at least 2)."""
    if episode.num_tasks < 2:
        raise ValueError(f"specificity compares episodes with each other; got {episode.num_tasks} task(s), "
                         "expected at least 2")
    generator, training = torch.Generator().manual_seed(seed), learner.training
    learner.eval()
    try:
        return _specificity(learner, episode, generator)
    finally:
        learner.train(training)


def _specificity(learner: HyperTransformer, episode: Episode, generator: torch.Generator) -> Specificity:
    """:func:`specificity` with ``learner`` in eval mode; ``generator`` draws the bootstrap resamples."""
    with torch.no_grad():
        params = learner.generate(episode)
        own = _per_episode_accuracy(learner, episode, params)
        generated = list(learner.generator.generators)
        layers = {}
        for name in generated:
            keys = [key for key in params if key.rsplit("_", 1)[0] == name]
            swapped = params | {key: params[key].roll(1, 0) for key in keys}
            layers[name] = LayerSpecificity(_spread(params[f"{name}_weight"]),
                                            _swap(own, _per_episode_accuracy(learner, episode, swapped), generator))
        convs = [key for key in params if key.rsplit("_", 1)[0] in generated[:-1]]
        conv_mean = None
        if convs:
            mean = params | {key: params[key].mean(0, keepdim=True).expand_as(params[key]) for key in convs}
            conv_mean = _swap(own, _per_episode_accuracy(learner, episode, mean), generator)
    return Specificity(episode.num_tasks, own.mean().item(), layers, conv_mean)


def _interval(swap: Swap) -> str:
    return f"{swap.accuracy:.3f} ({swap.difference:+.3f}, [{swap.low:+.3f}, {swap.high:+.3f}])"


def format_specificity(name: str, report: Specificity) -> list[str]:
    """Plain-text lines: one per generated layer, then the task-independent CNN."""
    lines = [f"{name}: accuracy {report.accuracy:.3f} with each episode's own weights ({report.episodes} episodes); "
             "per generated layer, its spread across episodes and the accuracy with another episode's"]
    lines += [f"  {layer:<8} spread {entry.spread:.4f}   swapped {_interval(entry.swapped)}"
              for layer, entry in report.layers.items()]
    if report.conv_mean is not None:
        lines.append(f"  every conv layer at its mean over the episodes: {_interval(report.conv_mean)}")
    return lines


def plot_specificity(reports: Mapping[str, Specificity], title: str = "") -> Figure:
    """Per generated layer: its spread across episodes (log scale) and the accuracy with another episode's."""
    fig, (spread_ax, swap_ax) = plotting.new_figure(2, panel=(5.4, 4.0))
    layers = list(dict.fromkeys(layer for report in reports.values() for layer in report.layers))
    index = {layer: i for i, layer in enumerate(layers)}
    spreads, swaps = [], []
    for name, report in reports.items():
        x = [index[layer] for layer in report.layers]
        entries = list(report.layers.values())
        spreads.append(plotting.Series(name, x, [e.spread for e in entries]))
        swaps.append(plotting.Series(name, x, [e.swapped.difference for e in entries],
                                     [e.swapped.low for e in entries], [e.swapped.high for e in entries]))
    plotting.plot_series(spread_ax, spreads, yscale="log", integer_x=True)
    plotting.plot_series(swap_ax, swaps, integer_x=True, include=(0.0,))
    plotting.reference_line(swap_ax, y=0.0, label="no change")
    for ax, label in ((spread_ax, "relative spread across episodes"),
                      (swap_ax, "accuracy change with another episode's layer")):
        ax.set_xticks(range(len(layers)), layers)
        ax.set_xlabel("generated layer")
        ax.set_ylabel(label)
    subtitle = (f"held-out episodes; a layer is the episode's own only if swapping it costs accuracy "
                f"(paired {LEVEL:.0%} bootstrap band over the episodes)")
    return plotting.finish(fig, f"{title}: how episode-specific the generated weights are".removeprefix(": "),
                           subtitle)


def weight_specificity(learners: Mapping[str, Learner], family: FewShotImages, run: Run, seeds: SeedPlan,
                       device: str = "cpu", *, episodes: int = 500) -> dict[str, dict]:
    """A recipe ``evaluate:`` step: :func:`specificity` of every HyperTransformer on ``episodes`` held-out episodes.

    The episodes are drawn from ``family`` (the recipe's evaluation family) with the comparison's seed; writes
    ``weight_specificity.json`` and ``figures/weight_specificity.png`` and prints one table per learner.
    """
    _check_options(episodes=episodes)
    chosen = {name: learner for name, learner in learners.items() if isinstance(learner, HyperTransformer)}
    if not chosen:
        raise ValueError("weight_specificity needs a learner that is a hypernets.HyperTransformer")
    episode = family.sample(episodes, family.support_size, family.query_size,
                            generator=torch.Generator().manual_seed(seeds.comparison)).to(device)
    reports = {name: specificity(learner, episode, seed=seeds.comparison) for name, learner in chosen.items()}
    for name, report in reports.items():
        logger.info("\n".join(format_specificity(name, report)))
    results = {name: asdict(report) for name, report in reports.items()}
    run.save_json(results, "weight_specificity")
    run.save_figure(plot_specificity(reports, run.config.get("name", "")), "weight_specificity")
    return results


def _check_options(*, episodes: int = 500) -> None:
    """The hook's options, checked when the recipe is loaded: episodes are compared with each other, so >= 2."""
    integer("episodes", episodes, owner="weight_specificity", low=2)


weight_specificity.check_options = _check_options


__all__ = ["Specificity", "LayerSpecificity", "Swap", "specificity", "format_specificity", "plot_specificity",
           "weight_specificity"]
