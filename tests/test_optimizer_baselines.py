"""The ``optimizer`` pipeline's baselines: learning-rate schedules, and the strongest baseline in the results."""

from __future__ import annotations

import math

import pytest
import torch

import optimizers as O
from metaopt.config import RECIPE_DIR, ConfigError
from metaopt.pipelines import build, load
from metaopt.pipelines.optimizer import SCHEDULES, _horizon_results, baseline_optimizer, format_table

RECIPE = str(RECIPE_DIR / "specialized_optimizer.yaml")


def _learning_rates(opt: O.GradientTransformation, steps: int) -> list[float]:
    """The rate of each of ``steps`` SGD updates under a unit gradient: the update is ``-lr_t``."""
    params = {"w": torch.zeros((), dtype=torch.float64)}
    grads = {"w": torch.ones((), dtype=torch.float64)}
    state, rates = opt.init(params), []
    for _ in range(steps):
        updates, state = opt.update(grads, state, params)
        rates.append(-float(updates["w"]))
    return rates


@pytest.mark.parametrize("steps", [1, 5, 50])
def test_a_cosine_baseline_decays_to_zero_over_its_own_run(steps):
    rates = _learning_rates(baseline_optimizer(O.sgd, "cosine", 0.3, steps), steps)
    closed_form = [0.3 * (1 + math.cos(math.pi * t / steps)) / 2 for t in range(steps)]
    assert rates == pytest.approx(closed_form, rel=1e-12, abs=1e-15)
    assert rates[0] == pytest.approx(0.3)  # the tuned rate is the peak, at the first update
    longer = _learning_rates(baseline_optimizer(O.sgd, "cosine", 0.3, steps), steps + 3)
    assert longer[steps:] == [0.0, 0.0, 0.0]  # past its decay length it stays at 0


def test_a_constant_baseline_keeps_its_rate():
    assert _learning_rates(baseline_optimizer(O.sgd, "constant", 0.3, 4), 6) == [0.3] * 6
    with pytest.raises(ValueError, match=r"schedule must be one of \['constant', 'cosine'\]; got 'linear'"):
        baseline_optimizer(O.sgd, "linear", 0.3, 4)


def test_an_unknown_schedule_is_refused_at_load_naming_the_key():
    with pytest.raises(ConfigError, match=r"baselines.adam_cosine.schedule must be one of \('constant', 'cosine'\); "
                                          r"got 'cosin'"):
        build(load(RECIPE, ["baselines.adam_cosine.schedule=cosin"]))
    experiment = build(load(RECIPE, ["baselines.sgd.schedule=cosine"]))
    assert experiment.schedules["sgd"] == "cosine" and set(experiment.schedules.values()) <= set(SCHEDULES)


def test_the_strongest_baseline_is_the_lowest_finite_final_loss_at_each_horizon():
    constant = torch.tensor([4.0, 3.0, 2.0, 1.5, 1.0])  # the reference, one run of 2T = 4 steps
    diverged = torch.tensor([4.0, 1.0, float("nan"), float("nan"), float("nan")])
    learned = torch.tensor([4.0, 2.0, 1.2, 0.9, 0.5])
    cosine = {"T": torch.tensor([4.0, 2.5, 1.8]), "2T": torch.tensor([4.0, 2.8, 1.9, 1.4, 1.2])}
    curves = {label: {"adam": constant, "sgd": diverged, "adam_cosine": cosine[label], "mixture": learned}
              for label in ("T", "2T")}
    results = _horizon_results(curves, {"T": 2, "2T": 4}, "adam", ["adam", "sgd", "adam_cosine"])
    at_t, at_2t = results["T"], results["2T"]
    assert at_t["best_baseline"] == "adam_cosine" and at_t["best_baseline_final_loss"] == pytest.approx(1.8)
    assert at_t["reference_final_loss"] == 2.0
    assert at_t["optimizers"]["mixture"]["steps_to_reference_final"] == 1
    assert at_t["optimizers"]["mixture"]["steps_to_best_baseline_final"] == 2
    assert at_t["optimizers"]["adam"]["steps_to_best_baseline_final"] is None
    assert at_2t["best_baseline"] == "adam" and at_2t["best_baseline_final_loss"] == 1.0
    assert at_2t["optimizers"]["mixture"]["steps_to_best_baseline_final"] == 3
    assert at_2t["optimizers"]["adam_cosine"]["final_loss"] == pytest.approx(1.2)
    assert at_t["optimizers"]["mixture"]["steps_to_baseline_final"] == {"adam": 1, "sgd": None, "adam_cosine": 2}
    assert at_2t["optimizers"]["mixture"]["steps_to_baseline_final"] == {"adam": 3, "sgd": None, "adam_cosine": 2}
    table = format_table({"reference": "adam", "evaluation": {"seen": results}})
    assert "adam_cosine*" in table and "steps to best*" in table and "never" in table
