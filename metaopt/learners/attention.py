"""Multi-head self-attention with an explicit mask, and the pre-norm transformer block built on it.

Every transformer of the project is a stack of :class:`Block`: the in-context ``Transformer`` (a causal
prefix mask; softmax, momentum or mesa attention, layer by layer) and the HyperTransformer's encoders (a
key mask, no biases in the attention). The attention is a layer type, as in timm (``attn_layer=``): a
:class:`MultiHeadAttention` subclass that changes only ``attend``, the step from per-head queries, keys
and values to per-head outputs:

- :class:`SoftmaxAttention`: ``softmax(q kᵀ / √d) v`` (Vaswani et al. 2017);
- ``MomentumAttention`` (``metaopt.learners.incontext.momentum``): softmax plus momentum over the values;
- ``MesaAttention`` (``metaopt.learners.incontext.mesa``): an in-context ridge regression at every position.

The projections ``qkv`` and ``proj`` are shared by all of them, so analyses hook every variant the same way.
A mask is boolean, True = may attend, and broadcasts to ``[B, heads, L, L]``: ``[L, L]`` (the causal
prefix mask of ``tokens.prefix_mask``; momentum and mesa attention need this form) or ``[B, 1, 1, L]``
(tokens hidden from every query).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from metaopt.checks import optional, positive_int, probability
from metaopt.learners.mlp import mlp

AttentionLayer = Callable[[int, int, float], nn.Module]
"""An attention type: called as ``(n_embd, n_head, dropout)``, gives a module called as ``(h, mask)``."""


class MultiHeadAttention(nn.Module):
    """Project tokens ``[B, L, C]`` to heads, ``attend`` (subclasses), merge the heads and project back.

    Args:
        n_embd: token width C.
        n_head: number of heads H.
        dropout: what a subclass drops out in training (softmax attention: the attention weights).
        head_dim: query/key/value width per head D (default ``n_embd // n_head``, then H must divide C).
        bias: biases in the ``qkv`` and ``proj`` projections.
    """

    def __init__(
        self, n_embd: int, n_head: int, dropout: float = 0.0, *, head_dim: int | None = None, bias: bool = True
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        n_embd, n_head = positive_int("n_embd", n_embd, owner=owner), positive_int("n_head", n_head, owner=owner)
        head_dim = optional(positive_int, "head_dim", head_dim, owner=owner)
        if head_dim is None:
            if n_embd % n_head != 0:
                raise ValueError(f"{owner}: n_embd ({n_embd}) must be divisible by n_head ({n_head})")
            head_dim = n_embd // n_head
        self.n_head, self.head_dim = n_head, head_dim
        self.dropout = probability("dropout", dropout, owner=owner)
        self.qkv = nn.Linear(n_embd, 3 * n_head * head_dim, bias=bias)
        self.proj = nn.Linear(n_head * head_dim, n_embd, bias=bias)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Per-head outputs ``[B, H, L, D]`` from queries, keys and values ``[B, H, L, D]``."""
        raise NotImplementedError

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, _ = h.shape
        H, D = self.n_head, self.head_dim
        # [B, L, 3 H D] -> 3 x [B, H, L, D]
        q, k, v = (t.view(B, L, H, D).transpose(1, 2) for t in self.qkv(h).split(H * D, dim=2))
        return self.proj(self.attend(q, k, v, mask).transpose(1, 2).reshape(B, L, H * D))


class SoftmaxAttention(MultiHeadAttention):
    """Multi-head softmax attention (scaled dot products) with dropout on the attention weights."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)


class Block(nn.Module):
    """Pre-norm transformer block: ``h + attn(norm(h), mask)``, then ``h + mlp(norm(h))`` (GPT-2).

    Args:
        n_embd, n_head: token width and heads.
        dropout: the attention's dropout, and dropout on the MLP's output.
        attn_layer: the attention type (``SoftmaxAttention``, ``MomentumAttention``, ``MesaAttention``, or a
            ``functools.partial`` of one with its own settings).
        mlp_ratio: the MLP's hidden width in units of ``n_embd`` (GPT-2: 4).
        norm_layer: the norm type, called with ``n_embd`` (``nn.Identity`` leaves the stream un-normalised).
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        dropout: float = 0.0,
        *,
        attn_layer: AttentionLayer = SoftmaxAttention,
        mlp_ratio: int = 4,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.ln_1 = norm_layer(n_embd)
        self.attn = attn_layer(n_embd, n_head, dropout)
        self.ln_2 = norm_layer(n_embd)
        self.mlp = mlp(n_embd, [mlp_ratio * n_embd], n_embd, activation=nn.GELU, dropout=dropout)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = h + self.attn(self.ln_1(h), mask)
        return h + self.mlp(self.ln_2(h))


__all__ = ["AttentionLayer", "Block", "MultiHeadAttention", "SoftmaxAttention"]
