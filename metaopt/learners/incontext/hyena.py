"""An attention-free in-context learner: gated implicit long convolutions (Hyena, Poli et al. 2023).

Used for Bhattamishra et al.'s (ICLR 2024) comparison of transformers with attention-free sequence
models. Each block mixes tokens with an order-2 Hyena operator,

    a, b, v = split(W_in u),   y_t = a_t ⊙ Σ_{s≤t} h_{t−s} ⊙ (b_s ⊙ v_s),   out = W_out y,

where the per-channel filter h is *implicit*: a small MLP of sinusoidal features of the lag, times
an exponential decay window (a different rate per channel). The causal convolution runs by FFT in
O(L log L). Then a GELU MLP, each with a pre-norm residual connection, as in a transformer block.

Probes (queries and per-prefix predictions): the convolution is linear, so a probe at position n
(having seen the first n context tokens) gets ``Σ_{s<n} h_{n−s} z_s + h_0 z_probe`` — the strictly
causal convolution of the context evaluated at n plus its own lag-0 term. One FFT over the context
therefore serves every probe exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from metaopt.checks import positive_int
from metaopt.learners.base import Example
from metaopt.learners.incontext.prefix import PrefixLearner
from metaopt.learners.mlp import mlp
from metaopt.tasks.regression import LinearRegression


def causal_conv(z: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """``out_t = Σ_{s≤t} taps_{t−s} z_s`` by FFT: ``z [B, L, C]``, ``taps [L, C]`` -> ``[B, L, C]``."""
    L = z.shape[1]
    n = 2 * L  # zero-padding to 2L makes the circular convolution a linear one
    spectrum = torch.fft.rfft(z, n=n, dim=1) * torch.fft.rfft(taps, n=n, dim=0)
    return torch.fft.irfft(spectrum, n=n, dim=1)[:, :L]


class ImplicitFilter(nn.Module):
    """Per-channel long-convolution taps ``h_t = MLP(features(t)) · exp(−α_c t / max_len)``."""

    def __init__(self, width: int, max_len: int, hidden: int = 32, frequencies: int = 8) -> None:
        super().__init__()
        self.max_len = max_len
        self.register_buffer("freqs", torch.arange(1, frequencies + 1, dtype=torch.float32), persistent=False)
        # decay rates spread over channels: some filters are short, some span the whole sequence
        self.register_buffer("rates", torch.logspace(math.log10(0.5), math.log10(30.0), width), persistent=False)
        self.mlp = mlp(1 + 2 * frequencies, [hidden, hidden], width, activation=nn.SiLU)

    def forward(self, length: int) -> torch.Tensor:
        t = torch.arange(length, device=self.freqs.device, dtype=self.freqs.dtype)[:, None] / self.max_len  # [L, 1]
        angle = 2 * math.pi * t * self.freqs  # [L, F]
        features = torch.cat([t, angle.sin(), angle.cos()], dim=1)
        return self.mlp(features) * torch.exp(-self.rates * t)  # [L, width]


class HyenaOperator(nn.Module):
    """Order-2 Hyena token mixer over a causal context stream and its probes."""

    def __init__(self, width: int, max_len: int) -> None:
        super().__init__()
        self.in_proj = nn.Linear(width, 3 * width)
        self.filter = ImplicitFilter(width, max_len)
        self.out_proj = nn.Linear(width, width)

    def forward(
        self, context: torch.Tensor, probes: torch.Tensor, visible: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, C, W = context.shape
        a, b, v = self.in_proj(context).chunk(3, dim=-1)  # 3 x [B, C, W]
        a_p, b_p, v_p = self.in_proj(probes).chunk(3, dim=-1)  # 3 x [B, P, W]
        z, z_p = b * v, b_p * v_p
        taps = self.filter(C + 1)  # [C + 1, W], lags 0..C
        # strictly causal part at positions 0..C (position C sees the whole context)
        strict = causal_conv(F.pad(z, (0, 0, 0, 1)), F.pad(taps[1:], (0, 0, 1, 0)))  # [B, C + 1, W]
        y = a * (strict[:, :C] + taps[0] * z)
        y_p = a_p * (strict[:, visible] + taps[0] * z_p)
        return self.out_proj(y), self.out_proj(y_p)


class HyenaBlock(nn.Module):
    """Pre-norm residual block: Hyena operator, then a GELU MLP (context and probes alike)."""

    def __init__(self, width: int, max_len: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.mixer = HyenaOperator(width, max_len)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = mlp(width, [4 * width], width, activation=nn.GELU)

    def forward(
        self, context: torch.Tensor, probes: torch.Tensor, visible: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mixed, mixed_p = self.mixer(self.ln_1(context), self.ln_1(probes), visible)
        context, probes = context + mixed, probes + mixed_p
        return context + self.mlp(self.ln_2(context)), probes + self.mlp(self.ln_2(probes))


class HyenaLearner(PrefixLearner):
    """A stack of Hyena blocks over in-context tokens, linear read-in and read-out; causal and attention-free.

    Args:
        x_dim, y_dim: input and label dimensions.
        max_support: the largest support size (sets the filter's time scale; longer supports are refused).
        width: channel width.
        layers: number of blocks.
        token_format: ``"interleaved"`` (default) or ``"concatenated"``.
    """

    kinds = ("regression", "binary")

    @classmethod
    def example(cls) -> Example:
        return Example(cls(3, max_support=5, width=8, layers=1), LinearRegression(dim=3))

    def __init__(
        self,
        x_dim: int,
        max_support: int,
        y_dim: int = 1,
        width: int = 64,
        layers: int = 2,
        token_format: str = "interleaved",
    ) -> None:
        super().__init__(x_dim, y_dim, token_format, max_support=max_support)
        for name, value in (("width", width), ("layers", layers)):
            positive_int(name, value, owner="HyenaLearner")
        max_len = 2 * max_support + 1
        self.read_in = nn.Linear(x_dim + y_dim, width)
        self.blocks = nn.ModuleList(HyenaBlock(width, max_len) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.read_out = nn.Linear(width, y_dim)

    def _probe(self, context: torch.Tensor, probes: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        h, h_p = self.read_in(context), self.read_in(probes)
        for block in self.blocks:
            h, h_p = block(h, h_p, visible)
        return self.read_out(self.ln_f(h_p))
