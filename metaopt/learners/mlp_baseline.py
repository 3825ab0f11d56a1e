"""A small MLP trained from scratch on each task's support set by Adam (Garg et al.'s "2-layer NN, GD").

The per-task weights live in a dict of tensors with the task dimension first and the network runs
as batched matrix products, so one backward pass of the summed task losses gives every task its own
gradient (tasks share no weights) and Adam's elementwise update trains all tasks at once. Measured on
CPU, this is ~100× faster per step than ``torch.func.vmap(torch.func.grad(...))`` over
``functional_call`` for networks this small (0.4 ms vs 40 ms for 16 tasks, hidden 32).
"""

from __future__ import annotations

import math

import torch

from metaopt.checks import positive_float, positive_int
from metaopt.episodes import Episode
from metaopt.learners.base import Example, Learner
from optimizers import adam, apply_updates

Params = dict[str, torch.Tensor]


def mlp_apply(params: Params, x: torch.Tensor) -> torch.Tensor:
    """relu(x W1 + b1) W2 + b2 for every task: ``x`` ``[T, N, D]`` -> ``[T, N, M]``."""
    hidden = torch.baddbmm(params["b1"], x, params["w1"]).relu()
    return torch.baddbmm(params["b2"], hidden, params["w2"])


class MLPBaseline(Learner):
    """Fits d → ``hidden`` → out ReLU networks by ``steps`` of full-batch Adam on each task's support MSE.

    Adam (Kingma & Ba): m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², θ ← θ − lr · m̂ / (√v̂ + ε), with
    bias-corrected m̂, v̂. The initialisation is PyTorch's default for ``nn.Linear``, drawn from a
    generator seeded with ``seed`` so predictions are reproducible. An empty support predicts 0.
    """

    kinds = ("regression",)
    capabilities = frozenset()  # its forward pass runs autograd itself, which torch.func cannot differentiate

    @classmethod
    def example(cls) -> Example:
        return Example(cls(hidden=8, steps=5))

    def __init__(self, hidden: int = 100, steps: int = 500, lr: float = 5e-3, seed: int = 0) -> None:
        super().__init__()
        owner = type(self).__name__
        self.hidden, self.steps = positive_int("hidden", hidden, owner=owner), positive_int("steps", steps, owner=owner)
        self.lr, self.seed = positive_float("lr", lr, owner=owner), seed
        self.betas, self.eps = (0.9, 0.999), 1e-8

    def init_params(self, num_tasks: int, in_features: int, out_features: int, like: torch.Tensor) -> Params:
        """Independent ``nn.Linear``-style initialisations U(−1/√fan_in, 1/√fan_in), ``[T, ...]`` each."""
        generator = torch.Generator().manual_seed(self.seed)
        shapes = {  # name: (shape, fan_in)
            "w1": ((in_features, self.hidden), in_features), "b1": ((1, self.hidden), in_features),
            "w2": ((self.hidden, out_features), self.hidden), "b2": ((1, out_features), self.hidden),
        }
        params = {}
        for name, (shape, fan_in) in shapes.items():
            uniform = torch.rand((num_tasks, *shape), generator=generator).to(like.dtype)  # same draws in any dtype
            params[name] = ((2 * uniform - 1) / math.sqrt(fan_in)).to(like.device)
        return params

    def task_losses(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each task's training loss ``[T]`` (mean squared error); subclasses change the loss here."""
        return (outputs - y).pow(2).mean((1, 2))

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> tuple[Params, torch.Tensor]:
        """Per-task weights after training on ``x`` ``[T, S, D]``, ``y`` ``[T, S, M]``, and the losses ``[steps, T]``."""
        params = self.init_params(x.shape[0], x.shape[-1], y.shape[-1], x)
        optimizer = adam(self.lr, *self.betas, self.eps)
        state, losses = optimizer.init(params), []
        with torch.enable_grad():  # compare predicts under no_grad; the inner loop still needs gradients
            for _ in range(self.steps):
                params = {k: v.detach().requires_grad_() for k, v in params.items()}
                task_losses = self.task_losses(mlp_apply(params, x), y)  # [T]
                grads = dict(zip(params, torch.autograd.grad(task_losses.sum(), list(params.values()))))
                losses.append(task_losses.detach())
                with torch.no_grad():
                    updates, state = optimizer.update(grads, state, params)
                    params = apply_updates(params, updates)
        return params, torch.stack(losses)

    def forward(self, episode: Episode) -> torch.Tensor:
        self.check_episode(episode)
        if episode.num_support == 0:
            return episode.y_query.new_zeros(episode.y_query.shape)
        xs, ys = episode.x_support.flatten(2).detach(), episode.y_support.flatten(2).detach()
        params, _ = self.fit(xs, ys)
        return mlp_apply(params, episode.x_query.flatten(2)).reshape(episode.y_query.shape)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, steps={self.steps}, lr={self.lr}"


__all__ = ["MLPBaseline", "mlp_apply"]
