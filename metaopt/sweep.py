"""Sweeps: a grid of overrides, each point one ordinary run in ``runs/<name>/<sweep-id>/<point>/``.

``metaopt sweep quickstart train.lr=3e-4,1e-3 seed=0,1`` is four runs. Arguments follow the sweep syntax of
Hydra's override grammar: ``key=a,b,c`` (a comma outside brackets and quotes separates values), ``key=range(start,
stop[,step])`` (stop excluded), ``key=choice(a,b)``, ``key=[1,2]`` (one value: a list) and ``key=value`` (every
point). Every value is parsed as an omegaconf ``key=value`` override, and every point's recipe is loaded and
checked before the first one runs.

The sweep's folder is named from the recipe and the arguments (``sweep-<hash>``, or ``--id``), so the same command
started again finds it: a point with a ``results.json`` is skipped, an unfinished one continues from its
checkpoints (``metaopt resume``), the others start. Points run one after the other, or on ``workers`` local
processes (``python -m metaopt.sweep POINT...``, one queue of points each); to spread a sweep over machines, let
W&B's agents schedule it (:func:`wandb_config`, ``metaopt sweep ... --wandb``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import sys
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from metaopt.config import ConfigError, find_recipe, to_yaml
from metaopt.log import CONFIG_FILE

__all__ = ["Axis", "Point", "SweepPlan", "check_wandb_config", "parse_grid", "run_point", "run_sweep",
           "wandb_config", "write_wandb_config", "METHODS"]

logger = logging.getLogger(__name__)

METHODS = ("grid", "random", "bayes")
"""W&B's search methods a sweep configuration may ask for."""
SEED_KEY = "seed"
PLAN_FILE = "plan.json"
RESULTS_FILE = "results.json"


# ---------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class Axis:
    """One swept key and its values, each as override text (``train.lr`` and ``["3e-4", "1e-3"]``)."""

    key: str
    values: tuple[str, ...]


def _split(text: str) -> list[str]:
    """``text`` split at the commas outside brackets, braces, parentheses and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def _number(text: str, argument: str) -> int | float:
    value = OmegaConf.from_dotlist([f"v={text}"]).v
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"sweep argument {argument!r}: range() takes numbers; got {text!r}")
    return value


def _range(inner: str, argument: str) -> list[str]:
    """Hydra's ``range(start, stop[, step])``: numbers from start up to (not including) stop."""
    bounds = [_number(part, argument) for part in _split(inner)]
    if not 1 <= len(bounds) <= 3:
        raise ConfigError(f"sweep argument {argument!r}: range takes (stop), (start, stop) or (start, stop, step)")
    start, stop, step = (0, bounds[0], 1) if len(bounds) == 1 else (*bounds[:2], bounds[2] if len(bounds) == 3 else 1)
    if step == 0 or (stop - start) * step <= 0:
        raise ConfigError(f"sweep argument {argument!r}: range({inner}) is empty; check start, stop and step")
    count = int(-(-(stop - start) // step))
    values = [start + i * step for i in range(count)]
    return [str(v) if isinstance(v, int) else repr(round(v, 12)) for v in values]


def _values(key: str, text: str, argument: str) -> list[str]:
    match = re.fullmatch(r"(range|choice)\((.*)\)", text.strip(), flags=re.DOTALL)
    if match and match[1] == "range":
        return _range(match[2], argument)
    values = _split(match[2] if match else text)
    if any(v == "" for v in values):
        raise ConfigError(f"sweep argument {argument!r} has an empty value; write {key}=a,b,c")
    return values


def parse_grid(arguments: Sequence[str]) -> tuple[list[str], list[Axis]]:
    """Sweep arguments as (overrides every point gets, swept axes in the order given).

    Raises:
        ConfigError: an argument that is not ``key=value`` or sweeps a key twice.
    """
    fixed, axes = [], []
    for argument in arguments:
        key, sep, text = argument.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"sweep argument {argument!r} must look like key=value or key=a,b,c")
        values = _values(key, text, argument)
        if key in {axis.key for axis in axes} or any(item.partition("=")[0].strip() == key for item in fixed):
            raise ConfigError(f"sweep argument {key!r} is given twice; list all its values in one key=a,b,c")
        if len(values) == 1:
            fixed.append(f"{key}={values[0]}")
        else:
            axes.append(Axis(key, tuple(values)))
    return fixed, axes


# ---------------------------------------------------------------------- the plan on disk
@dataclass(frozen=True)
class Point:
    """One run of a sweep: its folder name and the axis overrides that make it."""

    name: str
    overrides: tuple[str, ...]

    @property
    def settings(self) -> dict[str, str]:
        """The point's axis values by key (override text)."""
        return dict(item.split("=", 1) for item in self.overrides)

    def group(self) -> str:
        """The point's settings without its seed: points of one group differ only in their seed."""
        return ",".join(f"{k}={v}" for k, v in self.settings.items() if k != SEED_KEY) or "all"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_")


@dataclass
class SweepPlan:
    """A sweep: recipe, overrides of every point, axes, and where its points live.

    Make one with :meth:`make` (checks every point's recipe) or read one back with :meth:`read`.
    """

    recipe: str
    fixed: list[str]
    axes: list[Axis]
    sweep_id: str
    folder: Path
    points: list[Point] = field(default_factory=list)

    @classmethod
    def make(cls, recipe: str, arguments: Sequence[str], *, sweep_id: str | None = None) -> "SweepPlan":
        """The plan of ``metaopt sweep RECIPE ARGUMENTS``; every point's recipe is loaded and checked."""
        from metaopt.pipelines import load

        fixed, axes = parse_grid(arguments)
        recipe_text = find_recipe(recipe).read_text()
        if sweep_id is None:
            digest = hashlib.sha1(json.dumps([recipe_text, list(arguments)]).encode()).hexdigest()[:8]
            sweep_id = f"sweep-{digest}"
        if _slug(sweep_id) != sweep_id:
            raise ConfigError(f"sweep id {sweep_id!r} must be a folder name of letters, digits and ._=+-")
        base = load(recipe, fixed)
        folder = Path(base.output_dir) / base.name / sweep_id
        points = []
        for index, combination in enumerate(product(*(axis.values for axis in axes))):
            overrides = tuple(f"{axis.key}={value}" for axis, value in zip(axes, combination))
            points.append(Point(f"{index:03d}" + "".join(f"-{_slug(o)}" for o in overrides), overrides))
        plan = cls(recipe, fixed, axes, sweep_id, folder, points)
        for point in points:
            load(recipe, plan.overrides(point))  # every point's recipe checked before any runs
        return plan

    def overrides(self, point: Point) -> list[str]:
        """All the overrides of a point: the fixed ones, its W&B group, then its axis values."""
        group = [] if any(o.startswith("wandb.group=") for o in self.fixed) else [
            f"wandb.group={self.sweep_id}/{_slug(point.group())}"]
        return [*self.fixed, *group, *point.overrides]

    def path(self, point: Point) -> Path:
        return self.folder / point.name

    def write(self) -> Path:
        """Write ``plan.json`` (what :meth:`read` reads back) into the sweep folder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / PLAN_FILE
        target.write_text(json.dumps({
            "recipe": self.recipe, "sweep_id": self.sweep_id, "fixed": self.fixed,
            "axes": {axis.key: list(axis.values) for axis in self.axes},
            "points": [{"name": p.name, "overrides": list(p.overrides)} for p in self.points],
        }, indent=2))
        return target

    @classmethod
    def read(cls, folder: str | Path) -> "SweepPlan":
        """The plan of an existing sweep folder."""
        folder = Path(folder)
        if not (folder / PLAN_FILE).is_file():
            raise ConfigError(f"{folder} is not a sweep folder (no {PLAN_FILE}); make one with `metaopt sweep`")
        data = json.loads((folder / PLAN_FILE).read_text())
        return cls(data["recipe"], list(data["fixed"]), [Axis(k, tuple(v)) for k, v in data["axes"].items()],
                   data["sweep_id"], folder, [Point(p["name"], tuple(p["overrides"])) for p in data["points"]])

    def prepare(self, point: Point) -> Path:
        """The point's folder with its resolved ``config.yaml`` (written once: a restarted sweep keeps it)."""
        from metaopt.pipelines import load

        path = self.path(point)
        if not (path / CONFIG_FILE).is_file():
            path.mkdir(parents=True, exist_ok=True)
            (path / CONFIG_FILE).write_text(to_yaml(load(self.recipe, self.overrides(point))))
        return path


# ---------------------------------------------------------------------- running
def run_point(path: str | Path) -> str:
    """Run one prepared point folder: ``skipped`` (finished before), ``resumed`` (from checkpoints) or ``ran``.

    A point continues from its checkpoints, as ``metaopt resume`` does (every recipe kind resumes).
    """
    from metaopt.pipelines import run

    path = Path(path)
    if (path / RESULTS_FILE).is_file():
        return "skipped"
    started = any((path / "checkpoints").rglob("step_*.pt"))
    run(None, run_dir=path, resume=True)
    return "resumed" if started else "ran"


def _run_queue(paths: Sequence[Path]) -> dict[str, str]:
    """Run points one after the other; a refused setting or a divergence fails that point, not the queue."""
    from metaopt.train import DivergenceError

    statuses = {}
    for i, path in enumerate(paths):
        logger.info("sweep point %d/%d: %s", i + 1, len(paths), path)
        try:
            statuses[str(path)] = run_point(path)
        except (ConfigError, DivergenceError) as error:
            logger.error("sweep point %s failed: %s", path, error)
            statuses[str(path)] = f"failed: {error}"
    return statuses


def run_sweep(plan: SweepPlan, *, workers: int = 1) -> dict[str, str]:
    """Run (or continue) every point of a plan; returns each point folder's status.

    With ``workers > 1``, that many processes each take every ``workers``-th point (their output goes to
    ``logs/worker<i>.log`` in the sweep folder).
    """
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be an int >= 1; got {workers!r}")
    plan.write()
    paths = [plan.prepare(point) for point in plan.points]
    if workers == 1 or len(paths) == 1:
        return _run_queue(paths)
    logs = plan.folder / "logs"
    logs.mkdir(exist_ok=True)
    processes = []
    for i in range(min(workers, len(paths))):
        queue = [str(p) for p in paths[i::workers]]
        with open(logs / f"worker{i}.log", "a") as log:
            processes.append((queue, subprocess.Popen([sys.executable, "-m", "metaopt.sweep", *queue],
                                                      stdout=log, stderr=subprocess.STDOUT)))
    try:
        codes = [process.wait() for _, process in processes]
    except KeyboardInterrupt:  # Ctrl-C reached the workers too: they checkpoint and stop
        for _, process in processes:
            process.wait()
        raise
    statuses = {}
    for (queue, _), code in zip(processes, codes):
        for path in queue:
            finished = (Path(path) / RESULTS_FILE).is_file()
            statuses[path] = "finished" if finished else f"failed (worker exit code {code}; see {logs})"
    return statuses


# ---------------------------------------------------------------------- W&B sweeps
def _parsed(text: str) -> Any:
    """An override value as W&B's sweep configuration holds it (a number, string, list, ...)."""
    return OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]


def wandb_config(plan: SweepPlan, *, method: str = "grid", metric: str | None = None,
                 goal: str | None = None) -> dict[str, Any]:
    """The W&B sweep configuration of a plan: ``wandb agent`` runs ``metaopt run RECIPE <fixed> key=value...``.

    ``metric`` defaults to the learner of the first claim about one (else the first learner) at the largest k, as
    the run's summary names it (``compare/<learner>/<metric>@k=<k>``); ``goal`` to the metric's direction.
    """
    from metaopt.pipelines import load

    if method not in METHODS:
        raise ConfigError(f"method={method!r} is not allowed; expected one of {list(METHODS)}")
    config = load(plan.recipe, plan.fixed)
    sweep: dict[str, Any] = {
        "name": f"{config.name}-{plan.sweep_id}",
        "method": method,
        "parameters": {axis.key: {"values": [_parsed(v) for v in axis.values]} for axis in plan.axes},
        "command": ["${env}", "metaopt", "run", plan.recipe, *plan.fixed, "wandb.mode=online",
                    f"wandb.group={plan.sweep_id}", "${args_no_hyphens}"],
    }
    if metric is None and config.pipeline == "episodes":
        metric, lower = _default_metric(config)
        goal = goal or ("minimize" if lower else "maximize")
    if metric is not None:
        sweep["metric"] = {"name": metric, "goal": goal or "minimize"}
    problems = check_wandb_config(sweep)
    if problems:
        raise ConfigError("the W&B sweep configuration is refused: " + "; ".join(problems))
    return sweep


def write_wandb_config(plan: SweepPlan, **options: Any) -> Path:
    """Write the plan's W&B sweep configuration (:func:`wandb_config` with ``options``) to
    ``wandb_sweep.yaml`` in the sweep folder, for ``wandb sweep``."""
    import yaml

    sweep = wandb_config(plan, **options)
    plan.write()
    target = plan.folder / "wandb_sweep.yaml"
    target.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return target


def _default_metric(config) -> tuple[str, bool]:
    from metaopt.config import build_instance
    from metaopt.tasks.base import TaskFamily

    family = build_instance(config.task, "task", TaskFamily)
    learner = next((claim.learner for claim in config.claims if claim.get("learner")), next(iter(config.learners)))
    k = max(config.compare.support_sizes)
    return f"compare/{learner}/{family.metric.name}@k={k}", family.metric.lower_is_better


def check_wandb_config(sweep: dict[str, Any]) -> list[str]:
    """What is wrong with a W&B sweep configuration (empty: nothing).

    Uses W&B's own validation (``sweeps``, the ``wandb[sweeps]`` extra) when it is installed, and always the
    checks below: a known method, discrete values for a grid, a metric for bayes, and a command that passes the
    parameters as ``key=value`` (``${args_no_hyphens}``).
    """
    problems = []
    try:
        import sweeps
    except ImportError:
        sweeps = None
    if sweeps is not None:
        problems += list(sweeps.schema_violations_from_proposed_config(sweep))
    method, parameters, metric = sweep.get("method"), sweep.get("parameters"), sweep.get("metric")
    if method not in METHODS:
        problems.append(f"method must be one of {list(METHODS)}; got {method!r}")
    if not isinstance(parameters, dict) or not parameters:
        problems.append("parameters must be a non-empty mapping of key -> {values: [...]}")
    else:
        for key, spec in parameters.items():
            if not isinstance(spec, dict) or not ({"values", "value"} & set(spec) or {"min", "max"} <= set(spec)):
                problems.append(f"parameters.{key} needs values, value, or min and max")
            elif "values" in spec and (not isinstance(spec["values"], list) or not spec["values"]):
                problems.append(f"parameters.{key}.values must be a non-empty list")
            elif method == "grid" and not {"values", "value"} & set(spec):
                problems.append(f"parameters.{key}: a grid needs values or value, not a range")
    if metric is not None and (not isinstance(metric, dict) or not isinstance(metric.get("name"), str)
                               or metric.get("goal", "minimize") not in ("minimize", "maximize")):
        problems.append("metric must be {name: <summary key>, goal: minimize | maximize}")
    if method == "bayes" and metric is None:
        problems.append("method bayes needs a metric to optimise")
    command = sweep.get("command")
    if not isinstance(command, list) or not all(isinstance(c, str) for c in command) \
            or "${args_no_hyphens}" not in command:
        problems.append("command must be a list of strings that contains ${args_no_hyphens}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """A sweep worker: ``python -m metaopt.sweep POINT_DIR...`` runs those prepared points one after another."""
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        sys.stderr.write("usage: python -m metaopt.sweep POINT_DIR... (started by `metaopt sweep --workers N`)\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    statuses = _run_queue(paths)
    return 1 if any(s.startswith("failed") for s in statuses.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
