"""Explicit baselines for Boolean families (Bhattamishra et al., ICLR 2024), batched over tasks.

Every learner reads support inputs ``[T, S, n]`` in {±1} and labels in {0, 1} and returns logits
``[T, Q, 1]`` for the queries (a positive logit predicts label 1, as ``metrics.Accuracy`` counts).
None has meta-parameters: they are evaluated, never meta-trained. ``BooleanAveraging`` and
``BooleanNearestNeighbours`` are the Boolean counterparts of the regression ``Averaging`` and
``NearestNeighbours`` (±1 labels, Hamming/cosine distance, logits out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metaopt.checks import one_of, positive_int
from metaopt.episodes import Episode
from metaopt.learners.base import Learner
from metaopt.learners.mlp_baseline import MLPBaseline

CONFIDENCE = 0.95
"""Probability behind a hard decision: its logit is ±log(0.95 / 0.05) ≈ ±2.94."""

NN_METRICS = ("hamming", "cosine")
ELIMINATION_TARGETS = ("conjunction", "disjunction")


def probability_to_logit(p: torch.Tensor) -> torch.Tensor:
    """Logits of probabilities clipped to ``[1 − CONFIDENCE, CONFIDENCE]`` (0.5 maps to 0, i.e. label 0)."""
    p = p.clamp(1 - CONFIDENCE, CONFIDENCE)
    return torch.log(p) - torch.log1p(-p)


def decision_to_logit(positive: torch.Tensor) -> torch.Tensor:
    """Logits ``[..., 1]`` of hard 0/1 decisions."""
    return probability_to_logit(positive.float()).unsqueeze(-1)


class BooleanBaseline(Learner):
    """A Boolean learner: ``predict(x_support, y_support [T, S], x_query) -> logits [T, Q]``."""

    kinds = ("binary",)

    def predict(self, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, episode: Episode) -> torch.Tensor:
        self.check_episode(episode)
        xs, xq = episode.x_support.flatten(2), episode.x_query.flatten(2)
        return self.predict(xs, episode.y_support[..., 0], xq).unsqueeze(-1)


class Null(BooleanBaseline):
    """The majority label of the support set (ties and an empty support predict 0): the null baseline."""

    def predict(self, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
        p = ys.mean(1, keepdim=True) if ys.shape[1] else ys.new_full((ys.shape[0], 1), 0.5)
        return probability_to_logit(p).expand(-1, xq.shape[1])


class BooleanAveraging(BooleanBaseline):
    """ŵ = mean_i (2 y_i − 1) x_i, logit = ⟨ŵ, x_q⟩ (Garg et al.'s averaging estimator on ±1 labels)."""

    def predict(self, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
        if xs.shape[1] == 0:
            return xq.new_zeros(xq.shape[:2])
        w = torch.einsum("tsd,ts->td", xs, 2 * ys - 1) / xs.shape[1]
        return torch.einsum("tqd,td->tq", xq, w)


class BooleanNearestNeighbours(BooleanBaseline):
    """Majority label of the ``k`` nearest support points (the earliest ones on ties).

    ``metric="hamming"`` counts differing coordinates; ``"cosine"`` ranks by cosine similarity (the same
    order on ±1 inputs of one length, kept for real-valued inputs). Fewer than k points: all of them.
    """

    def __init__(self, k: int = 1, metric: str = "hamming") -> None:
        super().__init__()
        self.k = positive_int("k", k, owner="BooleanNearestNeighbours")
        self.metric = one_of("metric", metric, NN_METRICS, owner="BooleanNearestNeighbours")

    def distances(self, xs: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
        """Distances ``[T, Q, S]`` from each query to each support point."""
        if self.metric == "hamming":
            return (xq[:, :, None, :] != xs[:, None, :, :]).sum(-1).float()
        return -F.cosine_similarity(xq[:, :, None, :], xs[:, None, :, :], dim=-1, eps=1e-12)

    def predict(self, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
        if xs.shape[1] == 0:
            return xq.new_zeros(xq.shape[:2])
        order = self.distances(xs, xq).argsort(dim=-1, stable=True)[..., : self.k]  # [T, Q, k]
        votes = ys[:, None, :].expand(-1, xq.shape[1], -1).gather(2, order)
        return probability_to_logit(votes.mean(-1))

    def extra_repr(self) -> str:
        return f"k={self.k}, metric={self.metric!r}"


class Elimination(BooleanBaseline):
    """The PAC elimination learner for conjunctions (Valiant 1984) and, by duality, disjunctions.

    Conjunctions: start from all 2n literals and drop every literal a positive example falsifies;
    predict 1 iff the query satisfies every literal left (no positives seen: always 0). Disjunctions:
    the same on the negative examples, since NOT(l_1 ∨ … ∨ l_m) = ¬l_1 ∧ … ∧ ¬l_m.
    """

    def __init__(self, target: str = "conjunction") -> None:
        super().__init__()
        self.target = one_of("target", target, ELIMINATION_TARGETS, owner="Elimination")

    def hypothesis(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """Surviving literals ``[T, 2, n]`` (bool): ``[:, 0]`` positive x_i, ``[:, 1]`` negated ¬x_i.

        For a disjunction target these are the literals of the learnt disjunction.
        """
        teach = ys > 0.5 if self.target == "conjunction" else ys < 0.5  # the examples that eliminate
        keep_positive = ~((xs < 0) & teach[..., None]).any(1)  # no eliminating example has x_i = −1
        keep_negated = ~((xs > 0) & teach[..., None]).any(1)
        literals = torch.stack([keep_positive, keep_negated], dim=1)
        if self.target == "disjunction":  # the conjunction of ¬f has the negated literals of f
            literals = literals.flip(1)
        return literals

    def predict(self, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
        literals = self.hypothesis(xs, ys)
        true_literal = torch.stack([xq > 0, xq < 0], dim=2)  # [T, Q, 2, n]
        if self.target == "conjunction":
            positive = (true_literal | ~literals[:, None]).all(-1).all(-1)
        else:
            positive = (true_literal & literals[:, None]).any(-1).any(-1)
        return probability_to_logit(positive.to(xq.dtype))

    def extra_repr(self) -> str:
        return f"target={self.target!r}"


def gf2_solve(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``a s = b`` over GF(2) for every task by Gauss–Jordan elimination.

    Args:
        a: ``[T, S, n]`` bool coefficient rows; b: ``[T, S]`` bool right-hand sides.
    Returns:
        ``s`` ``[T, n]`` bool (free variables set to 0) and the rank ``[T]``. One loop over the n
        columns, each step vectorised over tasks (every task keeps its own pivot row).
    """
    num_tasks, num_rows, n = a.shape
    if num_rows == 0:
        return a.new_zeros(num_tasks, n), torch.zeros(num_tasks, dtype=torch.long, device=a.device)
    m = torch.cat([a, b[..., None]], dim=2)  # augmented [T, S, n + 1]
    rows = torch.arange(num_rows, device=a.device)
    rank = torch.zeros(num_tasks, dtype=torch.long, device=a.device)
    pivot_of_row = torch.full((num_tasks, num_rows), -1, device=a.device)
    tasks = torch.arange(num_tasks, device=a.device)
    for c in range(n):
        candidate = m[:, :, c] & (rows[None] >= rank[:, None])
        found = candidate.any(1)
        pivot = torch.where(found, candidate.to(torch.uint8).argmax(1), rank)  # swap target row `rank`
        target = rank.clamp(max=num_rows - 1)
        perm = rows.repeat(num_tasks, 1)
        perm[tasks, target] = pivot.clamp(max=num_rows - 1)
        perm[tasks, pivot.clamp(max=num_rows - 1)] = target
        m = m.gather(1, perm[..., None].expand_as(m))
        pivot_row = m[tasks, target]  # [T, n + 1]
        clear = m[:, :, c] & (rows[None] != target[:, None]) & found[:, None]
        m = m ^ (clear[..., None] & pivot_row[:, None, :])
        pivot_of_row[tasks[found], target[found]] = c
        rank = rank + found.long()
    s = torch.zeros(num_tasks, n + 1, dtype=torch.bool, device=a.device)
    has_pivot = pivot_of_row >= 0
    columns = pivot_of_row.clamp(min=0)
    s.scatter_(1, torch.where(has_pivot, columns, n), m[..., n] & has_pivot)  # free rows land in column n
    return s[:, :n], rank


class GF2Elimination(BooleanBaseline):
    """Learns parities exactly: Gaussian elimination over GF(2) on the support, bit i being [x_i > 0].

    Once the support spans the relevant bits every query is labelled correctly; an under-determined
    system sets the free variables to 0. It is the explicit learner transformers fail to be.
    """

    def fit(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """The recovered subset ``[T, n]`` (bool)."""
        return gf2_solve(xs > 0, ys > 0.5)[0]

    def predict(self, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
        subset = self.fit(xs, ys).to(xq.dtype)
        ones = torch.einsum("tqd,td->tq", (xq > 0).to(xq.dtype), subset)
        return probability_to_logit(ones.remainder(2))


class BooleanMLP(MLPBaseline):
    """``MLPBaseline`` trained with BCE on {0, 1} labels: Bhattamishra et al.'s "FFN trained by GD per prefix".

    A d → ``hidden`` → 1 ReLU network per task, fitted from a seeded initialisation by ``steps`` of
    full-batch Adam on the support BCE, all tasks at once (batched matrix products, one backward pass
    of the summed task losses, as in ``MLPBaseline``); outputs logits.
    """

    kinds = ("binary",)

    def __init__(self, hidden: int = 64, steps: int = 200, lr: float = 0.01, seed: int = 0) -> None:
        super().__init__(hidden=hidden, steps=steps, lr=lr, seed=seed)

    def task_losses(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each task's support BCE on logits ``[T]``."""
        return F.binary_cross_entropy_with_logits(outputs, y, reduction="none").mean((1, 2))


__all__ = [
    "BooleanBaseline", "Null", "BooleanAveraging", "BooleanNearestNeighbours", "Elimination", "GF2Elimination", "BooleanMLP",
    "gf2_solve", "probability_to_logit",
]
