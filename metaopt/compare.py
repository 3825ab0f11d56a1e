"""Compare learners on the same held-out episodes, at several support sizes.

Every learner — in-context (implicit) or explicit — sees exactly the same tasks, support sets and
queries. For each support size k the comparison records the metric's mean with a bootstrap band,
and for each pair (implicit A, explicit B) how similar their predictions are.

Under torchrun the held-out tasks are split over the ranks in whole chunks of ``chunk_size`` tasks and the
predictions gathered, so each chunk is computed exactly as in a single process and every number of the
comparison is bit-identical to a single-process run's; the scores, bands and analyses are then computed on
every rank from the same gathered predictions.
"""

from __future__ import annotations

import csv
import io
import math
import shutil
import textwrap
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import torch

from metaopt import distributed, plotting
from metaopt.analysis.suite import format_analysis, parse_analyses, plot_analysis, run_analyses
from metaopt.checks import non_negative_int, positive_int, sequence_of
from metaopt.episodes import Episode
from metaopt.learners.base import Learner
from metaopt.metrics import Metric, bootstrap_band, prediction_similarity
from metaopt.progress import Progress
from metaopt.seeds import comparison_streams, generator
from metaopt.tasks.base import TaskFamily

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LEVEL = 0.95
"""The confidence level of every interval a claim is judged on (the paired bootstrap's percentile interval)."""
DIRECTIONS = ("lower", "higher")
"""Which way is better for an analysis claim's measure (``ClaimSpec.direction``)."""


@dataclass
class Curve:
    """A learner's metric at each support size: mean over tasks and a 95% bootstrap band."""

    mean: list[float]
    low: list[float]
    high: list[float]
    implicit: bool


@dataclass
class CompareSettings:
    """How a recipe compares its learners (a recipe's ``compare:``; the arguments of :func:`compare`).

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

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for key in ("num_tasks", "query", "bootstrap", "chunk_size"):
            positive_int(key, getattr(self, key), owner=owner)
        if not self.support_sizes:
            raise ValueError(f"{owner}: support_sizes must be a non-empty list of ints >= 0; got []")
        sequence_of("support_sizes", self.support_sizes, non_negative_int, owner=owner)
        try:
            parse_analyses(self.analysis)
        except ValueError as error:
            raise ValueError(f"analysis: {error}") from error


@dataclass
class ClaimSpec:
    """A paper's claim a recipe checks, about one ``learner``'s metric or one ``analysis`` value at support size ``k``.

    The subject is either ``learner`` (its mean metric at k) or ``analysis``, a path into the comparison's analysis
    results, ``<analysis>/<entry>/<measure>`` (e.g. ``sensitivity/transformer vs gd/cosine``,
    ``spd_ilwd/transformer vs ols/spd``, ``best_gd/transformer/lr``), read at k where the measure is a list over
    support sizes. Then:

    - ``below`` / ``above``: the subject's mean lies below/above a value (a bare comparison of the mean);
    - ``better_than``: the subject is better than each of these (learners for a learner, analysis paths for an
      analysis), *significantly*: the 95% paired-bootstrap interval of the difference of means excludes 0;
    - ``relative_to`` (one learner, or one analysis path for an analysis) with ``within`` and/or ``better_by``:
      ``within: f`` holds when the 95% paired-bootstrap interval of the relative difference (m_A − m_B) / |m_B|
      lies inside [−f, f], so |m_A − m_B| <= f·|m_B| with 95% confidence; ``better_by: δ`` holds when A beats
      B by more than δ (in the measure's units), i.e. the interval of m_A − m_B lies beyond δ on the better side.
      ``relative_to`` with ``better_by: 0`` is ``better_than: [B]``.

    "Better" follows the metric's direction for a learner; for an analysis it is ``direction: lower`` (SPD,
    ILWD, L2 distances) or ``direction: higher`` (cosines), which an analysis claim that compares needs.
    """

    text: str = ""
    learner: str = ""
    k: int = 0
    below: Optional[float] = None
    above: Optional[float] = None
    better_than: list[str] = field(default_factory=list)
    analysis: str = ""
    relative_to: str = ""
    within: Optional[float] = None
    better_by: Optional[float] = None
    direction: str = ""

    def __post_init__(self) -> None:
        if bool(self.learner) == bool(self.analysis):
            raise ValueError("learner or analysis: a claim is about exactly one learner or one analysis path; got "
                             f"learner={self.learner!r}, analysis={self.analysis!r}")
        for key in ("within", "better_by"):
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{key} must be a number >= 0; got {value!r}")
            if not self.relative_to:
                raise ValueError(f"{key} needs relative_to: the learner (or analysis path) it is measured against")
        if self.relative_to and self.within is None and self.better_by is None:
            raise ValueError(f"relative_to={self.relative_to!r} needs within: (a fraction) or better_by: (an amount)")
        if self.direction not in ("", *DIRECTIONS):
            raise ValueError(f"direction must be one of {list(DIRECTIONS)}; got {self.direction!r}")
        if self.learner and self.direction:
            raise ValueError(f"direction applies to analysis claims; a learner's metric has its own direction "
                             f"(got direction={self.direction!r} with learner={self.learner!r})")
        if self.analysis and not self.direction and (self.better_than or self.better_by is not None):
            raise ValueError("direction: an analysis claim that says 'better' needs direction: lower (distances) "
                             "or higher (cosines)")

    @property
    def subject(self) -> str:
        """The learner or the analysis path the claim is about."""
        return self.learner or self.analysis

    @property
    def references(self) -> list[tuple[str, str]]:
        """``(key, name)`` of everything the subject is compared with: ``better_than`` entries and ``relative_to``."""
        named = [(f"better_than[{j}]", name) for j, name in enumerate(self.better_than)]
        return named + ([("relative_to", self.relative_to)] if self.relative_to else [])

    def check_names(self, learners: Sequence[str], support_sizes: Sequence[int],
                    analyses: Sequence[str] | None = None) -> None:
        """Refuse a claim about a learner, support size or analysis the comparison does not have.

        ``analyses``: the names of the analyses the recipe runs (None: not known here, analysis names unchecked).
        An analysis path's entry (``A vs B`` or a learner) must name learners of the recipe; whether the analysis
        produced that entry and measure is known only when it has run (:func:`check_claim` says so then).
        """
        if self.learner:
            for key, name in [("learner", self.learner), *self.references]:
                if name not in learners:
                    raise ValueError(f"{key}={name!r} is not one of the learners {list(learners)}")
        else:
            for key, path in [("analysis", self.analysis), *self.references]:
                parts = split_analysis_path(path, key)
                if analyses is not None and parts[0] not in analyses:
                    raise ValueError(f"{key}={path!r}: analysis {parts[0]!r} is not one the recipe runs "
                                     f"(compare.analysis: {list(analyses)})")
                for name in parts[1].split(" vs "):
                    if name not in learners:
                        raise ValueError(f"{key}={path!r}: {name!r} is not one of the learners {list(learners)}")
        if self.k not in support_sizes:
            raise ValueError(f"k={self.k} is not in compare.support_sizes {list(support_sizes)}")


def split_analysis_path(path: str, key: str = "analysis") -> list[str]:
    """``<analysis>/<entry>/<measure>[/<key>...]`` as its parts.

    Raises:
        ValueError: a path of fewer than three non-empty parts.
    """
    parts = [part.strip() for part in str(path).split("/")]
    if len(parts) < 3 or not all(parts):
        raise ValueError(f"{key}={path!r} must be a path <analysis>/<entry>/<measure>, e.g. "
                         "'sensitivity/transformer vs gd/cosine' or 'best_gd/transformer/lr'")
    return parts


@dataclass
class Claim(ClaimSpec):
    """A claim with what was measured: the subject's value, the others' values, each comparison and the verdict.

    ``comparisons``: one record per ``better_than`` entry, then ``better_by`` and ``within`` (see
    :func:`check_claim`); ``verdict``: ``holds``, ``not significant`` (the means are in the claimed order but
    the paired-bootstrap interval does not show it) or ``does not hold``; ``holds`` is ``verdict == "holds"``.
    """

    measured: float | None = None
    others: dict[str, float] = field(default_factory=dict)
    holds: bool | None = None
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    verdict: str = ""


@dataclass
class Comparison:
    """Everything ``compare`` measured; ``to_dict`` is what ``results.json`` holds.

    ``chance``: for accuracy, the accuracy of always guessing the most frequent query label (1/ways on balanced
    episodes); ``dimension``: for regression, the input dimension d where the family has one.
    """

    metric: str
    lower_is_better: bool
    support_sizes: list[int]
    num_tasks: int
    curves: dict[str, Curve]
    similarity: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    claims: list[Claim] = field(default_factory=list)
    analysis: dict[str, dict[str, dict]] = field(default_factory=dict)
    analysis_skipped: dict[str, dict[str, str]] = field(default_factory=dict)
    chance: float | None = None
    dimension: int | None = None
    kind: str = "regression"  # the episodes' kind: what the prediction similarity compares (COMPARED_AS)

    def to_dict(self) -> dict:
        return asdict(self)

    def value(self, learner: str, k: int) -> float:
        if learner not in self.curves:
            raise KeyError(f"no learner {learner!r} in this comparison; have {sorted(self.curves)}")
        if k not in self.support_sizes:
            raise KeyError(f"support size {k} was not evaluated; have {self.support_sizes}")
        return self.curves[learner].mean[self.support_sizes.index(k)]


@torch.no_grad()
def predict_all(
    learner: Learner, episode: Episode, support_sizes: Sequence[int], chunk_size: int = 512, *,
    on_chunk: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Query predictions ``[K, T, Q, ...]`` for each support size, over chunks of tasks.

    In a distributed run each rank predicts a contiguous block of whole chunks (:func:`own_chunks` of them)
    and every rank gets all of them back (on the CPU). ``on_chunk`` is called after each chunk this rank predicts.
    """
    was_training = learner.training
    learner.eval()
    current = distributed.world()
    chunks = []
    for start in own_chunks(episode.num_tasks, chunk_size):
        chunks.append(learner.predict_by_support_size(episode.select_tasks(slice(start, start + chunk_size)),
                                                      support_sizes))
        if on_chunk is not None:
            on_chunk()
    learner.train(was_training)
    if current.size > 1:
        chunks = [chunk for rank in distributed.all_gather_objects([c.cpu() for c in chunks]) for chunk in rank]
    return torch.cat(chunks, dim=1)


def own_chunks(num_tasks: int, chunk_size: int) -> range:
    """The first task of every chunk this rank predicts (all of them in a single process)."""
    starts = range(0, num_tasks, chunk_size)
    return starts[distributed.share(len(starts), distributed.world())]


def score_by_support_size(
    metric: Metric, predictions: torch.Tensor, episode: Episode, support_sizes: Sequence[int]
) -> torch.Tensor:
    """Per-task metric ``[K, T]`` of predictions ``[K, T, Q, ...]``, each k scored on ``episode.take_support(k)``.

    Metrics that only read the queries score every k alike; those that need the support set (the
    adjusted loss's oracle ridge) see exactly the first k support examples the learner saw.
    """
    return torch.stack([metric.per_task(p, episode.take_support(k)) for p, k in zip(predictions, support_sizes)])


def compare(
    learners: Mapping[str, Learner],
    family: TaskFamily,
    *,
    support_sizes: Sequence[int],
    num_tasks: int = 1000,
    query: int = 1,
    seed: int = 0,
    bootstrap: int = 1000,
    chunk_size: int = 512,
    device: str | torch.device = "cpu",
    claims: Sequence[ClaimSpec | Mapping] = (),
    progress: bool = True,
    analysis: Sequence[str | Mapping] = (),
) -> Comparison:
    """Evaluate ``learners`` on the same ``num_tasks`` held-out episodes at every k in ``support_sizes``.

    The episodes come from a generator seeded with ``seed`` (independent of training), so two calls
    with the same seed compare on identical tasks. ``analysis`` names implicit-vs-explicit analyses
    to run on the same episodes (``metaopt.analysis.suite``: e.g. ``["sensitivity", "spd_ilwd",
    {"name": "best_gd", "steps": [1, 2]}]``); their results go to ``Comparison.analysis``, and why a
    learner was left out of one (it lacks a capability the analysis needs) to ``analysis_skipped``.
    """
    analyses = parse_analyses(analysis)
    support_sizes = sorted({int(k) for k in support_sizes})
    if not learners:
        raise ValueError("compare needs at least one learner")
    if support_sizes[0] < 0:
        raise ValueError(f"support sizes must be >= 0; got {support_sizes}")
    metric = family.metric
    episode_seed, band_seed, analysis_seed = comparison_streams(seed)
    episode = family.sample(num_tasks, support_sizes[-1], query, generator=generator(episode_seed), device=device)
    band_generator = generator(band_seed)
    predictions: dict[str, torch.Tensor] = {}
    scores: dict[str, torch.Tensor] = {}  # per-task [K, T]: what the claims' paired bootstrap resamples
    curves: dict[str, Curve] = {}
    total = len(learners) * len(own_chunks(num_tasks, chunk_size))
    with Progress(total, "compare", enabled=progress and distributed.is_main(), unit="chunk") as bar:
        for name, learner in learners.items():
            learner.to(device)
            predictions[name] = predict_all(learner, episode, support_sizes, chunk_size,
                                            on_chunk=lambda name=name: bar.update(1, learner=name)).cpu()
            per_task = scores[name] = score_by_support_size(metric, predictions[name], episode.to("cpu"),
                                                            support_sizes)
            low, high = bootstrap_band(per_task, resamples=bootstrap, generator=band_generator)
            curves[name] = Curve(per_task.mean(-1).tolist(), low.tolist(), high.tolist(), learner.implicit)
    similarity = {}
    for a, curve_a in curves.items():
        for b, curve_b in curves.items():
            if curve_a.implicit and not curve_b.implicit:
                sim = prediction_similarity(episode.kind.comparable(predictions[a]),
                                            episode.kind.comparable(predictions[b]))
                similarity[f"{a} vs {b}"] = {key: value.tolist() for key, value in sim.items()}
    comparison = Comparison(metric.name, metric.lower_is_better, support_sizes, num_tasks, curves, similarity,
                            chance=chance_accuracy(episode) if metric.name == "accuracy" else None,
                            dimension=getattr(family, "dim", None) if episode.kind == "regression" else None,
                            kind=str(episode.kind))
    analysed = run_analyses(analyses, learners, episode, support_sizes, seed=analysis_seed)
    comparison.analysis, comparison.analysis_skipped = analysed.results, analysed.skipped
    comparison.claims = [check_claim(comparison, claim, scores, resamples=bootstrap, seed=band_seed)
                         for claim in claims]
    return comparison


def chance_accuracy(episode: Episode) -> float | None:
    """The accuracy of always guessing the most frequent query label of ``episode`` (None for regression)."""
    if episode.kind == "regression":
        return None
    labels = episode.y_query.reshape(-1).long().cpu()
    return torch.bincount(labels).max().item() / labels.numel()


def paired_bootstrap(a: torch.Tensor, b: torch.Tensor, *, resamples: int = 1000,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Means of ``a`` and ``b`` ``[N]`` (per-task scores of two learners on the same tasks) over the same resamples.

    Each of the ``resamples`` draws N units with replacement, the same units for both (the pairing): returns
    the resampled means ``([resamples], [resamples])``, in float64.
    """
    if a.shape != b.shape or a.ndim != 1 or a.numel() == 0:
        raise ValueError(f"paired_bootstrap needs two [N] tensors of the same N >= 1; got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    index = torch.randint(a.numel(), (resamples, a.numel()), generator=generator)
    return a.double()[index].mean(-1), b.double()[index].mean(-1)


def _interval(values: torch.Tensor) -> tuple[float, float]:
    tail = (1.0 - LEVEL) / 2
    low, high = torch.quantile(values, torch.tensor([tail, 1.0 - tail], dtype=values.dtype))
    return low.item(), high.item()


def _relative(a: torch.Tensor | float, b: torch.Tensor | float) -> Any:
    """(a − b) / |b|, 0 where both are 0 (``inf``/``nan`` where only b is, which no ``within`` accepts)."""
    if isinstance(a, torch.Tensor):
        return torch.where((a == 0) & (b == 0), torch.zeros_like(a), (a - b) / b.abs())
    return 0.0 if a == b == 0 else (a - b) / abs(b) if b != 0 else math.inf


def analysis_value(analysis: Mapping[str, Any], path: str, k: int) -> float:
    """The value at ``path`` (``<analysis>/<entry>/<measure>[/...]``) of analysis results, at support size ``k``
    where the measure is a list over the entry's ``support_sizes``. A value the analysis could not measure (None,
    e.g. Rec2FTP when finetuning fixes no query) reads as NaN, so a claim about it does not hold.

    Raises:
        KeyError: a part of the path the results lack, or no value at ``k``; the message names what there is.
    """
    parts = split_analysis_path(path)
    node: Any = analysis
    entry: Mapping[str, Any] = {}
    for depth, part in enumerate(parts):
        if not isinstance(node, Mapping) or part not in node:
            have = sorted(node) if isinstance(node, Mapping) else []
            where = "/".join(parts[:depth]) or "the analysis results"
            raise KeyError(f"analysis path {path!r}: {where} has no {part!r} (has {have})")
        node = node[part]
        if depth == 1:
            entry = node
    if isinstance(node, list) and "support_sizes" in entry and len(node) == len(entry["support_sizes"]):
        if k not in entry["support_sizes"]:
            raise KeyError(f"analysis path {path!r} has no value at k={k} (has k in {entry['support_sizes']})")
        node = node[entry["support_sizes"].index(k)]
    if node is None:
        return math.nan
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise KeyError(f"analysis path {path!r} is not a number or a list over support sizes; got {node!r}")
    return float(node)


def _subject_value(comparison: Comparison, name: str, k: int, analysis: bool,
                   scores: Mapping[str, torch.Tensor]) -> float:
    if not analysis:
        return comparison.value(name, k)
    if name in scores:
        return scores[name][comparison.support_sizes.index(k)].double().mean().item()
    return analysis_value(comparison.analysis, name, k)


def check_claim(comparison: Comparison, spec: ClaimSpec | Mapping,
                scores: Mapping[str, torch.Tensor] | None = None, *, resamples: int = 1000,
                seed: int = 0) -> Claim:
    """Measure one claim of a recipe (:class:`ClaimSpec`) on ``comparison``.

    ``scores`` maps learners (and, where known, analysis paths) to their per-unit scores ``[K, N]`` on the same N
    units: per-task scores in a comparison (:func:`score_by_support_size`), per-seed means across seeds. Each
    comparison of the claim is judged on a paired bootstrap over those units (:func:`paired_bootstrap`,
    ``resamples`` draws from a generator seeded with ``seed`` afresh for each comparison, so every claim sees the
    same draws whatever the others are) and its 95% percentile interval. Its record: ``test`` (``better_than``,
    ``better_by`` or ``within``), ``against``, ``other`` (that one's mean), ``difference`` (m_A − m_B; for
    ``within`` the relative difference (m_A − m_B) / |m_B|), ``low``/``high`` (the interval), ``threshold``
    (δ, or the fraction f), ``ordered`` (the means alone satisfy it) and ``holds``. Where a side has no
    per-unit scores (an analysis records only its mean over tasks) the interval is None and the means decide.

    Raises:
        KeyError: a learner, support size or analysis path the comparison lacks; the message names the claim.
    """
    claim = Claim(**(asdict(spec) if isinstance(spec, ClaimSpec) else dict(spec)))
    scores = scores or {}
    is_analysis = bool(claim.analysis)
    try:
        claim.measured = _subject_value(comparison, claim.subject, claim.k, is_analysis, scores)
        claim.others = {other: _subject_value(comparison, other, claim.k, is_analysis, scores)
                        for other in claim.better_than}
        tests = [("better_than", other, 0.0) for other in claim.better_than]
        if claim.better_by is not None:
            tests.append(("better_by", claim.relative_to, float(claim.better_by)))
        if claim.within is not None:
            tests.append(("within", claim.relative_to, float(claim.within)))
        lower = claim.direction == "lower" if is_analysis else comparison.lower_is_better
        claim.comparisons = [
            _judge(test, other, threshold, claim, lower, comparison, scores, resamples, seed, is_analysis)
            for test, other, threshold in tests]
    except KeyError as error:
        raise KeyError(f"claim {claim.text or claim.subject!r}: {error.args[0]}") from error
    bounds = ((claim.below is None or claim.measured < claim.below)
              and (claim.above is None or claim.measured > claim.above))
    if not bounds or not all(c["ordered"] for c in claim.comparisons):
        claim.verdict = "does not hold"
    elif not all(c["holds"] for c in claim.comparisons):
        claim.verdict = "not significant"
    else:
        claim.verdict = "holds"
    claim.holds = claim.verdict == "holds"
    return claim


def _judge(test: str, other: str, threshold: float, claim: Claim, lower: bool, comparison: Comparison,
           scores: Mapping[str, torch.Tensor], resamples: int, seed: int, is_analysis: bool) -> dict[str, Any]:
    """One comparison of a claim's subject with ``other`` (see :func:`check_claim`)."""
    mine = claim.measured
    theirs = _subject_value(comparison, other, claim.k, is_analysis, scores)
    relative = test == "within"
    difference = _relative(mine, theirs) if relative else mine - theirs
    low = high = None
    if claim.subject in scores and other in scores:
        i = comparison.support_sizes.index(claim.k)
        a, b = paired_bootstrap(scores[claim.subject][i], scores[other][i], resamples=resamples,
                                generator=torch.Generator().manual_seed(seed))
        low, high = _interval(_relative(a, b) if relative else a - b)

    def satisfied(lo: float, hi: float) -> bool:
        if relative:
            return -threshold <= lo and hi <= threshold
        return hi < -threshold if lower else lo > threshold

    ordered = satisfied(difference, difference)
    return {"test": test, "against": other, "other": theirs, "difference": difference, "low": low, "high": high,
            "threshold": threshold, "ordered": ordered,
            "holds": ordered and (low is None or satisfied(low, high))}


# ---------------------------------------------------------------------- reporting
COMPARED_AS = {"regression": "predictions", "binary": "logits", "classification": "class probabilities"}
"""What the prediction similarity of two learners is computed on, by episode kind (``EpisodeKind.comparable``)."""
CSV_COLUMNS = ("learner", "implicit", "metric", "k", "mean", "lower", "upper", "tasks")
"""The columns of ``results.csv``: one row per learner and support size, the numbers of ``results.json``."""


def terminal_width() -> int:
    """The width of the terminal in characters; 100 when the output is not a terminal."""
    return shutil.get_terminal_size((100, 24)).columns


def choose_columns(support_sizes: Sequence[int], keep: Sequence[int], fits: Callable[[list[int]], bool]) -> list[int]:
    """The support sizes a table shows: all of them if they fit; otherwise ``keep`` (the claims' k), the smallest
    and the largest (even if they do not fit), then others, each the farthest from those chosen, while ``fits``
    accepts them."""
    support_sizes = list(support_sizes)
    if fits(support_sizes):
        return support_sizes
    chosen = sorted({support_sizes[0], support_sizes[-1], *(k for k in keep if k in support_sizes)})
    others = [k for k in support_sizes if k not in chosen]
    position = {k: i for i, k in enumerate(support_sizes)}
    while others:  # next, the k farthest (in the list) from those chosen, while it fits
        farthest = max(others, key=lambda k: min(abs(position[k] - position[c]) for c in chosen))
        if not fits(candidate := sorted([*chosen, farthest])):
            break
        chosen = candidate
        others.remove(farthest)
    return chosen


def format_grid(corner: str, rows: Mapping[str, Sequence[str]], columns: Sequence[str]) -> list[str]:
    """Lines of a plain-text table whose columns are as wide as their widest cell (plus two spaces)."""
    first = max(len(corner), *(len(name) for name in rows)) + 2
    widths = [max(len(column), *(len(cells[i]) for cells in rows.values())) + 2 for i, column in enumerate(columns)]
    lines = [corner.ljust(first) + "".join(c.rjust(w) for c, w in zip(columns, widths))]
    for name, cells in rows.items():
        lines.append(name.ljust(first) + "".join(c.rjust(w) for c, w in zip(cells, widths)))
    return lines


def _label(name: str, curve: Curve) -> str:
    return f"{name} (icl)" if curve.implicit else name


def _similarity_title(comparison: Comparison) -> str:
    return f"prediction similarity: cosine / mean |difference| of {COMPARED_AS.get(comparison.kind, 'predictions')}"


def _tables(comparison: Comparison, columns: Sequence[int]) -> list[str]:
    """The per-k tables (metric, prediction similarity, analyses) at the support sizes ``columns``."""
    index = [comparison.support_sizes.index(k) for k in columns]
    headers = [f"k={k}" for k in columns]
    lines = format_grid("learner", {
        _label(name, curve): [f"{curve.mean[i]:.4g}±{(curve.high[i] - curve.low[i]) / 2:.2g}" for i in index]
        for name, curve in comparison.curves.items()
    }, headers)
    if comparison.similarity:
        lines += ["", _similarity_title(comparison)]
        lines += format_grid("pair", {
            pair: [f"{sim['cosine'][i]:.3f}/{sim['mean_abs_diff'][i]:.3g}" for i in index]
            for pair, sim in comparison.similarity.items()
        }, headers)
    return lines + format_analysis(comparison.analysis, columns, comparison.analysis_skipped)


def _claim_lines(comparison: Comparison) -> list[tuple[str, str]]:
    """Each claim as its text and its measurement (``ls at k=3: measured 0.0000 (expected < 1e-05) -> holds``;
    a comparison adds its difference and paired-bootstrap interval, ``-> not significant (difference 0.035, 95%
    interval [-0.01, 0.08])``)."""
    return [(claim.text, claim_line(claim, comparison.lower_is_better)) for claim in comparison.claims]


def claim_line(claim: Claim | Mapping[str, Any], lower_is_better: bool) -> str:
    """One claim's measurement and verdict, from a :class:`Claim` or its ``results.json`` record (older records
    without comparisons read as before: ``better_than`` by the means)."""
    record = asdict(claim) if isinstance(claim, Claim) else dict(claim)
    analysis = record.get("analysis") or ""
    lower = record.get("direction") == "lower" if analysis else lower_is_better
    better = "<" if lower else ">"
    comparisons = record.get("comparisons") or []
    tests = {c["test"]: c for c in comparisons}
    bound = [f"{op} {v:g}" for op, v in (("<", record.get("below")), (">", record.get("above"))) if v is not None]
    bound += [f"{better} {other}'s {value:.4f}" for other, value in (record.get("others") or {}).items()]
    if "better_by" in tests:
        c = tests["better_by"]
        bound.append(f"{better} {c['against']}'s {c['other']:.4f} by more than {c['threshold']:g}")
    if "within" in tests:
        c = tests["within"]
        bound.append(f"within {c['threshold']:.0%} of {c['against']}'s {c['other']:.4f}")
    verdict = record.get("verdict") or ("holds" if record.get("holds") else "does not hold")
    line = (f"{analysis or record.get('learner')} at k={record.get('k')}: measured {record.get('measured'):.4f} "
            f"(expected {' and '.join(bound)}) -> {'DOES NOT HOLD' if verdict == 'does not hold' else verdict}")
    details = [_comparison_detail(c, len(comparisons) > 1) for c in comparisons]
    return f"{line} ({'; '.join(details)})" if details else line


def _comparison_detail(c: Mapping[str, Any], named: bool) -> str:
    what = "relative difference" if c["test"] == "within" else "difference"
    interval = ("means only: no per-task values" if c.get("low") is None
                else f"{LEVEL:.0%} interval [{c['low']:.3g}, {c['high']:.3g}]")
    prefix = f"vs {c['against']}: " if named else ""
    return f"{prefix}{what} {c['difference']:.3g}, {interval}"


def format_table(comparison: Comparison, width: int | None = None) -> str:
    """The results as plain-text tables no wider than ``width`` characters (None: the terminal's width, 100
    when not a terminal): the metric per learner and k, prediction similarity, the analyses, the claims.

    Where not every support size fits, the columns shown keep every claim's k, the smallest k and the
    largest (even where those alone are wider), and the table says so; :func:`format_markdown` and
    :func:`format_csv` hold every k. Text lines are wrapped to ``width``; table rows never are.
    """
    width = terminal_width() if width is None else width
    text = set(_tables(comparison, []))  # the lines that are the same without any column: titles and notes
    columns = choose_columns(comparison.support_sizes, [claim.k for claim in comparison.claims],
                             lambda ks: max(len(line) for line in _tables(comparison, ks) if line not in text) <= width)
    lines = textwrap.wrap(f"{comparison.metric} (mean ± 95% bootstrap half-width over {comparison.num_tasks} tasks)",
                          width)
    if len(columns) < len(comparison.support_sizes):
        lines += textwrap.wrap(f"({len(columns)} of {len(comparison.support_sizes)} support sizes shown to fit "
                               f"{width} characters, the claims' among them; results.md and results.csv hold all)",
                               width)
    lines += [part for line in _tables(comparison, columns)  # titles and notes wrapped, table rows never
              for part in (textwrap.wrap(line, width) if line in text and len(line) > width else [line])]
    if comparison.claims:
        lines += ["", "claims (paper vs measured)"]
        for claim, measured in _claim_lines(comparison):
            lines += textwrap.wrap(f"- {claim}", width, subsequent_indent="  ")
            lines += textwrap.wrap(measured, width, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines)


def format_markdown(comparison: Comparison, title: str = "") -> str:
    """Every table of the comparison at every support size, as markdown (a run's ``results.md``)."""
    ks = comparison.support_sizes
    header, rule = "| " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---:|" * len(ks)
    lines = [f"# {title}", ""] if title else []
    lines += [f"## {comparison.metric} (mean [95% bootstrap interval] over {comparison.num_tasks} tasks)", "",
              f"| learner {header}", rule]
    for name, curve in comparison.curves.items():
        cells = [f"{m:.4g} [{low:.4g}, {high:.4g}]" for m, low, high in zip(curve.mean, curve.low, curve.high)]
        lines.append(f"| {_label(name, curve)} | " + " | ".join(cells) + " |")
    if comparison.similarity:
        lines += ["", f"## {_similarity_title(comparison)}", "", f"| pair {header}", rule]
        for pair, sim in comparison.similarity.items():
            cells = [f"{cosine:.4g} / {diff:.4g}" for cosine, diff in zip(sim["cosine"], sim["mean_abs_diff"])]
            lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    analysis = format_analysis(comparison.analysis, ks, comparison.analysis_skipped)
    if analysis:  # the analyses' own plain-text tables, at every k
        lines += ["", "## analyses", "", "```text", *(analysis[1:] if not analysis[0] else analysis), "```"]
    if comparison.claims:
        lines += ["", "## claims (paper vs measured)", ""]
        lines += [f"- {claim}: {measured}" for claim, measured in _claim_lines(comparison)]
    return "\n".join(lines) + "\n"


def format_csv(comparison: Comparison) -> dict[str, str]:
    """The comparison as CSV files by name: ``results`` (:data:`CSV_COLUMNS`) and, when implicit and explicit
    learners were paired, ``similarity`` (pair, k and each similarity measure); numbers as in ``results.json``."""
    def write(rows: list[Sequence[Any]]) -> str:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        return buffer.getvalue()

    files = {"results": write([CSV_COLUMNS, *(
        [name, curve.implicit, comparison.metric, k, curve.mean[i], curve.low[i], curve.high[i], comparison.num_tasks]
        for name, curve in comparison.curves.items() for i, k in enumerate(comparison.support_sizes))])}
    if comparison.similarity:
        measures = list(next(iter(comparison.similarity.values())))
        files["similarity"] = write([("pair", "k", *measures), *(
            [pair, k, *(sim[m][i] for m in measures)]
            for pair, sim in comparison.similarity.items() for i, k in enumerate(comparison.support_sizes))])
    return files


def plot(comparison: Comparison, title: str = "") -> Figure:
    """Metric vs support size in the house style (:mod:`metaopt.plotting`): one line per learner with its 95%
    bootstrap band, chance for accuracy, k = d for regression."""
    fig, (ax,) = plotting.new_figure()
    ks = comparison.support_sizes
    series = [plotting.Series(name, ks, curve.mean, curve.low, curve.high, curve.implicit)
              for name, curve in comparison.curves.items()]
    plotting.plot_vs_k(ax, series, comparison.metric, chance=comparison.chance, dimension=comparison.dimension)
    metric = comparison.metric.replace("_", " ")
    note = plotting.learner_note(series)
    subtitle = (f"{metric}: mean over {comparison.num_tasks} held-out tasks, {plotting.band_word(series)}: 95% "
                "bootstrap interval"
                + (f" · {note}" if note else ""))
    return plotting.finish(fig, f"{title}: {metric} vs k" if title else f"{metric} vs k", subtitle)


def plot_similarity(comparison: Comparison, title: str = "") -> Figure | None:
    """The analyses' curves vs support size (sensitivity cosine, SPD, best GD lr); None if none was run."""
    return plot_analysis(comparison.analysis, title)
