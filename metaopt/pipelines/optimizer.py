"""The ``optimizer`` pipeline: meta-train optimizers on training environments (Kristiansen et al. 2024).

Where the ``episodes`` pipeline trains learners on episodes and compares them, this one meta-trains
*optimizers* and compares them by the loss curves they produce. Every piece is a ``_target_`` entry of the
recipe: the environments (:mod:`metaopt.environments`, or any callable returning an
:class:`optimizers.Environment`, e.g. a user's ``make_env`` calling ``Environment.from_module``; an
``environment: {_target_: ...}`` entry is the environment meta-trained on, ahead of any ``environments``), the
hand-designed baselines (partial optimizers whose learning rate is grid-tuned, held constant or, with
``schedule: cosine``, decayed along a cosine), the learned optimizers (any ``nn.Module`` with an ``.optimizer``
factory, e.g.
:class:`optimizers.LayerwiseMixture`) and the meta-gradient estimator.

1. build the environments; the first one is where baselines are tuned and optimizers meta-trained, and its
   ``horizon`` is T;
2. tune each baseline's learning rate by grid search on the first environment at T;
3. build each learned optimizer (given ``layers`` — one per module, :func:`optimizers.layer_groups` — their
   ``layer_kinds``, ``horizon`` and the constant baselines' tuned rates as ``base_lrs`` when it takes them) and
   meta-train it with the estimator and budget of ``meta_train``;
4. evaluate every optimizer on every environment for ``horizon_factor`` × T steps, averaged over fresh seeds,
   and count the steps each needs to reach, at T and at ``horizon_factor`` × T, the reference baseline's final
   loss, the strongest baseline's (the one with the lowest final loss in that environment at that horizon) and
   every baseline's;
5. check the recipe's ``claims:`` on those results (:mod:`metaopt.pipelines.optimizer_claims`: fewer steps
   to a baseline's final loss, a lower final loss), print them under the table;
6. write ``results.json``, the loss curves and the per-layer coefficient heat-map (``figures/*.png``), the
   meta-trained optimizers (``checkpoints/*.pt``; ``optimizers/*.pt``, each one self-contained file that
   ``optimizers.load`` takes) and everything to W&B through :class:`metaopt.log.Run`.

A constant learning rate makes the first ``T`` steps of a ``2T`` run the ``T``-step run, so one run of ``2T``
steps gives both horizons. A cosine schedule decays over the length of the run it is given (see
:func:`baseline_optimizer`): it is tuned with decay over T, and evaluated by one run per horizon, decaying over
T for the results at T and over ``horizon_factor`` × T for those at that horizon; past the end of its decay it
would stay at 0, so no run goes past it. Seeds come from the run's :class:`metaopt.seeds.SeedPlan`.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

import optimizers as O
from metaopt import checkpoints, distributed, plotting, wandb_native
from metaopt.checks import one_of, positive_float, positive_int, sequence_of
from metaopt.config import (
    CommonSettings, ConfigError, build_instance, check_spec, import_target, instantiate, plain, settings,
)
from metaopt.log import Run
from metaopt.pipelines.optimizer_claims import OptimizerClaim, check_claims, claim_lines, parse_claims
from metaopt.progress import Progress
from metaopt.seeds import SeedPlan, generator
from optimizers.environments import Environment, OptimizerFactory

__all__ = [
    "BaselineSettings",
    "EvaluationSettings",
    "LrSearch",
    "MetaTrainSettings",
    "OptimizerExperiment",
    "OptimizerRecipe",
    "SCHEDULES",
    "baseline_optimizer",
    "build",
    "execute",
    "format_table",
    "meta_train",
    "steps_to_reach",
    "tune_learning_rate",
    "validate",
]

logger = logging.getLogger(__name__)

RUNTIME_ARGUMENTS = ("layers", "layer_kinds", "horizon", "base_lrs")
"""What the pipeline gives a learned optimizer's constructor, when it takes them: the first environment's
layers (one per module) and their kinds, its horizon T, and the tuned baseline learning rates
(``meta_train.tuned_base_lrs``)."""

SCHEDULES = ("constant", "cosine")
"""A baseline's learning-rate schedule (``baselines.NAME.schedule``): the tuned rate held constant, or decayed
from it to 0 along a cosine over the run (:func:`baseline_optimizer`)."""


# ---------------------------------------------------------------------- the recipe's schema
@dataclass
class BaselineSettings:
    """A hand-designed optimizer (a ``_partial_`` ``_target_`` taking the learning rate first), its grid, and
    the schedule of its learning rate (one of :data:`SCHEDULES`)."""

    optimizer: dict[str, Any] = field(default_factory=dict)
    lrs: list[float] = field(default_factory=list)
    schedule: str = "constant"

    def __post_init__(self) -> None:
        if not self.lrs:
            raise ValueError("lrs must be a non-empty list of learning rates > 0; got []")
        sequence_of("lrs", self.lrs, positive_float, owner=type(self).__name__)
        one_of("schedule", self.schedule, SCHEDULES, owner=type(self).__name__)


@dataclass
class TuningSettings:
    """Grid search of the baselines on the first environment: seeds per rate; the reference baseline."""

    seeds: int = 2
    reference: str = "adam"

    def __post_init__(self) -> None:
        positive_int("seeds", self.seeds, owner=type(self).__name__)


@dataclass
class MetaTrainSettings:
    """Meta-training of every learned optimizer: the estimator (a ``_target_``) and the outer Adam."""

    estimator: dict[str, Any] = field(
        default_factory=lambda: {"_target_": "optimizers.AntitheticES", "sigma": 0.01, "pairs": 4})
    steps: int = 100
    lr: float = 1e-2
    grad_clip: float = 1.0
    tuned_base_lrs: bool = True  # learned optimizers taking base_lrs get the baselines' tuned learning rates
    checkpoint_every: int = 25  # meta-steps between checkpoints (PES: the first step after, between inner runs)

    def __post_init__(self) -> None:
        positive_int("steps", self.steps, owner=type(self).__name__)
        positive_int("checkpoint_every", self.checkpoint_every, owner=type(self).__name__)
        positive_float("lr", self.lr, owner=type(self).__name__)
        positive_float("grad_clip", self.grad_clip, owner=type(self).__name__)


@dataclass
class EvaluationSettings:
    """Evaluation runs: seeds per optimizer and environment; horizons are T and ``horizon_factor`` × T."""

    seeds: int = 3
    horizon_factor: int = 2

    def __post_init__(self) -> None:
        for key in ("seeds", "horizon_factor"):
            positive_int(key, getattr(self, key), owner=type(self).__name__)


@dataclass
class OptimizerRecipe(CommonSettings):
    """An optimizer experiment (see the module docstring). ``environment`` holds values the entries of
    ``environments`` share by interpolation (``hidden: ${environment.hidden}``), or, with a ``_target_``, is the
    environment itself (a user's factory), meta-trained on ahead of any ``environments``."""

    pipeline: str = "optimizer"
    environment: dict[str, Any] = field(default_factory=dict)
    environments: dict[str, Any] = field(default_factory=dict)
    baselines: dict[str, BaselineSettings] = field(default_factory=dict)
    tuning: TuningSettings = field(default_factory=TuningSettings)
    learned: dict[str, Any] = field(default_factory=dict)
    meta_train: MetaTrainSettings = field(default_factory=MetaTrainSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    claims: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class OptimizerExperiment:
    """A recipe's built pieces; learned optimizers are built after tuning (they may take the tuned rates)."""

    config: DictConfig
    environments: dict[str, Environment]
    baselines: dict[str, Callable[[float], O.GradientTransformation]]
    grids: dict[str, list[float]]
    tuning: TuningSettings
    learned: dict[str, dict[str, Any]]
    estimator: Callable[[], O.GradientEstimator]  # a fresh estimator per learned optimizer (PES keeps state)
    meta_train: MetaTrainSettings
    evaluation: EvaluationSettings
    schedules: dict[str, str] = field(default_factory=dict)  # baseline -> one of SCHEDULES (absent: constant)
    claims: list[OptimizerClaim] = field(default_factory=list)

    @property
    def seeds(self) -> SeedPlan:
        return SeedPlan(self.config.seed)


def _runtime_arguments(target: Callable) -> list[str]:
    parameters = inspect.signature(target).parameters
    return [name for name in RUNTIME_ARGUMENTS if name in parameters]


def _environment_specs(config: DictConfig) -> dict[str, Any]:
    """The recipe's environments by name: ``environment`` first when it has a ``_target_``, then ``environments``."""
    own = {"environment": config.environment} if "_target_" in config.environment else {}
    return {**own, **config.environments}


def _check_shared_values(config: DictConfig, source: str) -> None:
    """Every key of ``environment`` is used by an ``${environment.KEY}`` of ``environments`` (else: a misspelling)."""
    if "_target_" in config.environment:  # its keys are the factory's arguments
        return
    used = set(re.findall(r"\$\{environment\.(\w+)", str(OmegaConf.to_container(config.environments, resolve=False))))
    unused = sorted(set(config.environment) - used)
    if unused:
        raise ConfigError(f"{source}: environment.{unused[0]} is not used by any environment (they use "
                          f"{sorted(used)}); set it in an entry of environments or interpolate it as "
                          f"${{environment.{unused[0]}}}")


def validate(config: DictConfig, source: str) -> None:
    """Every check that needs nothing built: the ``_target_`` entries and their arguments, the settings."""
    if config.device.startswith("cuda"):
        raise ConfigError(f"{source}: device={config.device}: optimizer recipes run on the CPU (their environments "
                          "are small networks); leave device=cpu or auto")
    if config.precision != "fp32" or config.compile:
        raise ConfigError(f"{source}: precision={config.precision}, compile={config.compile}: optimizer recipes run "
                          "their inner loops in float32 and eagerly; leave precision=fp32 and compile=false")
    if not _environment_specs(config):
        raise ConfigError(f"{source}: environments is empty; name at least one with a _target_ "
                          "(e.g. metaopt.environments.digits_finetuning)")
    _check_shared_values(config, source)
    if "_target_" in config.environment:
        if "environment" in config.environments:
            raise ConfigError(f"{source}: environments.environment clashes with the environment: {{_target_: ...}} "
                              "entry (both would be named 'environment'); rename it")
        check_spec(config.environment, "environment")
    for name, spec in config.environments.items():
        check_spec(spec, f"environments.{name}")
    if not config.baselines:
        raise ConfigError(f"{source}: baselines is empty; the reference baseline must be one of them")
    for name, spec in config.baselines.items():
        baseline = settings(spec, BaselineSettings, f"baselines.{name}")
        check_spec({**baseline.optimizer, "_partial_": True}, f"baselines.{name}.optimizer")
    tuning = settings(config.tuning, TuningSettings, "tuning")
    if tuning.reference not in config.baselines:
        raise ConfigError(f"{source}: tuning.reference={tuning.reference!r} is not one of the baselines "
                          f"{list(config.baselines)}")
    for name, spec in config.learned.items():
        if not isinstance(spec, DictConfig) or "_target_" not in spec:
            raise ConfigError(f"learned.{name} needs a _target_ (e.g. optimizers.LayerwiseMixture)")
        target = import_target(spec["_target_"], f"learned.{name}")
        check_spec(spec, f"learned.{name}", supplied=[a for a in _runtime_arguments(target) if a not in spec])
    meta_train = settings(config.meta_train, MetaTrainSettings, "meta_train")
    estimator = import_target(meta_train.estimator.get("_target_"), "meta_train.estimator")
    if not (isinstance(estimator, type) and issubclass(estimator, O.GradientEstimator)):
        raise ConfigError(f"meta_train.estimator._target_ must be an optimizers.GradientEstimator (AntitheticES, PES, "
                          f"TruncatedBackprop, FullBackprop); got {meta_train.estimator['_target_']!r}")
    check_spec(meta_train.estimator, "meta_train.estimator")
    settings(config.evaluation, EvaluationSettings, "evaluation")
    _claims(config)


def _claims(config: DictConfig) -> list[OptimizerClaim]:
    """The recipe's claims, every name checked against its optimizers, environments and horizons."""
    factor = settings(config.evaluation, EvaluationSettings, "evaluation").horizon_factor
    return parse_claims(config.claims, optimizers=[*config.baselines, *config.learned],
                        baselines=list(config.baselines), environments=list(_environment_specs(config)),
                        horizons=_horizon_labels(factor))


def _horizon_labels(factor: int) -> list[str]:
    """The evaluation horizons' labels, T and ``factor`` × T: keys of the results and of claims' ``horizons``."""
    return ["T", f"{factor}T"]


def build(config: DictConfig) -> OptimizerExperiment:
    """The environments, the baselines' factories and the estimator; learned optimizers stay specs until tuned."""
    environments = {name: build_instance(spec, f"environments.{name}", Environment)
                    for name, spec in _environment_specs(config).items()}
    baselines, grids, schedules = {}, {}, {}
    for name, spec in config.baselines.items():
        baseline = settings(spec, BaselineSettings, f"baselines.{name}")
        baselines[name] = instantiate({**baseline.optimizer, "_partial_": True}, f"baselines.{name}.optimizer")
        grids[name] = [float(lr) for lr in baseline.lrs]
        schedules[name] = baseline.schedule
    meta_train = settings(config.meta_train, MetaTrainSettings, "meta_train")
    estimator = instantiate({**meta_train.estimator, "_partial_": True}, "meta_train.estimator")
    tuning = settings(config.tuning, TuningSettings, "tuning")
    return OptimizerExperiment(config, environments, baselines, grids, tuning,
                               {name: plain(spec) for name, spec in config.learned.items()}, estimator, meta_train,
                               settings(config.evaluation, EvaluationSettings, "evaluation"), schedules,
                               _claims(config))


# ---------------------------------------------------------------------- pieces
def baseline_optimizer(make: Callable[..., O.GradientTransformation], schedule: str, lr: float,
                       steps: int) -> O.GradientTransformation:
    """The baseline ``make`` at learning rate ``lr`` for a run of ``steps`` updates.

    ``constant``: ``lr`` at every update. ``cosine``: ``lr_t = lr · (1 + cos(π t / steps)) / 2`` at update
    ``t = 0 … steps - 1`` (:func:`optimizers.cosine_decay_schedule`; it reaches 0 at ``t = steps``, the update
    after the last, and would stay at 0 past it), so a run decays over exactly its own length.

    Raises:
        ValueError: ``schedule`` is not one of :data:`SCHEDULES`.
    """
    if schedule == "constant":
        return make(lr)
    if schedule == "cosine":
        return make(O.cosine_decay_schedule(lr, steps))
    raise ValueError(f"schedule must be one of {list(SCHEDULES)}; got {schedule!r}")


@dataclass(frozen=True)
class LrSearch:
    """The result of :func:`tune_learning_rate`."""

    best: float
    scores: dict[float, float]  # learning rate -> mean final loss (inf when a run diverged)


def tune_learning_rate(
    environment: Environment,
    make: Callable[[float], O.GradientTransformation],
    grid: Sequence[float],
    *,
    steps: int,
    seeds: Sequence[int],
    on_curve: Callable[[], None] = lambda: None,
) -> LrSearch:
    """The learning rate of ``grid`` with the lowest mean whole-set training loss after ``steps`` steps
    (``on_curve`` is called after each training run, one per rate and seed)."""
    if not grid:
        raise ValueError("the learning-rate grid is empty; give at least one value")
    scores = {}
    for lr in grid:
        finals = []
        for seed in seeds:
            finals.append(float(environment.curve(lambda _, lr=lr: make(lr), None, steps, generator(seed))[-1]))
            on_curve()
        mean = sum(finals) / len(finals)
        scores[float(lr)] = mean if math.isfinite(mean) else math.inf
    return LrSearch(min(scores, key=scores.get), scores)


def steps_to_reach(curve: torch.Tensor, target: float) -> int | None:
    """The first step at which ``curve`` (loss before training, then after each step) is at or below ``target``."""
    hits = torch.nonzero(curve <= target)
    return int(hits[0]) if len(hits) else None


def meta_train(
    module: nn.Module,
    environment: Environment,
    estimator: O.GradientEstimator,
    *,
    steps: int,
    lr: float,
    grad_clip: float,
    generator: torch.Generator,
    log: Callable[[dict[str, float]], None] = lambda metrics: None,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 25,
) -> list[float]:
    """Meta-train ``module``'s parameters with Adam on ``estimator``'s gradients; returns the finite meta-losses.

    An estimate with a non-finite loss or gradient (a perturbed inner run diverged) is logged and skipped.
    With ``checkpoint_dir``, the module, the outer Adam, the generator and the losses are saved every
    ``checkpoint_every`` meta-steps (``step_<N>.pt``), and a call finding checkpoints there continues from the
    newest one exactly. A PES estimator's inner runs in flight are not saved: it checkpoints at the first due
    step where its runs are complete, so resuming starts new runs as the uninterrupted run does.
    """
    outer = torch.optim.Adam(module.parameters(), lr=lr)
    losses: list[float] = []
    done = 0
    if checkpoint_dir is not None:
        path, state = checkpoints.newest_readable(checkpoint_dir, owner=checkpoint_dir.name)
        if state is not None:
            module.load_state_dict(state["module"])
            outer.load_state_dict(state["outer"])
            generator.set_state(state["generator"])
            losses, done = list(state["losses"]), int(state["step"])
            logger.info("resumed meta-training of %s from %s (meta-step %d)", checkpoint_dir.name, path, done)
    due = done + checkpoint_every
    for step in range(done, steps):
        # 1. estimate the meta-gradient at the current meta-parameters
        meta = {k: v.detach() for k, v in module.named_parameters()}
        estimate = estimator.estimate(environment, module.optimizer, meta, generator=generator)
        # 2. skip estimates spoiled by a diverged inner run; otherwise clip and step
        finite = math.isfinite(estimate.loss) and all(torch.isfinite(g).all() for g in estimate.grads.values())
        log({"meta_step": step, "meta_loss": estimate.loss, "skipped": float(not finite), **estimate.metrics})
        if finite:
            for name, p in module.named_parameters():
                p.grad = estimate.grads[name].to(p.dtype)
            torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
            outer.step()
            losses.append(estimate.loss)
        if checkpoint_dir is not None and (step + 1 >= due or step + 1 == steps) and _between_runs(estimator,
                                                                                                 environment):
            checkpoints.save({"module": module.state_dict(), "outer": outer.state_dict(),
                              "generator": generator.get_state(), "losses": losses, "step": step + 1},
                             checkpoint_dir / f"step_{step + 1:08d}.pt")
            due = step + 1 + checkpoint_every
    if not losses:
        raise RuntimeError(f"every one of {steps} meta-gradient estimates was non-finite; lower "
                           "meta_train.estimator.sigma "
                           "or the base learning rates")
    return losses


def _between_runs(estimator: O.GradientEstimator, environment: Environment) -> bool:
    """Whether the estimator holds no inner run in progress (only PES carries runs across calls)."""
    if not isinstance(estimator, O.PES):
        return True
    return estimator.step in (0, estimator.steps or environment.horizon)


def _layers(environment: Environment) -> tuple[dict[str, list[str]], dict[str, str]]:
    """One mixture layer per module, ``{"0": ["0.weight", "0.bias"], ...}``, and each layer's kind."""
    params = environment.init(lambda _: O.sgd(0.0), None, generator(0)).params
    groups = O.layer_groups(params)
    return groups, O.layer_kinds(params, groups)


def _build_learned(name: str, spec: dict[str, Any], environment: Environment,
                   tuned: dict[str, float] | None) -> nn.Module:
    """A learned optimizer from its spec, given the runtime arguments its constructor takes."""
    spec = dict(spec)
    target = import_target(spec["_target_"], f"learned.{name}")
    layers, kinds = _layers(environment)
    runtime = {"layers": layers, "layer_kinds": kinds, "horizon": environment.horizon}
    if tuned is not None:
        runtime["base_lrs"] = {**(spec.pop("base_lrs", None) or {}), **tuned}
    supplied = {key: value for key, value in runtime.items() if key in _runtime_arguments(target) and key not in spec}
    module = build_instance(spec, f"learned.{name}", nn.Module, **supplied)
    if not callable(getattr(module, "optimizer", None)):
        raise ConfigError(f"learned.{name}: {type(module).__name__} has no .optimizer factory; a learned optimizer "
                          "is an nn.Module whose .optimizer(...) returns a GradientTransformation")
    return module


def _layer_labels(environment: Environment, layers: Sequence[str]) -> list[str]:
    """Each mixture layer named as the model names it, with its shape: ``"0 (matrix 64→32)"``, the last ``head``."""
    params = environment.init(lambda _: O.sgd(0.0), None, generator(0)).params
    groups = O.layer_groups(params)
    kinds = O.layer_kinds(params, groups)
    labels = []
    for i, layer in enumerate(layers):
        shapes = sorted((tuple(params[k].shape) for k in groups.get(layer, [])), key=len, reverse=True)
        kind = kinds.get(layer, "")
        shape = f" {shapes[0][1]}→{shapes[0][0]}" if shapes and len(shapes[0]) >= 2 else ""
        role = ", head" if i == len(layers) - 1 and len(layers) > 1 else ""
        labels.append(f"{layer or '(top level)'} ({kind}{shape}{role})")
    return labels


def _plot_curves(curves: dict[str, dict[str, torch.Tensor]], targets: dict[str, float], horizon: int,
                 reference: str, learned: Sequence[str], seeds: int, title: str,
                 short: dict[str, dict[str, torch.Tensor]] | None = None):
    """Training loss vs step per environment: learned optimizers solid, tuned baselines dashed; ``short`` adds,
    per environment, the T-step runs of scheduled baselines (their schedule spanning T, not the whole run)."""
    fig, axes = plotting.new_figure(len(curves), panel=(5.2, 4.0))
    for ax, (env_name, by_optimizer) in zip(axes, curves.items()):
        series = [plotting.Series(name, list(range(len(curve))), curve.tolist(), implicit=name in learned)
                  for name, curve in by_optimizer.items()]
        series += [plotting.Series(f"{name} (schedule over T)", list(range(len(curve))), curve.tolist(),
                                   implicit=False) for name, curve in (short or {}).get(env_name, {}).items()]
        plotting.plot_series(ax, series, yscale="auto", integer_x=True, include=[targets[env_name]])
        plotting.reference_line(ax, x=horizon, label=f"horizon T = {horizon} (meta-training unroll)")
        plotting.reference_line(ax, y=targets[env_name], label=f"tuned {reference}'s loss at T", style="--")
        ax.set(title=env_name, xlabel="step", ylabel="training loss")
    subtitle = (f"training loss, mean over {seeds} evaluation seed{'s' if seeds != 1 else ''} (no interval) · "
                "solid: learned optimizers, dashed: grid-tuned baselines")
    return plotting.finish(fig, f"{title}: training loss per environment", subtitle)


def _plot_coefficients(alphas: torch.Tensor, layers: list[str], directions: list[str], horizon: int, title: str):
    """``alphas`` [steps, layers, directions]: one heat map (layers × steps) per base direction, one colour range
    centred at 0 for all of them."""
    steps, height = alphas.shape[0], 0.7 + 0.42 * len(layers)
    fig, axes = plotting.new_figure(1, len(directions), panel=(max(7.0, min(12.0, 0.12 * steps + 4)), height),
                                    sharex=True)
    norm = plotting.symmetric_norm(alphas.flatten().tolist())
    image = None
    for b, (ax, direction) in enumerate(zip(axes, directions)):
        values = alphas[:, :, b].T
        image = plotting.heatmap(ax, values.numpy(), cmap="RdBu_r", norm=norm, ylabels=layers)
        ax.axvline(horizon - 0.5, color="black", ls=":", lw=1.2)
        ax.set_ylabel("layer")
        ax.set_title(f"{direction}: α from {values.min().item():.3g} to {values.max().item():.3g}", loc="left")
        plotting.integer_ticks(ax)
    axes[-1].set_xlabel(f"step (dotted: the meta-training horizon T = {horizon})")
    plotting.colorbar(fig, image, axes, "coefficient α (0: direction unused)")
    subtitle = ("the coefficient α of each base direction per layer and step, on the first environment's first "
                "evaluation seed · one colour range for every direction, centred at 0")
    return plotting.finish(fig, f"{title}: LayerwiseMixture coefficients", subtitle, legend="none")


# ---------------------------------------------------------------------- the pipeline
def execute(experiment: OptimizerExperiment, run: Run, *, resume: bool = False, train: bool = True,
            trained: Path | None = None) -> tuple[dict[str, Any], str]:
    """Run the whole experiment into ``run``; returns the results (also written to ``results.json``) and the
    report.

    ``resume`` continues each learned optimizer's meta-training from its newest checkpoint (a finished one is
    not trained again); ``train=False`` loads the meta-trained optimizers of the run folder ``trained`` and
    evaluates again. Tuning the baselines is deterministic (the seed plan), so it is simply repeated.
    """
    seeds, m, ev = experiment.seeds, experiment.meta_train, experiment.evaluation
    environments = experiment.environments
    first = next(iter(environments.values()))
    horizon = first.horizon
    long = horizon * ev.horizon_factor
    reference = experiment.tuning.reference

    shown = experiment.config.progress and distributed.is_main()

    # 1. tuned baselines on the first environment at T
    tune_seeds = [seeds.baseline_tuning(i) for i in range(experiment.tuning.seeds)]
    runs = sum(len(grid) for grid in experiment.grids.values()) * len(tune_seeds)
    schedules = {name: experiment.schedules.get(name, "constant") for name in experiment.baselines}
    with Progress(runs, "tune baselines", enabled=shown, unit="run") as bar:
        searches = {name: tune_learning_rate(first, lambda lr, make=make, name=name: baseline_optimizer(
                                                 make, schedules[name], lr, horizon),
                                             experiment.grids[name], steps=horizon, seeds=tune_seeds,
                                             on_curve=lambda name=name: bar.update(1, baseline=name))
                    for name, make in experiment.baselines.items()}
    for name, search in searches.items():
        logger.info("tuned %s: lr=%g (grid scores %s)", name, search.best, search.scores)
    run.summary({f"tuned_lr/{name}": search.best for name, search in searches.items()})

    # 2. meta-training (with the constant baselines' tuned rates, α = 1 on Adam starts the mixture at tuned Adam)
    tuned = ({name: s.best for name, s in searches.items() if schedules[name] == "constant"} if m.tuned_base_lrs
             else None)
    learned = {name: _build_learned(name, spec, first, tuned) for name, spec in experiment.learned.items()}
    meta_results = {}
    if not train:
        meta_results = _load_meta_trained(learned, trained)
    for index, (name, module) in enumerate(learned.items() if train else ()):
        start = time.perf_counter()
        done = _checkpointed_step(run, name) if resume else 0
        if resume:  # the rows of meta-steps after the checkpoint are logged again
            key = f"{name}/meta_step"
            run.discard_rows(lambda row: row.get(key, -1) >= done)
        bar = Progress(m.steps, f"meta-train {name}", enabled=shown, unit="meta-step", initial=done)

        def log(metrics: dict[str, float], name: str = name, bar: Progress = bar) -> None:
            run.log({f"{name}/{k}": v for k, v in metrics.items()})
            bar.update(1, meta_loss=f"{metrics['meta_loss']:.4f}")

        with bar:
            losses = meta_train(module, first, experiment.estimator(), steps=m.steps, lr=m.lr,
                                grad_clip=m.grad_clip, generator=generator(seeds.meta_training(index)), log=log,
                                checkpoint_dir=run.checkpoint_dir / name if run.writes else None,
                                checkpoint_every=m.checkpoint_every)
        meta_results[name] = {"first_meta_loss": losses[0], "last_meta_loss": losses[-1],
                              "seconds": time.perf_counter() - start, "meta_steps": m.steps}
        if run.writes:
            checkpoints.save(module.state_dict(), run.checkpoint_dir / f"{name}.pt")
        logger.info("meta-trained %s: meta-loss %.4f -> %.4f", name, losses[0], losses[-1])

    # 3. evaluation: every optimizer on every environment for `long` steps, mean over fresh seeds; a scheduled
    #    baseline once per horizon, its schedule spanning that run
    horizons = dict(zip(_horizon_labels(ev.horizon_factor), (horizon, long)))

    def factory(name: str, steps: int) -> OptimizerFactory:
        if name in learned:
            return learned[name].optimizer
        make, lr = experiment.baselines[name], searches[name].best
        return lambda _: baseline_optimizer(make, schedules[name], lr, steps)

    lengths = {name: sorted(set(horizons.values())) if schedules.get(name, "constant") != "constant" else [long]
               for name in [*experiment.baselines, *learned]}
    eval_seeds = [seeds.evaluation(i) for i in range(ev.seeds)]
    curves: dict[str, dict[str, torch.Tensor]] = {}
    scheduled_curves: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    evaluation: dict[str, Any] = {}
    total = len(environments) * sum(len(steps) for steps in lengths.values()) * len(eval_seeds)
    with torch.no_grad(), Progress(total, "evaluate", enabled=shown, unit="run") as bar:
        for env_name, env in environments.items():
            by_length: dict[str, dict[int, torch.Tensor]] = {}
            for name, steps_list in lengths.items():
                by_length[name] = {}
                for steps in steps_list:
                    runs = []
                    for s in eval_seeds:
                        runs.append(env.curve(factory(name, steps), None, steps, generator(s)))
                        bar.update(1, environment=env_name)
                    by_length[name][steps] = torch.stack(runs).mean(0)
            curves[env_name] = {name: runs[long] for name, runs in by_length.items()}
            scheduled_curves[env_name] = {name: {label: runs[steps] for label, steps in horizons.items()}
                                          for name, runs in by_length.items() if len(runs) > 1}
            per_horizon = {label: {name: runs.get(steps, runs[long]) for name, runs in by_length.items()}
                           for label, steps in horizons.items()}
            evaluation[env_name] = _horizon_results(per_horizon, horizons, reference, list(experiment.baselines))

    # 4. figures and results
    for name, module in learned.items():
        if hasattr(module, "direction_names"):  # a mixture: its coefficients per layer and step
            alphas = []
            first.curve(module.optimizer, None, long, generator(eval_seeds[0]),
                        on_step=lambda s: alphas.append(s.opt_state.coefficients))
            figure_name = "coefficients" if len(learned) == 1 or name == "layerwise_mixture" else f"coefficients_{name}"
            run.save_figure(_plot_coefficients(torch.stack(alphas).float(), _layer_labels(first, module.layer_names),
                                               module.direction_names, horizon, name), figure_name)
    run.save_figure(_plot_curves(curves, {k: v["T"]["reference_final_loss"] for k, v in evaluation.items()}, horizon,
                                 reference, list(learned), ev.seeds, experiment.config.name,
                                 {env: {name: by["T"] for name, by in rows.items()}
                                  for env, rows in scheduled_curves.items()}), "loss_curves")
    results = {
        "horizon": horizon,
        "reference": reference,
        "tuned_learning_rates": {name: {"best": s.best, "grid": s.scores} for name, s in searches.items()},
        "meta_training": meta_results,
        "evaluation": evaluation,
        "curves": {env: {name: c.tolist() for name, c in by.items()} for env, by in curves.items()},
        "scheduled_curves": {env: {name: {label: c.tolist() for label, c in by.items()} for name, by in rows.items()}
                             for env, rows in scheduled_curves.items() if rows},
        "evaluation_seeds": ev.seeds,
        "claims": check_claims(experiment.claims, evaluation),
    }
    run.save_json(results, "results")
    if train and run.writes:
        _save_learned_files(run, learned, results)
    wandb_native.log_optimizers(run, meta_results)
    run.summary({f"{env}/{h}/{name}/{key}": r[key]
                 for env, by_h in evaluation.items() for h, rows in by_h.items()
                 for name, r in rows["optimizers"].items()
                 for key in ("steps_to_reference_final", "steps_to_best_baseline_final")})
    return results, (f"{format_table(results)}\n\nresults: {run.path / 'results.json'}\nfigures: {run.figure_dir}\n"
                     f"run:     {run.path}")


def _save_learned_files(run: Run, learned: dict[str, nn.Module], results: dict[str, Any]) -> None:
    """Each meta-trained ``LayerwiseMixture`` / ``PerParameterMLP`` as one self-contained file
    ``optimizers/<name>.pt`` (``optimizers.load`` takes it): the recipe, and its meta-training and evaluation."""
    recipe = json.loads(json.dumps(run.config, default=str))
    for name, module in learned.items():
        if type(module) not in O.saving.CLASSES.values():  # a class of the user's own: its checkpoint only
            continue
        evaluation = {env: {h: {"steps": rows["steps"], "reference_final_loss": rows["reference_final_loss"],
                                "best_baseline": rows["best_baseline"],
                                "best_baseline_final_loss": rows["best_baseline_final_loss"],
                                **rows["optimizers"][name]} for h, rows in by_h.items()}
                      for env, by_h in results["evaluation"].items()}
        metrics = {"reference": results["reference"], "meta_training": results["meta_training"][name],
                   "evaluation": evaluation}
        checkpoints.save(O.learned_optimizer_file(module, recipe=recipe, metrics=metrics),
                         run.path / "optimizers" / f"{name}.pt")


def _checkpointed_step(run: Run, name: str) -> int:
    """The meta-step the newest checkpoint of learned optimizer ``name`` continues from (0: none)."""
    path = checkpoints.latest(run.checkpoint_dir / name)
    return int(path.stem.split("_")[1]) if path is not None else 0


def _load_meta_trained(learned: dict[str, nn.Module], trained: Path) -> dict[str, Any]:
    """Load each learned optimizer's final weights from the run folder ``trained``; its meta-training record."""
    for name, module in learned.items():
        path = trained / "checkpoints" / f"{name}.pt"
        if not path.is_file():
            raise ConfigError(f"{trained} has no meta-trained {name!r} ({path} is missing); continue the run with "
                              f"`metaopt resume {trained}`")
        module.load_state_dict(checkpoints.load(path))
    results = trained / "results.json"
    return json.loads(results.read_text()).get("meta_training", {}) if results.is_file() else {}


def _horizon_results(curves: dict[str, dict[str, torch.Tensor]], horizons: dict[str, int], reference: str,
                     baselines: Sequence[str]) -> dict[str, Any]:
    """Per horizon (``curves[label][optimizer]``, at least ``horizons[label] + 1`` long): the reference's final
    loss, the strongest of ``baselines`` (the lowest final loss) and its final loss, and each optimizer's final
    loss and steps to reach each of the two and each baseline's final loss."""
    out = {}
    for label, steps in horizons.items():
        by_name = curves[label]
        target = float(by_name[reference][steps])
        reference_steps = steps_to_reach(by_name[reference][: steps + 1], target)
        best = min(baselines, key=lambda name: _finite_or_inf(float(by_name[name][steps])))
        best_target = float(by_name[best][steps])
        rows = {}
        for name, curve in by_name.items():
            reached = steps_to_reach(curve[: steps + 1], target)
            rows[name] = {"final_loss": float(curve[steps]), "steps_to_reference_final": reached,
                          "speedup_vs_reference": None if reached is None else reference_steps / max(reached, 1),
                          "steps_to_best_baseline_final": steps_to_reach(curve[: steps + 1], best_target),
                          "steps_to_baseline_final": {b: steps_to_reach(curve[: steps + 1], float(by_name[b][steps]))
                                                      for b in baselines}}
        out[label] = {"steps": steps, "reference_final_loss": target, "best_baseline": best,
                      "best_baseline_final_loss": best_target, "optimizers": rows}
    return out


def _finite_or_inf(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table: final loss and steps to the tuned reference's and to the strongest baseline's final
    loss (that baseline marked ``*``), per environment and horizon."""
    reach = f"steps to {results['reference']}"
    lines = [f"{'environment':<22}{'horizon':<9}{'optimizer':<28}{'final loss':>12}{reach:>15}{'steps to best*':>16}"]

    def steps(value: int | None) -> str:
        return "never" if value is None else str(value)

    for env, by_h in results["evaluation"].items():
        for label, rows in by_h.items():
            for name, row in rows["optimizers"].items():
                shown = f"{name}*" if name == rows.get("best_baseline") else name
                best = steps(row["steps_to_best_baseline_final"]) if "steps_to_best_baseline_final" in row else "-"
                lines.append(f"{env:<22}{label:<9}{shown:<28}{row['final_loss']:>12.4f}"
                             f"{steps(row['steps_to_reference_final']):>15}{best:>16}")
    lines.append("* the strongest baseline: the lowest final loss in that environment at that horizon")
    if results.get("claims"):
        lines += ["", "claims:", *claim_lines(results["claims"], results.get("evaluation_seeds", 1))]
    return "\n".join(lines)
