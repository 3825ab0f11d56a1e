"""``metaopt report``: several runs and sweeps side by side, from their local folders only (no network).

Each folder given is one of
- a run folder (``config.yaml`` + ``results.json``) or a re-comparison of one (``RUN/compare/<timestamp>/``);
- a sweep folder (``plan.json``): one entry per group of points that differ only in their seed, its intervals
  across seeds (:mod:`metaopt.aggregate`);
- a folder holding such folders (``runs/quickstart/``, a run folder whose own ``results.json`` is missing but
  that has ``compare/<timestamp>/`` folders): every one found one level down.

The report is one table per metric (markdown and CSV: ``run, learner, metric, k, mean, lower, upper, n``) and one
plot per metric (a panel per run, the same y range and learner colours in each), each run named by the config
keys in which the runs differ.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from omegaconf import OmegaConf

from metaopt import plotting
from metaopt.config import ConfigError
from metaopt.log import CONFIG_FILE
from metaopt.sweep import PLAN_FILE, RESULTS_FILE, SEED_KEY, SweepPlan

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Entry", "Report", "collect", "differing_keys", "make_report"]

IGNORED_KEYS = ("description", "output_dir", "progress", "threads", "wandb.")
"""Config keys that do not change what a run measures, left out of the legend."""
COLUMNS = ("run", "learner", "metric", "k", "mean", "lower", "upper", "n")


@dataclass
class Entry:
    """One column of the comparison: a run, a re-comparison, or a sweep group (mean over seeds)."""

    source: Path
    config: dict[str, Any]
    results: dict[str, Any]
    n: str  # what each mean averages: "<N> tasks" or "<N> seeds"
    label: str = ""


@dataclass
class Report:
    """What :func:`make_report` wrote and the markdown it holds."""

    folder: Path
    markdown: str
    entries: list[Entry]
    files: dict[str, Path] = field(default_factory=dict)


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flat(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, Mapping)) else value
    return flat


def _config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        return {}
    flat = _flat(OmegaConf.to_container(OmegaConf.load(path), resolve=False))
    return {k: v for k, v in flat.items() if not any(k == i or k.startswith(i) for i in IGNORED_KEYS)}


def _run_entry(folder: Path) -> Entry:
    results = json.loads((folder / RESULTS_FILE).read_text())
    if "curves" not in results or "metric" not in results:
        raise ConfigError(f"{folder / RESULTS_FILE} holds no per-k comparison (an optimizer recipe's results); "
                          "report compares runs of `episodes` recipes")
    return Entry(folder, _config(folder), results, f"{results['num_tasks']} tasks")


def _sweep_entries(folder: Path) -> list[Entry]:
    from metaopt.aggregate import groups_of

    plan = SweepPlan.read(folder)
    first = {point.group(): plan.path(point) for point in reversed(plan.points)}
    entries = []
    for group in groups_of(plan):
        config = {**_config(first[group.name]), SEED_KEY: ",".join(group.seeds)}  # the seeds averaged over
        results = {"metric": group.metric, "lower_is_better": group.lower_is_better,
                   "support_sizes": group.support_sizes, "curves": group.learners, "chance": group.chance,
                   "dimension": group.dimension}
        entries.append(Entry(folder / group.name, config, results, f"{len(group.seeds)} seeds"))
    if not entries:
        raise ConfigError(f"sweep {folder} has no finished point yet; run `metaopt sweep` again to continue it")
    return entries


def _entries(folder: Path) -> list[Entry]:
    if (folder / PLAN_FILE).is_file():
        return _sweep_entries(folder)
    if (folder / RESULTS_FILE).is_file():
        return [_run_entry(folder)]
    inside = sorted(p for p in [*folder.glob("*"), *folder.glob("compare/*")] if p.is_dir()
                    and ((p / PLAN_FILE).is_file() or (p / RESULTS_FILE).is_file()))
    return [entry for child in inside for entry in _entries(child)]


def collect(folders: Sequence[str | Path]) -> list[Entry]:
    """Every run and sweep group under the folders given, labelled by their differing config keys.

    Raises:
        ConfigError: a folder that does not exist or holds no results.
    """
    entries = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise ConfigError(f"{folder} is not a folder; give run, compare or sweep folders (e.g. runs/quickstart)")
        found = _entries(folder)
        if not found:
            raise ConfigError(f"{folder} holds no results.json or sweep (plan.json), nor folders that do")
        entries += found
    keys = differing_keys([e.config for e in entries])
    for entry in entries:
        entry.label = ", ".join(f"{k}={entry.config.get(k, '-')}" for k in keys) or entry.source.name
    labels = [e.label for e in entries]
    for entry in entries:
        if labels.count(entry.label) > 1:  # the same settings twice (e.g. a run and its re-comparison)
            entry.label = f"{entry.label} ({entry.source.parent.name}/{entry.source.name})"
    return entries


def differing_keys(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The flat config keys whose values are not the same in every config (a missing key differs)."""
    keys = sorted({k for c in configs for k in c})
    missing = object()
    return [k for k in keys if len({json.dumps(c.get(k, missing), default=str) for c in configs}) > 1]


def _rows(entries: Sequence[Entry], metric: str) -> list[list[Any]]:
    return [[e.label, learner, metric, k, curve["mean"][i], curve["low"][i], curve["high"][i], e.n]
            for e in entries if e.results["metric"] == metric
            for learner, curve in e.results["curves"].items() for i, k in enumerate(e.results["support_sizes"])]


def _markdown(entries: Sequence[Entry], metric: str) -> str:
    chosen = [e for e in entries if e.results["metric"] == metric]
    ks = sorted({k for e in chosen for k in e.results["support_sizes"]})
    lines = [f"## {metric} (mean [95% interval])", "", "| run | learner | n | " + " | ".join(f"k={k}" for k in ks)
             + " |", "|---|---|---|" + "---:|" * len(ks)]
    for e in chosen:
        for learner, curve in e.results["curves"].items():
            at = dict(zip(e.results["support_sizes"], zip(curve["mean"], curve["low"], curve["high"])))
            cells = [f"{at[k][0]:.4g} [{at[k][1]:.4g}, {at[k][2]:.4g}]" if k in at else "" for k in ks]
            lines.append(f"| {e.label} | {learner} | {e.n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(entries: Sequence[Entry], metric: str) -> Figure:
    """``metric`` vs k, a panel per entry (up to three a row), each learner in the same colour in every panel."""
    chosen = [e for e in entries if e.results["metric"] == metric]
    columns = min(3, len(chosen))
    fig, axes = plotting.new_figure(columns, math.ceil(len(chosen) / columns), panel=(5.4, 4.0))
    order = list(dict.fromkeys(name for e in chosen for name in e.results["curves"]))
    every = []
    for ax, e in zip(axes, chosen):
        ks = e.results["support_sizes"]
        series = [plotting.Series(name, ks, c["mean"], c["low"], c["high"], c["implicit"])
                  for name, c in e.results["curves"].items()]
        plotting.plot_vs_k(ax, series, metric, chance=e.results.get("chance"), dimension=e.results.get("dimension"),
                           styles=[order.index(name) for name in e.results["curves"]])
        ax.set_title(f"{e.label} ({e.n})")
        every += series
    plotting.same_y_range(axes[:len(chosen)])
    for ax in axes[len(chosen):]:
        ax.set_visible(False)
    note = plotting.learner_note(every)
    name = metric.replace("_", " ")
    subtitle = (f"{name}: mean per run (over its tasks, or over seeds for a sweep group), "
                f"{plotting.band_word(every)}: 95% interval"
                + (f" · {note}" if note else ""))
    return plotting.finish(fig, f"report: {name} vs k", subtitle)


def make_report(folders: Sequence[str | Path], out: str | Path | None = None) -> Report:
    """Write ``report.md``, ``report.csv`` and ``<metric>_vs_k.png`` for the folders given.

    ``out`` defaults to ``<folder>/report`` for one folder and ``runs/reports/<timestamp>`` for several.
    """
    entries = collect(folders)
    if out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path(folders[0]) / "report" if len(folders) == 1 else Path("runs") / "reports" / stamp
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = list(dict.fromkeys(e.results["metric"] for e in entries))
    keys = differing_keys([e.config for e in entries])
    parts = [f"# report: {len(entries)} runs", "", "runs (named by the settings in which they differ: "
             f"{', '.join(keys) or 'none'}):", *(f"- {e.label}: {e.source}" for e in entries)]
    report = Report(out, "", entries)
    with open(out / "report.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(COLUMNS)
        for metric in metrics:
            writer.writerows(_rows(entries, metric))
            parts += ["", _markdown(entries, metric)]
            report.files[metric] = out / f"{metric}_vs_k.png"
            plotting.save(_plot(entries, metric), report.files[metric])
    report.markdown = "\n".join(parts) + "\n"
    (out / "report.md").write_text(report.markdown)
    report.files = {"markdown": out / "report.md", "csv": out / "report.csv", **report.files}
    return report
