"""The analyses ``metaopt.compare.compare`` runs on request, by name, and how they are reported.

A recipe asks for analyses by name, or by a mapping with a ``name`` and options::

    compare:
      analysis: [sensitivity, spd_ilwd, {name: best_gd, steps: [1, 2, 3]}, interpolation]

Each runs on the first ``num_tasks`` tasks of the comparison's held-out episodes (the same tasks every
learner saw) and writes plain dicts and lists (JSON-ready) under its name. Each analysis declares
what it needs of a learner (``metaopt.learners.capabilities``) and runs on every learner that
provides it, whatever its class; a learner that lacks a capability is left out, with the reason
recorded in ``AnalysisResults.skipped``:

- ``sensitivity`` (per pair "A vs B" of an in-context A and an explicit B, both ``QUERY_GRADIENTS``):
  ``SensitivitySimilarity``;
- ``spd_ilwd`` (per pair): ``ProbeDifference``;
- ``best_gd`` (per in-context learner): ``BestGD``;
- ``interpolation`` (per in-context learner with ``GD_CONSTRUCTION``, e.g. ``LinearSelfAttention``): the
  best-matching lr* for ``steps = gd_steps`` and ``Interpolation`` toward ``gd_construction(lr*)`` at the
  largest k, after ``align_scales`` (a function-preserving rescaling of each head, see ``interpolation``);
- ``dual_form`` (per in-context learner with ``ATTENTION_DUAL_FORM``, e.g. a causal ``Transformer``): Dai
  et al.'s ICL-vs-finetuning report, ``DualFormReport``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from metaopt import plotting
from metaopt.analysis.best_gd import best_gd
from metaopt.analysis.finetuning import icl_vs_finetuning
from metaopt.analysis.interpolation import align_scales, gd_construction, interpolation_losses
from metaopt.analysis.probes import probe_difference, probe_inputs, probe_predictions
from metaopt.analysis.sensitivity import sensitivity_similarity
from metaopt.episodes import Episode
from metaopt.kinds import REGRESSION
from metaopt.learners.base import Learner
from metaopt.learners.capabilities import Capability, missing

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)
Learners = Mapping[str, Learner]
Entries = dict[str, "dict | str"]  # a runner's result per pair or learner, or the reason it has none


@dataclass(frozen=True)
class AnalysisSpec:
    """One requested analysis: its ``name`` and its keyword options."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class AnalysisResults:
    """What ``run_analyses`` produced: ``results[analysis][pair or learner]`` (JSON-ready dicts) and
    ``skipped[analysis][pair or learner]``, why a learner that could have taken part did not."""

    results: dict[str, dict[str, dict]] = field(default_factory=dict)
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)


def _pairs(learners: Learners) -> list[tuple[str, str]]:
    """Every (in-context A, explicit B) pair, in the order ``compare`` reports prediction similarity."""
    return [(a, b) for a in learners for b in learners if learners[a].implicit and not learners[b].implicit]


def _guarded(what: str, compute: Callable[[], Any]) -> dict | str:
    """``asdict(compute())``, or the error's message where a learner cannot take part after all."""
    try:
        return asdict(compute())
    except (RuntimeError, TypeError, NotImplementedError) as error:
        logger.warning("analysis %s skipped: %s", what, error)
        return f"failed: {error}"


def _probes(episode: Episode, num_probes: int | None, seed: int) -> torch.Tensor:
    return probe_inputs(episode, num_probes or 4 * episode.x_support[0, 0].numel(),
                        generator=torch.Generator().manual_seed(seed))


def _check_regression(name: str, episode: Episode) -> None:
    if episode.kind is not REGRESSION:
        raise ValueError(f"compare analysis {name!r} compares with gradient descent on regression; "
                         f"got {episode.kind!r} episodes")


def _check_real_valued(name: str, episode: Episode) -> None:
    if not episode.y_query.is_floating_point():
        raise ValueError(f"compare analysis {name!r} needs real-valued predictions; got kind={episode.kind!r}")


def _sensitivity(learners: Learners, episode: Episode, sizes: list[int], seed: int) -> Entries:
    del seed
    _check_real_valued("sensitivity", episode)
    return {f"{a} vs {b}": _guarded(f"sensitivity {a} vs {b}",
                                    lambda: sensitivity_similarity(learners[a], learners[b], episode, sizes))
            for a, b in _pairs(learners)}


def _spd_ilwd(learners: Learners, episode: Episode, sizes: list[int], seed: int, num_probes: int | None) -> Entries:
    _check_real_valued("spd_ilwd", episode)
    probes = _probes(episode, num_probes, seed)
    predictions = {name: probe_predictions(learner, episode, probes, sizes) for name, learner in learners.items()}
    return {f"{a} vs {b}": asdict(probe_difference(predictions[a], predictions[b], probes, sizes))
            for a, b in _pairs(learners)}


def _best_gd(
    learners: Learners, episode: Episode, sizes: list[int], seed: int, num_probes: int | None, steps: list[int],
    lr_range: list[float],
) -> Entries:
    _check_regression("best_gd", episode)
    probes = _probes(episode, num_probes, seed)
    return {name: asdict(best_gd(probe_predictions(learner, episode, probes, sizes), episode, probes, sizes,
                                 steps=steps, lr_range=tuple(lr_range)))
            for name, learner in learners.items()}


def _interpolation(
    learners: Learners, episode: Episode, sizes: list[int], seed: int, num_probes: int | None, alphas: list[float]
) -> Entries:
    _check_regression("interpolation", episode)
    probes = _probes(episode, num_probes, seed)
    results: Entries = {}
    for name, learner in learners.items():
        steps = learner.gd_steps
        match = best_gd(probe_predictions(learner, episode, probes, sizes), episode, probes, sizes, steps=[steps])
        construction = gd_construction(learner, match.lr, steps)
        curve = interpolation_losses(align_scales(learner, construction), construction,
                                     episode.take_support(sizes[-1]), alphas)
        results[name] = {"lr": match.lr, "steps": steps, "k": sizes[-1]} | asdict(curve)
    return results


def _dual_form(
    learners: Learners, episode: Episode, sizes: list[int], seed: int, demonstrations: int | None, shared: int,
    lr: float, threshold: float | None,
) -> Entries:
    del sizes
    return {name: asdict(icl_vs_finetuning(learner, episode, demonstrations=demonstrations, shared=shared, lr=lr,
                                           threshold=threshold, seed=seed))
            for name, learner in learners.items()}


@dataclass(frozen=True)
class Analysis:
    """An analysis: its options (with defaults; ``num_tasks`` caps the tasks it uses), what it needs of a
    learner, and its runner ``run(learners, episode, support_sizes, seed, **options) -> Entries``.

    With ``pairs`` it compares each in-context learner A with each explicit learner B ("A vs B") and both
    need ``needs``; otherwise it studies each in-context learner that has ``needs`` on its own.
    """

    options: Mapping[str, Any]
    run: Callable[..., Entries]
    needs: frozenset[Capability] = frozenset()
    pairs: bool = False


REGISTRY: dict[str, Analysis] = {
    "sensitivity": Analysis({"num_tasks": 256}, _sensitivity, frozenset({Capability.QUERY_GRADIENTS}), pairs=True),
    "spd_ilwd": Analysis({"num_tasks": 256, "num_probes": None}, _spd_ilwd, pairs=True),
    "best_gd": Analysis({"num_tasks": 256, "num_probes": None, "steps": [1], "lr_range": [1e-3, 1e2]}, _best_gd),
    "interpolation": Analysis({"num_tasks": 256, "num_probes": None, "alphas": [0.0, 0.5, 1.0]}, _interpolation,
                              frozenset({Capability.GD_CONSTRUCTION})),
    "dual_form": Analysis({"num_tasks": 32, "demonstrations": None, "shared": 1, "lr": 0.1, "threshold": None},
                          _dual_form, frozenset({Capability.ATTENTION_DUAL_FORM})),
}
ANALYSES: tuple[str, ...] = tuple(REGISTRY)


def parse_analyses(specs: Sequence[str | Mapping[str, Any]]) -> list[AnalysisSpec]:
    """Analysis specs from names or ``{name: ..., option: value}`` mappings, options checked and defaulted.

    Raises:
        ValueError: on an unknown analysis name or option, or a repeated analysis.
    """
    parsed: list[AnalysisSpec] = []
    for spec in specs:
        entry = {"name": spec} if isinstance(spec, str) else dict(spec)
        name = entry.pop("name", None)
        if name not in REGISTRY:
            raise ValueError(f"compare analysis: unknown analysis {name!r}; expected one of {list(ANALYSES)}")
        options = REGISTRY[name].options
        unknown = sorted(set(entry) - set(options))
        if unknown:
            raise ValueError(f"compare analysis {name!r}: unknown option(s) {unknown}; expected some of "
                             f"{sorted(options)}")
        if any(p.name == name for p in parsed):
            raise ValueError(f"compare analysis: {name!r} is requested twice; give it once with all its options")
        parsed.append(AnalysisSpec(name, dict(options) | entry))
    return parsed


def qualifying(analysis: Analysis, learners: Learners) -> tuple[dict[str, Learner], dict[str, str]]:
    """The learners ``analysis`` runs on, and why each other candidate is left out (``{name: reason}``).

    Candidates are the in-context learners, and for a pair analysis the explicit ones too; a candidate
    qualifies when it declares every capability in ``analysis.needs``.
    """
    chosen: dict[str, Learner] = {}
    skipped: dict[str, str] = {}
    for name, learner in learners.items():
        if not (analysis.pairs or learner.implicit):
            continue
        lacking = missing(learner, analysis.needs)
        if lacking:
            skipped[name] = "needs " + "; ".join(f"{c.description} (capability {c.value!r})" for c in lacking)
        else:
            chosen[name] = learner
    return chosen, skipped


def run_analyses(
    specs: Sequence[AnalysisSpec],
    learners: Learners,
    episode: Episode,
    support_sizes: Sequence[int],
    *,
    seed: int = 0,
) -> AnalysisResults:
    """Run every requested analysis on the learners that qualify for it (``qualifying``)."""
    sizes = [int(k) for k in support_sizes]
    ran = AnalysisResults()
    for spec in specs:
        analysis = REGISTRY[spec.name]
        options = dict(spec.options)
        tasks = episode.select_tasks(slice(0, options.pop("num_tasks")))
        chosen, skipped = qualifying(analysis, learners)
        for name, reason in skipped.items():
            logger.info("analysis %s skips %s: it %s", spec.name, name, reason)
        entries = analysis.run(chosen, tasks, sizes, seed, **options)
        ran.results[spec.name] = {key: value for key, value in entries.items() if isinstance(value, dict)}
        skipped |= {key: value for key, value in entries.items() if isinstance(value, str)}
        if skipped:
            ran.skipped[spec.name] = skipped
    return ran


# ---------------------------------------------------------------------- reporting
def _row(label: str, width: int, cells: Sequence[str]) -> str:
    return label.ljust(width) + "".join(" " + c.rjust(17) for c in cells)


def _per_k_table(title: str, results: Mapping[str, dict], columns: Sequence[int], cell) -> list[str]:
    """A table with one row per pair/learner and one column per k in ``columns`` (where it was measured)."""
    width = max(len(key) for key in results) + 2
    lines = ["", title, _row("", width, [f"k={k}" for k in columns])]
    for key, result in results.items():
        ks = result["support_sizes"]
        lines.append(_row(key, width, [cell(result, ks.index(k)) if k in ks else "-" for k in columns]))
    return lines


def format_analysis(
    analysis: Mapping[str, Mapping[str, dict]], columns: Sequence[int],
    skipped: Mapping[str, Mapping[str, str]] | None = None,
) -> list[str]:
    """Plain-text lines reporting every analysis that produced results, at support sizes ``columns``,
    then the learners each analysis left out and why (``AnalysisResults.skipped``)."""
    lines: list[str] = []
    if analysis.get("sensitivity"):
        lines += _per_k_table("query sensitivity ∂ŷ/∂x_q (von Oswald et al.): cosine / L2 distance",
                              analysis["sensitivity"], columns,
                              lambda r, i: f"{r['cosine'][i]:.3f}/{r['l2'][i]:.3g}")
    if analysis.get("spd_ilwd"):
        lines += _per_k_table("probe differences (Akyürek et al.): SPD / ILWD", analysis["spd_ilwd"], columns,
                              lambda r, i: f"{r['spd'][i]:.3g}/{r['ilwd'][i]:.3g}")
    if analysis.get("best_gd"):
        lines += _per_k_table("best-matching GD per k: lr x steps (SPD)", analysis["best_gd"], columns,
                              lambda r, i: f"{r['lr_per_k'][i]:.3g}x{r['steps_per_k'][i]} ({r['spd_per_k'][i]:.2g})")
        for name, r in analysis["best_gd"].items():
            lines.append(f"{name}: best single GD over all k: {r['steps']} step(s), lr={r['lr']:.4g} "
                         f"(SPD {r['spd']:.3g})")
    if analysis.get("interpolation"):
        lines += ["", "loss interpolated toward the GD construction (von Oswald et al.), at the largest k"]
        for name, r in analysis["interpolation"].items():
            curve = ", ".join(f"α={a:g}: {loss:.4g}" for a, loss in zip(r["alphas"], r["loss"]))
            lines.append(f"{name} -> from_gd(lr={r['lr']:.4g}, steps={r['steps']}) at k={r['k']}: {curve}")
    if analysis.get("dual_form"):
        lines += ["", "ICL vs finetuning of W_K/W_V (Dai et al.): trained model | untrained control"]
        for name, r in analysis["dual_form"].items():
            lines += [f"{name} ({r['num_tasks']} tasks, {r['demonstrations']} demonstrations):"]
            lines += [f"  {line}" for line in _dual_form_lines(r)]
    if skipped:
        lines.append("")
        lines += [f"{name} left out {entry}: {reason}" for name, reasons in skipped.items()
                  for entry, reason in reasons.items()]
    return lines


def _dual_form_lines(report: Mapping[str, Any]) -> list[str]:
    trained, untrained = report["trained"], report["untrained"]

    def mean(values: Sequence[float]) -> float:
        return sum(values) / len(values)

    def share(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    return [
        f"SimAOU (mean over layers)   {mean(trained['sim_aou']):.3f} (random {mean(trained['sim_aou_random']):.3f})"
        f" | {mean(untrained['sim_aou']):.3f} (random {mean(untrained['sim_aou_random']):.3f})",
        f"SimAM  (mean over layers)   {mean(trained['sim_am']):.3f} (zero-shot {mean(trained['sim_am_zero_shot']):.3f})"
        f" | {mean(untrained['sim_am']):.3f} (zero-shot {mean(untrained['sim_am_zero_shot']):.3f})",
        f"Rec2FTP                     {share(trained['rec2ftp'])} ({trained['ft_fixed']} fixed by FT)"
        f" | {share(untrained['rec2ftp'])} ({untrained['ft_fixed']} fixed by FT)",
    ]


def plot_analysis(analysis: Mapping[str, Mapping[str, dict]], title: str = "") -> Figure | None:
    """Sensitivity cosine, SPD and best GD lr vs k (one line per pair or learner, the same style in every
    panel); None if none was run."""
    panels = [
        ("sensitivity", "cosine", "sensitivity cosine", "1: the same input sensitivity", "linear"),
        ("spd_ilwd", "spd", "SPD", "0: the same predictions", "auto"),
        ("best_gd", "lr_per_k", "best-matching GD learning rate", "per k", "auto"),
    ]
    panels = [p for p in panels if analysis.get(p[0])]
    if not panels:
        return None
    order = list(dict.fromkeys(entry for name, *_ in panels for entry in analysis[name]))
    fig, axes = plotting.new_figure(len(panels), panel=(5.2, 4.0))
    for ax, (name, key, label, meaning, scale) in zip(axes, panels):
        series = [plotting.Series(entry, result["support_sizes"], result[key])
                  for entry, result in analysis[name].items()]
        plotting.plot_series(ax, series, yscale=scale, integer_x=True,
                             styles=[order.index(entry) for entry in analysis[name]])
        ax.set_xlabel(plotting.K_LABEL)
        ax.set_ylabel(label)
        ax.set_title(f"{label} ({meaning})")
    subtitle = ("in-context learners against explicit ones on the same held-out tasks: mean over those tasks "
                "(no interval) · one line per (in-context vs explicit) pair, or per in-context learner")
    return plotting.finish(fig, f"{title}: implicit vs explicit" if title else "implicit vs explicit", subtitle)
