"""PrefixLearner: the shared frame of causal in-context learners that predict every prefix in one pass.

The support set becomes context tokens (``tokens.context_tokens``) and every prediction is a *probe*
``[x, 0]`` that sees a prefix of the context: the support input x_j sees the first j examples (the
prediction of y_j from its predecessors), and each query sees the first k examples for each k asked
for. A subclass implements only ``_probe(context, probes, visible)``; one call gives the per-prefix
predictions, the per-k query predictions, the forward pass and the loss.

A causal transformer over interleaved tokens needs no probes for the prefixes: the context token
``[x_j, 0]`` sees the first j examples and itself, exactly as the probe of x_j would, so the prediction
of y_j is read at that token (``reads_prefixes_from_context``).
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import torch

from metaopt.checks import optional, positive_int
from metaopt.episodes import Episode
from metaopt.learners.base import Learner
from metaopt.learners.incontext.tokens import (
    check_support_sizes,
    check_token_format,
    context_length,
    context_tokens,
    episode_arrays,
    query_tokens,
)


class PrefixLearner(Learner):
    """A causal in-context learner over ``x_dim``-dimensional inputs and ``y_dim``-dimensional labels.

    Subclasses call ``super().__init__(x_dim, y_dim, token_format)`` and implement ``_probe``.
    ``max_support`` (None = unbounded) refuses longer support sets with a clear message.
    """

    implicit = True
    reads_prefixes_from_context: ClassVar[bool] = False
    """Set by a model whose every context token sees itself and the tokens before it, as a probe in its place
    would (a causal transformer), over interleaved tokens: its ``_probe`` also predicts at the context tokens,
    returning ``[T, C + P, y]`` context first, and the prediction of y_j is read at x_j's own token."""

    def __init__(self, x_dim: int, y_dim: int, token_format: str, max_support: int | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        for name, value in (("x_dim", x_dim), ("y_dim", y_dim)):
            positive_int(name, value, owner=owner)
        optional(positive_int, "max_support", max_support, owner=owner)
        self.x_dim, self.y_dim, self.max_support = x_dim, y_dim, max_support
        self.token_format = check_token_format(owner, token_format)
        # a concatenated context token [x_j, y_j] sees its own label: no prefix prediction can be read there
        assert not self.reads_prefixes_from_context or self.token_format == "interleaved"

    def _check_support_size(self, support: int) -> None:
        if self.max_support is not None and support > self.max_support:
            raise ValueError(f"{type(self).__name__} was built for at most max_support={self.max_support} support "
                             f"examples; got {support}")

    def check_fits(self, episode: Episode) -> None:
        """The kind, ``x_dim``/``y_dim`` and ``max_support`` against ``episode`` (see ``Learner.check_fits``)."""
        self.check_episode(episode)
        episode_arrays(type(self).__name__, episode, self.x_dim, self.y_dim)
        self._check_support_size(episode.num_support)

    def _probe(self, context: torch.Tensor, probes: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Predictions ``[T, P, y]`` for probe tokens ``[T, P, E]``, probe p seeing ``context[:, :visible[p]]``.

        ``context`` is ``[T, C, E]`` and ``visible`` a long tensor ``[P]`` with values in ``[0, C]``. With
        ``reads_prefixes_from_context``: predictions at every context token, then at the probes, ``[T, C + P, y]``.
        """
        raise NotImplementedError

    def _run(
        self, episode: Episode, support_sizes: Sequence[int], prefixes: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Per-prefix predictions ``[T, S, y]`` (None unless ``prefixes``) and per-k queries ``[K, T, Q, y]``."""
        self.check_episode(episode)
        owner = type(self).__name__
        xs, ys, xq = episode_arrays(owner, episode, self.x_dim, self.y_dim)
        T, S, _ = xs.shape
        Q, K = xq.shape[1], len(support_sizes)
        self._check_support_size(S)
        context = context_tokens(xs, ys, self.token_format)  # [T, C, E]
        probe_x = [xq.repeat(1, K, 1)]  # [T, K * Q, x], query q for size k at k * Q + q
        sizes = torch.tensor([context_length(k, self.token_format) for k in support_sizes], dtype=torch.long)
        visible = [sizes.repeat_interleave(Q)]
        probe_prefixes = prefixes and not self.reads_prefixes_from_context
        if probe_prefixes:
            probe_x.insert(0, xs)
            visible.insert(0, torch.tensor([context_length(j, self.token_format) for j in range(S)], dtype=torch.long))
        probes = query_tokens(torch.cat(probe_x, dim=1), self.y_dim)
        out = self._probe(context, probes, torch.cat(visible).to(xs.device))
        if self.reads_prefixes_from_context:
            at_context, out = out[:, : context.shape[1]], out[:, context.shape[1] :]  # [T, 2S, y], [T, P, y]
        n_prefix = S if probe_prefixes else 0
        query_pred = out[:, n_prefix:].reshape(T, K, Q, self.y_dim).transpose(0, 1)
        if not prefixes:
            return None, query_pred
        # interleaved context: x_j's token is at position 2j
        return (at_context[:, ::2] if self.reads_prefixes_from_context else out[:, :S]), query_pred

    def forward(self, episode: Episode) -> torch.Tensor:
        return self._run(episode, [episode.num_support], prefixes=False)[1][0]

    def predict_by_support_size(self, episode: Episode, support_sizes: Sequence[int]) -> torch.Tensor:
        """Query predictions for every k from one causal pass: ``[K, T, Q, y]``.

        No query sees the support beyond the largest k, so it is left out of the pass.
        """
        sizes = check_support_sizes(type(self).__name__, support_sizes, episode.num_support)
        return self._run(episode.take_support(max(sizes)), sizes, prefixes=False)[1]

    def predict_prefixes(self, episode: Episode) -> torch.Tensor:
        """Prediction of each support label from the examples before it: ``[T, S, y]``."""
        return self._run(episode, [episode.num_support], prefixes=True)[0]

    def loss(self, episode: Episode) -> torch.Tensor:
        """Task loss averaged over every prefix (each support label from its predecessors) and the queries."""
        support_pred, query_pred = self._run(episode, [episode.num_support], prefixes=True)
        predictions = torch.cat([support_pred, query_pred[0]], dim=1)
        targets = torch.cat([episode.y_support, episode.y_query], dim=1).flatten(2)
        return episode.kind.loss(predictions, targets)
