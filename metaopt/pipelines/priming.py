"""The ``priming`` pipeline: how one new fact permeates a small language model, and how to dilute it.

Sun et al. (2025), "How new data permeates LLM knowledge and how to dilute it", at CPU scale
(:mod:`metaopt.dynamics`):

1. generate the fact world and its corpus (:class:`metaopt.dynamics.facts.FactWorld`) and pretrain a small causal
   LM on it, or load it from the cache (``pretrain.cache_dir``; default ``<output_dir>/cache``);
2. for each injected fact (``inject.facts_per_category`` mundane, outlandish and scrambled ones): continue training
   from the pretrained weights with the fact as one sequence of every batch for ``inject.steps`` steps (SGD with
   momentum, fresh state), then measure S_mem and S_prime (:mod:`metaopt.dynamics.priming`);
3. on the outlandish facts (the ones that prime), the same with the two mitigations: the stepping-stone text and
   ignore-k update pruning (:func:`optimizers.pruned`, ``mitigations.ignore_k``);
4. on ``retention.facts_per_category`` facts of each category, keep training on normal data alone and follow
   ``log S_mem``: the share of the learned log-probability still there after ``retention.steps`` steps;
5. claims, ``results.json``, the figures and the W&B run.

Scores are summarised in ``log10``; "cut" and "kept" compare medians over the outlandish facts. Nothing is
checkpointed mid-run except the pretrained model: ``resume`` and ``compare`` run the experiment again.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig

import optimizers as O
from metaopt import distributed, plotting
from metaopt.checks import integer, positive_float, positive_int, probability
from metaopt.config import CommonSettings, ConfigError, settings
from metaopt.dynamics import priming as P
from metaopt.dynamics.facts import CATEGORIES, Fact, FactWorld, stepping_stone_text
from metaopt.dynamics.language_model import CausalLM, pretrain
from metaopt.log import Run
from metaopt.pipelines import study
from metaopt.progress import Progress
from metaopt.seeds import SeedPlan

__all__ = ["PrimingExperiment", "PrimingRecipe", "build", "execute", "validate"]

logger = logging.getLogger(__name__)


@dataclass
class WorldSettings:
    """The fact world and its corpus (see :class:`~metaopt.dynamics.facts.FactWorld`)."""

    entities: int = 60
    new_entities: int = 20
    zipf: float = 1.2
    documents: int = 4000
    length: int = 32

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for key in ("entities", "new_entities", "documents"):
            positive_int(key, getattr(self, key), owner=owner)
        integer("length", self.length, owner=owner, low=8)


@dataclass
class ModelSettings:
    """The causal LM's size."""

    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4

    def __post_init__(self) -> None:
        for key in ("n_embd", "n_layer", "n_head"):
            positive_int(key, getattr(self, key), owner=type(self).__name__)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head must divide n_embd={self.n_embd}; got {self.n_head}")


@dataclass
class PretrainSettings:
    """Pretraining (Adam with a cosine decay); ``cache_dir`` None: ``<output_dir>/cache``."""

    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-3
    cache_dir: Optional[str] = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        positive_int("steps", self.steps, owner=owner)
        positive_int("batch_size", self.batch_size, owner=owner)
        positive_float("lr", self.lr, owner=owner)


@dataclass
class InjectSettings:
    """Learning one fact: facts per category, steps, batch size, SGD's rate and momentum, priming probes per fact."""

    facts_per_category: int = 12
    steps: int = 10
    batch_size: int = 16
    lr: float = 0.1
    momentum: float = 0.9
    thematic_prefixes: int = 12

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for key in ("facts_per_category", "steps", "thematic_prefixes"):
            positive_int(key, getattr(self, key), owner=owner)
        integer("batch_size", self.batch_size, owner=owner, low=2)
        positive_float("lr", self.lr, owner=owner)
        probability("momentum", self.momentum, owner=owner)


@dataclass
class RetentionSettings:
    """Training on after the injection: facts per category followed, steps, and how often S_mem is measured."""

    facts_per_category: int = 4
    steps: int = 200
    every: int = 20

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for key in ("facts_per_category", "steps", "every"):
            positive_int(key, getattr(self, key), owner=owner)
        if self.steps % self.every:
            raise ValueError(f"every must divide steps={self.steps}; got {self.every}")


@dataclass
class PrimingClaims:
    """Thresholds: the prior/priming correlation must be below ``correlation``; a mitigation must cut S_prime (the
    geometric median over the outlandish facts) by at least ``priming_cut`` (the paper: 50-95%) and keep at least
    ``memory_kept`` of the median log10 S_mem (the share of the learned log-probability)."""

    correlation: float = -0.3
    priming_cut: float = 0.5
    memory_kept: float = 0.5

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if not -1 <= self.correlation <= 1:
            raise ValueError(f"correlation must be in [-1, 1]; got {self.correlation!r}")
        probability("priming_cut", self.priming_cut, owner=owner)
        probability("memory_kept", self.memory_kept, owner=owner)


@dataclass
class PrimingRecipe(CommonSettings):
    """A knowledge-priming experiment (see the module docstring); ``mitigations.ignore_k`` is the pruned share."""

    pipeline: str = "priming"
    world: WorldSettings = field(default_factory=WorldSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    inject: InjectSettings = field(default_factory=InjectSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    ignore_k: float = 0.3
    claims: PrimingClaims = field(default_factory=PrimingClaims)


@dataclass
class PrimingExperiment:
    """A recipe's built pieces: the world, its corpus, the facts, and the settings."""

    config: DictConfig
    world: FactWorld
    corpus: torch.Tensor
    facts: list[Fact]
    model: ModelSettings
    pretrain: PretrainSettings
    inject: InjectSettings
    retention: RetentionSettings
    claims: PrimingClaims

    @property
    def seeds(self) -> SeedPlan:
        return SeedPlan(self.config.seed)


def _sections(config: DictConfig) -> tuple:
    return (settings(config.world, WorldSettings, "world"), settings(config.model, ModelSettings, "model"),
            settings(config.pretrain, PretrainSettings, "pretrain"), settings(config.inject, InjectSettings, "inject"),
            settings(config.retention, RetentionSettings, "retention"),
            settings(config.claims, PrimingClaims, "claims"))


def validate(config: DictConfig, source: str) -> None:
    """Every setting checked at load time."""
    _, _, _, inject, retention, _ = _sections(config)
    if not 0 <= config.ignore_k < 1:
        raise ConfigError(f"{source}: ignore_k must be in [0, 1) (the share of each update dropped); "
                          f"got {config.ignore_k!r}")
    if retention.facts_per_category > inject.facts_per_category:
        raise ConfigError(f"{source}: retention.facts_per_category={retention.facts_per_category} must be at most "
                          f"inject.facts_per_category={inject.facts_per_category}")
    if config.device != "cpu" and not config.device.startswith(("cuda", "auto")):
        raise ConfigError(f"{source}: device={config.device!r}; expected cpu, cuda or auto")


def build(config: DictConfig) -> PrimingExperiment:
    """The world, its corpus and the facts to inject (all from the seed plan)."""
    world_settings, model, pretraining, inject, retention, claims = _sections(config)
    seeds = SeedPlan(config.seed)
    world = FactWorld(world_settings.entities, world_settings.new_entities, world_settings.zipf, seed=seeds.init)
    corpus = world.corpus(world_settings.documents, world_settings.length, seed=seeds.training())
    facts = world.facts(inject.facts_per_category, seed=seeds.evaluation(0))
    return PrimingExperiment(config, world, corpus, facts, model, pretraining, inject, retention, claims)


# ---------------------------------------------------------------------- the pipeline
def execute(experiment: PrimingExperiment, run: Run, *, resume: bool = False, train: bool = True,
            trained: Path | None = None) -> tuple[dict[str, Any], str]:
    """Run the experiment into ``run`` (``resume``/``train=False`` run it again: see the module docstring)."""
    del resume, train, trained
    config, world, inj, ret = experiment.config, experiment.world, experiment.inject, experiment.retention
    seeds = experiment.seeds
    vocabulary = world.vocabulary
    shown = config.progress and distributed.is_main()

    def encode(text: str) -> list[int]:
        return vocabulary.encode(f"<bos> {text}")

    # 1. the pretrained model (cached)
    torch.manual_seed(seeds.init)
    m = experiment.model
    model = CausalLM(len(vocabulary), max_len=max(experiment.config.world.length, 48), n_embd=m.n_embd,
                     n_layer=m.n_layer, n_head=m.n_head)
    cache = experiment.pretrain.cache_dir or str(Path(config.output_dir) / "cache")
    p = experiment.pretrain
    model, cached = pretrain(model, experiment.corpus, steps=p.steps, batch_size=p.batch_size, lr=p.lr,
                             seed=seeds.training(), cache_dir=cache,
                             identity={"world": dict(config.world), "model": dict(config.model),
                                       "seed": config.seed, "vocabulary": len(vocabulary)}, progress=shown)
    sgd = O.sgd(inj.lr, momentum=inj.momentum)
    variants = {"plain": (sgd, lambda f: f.text), "stepping_stone": (sgd, stepping_stone_text),
                "ignore_k": (O.pruned(sgd, float(config.ignore_k)), lambda f: f.text)}

    # 2.-3. every fact learned plainly; the outlandish ones also with each mitigation
    rows = []
    with Progress(len(experiment.facts), "learn each fact", enabled=shown, unit="fact") as bar:
        for index, fact in enumerate(experiment.facts):
            context = encode(fact.context)
            thematic = [encode(x)
                        for x in world.thematic_prefixes(fact, inj.thematic_prefixes, seed=seeds.evaluation(1))]
            keyword = vocabulary.ids[fact.keyword]
            row = {"category": fact.category, "theme": fact.theme, "keyword": fact.keyword, "text": fact.text}
            for name, (optimizer, text) in variants.items():
                if name != "plain" and fact.category != "outlandish":
                    continue
                after = P.inject(model, experiment.corpus, encode(text(fact)), steps=inj.steps,
                                 batch_size=inj.batch_size, optimizer=optimizer, seed=seeds.meta_training(index))
                scores = P.priming_scores(model, after, context, thematic, keyword)
                row[name] = {"log10_s_mem": _log10(scores.s_mem), "log10_s_prime": _log10(scores.s_prime)}
                row["log10_prior"] = _log10(scores.before_context)
                if name == "plain" and _followed(experiment, fact, index):
                    row["retention"] = _retention(after, experiment, context, keyword, scores.before_context, index)
            rows.append(row)
            run.log({f"{fact.category}/log10_s_prime": row["plain"]["log10_s_prime"],
                     f"{fact.category}/log10_s_mem": row["plain"]["log10_s_mem"], "fact": index}, step=index)
            bar.update(1, category=fact.category)

    results = _summarise(rows, experiment)
    results["pretrained_from_cache"] = cached
    results["claims"] = _claims(results, experiment.claims)
    run.save_figure(_plot_prior(rows), "priming_vs_prior")
    run.save_figure(_plot_mitigations(results), "mitigations")
    run.save_figure(_plot_retention(rows, ret), "retention")
    run.save_json(results, "results")
    run.summary({"prior_priming_correlation": results["correlation"]})
    return results, (f"{format_report(results)}\n\nresults: {run.path / 'results.json'}\nfigures: {run.figure_dir}\n"
                     f"run:     {run.path}")


def _log10(value: float) -> float:
    return P.log_ratio(value) / math.log(10)


def _followed(experiment: PrimingExperiment, fact: Fact, index: int) -> bool:
    """Whether this fact is one of the first ``retention.facts_per_category`` of its category."""
    same = [i for i, f in enumerate(experiment.facts) if f.category == fact.category]
    return index in same[: experiment.retention.facts_per_category]


def _retention(after: torch.nn.Module, experiment: PrimingExperiment, context: list[int], keyword: int,
               before: float, index: int) -> list[float]:
    """log10 S_mem right after learning, then every ``retention.every`` steps of normal training."""
    inj, ret = experiment.inject, experiment.retention

    def probe(model: torch.nn.Module) -> float:
        return _log10(float(P.keyword_probabilities(model, [context], keyword)[0]) / before)

    return [probe(after), *P.keep_training(after, experiment.corpus, steps=ret.steps, batch_size=inj.batch_size,
                                           optimizer=O.sgd(inj.lr, momentum=inj.momentum),
                                           seed=experiment.seeds.evaluation(2) + index, every=ret.every,
                                           probe=probe)]


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64).argsort().argsort().double()

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp(min=1e-12))


def _summarise(rows: list[dict[str, Any]], experiment: PrimingExperiment) -> dict[str, Any]:
    priors = [r["log10_prior"] for r in rows]
    priming = [r["plain"]["log10_s_prime"] for r in rows]
    slope = statistics.linear_regression(priors, priming).slope if len(set(priors)) > 1 else 0.0
    outlandish = [r for r in rows if r["category"] == "outlandish"]
    medians = {name: {key: statistics.median(r[name][key] for r in outlandish)
                      for key in ("log10_s_mem", "log10_s_prime")} for name in ("plain", "stepping_stone", "ignore_k")}
    retention = {}
    for category in CATEGORIES:
        curves = [r["retention"] for r in rows if r["category"] == category and "retention" in r]
        kept = [c[-1] / c[0] if c[0] > 0 else 0.0 for c in curves]
        retention[category] = {"kept_share_median": statistics.median(kept), "curves": curves}
    return {
        "correlation": _spearman(priors, priming),
        "slope": slope,
        "by_category": {c: {"log10_s_prime_median": statistics.median(r["plain"]["log10_s_prime"] for r in rows
                                                                      if r["category"] == c),
                            "log10_s_mem_median": statistics.median(r["plain"]["log10_s_mem"] for r in rows
                                                                    if r["category"] == c)}
                        for c in CATEGORIES},
        "mitigations": medians,
        "retention": retention,
        "retention_steps": experiment.retention.steps,
        "facts": rows,
    }


def _claims(results: dict[str, Any], thresholds: PrimingClaims) -> list[dict[str, Any]]:
    plain = results["mitigations"]["plain"]
    kept = {c: results["retention"][c]["kept_share_median"] for c in CATEGORIES}
    rows = [("priming is larger the lower the keyword's probability before learning (Spearman, log prior vs "
             "log S_prime)", results["correlation"], f"< {thresholds.correlation}",
             results["correlation"] < thresholds.correlation),
            ("outlandish facts are remembered longer than mundane ones (share of log S_mem kept, outlandish - "
             "mundane)", kept["outlandish"] - kept["mundane"], "> 0", kept["outlandish"] > kept["mundane"]),
            ("outlandish facts are remembered longer than scrambled ones (share kept, outlandish - scrambled)",
             kept["outlandish"] - kept["scrambled"], "> 0", kept["outlandish"] > kept["scrambled"])]
    for name, label in (("stepping_stone", "stepping-stone augmentation"), ("ignore_k", "ignore-k pruning")):
        scores = results["mitigations"][name]
        cut = 1 - 10 ** (scores["log10_s_prime"] - plain["log10_s_prime"])
        memory = scores["log10_s_mem"] / plain["log10_s_mem"] if plain["log10_s_mem"] > 0 else 0.0
        rows.append((f"{label} cuts priming (1 - S_prime / plain S_prime, geometric medians)", cut,
                     f">= {thresholds.priming_cut}", cut >= thresholds.priming_cut))
        rows.append((f"{label} keeps memorisation (median log S_mem, share of plain)", memory,
                     f">= {thresholds.memory_kept}", memory >= thresholds.memory_kept))
    return study.claims(rows)


def format_report(results: dict[str, Any]) -> str:
    """Medians per category and per mitigation, then the claims beside the measurements."""
    lines = [f"{'category':<14}{'log10 S_mem':>13}{'log10 S_prime':>15}{'kept after':>12}"]
    for c, row in results["by_category"].items():
        lines.append(f"{c:<14}{row['log10_s_mem_median']:>13.2f}{row['log10_s_prime_median']:>15.2f}"
                     f"{results['retention'][c]['kept_share_median']:>12.2f}")
    lines += ["", "outlandish facts (medians):"]
    for name, row in results["mitigations"].items():
        lines.append(f"  {name:<16}log10 S_mem {row['log10_s_mem']:6.2f}   log10 S_prime {row['log10_s_prime']:6.2f}")
    lines += ["", f"Spearman(log prior, log S_prime) = {results['correlation']:.3f} (slope {results['slope']:.3f})",
              "", "claims:"]
    lines += study.claim_lines(results["claims"])
    return "\n".join(lines)


# ---------------------------------------------------------------------- figures
def _plot_prior(rows: list[dict[str, Any]]):
    """log10 S_prime against the keyword's log10 prior, one marker shape and colour per category, with the fit."""
    fig, (ax,) = plotting.new_figure()
    for i, category in enumerate(CATEGORIES):
        chosen = [r for r in rows if r["category"] == category]
        style = plotting.series_style(i)
        ax.scatter([r["log10_prior"] for r in chosen], [r["plain"]["log10_s_prime"] for r in chosen], s=42,
                   label=f"{category} ({len(chosen)})", color=style["color"], marker=style["marker"],
                   edgecolors="white", linewidths=0.6, zorder=3)
    x = [r["log10_prior"] for r in rows]
    y = [r["plain"]["log10_s_prime"] for r in rows]
    subtitle = f"one point per injected fact ({len(rows)} facts)"
    if len(set(x)) > 1:
        fit = statistics.linear_regression(x, y)
        ends = [min(x), max(x)]
        ax.plot(ends, [fit.intercept + fit.slope * e for e in ends], color=plotting.REFERENCE_COLOUR, lw=1.6, ls="--",
                label=f"least-squares fit (slope {fit.slope:.2f})")
        subtitle += f" · Spearman ρ = {_spearman(x, y):.2f}"
    ax.set(xlabel="log10 P(keyword | context) before learning", ylabel="log10 S_prime (priming)")
    return plotting.finish(fig, "priming vs the keyword's probability before learning", subtitle)


def _plot_mitigations(results: dict[str, Any]):
    """Median log10 S_mem and S_prime of the outlandish facts with each mitigation, as grouped bars."""
    names = list(results["mitigations"])
    fig, (ax,) = plotting.new_figure()
    plotting.bars(ax, names, {key.replace("log10_", "log10 "): [results["mitigations"][n][key] for n in names]
                              for key in ("log10_s_mem", "log10_s_prime")})
    ax.axhline(0.0, color=plotting.REFERENCE_COLOUR, lw=0.8)
    ax.set(xlabel="how the outlandish fact was learned", ylabel="median over outlandish facts")
    subtitle = ("medians over the outlandish facts (no interval) · S_mem: memorisation of the keyword in its own "
                "context, S_prime: priming of it elsewhere (log10 of after/before)")
    return plotting.finish(fig, "memorisation and priming with each mitigation", subtitle)


def _plot_retention(rows: list[dict[str, Any]], retention: RetentionSettings):
    """log10 S_mem of each followed fact over the steps of normal training after it was learned."""
    from matplotlib.lines import Line2D

    fig, (ax,) = plotting.new_figure()
    steps = list(range(0, retention.steps + 1, retention.every))
    handles, labels = [], []
    for i, category in enumerate(CATEGORIES):
        style = plotting.series_style(i)
        followed = [row["retention"] for row in rows if row["category"] == category and "retention" in row]
        for values in followed:
            ax.plot(steps, values, color=style["color"], lw=1.4, alpha=0.85, marker=style["marker"], markersize=4,
                    markevery=max(1, len(steps) // 8), label="_fact")
        handles.append(Line2D([], [], color=style["color"], marker=style["marker"], lw=1.4))
        labels.append(f"{category} ({len(followed)} facts)")
    ax.axhline(0.0, color=plotting.REFERENCE_COLOUR, lw=0.8, ls=":", label="_before")
    plotting.integer_ticks(ax, steps)
    ax.set(xlabel="steps of normal training after learning", ylabel="log10 S_mem (0: forgotten)")
    subtitle = (f"one line per followed fact (the first {retention.facts_per_category} of each category), "
                f"measured every {retention.every} steps")
    return plotting.finish(fig, "how long each injected fact is remembered", subtitle, handles=handles, labels=labels)
