"""An LSTM that learns in context, for Bhattamishra et al.'s (ICLR 2024) architecture comparison.

The context tokens are read in linearly and run through a stack of LSTM cells. A probe ``[x, 0]``
that sees the first n context tokens takes one more step of each layer from that layer's state after
n tokens, so every support prefix and every support size comes out of one pass over the context:
exact, and no more costly than reading the support once (the probes add a single batched step).
"""

from __future__ import annotations

import torch
from torch import nn

from metaopt.checks import positive_int
from metaopt.learners.base import Example
from metaopt.learners.incontext.prefix import PrefixLearner
from metaopt.tasks.regression import LinearRegression


class LSTMLearner(PrefixLearner):
    """Stacked LSTM over in-context tokens; predicts each label (or binary logit) with a linear read-out.

    Args:
        x_dim, y_dim: input and label dimensions.
        hidden: LSTM width.
        layers: number of stacked LSTM layers.
        token_format: ``"interleaved"`` (default, as in Bhattamishra et al.) or ``"concatenated"``.
    """

    kinds = ("regression", "binary")

    @classmethod
    def example(cls) -> Example:
        return Example(cls(3, hidden=8, layers=1), LinearRegression(dim=3))

    def __init__(
        self, x_dim: int, y_dim: int = 1, hidden: int = 64, layers: int = 2, token_format: str = "interleaved"
    ) -> None:
        super().__init__(x_dim, y_dim, token_format)
        for name, value in (("hidden", hidden), ("layers", layers)):
            positive_int(name, value, owner="LSTMLearner")
        self.read_in = nn.Linear(x_dim + y_dim, hidden)
        self.cells = nn.ModuleList(nn.LSTMCell(hidden, hidden) for _ in range(layers))
        self.read_out = nn.Linear(hidden, y_dim)

    def _probe(self, context: torch.Tensor, probes: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        T, C, _ = context.shape
        P = probes.shape[1]
        seq, probe = self.read_in(context), self.read_in(probes)  # [T, C, H], [T, P, H]
        hidden = seq.shape[-1]
        for cell in self.cells:
            h = c = seq.new_zeros(T, hidden)
            states_h, states_c = [h], [c]  # state after n tokens, n = 0..C
            for t in range(C):  # the recurrence is sequential; all tasks step at once
                h, c = cell(seq[:, t], (h, c))
                states_h.append(h)
                states_c.append(c)
            all_h, all_c = torch.stack(states_h, dim=1), torch.stack(states_c, dim=1)  # [T, C + 1, H]
            # each probe steps once from the state after the context tokens it may see
            h0 = all_h[:, visible].reshape(T * P, hidden)
            c0 = all_c[:, visible].reshape(T * P, hidden)
            probe = cell(probe.reshape(T * P, hidden), (h0, c0))[0].view(T, P, hidden)
            seq = all_h[:, 1:]
        return self.read_out(probe)
