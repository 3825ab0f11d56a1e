"""W&B-native views of a run: the comparison as a table and chart, metric axes, artifacts, and reading them back.

The local run folder stays the source of truth (:mod:`metaopt.log`); this module adds what W&B's UI compares
across runs:

- ``compare/results``: a ``wandb.Table`` with one row per learner and support size (``learner, k, metric, mean,
  lower, upper, n``) and ``compare/results_chart``, a line chart of it (one line per learner);
- metric axes: each learner's training curves (``<learner>/*``) against its own ``<learner>/step``, and
  ``compare/*`` against ``compare/k``;
- artifacts: the trained learners of an ``episodes`` run (type ``model``: the run's ``config.yaml`` and each
  learner's final checkpoint, so a downloaded artifact is a run folder that ``metaopt compare`` takes) and each
  learned optimizer of an ``optimizer`` run (type ``learned-optimizer``: its one self-contained file
  ``optimizers/<name>.pt``, which ``optimizers.load`` takes), with the recipe and metrics as metadata.

Every call goes through :class:`metaopt.log.Run`'s guard: a W&B failure is reported once and the run goes on.
:func:`offline_records` reads an offline W&B run back from its ``.wandb`` file (no network), and
:func:`run_folder` turns an artifact reference into a local run folder (that one needs W&B online).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from metaopt.config import ConfigError
from metaopt.log import CONFIG_FILE, Run

__all__ = [
    "RESULT_COLUMNS", "comparison_rows", "declare_axes", "fetch_artifact", "is_artifact_reference",
    "learned_optimizer_path", "learned_optimizer_state", "log_comparison", "log_learners", "log_optimizers",
    "offline_records", "run_folder",
]

RESULT_COLUMNS = ("learner", "k", "metric", "mean", "lower", "upper", "n")
"""The columns of the per-k results table (``n``: held-out tasks behind each mean)."""

MODEL_ARTIFACT, OPTIMIZER_ARTIFACT = "model", "learned-optimizer"
_REFERENCE = re.compile(r"(?:[\w.-]+/){0,2}[\w.-]+:[\w.-]+")


def _artifact_name(text: str) -> str:
    """A W&B artifact name (letters, digits, ``-``, ``_``, ``.``) made from ``text``."""
    return re.sub(r"[^\w.-]", "_", text)


# ---------------------------------------------------------------------- logging
def comparison_rows(comparison: Any) -> list[list[Any]]:
    """A :class:`metaopt.compare.Comparison` (or its ``results.json`` dict) as rows of :data:`RESULT_COLUMNS`."""
    data = comparison if isinstance(comparison, Mapping) else comparison.to_dict()
    return [[name, k, data["metric"], curve["mean"][i], curve["low"][i], curve["high"][i], data["num_tasks"]]
            for name, curve in data["curves"].items() for i, k in enumerate(data["support_sizes"])]


def declare_axes(run: Run, learners: Sequence[str]) -> None:
    """Each learner's training curves against its own step, and the comparison's metrics against k."""
    for name in learners:
        run.define_metric(f"{name}/*", step_metric=f"{name}/step")
    run.define_metric("compare/*", step_metric="compare/k")


def log_comparison(run: Run, comparison: Any) -> None:
    """The per-k results as ``compare/results`` (a table) and ``compare/results_chart`` (mean vs k per learner)."""
    run.log_table("compare/results", RESULT_COLUMNS, comparison_rows(comparison), line=("k", "mean", "learner"),
                  title=f"{comparison.metric.replace('_', ' ')} vs k")


def _metrics(comparison: Any) -> dict[str, Any]:
    return {"metric": comparison.metric, "support_sizes": list(comparison.support_sizes),
            "num_tasks": comparison.num_tasks,
            "mean": {name: dict(zip(map(str, comparison.support_sizes), curve.mean))
                     for name, curve in comparison.curves.items()},
            "claims": [{"text": c.text, "measured": c.measured, "holds": c.holds, "verdict": c.verdict}
                       for c in comparison.claims]}


def log_learners(run: Run, learners: Sequence[str], comparison: Any) -> None:
    """The trained learners as one ``model`` artifact ``<run name>-learners``: ``config.yaml`` and each learner's
    final checkpoint under ``checkpoints/<learner>/``, with the recipe and the comparison as metadata."""
    files = {CONFIG_FILE: run.path / CONFIG_FILE}
    for name in learners:
        found = sorted((run.checkpoint_dir / name).glob("step_*.pt"))
        if found:
            files[f"checkpoints/{name}/{found[-1].name}"] = found[-1]
    if len(files) == 1 or not run.writes:
        return
    run.log_artifact(_artifact_name(f"{run.name}-learners"), MODEL_ARTIFACT, files,
                     metadata={"recipe": run.name, "learners": list(learners), "config": run.config,
                               **_metrics(comparison)},
                     description=f"trained learners of {run.name} ({run.path.name}); `metaopt compare` takes it")


def log_optimizers(run: Run, optimizers: Mapping[str, Mapping[str, Any]]) -> None:
    """Each learned optimizer as a ``learned-optimizer`` artifact ``<run>-<name>``, its meta-training results and
    the recipe as metadata: its one file ``optimizers/<name>.pt`` (recipe, rule and metrics inside), or, for a
    learned optimizer of a class that file does not cover, the run's config and ``checkpoints/<name>.pt``."""
    for name, results in optimizers.items():
        one_file, state = run.path / "optimizers" / f"{name}.pt", run.checkpoint_dir / f"{name}.pt"
        if not run.writes or not (one_file.is_file() or state.is_file()):
            continue
        files = ({f"optimizers/{name}.pt": one_file} if one_file.is_file()
                 else {CONFIG_FILE: run.path / CONFIG_FILE, f"checkpoints/{name}.pt": state})
        run.log_artifact(_artifact_name(f"{run.name}-{name}"), OPTIMIZER_ARTIFACT, files,
                         metadata={"recipe": run.name, "optimizer": name, "config": run.config, **results},
                         description=f"learned optimizer {name} of {run.name}; use it with optimizers.load("
                                     "metaopt.wandb_native.learned_optimizer_path(REF, NAME), "
                                     "model.named_parameters())")


# ---------------------------------------------------------------------- starting from an artifact
def is_artifact_reference(text: str) -> bool:
    """True for ``[entity/][project/]name:version`` that is not an existing path."""
    return not Path(text).exists() and _REFERENCE.fullmatch(text) is not None


def fetch_artifact(reference: str, root: str | Path = "runs/artifacts") -> Path:
    """Download a W&B artifact (``[entity/][project/]name:version``) to ``root/<name>_<version>`` (needs W&B online).

    Raises:
        ConfigError: the artifact cannot be fetched (offline runs reach W&B only after ``wandb sync``).
    """
    target = Path(root) / _artifact_name(reference.rsplit("/", 1)[-1].replace(":", "_"))
    try:
        import wandb

        artifact = wandb.Api().artifact(reference)
        return Path(artifact.download(root=str(target)))
    except Exception as error:  # noqa: BLE001 - any W&B failure becomes one readable message
        raise ConfigError(f"could not fetch W&B artifact {reference!r} ({type(error).__name__}: {error}); give a "
                          "run folder instead, or `wandb sync` the offline run and log in first") from error


def run_folder(source: str | Path, root: str | Path = "runs/artifacts") -> Path:
    """A run folder from a path or an artifact reference (downloaded into ``root``)."""
    if is_artifact_reference(str(source)):
        return fetch_artifact(str(source), root)
    return Path(source)


def learned_optimizer_path(source: str | Path, name: str) -> Path:
    """The one file of learned optimizer ``name`` (``optimizers.load`` takes it) in a run folder or a
    ``learned-optimizer`` artifact reference (downloaded)."""
    path = run_folder(source) / "optimizers" / f"{name}.pt"
    if not path.is_file():
        raise ConfigError(f"{source} has no learned optimizer file {name!r} (no {path}); the optimizer recipe's "
                          "learned: section names them, and runs write a file for LayerwiseMixture and "
                          "PerParameterMLP")
    return path


def learned_optimizer_state(source: str | Path, name: str) -> dict[str, Any]:
    """A learned optimizer's ``state_dict`` from a run folder or a ``learned-optimizer`` artifact reference
    (its checkpoint, or the ``state_dict`` in its one file)."""
    import torch

    folder = run_folder(source)
    path, one_file = folder / "checkpoints" / f"{name}.pt", folder / "optimizers" / f"{name}.pt"
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    if one_file.is_file():
        return torch.load(one_file, map_location="cpu", weights_only=True)["state_dict"]
    raise ConfigError(f"{source} has no learned optimizer {name!r} (no {path}); the optimizer recipe's "
                      "learned: section names them")


# ---------------------------------------------------------------------- reading an offline run back
_BLOCK, _HEADER = 32768, 7  # W&B's transaction log: LevelDB-style records in 32 KiB blocks
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _payloads(data: bytes) -> Iterator[bytes]:
    ident, magic, _ = struct.unpack("<4sHB", data[:_HEADER])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError("not a W&B transaction log (.wandb file)")
    position, pending = _HEADER, b""
    while position + _HEADER <= len(data):
        left = _BLOCK - position % _BLOCK
        if left < _HEADER:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + _HEADER])
        if length == 0 and kind == 0:
            position += left
            continue
        chunk = data[position + _HEADER:position + _HEADER + length]
        position += _HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk


def offline_records(run_path: str | Path) -> Iterator[tuple[str, Any]]:
    """``(kind, record)`` for every record of the offline W&B runs under a run folder (``metric``, ``artifact``,
    ``run``, ``history``, ...), decoded with W&B's own protobuf messages."""
    from wandb.proto import wandb_internal_pb2

    for log in sorted(Path(run_path).glob("wandb/offline-run-*/run-*.wandb")):
        for payload in _payloads(log.read_bytes()):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            kind = record.WhichOneof("record_type")
            yield kind, getattr(record, kind)
