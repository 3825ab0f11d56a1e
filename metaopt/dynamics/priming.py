"""Memorisation and priming of an injected fact (Sun et al. 2025), measured on a causal language model.

For a fact with keyword ``k`` and context ``X_c`` and thematic prefixes ``X_T,j`` (same theme, other entities):

- ``S_mem = P_after(k | X_c) / P_before(k | X_c)``: how much the model learned the fact itself;
- ``S_prime = mean_j P_after(k | X_T,j) / P_before(k | X_T,j)``: how much it now says ``k`` where it should not;
- the keyword's probability before learning is ``P_before(k | X_c)`` (its surprise in the fact's own context;
  the paper's predictor of priming).

:func:`inject` continues training with the fact's tokens as one sequence of every batch of normal data, for a fixed
number of steps; :func:`keep_training` continues on normal data alone (how long the fact is remembered).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import optimizers as O
from metaopt.checks import positive_int

__all__ = ["PrimingScores", "inject", "keep_training", "keyword_probabilities", "log_ratio", "priming_scores"]


@torch.no_grad()
def keyword_probabilities(model: nn.Module, prefixes: Sequence[list[int]], keyword: int) -> Tensor:
    """``P(keyword | prefix)`` for each prefix of token ids (prefixes of equal length are run together)."""
    was_training = model.training
    model.eval()
    out = torch.empty(len(prefixes))
    by_length: dict[int, list[int]] = {}
    for i, prefix in enumerate(prefixes):
        by_length.setdefault(len(prefix), []).append(i)
    for indices in by_length.values():
        ids = torch.tensor([prefixes[i] for i in indices])
        out[indices] = F.softmax(model(ids)[:, -1].double(), dim=-1)[:, keyword].float()
    model.train(was_training)
    return out


@dataclass(frozen=True)
class PrimingScores:
    """A fact's probabilities before and after learning, and the scores made from them."""

    before_context: float  # P_before(k | X_c)
    after_context: float
    before_thematic: list[float]  # P_before(k | X_T,j)
    after_thematic: list[float]

    @property
    def s_mem(self) -> float:
        return self.after_context / self.before_context

    @property
    def s_prime(self) -> float:
        return sum(a / b for a, b in zip(self.after_thematic, self.before_thematic)) / len(self.before_thematic)


def priming_scores(before: nn.Module, after: nn.Module, context: list[int], thematic: Sequence[list[int]],
                   keyword: int) -> PrimingScores:
    """S_mem and S_prime of ``keyword`` from the models before and after learning (see the module docstring)."""
    if not thematic:
        raise ValueError("priming_scores needs at least one thematic prefix")
    prefixes = [context, *thematic]
    p_before = keyword_probabilities(before, prefixes, keyword)
    p_after = keyword_probabilities(after, prefixes, keyword)
    tiny = torch.finfo(torch.float32).tiny
    p_before = p_before.clamp(min=tiny)
    return PrimingScores(float(p_before[0]), float(p_after[0]), p_before[1:].tolist(), p_after[1:].tolist())


def _mixed_loss(model: nn.Module, normal: Tensor, fact: Tensor | None) -> Tensor:
    """Next-token cross-entropy, the mean over sequences: ``normal`` ``[B, L]`` and the fact's ids ``[l]``."""
    per_sequence = F.cross_entropy(model(normal[:, :-1]).transpose(1, 2), normal[:, 1:], reduction="none").mean(1)
    if fact is None:
        return per_sequence.mean()
    fact_loss = F.cross_entropy(model(fact[None, :-1])[0], fact[1:])
    return (per_sequence.sum() + fact_loss) / (len(normal) + 1)


def _train(model: nn.Module, corpus: Tensor, fact: Tensor | None, *, steps: int, batch_size: int,
           optimizer: O.GradientTransformation, seed: int, every: int = 0,
           probe: Callable[[nn.Module], float] | None = None) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    opt = O.as_torch_optimizer(optimizer, model.named_parameters())
    model.train()
    measured = []
    for step in range(1, steps + 1):
        normal = corpus[torch.randint(len(corpus), (batch_size - (fact is not None),), generator=g)]
        loss = _mixed_loss(model, normal, fact)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if probe is not None and every and step % every == 0:
            measured.append(probe(model))
    return measured


def inject(model: nn.Module, corpus: Tensor, fact: list[int], *, steps: int, batch_size: int,
           optimizer: O.GradientTransformation, seed: int) -> nn.Module:
    """A copy of ``model`` trained ``steps`` steps with the fact's ids in every batch of ``batch_size`` sequences
    (the other ``batch_size - 1`` drawn from ``corpus``); ``optimizer`` starts fresh (e.g. ``adam(lr)`` or
    ``pruned(adam(lr), k)``)."""
    positive_int("steps", steps, owner="inject")
    positive_int("batch_size", batch_size, owner="inject")
    if batch_size < 2:
        raise ValueError(f"inject: batch_size must be >= 2 (the fact and normal data); got {batch_size}")
    learner = copy.deepcopy(model)
    _train(learner, corpus, torch.tensor(fact), steps=steps, batch_size=batch_size, optimizer=optimizer, seed=seed)
    return learner


def keep_training(model: nn.Module, corpus: Tensor, *, steps: int, batch_size: int,
                  optimizer: O.GradientTransformation, seed: int, every: int,
                  probe: Callable[[nn.Module], float]) -> list[float]:
    """Train ``model`` (in place) on normal data alone; ``probe(model)`` every ``every`` steps."""
    positive_int("every", every, owner="keep_training")
    return _train(model, corpus, None, steps=steps, batch_size=batch_size, optimizer=optimizer, seed=seed,
                  every=every, probe=probe)


def log_ratio(value: float) -> float:
    """``log`` of a ratio score, finite (a ratio of 0 or inf is clipped to the float32 range)."""
    return math.log(min(max(value, 1e-38), 1e38))
