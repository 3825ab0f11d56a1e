"""The MAML family as configurations of :class:`~metaopt.learners.inner_loop.InnerLoop`.

- :class:`MAML` (Finn et al. 2017): the initialisation θ is meta-learned; each task starts from θ and takes
  ``steps`` SGD steps ``θ_τ ← θ_τ − α ∇L_τ^support(θ_τ)``; the meta-objective is ``Σ_τ L_τ^query(θ_τ)``.
- :class:`FOMAML`: the same with the inner gradients treated as constants (first-order MAML, Finn et al. §5.2).
- :class:`MetaSGD` (Li et al. 2017): θ and a step size per parameter entry ``α`` are meta-learned,
  ``θ ← θ − α ⊙ ∇L_τ^support``.
- :class:`ANIL` (Raghu et al. 2020, "Rapid Learning or Feature Reuse?"): only the head is adapted in the inner
  loop; the body is meta-learned and shared by every task.
- :class:`FixedInitGD`: gradient descent on a network from a fixed zero or random initialisation (no meta-
  parameters): the baseline that shows what meta-learning the initialisation buys.

Networks come from a plain spec so that recipes can name them: ``{"kind": "mlp", "in_features": 1,
"hidden": [40, 40], "out_features": 1}`` or ``{"kind": "conv4", "in_channels": 1, "channels": 32,
"out_features": 5}`` (:func:`build_network`); an ``nn.Module`` is used as given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from metaopt.checks import positive_float
from metaopt.learners.base import Example
from metaopt.learners.inner_loop import InnerLoop
from metaopt.learners.mlp import mlp
from metaopt.tasks.regression import LinearRegression
from optimizers import EmptyState, GradientTransformation, Params, sgd

NETWORKS = ("mlp", "conv4")
NetworkSpec = nn.Module | Mapping[str, Any]


def conv4(
    in_channels: int = 1, channels: int = 32, out_features: int | None = 5, image_size: int = 28
) -> nn.Sequential:
    """Finn et al.'s few-shot CNN: 4 × (3×3 conv, batch norm, ReLU, 2×2 max-pool), flatten, linear head.

    Batch norm always uses the statistics of the batch it sees (``track_running_stats=False``, as in MAML's
    code), so it has no buffers to update inside the inner loop. The head reads ``channels · s²`` features,
    ``s`` being ``image_size`` halved four times (1 for 28×28). ``out_features=None`` drops the head (an
    embedding network, as ProtoNets use).
    """
    blocks: list[nn.Module] = []
    for i in range(4):
        blocks += [nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1),
                   nn.BatchNorm2d(channels, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2)]
    blocks.append(nn.Flatten())
    if out_features is not None:
        side = image_size // 16
        if side < 1:
            raise ValueError(f"conv4: image_size must be >= 16 (four 2x2 poolings); got {image_size!r}")
        blocks.append(nn.Linear(channels * side * side, out_features))
    return nn.Sequential(*blocks)


def build_network(spec: NetworkSpec) -> nn.Module:
    """An ``nn.Module`` from a spec ``{"kind": "mlp" | "conv4", **arguments}`` (a module is returned as is)."""
    if isinstance(spec, nn.Module):
        return spec
    if not isinstance(spec, Mapping) or spec.get("kind") not in NETWORKS:
        raise ValueError(f"network must be an nn.Module or a mapping with kind in {NETWORKS}; got {spec!r}")
    arguments = {k: v for k, v in spec.items() if k != "kind"}
    builder = mlp if spec["kind"] == "mlp" else conv4
    try:
        return builder(**arguments)
    except TypeError as error:
        raise ValueError(f"network {spec!r}: {error}; see {builder.__module__}.{builder.__name__}") from error


def head_name(model: nn.Module) -> str:
    """The name of the last sub-module that holds parameters (the head ANIL adapts)."""
    names = [name for name, module in model.named_modules() if name and list(module.parameters(recurse=False))]
    if not names:
        raise ValueError(f"network {type(model).__name__} has no parameters; expected a network with a head")
    return names[-1]


class PerParameterStepSizes(nn.Module):
    """Meta-SGD's learned step sizes: one per parameter entry, ``update = −α ⊙ g`` (Li et al. 2017).

    The step sizes are ``nn.Parameter``s initialised to ``lr``; ``.optimizer()`` is the functional rule.
    """

    elementwise = True  # InnerLoop may apply it to all tasks' weights at once

    def __init__(self, params: Mapping[str, Tensor], lr: float = 0.01) -> None:
        super().__init__()
        lr = positive_float("lr", lr, owner="PerParameterStepSizes")
        self.names = list(params)
        self.lrs = nn.ParameterList([nn.Parameter(torch.full_like(p.detach(), float(lr))) for p in params.values()])

    def optimizer(self) -> GradientTransformation:
        step_sizes = dict(zip(self.names, self.lrs))

        def init(params: Params) -> EmptyState:
            if set(params) != set(step_sizes):
                raise ValueError(f"PerParameterStepSizes: got parameters {sorted(params)}; expected {self.names}")
            return EmptyState()

        def update(grads, state, params=None, *, loss=None):
            del params, loss
            return {k: -step_sizes[k] * g for k, g in grads.items()}, state

        return GradientTransformation(init, update)


def _example(cls: type[InnerLoop]) -> Example:
    """One inner step on a small MLP for 3-dimensional linear regression (``Learner.example``)."""
    return Example(cls({"kind": "mlp", "in_features": 3, "hidden": [8], "out_features": 1}, steps=1),
                   LinearRegression(dim=3))


class MAML(InnerLoop):
    """MAML (Finn et al. 2017): meta-learned initialisation, ``steps`` SGD steps of size ``inner_lr`` per task.

    Args:
        network: an ``nn.Module`` or a spec for :func:`build_network`.
        steps, inner_lr: the inner loop (Finn et al.: 1 step of 0.01 for sinusoids during meta-training).
        first_order, truncate, backend, strategy: as in :class:`InnerLoop`.
    """

    example = classmethod(_example)

    def __init__(self, network: NetworkSpec, steps: int = 5, inner_lr: float = 0.01, *, first_order: bool = False,
                 truncate: int | None = None, backend: str = "func", strategy: str = "auto") -> None:
        super().__init__(build_network(network), sgd(inner_lr), steps, init="meta", first_order=first_order,
                         truncate=truncate, backend=backend, strategy=strategy)


class FOMAML(MAML):
    """First-order MAML: :class:`MAML` with the inner gradients treated as constants."""

    def __init__(self, network: NetworkSpec, steps: int = 5, inner_lr: float = 0.01, *, backend: str = "func",
                 strategy: str = "auto") -> None:
        super().__init__(network, steps, inner_lr, first_order=True, backend=backend, strategy=strategy)


class MetaSGD(InnerLoop):
    """Meta-SGD (Li et al. 2017): meta-learned initialisation and per-entry step sizes (initialised to ``inner_lr``)."""

    example = classmethod(_example)

    def __init__(self, network: NetworkSpec, steps: int = 1, inner_lr: float = 0.01, *, first_order: bool = False,
                 truncate: int | None = None, backend: str = "func", strategy: str = "auto") -> None:
        model = build_network(network)
        step_sizes = PerParameterStepSizes(dict(model.named_parameters()), inner_lr)
        super().__init__(model, step_sizes, steps, init="meta", first_order=first_order, truncate=truncate,
                         backend=backend, strategy=strategy)


class ANIL(InnerLoop):
    """ANIL (Raghu et al. 2020): the inner loop adapts only ``head`` (default: the last layer with parameters).

    The body's parameters are meta-learned and shared by every task; the head's initialisation is meta-learned.
    """

    example = classmethod(_example)

    def __init__(self, network: NetworkSpec, steps: int = 5, inner_lr: float = 0.01, *, head: str | None = None,
                 first_order: bool = False, backend: str = "func", strategy: str = "auto") -> None:
        model = build_network(network)
        super().__init__(model, sgd(inner_lr), steps, init="meta", first_order=first_order, backend=backend,
                         strategy=strategy, adapt=[head if head is not None else head_name(model)])


class FixedInitGD(InnerLoop):
    """``steps`` of SGD from a fixed ``"zero"`` or ``"random"`` initialisation: nothing is meta-learned."""

    example = classmethod(_example)

    def __init__(self, network: NetworkSpec, steps: int = 5, inner_lr: float = 0.01, *, init: str = "zero",
                 strategy: str = "auto") -> None:
        if init not in ("zero", "random"):
            raise ValueError(f"FixedInitGD: init must be 'zero' or 'random'; got {init!r} (use MAML for 'meta')")
        super().__init__(build_network(network), sgd(inner_lr), steps, init=init, strategy=strategy)


__all__ = ["MAML", "FOMAML", "MetaSGD", "ANIL", "FixedInitGD", "PerParameterStepSizes", "build_network", "conv4",
           "head_name", "NETWORKS"]
