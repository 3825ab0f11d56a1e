"""The experiment pipeline: ``load`` → ``validate`` → ``build`` → ``run``, one path for every recipe.

A recipe's ``pipeline:`` key picks its kind from :data:`PIPELINES`, a plain mapping from name to
:class:`Pipeline` (the schema the recipe is merged onto, a load-time check, a builder and an executor).
``metaopt run`` and ``metaopt.run(...)`` are the same call::

    import metaopt
    result = metaopt.run("quickstart", ["train.steps=200", "wandb.mode=disabled"])
    result.comparison.value("transformer", 10)        # the compared metric, as in results.json
    result.path                                       # the run folder

Every setting is checked when the recipe is loaded and every component is built before the run folder
is made, so bad input fails at once and leaves nothing behind.

Started by ``torchrun`` (or ``metaopt run RECIPE --nproc N``), every process runs the same pipeline: ``run``
joins the process group (:func:`metaopt.distributed.session`), the components split their work over the ranks,
and rank 0 alone writes the run folder and the W&B run (``docs/scaling.md``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metaopt import distributed
from metaopt.allocator import keep_freed_memory
from metaopt.config import (
    CommonSettings, ConfigError, describe, find_recipe, merge, read_recipe, saved, settings, to_yaml,
)
from metaopt.distillation import pipeline as distillation
from metaopt.log import CONFIG_FILE, Run, new_folder
from metaopt.pipelines import episodes, optimizer, priming, trajectories
from metaopt.progress import console_by_default
from metaopt.runtime import check_precision, resolve_device
from metaopt.seeds import SeedPlan

__all__ = ["PIPELINES", "Pipeline", "RunInterrupted", "RunResult", "build", "load", "load_run", "run"]

logger = logging.getLogger("metaopt")


@dataclass(frozen=True)
class Pipeline:
    """One kind of experiment: its recipe schema and its three steps.

    ``execute(experiment, run, *, resume, train, trained)`` returns ``(results, report)``: what the run produced
    and a plain-text report (the tables the CLI prints); ``trained`` is the run folder whose checkpoints hold
    the trained components (with ``train=False``, ``run`` is a fresh ``compare/<time>/`` folder inside it).
    ``implied_overrides(config, overrides)`` returns the overrides the given ones imply for this kind, applied
    after them (none by default).
    """

    schema: type
    validate: Callable[[DictConfig, str], None]
    build: Callable[[DictConfig], Any]
    execute: Callable[..., tuple[dict[str, Any], str]]
    implied_overrides: Callable[[DictConfig, Sequence[str]], list[str]] = lambda config, overrides: []


PIPELINES: dict[str, Pipeline] = {
    "episodes": Pipeline(episodes.EpisodeRecipe, episodes.validate, episodes.build, episodes.execute,
                         episodes.implied_overrides),
    "optimizer": Pipeline(optimizer.OptimizerRecipe, optimizer.validate, optimizer.build, optimizer.execute),
    "trajectories": Pipeline(trajectories.TrajectoryRecipe, trajectories.validate, trajectories.build,
                             trajectories.execute),
    "priming": Pipeline(priming.PrimingRecipe, priming.validate, priming.build, priming.execute),
    "distillation": Pipeline(distillation.DistillationRecipe, distillation.validate, distillation.build,
                             distillation.execute),
}
COMPARE_DIR = "compare"
"""Where ``metaopt compare RUN`` writes inside the run folder: ``RUN/compare/<time>/``."""
LEGACY_KINDS = {"learners": "episodes"}  # run folders made before the pipeline kinds were named


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run after its folder was made; the message names the folder and how to continue.

    Attributes:
        path: the run folder (a re-comparison's ``compare/<time>/`` folder for ``train=False``).
        resumable: whether ``metaopt resume`` continues it (a training run), or the comparison is simply run
            again (``trained`` is then the run folder to compare).
    """

    def __init__(self, detail: str, path: Path, *, resumable: bool, trained: Path | None = None) -> None:
        self.path, self.resumable = path, resumable
        again = (f"continue with `metaopt resume {path}` (or metaopt.run(None, run_dir=..., resume=True))"
                 if resumable else f"compare again with `metaopt compare {trained}`")
        super().__init__(f"{detail}; run folder {path}; {again}")


@dataclass
class RunResult:
    """What a run produced: its folder, its resolved config, and the pipeline's results.

    For ``episodes`` recipes ``results`` holds ``comparison`` (a :class:`metaopt.compare.Comparison`) and
    ``evaluations`` (what each ``evaluate:`` hook returned); for ``optimizer`` recipes it is the content
    of ``results.json``.
    """

    path: Path
    config: DictConfig
    results: dict[str, Any]
    report: str = ""

    @property
    def comparison(self) -> Any:
        """The comparison of an ``episodes`` run."""
        if "comparison" not in self.results:
            raise AttributeError(f"a {self.config.pipeline!r} run has no comparison; see .results")
        return self.results["comparison"]


def _kind(data: dict | DictConfig, overrides: Sequence[str], source: str) -> str:
    """The recipe's pipeline kind: its ``pipeline`` key, or a ``pipeline=...`` override."""
    kind = data.get("pipeline", "episodes")
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "pipeline":
            kind = value.strip()
    kind = LEGACY_KINDS.get(kind, kind)
    if kind not in PIPELINES:
        raise ConfigError(f"{source}: pipeline={kind!r} is not allowed; expected one of {list(PIPELINES)}")
    return kind


def validate(raw: dict | DictConfig, overrides: Sequence[str] = (), source: str = "recipe") -> DictConfig:
    """A raw recipe mapping and overrides, merged onto its kind's schema and checked."""
    kind = _kind(raw, overrides, source)
    raw = OmegaConf.merge(raw, {"pipeline": kind})
    config = merge(PIPELINES[kind].schema, raw, overrides, source)
    implied = PIPELINES[kind].implied_overrides(config, overrides)
    if implied:
        config = merge(PIPELINES[kind].schema, config, implied, source)
    try:
        OmegaConf.resolve(OmegaConf.create(OmegaConf.to_container(config)))  # every interpolation resolves
        common = {f.name: config[f.name] for f in dataclasses.fields(CommonSettings) if f.name != "wandb"}
        settings(common, CommonSettings, "")
        PIPELINES[kind].validate(config, source)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{source}: {describe(error)}") from error
    return config


def load(recipe: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a recipe (a bundled name or a path), apply ``key=value`` overrides and check every setting."""
    path = find_recipe(recipe)
    data = read_recipe(path)
    for name in data.get("learners") or {}:
        if not isinstance(name, str):
            raise ConfigError(f"{path}: learner name {name!r} is not a string; YAML reads null, true or 1 as "
                              "other types, so quote it (e.g. 'null':) or rename it")
    return validate(data, overrides, source=str(path))


def load_run(run_dir: str | Path, overrides: Sequence[str] = ()) -> tuple[DictConfig, Path]:
    """The resolved config of an existing run folder, with overrides applied and checked."""
    path = Path(run_dir)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise ConfigError(f"{path} is not a run folder (no {CONFIG_FILE}); pass a folder made by `metaopt run`")
    recorded = OmegaConf.load(config_file)
    config = validate(recorded, overrides, source=str(config_file))
    added = sorted(_targets(OmegaConf.to_container(config)) - _targets(OmegaConf.to_container(recorded)))
    if added:
        raise ConfigError(f"{config_file}: overrides may not add _target_ import paths the run did not record "
                          f"({', '.join(added)}); a recipe is code, and a run folder runs only what it was made "
                          "with: start a new run with `metaopt run` instead")
    return config, path


def _targets(node: Any) -> set[str]:
    """Every ``_target_`` import path in a plain config tree."""
    if isinstance(node, dict):
        found = {str(node["_target_"])} if "_target_" in node else set()
        return found.union(*(_targets(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(_targets(value) for value in node))
    return set()


def build(config: DictConfig) -> Any:
    """Every component of a loaded recipe, built and checked (the learners' initial weights from the seed plan)."""
    torch.manual_seed(SeedPlan(config.seed).init)  # learners' initial meta-parameters are part of the experiment
    return PIPELINES[config.pipeline].build(config)


def _open_run(config: DictConfig, path: Path | None, train: bool) -> Run:
    """The run folder written into: a new one, the run's own (training, resuming), or a new
    ``compare/<time>/`` inside it for a re-comparison, so that the run's own record stays as it was."""
    if not train:
        path = distributed.broadcast_object(new_folder(path / COMPARE_DIR) if distributed.is_main() else None)
    run = Run.open(config.name, saved(config), config.wandb, root=config.output_dir, path=path,
                   job_type="train" if train else "compare")
    run.write_config(to_yaml(config))
    return run


def run(
    recipe: str | Path | DictConfig | None,
    overrides: Sequence[str] = (),
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    train: bool = True,
) -> RunResult:
    """Run a recipe end to end and return its results.

    Args:
        recipe: a bundled recipe's name, a YAML path, or a config from :func:`load` (None with ``run_dir``).
        overrides: ``key=value`` strings (omegaconf dot-list syntax), e.g. ``["train.steps=200"]``.
        run_dir: an existing run folder to continue (with ``resume``) or re-compare (with ``train=False``);
            its saved config is the recipe then. None makes a new folder under ``output_dir``.
        resume: continue training from the run folder's latest checkpoints (bit-for-bit).
        train: False loads the trained learners from the run folder's checkpoints and only compares.

    Progress and messages go through :mod:`logging` (``metaopt.*`` loggers): where nothing has configured
    logging, they are shown on stderr for the duration of the call (:func:`metaopt.progress.console_by_default`;
    ``metaopt.log_to_console()`` chooses the level, ``progress=false`` silences the progress).

    Raises:
        ConfigError: a bad setting (before any work is done or any folder made).
        metaopt.train.DivergenceError: training produced a non-finite loss (``train.on_nonfinite=stop``).
        RunInterrupted: Ctrl-C after the run folder was made (a checkpoint is saved first); it names the folder.
    """
    with console_by_default():
        return _run(recipe, overrides, run_dir=run_dir, resume=resume, train=train)


def _run(recipe: str | Path | DictConfig | None, overrides: Sequence[str], *, run_dir: str | Path | None,
         resume: bool, train: bool) -> RunResult:
    if run_dir is not None and recipe is not None:
        raise ConfigError("give a recipe or a run_dir, not both: a run folder's saved config is its recipe")
    if run_dir is not None:
        config, path = load_run(run_dir, overrides)
    elif isinstance(recipe, DictConfig):
        config, path = validate(recipe, overrides), None
    elif recipe is not None:
        config, path = load(recipe, overrides), None
    else:
        raise ConfigError("run needs a recipe (a name, a YAML path or a loaded config) or a run_dir")
    if (resume or not train) and path is None:
        raise ConfigError("resume=True and train=False need run_dir, the folder of the run to continue")
    try:
        device = resolve_device(config.device)
        check_precision(config.precision, device)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    _check_writable(Path(config.output_dir) if path is None else path, "output_dir" if path is None else "run_dir")
    if config.threads:  # before building: some components compute when built (a pre-trained environment)
        torch.set_num_threads(distributed.threads_per_process(config.threads))
    with distributed.session(device) as current:
        if current.size > 1:
            logger.info("distributed run: %d processes (%s)", current.size, distributed.backend())
        experiment = build(_on(config, device))
        keep_freed_memory()  # large activations reuse freed memory instead of fresh pages (metaopt/allocator.py)
        with _open_run(config, path, train) as opened:
            logger.info("run folder: %s", opened.path)
            try:
                results, report = PIPELINES[config.pipeline].execute(experiment, opened, resume=resume,
                                                                     train=train, trained=path)
            except KeyboardInterrupt as error:  # the trainers saved a checkpoint; say where the run is
                raise RunInterrupted(str(error) or "interrupted", opened.path, resumable=train,
                                     trained=path) from None
        distributed.barrier()  # no rank leaves (and tears the group down) while another still writes
    return RunResult(opened.path, config, results, report)


def _check_writable(folder: Path, key: str) -> None:
    """Refuse, before any work, a folder the run could not create or write into (nothing is created here)."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}={str(folder)!r} cannot be created: {existing} is a file, not a folder")
    try:  # a real attempt: permissions, read-only and special file systems all answer it
        os.rmdir(tempfile.mkdtemp(prefix=".metaopt-write-check-", dir=existing))
    except OSError as error:
        raise ConfigError(f"{key}={str(folder)!r} cannot be created or written: a folder cannot be made in "
                          f"{existing} ({error.strerror or error})") from error


def _on(config: DictConfig, device: torch.device) -> DictConfig:
    """The config the components are built from: ``device`` resolved (``auto`` → ``cuda:LOCAL_RANK`` or ``cpu``).

    The run folder keeps the recipe's own ``device``, so a resumed run resolves it again where it runs.
    """
    resolved = config.copy()
    resolved.device = str(device)
    return resolved
