import csv
import io
import json
import logging

import numpy as np
import pytest
import torch

from metaopt.compare import (
    CSV_COLUMNS, Comparison, Curve, choose_columns, compare, format_csv, format_markdown, format_table, plot,
)
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
    series = [line.get_label() for line in figure.axes[0].lines if not line.get_label().startswith("_")
              and line.get_gid() is None]  # not the bands' edges, the reference lines or the clipping marks
    assert series == ["ls", "gd"]  # one line per learner


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


# ---------------------------------------------------------------------- tables: terminal, markdown, CSV
def quickstart_like(**options) -> Comparison:
    """The quickstart's shape: 12 support sizes, four learners (one in-context), a claim at k=10."""
    learners = {"icl": ImplicitLeastSquares(), "least_squares": LeastSquares(), "ridge": Ridge(0.5),
                "gd_50_steps": GradientDescent(50, 0.1)}
    claim = {"text": "Garg et al.: a trained transformer tracks least squares on linear functions (error at k=2d "
                     "well below 0.2)", "learner": "icl", "k": 10, "below": 0.2}
    return compare(learners, LinearRegression(5), support_sizes=range(12), num_tasks=64, bootstrap=50,
                   progress=False, claims=[claim], **options)


@pytest.mark.parametrize("width", [40, 60, 80, 100, 120])
def test_a_narrow_table_keeps_the_claims_k_and_never_wraps(width):
    table = format_table(quickstart_like(), width=width)
    lines = table.splitlines()
    if width >= 80:  # below, the three columns kept are wider than the terminal: kept all the same
        assert max(len(line) for line in lines) <= width
    header = next(line for line in lines if line.startswith("learner"))
    shown = [int(cell[2:]) for cell in header.split()[1:]]
    assert {0, 10, 11} <= set(shown) and shown == sorted(shown)  # the claim's k, the smallest and the largest
    assert f"{len(shown)} of 12 support sizes shown" in " ".join(lines)
    assert [int(cell[2:]) for cell in next(line for line in lines if line.startswith("pair")).split()[1:]] == shown


def test_a_wide_table_shows_every_k_and_the_columns_fill_the_width():
    result = quickstart_like()
    table = format_table(result, width=400)
    assert "support sizes shown" not in table and all(f"k={k}" in table for k in range(12))
    narrow, wider = (len(next(line for line in format_table(result, width=w).splitlines()
                              if line.startswith("learner")).split()) for w in (80, 120))
    assert narrow < wider  # more room, more columns


def test_columns_are_kept_then_spread():
    assert choose_columns(range(12), [7], lambda ks: True) == list(range(12))
    assert choose_columns(range(12), [7], lambda ks: len(ks) <= 3) == [0, 7, 11]
    five = choose_columns(range(12), [7], lambda ks: len(ks) <= 5)
    assert len(five) == 5 and {0, 7, 11} <= set(five) and 3 in five  # the middle of the widest gap
    assert choose_columns([0, 5], [5], lambda ks: False) == [0, 5]  # kept even when nothing fits


def test_markdown_and_csv_hold_the_numbers_of_results_json():
    result = quickstart_like()
    saved = json.loads(json.dumps(result.to_dict()))
    files = format_csv(result)
    rows = list(csv.DictReader(io.StringIO(files["results"])))
    assert len(rows) == 4 * 12 and list(rows[0]) == list(CSV_COLUMNS)
    for row in rows:
        curve, i = saved["curves"][row["learner"]], saved["support_sizes"].index(int(row["k"]))
        assert (float(row["mean"]), float(row["lower"]), float(row["upper"])) == (
            curve["mean"][i], curve["low"][i], curve["high"][i])
        assert row["implicit"] == str(curve["implicit"]) and int(row["tasks"]) == saved["num_tasks"]
    similarity = list(csv.DictReader(io.StringIO(files["similarity"])))
    assert len(similarity) == 3 * 12
    for row in similarity:
        sim, i = saved["similarity"][row["pair"]], saved["support_sizes"].index(int(row["k"]))
        assert float(row["cosine"]) == sim["cosine"][i] and float(row["mean_abs_diff"]) == sim["mean_abs_diff"][i]
    markdown = format_markdown(result, title="quickstart")
    for name, curve in saved["curves"].items():
        label = f"{name} (icl)" if curve["implicit"] else name
        cells = [f"{m:.4g} [{low:.4g}, {high:.4g}]" for m, low, high in zip(curve["mean"], curve["low"], curve["high"])]
        assert f"| {label} | " + " | ".join(cells) + " |" in markdown
    assert "| learner | " + " | ".join(f"k={k}" for k in range(12)) + " |" in markdown
    assert "- Garg et al.: a trained transformer" in markdown and "-> holds" in markdown


def test_the_similarity_header_names_what_is_compared():
    regression = format_table(quickstart_like(), width=100)
    assert "of predictions" in regression and "class probabilities" not in regression
    assert quickstart_like().kind == "regression"
    curves = {"icl": Curve([0.5], [0.4], [0.6], True), "proto": Curve([0.6], [0.5], [0.7], False)}
    classification = Comparison("accuracy", False, [5], 10, curves, {"icl vs proto": {"cosine": [0.9],
                                "mean_abs_diff": [0.1]}}, kind="classification")
    assert "of class probabilities" in format_table(classification)
    assert "of class probabilities" in format_markdown(classification)


def test_the_comparison_reports_progress_unless_told_not_to(caplog):
    learners = {"ls": LeastSquares(), "gd": GradientDescent(1, 0.1)}
    with caplog.at_level(logging.INFO, logger="metaopt.progress"):
        compare(learners, LinearRegression(3), support_sizes=[0, 3], num_tasks=40, chunk_size=10, progress=False)
        assert not caplog.records
        compare(learners, LinearRegression(3), support_sizes=[0, 3], num_tasks=40, chunk_size=10)
    assert "compare: 8 chunks in" in caplog.text  # no terminal under pytest: a log line instead of a bar
