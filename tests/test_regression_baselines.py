"""Regression baselines against scikit-learn and numpy references."""

import numpy as np
import pytest
import torch
from sklearn.ensemble import GradientBoostingRegressor
from sklearn.linear_model import Lasso as SkLasso
from sklearn.neighbors import KNeighborsRegressor
from sklearn.tree import DecisionTreeRegressor

from conftest import generator
from metaopt.compare import compare
from metaopt.config import ConfigError, instantiate
from metaopt.pipelines import build, validate
from metaopt.learners import (
    AdaptiveRidge, Averaging, DecisionTreeBaseline, GradientBoostingBaseline, Lasso, MLPBaseline, NearestNeighbours,
    OracleRidge, Ridge, TunedAdaptiveRidge, TunedRidge,
)
from metaopt.tasks import DecisionTree, LinearDynamics, NoisyLinearRegression, ReluNet, SparseLinear


def double(ep):
    return ep.replace(**{f: getattr(ep, f).double() for f in ("x_support", "y_support", "x_query", "y_query")})


# ---------------------------------------------------------------------- Lasso
@pytest.mark.parametrize("support, alpha", [(5, 0.1), (30, 0.05), (30, 0.5)])
def test_lasso_matches_scikit_learn(support, alpha):
    ep = double(SparseLinear(10, nonzeros=3).sample(4, support, 3, generator=generator()))
    ep = ep.replace(y_support=ep.y_support + 0.1 * torch.randn(ep.y_support.shape, dtype=torch.float64))
    lasso = Lasso(alpha, max_sweeps=5000, tol=1e-12)
    w = lasso.fit(ep.x_support, ep.y_support)
    for t in range(4):
        ref = SkLasso(alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=100_000)
        ref.fit(ep.x_support[t].numpy(), ep.y_support[t, :, 0].numpy())
        np.testing.assert_allclose(w[t, :, 0].numpy(), ref.coef_, atol=1e-6)
    torch.testing.assert_close(lasso(ep), ep.x_query @ w)


def test_lasso_recovers_the_support_of_a_sparse_function():
    ep = SparseLinear(20, nonzeros=3).sample(30, 40, 1, generator=generator())
    w, true = Lasso(0.05).fit(ep.x_support, ep.y_support)[..., 0], ep.info["w"]
    assert (w[true.abs() > 0.5] != 0).all()  # every clearly non-zero weight is found
    assert (w[~ep.info["mask"]].abs() < 0.1).float().mean() > 0.99  # and almost nothing else


# ---------------------------------------------------------------------- k-NN and averaging
@pytest.mark.parametrize("support, k", [(10, 3), (2, 3), (7, 1)])
def test_nearest_neighbours_match_scikit_learn(support, k):
    ep = double(ReluNet(4).sample(5, support, 6, generator=generator()))
    pred = NearestNeighbours(k)(ep)
    for t in range(5):
        ref = KNeighborsRegressor(n_neighbors=min(k, support)).fit(ep.x_support[t].numpy(), ep.y_support[t].numpy())
        np.testing.assert_allclose(pred[t].numpy(), ref.predict(ep.x_query[t].numpy()), atol=1e-10)


def test_nearest_neighbours_handle_vector_targets_and_empty_support():
    ep = LinearDynamics(3).sample(4, 6, 2, generator=generator())
    assert NearestNeighbours(1)(ep).shape == (4, 2, 3)
    assert (NearestNeighbours(3)(ep.take_support(0)) == 0).all()


def test_averaging_is_the_mean_of_y_times_x():
    ep = SparseLinear(5).sample(3, 8, 2, generator=generator())
    w = (ep.y_support * ep.x_support).mean(1)  # [T, d]
    torch.testing.assert_close(Averaging()(ep)[..., 0], torch.einsum("tqd,td->tq", ep.x_query, w))
    assert (Averaging()(ep.take_support(0)) == 0).all()


# ---------------------------------------------------------------------- trees and boosting
@pytest.mark.parametrize(
    "learner, reference",
    [(DecisionTreeBaseline(max_depth=4), lambda: DecisionTreeRegressor(max_depth=4, random_state=0)),
     (GradientBoostingBaseline(n_estimators=20), lambda: GradientBoostingRegressor(n_estimators=20, random_state=0))],
)
def test_tree_baselines_match_scikit_learn(learner, reference):
    ep = double(DecisionTree(5, depth=3).sample(3, 25, 4, generator=generator()))
    pred = learner(ep)
    for t in range(3):
        ref = reference().fit(ep.x_support[t].numpy(), ep.y_support[t, :, 0].numpy())
        np.testing.assert_allclose(pred[t, :, 0].numpy(), ref.predict(ep.x_query[t].numpy()), atol=1e-10)
    assert (learner(ep.take_support(0)) == 0).all()


def test_greedy_tree_fits_trees_far_better_than_zero():
    ep = DecisionTree(5, depth=2).sample(40, 100, 20, generator=generator())
    error = (DecisionTreeBaseline()(ep) - ep.y_query).pow(2).mean()
    assert error < 0.3 * ep.y_query.pow(2).mean()


def test_gradient_boosting_takes_vector_targets():
    ep = LinearDynamics(2).sample(2, 8, 3, generator=generator())
    assert GradientBoostingBaseline(n_estimators=5)(ep).shape == (2, 3, 2)


# ---------------------------------------------------------------------- MLP trained per task
def test_mlp_baseline_lowers_its_training_loss_and_generalises_somewhat():
    torch.set_num_threads(1)  # tiny tensors: a second OpenMP thread only adds contention (1 ms vs up to 80 ms a step)
    ep = ReluNet(4, hidden=20).sample(16, 30, 20, generator=generator())
    mlp = MLPBaseline(hidden=32, steps=60, lr=2e-2)
    _, losses = mlp.fit(ep.x_support, ep.y_support)
    assert losses.shape == (60, 16)
    assert (losses[-1] < 0.2 * losses[0]).float().mean() > 0.9  # nearly every task fits its support
    with torch.no_grad():  # as compare calls it
        pred = mlp(ep)
    assert (pred - ep.y_query).pow(2).mean() < 0.6 * ep.y_query.pow(2).mean()
    short = MLPBaseline(hidden=8, steps=3)
    torch.testing.assert_close(short(ep), short(ep))  # seeded initialisation: reproducible
    assert not mlp.is_trainable and (mlp(ep.take_support(0)) == 0).all()


# ---------------------------------------------------------------------- ridge variants
def numpy_adaptive_ridge(x, y, xq, multiplier=1.0, cap=None):
    k, d = x.shape
    if k > d:
        w_ols = np.linalg.lstsq(x, y, rcond=None)[0]
        lam = multiplier * np.sum((y - x @ w_ols) ** 2) / (k - d)
        lam = lam if cap is None else min(lam, cap)
    else:
        lam = 0.0 if cap is None else cap
    return xq @ (np.linalg.pinv(x) @ y if lam == 0 else np.linalg.solve(x.T @ x + lam * np.eye(d), x.T @ y))


@pytest.mark.parametrize("support, multiplier, cap", [(25, 1.0, None), (25, 2.0, 3.0), (4, 1.0, None), (4, 1.0, 2.0)])
def test_adaptive_ridge_matches_a_numpy_reference(support, multiplier, cap):
    ep = double(NoisyLinearRegression(6, noise=[0.5, 3.0]).sample(4, support, 3, generator=generator()))
    pred = AdaptiveRidge(multiplier, cap)(ep)
    for t in range(4):
        expected = numpy_adaptive_ridge(ep.x_support[t].numpy(), ep.y_support[t].numpy(), ep.x_query[t].numpy(),
                                        multiplier, cap)
        np.testing.assert_allclose(pred[t].numpy(), expected, rtol=1e-6, atol=1e-8)


def test_adaptive_ridge_noise_estimate_tracks_each_tasks_noise():
    ep = NoisyLinearRegression(5, noise=[0.5, 2.0]).sample(400, 200, 1, generator=generator())
    estimate = AdaptiveRidge.noise_variance(ep.x_support, ep.y_support)
    ratio = estimate / ep.info["noise_std"].pow(2)  # σ̂²/σ² ~ χ²_{k-d} / (k - d): mean 1, std sqrt(2 / (k - d))
    assert abs(ratio.mean().item() - 1) < 0.03
    assert abs(ratio.std().item() / (2 / 195) ** 0.5 - 1) < 0.2


def test_tuned_ridge_finds_the_bayes_optimal_penalty_for_a_single_noise_level():
    # w ~ N(0, I) and noise σ = 1: the posterior mean is ridge with λ = σ² = 1
    ridge = TunedRidge(NoisyLinearRegression(5, noise=[1.0]), support=[10, 30], num_tasks=600)
    chosen = ridge.tune()
    assert set(chosen) == {10, 30} and all(0.3 <= lam <= 3.0 for lam in chosen.values())
    spec = {"_target_": "metaopt.tasks.NoisyLinearRegression", "dim": 5, "noise": [1.0]}
    from_recipe = instantiate({"_target_": "metaopt.learners.TunedRidge", "family": spec, "support": [10, 30],
                               "num_tasks": 600}, "learners.const_rr")  # the family arrives built, same tasks
    assert from_recipe.tune() == chosen
    with pytest.raises(ValueError, match="family must be a TaskFamily"):
        TunedRidge(spec)
    assert ridge.tuning.nearest(12) == 10 and ridge.tuning.nearest(25) == 30


def test_tuned_adaptive_ridge_is_at_least_as_good_as_its_grids_default_on_held_out_tasks():
    family = NoisyLinearRegression(5, noise=[0.5, 3.0])
    tuned = TunedAdaptiveRidge(family, support=20, num_tasks=600)
    multiplier, cap = tuned.tune()[20]
    ep = family.sample(2000, 20, 5, generator=generator(11))
    error = lambda learner: (learner(ep) - ep.y_query).pow(2).mean().item()  # noqa: E731
    assert error(tuned) <= 1.02 * error(AdaptiveRidge(1.0, 3.0))
    assert error(tuned) < error(Ridge(1.0))


def test_oracle_ridge_scores_zero_adjusted_loss_and_beats_every_other_ridge():
    family = NoisyLinearRegression(5, noise=[0.2, 3.0])
    learners = {"oracle": OracleRidge(), "adarr": AdaptiveRidge(), "constrr": TunedRidge(family, support=[3, 10],
                                                                                          num_tasks=500)}
    result = compare(learners, family, support_sizes=[3, 10], num_tasks=400, query=4, bootstrap=50, progress=False)
    assert result.metric == "adjusted_loss"
    assert all(abs(v) < 1e-4 for v in result.curves["oracle"].mean)
    assert all(v > 0 for name in ("adarr", "constrr") for v in result.curves[name].mean)
    with pytest.raises(ValueError, match="noise_std"):
        OracleRidge()(SparseLinear(3).sample(2, 4, 1))


# ---------------------------------------------------------------------- boundaries
@pytest.mark.parametrize(
    "make, fragment",
    [(lambda: Lasso(0.0), "alpha must be"), (lambda: Lasso(0.1, max_sweeps=0), "max_sweeps"),
     (lambda: NearestNeighbours(0), "k must be"), (lambda: MLPBaseline(steps=0), "steps must be"),
     (lambda: MLPBaseline(lr=-1.0), "lr must be"), (lambda: DecisionTreeBaseline(max_depth=0), "max_depth"),
     (lambda: GradientBoostingBaseline(n_estimators=0), "n_estimators"),
     (lambda: AdaptiveRidge(multiplier=-1.0), "multiplier"), (lambda: AdaptiveRidge(cap=-1.0), "cap"),
     (lambda: TunedRidge(SparseLinear(3), lams=[]), "lams"), (lambda: TunedRidge(SparseLinear(3), support=0), "support"),
     (lambda: TunedRidge({"dim": 3}), "_target_"), (lambda: TunedAdaptiveRidge(SparseLinear(3), caps=[]), "caps")],
)
def test_invalid_baseline_settings_are_refused(make, fragment):
    with pytest.raises(ValueError, match=fragment):
        make()


@pytest.mark.parametrize("target", ["Lasso", "NearestNeighbours", "Averaging", "DecisionTreeBaseline",
                                    "GradientBoostingBaseline", "MLPBaseline", "AdaptiveRidge", "OracleRidge"])
def test_regression_baselines_are_refused_on_boolean_families_at_recipe_load(target):
    raw = {"task": {"_target_": "metaopt.tasks.Conjunction", "n_bits": 5},
           "learners": {"baseline": {"_target_": f"metaopt.learners.{target}"}}}
    with pytest.raises(ConfigError, match="handles \\['regression'\\] episodes"):
        build(validate(raw))


@pytest.mark.parametrize("recipe", ["garg_function_classes", "garg_function_classes_trees",
                                    "garg_function_classes_relu", "noisy_regression"])
def test_regression_recipes_build(recipe):
    from metaopt.pipelines import load

    experiment = build(load(recipe))
    assert all(experiment.family.kind in learner.kinds for learner in experiment.learners.values())
    if recipe == "noisy_regression":  # the tuned ridges tune on the recipe's own task family
        assert experiment.learners["const_rr"].tuning.family.noise == (1.0, 3.0, 5.0)
