"""Sweeps: the grid, the folder layout, stopping and starting again, workers, and aggregation over seeds."""

import json

import numpy as np
import pytest

from metaopt import sweep
from metaopt.aggregate import aggregate, bootstrap_mean_interval, summarise
from metaopt.config import ConfigError
from metaopt.sweep import Axis, SweepPlan, parse_grid, run_sweep
from metaopt.testing import shrunk
from metaopt.train import MetaTrainer

SMALL = ["compare.support_sizes=[0,5,10]"]


def test_grid_syntax():
    fixed, axes = parse_grid(["train.lr=3e-4,1e-3", "seed=range(0,3)", "x=[1,2]", "y=[1,2],[3]",
                              "z=choice(a,'b,c')", "w=range(0,1,0.25)", "train.steps=5"])
    assert fixed == ["x=[1,2]", "train.steps=5"]
    assert axes == [Axis("train.lr", ("3e-4", "1e-3")), Axis("seed", ("0", "1", "2")), Axis("y", ("[1,2]", "[3]")),
                    Axis("z", ("a", "'b,c'")), Axis("w", ("0.0", "0.25", "0.5", "0.75"))]
    for bad in (["lr"], ["seed=0,1", "seed=2"], ["seed=range(3,1)"], ["seed=0,,1"], ["seed=range(a)"]):
        with pytest.raises(ConfigError):
            parse_grid(bad)


def test_plan_layout_and_bad_point_refused_before_any_run(tmp_path):
    plan = SweepPlan.make("quickstart", [f"output_dir={tmp_path}", "train.lr=3e-4,1e-3", "seed=0,1"])
    assert plan.folder.parent == tmp_path / "quickstart" and plan.folder.name.startswith("sweep-")
    assert [p.name for p in plan.points] == ["000-train.lr=3e-4-seed=0", "001-train.lr=3e-4-seed=1",
                                             "002-train.lr=1e-3-seed=0", "003-train.lr=1e-3-seed=1"]
    assert plan.overrides(plan.points[1])[-3:] == [f"wandb.group={plan.sweep_id}/train.lr=3e-4", "train.lr=3e-4",
                                                  "seed=1"]
    assert SweepPlan.make("quickstart", [f"output_dir={tmp_path}", "train.lr=3e-4,1e-3", "seed=0,1"]).folder \
        == plan.folder  # the same command finds the same sweep
    with pytest.raises(ConfigError, match="train.steps"):
        SweepPlan.make("quickstart", [f"output_dir={tmp_path}", "train.steps=10,-1"])
    assert not (tmp_path / "quickstart").exists() or not any((tmp_path / "quickstart").rglob("config.yaml"))


def test_interrupted_sweep_skips_finished_points_and_resumes_the_unfinished(tmp_path, monkeypatch):
    arguments = [*shrunk("quickstart"), *SMALL, f"output_dir={tmp_path}", "train.lr=3e-4,1e-3", "seed=0,1"]
    plan = SweepPlan.make("quickstart", arguments)
    real_step, calls = MetaTrainer._train_step, []

    def step(self):  # Ctrl-C in the middle of the second point's training (after 1 of its 3 steps)
        calls.append(self.step)
        if len(calls) == 5:
            raise KeyboardInterrupt
        real_step(self)

    monkeypatch.setattr(MetaTrainer, "_train_step", step)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(plan)
    first, second = (plan.path(p) for p in plan.points[:2])
    assert (first / "results.json").is_file() and not (second / "results.json").exists()
    assert MetaTrainer.latest_checkpoint(second / "checkpoints" / "transformer").name == "step_00000001.pt"
    monkeypatch.setattr(MetaTrainer, "_train_step", real_step)
    statuses = run_sweep(SweepPlan.make("quickstart", arguments))
    assert list(statuses.values()) == ["skipped", "resumed", "ran", "ran"]
    assert all((plan.path(p) / "results.json").is_file() for p in plan.points)

    groups, written = summarise(plan.folder)
    assert [g.name for g in groups] == ["train.lr=3e-4", "train.lr=1e-3"] and groups[0].seeds == ["0", "1"]
    saved = json.loads(written["json"].read_text())
    assert all(p["finished"] for p in saved["points"]) and len(saved["groups"]) == 2
    assert written["plot"].is_file() and "holds for" in written["table"].read_text()
    per_seed = [json.loads((plan.path(p) / "results.json").read_text())["curves"]["ridge"]["mean"]
                for p in plan.points[:2]]
    assert groups[0].learners["ridge"]["mean"] == pytest.approx(np.mean(per_seed, axis=0))


def test_workers_run_the_points_in_processes(tmp_path):
    plan = SweepPlan.make("quickstart", [*shrunk("quickstart"), *SMALL, f"output_dir={tmp_path}", "seed=0,1"])
    statuses = run_sweep(plan, workers=2)
    assert list(statuses.values()) == ["finished", "finished"]
    assert sorted(p.name for p in (plan.folder / "logs").iterdir()) == ["worker0.log", "worker1.log"]
    with pytest.raises(ConfigError, match="workers"):
        run_sweep(plan, workers=0)


def _results(means, low, high, holds):
    return {"metric": "normalized_error", "lower_is_better": True, "support_sizes": [0, 5], "num_tasks": 10,
            "curves": {"a": {"mean": means, "low": low, "high": high, "implicit": True},
                       "b": {"mean": [1.0, 0.5], "low": [0.9, 0.4], "high": [1.1, 0.6], "implicit": False}},
            "claims": [{"text": "a beats b at 5", "learner": "a", "k": 5, "below": None, "above": None,
                        "better_than": ["b"], "measured": means[1], "others": {"b": 0.5}, "holds": holds}]}


def test_aggregation_against_a_hand_computation():
    seeds = [_results([1.0, 0.2], [0.8, 0.1], [1.2, 0.3], True), _results([0.6, 0.9], [0.5, 0.7], [0.7, 1.1], False)]
    group = aggregate("g", {}, ["0", "1"], ["p0", "p1"], seeds)
    a = group.learners["a"]
    assert a["mean"] == pytest.approx([0.8, 0.55]) and a["n"] == 2
    # two seeds: the resampled means are x0, (x0 + x1) / 2 or x1 (1/4, 1/2, 1/4): the 95% interval is [min, max]
    assert a["low"] == pytest.approx([0.6, 0.2]) and a["high"] == pytest.approx([1.0, 0.9])
    assert a["seed_means"] == [[1.0, 0.2], [0.6, 0.9]]
    assert a["within_seed"] == {"low": [[0.8, 0.1], [0.5, 0.7]], "high": [[1.2, 0.3], [0.7, 1.1]]}
    claim = group.claims[0]  # on the mean: 0.55 is not below b's 0.5; one seed of two holds it
    assert claim["measured"] == pytest.approx(0.55) and claim["holds"] is False
    assert (claim["seeds_holding"], claim["seeds"]) == (1, 2)
    alone = aggregate("g", {}, ["0"], ["p0"], seeds[:1]).learners["a"]  # one seed: its interval over tasks
    assert (alone["low"], alone["high"]) == ([0.8, 0.1], [1.2, 0.3])
    # three seeds 1, 2, 6: P(mean = 1) = P(mean = 6) = 1/27 > 2.5%, so the interval is [1, 6]
    low, high = bootstrap_mean_interval(np.array([[1.0], [2.0], [6.0]]))
    assert (low[0], high[0]) == (1.0, 6.0)
    with pytest.raises(ValueError, match="support_sizes"):
        aggregate("g", {}, ["0", "1"], ["p0", "p1"], [seeds[0], {**seeds[1], "support_sizes": [0, 6]}])


def test_wandb_sweep_config_passes_validation(tmp_path):
    plan = SweepPlan.make("quickstart", [f"output_dir={tmp_path}", "train.lr=3e-4,1e-3", "seed=0,1",
                                         "train.steps=300"])
    for method in sweep.METHODS:
        config = sweep.wandb_config(plan, method=method)
        assert sweep.check_wandb_config(config) == []  # W&B's own schema too where `sweeps` is installed
        assert config["parameters"] == {"train.lr": {"values": [3e-4, 1e-3]}, "seed": {"values": [0, 1]}}
        assert config["command"][-1] == "${args_no_hyphens}" and "train.steps=300" in config["command"]
        assert config["metric"] == {"name": "compare/transformer/normalized_error@k=11", "goal": "minimize"}
    path = sweep.write_wandb_config(plan, method="random")
    assert "${args_no_hyphens}" in path.read_text()
    broken = {**config, "method": "annealing", "parameters": {"seed": {"values": []}}, "command": ["metaopt"]}
    problems = sweep.check_wandb_config(broken)
    assert any("method" in p for p in problems) and any("parameters.seed" in p for p in problems)
    assert any("args_no_hyphens" in p for p in problems)
    with pytest.raises(ConfigError, match="method"):
        sweep.wandb_config(plan, method="annealing")
