"""The seed plan: every random stream of a run from one seed, reachable from recipes, the same as before the plan."""

import pytest
import torch
from omegaconf import OmegaConf

import metaopt.config  # noqa: F401  (registers the ${seed:...} resolver)
from metaopt.compare import compare
from metaopt.learners import LeastSquares
from metaopt.pipelines import build, load
from metaopt.seeds import SeedPlan, comparison_streams, generator, item_seed
from metaopt.tasks import LinearRegression
from metaopt.train import MetaTrainer
from test_train import tiny_transformer


def test_the_plan_keeps_the_offsets_runs_were_made_with():
    plan = SeedPlan(7)
    assert (plan.init, plan.training("any"), plan.validation, plan.comparison, plan.tuning, plan.sequences) == (
        7, 7, 7 + 1_000_003, 7 + 2_000_029, 7 + 3_000_017, 7 + 3_000_017)
    assert [plan.baseline_tuning(i) for i in range(2)] == [10_007, 10_008]
    assert [plan.meta_training(i) for i in range(2)] == [8, 9]
    assert [plan.evaluation(i) for i in range(2)] == [20_007, 20_008]
    assert comparison_streams(5) == (5, 6, 7)
    assert item_seed(2, 5) == 2 * 1_000_003 + 5  # a glyph class's images, as they were drawn before the plan


def test_purposes_do_not_share_a_stream():
    plan = SeedPlan(0)
    seeds = {plan.validation, plan.comparison, plan.tuning, plan.baseline_tuning(0), plan.evaluation(0),
             plan.meta_training(0), plan.init + 0}
    assert len(seeds) == 7


def test_bad_seeds_and_purposes_are_refused():
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        SeedPlan(True)
    with pytest.raises(ValueError, match="unknown purpose; expected one of"):
        SeedPlan(0).resolve("init_weights")
    assert SeedPlan(3).resolve("tuning") == 3 + 3_000_017


def test_recipes_reach_the_plan_through_the_resolver():
    config = OmegaConf.create({"seed": 4, "learner": {"seed": "${seed:tuning}"}})
    assert config.learner.seed == SeedPlan(4).tuning
    experiment = build(load("noisy_regression", ["seed=2", "learners.const_rr.num_tasks=16",
                                                 "learners.tuned_rr.num_tasks=16"]))
    assert experiment.learners["const_rr"].tuning.seed == SeedPlan(2).tuning


def test_trainer_and_compare_draw_from_the_plan():
    family = LinearRegression(2)
    trainer = MetaTrainer(tiny_transformer(), family, steps=1, val_tasks=8, support=5, seed=3, progress=False)
    expected = family.sample(8, 5, 1, generator=generator(SeedPlan(3).validation))
    assert torch.equal(trainer.val_episode.x_query, expected.x_query)
    a = compare({"ls": LeastSquares()}, family, support_sizes=[1, 3], num_tasks=16, seed=11, bootstrap=10)
    b = compare({"ls": LeastSquares()}, family, support_sizes=[1, 3], num_tasks=16, seed=11, bootstrap=10)
    c = compare({"ls": LeastSquares()}, family, support_sizes=[1, 3], num_tasks=16, seed=12, bootstrap=10)
    assert a.curves["ls"].mean == b.curves["ls"].mean != c.curves["ls"].mean
