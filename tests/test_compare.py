import json

import numpy as np
import pytest
import torch

from metaopt.compare import compare, format_table, plot
from metaopt.kinds import CLASSIFICATION
from metaopt.learners import Elimination, GradientDescent, LeastSquares, Null, Ridge
from metaopt.metrics import bootstrap_band, prediction_similarity
from metaopt.tasks import Conjunction, LinearRegression


class ImplicitLeastSquares(LeastSquares):
    """Least squares labelled as an in-context learner, to check similarity against itself."""

    implicit = True


def test_every_learner_sees_the_same_episodes_and_errors_match_theory():
    family = LinearRegression(4)
    result = compare({"ls": LeastSquares(), "ridge": Ridge(1e-6)}, family, support_sizes=[0, 2, 4, 8],
                     num_tasks=400, query=2, seed=3, progress=False)
    ls = result.curves["ls"].mean
    # no support: predicting 0 costs the label variance d, normalised to 1
    assert abs(ls[0] - 1.0) < 0.15
    # noiseless and k >= d: exact recovery
    assert ls[2] < 1e-6 and ls[3] < 1e-6
    # min-norm interpolation with k < d keeps a (d - k)/d share of the error
    assert abs(ls[1] - 0.5) < 0.1
    # ridge with a tiny penalty is the same learner on the same episodes
    np.testing.assert_allclose(result.curves["ridge"].mean, ls, atol=1e-4)
    again = compare({"ls": LeastSquares()}, family, support_sizes=[0, 2, 4, 8], num_tasks=400, query=2, seed=3,
                    progress=False)
    assert again.curves["ls"].mean == ls


def test_bootstrap_band_matches_numpy_percentile_bootstrap():
    values = torch.rand(1, 300, generator=torch.Generator().manual_seed(0))
    low, high = bootstrap_band(values, resamples=4000, generator=torch.Generator().manual_seed(1))
    rng = np.random.default_rng(0)
    means = values[0].numpy()[rng.integers(0, 300, (4000, 300))].mean(1)
    assert abs(low.item() - np.percentile(means, 2.5)) < 0.004
    assert abs(high.item() - np.percentile(means, 97.5)) < 0.004
    assert low.item() < values.mean().item() < high.item()


def test_similarity_of_a_learner_with_itself_is_exact_and_of_a_scaled_copy_known():
    a = torch.randn(3, 10, 2, 1)
    sim = prediction_similarity(a, a)
    torch.testing.assert_close(sim["cosine"], torch.ones(3))
    torch.testing.assert_close(sim["mean_abs_diff"], torch.zeros(3))
    sim = prediction_similarity(a, -2 * a)
    torch.testing.assert_close(sim["cosine"], -torch.ones(3))
    torch.testing.assert_close(sim["mean_abs_diff"], 3 * a.flatten(1).abs().mean(1))


def test_classification_logits_are_compared_as_probabilities():
    """A per-query offset and a masked class (−1e9 where the other has probability ~0) change nothing."""
    logits = torch.randn(2, 4, 3, 5)
    logits[..., 4] = -30.0  # a class neither learner picks
    masked = logits + torch.randn(2, 4, 3, 1)
    masked[..., 4] = -1e9
    sim = prediction_similarity(CLASSIFICATION.comparable(logits), CLASSIFICATION.comparable(masked))
    torch.testing.assert_close(sim["cosine"], torch.ones(2))
    torch.testing.assert_close(sim["mean_abs_diff"], torch.zeros(2), atol=1e-6, rtol=0)  # float32 logits
    assert prediction_similarity(logits, masked)["mean_abs_diff"].min() > 1e7  # raw logits: meaningless


def test_similarity_pairs_implicit_with_explicit_learners():
    result = compare({"icl": ImplicitLeastSquares(), "ls": LeastSquares(), "gd": GradientDescent(1, 0.1)},
                     LinearRegression(3), support_sizes=[1, 3, 6], num_tasks=50, progress=False)
    assert set(result.similarity) == {"icl vs ls", "icl vs gd"}
    assert result.similarity["icl vs ls"]["cosine"] == pytest.approx([1, 1, 1], abs=1e-5)
    assert result.similarity["icl vs gd"]["cosine"][0] < 0.999


def test_claims_report_and_plot(tmp_path):
    result = compare({"ls": LeastSquares(), "gd": GradientDescent(5, 0.2)}, LinearRegression(3),
                     support_sizes=[0, 3, 6], num_tasks=100, progress=False,
                     claims=[{"text": "LS is exact at k=d", "learner": "ls", "k": 3, "below": 1e-5},
                             {"text": "GD is exact at k=d", "learner": "gd", "k": 3, "below": 1e-5}])
    assert [c.holds for c in result.claims] == [True, False]
    table = format_table(result)
    assert "LS is exact at k=d" in table and "DOES NOT HOLD" in table and "k=6" in table
    json.dumps(result.to_dict())  # serialisable as results.json
    figure = plot(result)
    figure.savefig(tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert len(figure.axes[0].lines) == 2


def test_relative_claims_follow_the_metric_direction():
    learners = {"ls": LeastSquares(), "gd": GradientDescent(5, 0.2)}
    result = compare(learners, LinearRegression(3), support_sizes=[6], num_tasks=50, progress=False,
                     claims=[{"text": "LS beats GD", "learner": "ls", "k": 6, "better_than": ["gd"]},
                             {"text": "GD beats LS", "learner": "gd", "k": 6, "better_than": ["ls"]}])
    assert [c.holds for c in result.claims] == [True, False]
    assert result.claims[0].others == {"gd": result.value("gd", 6)}
    assert "expected < gd's" in format_table(result)
    accuracy = compare({"e": Elimination(), "n": Null()}, Conjunction(6), support_sizes=[20],
                       num_tasks=50, progress=False,
                       claims=[{"text": "elimination beats chance", "learner": "e", "k": 20, "better_than": ["n"]}])
    assert accuracy.claims[0].holds and "expected > n's" in format_table(accuracy)
