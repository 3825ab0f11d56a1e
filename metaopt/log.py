"""Run: one folder per run on disk, mirrored to Weights & Biases.

The local folder is the source of truth: ``runs/<name>/<timestamp>/`` holds the resolved config,
``metrics.jsonl``, ``summary.json``, ``figures/`` and ``checkpoints/``. W&B (``offline`` by default)
gets the same metrics, config, summary and figures; any W&B failure is reported once and the run
goes on locally. In a distributed run rank 0 alone writes the folder and the W&B run: on the other ranks a
``Run`` knows the folder (to read checkpoints) and writes nothing.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Sequence, get_args

from metaopt import checkpoints, distributed, plotting

logger = logging.getLogger(__name__)

WandbMode = Literal["online", "offline", "disabled"]
WANDB_MODES = get_args(WandbMode)
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"


@dataclass
class WandbSettings:
    """Weights & Biases mirror of a run (a recipe's ``wandb:``; ``offline`` writes to the run folder, no network)."""

    mode: WandbMode = "offline"
    project: str = "metaopt"
    entity: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    group: Optional[str] = None  # W&B's run group (a sweep sets its id; None: the recipe's name)


def _jsonable(value: Any) -> Any:
    """Numbers, strings, lists and dicts as JSON accepts them (non-finite floats become strings)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "numel", lambda: 2)() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def new_folder(parent: Path) -> Path:
    """A fresh ``parent/<timestamp>`` folder, made exclusively: two runs started at once never share one."""
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        folder = parent / _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


class Run:
    """A run's local folder and its W&B mirror.

    Args:
        name: the run's name (the recipe's name); the folder is ``root/name/<timestamp>``.
        config: the resolved config as a plain dict, written to ``config.yaml`` and given to W&B.
        root: where run folders live.
        wandb_mode: ``online``, ``offline`` (default) or ``disabled``.
        project, entity, tags: W&B run fields.
        path: an existing run folder to continue (resume) instead of making a new one.
        group, job_type: W&B's run group (runs that differ only in their seed share one, so the UI shows
            their band) and job type (``train``, ``compare``).

    Under torchrun every rank makes its ``Run`` at the same point: rank 0 names the folder and the others
    receive its path; only rank 0 writes (``writes``).
    """

    @classmethod
    def open(cls, name: str, config: Mapping[str, Any], wandb: WandbSettings, *, root: str | os.PathLike = "runs",
             path: str | os.PathLike | None = None, job_type: str | None = None) -> "Run":
        """A run with a recipe's W&B settings (W&B group: ``wandb.group``, else the run's name)."""
        return cls(name, config, root=root, wandb_mode=wandb.mode, project=wandb.project, entity=wandb.entity,
                   tags=list(wandb.tags), path=path, group=getattr(wandb, "group", None) or name, job_type=job_type)

    def __init__(
        self,
        name: str,
        config: Mapping[str, Any],
        *,
        root: str | os.PathLike = "runs",
        wandb_mode: str = "offline",
        project: str = "metaopt",
        entity: str | None = None,
        tags: list[str] | None = None,
        path: str | os.PathLike | None = None,
        group: str | None = None,
        job_type: str | None = None,
    ) -> None:
        if wandb_mode not in WANDB_MODES:
            raise ValueError(f"wandb mode must be one of {WANDB_MODES}; got {wandb_mode!r}")
        self.name = name
        self.config = dict(config)
        if path is None:
            path = distributed.broadcast_object(new_folder(Path(root) / name) if distributed.is_main() else None)
        self.path = Path(path)
        self.writes = distributed.is_main()
        self._wandb = None
        self._wandb_failed = False
        self._group, self._job_type = group, job_type
        if not self.writes:
            return
        self.figure_dir.mkdir(parents=True, exist_ok=True)  # checkpoints/ is made by the first checkpoint
        if wandb_mode != "disabled":
            self._start_wandb(wandb_mode, project, entity, tags or [])

    # ------------------------------------------------------------------ paths
    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def figure_dir(self) -> Path:
        return self.path / "figures"

    # ------------------------------------------------------------------ W&B, guarded
    def _start_wandb(self, mode: str, project: str, entity: str | None, tags: list[str]) -> None:
        def start():
            import wandb

            return wandb.init(
                project=project,
                entity=entity,
                name=f"{self.name}-{self.path.name}",
                id=self._wandb_id(),
                resume="allow",
                tags=tags,
                group=self._group,
                job_type=self._job_type,
                config=_jsonable(self.config),
                dir=str(self.path),
                mode=mode,
                settings=wandb.Settings(silent=True, console="off"),
            )

        self._wandb = self._guard("start", start)

    def _wandb_id(self) -> str:
        """A stable W&B run id stored in the run folder, so a resumed run continues the same W&B run."""
        id_file = self.path / "wandb_id.txt"
        if id_file.exists():
            return id_file.read_text().strip()
        # started by `wandb agent`: keep the id the agent gave, so the run counts for its sweep
        run_id = os.environ.get("WANDB_RUN_ID") if os.environ.get("WANDB_SWEEP_ID") else None
        run_id = run_id or secrets.token_hex(4)
        id_file.write_text(run_id)
        return run_id

    def _guard(self, what: str, fn):
        """Call a W&B function; on the first failure warn once and stop mirroring to W&B."""
        if self._wandb_failed:
            return None
        try:
            return fn()
        except Exception as error:  # noqa: BLE001 - W&B must never kill a run
            self._wandb_failed = True
            self._wandb = None
            logger.warning(
                "W&B %s failed (%s: %s); continuing with local logging only in %s",
                what, type(error).__name__, error, self.path,
            )
            return None

    @property
    def wandb_active(self) -> bool:
        return self._wandb is not None

    # ------------------------------------------------------------------ logging
    def write_config(self, yaml_text: str) -> Path:
        """Write the resolved config next to the results."""
        target = self.path / CONFIG_FILE
        if self.writes:
            checkpoints.write_text(target, yaml_text)
        return target

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Append a row to ``metrics.jsonl`` and mirror it to W&B."""
        if not self.writes:
            return
        row = {"step": step, **_jsonable(metrics)} if step is not None else _jsonable(metrics)
        target = self.path / METRICS_FILE
        with checkpoints.writing(target), open(target, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._guard("log", lambda: self._wandb.log(dict(metrics), step=step))

    def discard_rows(self, stale: Callable[[dict[str, Any]], bool]) -> int:
        """Drop the rows of ``metrics.jsonl`` that ``stale`` picks (rewritten atomically); returns how many.

        A resumed run drops what was logged after the checkpoint it continues from, since it logs those
        steps again: the file then matches an uninterrupted run's row for row. W&B's history cannot be
        rewound offline; its rows carry each learner's ``<name>/step``, so charts against that axis stay
        right (a repeated step is drawn at the same x).
        """
        target = self.path / METRICS_FILE
        if not self.writes or not target.exists():
            return 0
        rows = [line for line in target.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if not stale(json.loads(line))]
        if len(kept) != len(rows):
            checkpoints.write_text(target, "".join(line + "\n" for line in kept))
        return len(rows) - len(kept)

    def summary(self, values: Mapping[str, Any]) -> None:
        """Merge values into ``summary.json`` and the W&B summary."""
        target = self.path / "summary.json"
        if not self.writes:
            return
        current = json.loads(target.read_text()) if target.exists() else {}
        current.update(_jsonable(values))
        checkpoints.write_text(target, json.dumps(current, indent=2))
        if self._wandb is not None:
            self._guard("summary", lambda: self._wandb.summary.update(_jsonable(values)))

    def save_figure(self, figure, name: str) -> Path:
        """Save a matplotlib figure as ``figures/<name>.png`` (:func:`metaopt.plotting.save`) and mirror it to W&B
        as an image."""
        target = self.figure_dir / f"{name}.png"
        if not self.writes:
            return target
        with checkpoints.writing(target):
            plotting.save(figure, target)
        if self._wandb is not None:

            def upload():
                import wandb

                self._wandb.log({f"figures/{name}": wandb.Image(str(target))})

            self._guard("figure upload", upload)
        return target

    def save_json(self, payload: Mapping[str, Any], name: str) -> Path:
        """Write ``<name>.json`` into the run folder."""
        target = self.path / f"{name}.json"
        if not self.writes:
            return target
        checkpoints.write_text(target, json.dumps(_jsonable(payload), indent=2))
        return target

    def save_text(self, text: str, filename: str) -> Path:
        """Write ``filename`` (e.g. ``results.md``, ``results.csv``) into the run folder."""
        target = self.path / filename
        if self.writes:
            checkpoints.write_text(target, text)
        return target

    # ------------------------------------------------------------------ W&B-native views, guarded
    def define_metric(self, pattern: str, *, step_metric: str) -> None:
        """Plot the W&B metrics matching ``pattern`` (a glob, e.g. ``transformer/*``) against ``step_metric``.

        Each learner's training curves get their own step axis, and ``compare/*`` the support size k.
        """
        if self._wandb is None:
            return

        def define():
            self._wandb.define_metric(step_metric, hidden=True)
            self._wandb.define_metric(pattern, step_metric=step_metric)

        self._guard("define_metric", define)

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *,
                  line: tuple[str, str, str] | None = None, title: str = "") -> None:
        """Log ``rows`` as a ``wandb.Table`` under ``key``; ``line=(x, y, stroke)`` adds a line chart of it
        under ``<key>_chart`` (one line per value of the ``stroke`` column)."""
        if self._wandb is None:
            return

        def upload():
            import wandb

            table = wandb.Table(columns=list(columns), data=[list(row) for row in _jsonable(rows)])
            logged = {key: table}
            if line is not None:
                x, y, stroke = line
                logged[f"{key}_chart"] = wandb.plot.line(table, x, y, stroke=stroke, title=title or key)
            self._wandb.log(logged)

        self._guard("table upload", upload)

    def log_artifact(self, name: str, kind: str, files: Mapping[str, str | os.PathLike], *,
                     metadata: Mapping[str, Any] | None = None, description: str = "") -> None:
        """Log files of the run folder as a W&B Artifact of type ``kind`` (``files``: name in the artifact ->
        local path); offline, the manifest is written to the W&B run folder and uploaded by ``wandb sync``."""
        if self._wandb is None:
            return

        def upload():
            import wandb

            artifact = wandb.Artifact(name, type=kind, description=description, metadata=_jsonable(metadata or {}))
            for target, source in files.items():
                artifact.add_file(str(source), name=target, policy="immutable")  # no staging copy
            self._wandb.log_artifact(artifact)

        self._guard("artifact upload", upload)

    def finish(self) -> None:
        """Close the W&B run (flushes an offline run to its folder)."""
        if self._wandb is not None:
            self._guard("finish", self._wandb.finish)
            self._wandb = None

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.finish()
