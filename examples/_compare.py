"""What the examples share: a plain PyTorch training loop, tuned Adam (constant and cosine), the comparison, the plot.

Every optimizer trains the same freshly initialised models on the same shuffled mini-batches, in the loop a user
writes; the learned one is loaded back from its file with ``optimizers.load`` like any other script would.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import metaopt
import optimizers as O
from metaopt.allocator import keep_freed_memory

ADAM_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


@dataclass
class Problem:
    """A model, its data and loss, and how long to train."""

    name: str
    make_model: Callable[[], nn.Module]
    x: Tensor
    y: Tensor
    loss: Callable[[Tensor, Tensor], Tensor]
    horizon: int
    batch_size: int
    eval_examples: int = 512  # the training loss is measured on this many fixed examples after each step


def arguments(description: str, argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a run of seconds (the test suite's)")
    parser.add_argument("--out", default="runs/examples", help="folder for the optimizer file, plot and results")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # large activations reuse freed heap memory instead of fresh pages (metaopt.allocator)
    return args


def train(problem: Problem, make_optimizer: Callable[[nn.Module], tuple], seed: int) -> Tensor:
    """Training loss on the fixed examples before training and after each of ``horizon`` steps: [horizon + 1]."""
    torch.manual_seed(seed)
    model = problem.make_model()
    optimizer, scheduler = make_optimizer(model)
    order = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(problem.x, problem.y), problem.batch_size, shuffle=True, drop_last=True,
                        generator=order)
    x_eval, y_eval = problem.x[: problem.eval_examples], problem.y[: problem.eval_examples]
    curve = []
    batches = iter(())
    for step in range(problem.horizon + 1):
        with torch.no_grad():
            curve.append(float(problem.loss(model(x_eval), y_eval)))
        if step == problem.horizon:
            break
        if (batch := next(batches, None)) is None:
            batches = iter(loader)
            batch = next(batches)
        # 1. forward/backward, 2. step (a closure returning the loss: torch's optimizers and the learned one both
        # take it, and the learned one reads the loss as a feature), 3. schedule
        loss = problem.loss(model(batch[0]), batch[1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step(lambda: loss)
        if scheduler is not None:
            scheduler.step()
    return torch.tensor(curve)


def adam(lr: float, horizon: int, cosine: bool) -> Callable[[nn.Module], tuple]:
    def make(model: nn.Module) -> tuple:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, horizon) if cosine else None
    return make


def steps_to(curve: Tensor, target: float) -> int | None:
    hits = torch.nonzero(curve <= target)
    return int(hits[0]) if len(hits) else None


def compare(problem: Problem, args: argparse.Namespace, *, meta_steps: int, pairs: int, eval_seeds: int,
            grid: Sequence[float] = ADAM_GRID, batch_runs: int | None = None) -> dict:
    """Tune Adam (constant and cosine) on the grid, meta-train the specialized optimizer, compare, plot.

    ``batch_runs``: how many of ES's ``2 * pairs`` inner runs advance together, vmapped (None: all)."""
    out = Path(args.out) / problem.name
    out.mkdir(parents=True, exist_ok=True)
    # 1. tuned Adam: the learning rate of the grid with the lowest final loss (tuning seed 1000)
    tuned = {}
    for label, cosine in (("adam", False), ("adam_cosine", True)):
        finals = {lr: float(train(problem, adam(lr, problem.horizon, cosine), seed=1000)[-1]) for lr in grid}
        tuned[label] = min(finals, key=lambda lr: finals[lr] if math.isfinite(finals[lr]) else math.inf)
    # 2. the specialized optimizer: meta-trained for this model and data, written to one file
    torch.manual_seed(0)
    metaopt.optimizers_for(problem.make_model(), (problem.x, problem.y), problem.loss, horizon=problem.horizon,
                           steps=meta_steps, batch_size=problem.batch_size, init=problem.make_model,
                           estimator=O.AntitheticES(sigma=0.01, pairs=pairs, batch_runs=batch_runs), adam_lrs=grid,
                           save_to=out / "mixture.pt")
    # 3. every optimizer on the same fresh models and batches (seeds 0..), the learned one loaded from its file
    makers = {
        "adam": adam(tuned["adam"], problem.horizon, cosine=False),
        "adam_cosine": adam(tuned["adam_cosine"], problem.horizon, cosine=True),
        "specialized": lambda model: (O.load(out / "mixture.pt", model.named_parameters()), None),
    }
    curves = {name: torch.stack([train(problem, make, seed) for seed in range(eval_seeds)]).mean(0)
              for name, make in makers.items()}
    targets = {name: float(curves[name][-1]) for name in ("adam", "adam_cosine")}
    results = {
        "problem": problem.name, "horizon": problem.horizon, "tuned_lrs": tuned,
        "final_loss": {name: float(c[-1]) for name, c in curves.items()},
        "steps_to_tuned_adam": {name: steps_to(c, targets["adam"]) for name, c in curves.items()},
        "steps_to_tuned_adam_cosine": {name: steps_to(c, targets["adam_cosine"]) for name, c in curves.items()},
        "curves": {name: c.tolist() for name, c in curves.items()},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _plot(curves, targets, out / "loss_curves.png", problem.name, eval_seeds)
    return results


def _plot(curves: dict[str, Tensor], targets: dict[str, float], path: Path, title: str, seeds: int) -> None:
    """Training loss vs step in the house style (metaopt.plotting): the specialized optimizer solid, Adam dashed."""
    from metaopt import plotting

    fig, (ax,) = plotting.new_figure()
    series = [plotting.Series(name, list(range(len(curve))), curve.tolist(), implicit=name == "specialized")
              for name, curve in curves.items()]
    plotting.plot_series(ax, series, yscale="auto", integer_x=True, include=list(targets.values()))
    for name, target in targets.items():
        plotting.reference_line(ax, y=target, label=f"tuned {name} at T", style="--" if name == "adam" else ":")
    ax.set(xlabel="step", ylabel="training loss")
    subtitle = (f"training loss, mean over {seeds} seed{'s' if seeds != 1 else ''} (no interval) · solid: the "
                "meta-trained specialized optimizer, dashed: the tuned baselines")
    plotting.save(plotting.finish(fig, title, subtitle), path)


def report(results: dict) -> str:
    lines = [f"{results['problem']} (T={results['horizon']}; tuned lr: adam {results['tuned_lrs']['adam']:g}, "
             f"cosine {results['tuned_lrs']['adam_cosine']:g})",
             f"{'optimizer':<14}{'final loss':>12}{'steps to adam':>16}{'steps to cosine':>18}"]
    for name, final in results["final_loss"].items():
        to_adam, to_cosine = results["steps_to_tuned_adam"][name], results["steps_to_tuned_adam_cosine"][name]
        lines.append(f"{name:<14}{final:>12.4f}{'never' if to_adam is None else to_adam:>16}"
                     f"{'never' if to_cosine is None else to_cosine:>18}")
    return "\n".join(lines)
