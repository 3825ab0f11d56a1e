"""MAML meta-steps (forward, inner loop, meta-gradient) of ``metaopt.learners.MAML`` against the references.

- Sinusoid regression (Finn et al.): MLP 1-40-40-1, 10 shots, 10 queries, 5 inner SGD steps, meta-batch 25.
- Memory kept for the meta-gradient of a 50-step unroll (sinusoid MLP): full, truncated to 5 steps, first-order.
- 5-way 1-shot 28×28 images, 15 queries per class: the 4-conv 32-channel network, 5 inner steps, meta-batch 16.
  Also timed: the queries' forward and backward alone (0 inner steps), the same work for every implementation,
  which bounds the speedup any inner loop could reach (``speedup_bound_with_a_free_inner_loop``).

Each timed meta-step reports its achieved GFLOP/s (``benchmarks.flops``) and their share of this machine's fp32
matmul rate. References, written as a user would: ``higher.innerloop_ctx`` with ``torch.optim.SGD`` (a loop over
tasks), and learn2learn's ``MAML.clone().adapt`` when learn2learn is importable. Every strategy's meta-gradient
is checked against higher's before timing, in float64 to 1e-9 (relative and absolute): float32 rounding differs
between machines (on one, correct float32 meta-gradients of the CNN differed from higher's by 0.4% of the
largest entry, while in float64 every strategy agrees to 1e-16). The times are float32, the best of a few
meta-steps. The sinusoid is timed under ``compile: true`` too (``ours_compiled``, its meta-gradient checked
against higher's like the others; its compilation seconds reported apart, and skipped where ``torch.compile``
cannot run, e.g. without a C++ compiler). On a machine shared with other work, run it with ``--threads 1``:
with 2 threads each parallel op of the task-batched path waits for the busy second core.
"""

from __future__ import annotations

import copy
import time
from functools import partial
from typing import Callable

import torch
from torch import nn

from benchmarks.flops import achieved, count_flops, machine_rate
from benchmarks.memory import saved_megabytes
from benchmarks.timing import best_of
from metaopt.episodes import Episode
from metaopt.extras import import_learn2learn
from metaopt.learners import MAML
from metaopt.learners.maml import conv4
from metaopt.learners.mlp import mlp
from metaopt.runtime import compile_loss
from metaopt.tasks import Sinusoid

INNER_LR, INNER_STEPS = 0.01, 5


def higher_step(model: nn.Module, episode: Episode, steps: int = INNER_STEPS) -> list[torch.Tensor]:
    """One MAML meta-gradient with ``higher`` and ``torch.optim.SGD``, task by task."""
    import higher

    loss_fn, model_params = episode.kind.loss, list(model.parameters())
    losses = []
    for t in range(episode.num_tasks):
        with higher.innerloop_ctx(model, torch.optim.SGD(model_params, lr=INNER_LR),
                                  copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(loss_fn(fmodel(episode.x_support[t]), episode.y_support[t]))
            losses.append(loss_fn(fmodel(episode.x_query[t]), episode.y_query[t]))
    return list(torch.autograd.grad(torch.stack(losses).mean(), model_params))


def learn2learn_step(model: nn.Module, episode: Episode, steps: int = INNER_STEPS) -> list[torch.Tensor]:
    """One MAML meta-gradient with learn2learn's ``MAML`` (``clone`` + ``adapt`` per task)."""
    maml, loss_fn = import_learn2learn().algorithms.MAML(model, lr=INNER_LR), episode.kind.loss
    losses = []
    for t in range(episode.num_tasks):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(loss_fn(learner(episode.x_support[t]), episode.y_support[t]))
        losses.append(loss_fn(learner(episode.x_query[t]), episode.y_query[t]))
    return list(torch.autograd.grad(torch.stack(losses).mean(), list(model.parameters())))


def ours_step(learner: MAML, episode: Episode) -> list[torch.Tensor]:
    return list(torch.autograd.grad(learner.loss(episode), list(learner.parameters())))


def compiled_step(learner: MAML, episode: Episode) -> Callable[[Episode], list[torch.Tensor]] | None:
    """Our meta-step as a recipe with ``compile: true`` runs it (``metaopt.runtime.compile_loss``), compiled by a
    first call on ``episode``; None if ``torch.compile`` failed there and the loss fell back to eager (e.g. no C++
    compiler, or a double backward it refused)."""
    loss, params = compile_loss(learner.loss, True, "MAML"), list(learner.parameters())

    def step(episode: Episode) -> list[torch.Tensor]:
        return list(torch.autograd.grad(loss(episode), params))

    step(episode)
    return step if loss.active else None


def references() -> dict:
    """The references by name, each called as ``(model, episode, steps)``: higher, and learn2learn if installed."""
    found = {"higher": higher_step}
    try:
        import_learn2learn()
    except ImportError:
        pass
    else:
        found["learn2learn"] = learn2learn_step
    return found


def float64(episode: Episode) -> Episode:
    """The episode with its real-valued tensors in float64 (integer labels stay integers)."""
    fields = ("x_support", "y_support", "x_query", "y_query")
    real = [f for f in fields if getattr(episode, f).is_floating_point()]
    return episode.replace(**{f: getattr(episode, f).double() for f in real})


def check_meta_gradients(model: nn.Module, episode: Episode, strategies: list[str], *, tolerance: float,
                         compiled: bool = False) -> bool:
    """Every strategy's meta-gradient equals higher's, in float64 (float32 rounding differs between machines);
    with ``compiled``, the compiled meta-step's too. Whether the compiled step compiled (False without it)."""
    model64, episode64 = copy.deepcopy(model).double(), float64(episode)
    expected = higher_step(model64, episode64)
    steps = {s: partial(ours_step, MAML(model64, INNER_STEPS, INNER_LR, strategy=s)) for s in strategies}
    compiled_step64 = compiled_step(MAML(model64, INNER_STEPS, INNER_LR), episode64) if compiled else None
    if compiled_step64 is not None:
        steps["compiled"] = compiled_step64
    for name, step in steps.items():
        for ours, theirs in zip(step(episode64), expected):
            torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance, msg=f"{name} vs higher")
    return compiled_step64 is not None


def compare_meta_steps(model: nn.Module, episode: Episode, strategies: list[str], *, tolerance: float,
                       repeats: int, compiled: bool = False) -> dict:
    """Time our strategies and the references on one episode in float32, after checking in float64 that their
    meta-gradients agree to ``tolerance``; with ``compiled``, our default strategy under ``compile: true`` too
    (``ours_compiled``, timed after its compilation, whose seconds are reported apart).

    ``strategies`` must include the one ``strategy="auto"`` resolves to for ``model``.
    """
    compiles = check_meta_gradients(model, episode, strategies, tolerance=tolerance, compiled=compiled)
    learners = {s: MAML(model, INNER_STEPS, INNER_LR, strategy=s) for s in strategies}
    reference_steps = references()
    seconds = {f"ours_{s}": best_of(lambda l=l: ours_step(l, episode), repeats=repeats)
               for s, l in learners.items()}
    compile_seconds = None
    if compiles:
        # a fresh compiler state: after the float64 check's graph, a recompile would make the shapes dynamic
        torch._dynamo.reset()
        start = time.perf_counter()
        step = compiled_step(MAML(model, INNER_STEPS, INNER_LR), episode)
        compiles = step is not None
        compile_seconds = time.perf_counter() - start if compiles else None
    if compiles:
        seconds["ours_compiled"] = best_of(lambda: step(episode), repeats=repeats)
    seconds |= {name: best_of(lambda f=f: f(model, episode), repeats=repeats)
                for name, f in reference_steps.items()}
    resolved = MAML(model, INNER_STEPS, INNER_LR).resolved_strategy()
    auto = f"ours_{resolved}"
    fastest_reference = min(seconds[name] for name in reference_steps)
    # per task: torch's counter overcounts grouped convolutions
    flop = count_flops(lambda: ours_step(MAML(model, INNER_STEPS, INNER_LR, strategy="loop"), episode))
    rates = {k: achieved(flop, v) for k, v in seconds.items()}
    result = {
        "seconds": seconds,
        "auto_strategy": auto,
        "speedup_vs_higher": seconds["higher"] / seconds[auto],
        "speedup_vs_fastest_reference": fastest_reference / seconds[auto],
        "gflop_per_meta_step": flop / 1e9,
        "gflops_achieved": {k: rate["gflops"] for k, rate in rates.items()},
        "share_of_matmul_rate": {k: rate["share_of_matmul_rate"] for k, rate in rates.items()},
        "gradients_match_higher_to_in_float64": tolerance,
        "references": sorted(reference_steps),
    }
    if compiled:  # None: torch.compile failed on this machine and the compiled step was not timed
        result["compile_seconds"] = compile_seconds
        result["compiled_speedup_vs_fastest_reference"] = (fastest_reference / seconds["ours_compiled"]
                                                           if compiles else None)
    return result


def sinusoid() -> dict:
    torch.manual_seed(0)
    episode = Sinusoid().sample(25, 10, 10, generator=torch.Generator().manual_seed(0))
    result = compare_meta_steps(mlp(1, (40, 40), 1), episode, ["batched", "vmap", "loop"], tolerance=1e-9,
                                repeats=10, compiled=True)
    return result | {"target_speedup_vs_fastest_reference": 15.0}


def conv_images(meta_batch: int = 16, ways: int = 5, queries: int = 15) -> dict:
    """Random 28×28 images suffice for timing: the cost does not depend on the pixels."""
    torch.manual_seed(0)
    x = torch.randn(meta_batch, ways * (1 + queries), 1, 28, 28)
    y = torch.arange(ways).repeat(meta_batch, 1 + queries)
    episode = Episode(x[:, :ways], y[:, :ways], x[:, ways:], y[:, ways:], kind="classification", num_classes=ways)
    model = conv4(1, 32, ways)
    result = compare_meta_steps(model, episode, ["folded", "loop", "batched"], tolerance=1e-9, repeats=3)
    # the queries' forward and backward alone (no inner steps): work every implementation does per task alike
    query_pass = best_of(lambda: ours_step(MAML(model, 0, INNER_LR), episode), repeats=3)
    fastest_reference = min(result["seconds"][name] for name in result["references"])
    return result | {"ours_query_pass_only_s": query_pass,
                     "speedup_bound_with_a_free_inner_loop": fastest_reference / query_pass,
                     "target_speedup_vs_fastest_reference": 2.5, "target_share_of_matmul_rate": 0.3}


def unroll_memory(steps: int = 50, truncate: int = 5) -> dict:
    """Memory of a ``steps``-step MAML meta-gradient (sinusoid MLP, 25 tasks): full, truncated, first-order."""
    episode = Sinusoid().sample(25, 10, 10, generator=torch.Generator().manual_seed(0))
    model = mlp(1, (40, 40), 1)
    modes = {"full": {}, f"truncated_{truncate}": {"truncate": truncate}, "first_order": {"first_order": True}}
    result = {}
    for name, kwargs in modes.items():
        learner = MAML(model, steps, INNER_LR, **kwargs)
        result[f"{name}_saved_mb"] = saved_megabytes(lambda: learner.loss(episode).backward())
        result[f"{name}_seconds"] = best_of(lambda: learner.loss(episode).backward(), repeats=3)
    return result


def run() -> dict:
    return {
        "matmul_gflops": machine_rate(),
        "maml_sinusoid_50_step_unroll_memory": unroll_memory(),
        "maml_sinusoid_mlp_1_40_40_1_meta_batch_25": sinusoid(),
        "maml_conv4_32ch_28x28_5way_1shot_meta_batch_16": conv_images(),
    }
