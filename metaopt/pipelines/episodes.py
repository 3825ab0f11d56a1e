"""The ``episodes`` pipeline: meta-train a recipe's learners on a task family, then compare them on the same episodes.

1. ``validate`` (at load time): every section as its settings dataclass, every ``_target_`` importable with
   the arguments given, claims about learners and support sizes the comparison has, ``evaluate:`` hooks
   that take what they are given;
2. ``build``: the task family, the evaluation family and the learners;
3. ``execute``: meta-train every learner with meta-parameters (resuming from checkpoints), or load them,
   compare all of them, report, then run the ``evaluate:`` hooks.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metaopt import checkpoints, distributed
from metaopt import compare as comparing
from metaopt import wandb_native
from metaopt.analysis.suite import parse_analyses
from metaopt.analysis.tracking import plot_tracked, sensitivity_references, sensitivity_tracker
from metaopt.compare import ClaimSpec, CompareSettings, Comparison
from metaopt.config import (
    CommonSettings, ConfigError, build_instance, check_spec, describe, import_target, plain, settings,
)
from metaopt.episodes import Episode
from metaopt.learners.base import Learner
from metaopt.log import Run
from metaopt.progress import format_duration
from metaopt.seeds import SeedPlan
from metaopt.tasks.base import TaskFamily
from metaopt.train import MetaTrainer, TrainSettings

__all__ = ["EpisodeRecipe", "EpisodeExperiment", "HOOK_ARGUMENTS", "build", "execute", "implied_overrides", "validate"]

logger = logging.getLogger(__name__)

HOOK_ARGUMENTS = ("learners", "family", "train_family", "run", "seeds", "device")
"""What an ``evaluate:`` hook may take by name, besides its options: the built learners (trained), the
evaluation family, the training family, the :class:`metaopt.log.Run`, the run's :class:`metaopt.seeds.SeedPlan`
and the device."""


@dataclass
class EpisodeRecipe(CommonSettings):
    """A recipe of learners on episodes: ``task`` and ``learners`` are ``_target_`` blocks (a learner may add
    its own ``train:`` block over ``train``; a ``train.*`` override reaches it all the same, see
    :func:`implied_overrides`); ``evaluate`` lists extra evaluations run after the comparison, ``_target_``
    callables that take any of :data:`HOOK_ARGUMENTS` by name plus their options."""

    task: dict[str, Any] = field(default_factory=dict)
    learners: dict[str, Any] = field(default_factory=dict)
    train: TrainSettings = field(default_factory=TrainSettings)
    compare: CompareSettings = field(default_factory=CompareSettings)
    claims: list[ClaimSpec] = field(default_factory=list)
    evaluate: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class EpisodeExperiment:
    """A recipe's built components: ``family`` trains, ``eval_family`` (often the same) is compared on."""

    config: DictConfig
    family: TaskFamily
    eval_family: TaskFamily
    learners: dict[str, Learner]
    train: dict[str, TrainSettings]
    compare: CompareSettings
    claims: list[ClaimSpec]
    evaluations: list[tuple[Callable, dict[str, Any]]]

    @property
    def seeds(self) -> SeedPlan:
        return SeedPlan(self.config.seed)


# ---------------------------------------------------------------------- validation (load time)
def train_settings(config: DictConfig, learner: str) -> TrainSettings:
    """The training settings of one learner: ``train`` with the learner's own ``train:`` block on top."""
    own = config.learners[learner].get("train")
    where = f"learners.{learner}.train" if own is not None else "train"
    try:
        merged = OmegaConf.merge(config.train, own) if own is not None else config.train
    except OmegaConfBaseException as error:  # a key or type error in the learner's block
        raise ConfigError(f"{where}: {describe(error)}") from error
    return settings(merged, TrainSettings, where)


def _key(override: str) -> str:
    return override.partition("=")[0].strip()


def implied_overrides(config: DictConfig, overrides: Sequence[str]) -> list[str]:
    """The overrides that ``overrides`` imply, applied after them: the rule for ``train.*`` overrides.

    A ``train.KEY=VALUE`` override applies to every learner, also to a learner whose own ``train:`` block sets
    KEY (which wins over the recipe's ``train:`` otherwise), so ``train.steps=30`` shrinks the whole run. An
    override that names the learner (``learners.maml.train.steps=10``, or ``learners.maml=...`` /
    ``learners=...`` giving its block) wins over ``train.KEY`` in whatever order the two are given: it is
    applied again after the ones carried into the learner's block.

    Args:
        config: the recipe with ``overrides`` applied (which learners have a ``train:`` block).
        overrides: the ``key=value`` overrides as given.
    """
    top = [item for item in overrides if _key(item) == "train" or _key(item).startswith("train.")]
    own = [name for name, spec in config.learners.items() if isinstance(spec, DictConfig) and "train" in spec]
    if not top or not own:
        return []

    def names_learner(item: str, name: str) -> bool:  # the learner's block, its train: block or a key in it
        key, block = _key(item), f"learners.{name}.train"
        return key in ("learners", f"learners.{name}", block) or key.startswith(f"{block}.")

    carried = [f"learners.{name}.{item.strip()}" for name in own for item in top]
    return carried + [item for item in overrides if any(names_learner(item, name) for name in own)]


def evaluation_task_spec(config: DictConfig) -> DictConfig:
    """The task spec compare evaluates on: ``compare.task`` merged over ``task`` (its ``_target_`` replaces it)."""
    if "_target_" in config.compare.task:
        return config.compare.task
    return OmegaConf.merge(config.task, config.compare.task)


def _hook(spec: DictConfig, where: str) -> tuple[Callable, dict[str, Any]]:
    """An ``evaluate:`` entry as (callable, options), refusing one that cannot be called with what it gets.

    A hook may carry ``check_options(**options)``, which raises ValueError on a bad value: it runs here, when the
    recipe is loaded, so a bad option fails before any training."""
    if "_target_" not in spec:
        raise ConfigError(f"{where} needs a _target_ naming a callable fn(learners=..., run=..., **options)")
    options = plain(spec)
    path = options.pop("_target_")
    target = import_target(path, where)
    parameters = inspect.signature(target).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unknown = [] if takes_any else [key for key in options if key not in parameters]
    needed = [n for n, p in parameters.items() if p.default is inspect.Parameter.empty
              and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in options]
    missing = [n for n in needed if n not in HOOK_ARGUMENTS]
    if unknown or missing:
        problem = f"does not take {unknown}" if unknown else f"needs {missing}"
        raise ConfigError(f"{where}: {path} {problem}; an evaluate hook takes its options and any of "
                          f"{list(HOOK_ARGUMENTS)} by name (it takes {list(parameters)})")
    check = getattr(target, "check_options", None)
    if callable(check):
        try:
            check(**{k: v for k, v in options.items() if k in inspect.signature(check).parameters})
        except ValueError as error:
            raise ConfigError(f"{where}: {error}") from error
    return target, options


def validate(config: DictConfig, source: str) -> None:
    """Every check that needs no built component: sections, ``_target_`` arguments, claims, hooks."""
    if "_target_" not in config.task:
        raise ConfigError(f"{source}: task needs a _target_ (e.g. metaopt.tasks.LinearRegression)")
    check_spec(config.task, "task", expected=TaskFamily)
    if not config.learners:
        raise ConfigError(f"{source}: learners is empty; name at least one learner with a _target_")
    for name, spec in config.learners.items():
        if not isinstance(spec, DictConfig) or "_target_" not in spec:
            raise ConfigError(f"{source}: learners.{name} needs a _target_ (e.g. metaopt.learners.Ridge)")
        check_spec({k: v for k, v in spec.items() if k != "train"}, f"learners.{name}", expected=Learner)
        train_settings(config, name)
    compare = settings(config.compare, CompareSettings, "compare")
    analyses = [spec.name for spec in parse_analyses(compare.analysis)]
    for i, claim in enumerate(config.claims):
        try:
            settings(claim, ClaimSpec, f"claims[{i}]").check_names(list(config.learners), compare.support_sizes,
                                                                   analyses)
        except ValueError as error:
            message = str(error)
            raise ConfigError(message if message.startswith(f"claims[{i}]") else f"claims[{i}].{message}") from error
    for i, spec in enumerate(config.evaluate):
        _hook(spec, f"evaluate[{i}]")


# ---------------------------------------------------------------------- build
def build(config: DictConfig) -> EpisodeExperiment:
    """Instantiate the task family and every learner; refuse learners that do not fit the family."""
    family = build_instance(config.task, "task", TaskFamily)
    eval_family = family
    if config.compare.task:
        eval_family = build_instance(evaluation_task_spec(config), "compare.task", TaskFamily)
        if eval_family.kind != family.kind:
            raise ConfigError(f"compare.task gives {eval_family.kind!r} episodes but task gives {family.kind!r}")
    learners: dict[str, Learner] = {}
    train: dict[str, TrainSettings] = {}
    for name, spec in config.learners.items():
        learner = build_instance({k: v for k, v in spec.items() if k != "train"}, f"learners.{name}", Learner)
        if family.kind not in learner.kinds:
            raise ConfigError(
                f"learners.{name} ({type(learner).__name__}) handles {list(learner.kinds)} episodes, but "
                f"task {type(family).__name__} produces {family.kind!r} episodes"
            )
        learners[name] = learner
        if learner.is_trainable:
            train[name] = train_settings(config, name)
            try:
                train[name].check_family(family)
            except ValueError as error:
                raise ConfigError(f"train.curriculum of learner {name!r}: {error}") from error
    compare = settings(config.compare, CompareSettings, "compare")
    check_fits(family, eval_family, learners, train, compare)
    claims = [settings(claim, ClaimSpec, f"claims[{i}]") for i, claim in enumerate(config.claims)]
    evaluations = [_hook(spec, f"evaluate[{i}]") for i, spec in enumerate(config.evaluate)]
    return EpisodeExperiment(config, family, eval_family, learners, train, compare, claims, evaluations)


def _probe(family: TaskFamily, support: int, query: int, keys: str) -> Episode:
    """One task of ``family`` with the given sizes (its split decoded: a bad image file fails here, not later)."""
    try:
        return family.sample(1, support, query, generator=torch.Generator().manual_seed(0))
    except ValueError as error:
        raise ConfigError(f"{keys}: {error}") from error


def check_fits(family: TaskFamily, eval_family: TaskFamily, learners: dict[str, Learner],
               train: dict[str, TrainSettings], compare: CompareSettings) -> None:
    """Refuse, before any work, a learner that cannot take the largest episodes of training or comparison.

    Each learner's :meth:`~metaopt.learners.base.Learner.check_fits` sees a one-task probe of the comparison's
    largest support size, and a trainable one also a probe of its training sizes (``max_support``, input sizes,
    a model's input shape are checked without computing).
    """
    compared = _probe(eval_family, max(compare.support_sizes), compare.query, "compare.support_sizes/compare.query")
    for name, learner in learners.items():
        probes = [("compare.support_sizes", compared)]
        if name in train:
            probes.append(("train.support", _probe(family, train[name].support, train[name].query,
                                                   "train.support/train.query")))
        for keys, probe in probes:
            try:
                learner.check_fits(probe)
            except ValueError as error:
                raise ConfigError(f"learners.{name} cannot take the episodes that {keys} asks for "
                                  f"(support {probe.num_support}): {error}") from error


# ---------------------------------------------------------------------- execution
def _trainer(experiment: EpisodeExperiment, name: str, run: Run | None) -> MetaTrainer:
    config = experiment.config
    return MetaTrainer(experiment.learners[name], experiment.family, experiment.train[name], name=name,
                       seed=config.seed, device=config.device, run=run, progress=config.progress,
                       precision=config.precision, compile=config.compile,
                       on_validate=_validation_hooks(experiment, name))


def _validation_hooks(experiment: EpisodeExperiment, name: str) -> list:
    """With ``compare.analysis`` asking for ``sensitivity``, track it against the explicit solvers during training."""
    names = {analysis.name for analysis in parse_analyses(experiment.compare.analysis)}
    references = sensitivity_references(experiment.learners[name], experiment.learners)
    if "sensitivity" not in names or not references:
        return []
    return [sensitivity_tracker(references)]


def _announce(experiment: EpisodeExperiment) -> None:
    """Log each trainable learner's resolved steps, learning rate and batch size, and warn of a curriculum too
    long for its steps (the comparison then asks for inputs the learner never trained on)."""
    for name, settings in experiment.train.items():
        source = f"train + learners.{name}.train" if "train" in experiment.config.learners[name] else "train"
        logger.info("%s trains %d steps, lr %g, batch %d (%s)", name, settings.steps, settings.lr,
                    settings.batch_size, source)
        claims = [claim.text or f"k={claim.k}" for claim in experiment.claims if claim.learner == name]
        for problem in settings.unfinished_curriculum():
            logger.warning("%s: %s. It is compared at the full size, so %s", name, problem,
                           f"its claims will likely fail ({'; '.join(claims)})" if claims else
                           "it will likely look worse than a finished curriculum would make it")


def _train_all(experiment: EpisodeExperiment, run: Run, resume: bool) -> None:
    """Meta-train every learner that has meta-parameters, continuing from checkpoints when resuming.

    With several, each starts with ``learner i of n`` and the time the ones left will take at the pace of
    those trained so far (per task drawn: steps × batch size)."""
    names = list(experiment.train)
    counting = experiment.config.progress and distributed.is_main() and len(names) > 1
    done_tasks, done_seconds = 0, 0.0
    for index, name in enumerate(names):
        trainer = _trainer(experiment, name, run)
        if resume:
            trainer.resume()
            key, step = f"{name}/step", trainer.step  # rows up to the checkpoint's step precede it on disk
            run.discard_rows(lambda row: row.get(key, -1) > step)
            if trainer.step >= trainer.steps:
                logger.info("%s already trained (%d steps)", name, trainer.step)
                continue
        if counting:
            left = sum(experiment.train[n].steps * experiment.train[n].batch_size for n in names[index:])
            eta = (f"; about {format_duration(done_seconds / done_tasks * left)} left for this and the rest, at "
                   "the pace so far" if done_tasks else "")
            logger.info("learner %d of %d: %s (%d steps)%s", index + 1, len(names), name, trainer.steps, eta)
        started_at = trainer.step
        result = trainer.fit()
        done_tasks += (result.steps - started_at) * experiment.train[name].batch_size
        done_seconds += result.seconds
        tracked = plot_tracked(trainer.history, title=name)
        if tracked is not None:
            run.save_figure(tracked, f"sensitivity_vs_step_{name}")
        run.summary({f"{name}/final_loss": result.final_loss, f"{name}/val_loss": result.val_loss,
                     f"{name}/train_seconds": result.seconds, f"{name}/steps": result.steps})


def _is_comparison_row(row: dict) -> bool:
    return "compare/k" in row


def _load_trained(experiment: EpisodeExperiment, trained: Path) -> None:
    """Load each trainable learner's final checkpoint from the run folder ``trained``."""
    for name in experiment.train:
        path = MetaTrainer.latest_checkpoint(trained / "checkpoints" / name)
        if path is None:
            raise ConfigError(f"{trained} has no checkpoint for learner {name!r}; run `metaopt resume {trained}`")
        state = checkpoints.load(path)["learner"]
        experiment.learners[name].load_state_dict(state)


def _compare_and_report(experiment: EpisodeExperiment, run: Run) -> tuple[Comparison, str]:
    config, c = experiment.config, experiment.compare
    result = comparing.compare(
        experiment.learners, experiment.eval_family, support_sizes=c.support_sizes, num_tasks=c.num_tasks,
        query=c.query, seed=experiment.seeds.comparison, bootstrap=c.bootstrap, chunk_size=c.chunk_size,
        device=config.device, claims=experiment.claims, progress=config.progress, analysis=c.analysis,
    )
    results_path = run.save_json(result.to_dict(), "results")
    tables = [run.save_text(comparing.format_markdown(result, title=config.name), "results.md")]
    tables += [run.save_text(text, f"{name}.csv") for name, text in comparing.format_csv(result).items()]
    figure_path = run.save_figure(comparing.plot(result, title=config.name), f"{result.metric}_vs_k")
    analysis_figure = comparing.plot_similarity(result, title=config.name)
    if analysis_figure is not None:
        figure_path = f"{figure_path}\n         {run.save_figure(analysis_figure, 'analysis_vs_k')}"
    k_last = result.support_sizes[-1]
    run.summary({f"compare/{name}/{result.metric}@k={k_last}": curve.mean[-1] for name, curve in result.curves.items()})
    for i, k in enumerate(result.support_sizes):
        run.log({f"compare/{name}/{result.metric}": curve.mean[i] for name, curve in result.curves.items()}
                | {"compare/k": k})
    report = (f"{comparing.format_table(result)}\n\nresults: {results_path}\ntables:  "
              f"{', '.join(path.name for path in tables)} (every k)\nplot:    {figure_path}\nrun:     {run.path}")
    return result, report


def _evaluate(experiment: EpisodeExperiment, run: Run) -> dict[str, Any]:
    """The recipe's ``evaluate:`` hooks, each given its options and the arguments it names."""
    available = {"learners": experiment.learners, "family": experiment.eval_family,
                 "train_family": experiment.family, "run": run, "seeds": experiment.seeds,
                 "device": experiment.config.device}
    results = {}
    for i, (target, options) in enumerate(experiment.evaluations):
        parameters = inspect.signature(target).parameters
        given = {name: value for name, value in available.items() if name in parameters and name not in options}
        results[f"{i}:{getattr(target, '__name__', 'evaluate')}"] = target(**given, **options)
    return results


def execute(experiment: EpisodeExperiment, run: Run, *, resume: bool = False, train: bool = True,
            trained: Path | None = None) -> tuple[dict[str, Any], str]:
    """Train (or load from ``trained``, a run folder), compare and evaluate; returns
    ``{"comparison": ..., "evaluations": ...}`` and the report."""
    wandb_native.declare_axes(run, list(experiment.train))
    if train:
        if distributed.is_main():
            _announce(experiment)
        _train_all(experiment, run, resume)
        if resume:  # a comparison cut short is run again in full
            run.discard_rows(_is_comparison_row)
    else:
        _load_trained(experiment, trained or run.path)
    comparison, report = _compare_and_report(experiment, run)
    wandb_native.log_comparison(run, comparison)
    if train:
        wandb_native.log_learners(run, list(experiment.train), comparison)
    return {"comparison": comparison, "evaluations": _evaluate(experiment, run)}, report
