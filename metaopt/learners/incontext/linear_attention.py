"""Linear self-attention that learns in context by gradient descent (von Oswald et al., ICML 2023).

A stack of linear self-attention (LSA) layers, no softmax, no mask, no MLP. Keys and values come from
the context tokens only; every token (context and query) is updated:

    e ← e + Σ_h P_h V_h E_C (K_h E_C)ᵀ Q_h e / N  =  e + Σ_h (P_h V_h) C (K_hᵀ Q_h) e,   C = E_Cᵀ E_C / N

where ``E_C`` holds the context tokens (one per row) and ``C`` is their second-moment matrix. The
prediction for a query ``[x_q, 0]`` is ``−(y-slot)`` after the last layer.

Normalisation (our convention): ``N`` is the number of support *examples* k in use (in both token
formats), so the one-step construction ``from_gd`` equals ``GradientDescent(steps=1, lr)`` — whose
update is ``w = lr · (1/k) Xᵀ y`` — at every support size k. (von Oswald et al. fold a fixed 1/N into
P; Vladymyrov et al. write the same layer with the merged products ``W_PV = P V`` and ``W_KQ = Kᵀ Q``.)

Parameterisations (Vladymyrov et al., NeurIPS 2024), per layer and head:
  - ``"full"``: ``W_PV`` and ``W_KQ`` full ``(x + y) × (x + y)`` matrices.
  - ``"diag"``: four scalars; with the blocks of ``C`` (``C_xx = XᵀX/N``, ``C_xy``, ``C_yx``, ``C_yy``)
    ``Δx = ω_xx C_xx x + ω_xy C_xy y`` and ``Δy = ω_yx C_yx x + ω_yy C_yy y``.
  - ``"gdpp"``: ``ω_xx`` and ``ω_yx`` only — GD++: ``x ← (I + ω_xx C_xx) x`` preconditions the inputs,
    ``y ← y + ω_yx C_yx x`` is a GD step on the residuals held in the context y-slots.

Token format: concatenated only. With interleaved tokens no token holds both x_j and y_j, so C is
block-diagonal and, lacking positions, no stack of LSA layers can pair an input with its label (DIAG
and GD++ would predict exactly 0); the setting is refused with that explanation. The causal learners
(``Transformer``, ``MesaLayer``, ``LSTMLearner``, ``HyenaLearner``) take either format.

Per-k predictions: the layer is non-causal over the context, so each support size k needs its own
pass; all sizes run as one batch ``[K · T]`` by zeroing the context tokens beyond k (a zero token
adds nothing to C and stays zero, since the update has no bias) and dividing by k.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from metaopt.checks import one_of, positive_int
from metaopt.episodes import Episode
from metaopt.learners.base import Example, Learner
from metaopt.learners.capabilities import Capability
from metaopt.learners.incontext.tokens import (
    check_support_sizes,
    check_token_format,
    context_length,
    context_tokens,
    episode_arrays,
    query_tokens,
    read_y_slot,
)
from metaopt.tasks.regression import LinearRegression

PARAMETERIZATIONS: tuple[str, ...] = ("full", "diag", "gdpp")
# Which scalars each restricted parameterisation learns, in the order of the blocks below.
_SCALARS = {"diag": ("xx", "xy", "yx", "yy"), "gdpp": ("xx", "yx")}


def _block_masks(names: Sequence[str], x_dim: int, y_dim: int) -> torch.Tensor:
    """0/1 masks ``[n, E, E]`` of the (x|y) × (x|y) blocks named ``xx``, ``xy``, ``yx``, ``yy``."""
    E = x_dim + y_dim
    slots = {"x": slice(0, x_dim), "y": slice(x_dim, E)}
    masks = torch.zeros(len(names), E, E)
    for i, name in enumerate(names):
        masks[i, slots[name[0]], slots[name[1]]] = 1.0
    return masks


class LinearSelfAttention(Learner):
    """von Oswald et al.'s linear self-attention in Vladymyrov et al.'s parameterisations.

    Args:
        x_dim: flattened input dimension d.
        y_dim: label dimension (1 for scalar regression).
        layers: number of LSA layers.
        heads: heads per layer (their contributions add).
        parameterization: ``"full"``, ``"diag"`` or ``"gdpp"`` (see the module docstring).
        token_format: ``"concatenated"`` (von Oswald's ``[x, y]`` tokens); see the module docstring.
        init_std: standard deviation of the initial weights.

    Raises:
        ValueError: on a non-positive size, an unknown parameterisation, or a token format other than
            ``"concatenated"``.
    """

    kinds = ("regression",)
    implicit = True
    capabilities = Learner.capabilities | {Capability.GD_CONSTRUCTION}

    @classmethod
    def example(cls) -> Example:
        return Example(cls(3), LinearRegression(dim=3))

    def __init__(
        self,
        x_dim: int,
        y_dim: int = 1,
        layers: int = 1,
        heads: int = 1,
        parameterization: str = "full",
        token_format: str = "concatenated",
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        for name, value in (("x_dim", x_dim), ("y_dim", y_dim), ("layers", layers), ("heads", heads)):
            positive_int(name, value, owner="LinearSelfAttention")
        one_of("parameterization", parameterization, PARAMETERIZATIONS, owner="LinearSelfAttention")
        self.x_dim, self.y_dim, self.layers, self.heads = x_dim, y_dim, layers, heads
        self.parameterization = parameterization
        self.token_format = check_token_format("LinearSelfAttention", token_format)
        if self.token_format != "concatenated":
            raise ValueError(
                f"LinearSelfAttention: token_format must be 'concatenated'; got {token_format!r}. With interleaved "
                "tokens no token holds both x_j and y_j, and linear self-attention without positions cannot pair "
                "them (its prediction ignores which label goes with which input); use a causal model "
                "(Transformer, MesaLayer, LSTMLearner, HyenaLearner) for interleaved tokens"
            )
        E = x_dim + y_dim
        if parameterization == "full":
            self.pv = nn.Parameter(init_std * torch.randn(layers, heads, E, E))  # W_PV = P V
            self.kq = nn.Parameter(init_std * torch.randn(layers, heads, E, E))  # W_KQ = Kᵀ Q
        else:
            names = _SCALARS[parameterization]
            self.omega = nn.Parameter(init_std * torch.randn(layers, heads, len(names)))
            self.register_buffer("blocks", _block_masks(names, x_dim, y_dim), persistent=False)

    # ------------------------------------------------------------------ constructions
    @classmethod
    def from_gd(
        cls, x_dim: int, lr: float, *, y_dim: int = 1, layers: int = 1, heads: int = 1, parameterization: str = "full"
    ) -> "LinearSelfAttention":
        """The exact construction of ``layers`` GD steps from w = 0 (von Oswald et al., Prop. 1).

        Equals ``GradientDescent(steps=layers, lr=lr)`` (update ``w ← w − lr (1/k) Xᵀ(Xw − y)``): each
        layer takes one step on the residuals held in the context y-slots. Weights: ``W_KQ`` projects
        onto x, ``W_PV`` is ``−lr`` on the y-slot (``ω_yx = −lr`` in DIAG/GD++); extra heads are zero.
        """
        return cls.from_gdpp(x_dim, lr, 0.0, y_dim=y_dim, layers=layers, heads=heads, parameterization=parameterization)

    @classmethod
    def from_gdpp(
        cls,
        x_dim: int,
        lr: float,
        gamma: float,
        *,
        y_dim: int = 1,
        layers: int = 1,
        heads: int = 1,
        parameterization: str = "gdpp",
    ) -> "LinearSelfAttention":
        """von Oswald et al.'s GD++: each layer preconditions ``x ← (I − γ C_xx) x`` and takes a GD step.

        All tokens are updated at once from the layer's input, so layer l does
        ``pred += lr x_qᵀ g``, ``r ← r − lr X g`` with ``g = Xᵀ r / k``, then ``X ← X (I − γ XᵀX / k)``
        (queries likewise). ``gamma = 0`` is plain GD (``from_gd``).
        """
        model = cls(x_dim, y_dim=y_dim, layers=layers, heads=heads, parameterization=parameterization)
        E = x_dim + y_dim
        with torch.no_grad():
            if parameterization == "full":
                model.pv.zero_()
                model.kq.zero_()
                model.kq[:, 0, :x_dim, :x_dim] = torch.eye(x_dim)
                model.pv[:, 0, :x_dim, :x_dim] = -gamma * torch.eye(x_dim)
                model.pv[:, 0, x_dim:E, x_dim:E] = -lr * torch.eye(y_dim)
            else:
                names = _SCALARS[parameterization]
                model.omega.zero_()
                model.omega[:, 0, names.index("xx")] = -gamma
                model.omega[:, 0, names.index("yx")] = -lr
        return model

    @property
    def gd_steps(self) -> int:
        """The GD steps of this architecture's exact construction (``Capability.GD_CONSTRUCTION``): its layers."""
        return self.layers

    def gd_construction(self, lr: float) -> "LinearSelfAttention":
        """``from_gd(lr)`` with this model's layers, heads and parameterisation, on its device and dtype."""
        construction = self.from_gd(self.x_dim, lr, y_dim=self.y_dim, layers=self.layers, heads=self.heads,
                                    parameterization=self.parameterization)
        reference = next(self.parameters())
        return construction.to(device=reference.device, dtype=reference.dtype)

    # ------------------------------------------------------------------ layers
    def update_matrix(self, layer: int, second_moment: torch.Tensor) -> torch.Tensor:
        """The matrix ``M`` of layer ``layer``'s update ``e ← e + M e``, from ``C`` ``[B, E, E]``."""
        if self.parameterization == "full":
            # Σ_h W_PV,h C W_KQ,h: [H, E, E] x [B, E, E] x [H, E, E] -> [B, E, E]
            return torch.einsum("hij,bjk,hkl->bil", self.pv[layer], second_moment, self.kq[layer])
        weights = torch.einsum("hn,nij->ij", self.omega[layer], self.blocks)  # Σ_h Σ_n ω_hn · block_n
        return weights * second_moment

    def _run(self, episode: Episode, support_sizes: Sequence[int]) -> torch.Tensor:
        """Query predictions ``[K, T, Q, y]`` from the first k support examples, for each k."""
        self.check_episode(episode)
        xs, ys, xq = episode_arrays("LinearSelfAttention", episode, self.x_dim, self.y_dim)
        T, S, _ = xs.shape
        K = len(support_sizes)
        context = context_tokens(xs, ys, self.token_format)  # [T, C, E]
        C = context.shape[1]
        ks = torch.as_tensor(list(support_sizes), device=xs.device)
        keep = torch.arange(C, device=xs.device)[None, :] < torch.as_tensor(
            [context_length(k, self.token_format) for k in support_sizes], device=xs.device
        )[:, None]  # [K, C]
        context = (context[None] * keep[:, None, :, None]).flatten(0, 1)  # [K * T, C, E]
        queries = query_tokens(xq, self.y_dim).repeat(K, 1, 1)  # [K * T, Q, E]
        scale = 1.0 / ks.clamp_min(1).to(xs.dtype).repeat_interleave(T)  # 1/N per row, [K * T]
        e = torch.cat([context, queries], dim=1)
        for layer in range(self.layers):
            c_tok = e[:, :C]
            second_moment = c_tok.transpose(1, 2) @ c_tok * scale[:, None, None]  # [K * T, E, E]
            e = e + e @ self.update_matrix(layer, second_moment).transpose(1, 2)
        return read_y_slot(e[:, C:], self.y_dim).reshape(K, T, -1, self.y_dim)

    def forward(self, episode: Episode) -> torch.Tensor:
        return self._run(episode, [episode.num_support])[0]

    def predict_by_support_size(self, episode: Episode, support_sizes: Sequence[int]) -> torch.Tensor:
        return self._run(episode, check_support_sizes("LinearSelfAttention", support_sizes, episode.num_support))

    def extra_repr(self) -> str:
        return (
            f"x_dim={self.x_dim}, y_dim={self.y_dim}, layers={self.layers}, heads={self.heads}, "
            f"parameterization={self.parameterization!r}, token_format={self.token_format!r}"
        )
