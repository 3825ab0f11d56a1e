"""The seed plan: every random stream of a run, derived from the recipe's one ``seed``.

A run draws randomness for several independent purposes. Each gets its own seed here, so that changing
one part of an experiment (more validation tasks, another comparison size, an extra learner) never
shifts the random numbers of another part, and so that two runs with the same ``seed`` see the same
episodes everywhere. The offsets are large primes-ish constants kept from the first releases, so runs
made before the plan existed give the same results.

=====================  ==============================  ==================================================
purpose                seed                            used by
=====================  ==============================  ==================================================
``init``               ``seed``                        ``torch.manual_seed`` before the learners are built
                                                       (their initial meta-parameters)
``training(name, s)``  ``seed`` (shard 0), else        each learner's training episodes, drawn as
                       ``item_seed(seed, s)``          ``train.shards`` streams (every learner draws the same
                                                       streams: they train on the same tasks)
``validation``         ``seed + 1_000_003``            MetaTrainer's fixed held-out validation episodes
``comparison``         ``seed + 2_000_029``            compare's held-out episodes; ``+1`` its bootstrap
                                                       resampling, ``+2`` its analyses (``comparison_streams``)
``tuning``             ``seed + 3_000_017``            held-out grid searches of tuned baselines (TunedRidge,
                                                       TunedGradientDescent: ``seed: ${seed:tuning}``)
``sequences``          ``seed + 3_000_017``            continual-learning task sequences (``evaluate:``)
``baseline_tuning(i)`` ``seed + 10_000 + i``           learning-rate grid search of the optimizer pipeline
``meta_training(i)``   ``seed + 1 + i``                the i-th learned optimizer's meta-training (ES
                                                       perturbations, inner-run initialisations)
``evaluation(i)``      ``seed + 20_000 + i``           the optimizer pipeline's i-th evaluation run
=====================  ==============================  ==================================================

Recipes reach the plan through the ``${seed:PURPOSE}`` resolver (registered by :mod:`metaopt.config`).
Data that is generated item by item from its own seed (a procedural glyph class) takes ``item_seed``, so
one item's images do not depend on which other items were drawn. (``optimizers/`` is a leaf that imports
only torch: its environments derive each mini-batch's seed from the run's seed the same way, in place.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metaopt.checks import non_negative_int

__all__ = ["SeedPlan", "comparison_streams", "generator", "item_seed"]

VALIDATION_OFFSET = 1_000_003
COMPARISON_OFFSET = 2_000_029
TUNING_OFFSET = 3_000_017
BASELINE_TUNING_OFFSET = 10_000
EVALUATION_OFFSET = 20_000
ITEM_STRIDE = 1_000_003


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (episodes are drawn on the CPU and moved, so any device agrees)."""
    return torch.Generator().manual_seed(seed)


def item_seed(seed: int, index: int) -> int:
    """The seed of item ``index`` of a collection generated from ``seed`` (distinct for distinct pairs)."""
    return (seed * ITEM_STRIDE + index) % 2**63


def comparison_streams(seed: int) -> tuple[int, int, int]:
    """Compare's three streams from its seed: (held-out episodes, bootstrap resampling, analyses)."""
    return seed, seed + 1, seed + 2


@dataclass(frozen=True)
class SeedPlan:
    """The seeds of one run (see the module docstring for the table)."""

    seed: int = 0

    def __post_init__(self) -> None:
        non_negative_int("seed", self.seed, owner="SeedPlan")

    @property
    def init(self) -> int:
        return self.seed

    def training(self, learner: str = "", shard: int = 0) -> int:
        """Training episodes of ``learner``'s ``shard``-th stream: the same streams for every learner, so they all
        train on the same tasks; shard 0 is the one stream of a run with ``train.shards=1``."""
        del learner
        non_negative_int("shard", shard, owner="SeedPlan.training")
        return self.seed if shard == 0 else item_seed(self.seed, shard)

    @property
    def validation(self) -> int:
        return self.seed + VALIDATION_OFFSET

    @property
    def comparison(self) -> int:
        return self.seed + COMPARISON_OFFSET

    @property
    def tuning(self) -> int:
        return self.seed + TUNING_OFFSET

    @property
    def sequences(self) -> int:
        return self.seed + TUNING_OFFSET

    def baseline_tuning(self, index: int) -> int:
        return self.seed + BASELINE_TUNING_OFFSET + index

    def meta_training(self, index: int) -> int:
        return self.seed + 1 + index

    def evaluation(self, index: int) -> int:
        return self.seed + EVALUATION_OFFSET + index

    def resolve(self, purpose: str) -> int:
        """The seed of a purpose named in a recipe (``${seed:tuning}``); an unknown name is refused."""
        value = getattr(type(self), purpose, None)
        if purpose.startswith("_") or not isinstance(value, property):
            named = sorted(n for n, v in vars(type(self)).items() if isinstance(v, property))
            raise ValueError(f"${{seed:{purpose}}}: unknown purpose; expected one of {named}")
        return getattr(self, purpose)
