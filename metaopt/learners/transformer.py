"""A GPT-2-style causal transformer that learns in context (Garg et al. 2022).

The support pairs are read as an interleaved token sequence ``x1, y1, x2, y2, …`` and the model
predicts ``y_i`` at the position of ``x_i``, i.e. from the prefix of ``i − 1`` examples. Query tokens
are appended after the support: with an attention mask each one sees exactly the first ``k``
support pairs and itself, so predictions for every support size come out of a single forward pass.

The attention of each block is a setting: softmax (the default), Dai et al.'s momentum attention, or
von Oswald et al.'s mesa layer (``metaopt.learners.incontext``), alone or mixed layer by layer.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from metaopt.episodes import Episode
from metaopt.learners.attention import CausalSelfAttention
from metaopt.learners.base import Example, Learner
from metaopt.learners.capabilities import Capability
from metaopt.learners.incontext.mesa import MesaAttention
from metaopt.learners.incontext.momentum import MomentumAttention
from metaopt.learners.incontext.tokens import context_tokens, query_tokens
from metaopt.tasks.regression import LinearRegression


ATTENTIONS: tuple[str, ...] = ("softmax", "momentum", "mesa")


def make_attention(attention: str, n_embd: int, n_head: int, dropout: float, momentum: float) -> nn.Module:
    """The attention module of a block: softmax, momentum (Dai et al.) or mesa (von Oswald et al.)."""
    if attention == "momentum":
        return MomentumAttention(n_embd, n_head, dropout, momentum=momentum)
    if attention == "mesa":
        return MesaAttention(n_embd, n_head, dropout)
    return CausalSelfAttention(n_embd, n_head, dropout)


class Block(nn.Module):
    """Pre-norm transformer block: attention then a GELU MLP, each with a residual connection."""

    def __init__(
        self, n_embd: int, n_head: int, dropout: float, attention: str = "softmax", momentum: float = 0.9
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = make_attention(attention, n_embd, n_head, dropout, momentum)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout)
        )

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.ln_1(h), mask)
        return h + self.mlp(self.ln_2(h))


def interleaved_layout(
    num_support: int, support_sizes: Sequence[int], num_query: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``[L]`` and attention mask ``[L, L]`` of ``x1 y1 … xS yS`` plus query tokens.

    For each k in ``support_sizes`` there are ``num_query`` query tokens at position ``2k``; each
    attends to the first ``2k`` support tokens and to itself only.
    """
    n_sup, n_q = 2 * num_support, len(support_sizes) * num_query
    length = n_sup + n_q
    mask = torch.zeros(length, length, dtype=torch.bool, device=device)
    mask[:n_sup, :n_sup] = torch.ones(n_sup, n_sup, dtype=torch.bool, device=device).tril()
    ks = torch.as_tensor(list(support_sizes), device=device).repeat_interleave(num_query)  # [n_q]
    mask[n_sup:, :n_sup] = torch.arange(n_sup, device=device)[None, :] < 2 * ks[:, None]
    mask[n_sup:, n_sup:] = torch.eye(n_q, dtype=torch.bool, device=device)
    positions = torch.cat([torch.arange(n_sup, device=device), 2 * ks])
    return positions, mask


class Transformer(Learner):
    """GPT-2-style decoder over interleaved (x, y) tokens; predicts y at every x position.

    Tokens are ``[x, 0]`` for inputs and ``[0, y]`` for labels (``dim(x) + dim(y)`` wide), read in
    linearly, with learned positional embeddings, and read out linearly at input positions.

    Args:
        x_dim: flattened input dimension.
        y_dim: label dimension (1 for scalar regression or binary labels).
        max_support: the largest support size the positional embedding covers.
        n_embd, n_layer, n_head, dropout: the decoder's size.
        attention: the attention of every block, one of ``ATTENTIONS`` (``"softmax"``, ``"momentum"``,
            ``"mesa"``), or a list with one entry per layer (e.g. ``["softmax", "mesa"]``).
        momentum: η of momentum attention (Dai et al.), used by ``"momentum"`` blocks only.
    """

    kinds = ("regression", "binary")
    implicit = True
    capabilities = Learner.capabilities | {Capability.ATTENTION_DUAL_FORM}

    @classmethod
    def example(cls) -> Example:
        return Example(cls(3, max_support=5, n_embd=8, n_layer=1, n_head=2), LinearRegression(dim=3))

    def __init__(
        self,
        x_dim: int,
        max_support: int,
        y_dim: int = 1,
        n_embd: int = 64,
        n_layer: int = 4,
        n_head: int = 4,
        dropout: float = 0.0,
        attention: str | Sequence[str] = "softmax",
        momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"Transformer: n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        for name, value in (("x_dim", x_dim), ("max_support", max_support), ("n_layer", n_layer)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Transformer: {name} must be a positive int; got {value!r}")
        attentions = [attention] * n_layer if isinstance(attention, str) else list(attention)
        if len(attentions) != n_layer or any(a not in ATTENTIONS for a in attentions):
            raise ValueError(
                f"Transformer: attention must be one of {ATTENTIONS} or a list of them, one per layer "
                f"(n_layer={n_layer}); got {attention!r}"
            )
        self.x_dim, self.y_dim, self.max_support = x_dim, y_dim, max_support
        self.read_in = nn.Linear(x_dim + y_dim, n_embd)
        self.pos_emb = nn.Embedding(2 * max_support + 1, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, a, momentum) for a in attentions)
        self.ln_f = nn.LayerNorm(n_embd)
        self.read_out = nn.Linear(n_embd, y_dim)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                # scaled residual projections, as in GPT-2
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ core pass
    def _run(self, episode: Episode, support_sizes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions at the support x positions ``[T, S, y]`` and at the queries ``[K, T, Q, y]``."""
        self.check_episode(episode)
        xs, ys, xq = episode.x_support.flatten(2), episode.y_support.flatten(2), episode.x_query.flatten(2)
        T, S, D = xs.shape
        Q, K = xq.shape[1], len(support_sizes)
        if D != self.x_dim or ys.shape[-1] != self.y_dim:
            raise ValueError(
                f"Transformer was built for x_dim={self.x_dim}, y_dim={self.y_dim}; got an episode with "
                f"x_dim={D}, y_dim={ys.shape[-1]}"
            )
        if S > self.max_support:
            raise ValueError(
                f"Transformer was built for at most max_support={self.max_support} support examples; got {S}"
            )
        support_tokens = context_tokens(xs, ys, "interleaved")  # [T, 2S, D + y]
        queries = query_tokens(xq, self.y_dim).repeat(1, K, 1)  # [T, K * Q, D + y]
        positions, mask = interleaved_layout(S, support_sizes, Q, xs.device)
        h = self.read_in(torch.cat([support_tokens, queries], dim=1)) + self.pos_emb(positions)
        for block in self.blocks:
            h = block(h, mask)
        out = self.read_out(self.ln_f(h))
        support_pred = out[:, : 2 * S : 2]
        query_pred = out[:, 2 * S :].reshape(T, K, Q, self.y_dim).transpose(0, 1)
        return support_pred, query_pred

    def forward(self, episode: Episode) -> torch.Tensor:
        return self._run(episode, [episode.num_support])[1][0]

    def predict_by_support_size(self, episode: Episode, support_sizes: Sequence[int]) -> torch.Tensor:
        largest = max(support_sizes)
        return self._run(episode.take_support(largest), support_sizes)[1]

    def predict_prefixes(self, episode: Episode) -> torch.Tensor:
        """Prediction of each support label from the examples before it: ``[T, S, y]``."""
        return self._run(episode, [episode.num_support])[0]

    def loss(self, episode: Episode) -> torch.Tensor:
        """Task loss averaged over every prefix: each support label from its predecessors, and the queries."""
        support_pred, query_pred = self._run(episode, [episode.num_support])
        predictions = torch.cat([support_pred, query_pred[0]], dim=1)
        targets = torch.cat([episode.y_support, episode.y_query], dim=1).flatten(2)
        return episode.kind.loss(predictions, targets)
