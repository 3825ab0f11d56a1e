"""Recipes: omegaconf YAML files checked against typed schemas before any work starts.

A recipe names a task family and learners by import path (``_target_``) with their keyword
arguments, plus training, comparison and W&B settings. ``load_recipe`` merges the YAML and
``key=value`` overrides onto the schema, and ``build`` instantiates every component, so a
misspelt key, a wrong type or an unknown argument fails at once with a message naming it.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metaopt.analysis.suite import parse_analyses
from metaopt.learners.base import Learner
from metaopt.log import WANDB_MODES
from metaopt.tasks.base import TaskFamily
from metaopt.train import NONFINITE_POLICIES, SCHEDULES

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"


class ConfigError(ValueError):
    """A recipe or override is invalid; the message says which key and what was expected."""


@dataclass
class StageConfig:
    """A curriculum quantity: ``start``, plus ``increment`` every ``every`` steps, up to ``end``."""

    start: int = 1
    end: int = 1
    increment: int = 1
    every: int = 1000


@dataclass
class CurriculumConfig:
    """Garg et al.'s curriculum: input dimensions and/or support size grow during training."""

    dims: Optional[StageConfig] = None
    support: Optional[StageConfig] = None


@dataclass
class TrainConfig:
    """Meta-training settings shared by every trainable learner (see ``metaopt.train.MetaTrainer``)."""

    steps: int = 1000
    batch_size: int = 64
    support: int = 10
    query: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: Optional[float] = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"
    val_every: int = 200
    val_tasks: int = 256
    checkpoint_every: int = 1000
    log_every: int = 50
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    on_nonfinite: str = "stop"


@dataclass
class CompareConfig:
    """Evaluation on held-out episodes (see ``metaopt.compare.compare``).

    ``analysis`` lists implicit-vs-explicit analyses by name or as ``{name: ..., option: value}``
    (``metaopt.analysis.suite``: sensitivity, spd_ilwd, best_gd, interpolation, dual_form); none by default.
    ``task`` holds keys merged over the recipe's ``task`` for evaluation only, e.g. ``{split: test}`` for
    held-out image classes or ``{query_mode: orthogonal}`` for an out-of-distribution prompt (a
    ``_target_`` there replaces the task spec instead).
    """

    support_sizes: list[int] = field(default_factory=lambda: [0, 1, 2, 5, 10])
    num_tasks: int = 1000
    query: int = 1
    bootstrap: int = 1000
    chunk_size: int = 512
    analysis: list[Any] = field(default_factory=list)
    task: dict[str, Any] = field(default_factory=dict)


@dataclass
class WandbConfig:
    """Weights & Biases mirror of the run (``offline`` writes to the run folder, no network)."""

    mode: str = "offline"
    project: str = "metaopt"
    entity: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class ClaimConfig:
    """A paper's claim the recipe checks: ``learner``'s metric at support size ``k`` below/above a value, and/or
    better than each learner named in ``better_than`` (lower or higher as the metric's direction says)."""

    text: str = ""
    learner: str = ""
    k: int = 0
    below: Optional[float] = None
    above: Optional[float] = None
    better_than: list[str] = field(default_factory=list)


PIPELINES = ("learners", "optimizer")


@dataclass
class RecipeConfig:
    """One experiment: data, learners, training, comparison, logging.

    ``pipeline: optimizer`` recipes (meta-training an optimizer on a training environment) have their
    own schema in ``metaopt.optimizer_experiment``; ``metaopt run`` dispatches on this key.
    ``evaluate`` lists extra evaluations run after the comparison: ``_target_`` callables called as
    ``fn(experiment=..., run=..., **options)`` (e.g. a continual-learning accuracy matrix).
    """

    pipeline: str = "learners"
    name: str = "run"
    description: str = ""
    seed: int = 0
    device: str = "cpu"
    threads: Optional[int] = None
    output_dir: str = "runs"
    progress: bool = True
    task: dict[str, Any] = field(default_factory=dict)
    learners: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    claims: list[ClaimConfig] = field(default_factory=list)
    evaluate: list[dict[str, Any]] = field(default_factory=list)


CHOICES = {
    "pipeline": ("learners",),
    "train.schedule": SCHEDULES,
    "train.on_nonfinite": NONFINITE_POLICIES,
    "wandb.mode": WANDB_MODES,
}


# ---------------------------------------------------------------------- loading
def find_recipe(name_or_path: str) -> Path:
    """A recipe file from a path, or a name looked up in ``./recipes`` and the bundled recipes."""
    candidates = [Path(name_or_path)]
    if not name_or_path.endswith((".yaml", ".yml")):
        candidates += [Path("recipes") / f"{name_or_path}.yaml", RECIPE_DIR / f"{name_or_path}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))) or "none found"
    raise ConfigError(f"recipe {name_or_path!r} not found (looked at {', '.join(map(str, candidates))}); "
                      f"bundled recipes: {known}")


def recipe_pipeline(name_or_path: str) -> tuple[str, Path]:
    """Which pipeline runs a recipe (its top-level ``pipeline`` key, ``learners`` by default) and its path."""
    path = find_recipe(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"could not read recipe {path}: {error}") from error
    pipeline = data.get("pipeline", "learners") if isinstance(data, dict) else "learners"
    if pipeline not in PIPELINES:
        raise ConfigError(f"{path}: pipeline={pipeline!r} is not allowed; expected one of {list(PIPELINES)}")
    return pipeline, path


def _describe(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None)
    message = str(error).splitlines()[0]
    return f"{message} (key: {key})" if key else message


def load_recipe(name_or_path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a recipe, apply ``key=value`` overrides and validate it against the schema."""
    path = find_recipe(str(name_or_path))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"could not read recipe {path}: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping of sections (name, task, learners, ...)")
    for name in data.get("learners") or {}:
        if not isinstance(name, str):
            raise ConfigError(f"{path}: learner name {name!r} is not a string; YAML reads null, true or 1 as "
                              "other types, so quote it (e.g. 'null':) or rename it")
    return validate(OmegaConf.create(data), overrides, source=str(path))


def validate(raw: DictConfig | dict, overrides: Sequence[str] = (), source: str = "recipe") -> DictConfig:
    """Merge a raw config and overrides onto the typed schema; check choices and required sections."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.steps=100)")
    schema = OmegaConf.structured(RecipeConfig)
    try:
        config = OmegaConf.merge(schema, raw)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{source}: {_describe(error)}") from error
    for item in overrides:
        try:
            config = OmegaConf.merge(config, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as error:
            raise ConfigError(f"{source}: {_describe(error)}") from error
        except (TypeError, ValueError) as error:  # e.g. a list entry addressed as claims.0.k=5
            raise ConfigError(f"{source}: override {item!r} does not fit the recipe ({error}); to change an entry "
                              "of a list, give the whole list (e.g. claims=[{...}])") from error
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(config, key)
        if value not in allowed:
            raise ConfigError(f"{source}: {key}={value!r} is not allowed; expected one of {list(allowed)}")
    if "_target_" not in config.task:
        raise ConfigError(f"{source}: task needs a _target_ (e.g. metaopt.tasks.LinearRegression)")
    if not config.learners:
        raise ConfigError(f"{source}: learners is empty; name at least one learner with a _target_")
    for name, spec in config.learners.items():
        if not isinstance(spec, DictConfig) or "_target_" not in spec:
            raise ConfigError(f"{source}: learners.{name} needs a _target_ (e.g. metaopt.learners.Ridge)")
        try:
            train_config_for(config, name)
        except OmegaConfBaseException as error:
            raise ConfigError(f"{source}: learners.{name}.train: {_describe(error)}") from error
    try:
        parse_analyses(OmegaConf.to_container(config.compare.analysis, resolve=True))
    except ValueError as error:
        raise ConfigError(f"{source}: compare.analysis: {error}") from error
    for i, claim in enumerate(config.claims):
        for key, name in [("learner", claim.learner)] + [(f"better_than[{j}]", n) for j, n in
                                                         enumerate(claim.better_than)]:
            if name not in config.learners:
                raise ConfigError(f"{source}: claims[{i}].{key}={name!r} is not one of the learners "
                                  f"{list(config.learners)}")
        if claim.k not in config.compare.support_sizes:
            raise ConfigError(f"{source}: claims[{i}].k={claim.k} is not in compare.support_sizes")
    return config


def train_config_for(config: DictConfig, learner: str) -> DictConfig:
    """The training settings of one learner: ``train`` with the learner's own ``train:`` block on top."""
    spec = config.learners[learner]
    own = spec.get("train") if isinstance(spec, DictConfig) else None
    return OmegaConf.merge(config.train, own) if own is not None else config.train


# ---------------------------------------------------------------------- instantiation
def import_target(path: str, where: str) -> Any:
    """The object at a dotted import path such as ``metaopt.learners.Ridge``."""
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"{where}._target_={path!r} cannot be imported: {error}") from error


def _build_nested(value: Any, where: str) -> Any:
    """Instantiate ``_target_`` blocks nested in an argument (e.g. an image source inside a task family)."""
    if isinstance(value, dict) and "_target_" in value:
        return instantiate(value, where)
    if isinstance(value, dict):
        return {k: _build_nested(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_build_nested(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def instantiate(spec: DictConfig | dict, where: str) -> Any:
    """Build ``spec._target_(**rest)``, checking the keyword arguments against its signature.

    Arguments that are themselves ``_target_`` blocks are built first, depth first.
    """
    spec = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else {
        k: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v for k, v in spec.items()
    }
    target = import_target(spec.pop("_target_"), where)
    parameters = inspect.signature(target).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    allowed = [n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [key for key in spec if key not in allowed]
    if unknown and not accepts_any:
        raise ConfigError(f"{where}: unknown argument(s) {unknown} for {target.__name__}; expected some of {allowed}")
    missing = [n for n, p in parameters.items()
               if p.default is inspect.Parameter.empty and n in allowed and n not in spec]
    if missing:
        raise ConfigError(f"{where}: missing required argument(s) {missing} for {target.__name__}")
    spec = {key: _build_nested(value, f"{where}.{key}") for key, value in spec.items()}
    try:
        return target(**spec)
    except (TypeError, ValueError, OSError) as error:  # OSError: a data folder that is missing or unreadable
        raise ConfigError(f"{where}: {error}") from error


@dataclass
class Experiment:
    """A recipe's instantiated components: ``family`` trains, ``eval_family`` (often the same) is compared on."""

    config: DictConfig
    family: TaskFamily
    learners: dict[str, Learner]
    eval_family: TaskFamily | None = None

    def __post_init__(self) -> None:
        if self.eval_family is None:
            self.eval_family = self.family


def _build_family(spec: DictConfig | dict, where: str) -> TaskFamily:
    family = instantiate(spec, where)
    if not isinstance(family, TaskFamily):
        raise ConfigError(f"{where}._target_ must be a metaopt.tasks.TaskFamily; got {type(family).__name__}")
    return family


def evaluation_task_spec(config: DictConfig) -> DictConfig:
    """The task spec compare evaluates on: ``compare.task`` merged over ``task`` (its ``_target_`` replaces it)."""
    if "_target_" in config.compare.task:
        return config.compare.task
    return OmegaConf.merge(config.task, config.compare.task)


def _check_evaluations(config: DictConfig) -> None:
    """Every ``evaluate`` entry names an importable callable taking ``experiment``, ``run`` and its options."""
    for i, spec in enumerate(config.evaluate):
        where = f"evaluate[{i}]"
        if "_target_" not in spec:
            raise ConfigError(f"{where} needs a _target_ naming a callable fn(experiment, run, **options)")
        target = import_target(spec["_target_"], where)
        parameters = inspect.signature(target).parameters
        unknown = [k for k in list(spec) + ["experiment", "run"] if k != "_target_" and k not in parameters]
        if unknown:
            raise ConfigError(f"{where}: {spec['_target_']} does not take {unknown}; it takes {list(parameters)}")


def build(config: DictConfig) -> Experiment:
    """Instantiate the task family and every learner; refuse learners that do not fit the family."""
    family = _build_family(config.task, "task")
    eval_family = family
    if config.compare.task:
        eval_family = _build_family(evaluation_task_spec(config), "compare.task")
        if eval_family.kind != family.kind:
            raise ConfigError(f"compare.task gives {eval_family.kind!r} episodes but task gives {family.kind!r}")
    _check_evaluations(config)
    learners = {}
    for name, spec in config.learners.items():
        spec = {k: v for k, v in spec.items() if k != "train"}
        learner = instantiate(spec, f"learners.{name}")
        if not isinstance(learner, Learner):
            raise ConfigError(f"learners.{name} must be a metaopt.learners.Learner; got {type(learner).__name__}")
        if family.kind not in learner.kinds:
            raise ConfigError(
                f"learners.{name} ({type(learner).__name__}) handles {list(learner.kinds)} episodes, but "
                f"task {type(family).__name__} produces {family.kind!r} episodes"
            )
        learners[name] = learner
    return Experiment(config, family, learners, eval_family)


def to_yaml(config: DictConfig) -> str:
    return OmegaConf.to_yaml(config, resolve=True)
