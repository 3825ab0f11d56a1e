"""The non-linear and sparse function classes of Garg et al. 2022, "What Can Transformers Learn In-Context?".

Inputs are x ~ N(0, I_d) as in the paper; every sampler draws all tasks and examples in a few
batched tensor operations (no loop over tasks or examples).
"""

from __future__ import annotations

import math

import torch

from metaopt.checks import positive_int
from metaopt.episodes import Episode
from metaopt.tasks.base import TaskFamily


def split_episode(x: torch.Tensor, y: torch.Tensor, support: int, info: dict[str, torch.Tensor]) -> Episode:
    """A regression Episode from inputs ``[T, S + Q, *x]`` and labels ``[T, S + Q, *y]``: the first S are support."""
    return Episode(
        x_support=x[:, :support], y_support=y[:, :support], x_query=x[:, support:], y_query=y[:, support:],
        kind="regression", info=info,
    )


class SparseLinear(TaskFamily):
    """y = <w, x> with w ~ N(0, I_d) restricted to ``nonzeros`` coordinates chosen uniformly per task.

    ``info``: ``w`` ``[T, d]`` (zeros off the support) and ``mask`` ``[T, d]`` (True on the non-zeros).
    The zero predictor's squared error is ``nonzeros``, Garg et al.'s normalisation for sparse functions.
    """

    kind = "regression"
    curriculum_dims = True

    @classmethod
    def example(cls) -> "SparseLinear":
        return cls(dim=4, nonzeros=2)

    def __init__(self, dim: int, nonzeros: int = 3) -> None:
        self.dim = positive_int("dim", dim, owner="SparseLinear")
        self.nonzeros = positive_int("nonzeros", nonzeros, owner="SparseLinear")
        if nonzeros > dim:
            raise ValueError(f"SparseLinear: nonzeros must be <= dim={dim}; got nonzeros={nonzeros!r}")

    @property
    def error_scale(self) -> float:
        return float(self.nonzeros)

    @property
    def task_values(self) -> int:
        return 3 * self.dim

    @property
    def example_values(self) -> int:
        return 2 * (self.dim + 1)

    def _sample(self, num_tasks: int, support: int, query: int, generator: torch.Generator) -> Episode:
        d = self.dim
        w = torch.randn(num_tasks, d, generator=generator)
        # a uniformly random subset of size s per task: the s smallest of d i.i.d. uniforms
        ranks = torch.rand(num_tasks, d, generator=generator).argsort(dim=1).argsort(dim=1)
        mask = ranks < self.nonzeros
        w = w * mask
        x = self.mask_inputs(torch.randn(num_tasks, support + query, d, generator=generator))
        y = torch.einsum("tnd,td->tn", x, w).unsqueeze(-1)
        return split_episode(x, y, support, {"w": w, "mask": mask})


class DecisionTree(TaskFamily):
    """A random complete binary tree of ``depth`` splits per task, evaluated on x ~ N(0, I_d).

    Node i (heap order: children 2i+1, 2i+2) tests ``x[feature[i]] > 0`` and goes right when true; a
    feature is drawn uniformly per internal node and the 2^depth leaf values are N(0, 1), as in
    Garg et al. ``info``: ``features`` ``[T, 2^depth − 1]`` (long) and ``leaves`` ``[T, 2^depth]``.
    """

    kind = "regression"
    curriculum_dims = True

    @classmethod
    def example(cls) -> "DecisionTree":
        return cls(dim=3, depth=2)

    def __init__(self, dim: int, depth: int = 4) -> None:
        self.dim = positive_int("dim", dim, owner="DecisionTree")
        self.depth = positive_int("depth", depth, owner="DecisionTree")
        if depth > 20:
            raise ValueError(f"DecisionTree: depth must be <= 20 (2^depth leaves per task); got {depth!r}")

    @property
    def error_scale(self) -> float:
        return 1.0

    @property
    def task_values(self) -> int:
        return 2 ** (self.depth + 1)

    @property
    def example_values(self) -> int:
        return self.dim + 4

    def _sample(self, num_tasks: int, support: int, query: int, generator: torch.Generator) -> Episode:
        internal = 2**self.depth - 1
        features = torch.randint(self.dim, (num_tasks, internal), generator=generator)
        leaves = torch.randn(num_tasks, internal + 1, generator=generator)
        x = self.mask_inputs(torch.randn(num_tasks, support + query, self.dim, generator=generator))
        node = torch.zeros(num_tasks, support + query, dtype=torch.long)
        for _ in range(self.depth):  # one step down the tree per level, every task and example at once
            feature = features.gather(1, node)  # [T, N]
            right = x.gather(2, feature.unsqueeze(-1)).squeeze(-1) > 0
            node = 2 * node + 1 + right.long()
        y = leaves.gather(1, node - internal).unsqueeze(-1)
        return split_episode(x, y, support, {"features": features, "leaves": leaves})


class ReluNet(TaskFamily):
    """A 2-layer ReLU network per task: y = sqrt(2 / hidden) · Σ_j a_j relu(<w_j, x>), all weights N(0, 1).

    The sqrt(2 / hidden) factor (Garg et al.) makes E[y²] = d, so ``error_scale`` is d as for linear
    functions. ``info``: ``w1`` ``[T, d, hidden]`` and ``w2`` ``[T, hidden]``.
    """

    kind = "regression"
    curriculum_dims = True

    @classmethod
    def example(cls) -> "ReluNet":
        return cls(dim=3, hidden=8)

    def __init__(self, dim: int, hidden: int = 100) -> None:
        self.dim = positive_int("dim", dim, owner="ReluNet")
        self.hidden = positive_int("hidden", hidden, owner="ReluNet")

    @property
    def error_scale(self) -> float:
        return float(self.dim)

    @property
    def task_values(self) -> int:
        return (self.dim + 1) * self.hidden

    @property
    def example_values(self) -> int:
        return self.dim + self.hidden + 1

    def _sample(self, num_tasks: int, support: int, query: int, generator: torch.Generator) -> Episode:
        w1 = torch.randn(num_tasks, self.dim, self.hidden, generator=generator)
        w2 = torch.randn(num_tasks, self.hidden, generator=generator)
        x = self.mask_inputs(torch.randn(num_tasks, support + query, self.dim, generator=generator))
        hidden = (x @ w1).relu_()  # [T, N, hidden]
        y = (hidden @ w2.unsqueeze(-1)) * math.sqrt(2.0 / self.hidden)
        return split_episode(x, y, support, {"w1": w1, "w2": w2})


__all__ = ["SparseLinear", "DecisionTree", "ReluNet", "split_episode"]
