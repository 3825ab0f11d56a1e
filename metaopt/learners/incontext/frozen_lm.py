"""A frozen pretrained language model as an in-context learner (Bhattamishra et al. 2024, section 5).

The paper freezes a pretrained GPT-2 and trains only new input and output layers on Boolean in-context
learning. Here the pretrained model is the project's small causal LM of the knowledge-priming study
(:mod:`metaopt.dynamics`), pretrained on its generated fact corpus with the same settings and the same cache
as the ``priming`` pipeline (``world``, ``model``, ``pretrain`` and ``seed`` equal to a ``knowledge_priming``
run's share its cached weights). What we chose where the paper does not say: the LM's token embedding is
replaced by the new read-in (a linear map of the ``[x, y]`` tokens), its learned positional embeddings, blocks
and final norm are kept and frozen, and a new linear read-out predicts the label at each input position.

Pretraining (or loading it from the cache) happens on first use, not at build time, so that building a recipe
stays cheap; a ``pretrained`` flag in the state dict tells a learner loaded from a checkpoint that its frozen
weights are already there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from metaopt.checks import positive_int
from metaopt.dynamics.facts import FactWorld
from metaopt.dynamics.language_model import CausalLM, pretrain
from metaopt.learners.base import Example
from metaopt.learners.incontext.prefix import PrefixLearner
from metaopt.learners.incontext.tokens import prefix_mask
from metaopt.seeds import SeedPlan
from metaopt.tasks.boolean import Conjunction

__all__ = ["FrozenLM"]

WORLD = {"entities": 60, "new_entities": 20, "zipf": 1.2, "documents": 4000, "length": 32}
MODEL = {"n_embd": 64, "n_layer": 2, "n_head": 4}
PRETRAIN = {"steps": 1500, "batch_size": 32, "lr": 3e-3}
"""The defaults: recipes/knowledge_priming.yaml's world, model and pretraining."""


def _merged(name: str, defaults: dict[str, Any], given: dict[str, Any] | None) -> dict[str, Any]:
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"FrozenLM: {name} takes {sorted(defaults)}; got unknown key(s) {unknown}")
    return {**defaults, **given}


class FrozenLM(PrefixLearner):
    """The pretrained fact-world LM, frozen, between a new trained read-in and read-out.

    Tokens are interleaved ``[x, 0]``, ``[0, y]`` as in :class:`metaopt.learners.Transformer`; the read-in maps
    them to the LM's width, the LM's positions are added, the frozen blocks run under the prefix mask, and the
    read-out predicts y at every input position. Only ``read_in`` and ``read_out`` are trained.

    Args:
        x_dim: input dimension.
        max_support: the largest support size (``2 * max_support + 1`` must fit the LM's positions).
        y_dim: label dimension.
        world, model, pretrain: the priming pipeline's sections (defaults: recipes/knowledge_priming.yaml).
        seed: the seed the LM was pretrained under (the priming recipe's ``seed``).
        cache_dir: where the pretrained weights are cached (None: pretrained afresh, not cached).
    """

    kinds = ("regression", "binary")
    reads_prefixes_from_context = True  # causal, every token sees itself

    @classmethod
    def example(cls) -> Example:
        learner = cls(4, max_support=12, world={"entities": 6, "new_entities": 2, "documents": 16, "length": 12},
                      model={"n_embd": 8, "n_layer": 1, "n_head": 2}, pretrain={"steps": 2, "batch_size": 4},
                      cache_dir=None)
        learner.ensure_pretrained()  # pretraining trains the LM: not inside the callers' torch.func transforms
        return Example(learner, Conjunction(n_bits=4))

    def __init__(self, x_dim: int, max_support: int, y_dim: int = 1, *, world: dict[str, Any] | None = None,
                 model: dict[str, Any] | None = None, pretrain: dict[str, Any] | None = None, seed: int = 0,
                 cache_dir: str | None = None) -> None:
        positive_int("max_support", max_support, owner="FrozenLM")
        super().__init__(x_dim, y_dim, "interleaved", max_support=max_support)
        self.world = _merged("world", WORLD, world)
        self.model = _merged("model", MODEL, model)
        self.pretraining = _merged("pretrain", PRETRAIN, pretrain)
        self.seed, self.cache_dir = seed, cache_dir
        seeds = SeedPlan(seed)
        w = self.world
        self._fact_world = FactWorld(w["entities"], w["new_entities"], w["zipf"], seed=seeds.init)
        with torch.random.fork_rng():  # the LM's initialisation as in the priming pipeline, not the caller's stream
            torch.manual_seed(seeds.init)
            self.lm = CausalLM(len(self._fact_world.vocabulary), max_len=max(w["length"], 48), **self.model)
        if 2 * max_support + 1 > self.lm.max_len:
            raise ValueError(f"FrozenLM: max_support={max_support} needs {2 * max_support + 1} positions; the LM "
                             f"has {self.lm.max_len}")
        self.lm.requires_grad_(False)
        self.register_buffer("pretrained", torch.tensor(False))
        n_embd = self.model["n_embd"]
        self.read_in = nn.Linear(x_dim + y_dim, n_embd)
        self.read_out = nn.Linear(n_embd, y_dim)

    def train(self, mode: bool = True) -> "FrozenLM":
        super().train(mode)
        self.lm.eval()  # frozen: no dropout
        return self

    def ensure_pretrained(self) -> None:
        """Pretrain the LM on the fact corpus, or load it from ``cache_dir``, unless its weights are already here."""
        if bool(self.pretrained):
            return
        seeds, w, p = SeedPlan(self.seed), self.world, self.pretraining
        corpus = self._fact_world.corpus(w["documents"], w["length"], seed=seeds.training())
        device = self.read_in.weight.device
        identity = {"world": dict(w), "model": dict(self.model), "seed": self.seed,
                    "vocabulary": len(self._fact_world.vocabulary)}
        with torch.enable_grad():
            self.lm.requires_grad_(True)
            try:
                pretrain(self.lm.cpu(), corpus, steps=p["steps"], batch_size=p["batch_size"], lr=p["lr"],
                         seed=seeds.training(), cache_dir=None if self.cache_dir is None else Path(self.cache_dir),
                         identity=identity)
            finally:
                self.lm.requires_grad_(False)
                self.lm.zero_grad(set_to_none=True)  # pretraining's last gradients must not reach an optimizer
        self.lm.to(device).eval()
        self.pretrained.fill_(True)

    def _probe(self, context: torch.Tensor, probes: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        self.ensure_pretrained()
        C = context.shape[1]
        mask = prefix_mask(C, visible, probes_see_themselves=True, device=context.device)
        positions = torch.cat([torch.arange(C, device=context.device), visible])
        h = self.read_in(torch.cat([context, probes], dim=1)) + self.lm.positions(positions)
        for block in self.lm.blocks:
            h = block(h, mask)
        return self.read_out(self.lm.norm(h))
