"""GD++ as an explicit learner, and GD / GD++ tuned on held-out tasks (metaopt/learners/tuned_gd.py)."""

import pytest
import torch

from metaopt.learners import GDPlusPlus, GradientDescent, LinearSelfAttention, TunedGDPlusPlus, TunedGradientDescent
from metaopt.tasks import LinearDynamics, LinearRegression


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


FAMILY = LinearRegression(6, x_dist="uniform", x_range=(-1.0, 1.0))


def mse(learner, episode) -> float:
    with torch.no_grad():
        return (learner(episode) - episode.y_query).pow(2).mean().item()


@pytest.mark.parametrize("parameterization", ["full", "gdpp"])
@pytest.mark.parametrize("steps", [1, 3])
def test_gdpp_equals_the_lsa_construction(parameterization, steps):
    episode = FAMILY.sample(16, 9, 4, generator=generator(1))
    explicit = GDPlusPlus(steps, lr=0.8, gamma=0.3)(episode)
    implicit = LinearSelfAttention.from_gdpp(6, 0.8, 0.3, layers=steps, parameterization=parameterization)(episode)
    torch.testing.assert_close(explicit, implicit.detach(), rtol=1e-5, atol=1e-5)


def test_gdpp_without_preconditioning_is_gd():
    episode = FAMILY.sample(16, 9, 4, generator=generator(2))
    torch.testing.assert_close(GDPlusPlus(3, lr=0.7, gamma=0.0)(episode), GradientDescent(3, lr=0.7)(episode))


def test_gdpp_with_empty_support_predicts_zero():
    episode = FAMILY.sample(4, 5, 2, generator=generator(3)).take_support(0)
    assert torch.equal(GDPlusPlus(2, lr=1.0, gamma=0.1)(episode), torch.zeros_like(episode.y_query))


def test_tuned_gd_picks_the_grid_lr_with_lowest_held_out_loss():
    lrs = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0)
    tuned = TunedGradientDescent(FAMILY, steps=1, lrs=lrs, support=8, num_tasks=500, query=5, seed=11)
    chosen = tuned.tune()[8]
    held_out = FAMILY.sample(500, 8, 5, generator=generator(11))
    losses = {lr: mse(GradientDescent(1, lr), held_out) for lr in lrs}
    assert chosen == min(losses, key=losses.get)
    episode = FAMILY.sample(32, 8, 3, generator=generator(4))
    torch.testing.assert_close(tuned(episode), GradientDescent(1, chosen)(episode))


def test_tuned_gd_tunes_per_support_size_and_handles_vector_targets():
    family = LinearDynamics(3)
    tuned = TunedGradientDescent(family, steps=1, support=[2, 10], num_tasks=300, query=2)
    chosen = tuned.tune()
    assert set(chosen) == {2, 10}
    episode = family.sample(8, 10, 2, generator=generator(5))
    assert tuned(episode).shape == episode.y_query.shape
    torch.testing.assert_close(tuned(episode.take_support(3)), GradientDescent(1, chosen[2])(episode.take_support(3)))


def test_tuned_gdpp_is_no_worse_than_tuned_gd_on_its_tuning_tasks():
    lrs, support = (0.5, 1.0, 1.5, 2.0, 3.0), 8
    gd = TunedGradientDescent(FAMILY, steps=2, lrs=lrs, support=support, num_tasks=400, query=5, seed=7)
    gdpp = TunedGDPlusPlus(FAMILY, steps=2, lrs=lrs, gammas=(0.0, 0.2, 0.5, 1.0), support=support, num_tasks=400,
                           query=5, seed=7)
    held_out = FAMILY.sample(400, support, 5, generator=generator(7))
    assert mse(gdpp, held_out) <= mse(gd, held_out) + 1e-7
    assert gdpp.tune()[support][1] > 0  # some preconditioning helps at N close to d


def test_tuned_learners_accept_a_recipe_task_mapping():
    """In a recipe the family is a nested _target_ block (family: ${task}): it arrives built."""
    from metaopt.config import instantiate

    spec = {"_target_": "metaopt.tasks.LinearRegression", "dim": 4}
    tuned = instantiate({"_target_": "metaopt.learners.TunedGradientDescent", "family": spec, "lrs": [0.5, 1.0],
                         "support": 4, "num_tasks": 50}, "learners.tuned_gd")
    assert isinstance(tuned.tuning.family, LinearRegression) and tuned.tune()[4] in (0.5, 1.0)


@pytest.mark.parametrize(
    "build",
    [
        lambda: GDPlusPlus(steps=0),
        lambda: TunedGradientDescent(FAMILY, steps=0),
        lambda: TunedGradientDescent(FAMILY, lrs=()),
        lambda: TunedGradientDescent(FAMILY, lrs=(-1.0,)),
        lambda: TunedGDPlusPlus(FAMILY, gammas=(-0.1,)),
        lambda: TunedGradientDescent(FAMILY, support=0),
        lambda: TunedGradientDescent("not a family"),
    ],
)
def test_bad_settings_are_refused(build):
    with pytest.raises(ValueError):
        build()
