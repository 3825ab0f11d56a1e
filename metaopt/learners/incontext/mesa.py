"""The mesa layer: attention that solves an in-context ridge regression at every position.

von Oswald et al. 2023, "Uncovering mesa-optimization algorithms in Transformers". For head h at
position t, with keys k_j, values v_j and query q_t of the tokens position t may see,

    output_t = Σ_h P_h  V_{≤t} K_{≤t}ᵀ R_t q_t,    R_t = (Σ_{j≤t} k_j k_jᵀ + λ_h⁻¹ I)⁻¹,

i.e. the prediction ``Φ_t q_t`` of the least-squares map
``Φ_t = argmin_Φ Σ_j |v_j − Φ k_j|² + λ_h⁻¹ |Φ|²_F``.
The paper computes R_t recursively by Sherman–Morrison from ``R_0 = λ I``,
``R_t = R_{t−1} − R_{t−1} k_t k_tᵀ R_{t−1} / (1 + k_tᵀ R_{t−1} k_t)``; so λ (learned per head, kept
positive through its logarithm) is the *inverse* ridge penalty, exactly as in the paper.

We compute the same R_t q_t without the sequential recursion: one batched Cholesky solve of the
prefix Gram matrices ``G_t = Σ_{j visible from t} k_j k_jᵀ + λ⁻¹ I`` for all positions at once. This is
exact, differentiable by autograd, works with any attention mask (so the layer is a drop-in for
softmax attention in ``Transformer``), and is fast for the short sequences of in-context learning
(memory ``B · H · L · d_head²``). The Gram matrices and their Cholesky solve run in float32 under autocast
(:func:`metaopt.runtime.full_precision`); the projections around them follow the run's precision.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from metaopt.checks import positive_float, positive_int
from metaopt.learners.attention import MultiHeadAttention
from metaopt.learners.base import Example
from metaopt.learners.incontext.prefix import PrefixLearner
from metaopt.learners.incontext.tokens import prefix_mask, read_y_slot
from metaopt.runtime import full_precision
from metaopt.tasks.regression import LinearRegression


class MesaAttention(MultiHeadAttention):
    """Multi-head mesa attention with a boolean mask ``[L, L]`` (True = may attend).

    An attention type of ``attention.Block``, called like softmax attention:
    ``forward(h [B, L, C], mask [L, L]) -> [B, L, C]``. A row that sees no token outputs zero (an empty
    regression predicts 0).

    Args:
        n_embd: token width C.
        n_head: number of heads.
        dropout: dropout on the output (training only).
        head_dim: key/query/value width per head (default ``n_embd // n_head``).
        lam_init: initial λ of every head (R_0 = λ I; ridge penalty 1/λ).
    """

    def __init__(
        self, n_embd: int, n_head: int, dropout: float = 0.0, *, head_dim: int | None = None, lam_init: float = 1.0
    ) -> None:
        positive_float("lam_init", lam_init, owner="MesaAttention")
        super().__init__(n_embd, n_head, dropout, head_dim=head_dim)
        self.log_lam = nn.Parameter(torch.full((n_head,), math.log(lam_init)))

    @property
    def lam(self) -> torch.Tensor:
        """λ per head ``[H]``: R_0 = λ I, so the ridge penalty is 1/λ."""
        return self.log_lam.exp()

    @full_precision
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None or mask.dim() != 2:
            raise ValueError(f"MesaAttention: needs a mask [L, L] (True = may attend); got "
                             f"{None if mask is None else tuple(mask.shape)}")
        H, D = self.n_head, self.head_dim
        visible = mask.to(q.dtype)  # [L, L]
        # prefix Gram of every row: G_i = Σ_j mask_ij k_j k_jᵀ + λ⁻¹ I, [B, H, L, D, D]
        gram = torch.einsum("ij,bhjd,bhje->bhide", visible, k, k)
        ridge = (1.0 / self.lam).view(1, H, 1, 1, 1) * torch.eye(D, dtype=q.dtype, device=q.device)
        solved = torch.cholesky_solve(q.unsqueeze(-1), torch.linalg.cholesky(gram + ridge)).squeeze(-1)  # R_i q_i
        scores = torch.einsum("bhjd,bhid->bhij", k, solved) * visible  # k_jᵀ R_i q_i on visible j
        return scores @ v  # Σ_j v_j k_jᵀ R_i q_i, [B, H, L, D]

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.dropout(super().forward(h, mask), self.dropout, self.training)


class MesaLayer(PrefixLearner):
    """A stack of residual mesa layers over in-context tokens, read out as ``−(y-slot)`` (von Oswald et al.).

    Context tokens are causal (each sees itself and those before it, as in the paper); a probe
    ``[x, 0]`` sees the first k examples and not itself, so one pass gives every prefix and every k.
    ``from_ridge`` builds the one-layer construction that equals ridge regression exactly. To stack
    mesa with softmax attention, use ``Transformer(attention=["softmax", "mesa", …])``.

    Args:
        x_dim, y_dim: input and label dimensions.
        layers, heads: depth and heads per layer.
        head_dim: key/query/value width per head (default ``x_dim + y_dim``).
        token_format: ``"concatenated"`` (default) or ``"interleaved"``.
        lam_init: initial λ (R_0 = λ I).
    """

    kinds = ("regression",)

    @classmethod
    def example(cls) -> Example:
        return Example(cls(3), LinearRegression(dim=3))

    def __init__(
        self,
        x_dim: int,
        y_dim: int = 1,
        layers: int = 1,
        heads: int = 1,
        head_dim: int | None = None,
        token_format: str = "concatenated",
        lam_init: float = 1.0,
    ) -> None:
        super().__init__(x_dim, y_dim, token_format)
        for name, value in (("layers", layers), ("heads", heads)):
            positive_int(name, value, owner="MesaLayer")
        width = x_dim + y_dim
        self.blocks = nn.ModuleList(
            MesaAttention(width, heads, head_dim=width if head_dim is None else head_dim, lam_init=lam_init)
            for _ in range(layers)
        )

    @classmethod
    def from_ridge(cls, x_dim: int, penalty: float, *, y_dim: int = 1) -> "MesaLayer":
        """One mesa layer equal to ``Ridge(lam=penalty)``: ``ŷ = Yᵀ X (XᵀX + penalty I)⁻¹ x_q`` at every k.

        Keys and queries read x, values read y, λ = 1/penalty, and the projection writes ``−Φ x_q``
        into the y-slot so that the read-out ``−(y-slot)`` is the ridge prediction.
        """
        positive_float("penalty", penalty, owner="MesaLayer.from_ridge")
        model = cls(x_dim, y_dim=y_dim, layers=1, heads=1, lam_init=1.0 / penalty)
        E = x_dim + y_dim
        attn = model.blocks[0]
        with torch.no_grad():
            w_q, w_k, w_v = torch.zeros(E, E), torch.zeros(E, E), torch.zeros(E, E)
            w_q[:x_dim, :x_dim] = torch.eye(x_dim)
            w_k[:x_dim, :x_dim] = torch.eye(x_dim)
            w_v[x_dim:, x_dim:] = torch.eye(y_dim)
            attn.qkv.weight.copy_(torch.cat([w_q, w_k, w_v]))
            attn.qkv.bias.zero_()
            attn.proj.weight.copy_(-torch.eye(E))
            attn.proj.bias.zero_()
        return model

    def _probe(self, context: torch.Tensor, probes: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        C = context.shape[1]
        mask = prefix_mask(C, visible, probes_see_themselves=False, device=context.device)
        e = torch.cat([context, probes], dim=1)  # [T, C + P, E]
        for block in self.blocks:
            e = e + block(e, mask)
        return read_y_slot(e[:, C:], self.y_dim)
