"""Attention with momentum over its value vectors (Dai et al., ACL 2023 Findings).

Dai et al. read attention values as meta-gradients and add momentum to them (their Section 5):

    output_t = softmax attention_t + Σ_{i<t} η^{t−i} v_i,

an exponentially decaying sum of the values of the tokens before t, with η a fixed scalar. The paper's
attention, ``V softmax(Kᵀq_t / √d)``, stops before the output projection, so the sum is added there,
per head, and the projection sees both; nothing is learned beside the usual weights. The paper
writes the sum unnormalised (it calls it an EMA, but divides by nothing), and that is the default here.
Their released code (the ``understand_icl`` folder of microsoft/LMOps, which the paper links to) holds
the ICL-versus-finetuning analysis only; it has no momentum attention, so the paper's equation is the
whole specification. ``normalize=True`` divides the momentum term by ``Σ_{i<t} η^{t−i}`` (a moving
average whose weights sum to 1, whatever t): the reading a researcher may want when the unnormalised
sum, up to ``η / (1 − η)`` times a value's size, swamps the attention output in short prompts.

With a general mask, "the tokens before t" are the tokens row t may attend to other than itself,
and the distance ``t − i`` counts them from the end: for a causal row this is the usual ``t − i``; for
a query placed after the first n context tokens it is ``n − i``, its distance had it been at position n.
"""

from __future__ import annotations

import torch

from metaopt.learners.attention import SoftmaxAttention


class MomentumAttention(SoftmaxAttention):
    """Multi-head softmax attention plus momentum over values; an attention type of ``attention.Block``.

    Args:
        n_embd: token width.
        n_head: number of heads.
        dropout: attention dropout (training only).
        momentum: η in [0, 1).
        normalize: divide the momentum term by the sum of its weights.
    """

    def __init__(
        self, n_embd: int, n_head: int, dropout: float = 0.0, *, momentum: float = 0.9, normalize: bool = False
    ) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"MomentumAttention: momentum must be in [0, 1); got {momentum!r}")
        super().__init__(n_embd, n_head, dropout)
        self.momentum, self.normalize = float(momentum), bool(normalize)

    def momentum_weights(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Weights ``[L, L]`` of the momentum term: ``η^(distance)`` on the earlier visible tokens, 0 elsewhere."""
        earlier = mask & ~torch.eye(mask.shape[0], dtype=torch.bool, device=mask.device)
        distance = earlier.flip(-1).cumsum(-1).flip(-1)  # visible tokens at or after i, row by row
        weights = torch.where(earlier, self.momentum ** distance.to(dtype), 0.0)
        if self.normalize:
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
        return weights

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None or mask.dim() != 2:
            raise ValueError(f"MomentumAttention: needs a mask [L, L] (True = may attend); got "
                             f"{None if mask is None else tuple(mask.shape)}")
        return super().attend(q, k, v, mask) + self.momentum_weights(mask, q.dtype) @ v  # [L, L] @ [B, H, L, c]
