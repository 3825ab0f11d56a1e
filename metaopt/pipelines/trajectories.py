"""The ``trajectories`` pipeline: fixed-batch losses and iterate averaging along one SGD run.

Sandler, Zhmoginov, Vladymyrov & Miller (2023), "Training trajectories, mini-batch losses and the curious role of
the learning rate", at CPU scale: a small CNN (two 3×3 convolutions with batch norm, global average pooling, a
linear head) on scikit-learn's 8×8 digits, SGD with heavy-ball momentum at a constant learning rate.

1. train for ``train.steps`` steps with :func:`optimizers.averaged` keeping an EMA, an SWA (from
   ``train.branch_at``, every ``averaging.swa_every`` steps) and two two-point averages (``two_point_far`` and
   ``two_point_near`` steps apart); from ``probes.start`` on, record the weights and the loss of
   ``probes.batches`` fixed training batches every ``probes.every`` steps;
2. every ``train.eval_every`` steps, evaluate the last iterate and each average on the test split (batch-norm
   statistics recomputed on the training split for each, :func:`optimizers.recompute_batchnorm`);
3. at ``train.branch_at``: one large step on each fixed batch (:func:`metaopt.analysis.trajectory.one_large_step`)
   measures the batch curvature ``h = 1 / λ*``; the isotropic per-batch model turns each average into the
   learning-rate schedule it is equivalent to (:func:`~metaopt.analysis.trajectory.matched_rates`), and the run
   is continued from there under each matched schedule (plain SGD, same batches);
4. fit the per-batch quadratic to the recorded losses (:func:`~metaopt.analysis.trajectory.fit_quadratic`),
   check the claims, write ``results.json``, the figures and the W&B run.

"Final" test figures are the mean over the last ``train.final_evals`` evaluations (the last iterate is noisy).
Nothing is checkpointed mid-run (it takes minutes): ``resume`` and ``compare`` run it again, deterministically.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

import optimizers as O
from metaopt import distributed, plotting
from metaopt.analysis import trajectory as T
from metaopt.checks import integer, positive_float, positive_int, probability, sequence_of
from metaopt.config import CommonSettings, ConfigError, settings
from metaopt.environments import load_digits_classes
from metaopt.log import Run
from metaopt.pipelines import study
from metaopt.progress import Progress
from metaopt.seeds import SeedPlan, generator

__all__ = [
    "AveragingSettings",
    "ClaimThresholds",
    "ProbeSettings",
    "TrajectoryExperiment",
    "TrajectoryRecipe",
    "TrajectoryTrainSettings",
    "build",
    "execute",
    "small_cnn",
    "validate",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- the recipe's schema
@dataclass
class TrajectoryTrainSettings:
    """The SGD run: steps, batch size, constant rate and momentum, ``shift`` (training images moved by up to that
    many pixels each way, at random: the augmentation that keeps the batch losses from vanishing); evaluation
    cadence; where the branches start."""

    steps: int = 3000
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    eval_every: int = 100
    final_evals: int = 3
    branch_at: int = 1500
    shift: int = 1

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for key in ("steps", "batch_size", "eval_every", "final_evals", "branch_at"):
            positive_int(key, getattr(self, key), owner=owner)
        integer("shift", self.shift, owner=owner, low=0, high=3)
        positive_float("lr", self.lr, owner=owner)
        probability("momentum", self.momentum, owner=owner)
        if self.momentum >= 1:
            raise ValueError(f"momentum must be in [0, 1); got {self.momentum!r}")
        if not self.branch_at < self.steps:
            raise ValueError(f"branch_at must be below steps={self.steps}; got {self.branch_at}")
        if self.steps % self.eval_every or self.branch_at % self.eval_every:
            raise ValueError(f"eval_every must divide steps and branch_at (so every run is evaluated at the same "
                             f"steps); got eval_every={self.eval_every}, steps={self.steps}, "
                             f"branch_at={self.branch_at}")
        if self.final_evals > (self.steps - self.branch_at) // self.eval_every:
            raise ValueError(f"final_evals must be at most the evaluations after branch_at "
                             f"({(self.steps - self.branch_at) // self.eval_every}); got {self.final_evals}")


@dataclass
class AveragingSettings:
    """The averages kept along the run (SWA starts at ``train.branch_at``)."""

    ema_decay: float = 0.99
    swa_every: int = 5
    two_point_far: int = 300
    two_point_near: int = 5

    def __post_init__(self) -> None:
        owner = type(self).__name__
        probability("ema_decay", self.ema_decay, owner=owner)
        for key in ("swa_every", "two_point_far", "two_point_near"):
            positive_int(key, getattr(self, key), owner=owner)
        if self.two_point_near >= self.two_point_far:
            raise ValueError(f"two_point_near must be below two_point_far={self.two_point_far}; "
                             f"got {self.two_point_near}")


@dataclass
class ProbeSettings:
    """Fixed training batches whose loss is recorded from step ``start`` every ``every`` steps; the quadratic's
    principal directions (``dims``); the learning rates of the one-large-step probe."""

    batches: int = 4
    batch_size: int = 32
    start: int = 1000
    every: int = 2
    dims: int = 3
    lrs: list[float] = field(default_factory=lambda: [round(0.01 * 1.5**i, 6) for i in range(18)])

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for key in ("batches", "batch_size", "start", "every", "dims"):
            positive_int(key, getattr(self, key), owner=owner)
        sequence_of("lrs", self.lrs, positive_float, owner=owner)
        if not self.lrs:
            raise ValueError("lrs must be a non-empty list of learning rates > 0; got []")


@dataclass
class ClaimThresholds:
    """The values the claims are checked against (see :func:`_claims`)."""

    quadratic_r2: float = 0.9
    one_step_ratio: float = 0.3
    matched_gap: float = 0.1

    def __post_init__(self) -> None:
        owner = type(self).__name__
        probability("quadratic_r2", self.quadratic_r2, owner=owner)
        positive_float("one_step_ratio", self.one_step_ratio, owner=owner)
        positive_float("matched_gap", self.matched_gap, owner=owner)


@dataclass
class TrajectoryRecipe(CommonSettings):
    """A training-trajectories experiment (see the module docstring); ``channels`` are the CNN's widths."""

    pipeline: str = "trajectories"
    channels: list[int] = field(default_factory=lambda: [16, 32])
    train: TrajectoryTrainSettings = field(default_factory=TrajectoryTrainSettings)
    averaging: AveragingSettings = field(default_factory=AveragingSettings)
    probes: ProbeSettings = field(default_factory=ProbeSettings)
    claims: ClaimThresholds = field(default_factory=ClaimThresholds)


@dataclass
class TrajectoryExperiment:
    """A recipe's built pieces: the data, the settings, and the weight sets compared (``averagers``)."""

    config: DictConfig
    data: tuple[Tensor, Tensor, Tensor, Tensor]  # x_train [N, 1, 8, 8], y_train, x_test, y_test
    channels: list[int]
    train: TrajectoryTrainSettings
    averaging: AveragingSettings
    probes: ProbeSettings
    claims: ClaimThresholds
    averagers: dict[str, O.EMAAveraging | O.SWAAveraging | O.TwoPointAveraging]

    @property
    def seeds(self) -> SeedPlan:
        return SeedPlan(self.config.seed)


def _sections(config: DictConfig) -> tuple:
    return (settings(config.train, TrajectoryTrainSettings, "train"),
            settings(config.averaging, AveragingSettings, "averaging"),
            settings(config.probes, ProbeSettings, "probes"),
            settings(config.claims, ClaimThresholds, "claims"))


def validate(config: DictConfig, source: str) -> None:
    """Every setting checked at load time."""
    train, _, probes, _ = _sections(config)
    sequence_of("channels", list(config.channels), positive_int, owner="TrajectoryRecipe")
    if not config.channels:
        raise ConfigError(f"{source}: channels must list at least one convolution width; got []")
    if not probes.start < train.branch_at:
        raise ConfigError(f"{source}: probes.start={probes.start} must be below train.branch_at={train.branch_at} "
                          "(the curvature is measured on the recorded window)")
    points = (train.steps - probes.start) // probes.every
    if points <= (probes.dims + 1) * (probes.dims + 2) // 2:
        raise ConfigError(f"{source}: probes record {points} points, too few for a quadratic in {probes.dims} "
                          "dimensions; lower probes.start, probes.every or probes.dims")
    if config.device != "cpu" and not config.device.startswith(("cuda", "auto")):
        raise ConfigError(f"{source}: device={config.device!r}; expected cpu, cuda or auto")


def build(config: DictConfig) -> TrajectoryExperiment:
    """The digits split and the averagings."""
    train, averaging, probes, claims = _sections(config)
    x_train, y_train, x_test, y_test = load_digits_classes(list(range(10)), seed=config.seed)
    data = (x_train.view(-1, 1, 8, 8), y_train, x_test.view(-1, 1, 8, 8), y_test)
    averagers = {
        "ema": O.ema_averaging(averaging.ema_decay),
        "swa": O.swa_averaging(start=train.branch_at, every=averaging.swa_every),
        "two_point_far": O.two_point_averaging(averaging.two_point_far),
        "two_point_near": O.two_point_averaging(averaging.two_point_near),
    }
    return TrajectoryExperiment(config, data, list(config.channels), train, averaging, probes, claims, averagers)


# ---------------------------------------------------------------------- pieces
def small_cnn(channels: list[int], classes: int = 10) -> nn.Module:
    """3×3 convolutions (the second and later with stride 2), batch norm and ReLU; global average pool; linear."""
    layers, width = [], 1
    for i, out in enumerate(channels):
        layers += [nn.Conv2d(width, out, 3, stride=1 if i == 0 else 2, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
        width = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))


def _chunks(x: Tensor, y: Tensor, size: int = 512) -> list[tuple[Tensor, Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


@torch.no_grad()
def _evaluate(model: nn.Module, data: tuple[Tensor, ...]) -> dict[str, float]:
    """Test loss and accuracy with batch-norm statistics recomputed on the training split (buffers restored)."""
    x_train, _, x_test, y_test = data
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    O.recompute_batchnorm(model, [x for x, _ in _chunks(x_train, x_train)])
    model.eval()
    logits = model(x_test)
    model.train()
    for k, b in model.named_buffers():
        b.copy_(buffers[k])
    return {"test_loss": float(F.cross_entropy(logits, y_test)),
            "test_accuracy": float((logits.argmax(-1) == y_test).float().mean())}


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _sample(g: torch.Generator, n: int, size: int) -> Tensor:
    return torch.randint(n, (size,), generator=g)


def _batch(x: Tensor, y: Tensor, g: torch.Generator, size: int, shift: int) -> tuple[Tensor, Tensor]:
    """A training batch drawn with ``g``, each image moved by a random offset of up to ``shift`` pixels (zero fill)."""
    rows = _sample(g, len(x), size)
    images = x[rows]
    if shift:
        B, _, H, W = images.shape
        padded = F.pad(images, (shift,) * 4)
        dy, dx = (torch.randint(2 * shift + 1, (2, B), generator=g))
        ys = (dy[:, None] + torch.arange(H))[:, :, None]  # [B, H, 1]
        xs = (dx[:, None] + torch.arange(W))[:, None, :]  # [B, 1, W]
        images = padded[torch.arange(B)[:, None, None], 0, ys, xs].unsqueeze(1)
    return images, y[rows]


@dataclass
class _Branch:
    """A continuation from the branch step under a learning-rate schedule (a factor on the run's rate per step)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    factors: list[float]


# ---------------------------------------------------------------------- the pipeline
def execute(experiment: TrajectoryExperiment, run: Run, *, resume: bool = False, train: bool = True,
            trained: Path | None = None) -> tuple[dict[str, Any], str]:
    """Run the experiment into ``run`` (``resume``/``train=False`` run it again: see the module docstring)."""
    del resume, train, trained
    s, p = experiment.train, experiment.probes
    data = experiment.data
    x_train, y_train = data[0], data[1]
    seeds = experiment.seeds
    shown = experiment.config.progress and distributed.is_main()
    torch.manual_seed(seeds.init)
    model = small_cnn(experiment.channels)
    optimizer = O.as_torch_optimizer(O.averaged(O.sgd(s.lr, momentum=s.momentum), **experiment.averagers),
                                     model.named_parameters())
    probe_rows = _sample(generator(seeds.validation), len(x_train), p.batches * p.batch_size).view(p.batches, -1)
    fixed = [(x_train[rows], y_train[rows]) for rows in probe_rows]
    order = generator(seeds.training())
    names = ["last", *experiment.averagers]
    curves: dict[str, list[tuple[int, float, float]]] = {name: [] for name in names}
    points, losses, steps_recorded = [], [], []
    branches: dict[str, _Branch] = {}
    one_step: list[T.OneStep] = []
    model.train()

    def evaluate_all(step: int) -> None:
        for name in names:
            if name == "last":
                result = _evaluate(model, data)
            else:
                with O.swap_averaged(optimizer, name):
                    result = _evaluate(model, data)
            curves[name].append((step, result["test_loss"], result["test_accuracy"]))
            run.log({f"{name}/test_loss": result["test_loss"], f"{name}/test_accuracy": result["test_accuracy"]},
                    step=step)

    latest: dict[str, str] = {}  # the last test loss, shown beside the count
    with Progress(s.steps, "SGD run", enabled=shown, unit="step") as bar:
        for step in range(1, s.steps + 1):
            # 1. one SGD step on a fresh batch (the averages follow inside the optimizer)
            images, labels = _batch(x_train, y_train, order, s.batch_size, s.shift)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            # 2. probes: the weights and the fixed batches' losses
            if step >= p.start and (step - p.start) % p.every == 0:
                points.append(_flat(model))
                losses.append(T.batch_losses(model, fixed, F.cross_entropy))
                steps_recorded.append(step)
            # 3. evaluation
            if step % s.eval_every == 0:
                evaluate_all(step)
                run.log({"train_loss": loss.item()}, step=step)
                latest = {"test_loss": f"{curves['last'][-1][1]:.4f}"}
            # 4. the branch point: one large step, the matched schedules, the continuations
            if step == s.branch_at:
                one_step = [T.one_large_step(model, batch, F.cross_entropy, p.lrs) for batch in fixed]
                branches, isotropic = _branches(experiment, model, optimizer, one_step)
                branch_order = order.get_state()
            bar.update(1, **latest)
    logger.info("matched schedules: alpha=%.4f (lambda*=%.4g); final factors %s", isotropic["alpha"],
                isotropic["curvature_lr"], {k: round(b.factors[-1], 4) for k, b in branches.items()})
    results_branches = _run_branches(branches, branch_order, experiment, run, shown)

    fit = T.fit_quadratic(torch.stack(points), torch.stack(losses, dim=1), dims=p.dims)
    results = _results(experiment, curves, results_branches, fit, one_step, isotropic)
    results["claims"] = _claims(results, experiment.claims)
    run.save_figure(_plot_batch_losses(steps_recorded, torch.stack(losses, dim=1), fit), "batch_losses")
    y_test = data[3]
    chance = torch.bincount(y_test).max().item() / y_test.numel()
    run.save_figure(_plot_curves(curves, results_branches, s.branch_at, chance), "test_curves")
    run.save_figure(_plot_one_step(one_step), "one_large_step")
    run.save_json(results, "results")
    run.summary({f"final/{name}/test_loss": v["test_loss"] for name, v in results["final"].items()})
    run.summary({"quadratic_r2_median": results["quadratic_fit"]["r2_median"],
                 "one_step_ratio_median": results["one_large_step"]["ratio_median"]})
    return results, (f"{format_report(results)}\n\nresults: {run.path / 'results.json'}\nfigures: {run.figure_dir}\n"
                     f"run:     {run.path}")


def _branches(experiment: TrajectoryExperiment, model: nn.Module, optimizer: torch.optim.Optimizer,
              one_step: list[T.OneStep]) -> tuple[dict[str, _Branch], dict[str, float]]:
    """The continuations under the matched schedules of the EMA, the SWA and the far two-point average (and one
    at the constant rate, the control), and the model's ``alpha`` and ``curvature_lr``."""
    s, a = experiment.train, experiment.averaging
    curvature_lr = statistics.median(o.best_lr for o in one_step)  # λ* = 1 / h
    alpha = min(s.lr / (1 - s.momentum) / curvature_lr, 0.99)
    remaining = s.steps - s.branch_at
    initial = T.stationary_variance(alpha)
    targets = {
        "ema": [T.averaging_variance(alpha, "ema", decay=a.ema_decay)] * remaining,
        "swa": [T.averaging_variance(alpha, "swa", every=a.swa_every, count=k // a.swa_every + 1)
                for k in range(1, remaining + 1)],
        "two_point_far": [T.averaging_variance(alpha, "two_point", delta=a.two_point_far)] * remaining,
    }
    branches = {}
    for name, target in targets.items():
        twin = copy.deepcopy({"model": model, "optimizer": optimizer})
        factors = [rate / alpha for rate in T.matched_rates(initial, target)]
        branches[name] = _Branch(twin["model"], twin["optimizer"], factors)
    branches["constant"] = _Branch(**copy.deepcopy({"model": model, "optimizer": optimizer}),
                                   factors=[1.0] * remaining)
    return branches, {"alpha": alpha, "curvature_lr": curvature_lr}


def _run_branches(branches: dict[str, _Branch], order: Tensor, experiment: TrajectoryExperiment,
                  run: Run, shown: bool) -> dict[str, Any]:
    """Each continuation on the same batches as the main run; its test curve at the evaluation steps (``shown``:
    their progress is shown)."""
    s = experiment.train
    x_train, y_train = experiment.data[0], experiment.data[1]
    out: dict[str, Any] = {}
    steps = sum(len(branch.factors) for branch in branches.values())
    with Progress(steps, "matched-schedule branches", enabled=shown, unit="step") as bar:
        for name, branch in branches.items():
            g = torch.Generator()
            g.set_state(order)
            curve = []
            for k, factor in enumerate(branch.factors, start=1):
                images, labels = _batch(x_train, y_train, g, s.batch_size, s.shift)
                for group in branch.optimizer.param_groups:
                    group["lr"] = s.lr * factor
                branch.optimizer.zero_grad()
                F.cross_entropy(branch.model(images), labels).backward()
                branch.optimizer.step()
                step = s.branch_at + k
                if step % s.eval_every == 0:
                    result = _evaluate(branch.model, experiment.data)
                    curve.append((step, result["test_loss"], result["test_accuracy"]))
                    run.log({f"matched_{name}/test_loss": result["test_loss"],
                             f"matched_{name}/test_accuracy": result["test_accuracy"]}, step=step)
                bar.update(1, branch=name)
            out[name] = {"curve": curve, "final_factor": branch.factors[-1]}
    return out


def _final(curve: list[tuple[int, float, float]], count: int) -> dict[str, float]:
    tail = curve[-count:]
    return {"test_loss": sum(c[1] for c in tail) / len(tail), "test_accuracy": sum(c[2] for c in tail) / len(tail)}


def _results(experiment: TrajectoryExperiment, curves: dict, branches: dict, fit: T.QuadraticFit,
             one_step: list[T.OneStep], isotropic: dict[str, float]) -> dict[str, Any]:
    count = experiment.train.final_evals
    return {
        "final": {name: _final(curve, count) for name, curve in curves.items()},
        "matched": {name: {**_final(b["curve"], count), "final_lr_factor": b["final_factor"]}
                    for name, b in branches.items()},
        "model": isotropic,
        "quadratic_fit": {"r2": fit.r2.tolist(), "r2_median": float(fit.r2.median()),
                          "r2_linear": fit.r2_linear.tolist(), "curvatures": fit.curvatures.tolist(),
                          "convex": bool((fit.curvatures >= 0).all()), "explained_variance": fit.explained},
        "one_large_step": {"before": [o.before for o in one_step], "best": [o.best for o in one_step],
                           "best_lr": [o.best_lr for o in one_step],
                           "ratio_median": statistics.median(o.ratio for o in one_step)},
        "curves": {name: [list(c) for c in curve] for name, curve in curves.items()},
        "matched_curves": {name: [list(c) for c in b["curve"]] for name, b in branches.items()},
    }


def _claims(results: dict[str, Any], thresholds: ClaimThresholds) -> list[dict[str, Any]]:
    """The paper's claims with what was measured (test losses are the mean of the last evaluations)."""
    final, matched = results["final"], results["matched"]
    last = final["last"]["test_loss"]

    def gap(name: str) -> float:
        return abs(final[name]["test_loss"] - matched[name]["test_loss"]) / matched[name]["test_loss"]

    gain = {name: last - final[name]["test_loss"] for name in final}
    rows = [
        ("fixed-batch loss along the path is close to quadratic (median R²)", results["quadratic_fit"]["r2_median"],
         f">= {thresholds.quadratic_r2}", results["quadratic_fit"]["r2_median"] >= thresholds.quadratic_r2),
        ("one large step reaches a much lower batch loss (median best/before)",
         results["one_large_step"]["ratio_median"], f"<= {thresholds.one_step_ratio}",
         results["one_large_step"]["ratio_median"] <= thresholds.one_step_ratio),
        ("EMA beats the last iterate (test loss gain)", gain["ema"], "> 0", gain["ema"] > 0),
        ("SWA beats the last iterate (test loss gain)", gain["swa"], "> 0", gain["swa"] > 0),
        ("EMA matches its equivalent schedule (relative test-loss gap)", gap("ema"), f"<= {thresholds.matched_gap}",
         gap("ema") <= thresholds.matched_gap),
        ("SWA matches its equivalent schedule (relative test-loss gap)", gap("swa"), f"<= {thresholds.matched_gap}",
         gap("swa") <= thresholds.matched_gap),
        ("two points many steps apart beat the last iterate (test loss gain)", gain["two_point_far"], "> 0",
         gain["two_point_far"] > 0),
        ("two points a few steps apart beat it less (gain far - gain near)",
         gain["two_point_far"] - gain["two_point_near"], "> 0", gain["two_point_far"] > gain["two_point_near"]),
    ]
    return study.claims(rows)


def format_report(results: dict[str, Any]) -> str:
    """The final test figures of every weight set and branch, then the claims beside the measurements."""
    lines = [f"{'weights':<28}{'test loss':>11}{'test acc':>10}"]
    for name, row in results["final"].items():
        lines.append(f"{name:<28}{row['test_loss']:>11.4f}{row['test_accuracy']:>10.4f}")
    for name, row in results["matched"].items():
        label = f"matched schedule of {name}" if name != "constant" else "constant lr (branch)"
        lines.append(f"{label:<28}{row['test_loss']:>11.4f}{row['test_accuracy']:>10.4f}")
    model = results["model"]
    lines += ["", f"isotropic model: λ* = {model['curvature_lr']:.4g}, α = λ/(1-μ)/λ* = {model['alpha']:.4f}", "",
              "claims:"]
    lines += study.claim_lines(results["claims"])
    return "\n".join(lines)


# ---------------------------------------------------------------------- figures
def _plot_batch_losses(steps: list[int], losses: Tensor, fit: T.QuadraticFit):
    """Each fixed batch's loss along the SGD path (solid) and its quadratic fit (dashed, same colour)."""
    fig, (ax,) = plotting.new_figure()
    series = [plotting.Series(f"batch {b} (R² = {float(fit.r2[b]):.3f})", steps, losses[b].tolist())
              for b in range(losses.shape[0])]
    plotting.plot_series(ax, series, yscale="auto", integer_x=True,
                         include=[v for b in range(losses.shape[0]) for v in fit.fitted[b].tolist()])
    for b in range(losses.shape[0]):
        ax.plot(steps, fit.fitted[b].numpy(), color=plotting.series_style(b)["color"], lw=1.4, ls="--", label="_fit")
    ax.set(xlabel="step", ylabel="fixed-batch loss")
    subtitle = (f"the loss of {losses.shape[0]} fixed batches at the weights of each probed step · dashed: a "
                "quadratic fit in the top principal directions of the path")
    return plotting.finish(fig, "fixed-batch losses along the SGD path", subtitle)


def _plot_curves(curves: dict, branches: dict, branch_at: int, chance: float):
    """Test loss and accuracy vs step: each weight set (solid) and each matched-schedule branch (dashed); ``chance``
    is the test split's majority-label share."""
    fig, axes = plotting.new_figure(2, panel=(5.4, 4.0))
    for column, (ax, label) in enumerate(zip(axes, ("test loss", "test accuracy")), start=1):
        series = [plotting.Series(name, [c[0] for c in curve], [c[column] for c in curve], implicit=True)
                  for name, curve in curves.items()]
        series += [plotting.Series(f"matched schedule of {name}", [c[0] for c in b["curve"]],
                                   [c[column] for c in b["curve"]], implicit=False) for name, b in branches.items()]
        plotting.plot_series(ax, series, yscale="auto" if column == 1 else "linear", integer_x=True,
                             include=[chance] if column == 2 else ())
        plotting.reference_line(ax, x=branch_at, label=f"branch point (step {branch_at})")
        if column == 2:
            plotting.chance_line(ax, chance)
        ax.set(xlabel="step", ylabel=label)
    subtitle = ("on the digits test split · solid: the weights of SGD and of its averages, dashed: a branch "
                "trained on from the branch point with the schedule matched to that average")
    return plotting.finish(fig, "test loss and accuracy along training", subtitle)


def _plot_one_step(one_step: list[T.OneStep]):
    """Each fixed batch's loss after one step of each learning rate (solid), and before it (dotted)."""
    fig, (ax,) = plotting.new_figure()
    series = [plotting.Series(f"batch {b}", probe.lrs, [loss if math.isfinite(loss) else math.nan
                                                        for loss in probe.losses]) for b, probe in enumerate(one_step)]
    plotting.plot_series(ax, series, yscale="auto", include=[probe.before for probe in one_step])
    for b, probe in enumerate(one_step):
        ax.axhline(probe.before, color=plotting.series_style(b)["color"], ls=":", lw=1.2, label="_before")
    lrs = [lr for probe in one_step for lr in probe.lrs]
    ax.set_xscale(plotting.choose_scale(lrs))
    ax.set(xlabel="learning rate of the single step", ylabel="batch loss after it")
    subtitle = "one gradient step from the branch point on each fixed batch · dotted: its loss before the step"
    if any(not math.isfinite(loss) for probe in one_step for loss in probe.losses):
        subtitle += " · missing points: the loss overflowed"
    return plotting.finish(fig, "one large step on each fixed batch", subtitle)
