"""Learned-optimizer hot paths against what a user would otherwise run.

- ``as_torch_optimizer(LayerwiseMixture)`` step time on a ~1M-parameter MLP vs ``torch.optim.Adam(foreach=True)``
  (the target: at most 1.3×), with the compiled fused step (``optimizer(compile=True)``; its compile is not
  timed) and with the directions' own kernels (the default). Only ``step()`` is timed, on fixed gradients.
- Memory of a 50-step unrolled meta-gradient of a LayerwiseMixture: full backprop, truncated (last 10 steps),
  first-order, and antithetic ES: the peak bytes of distinct storages that autograd holds for backward passes
  at any one time (``benchmarks.memory``; ES holds only one inner step's graph at a time).
  Resident-set growth was tried and dropped: glibc's reuse of freed memory made it read 0 for most estimators.

An optimizer's step does no matmuls: its FLOPs are one per output element of each elementwise operation
(``benchmarks.flops.pointwise_flops``), counted for the mixture on its public-op path (torch's fused kernels,
which do the same arithmetic in fewer passes, are invisible to the counter). A step is bound by memory traffic,
so its share of the matmul rate is small by nature.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

import optimizers as O
import optimizers._torch_kernels as kernels
from benchmarks.flops import achieved, pointwise_flops
from benchmarks.memory import SavedTensors
from benchmarks.timing import best_of
from optimizers import _fused_mix
from optimizers.environments import Environment, mlp_apply, mlp_init

ESTIMATORS = {
    "full": lambda: O.FullBackprop(),
    "truncated_10": lambda: O.TruncatedBackprop(truncation=10),
    "first_order": lambda: O.FullBackprop(first_order=True),
    "es_4_pairs": lambda: O.AntitheticES(pairs=4),
}
SIZES = [64, 256, 256, 10]


def _step_time() -> dict:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 10))
    for p in net.parameters():
        p.grad = 1e-3 * torch.randn_like(p)
    mixture = O.LayerwiseMixture([n for n, _ in net.named_parameters()], horizon=1000)
    ours = O.as_torch_optimizer(mixture.optimizer(compile=True), net.named_parameters())
    eager = O.as_torch_optimizer(mixture.optimizer(), net.named_parameters())
    adam = torch.optim.Adam(net.parameters(), lr=1e-3, foreach=True)
    loss = torch.tensor(1.0)
    mixture_s = best_of(lambda: ours.step(loss=loss), repeats=50, warmup=5)
    eager_s = best_of(lambda: eager.step(loss=loss), repeats=50, warmup=5)
    adam_s = best_of(adam.step, repeats=50, warmup=5)
    with _public_ops():
        mixture_flop = pointwise_flops(lambda: eager.step(loss=loss))
    adam_flop = pointwise_flops(adam.step)
    compiled = _fused_mix._COMPILED.get(_fused_mix.plan(mixture._directions)) is not None  # False: it fell back
    return {"parameters": sum(p.numel() for p in net.parameters()), "layerwise_mixture_step_s": mixture_s,
            "layerwise_mixture_step_compiled": compiled,
            "layerwise_mixture_eager_step_s": eager_s, "torch_adam_foreach_step_s": adam_s,
            "ratio": mixture_s / adam_s, "eager_ratio": eager_s / adam_s, "target_ratio": 1.3,
            "layerwise_mixture_rate": achieved(mixture_flop, mixture_s),
            "torch_adam_foreach_rate": achieved(adam_flop, adam_s)}


@contextlib.contextmanager
def _public_ops() -> Iterator[None]:
    """The mixture's in-place steps in public ops (torch's fused kernels off), whose FLOPs the counter sees."""
    fused = (kernels.FUSED_ADAM, kernels.FUSED_SGD)
    saved = [kernel.fn for kernel in fused]
    for kernel in fused:
        kernel.fn = None
    try:
        yield
    finally:
        for kernel, fn in zip(fused, saved):
            kernel.fn = fn


def _setup(horizon: int) -> tuple[Environment, O.LayerwiseMixture]:
    g = torch.Generator().manual_seed(0)
    env = Environment(mlp_apply, lambda gen: mlp_init(SIZES, gen), torch.randn(512, SIZES[0], generator=g),
                      torch.randint(SIZES[-1], (512,), generator=g), horizon=horizon, batch_size=128)
    torch.manual_seed(0)
    eps_root = {"adam": {"eps_root": 1e-16}, "rmsprop": {"eps_root": 1e-16}}
    layers = {f"layer{i}": [f"{i}.weight", f"{i}.bias"] for i in range(len(SIZES) - 1)}
    return env, O.LayerwiseMixture(layers, horizon=horizon, direction_kwargs=eps_root)


def unroll_memory(name: str, horizon: int = 50) -> dict:
    """Peak MiB held for backward, and seconds, of estimator ``name``'s meta-gradient over a ``horizon``-step
    unroll (one estimate)."""
    env, mixture = _setup(horizon)
    tracker = SavedTensors()
    meta = {k: v.detach() for k, v in mixture.named_parameters()}
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, SavedTensors.unpack):
        seconds = best_of(lambda: ESTIMATORS[name]().estimate(env, mixture.optimizer, meta,
                                                             generator=torch.Generator().manual_seed(1)),
                          repeats=1, warmup=0)
    return {"peak_saved_for_backward_mib": tracker.peak / 2**20, "seconds": seconds}


def run() -> dict:
    memory = {name: unroll_memory(name) for name in ESTIMATORS}
    return {
        "as_torch_optimizer_step_1m_params": _step_time(),
        "unrolled_meta_gradient_memory_50_steps": {"model": f"MLP {SIZES}, batch 128, LayerwiseMixture",
                                                   **memory},
    }
