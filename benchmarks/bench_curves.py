"""Cost curves: how each hot path's time or memory grows with its size, beside how it should grow.

Each curve is measured at a few sizes spanning more than a decade; its growth exponent is the least-squares slope
of log(cost) on log(size), and the expected exponent is the same slope of a cost model over the same sizes:

- time curves: the FLOPs of each size (``benchmarks.flops.count_flops``), what a compute-bound path would follow;
  an observed exponent below it means per-operation overhead still weighs at the small sizes;
- memory curves: full backpropagation through T steps keeps T steps' graphs (T), truncation to K keeps
  ``min(T, K)``, first-order keeps every step's graph without the second-order terms (T, with a smaller
  constant), ES keeps one inner step at a time (1).

The curves:

1. ``icl_step_vs_support``: one meta-training step of the quickstart transformer (recipes/quickstart.yaml's
   learner: loss, backward, Adam; as ``bench_transformer``'s plain step) on 64 tasks against the number of
   in-context examples S (2S + 1 tokens), with the same-size GPT-2 reference when ``transformers`` is installed.
   Linear layers grow with the tokens, attention with their square: at 64 wide it is about L / (6·64) of the
   rest, so the FLOPs grow slightly faster than linearly.
2. ``icl_step_vs_dim``: the same step at 11 examples against the input dimension d: only the read-in grows.
3. ``maml_vs_inner_steps`` and ``maml_vs_meta_batch``: MAML's meta-step on the sinusoid MLP (``bench_maml``), ours
   (its default strategy), learn2learn's (when installed) and higher's, against the inner steps (25 tasks) and
   the meta-batch (5 steps): linear in both.
4. ``unroll_memory_vs_length``: the peak memory autograd holds for the meta-gradient of a LayerwiseMixture
   unrolled T steps on an MLP (``bench_optimizers``: full, truncated to 10 steps, first-order, ES with 4
   antithetic pairs), counted as the bytes of distinct storages saved for backward at any one time
   (``torch.autograd.graph.saved_tensors_hooks``, ``benchmarks.memory``; ``tracemalloc`` does not see torch's
   allocations).
5. ``ht_generation_vs_episodes``: the HyperTransformer writing a width-8 CNN's weights for a batch of 5-way
   1-shot episodes (inference mode), beside MAML's 5-step adaptation (``bench_hypertransformer``).

``python -m benchmarks curves`` writes ``curves.json`` and the figure ``curves.png`` beside it, and prints one
line per series: observed and expected exponents. ``--quick``: three small sizes per curve (the tests' size).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from benchmarks import bench_maml
from benchmarks.bench_optimizers import ESTIMATORS, unroll_memory
from benchmarks.bench_transformer import GargTransformer, garg_step, reference_loss
from benchmarks.flops import achieved, count_flops
from benchmarks.timing import best_of
from benchmarks.trainers import recipe_learner
from hypernets import HyperTransformer, TargetCNN
from metaopt.episodes import Episode
from metaopt.extras import import_transformers
from metaopt.learners import MAML
from metaopt.learners.mlp import mlp
from metaopt.tasks import FewShotImages, Glyphs, LinearRegression, Sinusoid

SIZES = {
    "full": {"support": [4, 8, 16, 32, 64], "dim": [5, 10, 20, 40, 80], "inner_steps": [1, 2, 4, 8, 16],
             "meta_batch": [4, 8, 16, 32, 64], "unroll": [5, 10, 20, 40, 80], "episodes": [1, 4, 16, 64]},
    "quick": {"support": [2, 4, 8], "dim": [2, 4, 8], "inner_steps": [1, 2, 4], "meta_batch": [2, 4, 8],
              "unroll": [2, 4, 8], "episodes": [1, 2, 4]},
}
ICL_TASKS = {"full": 64, "quick": 4}
MAML_TASKS = {"full": 25, "quick": 4}  # in the curve against the inner steps
REPEATS = {"full": 3, "quick": 1}  # timed calls per point (the HyperTransformer's: 5 in the full size)
MEMORY_MODEL = {  # the expected memory of each estimator against the unroll length T
    "full": lambda T: T,
    "truncated_10": lambda T: min(T, 10),
    "first_order": lambda T: T,
    "es_4_pairs": lambda T: 1,
}


# ---------------------------------------------------------------------- fitting
def exponent(sizes: Sequence[float], values: Sequence[float]) -> float | None:
    """The least-squares slope of log(values) on log(sizes); None unless every value is positive and finite."""
    if len(sizes) < 2 or not all(v > 0 and math.isfinite(v) for v in values):
        return None
    return float(np.polyfit(np.log(sizes), np.log(values), 1)[0])


def growth(slope: float | None) -> str:
    """A growth exponent in words: constant, sublinear, linear, superlinear, quadratic or faster."""
    if slope is None:
        return "unknown"
    bands = [(0.2, "constant"), (0.8, "sublinear"), (1.2, "linear"), (1.8, "superlinear"), (2.2, "quadratic")]
    return next((word for bound, word in bands if slope < bound), "faster than quadratic")


def series(sizes: Sequence[float], values: Sequence[float], model: Sequence[float], **extra: object) -> dict:
    """One measured series with its fitted and expected exponents (``model``: the cost model at each size)."""
    observed, expected = exponent(sizes, values), exponent(sizes, model)
    return {"values": list(values), "exponent": observed, "growth": growth(observed),
            "expected_exponent": expected, "expected_growth": growth(expected), **extra}


def _timed_series(sizes: Sequence[int], make: Callable[[int], Callable[[], object]], *, repeats: int,
                  flop: Sequence[float] | None = None) -> dict:
    """Times of ``make(size)()`` at each size; expected: their FLOPs (counted here unless ``flop`` is given)."""
    steps = [make(size) for size in sizes]
    seconds = [best_of(step, repeats=repeats) for step in steps]
    flop = list(flop) if flop is not None else [count_flops(step) for step in steps]
    rates = [achieved(f, s) for f, s in zip(flop, seconds)]
    return series(sizes, seconds, flop, gflop=[r["gflop"] for r in rates],
                  share_of_matmul_rate=[r["share_of_matmul_rate"] for r in rates])


# ---------------------------------------------------------------------- the curves
def _icl_step(support: int, dim: int, tasks: int, *, reference: bool = False) -> Callable[[], float]:
    """One plain meta-training step (``bench_transformer.garg_step``) of the quickstart transformer, or of its
    same-size GPT-2 reference, sized for ``support`` examples of ``dim`` inputs."""
    learner = recipe_learner("quickstart", "transformer", x_dim=dim, max_support=support)
    episode = LinearRegression(dim).sample(tasks, support, 1, generator=torch.Generator().manual_seed(0))
    if reference:
        model = GargTransformer.like(learner)
        adam = torch.optim.Adam(model.parameters(), lr=1e-3)
        return lambda: garg_step(lambda: reference_loss(model, episode), adam)
    adam = torch.optim.Adam(learner.parameters(), lr=1e-3)
    return lambda: garg_step(lambda: learner.loss(episode), adam)


def icl_curves(size: str) -> dict:
    sizes, tasks, repeats = SIZES[size], ICL_TASKS[size], REPEATS[size]
    support = {"ours": _timed_series(sizes["support"], lambda s: _icl_step(s, 5, tasks), repeats=repeats)}
    try:
        import_transformers()
    except ImportError as error:
        support["reference_gpt2"] = {"skipped": str(error)}
    else:
        support["reference_gpt2"] = _timed_series(sizes["support"], lambda s: _icl_step(s, 5, tasks, reference=True),
                                                  repeats=repeats)
    return {
        "icl_step_vs_support": {"x": "in-context examples S (2S + 1 tokens)", "unit": "s", "tasks": tasks,
                                "series": support},
        "icl_step_vs_dim": {"x": "input dimension d", "unit": "s", "tasks": tasks, "support": 11,
                            "series": {"ours": _timed_series(sizes["dim"], lambda d: _icl_step(11, d, tasks),
                                                             repeats=repeats)}},
    }


def _maml_series(sizes: Sequence[int], episode_of: Callable[[int], Episode], steps_of: Callable[[int], int], *,
                 repeats: int) -> dict:
    """Ours (default strategy) and every installed reference, with the FLOPs counted once (the same math)."""
    model = mlp(1, (40, 40), 1)

    def ours(size: int, strategy: str = "auto") -> Callable[[], object]:
        learner = MAML(model, steps_of(size), bench_maml.INNER_LR, strategy=strategy)
        episode = episode_of(size)
        return lambda: bench_maml.ours_step(learner, episode)

    flop = [count_flops(ours(size, "loop")) for size in sizes]  # task by task, as bench_maml counts
    found = {"ours": _timed_series(sizes, ours, repeats=repeats, flop=flop)}
    for name, step in bench_maml.references().items():
        def reference(size: int, step: Callable = step) -> Callable[[], object]:
            episode, steps = episode_of(size), steps_of(size)
            return lambda: step(model, episode, steps)

        found[name] = _timed_series(sizes, reference, repeats=repeats, flop=flop)
    return found


def maml_curves(size: str) -> dict:
    sizes = SIZES[size]
    family, generator = Sinusoid(), torch.Generator()

    def episode(tasks: int) -> Episode:
        return family.sample(tasks, 10, 10, generator=generator.manual_seed(0))

    torch.manual_seed(0)
    return {
        "maml_vs_inner_steps": {"x": "inner steps", "unit": "s", "tasks": MAML_TASKS[size], "series": _maml_series(
            sizes["inner_steps"], lambda steps: episode(MAML_TASKS[size]), lambda steps: steps,
            repeats=REPEATS[size])},
        "maml_vs_meta_batch": {"x": "meta-batch (tasks)", "unit": "s", "inner_steps": bench_maml.INNER_STEPS,
                               "series": _maml_series(sizes["meta_batch"], episode,
                                                      lambda tasks: bench_maml.INNER_STEPS, repeats=REPEATS[size])},
    }


def memory_curve(size: str) -> dict:
    lengths = SIZES[size]["unroll"]
    found = {}
    for name in ESTIMATORS:
        measured = [unroll_memory(name, length) for length in lengths]
        found[name] = series(lengths, [m["peak_saved_for_backward_mib"] for m in measured],
                             [MEMORY_MODEL[name](length) for length in lengths],
                             seconds=[m["seconds"] for m in measured])
    return {"unroll_memory_vs_length": {"x": "unroll length T (inner steps)", "unit": "MiB",
                                        "counted": "peak bytes of distinct storages saved for backward "
                                                   "(torch.autograd.graph.saved_tensors_hooks)",
                                        "series": found}}


def ht_curve(size: str) -> dict:
    counts, repeats = SIZES[size]["episodes"], 5 if size == "full" else REPEATS[size]
    family = FewShotImages(Glyphs(), ways=5, shots=1, queries=5, split="test")
    episodes = family.sample(max(counts), family.support_size, family.query_size,
                             generator=torch.Generator().manual_seed(0))
    ht = HyperTransformer(episodes.num_classes, 8).eval()
    maml = MAML(TargetCNN(8, num_classes=episodes.num_classes), steps=5, inner_lr=0.4).eval()
    per_task = MAML(maml.model, steps=5, inner_lr=0.4, strategy="loop").eval()

    def generate(count: int) -> Callable[[], object]:
        episode = episodes.select_tasks(slice(0, count))

        def call() -> object:
            with torch.inference_mode():
                return ht.generate(episode)
        return call

    def adapt(count: int, learner: MAML = maml) -> Callable[[], object]:
        episode = episodes.select_tasks(slice(0, count))

        def call() -> object:
            with torch.no_grad():
                return learner.adapt(episode)
        return call

    with torch.no_grad():  # the counter's module hooks fail under inference mode; the operations are the same
        generate_flop = [count_flops(lambda c=c: ht.generate(episodes.select_tasks(slice(0, c)))) for c in counts]
    adapt_flop = [count_flops(adapt(c, per_task)) for c in counts]
    return {"ht_generation_vs_episodes": {"x": "episodes (5-way 1-shot)", "unit": "s", "width": 8, "series": {
        "ht_generate": _timed_series(counts, generate, repeats=repeats, flop=generate_flop),
        "maml_5_step_adapt": _timed_series(counts, adapt, repeats=repeats, flop=adapt_flop)}}}


# ---------------------------------------------------------------------- figure and report
def _slope(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def plot(curves: dict, path: Path) -> Path:
    """Every curve in one figure (:mod:`metaopt.plotting`'s house style), a panel each; the panel's title gives
    each series' observed and expected exponents, and a series keeps its colour and marker across panels."""
    from metaopt import plotting

    names = list(dict.fromkeys(label for curve in curves.values() for label, s in curve["series"].items()
                               if "values" in s))
    fig, axes = plotting.new_figure(3, math.ceil(len(curves) / 3), panel=(4.6, 3.6))
    for ax, (name, curve) in zip(axes, curves.items()):
        measured = {label: s for label, s in curve["series"].items() if "values" in s}
        sizes = curve["sizes"]
        plotting.plot_series(ax, [plotting.Series(label, sizes, s["values"]) for label, s in measured.items()],
                             yscale="auto", styles=[names.index(label) for label in measured])
        ax.set_xscale(plotting.choose_scale(sizes))
        ax.set_xticks(sizes, [str(size) for size in sizes])
        ax.minorticks_off()
        ax.set_xlabel(curve["x"])
        ax.set_ylabel("seconds" if curve["unit"] == "s" else curve["unit"])
        slopes = ", ".join(f"{label} {_slope(s['exponent'])} ({_slope(s['expected_exponent'])})"
                           for label, s in measured.items())
        ax.set_title(f"{name.replace('_', ' ')}\n{textwrap.fill(slopes, 52)}", fontsize=9)
    for ax in axes[len(curves):]:
        ax.set_visible(False)
    subtitle = ("in each panel's title, every series' fitted log-log exponent and, in brackets, the one expected "
                "(FLOPs for times, the estimator's memory model for MiB) · one measurement per size")
    return plotting.save(plotting.finish(fig, "cost curves", subtitle), path)


def report(curves: dict) -> list[str]:
    """One line per measured series: the observed exponent and growth beside the expected ones."""
    lines = []
    for name, curve in curves.items():
        for label, s in curve["series"].items():
            if "values" not in s:
                lines.append(f"{name} / {label}: skipped ({s['skipped']})")
                continue
            lines.append(f"{name} / {label}: size^{_slope(s['exponent'])} ({s['growth']}); expected "
                         f"size^{_slope(s['expected_exponent'])} ({s['expected_growth']})")
    return lines


def run(*, quick: bool = False, out: Path | None = None) -> dict:
    """Measure every curve (``quick``: three small sizes each); ``out``: where ``curves.png`` goes."""
    size = "quick" if quick else "full"
    curves = icl_curves(size) | maml_curves(size) | memory_curve(size) | ht_curve(size)
    keys = {"icl_step_vs_support": "support", "icl_step_vs_dim": "dim", "maml_vs_inner_steps": "inner_steps",
            "maml_vs_meta_batch": "meta_batch", "unroll_memory_vs_length": "unroll",
            "ht_generation_vs_episodes": "episodes"}
    for name, curve in curves.items():
        curve["sizes"] = SIZES[size][keys[name]]
    lines = report(curves)
    print("\n".join(lines))
    result = {"curves": curves, "summary": lines}
    if out is not None:
        result["figure"] = str(plot(curves, Path(out) / "curves.png"))
    return result
