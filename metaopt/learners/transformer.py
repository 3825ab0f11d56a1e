"""A GPT-2-style causal transformer that learns in context (Garg et al. 2022).

The support pairs are read as an interleaved token sequence ``x1, y1, x2, y2, …`` and the model
predicts ``y_i`` at the position of ``x_i``, i.e. from the prefix of ``i − 1`` examples. Query tokens
are appended after the support (``PrefixLearner``'s probes): with an attention mask each one sees
exactly the first ``k`` support pairs and itself, so predictions for every support size come out of a
single forward pass.

The attention of each block is a setting: softmax (the default), Dai et al.'s momentum attention, or
von Oswald et al.'s mesa layer (``metaopt.learners.incontext``), alone or mixed layer by layer.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
from torch import nn

from metaopt.checks import positive_int
from metaopt.learners.attention import AttentionLayer, Block, SoftmaxAttention
from metaopt.learners.base import Example
from metaopt.learners.capabilities import Capability
from metaopt.learners.incontext.mesa import MesaAttention
from metaopt.learners.incontext.momentum import MomentumAttention
from metaopt.learners.incontext.prefix import PrefixLearner
from metaopt.learners.incontext.tokens import prefix_mask
from metaopt.tasks.regression import LinearRegression

ATTENTIONS: tuple[str, ...] = ("softmax", "momentum", "mesa")


def attention_layer(attention: str, momentum: float) -> AttentionLayer:
    """The attention type of a block: softmax, momentum (Dai et al., η = ``momentum``) or mesa (von Oswald et al.)."""
    if attention == "momentum":
        return functools.partial(MomentumAttention, momentum=momentum)
    return MesaAttention if attention == "mesa" else SoftmaxAttention


class Transformer(PrefixLearner):
    """GPT-2-style decoder over interleaved (x, y) tokens; predicts y at every x position.

    Tokens are ``[x, 0]`` for inputs and ``[0, y]`` for labels (``dim(x) + dim(y)`` wide), read in
    linearly, with learned positional embeddings, and read out linearly at input positions. A query that
    sees the first k examples sits at position 2k, where the next input would be.

    Args:
        x_dim: flattened input dimension.
        max_support: the largest support size the positional embedding covers.
        y_dim: label dimension (1 for scalar regression or binary labels).
        n_embd, n_layer, n_head, dropout: the decoder's size.
        attention: the attention of every block, one of ``ATTENTIONS`` (``"softmax"``, ``"momentum"``,
            ``"mesa"``), or a list with one entry per layer (e.g. ``["softmax", "mesa"]``).
        momentum: η of momentum attention (Dai et al.), used by ``"momentum"`` blocks only.
    """

    kinds = ("regression", "binary")
    capabilities = PrefixLearner.capabilities | {Capability.ATTENTION_DUAL_FORM}
    reads_prefixes_from_context = True  # causal, every token sees itself

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
        for name, value in (("max_support", max_support), ("n_embd", n_embd), ("n_layer", n_layer), ("n_head", n_head)):
            positive_int(name, value, owner="Transformer")
        if n_embd % n_head != 0:
            raise ValueError(f"Transformer: n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        attentions = [attention] * n_layer if isinstance(attention, str) else list(attention)
        if len(attentions) != n_layer or any(a not in ATTENTIONS for a in attentions):
            raise ValueError(
                f"Transformer: attention must be one of {ATTENTIONS} or a list of them, one per layer "
                f"(n_layer={n_layer}); got {attention!r}"
            )
        super().__init__(x_dim, y_dim, "interleaved", max_support=max_support)
        self.read_in = nn.Linear(x_dim + y_dim, n_embd)
        self.pos_emb = nn.Embedding(2 * max_support + 1, n_embd)
        self.blocks = nn.ModuleList(
            Block(n_embd, n_head, dropout, attn_layer=attention_layer(a, momentum)) for a in attentions
        )
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

    def _probe(self, context: torch.Tensor, probes: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Predictions at every context token and every probe ``[T, C + P, y]``; probe p sits at ``visible[p]``."""
        C = context.shape[1]
        mask = prefix_mask(C, visible, probes_see_themselves=True, device=context.device)  # [C + P, C + P]
        positions = torch.cat([torch.arange(C, device=context.device), visible])
        h = self.read_in(torch.cat([context, probes], dim=1)) + self.pos_emb(positions)
        for block in self.blocks:
            h = block(h, mask)
        return self.read_out(self.ln_f(h))
