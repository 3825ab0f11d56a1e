"""The Learner contract: a module from an Episode to predictions on its queries."""

from __future__ import annotations

from typing import ClassVar, Sequence

import torch
from torch import nn

from metaopt.episodes import Episode


class Learner(nn.Module):
    """Maps an Episode to predictions ``[T, Q, ...]`` on its queries.

    Its ``nn.Parameter``s are its meta-parameters; a learner without any is evaluated, never trained.
    Subclasses set ``kinds`` (the episode kinds they apply to) and ``implicit`` (True for in-context
    learners, whose optimisation happens inside a forward pass; False for explicit optimisers/solvers).
    """

    kinds: ClassVar[tuple[str, ...]] = ("regression",)
    implicit: ClassVar[bool] = False

    def forward(self, episode: Episode) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, episode: Episode) -> torch.Tensor:
        """The meta-training objective: the task loss on the queries."""
        return episode.kind.loss(self(episode), episode.y_query)

    def predict_by_support_size(self, episode: Episode, support_sizes: Sequence[int]) -> torch.Tensor:
        """Query predictions using only the first k support examples, for each k: ``[K, T, Q, ...]``.

        The default re-runs the learner per k; causal sequence models override it with one pass.
        """
        return torch.stack([self(episode.take_support(k)) for k in support_sizes])

    @property
    def is_trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def check_episode(self, episode: Episode) -> None:
        """Refuse an episode of a kind this learner does not handle."""
        if episode.kind not in self.kinds:
            raise ValueError(
                f"{type(self).__name__} handles episodes of kind {self.kinds}; got kind={episode.kind!r}"
            )
