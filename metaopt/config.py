"""Recipes: omegaconf YAML files merged onto typed schemas, and ``_target_`` instantiation.

This module knows how to *read* a recipe, not what is in it: each pipeline kind
(:mod:`metaopt.pipelines`) composes its schema from the settings dataclasses that sit beside the code
using them (``metaopt.train.TrainSettings``, ``metaopt.compare.CompareSettings``,
``metaopt.log.WandbSettings``, ...). ``merge`` puts a recipe and ``key=value`` overrides onto a schema,
so a misspelt key or a wrong type fails at once with a message naming the key; ``settings`` turns a
section into its dataclass, whose own checks then run; ``instantiate`` builds ``_target_`` blocks,
checking their keyword arguments against the signature first.

The ``${seed:PURPOSE}`` resolver gives a recipe the seed of one purpose of the run's seed plan
(:mod:`metaopt.seeds`), e.g. ``seed: ${seed:tuning}`` for a baseline that tunes itself on held-out tasks.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metaopt.checks import ArgumentError, non_negative_int, one_of, optional, positive_int
from metaopt.log import WandbSettings
from metaopt.paths import RECIPE_DIR
from metaopt.runtime import PRECISIONS, Precision, check_device
from metaopt.seeds import SeedPlan

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe or override is invalid; the message says which key and what was expected."""


def _seed_resolver(purpose: str, *, _root_: DictConfig) -> int:
    try:
        return SeedPlan(int(_root_.seed)).resolve(purpose)
    except ValueError as error:
        raise ConfigError(str(error)) from error


if not OmegaConf.has_resolver("seed"):
    OmegaConf.register_resolver("seed", _seed_resolver)


@dataclass
class CommonSettings:
    """The keys of every recipe, whatever its pipeline kind.

    ``pipeline`` picks the kind (:data:`metaopt.pipelines.PIPELINES`); ``seed`` feeds the seed plan;
    ``threads`` sets torch's intra-op threads (None: torch's default; under torchrun the budget of one machine,
    shared by its processes); ``progress`` shows progress bars.
    ``device`` is auto | cpu | cuda | cuda:N (auto: CUDA when present; only its spelling is checked at load time,
    :func:`metaopt.runtime.resolve_device` finds the device); ``precision`` is fp32 | bf16 | fp16 (autocast, loss
    scaling for fp16); ``compile`` passes the learners' losses through ``torch.compile`` where it works
    (:func:`metaopt.runtime.compile_loss`).
    """

    pipeline: str = "episodes"
    name: str = "run"
    description: str = ""
    seed: int = 0
    device: str = "cpu"
    precision: Precision = "fp32"
    compile: bool = False
    threads: Optional[int] = None
    output_dir: str = "runs"
    progress: bool = True
    wandb: WandbSettings = field(default_factory=WandbSettings)

    def __post_init__(self) -> None:
        owner = "CommonSettings"
        non_negative_int("seed", self.seed, owner=owner)
        check_device(self.device, owner=owner)
        one_of("precision", self.precision, PRECISIONS, owner=owner)
        optional(positive_int, "threads", self.threads, owner=owner)


# ---------------------------------------------------------------------- reading
def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file from a path, or a name looked up in ``./recipes`` and the bundled recipes."""
    name_or_path = str(name_or_path)
    candidates = [Path(name_or_path)]
    if not name_or_path.endswith((".yaml", ".yml")):
        candidates += [Path("recipes") / f"{name_or_path}.yaml", RECIPE_DIR / f"{name_or_path}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))) or "none found"
    raise ConfigError(f"recipe {name_or_path!r} not found (looked at {', '.join(map(str, candidates))}); "
                      f"bundled recipes: {known}")


def read_recipe(path: Path) -> dict[str, Any]:
    """A recipe file's YAML as a mapping (safe loading: no Python objects from a data file)."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"could not read recipe {path}: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping of sections (name, task, learners, ...)")
    return data


def describe(error: OmegaConfBaseException) -> str:
    """An omegaconf error's first line with the key it is about (a refused choice as ``key='x' is not allowed``)."""
    key = getattr(error, "full_key", None)
    message = str(error).splitlines()[0]
    choice = re.fullmatch(r"Invalid value (.*), expected one of \[(.*)\]", message)
    if key and choice:
        return f"{key}={choice[1]} is not allowed; expected one of [{choice[2]}]"
    return f"{message} (key: {key})" if key else message


def merge(schema: type, raw: DictConfig | dict, overrides: Sequence[str] = (), source: str = "recipe") -> DictConfig:
    """``raw`` and ``key=value`` overrides on top of the structured ``schema``; type and key errors name the key."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.steps=100)")
    try:
        config = OmegaConf.merge(OmegaConf.structured(schema), raw)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{source}: {describe(error)}") from error
    for item in overrides:
        try:
            config = OmegaConf.merge(config, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as error:
            raise ConfigError(f"{source}: {describe(error)}") from error
        except (TypeError, ValueError) as error:  # e.g. a list entry addressed as claims.0.k=5
            raise ConfigError(f"{source}: override {item!r} does not fit the recipe ({error}); to change an entry "
                              "of a list, give the whole list (e.g. claims=[{...}])") from error
    return config


def settings(node: Any, cls: Callable[..., T], where: str) -> T:
    """A config section as its settings dataclass (whose ``__post_init__`` checks run here, at load time).

    A check's message that starts with one of the dataclass's fields is joined to ``where`` as a key
    (``train.steps must be ...``).
    """
    try:
        return cls(**plain(node))
    except OmegaConfBaseException as error:
        raise ConfigError(f"{where}: {describe(error)}") from error
    except ArgumentError as error:  # a field of this section: name it as a key
        if error.owner != getattr(cls, "__name__", None):
            raise ConfigError(f"{where}: {error}") from error
        key = f"{where}.{error.name}" if where else error.name
        raise ConfigError(f"{key} must be {error.allowed}; got {error.value!r}") from error
    except (TypeError, ValueError) as error:
        message = str(error)
        first = re.match(r"[A-Za-z_]\w*", message)
        fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        joined = f"{where}.{message}" if first and first[0] in fields else f"{where}: {message}"
        raise ConfigError(joined) from error


_ENV_MARK = "metaopt_environment_value_9c41e7"  # a bare word: oc.decode and string interpolation keep it
if not OmegaConf.has_resolver("metaopt_env_mark"):
    OmegaConf.register_resolver("metaopt_env_mark", lambda *args: _ENV_MARK)


def _walk(raw: Any, marked: Any, resolved: Any) -> Any:
    if isinstance(raw, dict):
        return {key: _walk(raw[key], marked[key], resolved[key]) for key in raw}
    if isinstance(raw, list):
        return [_walk(*items) for items in zip(raw, marked, resolved)]
    return raw if isinstance(marked, str) and _ENV_MARK in marked else resolved


def saved(config: DictConfig) -> dict[str, Any]:
    """The config as W&B records it: resolved, except what reads the environment.

    A value that comes from ``${oc.env:...}`` (directly or through other interpolations) stays an
    interpolation, so a token or a password a recipe reads from the environment is never written to disk
    or uploaded; a resumed run reads it from its own environment again.
    """
    raw = OmegaConf.to_container(config, resolve=False)
    marked = OmegaConf.create(yaml.safe_dump(raw).replace("${oc.env:", "${metaopt_env_mark:"))
    return _walk(raw, OmegaConf.to_container(marked, resolve=True), OmegaConf.to_container(config, resolve=True))


def to_yaml(config: DictConfig) -> str:
    """The config as a run folder keeps it: interpolations as written, so that a resumed run re-reads
    ``${oc.env:...}`` from its own environment (a secret is never written to disk) and shared values keep
    the keys they come from (the recipe validates the same way again)."""
    return OmegaConf.to_yaml(config, resolve=False)


def plain(node: Any) -> Any:
    """A config node (or a dict or list holding some) as plain Python values, interpolations resolved."""
    if isinstance(node, DictConfig) or OmegaConf.is_list(node):
        return OmegaConf.to_container(node, resolve=True)
    if isinstance(node, dict):
        return {k: plain(v) for k, v in node.items()}
    return node


# ---------------------------------------------------------------------- instantiation
def import_target(path: str, where: str) -> Any:
    """The object at a dotted import path such as ``metaopt.learners.Ridge``."""
    module_name, _, attr = str(path).rpartition(".")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"{where}._target_={path!r} cannot be imported: {error}") from error
    if not callable(target):
        raise ConfigError(f"{where}._target_={path!r} is a {type(target).__name__}; it must name a class or "
                          "a function that builds the object")
    return target


def check_arguments(target: Callable, given: Sequence[str], where: str, *, supplied: Sequence[str] = (),
                    partial: bool = False) -> None:
    """Refuse keyword arguments ``target`` does not take and required ones that are missing.

    ``supplied`` are arguments the caller will add when it builds the object (so not missing);
    ``partial`` allows required arguments to stay missing (they are given when the partial is called).
    """
    name = getattr(target, "__name__", repr(target))
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError) as error:  # a builtin without a signature
        raise ConfigError(f"{where}: {name} has no inspectable signature ({error}); name a Python class or "
                          "function") from error
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    allowed = [n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [key for key in [*given, *supplied] if key not in allowed]
    if unknown and not accepts_any:
        raise ConfigError(f"{where}: unknown argument(s) {unknown} for {name}; expected some of {allowed}")
    missing = [n for n, p in parameters.items()
               if p.default is inspect.Parameter.empty and n in allowed and n not in given and n not in supplied]
    if missing and not partial:
        raise ConfigError(f"{where}: missing required argument(s) {missing} for {name}")


def _build_nested(value: Any, where: str) -> Any:
    """Instantiate ``_target_`` blocks nested in an argument (e.g. an image source inside a task family)."""
    if isinstance(value, dict) and "_target_" in value:
        return instantiate(value, where)
    if isinstance(value, dict):
        return {k: _build_nested(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_build_nested(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def instantiate(spec: DictConfig | dict, where: str, **supplied: Any) -> Any:
    """Build ``spec._target_(**rest, **supplied)``, checking the keyword arguments against its signature.

    Arguments that are themselves ``_target_`` blocks are built first, depth first. ``_partial_: true``
    returns a ``functools.partial`` instead (e.g. an optimizer whose learning rate is given later).
    """
    spec = dict(plain(spec))
    target = import_target(spec.pop("_target_"), where)
    partial = bool(spec.pop("_partial_", False))
    check_arguments(target, list(spec), where, supplied=list(supplied), partial=partial)
    spec = {key: _build_nested(value, f"{where}.{key}") for key, value in spec.items()}
    if partial:
        return functools.partial(target, **spec, **supplied)
    try:
        return target(**spec, **supplied)
    except (TypeError, ValueError, OSError) as error:  # OSError: a data folder that is missing or unreadable
        raise ConfigError(f"{where}: {error}") from error


def check_spec(spec: Any, where: str, *, supplied: Sequence[str] = (), expected: type | None = None) -> Any:
    """Check a ``_target_`` block without building it: the target imports and takes the arguments given.

    A target that is a class must be a subclass of ``expected`` (a factory function is checked when it has
    built its object). Returns the target. Used at load time, and for components a pipeline builds only
    later (after a tuning step).
    """
    if not isinstance(spec, (dict, DictConfig)) or "_target_" not in spec:
        raise ConfigError(f"{where} needs a _target_ (an import path such as optimizers.LayerwiseMixture)")
    keys = [k for k in spec if k not in ("_target_", "_partial_")]
    target = import_target(spec["_target_"], where)
    if expected is not None and isinstance(target, type) and not issubclass(target, expected):
        raise ConfigError(f"{where}._target_={spec['_target_']!r} is a {target.__name__}, not a "
                          f"{expected.__module__}.{expected.__name__}")
    check_arguments(target, keys, where, supplied=supplied, partial=bool(spec.get("_partial_", False)))
    return target


def build_instance(spec: Any, where: str, expected: type, **supplied: Any) -> Any:
    """``instantiate`` a block and check that it built an ``expected`` (named in the error if not)."""
    if not isinstance(spec, (dict, DictConfig)) or "_target_" not in spec:
        raise ConfigError(f"{where} needs a _target_ (e.g. a {expected.__module__}.{expected.__name__})")
    built = instantiate(spec, where, **supplied)
    if not isinstance(built, expected):
        raise ConfigError(f"{where}._target_ must build a {expected.__module__}.{expected.__name__}; "
                          f"got {type(built).__name__}")
    return built
