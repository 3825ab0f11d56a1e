"""The ``distillation`` pipeline: decentralized multi-headed distillation against isolated and centralized training.

Zhmoginov et al. (CVPR 2023) at CPU scale. From one recipe it trains, every population on the same private,
public and test data (:func:`~metaopt.distillation.agents.agent_data`):

1. ``isolated``: every agent on its own private labels, no communication (the baseline);
2. ``centralized``: one model on the union of all private labels (the reference no agent can see);
3. one population per graph of ``study.topologies`` with ``model.heads`` heads (the first is the method's
   headline run), accuracy per agent and round on its private task and on the global distribution;
4. on ``study.aux_graph``, for each skew of ``study.skews``: one head against ``model.heads`` heads, the gain
   of the auxiliary heads as the data gets more heterogeneous (mean global accuracy over the evaluated rounds).

It then checks the paper's claims, prints them beside the measurements, and writes ``results.json``, the
figures (accuracy vs round per agent and topology; the auxiliary-head gain per skew) and the W&B run. Nothing
is checkpointed mid-run (minutes in all): ``resume`` and ``compare`` run it again, deterministically.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from metaopt import distributed, plotting
from metaopt.checks import non_negative_float, one_of, positive_int, probability, sequence_of
from metaopt.config import CommonSettings, ConfigError, settings
from metaopt.distillation.agents import SOURCES, AgentData, AgentModels, agent_data
from metaopt.distillation.graphs import GRAPHS, communication_graph
from metaopt.distillation.method import DistillationSettings, train_agents
from metaopt.log import Run
from metaopt.progress import Progress
from metaopt.seeds import SeedPlan, item_seed

__all__ = ["DataSettings", "ModelSettings", "StudySettings", "DistillationRecipe", "DistillationExperiment",
           "validate", "build", "execute"]

logger = logging.getLogger(__name__)


@dataclass
class DataSettings:
    """The population's data (:func:`~metaopt.distillation.agents.agent_data`)."""

    source: str = "digits"
    image_size: int = 8
    agents: int = 8
    num_classes: int = 10
    classes_per_agent: int = 3
    skew: float = 0.9
    per_agent: int = 60
    public: int = 500
    test_per_class: int = 30

    def __post_init__(self) -> None:
        owner = type(self).__name__
        one_of("source", self.source, SOURCES, owner=owner)
        for key in ("image_size", "agents", "num_classes", "classes_per_agent", "per_agent", "public",
                    "test_per_class"):
            positive_int(key, getattr(self, key), owner=owner)
        probability("skew", self.skew, owner=owner)
        if self.agents < 2:
            raise ValueError(f"agents must be at least 2 (a graph needs two ends); got {self.agents}")


@dataclass
class ModelSettings:
    """Every agent's network: an MLP of ``depth`` hidden layers of ``hidden`` units and ``heads`` heads."""

    hidden: int = 128
    depth: int = 2
    heads: int = 3

    def __post_init__(self) -> None:
        for key in ("hidden", "depth", "heads"):
            positive_int(key, getattr(self, key), owner=type(self).__name__)


@dataclass
class StudySettings:
    """What is compared: graphs (``degree`` for ``regular``), the skews and graph of the auxiliary-head study,
    and how far below isolated training the private accuracy may fall to count as "kept"."""

    topologies: list[str] = field(default_factory=lambda: ["complete", "regular", "ring", "star"])
    degree: int = 4
    aux_graph: str = "ring"
    skews: list[float] = field(default_factory=lambda: [0.5, 0.9])
    private_tolerance: float = 0.03

    def __post_init__(self) -> None:
        owner = type(self).__name__
        sequence_of("topologies", self.topologies, lambda name, v, owner: one_of(name, v, GRAPHS, owner=owner),
                    owner=owner)
        if not self.topologies or "isolated" in self.topologies:
            raise ValueError(f"topologies must name at least one graph other than 'isolated'; got {self.topologies}")
        one_of("aux_graph", self.aux_graph, GRAPHS, owner=owner)
        positive_int("degree", self.degree, owner=owner)
        sequence_of("skews", self.skews, probability, owner=owner)
        if len(self.skews) < 2:
            raise ValueError(f"skews must list at least two skews (low to high); got {self.skews}")
        non_negative_float("private_tolerance", self.private_tolerance, owner=owner)


@dataclass
class DistillationRecipe(CommonSettings):
    """A decentralized-distillation experiment (module docstring)."""

    pipeline: str = "distillation"
    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    train: DistillationSettings = field(default_factory=DistillationSettings)
    study: StudySettings = field(default_factory=StudySettings)


@dataclass
class DistillationExperiment:
    """A recipe's built pieces: the settings and the communication graph of every population (``graphs``)."""

    config: DictConfig
    data: DataSettings
    model: ModelSettings
    train: DistillationSettings
    study: StudySettings
    graphs: dict[str, torch.Tensor]

    @property
    def seeds(self) -> SeedPlan:
        return SeedPlan(self.config.seed)


def _sections(config: DictConfig) -> tuple[DataSettings, ModelSettings, DistillationSettings, StudySettings]:
    return (settings(config.data, DataSettings, "data"), settings(config.model, ModelSettings, "model"),
            settings(config.train, DistillationSettings, "train"), settings(config.study, StudySettings, "study"))


def validate(config: DictConfig, source: str) -> None:
    """Every setting checked at load time, the graphs included (a degree no graph of that size has fails here)."""
    build(config, source)


def build(config: DictConfig, source: str = "recipe") -> DistillationExperiment:
    """The settings and the graphs (``isolated`` and every one the study names)."""
    data, model, train, study = _sections(config)
    if data.classes_per_agent > data.num_classes:
        raise ConfigError(f"{source}: data.classes_per_agent={data.classes_per_agent} exceeds data.num_classes="
                          f"{data.num_classes}")
    graphs = {}
    for kind in ["isolated", *study.topologies, study.aux_graph]:
        try:
            graphs[kind] = communication_graph(kind, data.agents, degree=study.degree, seed=config.seed)
        except ValueError as error:
            raise ConfigError(f"{source}: study: {error}") from error
    return DistillationExperiment(config, data, model, train, study, graphs)


# ---------------------------------------------------------------------- execution
@dataclass(frozen=True)
class Claim:
    """A claim of the paper, what was measured, and whether it holds."""

    text: str
    measured: str
    holds: bool


def _population(experiment: DistillationExperiment, data: AgentData, graph: str, heads: int, seed: int,
                centralized: bool = False) -> list[dict[str, Any]]:
    """Train one population (or the centralized model) from the run's initialisation seed; its history."""
    torch.manual_seed(seed)
    if centralized:  # one model, every private label: agent dimension 1
        pooled = replace(data, private_x=data.private_x.flatten(0, 1).unsqueeze(0),
                         private_y=data.private_y.flatten().unsqueeze(0), agent_classes=data.agent_classes[:1])
        models = AgentModels(1, data.private_x.shape[-1], data.num_classes, hidden=experiment.model.hidden,
                             depth=experiment.model.depth, heads=1)
        return train_agents(models, pooled, torch.zeros(1, 1, dtype=torch.bool), experiment.train, seed=seed)
    models = AgentModels(data.agents, data.private_x.shape[-1], data.num_classes, hidden=experiment.model.hidden,
                         depth=experiment.model.depth, heads=heads)
    return train_agents(models, data, experiment.graphs[graph], experiment.train, seed=seed)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _final(history: list[dict[str, Any]], key: str = "global") -> float:
    return _mean(history[-1][key])


def _area(history: list[dict[str, Any]]) -> float:
    """Mean global accuracy over the evaluated rounds: how fast a population learns, not only where it ends."""
    return _mean([_mean(row["global"]) for row in history])


def execute(experiment: DistillationExperiment, run: Run, *, resume: bool = False, train: bool = True,
            trained: Path | None = None) -> tuple[dict[str, Any], str]:
    """Train every population into ``run``, check the claims, and report (module docstring)."""
    del resume, train, trained
    d, study, heads = experiment.data, experiment.study, experiment.model.heads
    seeds = experiment.seeds
    init = seeds.init

    def data_at(skew: float) -> AgentData:
        return agent_data(**(asdict(d) | {"skew": skew}), seed=item_seed(seeds.seed, 1))

    data = data_at(d.skew)
    shown = experiment.config.progress and distributed.is_main()
    bar = Progress(_trainings(study, d.skew), "train populations", enabled=shown, unit="population")

    def population(on: AgentData, graph: str, heads: int, label: str,
                   centralized: bool = False) -> list[dict[str, Any]]:
        history = _population(experiment, on, graph, heads, init, centralized)
        bar.update(1, population=label)
        return history

    with bar:
        runs: dict[str, list[dict[str, Any]]] = {
            "isolated": population(data, "isolated", 1, "isolated"),
            "centralized": population(data, "isolated", 1, "centralized", centralized=True),
        }
        for kind in study.topologies:
            runs[kind] = population(data, kind, heads, kind)
        heterogeneity = {}
        for skew in study.skews:
            skewed = data if skew == d.skew else data_at(skew)
            one = population(skewed, study.aux_graph, 1, f"{study.aux_graph}, 1 head, skew {skew}")
            many = (runs[study.aux_graph] if skew == d.skew and study.aux_graph in study.topologies
                    else population(skewed, study.aux_graph, heads, f"{study.aux_graph}, {heads} heads, skew {skew}"))
            isolated = (runs["isolated"] if skew == d.skew
                        else population(skewed, "isolated", 1, f"isolated, skew {skew}"))
            heterogeneity[str(skew)] = {"one_head": _area(one), f"{heads}_heads": _area(many),
                                        "isolated": _area(isolated), "gain": _area(many) - _area(one),
                                        "one_head_final": _final(one), f"{heads}_heads_final": _final(many)}
    for kind in study.topologies:
        logger.info("%-10s heads=%d  global %.3f  private %.3f", kind, heads, _final(runs[kind]),
                    _final(runs[kind], "private"))
    claims = _claims(runs, heterogeneity, study, heads)
    results = {"runs": runs, "heterogeneity": heterogeneity, "claims": [asdict(c) for c in claims],
               "table": _table(runs), "graphs": {k: v.int().tolist() for k, v in experiment.graphs.items()}}
    return results, _report(run, results, claims, study, 1 / d.num_classes)


def _trainings(study: StudySettings, skew: float) -> int:
    """The populations :func:`execute` trains at the run's ``skew``: isolated, centralized, one per topology, and
    those of the auxiliary-head study that are not the same run as one of these."""
    count = 2 + len(study.topologies)
    for other in study.skews:
        count += 1 + (other != skew or study.aux_graph not in study.topologies) + (other != skew)
    return count


def _table(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    return {name: {"global": _final(history), "private": _final(history, "private"), "area": _area(history)}
            for name, history in runs.items()}


def _claims(runs: dict[str, list[dict[str, Any]]], heterogeneity: dict[str, dict[str, float]],
            study: StudySettings, heads: int) -> list[Claim]:
    main, iso = study.topologies[0], runs["isolated"]
    claims = [
        Claim(f"Zhmoginov et al.: agents beat isolated training on the global distribution ({main} graph)",
              f"global {_final(runs[main]):.3f} vs isolated {_final(iso):.3f} (centralized "
              f"{_final(runs['centralized']):.3f})", _final(runs[main]) > _final(iso)),
        Claim(f"Zhmoginov et al.: agents keep or improve their private-task accuracy (within "
              f"{study.private_tolerance:.2f})", f"private {_final(runs[main], 'private'):.3f} vs isolated "
              f"{_final(iso, 'private'):.3f}",
              _final(runs[main], "private") >= _final(iso, "private") - study.private_tolerance),
    ]
    low, high = heterogeneity[str(study.skews[0])], heterogeneity[str(study.skews[-1])]
    claims.append(Claim(f"Zhmoginov et al.: auxiliary heads help more as data gets more heterogeneous "
                        f"({study.aux_graph} graph, {heads} heads vs 1, mean global accuracy over rounds)",
                        f"gain {low['gain']:+.3f} at skew {study.skews[0]}, {high['gain']:+.3f} at skew "
                        f"{study.skews[-1]}", high["gain"] > low["gain"]))
    dense = [kind for kind in ("complete", "regular", "ring") if kind in runs]
    if len(dense) >= 2:
        areas = {kind: _area(runs[kind]) for kind in dense}
        claims.append(Claim("Zhmoginov et al.: denser graphs learn faster (mean global accuracy over rounds)",
                            ", ".join(f"{k} {v:.3f}" for k, v in areas.items()),
                            all(areas[a] >= areas[b] for a, b in zip(dense, dense[1:]))))
    return claims


def _report(run: Run, results: dict[str, Any], claims: list[Claim], study: StudySettings, chance: float) -> str:
    """Write results, figures and the W&B run; the printed report (table and claims). ``chance``: the accuracy of
    guessing on the global test set."""
    for name, history in results["runs"].items():
        for row in history:
            run.log({"round": row["round"], f"{name}/global": _mean(row["global"]),
                     f"{name}/private": _mean(row["private"])})
    table = results["table"]
    run.summary({f"{name}/{key}": value for name, row in table.items() for key, value in row.items()})
    run.log_table("distillation/table", ["population", "global", "private", "area"],
                  [[name, row["global"], row["private"], row["area"]] for name, row in table.items()])
    path = run.save_json(results, "results")
    figures = [run.save_figure(_curves(results["runs"], [*study.topologies, "isolated"], chance), "accuracy_vs_round"),
               run.save_figure(_gains(results["heterogeneity"]), "aux_heads_vs_skew")]
    lines = [f"{'population':<12} {'global':>7} {'private':>8} {'mean over rounds':>17}"]
    lines += [f"{name:<12} {row['global']:7.3f} {row['private']:8.3f} {row['area']:17.3f}" for name, row in table.items()]
    lines += ["", *(f"[{'holds' if c.holds else 'FAILS'}] {c.text}\n        measured: {c.measured}" for c in claims)]
    lines += ["", f"results: {path}", *(f"figure:  {f}" for f in figures), f"run:     {run.path}"]
    report = "\n".join(lines)
    logger.info("decentralized distillation\n%s", report)
    return report


def _curves(runs: dict[str, list[dict[str, Any]]], names: list[str], chance: float):
    """Private and global test accuracy vs round: a column per population, every agent thin, their mean bold."""
    agents = len(runs[names[0]][0]["global"])
    fig, axes = plotting.new_figure(len(names), 2, panel=(min(3.8, 15.0 / len(names)), 3.0), sharex=True)
    for column, name in enumerate(names):
        history = runs[name]
        rounds = [row["round"] for row in history]
        for row_index, key in enumerate(("private", "global")):
            ax = axes[row_index * len(names) + column]
            for agent in range(len(history[0][key])):
                ax.plot(rounds, [row[key][agent] for row in history], color="#9a9a9a", lw=0.9, alpha=0.7,
                        label="one agent" if agent == 0 else "_agent")
            mean = plotting.Series("mean over agents", rounds, [_mean(row[key]) for row in history])
            shown = [v for row in history for v in row[key]]  # every agent's line stays inside the range
            if key == "global":
                shown += [chance, _final(runs["centralized"])]
            plotting.plot_series(ax, [mean], styles=[6], integer_x=True, include=shown)
            if key == "global":
                plotting.reference_line(ax, y=_final(runs["centralized"]), label="centralized (final)", style="--")
                plotting.chance_line(ax, chance)
            ax.set_title(f"{name}: {key} test set")
            if row_index == 1:
                ax.set_xlabel("communication round")
            ax.set_ylabel(f"{key} accuracy")
    for row_index in range(2):
        plotting.same_y_range(axes[row_index * len(names):(row_index + 1) * len(names)])
    subtitle = (f"test accuracy of each of {agents} agents (grey) and their mean (black) after each round · "
                "private: each agent's own classes, global: every class")
    return plotting.finish(fig, "decentralized distillation: accuracy vs communication round", subtitle)


def _gains(heterogeneity: dict[str, dict[str, float]]):
    """Mean global accuracy over rounds vs the data skew: one head, several auxiliary heads, isolated agents."""
    fig, (ax,) = plotting.new_figure()
    skews = [float(s) for s in heterogeneity]
    keys = [k for k in next(iter(heterogeneity.values())) if k in ("one_head", "isolated") or k.endswith("_heads")]
    series = [plotting.Series(key.replace("_", " "), skews, [row[key] for row in heterogeneity.values()])
              for key in keys]
    plotting.plot_series(ax, series)
    ax.set_xlabel("skew (share of an agent's data from its own classes)")
    ax.set_ylabel("mean global accuracy over rounds")
    subtitle = "each population trained at each skew (no interval) · higher: more learned from the neighbours"
    return plotting.finish(fig, "auxiliary heads vs data heterogeneity", subtitle)
