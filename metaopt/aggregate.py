"""Results over seeds: points of a sweep that differ only in ``seed`` make one group, summarised across seeds.

Per group, learner and support size k: the mean over seeds of each seed's mean error, a 95% percentile
bootstrap interval of that mean across seeds (seeds resampled with replacement; with one seed, that seed's own
interval over tasks), and each seed's own interval over tasks. The recipe's claims are checked on the group's
means (:func:`metaopt.compare.check_claim`), a comparison of two learners (or analysis values) on a paired
bootstrap over the seeds (each seed scores both on the same tasks); with one seed the seed's own verdict, judged
on its per-task scores, stands. Each says how many seeds hold it one by one.

:func:`summarise` writes ``sweep.json``, ``sweep.md`` (a table per group) and ``figures/<metric>_vs_k.png``
(error vs k with the across-seed band, one line per learner, one panel per group) into the sweep folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch

from metaopt import plotting
from metaopt.compare import Claim, ClaimSpec, Comparison, Curve, analysis_value, check_claim, claim_line
from metaopt.sweep import RESULTS_FILE, SEED_KEY, SweepPlan

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Group", "aggregate", "bootstrap_mean_interval", "format_group", "groups_of", "plot_groups", "summarise"]

RESAMPLES = 2000
LEVEL = 0.95


def bootstrap_mean_interval(values: np.ndarray, *, resamples: int = RESAMPLES, level: float = LEVEL,
                            seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of the mean over the first axis (seeds) of ``values`` ``[n, K]``.

    Each resample draws n rows with replacement (the same rows for every column); returns (low, high) ``[K]``.
    """
    values = np.asarray(values, dtype=float)
    if values.ndim != 2 or values.shape[0] == 0:
        raise ValueError(f"values must be [seeds, K] with at least one seed; got shape {values.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    rows = np.random.default_rng(seed).integers(0, values.shape[0], size=(resamples, values.shape[0]))
    means = values[rows].mean(axis=1)  # [resamples, K]
    tail = (1 - level) / 2
    return np.quantile(means, tail, axis=0), np.quantile(means, 1 - tail, axis=0)


@dataclass
class Group:
    """The points of a sweep that differ only in their seed, and what they measured together (``chance`` and
    ``dimension`` as in :class:`~metaopt.compare.Comparison`, where the runs recorded them)."""

    name: str
    settings: dict[str, str]
    seeds: list[str]
    points: list[str]
    metric: str
    lower_is_better: bool
    support_sizes: list[int]
    num_tasks: int
    learners: dict[str, dict[str, Any]]
    claims: list[dict[str, Any]]
    chance: float | None = None
    dimension: int | None = None

    def comparison(self) -> Comparison:
        """The group's means and across-seed intervals as a :class:`~metaopt.compare.Comparison`."""
        curves = {name: Curve(v["mean"], v["low"], v["high"], v["implicit"]) for name, v in self.learners.items()}
        return Comparison(self.metric, self.lower_is_better, self.support_sizes, self.num_tasks, curves)


def aggregate(name: str, settings: Mapping[str, str], seeds: Sequence[str], points: Sequence[str],
              results: Sequence[Mapping[str, Any]]) -> Group:
    """One group from its points' ``results.json`` contents (same metric and support sizes in each).

    Raises:
        ValueError: no results, or results that compare different things.
    """
    if not results:
        raise ValueError(f"group {name!r} has no finished point to aggregate")
    first = results[0]
    for point, other in zip(points, results):
        for key in ("metric", "support_sizes"):
            if other[key] != first[key]:
                raise ValueError(f"{point}: {key}={other[key]!r} differs from {first[key]!r} in the same group")
        if set(other["curves"]) != set(first["curves"]):
            raise ValueError(f"{point}: learners {sorted(other['curves'])} differ from {sorted(first['curves'])}")
    learners = {}
    for learner, curve in first["curves"].items():
        per_seed = np.array([r["curves"][learner]["mean"] for r in results])  # [n, K]
        if len(results) > 1:
            low, high = bootstrap_mean_interval(per_seed)
            low, high = low.tolist(), high.tolist()
        else:
            low, high = curve["low"], curve["high"]
        learners[learner] = {
            "mean": per_seed.mean(axis=0).tolist(), "low": low, "high": high, "n": len(results),
            "implicit": curve["implicit"], "seed_means": per_seed.tolist(),
            "within_seed": {"low": [r["curves"][learner]["low"] for r in results],
                            "high": [r["curves"][learner]["high"] for r in results]},
        }
    group = Group(name, dict(settings), list(seeds), list(points), first["metric"], first["lower_is_better"],
                  list(first["support_sizes"]), int(first["num_tasks"]), learners, [], first.get("chance"),
                  first.get("dimension"))
    spec_fields = [f.name for f in dataclasses.fields(ClaimSpec)]
    record_fields = [f.name for f in dataclasses.fields(Claim)]
    comparison = group.comparison()
    comparison.analysis = first.get("analysis", {})  # where a path is not on every seed: the first seed's value
    for i, claim in enumerate(first.get("claims", [])):
        holding = sum(bool(r["claims"][i]["holds"]) for r in results if len(r.get("claims", [])) > i)
        recorded = Claim(**{k: claim[k] for k in record_fields if k in claim})
        spec = {k: claim[k] for k in spec_fields if k in claim}
        try:  # across seeds, the seeds are the paired units; one seed keeps its verdict on per-task scores
            measured = recorded if len(results) == 1 else check_claim(
                comparison, spec, _per_seed(results, learners, spec, group.support_sizes), resamples=RESAMPLES)
        except KeyError:  # an analysis path the first seed's results lack: its own record says so
            measured = recorded
        group.claims.append({**dataclasses.asdict(measured), "seeds_holding": holding, "seeds": len(results)})
    return group


def _per_seed(results: Sequence[Mapping[str, Any]], learners: Mapping[str, Mapping[str, Any]],
              spec: Mapping[str, Any], support_sizes: Sequence[int]) -> dict[str, torch.Tensor]:
    """What a claim is judged on across seeds: each learner's per-seed means ``[K, seeds]`` and, for an analysis
    claim, each analysis path's per-seed values where every seed has them (the seeds are the paired units)."""
    scores = {name: torch.tensor(v["seed_means"], dtype=torch.float64).T for name, v in learners.items()}
    if spec.get("analysis"):
        for path in [spec["analysis"], *spec.get("better_than", []), *filter(None, [spec.get("relative_to")])]:
            try:
                values = [[analysis_value(r.get("analysis", {}), path, k) for r in results] for k in support_sizes]
            except KeyError:
                continue  # some seed lacks it: check_claim reads the first seed's value, without interval
            scores[path] = torch.tensor(values, dtype=torch.float64)
    return scores


def groups_of(plan: SweepPlan) -> list[Group]:
    """The plan's finished points, grouped by everything but their seed (in the plan's order)."""
    grouped: dict[str, list] = {}
    for point in plan.points:
        path = plan.path(point) / RESULTS_FILE
        results = json.loads(path.read_text()) if path.is_file() else {}
        if "metric" in results:  # a comparison's results (an optimizer recipe's have no per-k curves)
            grouped.setdefault(point.group(), []).append((point, results))
    groups = []
    for name, members in grouped.items():
        settings = {k: v for k, v in members[0][0].settings.items() if k != SEED_KEY}
        seeds = [p.settings.get(SEED_KEY, "recipe's") for p, _ in members]
        groups.append(aggregate(name, settings, seeds, [p.name for p, _ in members], [r for _, r in members]))
    return groups


def _interval(mean: float, low: float, high: float) -> str:
    return f"{mean:.4g} [{low:.4g}, {high:.4g}]" if all(map(math.isfinite, (mean, low, high))) else f"{mean}"


def format_group(group: Group) -> str:
    """A group as markdown: mean over seeds [95% bootstrap interval across seeds] per learner and k, then claims."""
    seeds = f"{len(group.seeds)} seed{'s' if len(group.seeds) != 1 else ''} ({', '.join(group.seeds)})"
    band = "across seeds" if len(group.seeds) > 1 else f"over {group.num_tasks} tasks"
    lines = [f"### {group.name}", "", f"{group.metric}: mean over {seeds} [95% bootstrap interval {band}]", "",
             "| learner | " + " | ".join(f"k={k}" for k in group.support_sizes) + " |",
             "|---|" + "---:|" * len(group.support_sizes)]
    for name, v in group.learners.items():
        cells = [_interval(m, lo, hi) for m, lo, hi in zip(v["mean"], v["low"], v["high"])]
        lines.append(f"| {name}{' (icl)' if v['implicit'] else ''} | " + " | ".join(cells) + " |")
    if group.claims:
        lines += ["", "claims (on the mean over seeds):"]
        for claim in group.claims:
            lines.append(f"- {claim['text']} — {claim_line(claim, group.lower_is_better)}; holds for "
                         f"{claim['seeds_holding']} of {claim['seeds']} seeds")
    return "\n".join(lines)


def plot_groups(groups: Sequence[Group], title: str = "") -> Figure:
    """Metric vs k with the across-seed band, one line per learner, one panel per group (the same y range, up
    to three panels a row)."""
    if not groups:
        raise ValueError("plot_groups needs at least one group")
    columns = min(3, len(groups))
    fig, axes = plotting.new_figure(columns, math.ceil(len(groups) / columns), panel=(5.4, 4.0))
    order = list(dict.fromkeys(name for group in groups for name in group.learners))
    every = []
    for ax, group in zip(axes, groups):
        series = [plotting.Series(name, group.support_sizes, v["mean"], v["low"], v["high"], v["implicit"])
                  for name, v in group.learners.items()]
        plotting.plot_vs_k(ax, series, group.metric, chance=group.chance, dimension=group.dimension,
                           styles=[order.index(name) for name in group.learners])
        ax.set_title(f"{group.name} ({len(group.seeds)} seed{'s' if len(group.seeds) != 1 else ''})")
        every += series
    plotting.same_y_range(axes[:len(groups)])
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    metric = groups[0].metric.replace("_", " ")
    note = plotting.learner_note(every)
    subtitle = (f"{metric}: mean over seeds, {plotting.band_word(every)}: 95% bootstrap interval across seeds "
                f"(a single seed: its interval over {groups[0].num_tasks} tasks)" + (f" · {note}" if note else ""))
    return plotting.finish(fig, title or f"{metric} vs k", subtitle)


def summarise(folder: str | Path) -> tuple[list[Group], dict[str, Path]]:
    """Aggregate a sweep folder's finished points; writes ``sweep.json``, ``sweep.md`` and the plot.

    Returns the groups and the paths written (``json``, ``table``, ``plot``; no plot when nothing finished).
    """
    plan = SweepPlan.read(folder)
    groups = groups_of(plan)
    finished = {p.name: (plan.path(p) / RESULTS_FILE).is_file() for p in plan.points}
    payload = {
        "recipe": plan.recipe, "sweep_id": plan.sweep_id, "fixed": plan.fixed,
        "axes": {a.key: list(a.values) for a in plan.axes},
        "points": [{"name": p.name, "overrides": list(p.overrides), "finished": finished[p.name]}
                   for p in plan.points],
        "groups": [dataclasses.asdict(g) for g in groups],
    }
    written = {"json": plan.folder / "sweep.json", "table": plan.folder / "sweep.md"}
    written["json"].write_text(json.dumps(payload, indent=2))
    header = (f"# sweep {plan.sweep_id} of {plan.recipe}\n\n{sum(finished.values())} of {len(finished)} points "
              f"finished; fixed: {' '.join(plan.fixed) or 'none'}\n")
    written["table"].write_text("\n\n".join([header, *(format_group(g) for g in groups)]) + "\n")
    if groups:
        (plan.folder / "figures").mkdir(exist_ok=True)
        written["plot"] = plan.folder / "figures" / f"{groups[0].metric}_vs_k.png"
        plotting.save(plot_groups(groups, title=f"{plan.recipe}: {plan.sweep_id}"), written["plot"])
    return groups, written
