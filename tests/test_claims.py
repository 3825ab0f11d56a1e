"""Recipe claims: significance on a paired bootstrap, relative_to / within / better_by, analysis paths, load-time
checks, and old results.json files without the newer claim fields."""

import json
import math

import numpy as np
import pytest
import torch
import yaml

from metaopt.aggregate import aggregate, format_group
from metaopt.compare import (
    ClaimSpec, Comparison, Curve, _claim_lines, check_claim, claim_line, compare, paired_bootstrap,
)
from metaopt.config import ConfigError
from metaopt.learners import GradientDescent, LeastSquares, Transformer
from metaopt.pipelines import load
from metaopt.report import make_report
from metaopt.tasks import LinearRegression
from metaopt.testing import TINY

T = 200


def _comparison(scores, lower_is_better=True, analysis=None):
    """A one-k comparison (k=5) whose curves are the means of per-task ``scores`` ``{name: [T]}``."""
    scores = {name: torch.as_tensor(s, dtype=torch.float64).reshape(1, -1) for name, s in scores.items()}
    curves = {name: Curve(s.mean(-1).tolist(), [0.0], [0.0], False) for name, s in scores.items()}
    metric = "mse" if lower_is_better else "accuracy"
    return Comparison(metric, lower_is_better, [5], T, curves, analysis=analysis or {}), scores


def _base(seed=0):
    return torch.rand(T, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _noise(seed=1):
    noise = torch.randn(T, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return noise - noise.mean()


# ---------------------------------------------------------------------- significance
def test_ordered_means_whose_paired_difference_is_noise_are_not_significant():
    base = _base()
    comparison, scores = _comparison({"a": base, "b": base + _noise() + 0.01})  # a lower by 0.01 exactly
    claim = check_claim(comparison, {"text": "a beats b", "learner": "a", "k": 5, "better_than": ["b"]}, scores)
    assert claim.measured < claim.others["b"]
    assert claim.verdict == "not significant" and claim.holds is False
    (record,) = claim.comparisons
    assert record["difference"] == pytest.approx(-0.01) and record["ordered"] and not record["holds"]
    assert record["low"] < 0 < record["high"]
    comparison.claims = [claim]
    (_, line), = _claim_lines(comparison)
    assert "-> not significant (difference -0.01, 95% interval [" in line


def test_a_clear_difference_holds_and_the_wrong_order_does_not():
    base = _base()
    comparison, scores = _comparison({"a": base, "b": base + 0.5 + 0.1 * _noise(), "c": base - 0.2})
    claim = check_claim(comparison, {"learner": "a", "k": 5, "better_than": ["b"]}, scores)
    assert claim.holds and claim.verdict == "holds" and claim.comparisons[0]["high"] < 0
    wrong = check_claim(comparison, {"learner": "a", "k": 5, "better_than": ["b", "c"]}, scores)
    assert wrong.verdict == "does not hold" and [c["ordered"] for c in wrong.comparisons] == [True, False]
    comparison.claims = [wrong]
    assert "-> DOES NOT HOLD (vs b: difference -0.5" in _claim_lines(comparison)[0][1]


def test_higher_is_better_flips_the_side():
    base = _base()
    comparison, scores = _comparison({"a": base + 0.3, "b": base}, lower_is_better=False)
    assert check_claim(comparison, {"learner": "a", "k": 5, "better_than": ["b"]}, scores).holds
    assert not check_claim(comparison, {"learner": "b", "k": 5, "better_than": ["a"]}, scores).holds


def test_the_paired_interval_against_a_slow_loop_over_resamples():
    a, b = _base(), _base(2) + 0.1 * _noise()
    comparison, scores = _comparison({"a": a, "b": b})
    resamples, seed = 300, 7
    record = check_claim(comparison, {"learner": "a", "k": 5, "better_than": ["b"]}, scores,
                         resamples=resamples, seed=seed).comparisons[0]
    # the documented draw (resamples x T task indices from a generator seeded with ``seed``), one resample at a time
    index = torch.randint(T, (resamples, T), generator=torch.Generator().manual_seed(seed)).numpy()
    an, bn = a.numpy(), b.numpy()
    differences = [np.mean([an[i] - bn[i] for i in row]) for row in index]
    assert (record["low"], record["high"]) == pytest.approx(tuple(np.quantile(differences, [0.025, 0.975])))
    # and an independent bootstrap (numpy's generator, many resamples) agrees to sampling error
    rng = np.random.default_rng(0)
    independent = [np.mean(an[rows] - bn[rows]) for rows in rng.integers(0, T, size=(4000, T))]
    ours = check_claim(comparison, {"learner": "a", "k": 5, "better_than": ["b"]}, scores,
                       resamples=4000).comparisons[0]
    width = ours["high"] - ours["low"]
    assert np.quantile(independent, [0.025, 0.975]) == pytest.approx([ours["low"], ours["high"]], abs=0.05 * width)
    with pytest.raises(ValueError, match="same N"):
        paired_bootstrap(a, b[:-1])


# ---------------------------------------------------------------------- relative_to: within and better_by
def test_within_and_better_by_against_hand_computed_numbers():
    b = 1.0 + _base()
    comparison, scores = _comparison({"a": 1.03 * b, "b": b, "c": b - 0.2})
    # a = 1.03 b task by task: every resample's relative difference is 0.03, so the interval is [0.03, 0.03]
    close = check_claim(comparison, {"learner": "a", "k": 5, "relative_to": "b", "within": 0.05}, scores)
    (record,) = close.comparisons
    assert close.holds and record["test"] == "within" and record["threshold"] == 0.05
    assert (record["difference"], record["low"], record["high"]) == pytest.approx((0.03, 0.03, 0.03))
    assert not check_claim(comparison, {"learner": "a", "k": 5, "relative_to": "b", "within": 0.02}, scores).holds
    # c = b − 0.2 task by task: c beats b by 0.2 (lower is better), so by more than 0.1 and not by more than 0.3
    by = check_claim(comparison, {"learner": "c", "k": 5, "relative_to": "b", "better_by": 0.1}, scores)
    assert by.holds and by.comparisons[0]["difference"] == pytest.approx(-0.2)
    assert check_claim(comparison, {"learner": "c", "k": 5, "relative_to": "b", "better_by": 0.3},
                       scores).verdict == "does not hold"
    both = check_claim(comparison, {"learner": "c", "k": 5, "relative_to": "b", "better_by": 0.1, "within": 0.5},
                       scores)
    assert both.holds and [r["test"] for r in both.comparisons] == ["better_by", "within"]
    comparison.claims = [close, by]
    lines = [line for _, line in _claim_lines(comparison)]
    assert "expected within 5% of b's" in lines[0] and "relative difference 0.03" in lines[0]
    assert "by more than 0.1) -> holds (difference -0.2" in lines[1]


def test_within_on_noise_is_not_significant():
    b = 1.0 + _base()
    comparison, scores = _comparison({"a": b + 0.5 * _noise() + 0.01, "b": b})
    claim = check_claim(comparison, {"learner": "a", "k": 5, "relative_to": "b", "within": 0.02}, scores)
    assert claim.comparisons[0]["ordered"] and claim.verdict == "not significant"


# ---------------------------------------------------------------------- analysis paths
@pytest.fixture(scope="module")
def analysed():
    torch.manual_seed(0)
    learners = {"transformer": Transformer(x_dim=2, max_support=4, n_embd=8, n_layer=1, n_head=2),
                "least_squares": LeastSquares(), "gd": GradientDescent(steps=2, lr=0.1)}
    claims = [
        {"text": "cosine", "analysis": "sensitivity/transformer vs least_squares/cosine", "k": 4, "above": -2.0},
        {"text": "closer to ls", "analysis": "spd_ilwd/transformer vs least_squares/spd", "k": 4,
         "better_than": ["spd_ilwd/transformer vs gd/spd"], "direction": "lower"},
        {"text": "ls beats gd", "learner": "least_squares", "k": 4, "relative_to": "gd", "better_by": 0.0},
    ]
    return compare(learners, LinearRegression(dim=2), support_sizes=[0, 2, 4], num_tasks=16, bootstrap=50,
                   claims=claims, progress=False, analysis=[{"name": "sensitivity", "num_tasks": 8},
                                                            {"name": "spd_ilwd", "num_tasks": 8}])


def test_analysis_claims_read_the_analysis_results(analysed):
    cosine, closer, learner = analysed.claims
    sensitivity = analysed.analysis["sensitivity"]["transformer vs least_squares"]
    assert cosine.measured == sensitivity["cosine"][2] and cosine.holds
    spd = analysed.analysis["spd_ilwd"]
    assert closer.measured == spd["transformer vs least_squares"]["spd"][2]
    assert closer.others == {"spd_ilwd/transformer vs gd/spd": spd["transformer vs gd"]["spd"][2]}
    assert closer.holds == (closer.measured < closer.others["spd_ilwd/transformer vs gd/spd"])
    assert closer.comparisons[0]["low"] is None  # an analysis records its mean over tasks only
    assert learner.comparisons[0]["low"] is not None
    lines = dict(_claim_lines(analysed))
    assert lines["cosine"].startswith("sensitivity/transformer vs least_squares/cosine at k=4: measured")
    assert "means only" in lines["closer to ls"]
    stored = json.loads(json.dumps(analysed.to_dict()))["claims"]
    assert stored[1]["comparisons"][0]["against"] == "spd_ilwd/transformer vs gd/spd"
    assert [c["verdict"] for c in stored] == [c.verdict for c in analysed.claims]


def test_a_missing_analysis_path_names_the_claim_at_check_time(analysed):
    with pytest.raises(KeyError, match="claim 'typo'.*has no 'cosin'"):
        check_claim(analysed, {"text": "typo", "analysis": "sensitivity/transformer vs gd/cosin", "k": 4,
                               "above": 0.5})
    with pytest.raises(KeyError, match="claim 'absent'.*has no 'best_gd'"):
        check_claim(analysed, {"text": "absent", "analysis": "best_gd/transformer/lr", "k": 4, "above": 0.5})


def test_an_analysis_value_that_was_not_measured_does_not_hold(analysed):
    analysed.analysis["dual_form"] = {"transformer": {"trained": {"rec2ftp": None, "sim_am_mean": 0.5}}}
    try:
        claim = check_claim(analysed, {"text": "unmeasured", "analysis": "dual_form/transformer/trained/rec2ftp",
                                       "k": 4, "above": 0.5})
        assert math.isnan(claim.measured) and claim.verdict == "does not hold"
        claim = check_claim(analysed, {"text": "against unmeasured", "k": 4, "direction": "higher",
                                       "analysis": "dual_form/transformer/trained/sim_am_mean",
                                       "better_than": ["dual_form/transformer/trained/rec2ftp"]})
        assert claim.verdict == "does not hold"
    finally:
        del analysed.analysis["dual_form"]


# ---------------------------------------------------------------------- load-time validation
@pytest.mark.parametrize("claim, message", [
    ({"learner": "least_squares", "k": 2, "relative_to": "nope", "within": 0.1},
     r"claims\[0\]\.relative_to='nope' is not one of the learners"),
    ({"learner": "least_squares", "k": 2, "within": 0.1}, r"claims\[0\]\.within needs relative_to"),
    ({"learner": "least_squares", "k": 2, "better_by": 0.1}, r"claims\[0\]\.better_by needs relative_to"),
    ({"learner": "least_squares", "k": 2, "relative_to": "gd", "better_by": -0.1},
     r"claims\[0\]\.better_by must be a number >= 0; got -0.1"),
    ({"learner": "least_squares", "k": 2, "relative_to": "gd", "within": -1},
     r"claims\[0\]\.within must be a number >= 0"),
    ({"learner": "least_squares", "k": 2, "relative_to": "gd"}, r"claims\[0\]\.relative_to='gd' needs within"),
    ({"learner": "least_squares", "k": 2, "better_than": ["gd", "ghost"]},
     r"claims\[0\]\.better_than\[1\]='ghost' is not one of the learners"),
    ({"analysis": "sensitivity/transformer vs gd/cosine", "k": 2, "above": 0.9},
     r"claims\[0\]\.analysis='sensitivity/transformer vs gd/cosine': analysis 'sensitivity' is not one the recipe runs"),
    ({"analysis": "spd_ilwd/transformer vs ridge/spd", "k": 2, "below": 0.1},
     r"claims\[0\]\.analysis='spd_ilwd/transformer vs ridge/spd': 'ridge' is not one of the learners"),
    ({"analysis": "spd_ilwd/transformer", "k": 2, "below": 0.1}, r"claims\[0\]\.analysis='spd_ilwd/transformer' "
                                                                 "must be a path"),
    ({"analysis": "spd_ilwd/transformer vs gd/spd", "k": 2, "better_than": ["spd_ilwd/transformer vs gd/ilwd"]},
     r"claims\[0\]\.direction: an analysis claim"),
    ({"learner": "gd", "k": 2, "below": 1.0, "direction": "lower"}, r"claims\[0\]\.direction applies to analysis"),
    ({"k": 2, "below": 1.0}, r"claims\[0\]\.learner or analysis"),
])
def test_bad_claims_are_refused_at_load_naming_the_key(tmp_path, claim, message):
    recipe = {**TINY, "compare": {**TINY["compare"], "analysis": ["spd_ilwd"]}, "claims": [claim]}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match=message):
        load(str(path), [f"output_dir={tmp_path / 'runs'}"])
    assert not (tmp_path / "runs").exists()


def test_good_new_claims_load():
    spec = ClaimSpec(analysis="spd_ilwd/transformer vs gd/spd", k=2, relative_to="spd_ilwd/transformer vs gd/ilwd",
                     within=0.1)
    spec.check_names(["transformer", "gd"], [0, 2], ["spd_ilwd"])
    spec.check_names(["transformer", "gd"], [0, 2])  # analyses unknown here: the names are checked at run time


# ---------------------------------------------------------------------- old results.json files
OLD = {"metric": "normalized_error", "lower_is_better": True, "support_sizes": [0, 5], "num_tasks": 10,
       "curves": {"a": {"mean": [1.0, 0.2], "low": [0.9, 0.1], "high": [1.1, 0.3], "implicit": True},
                  "b": {"mean": [1.0, 0.5], "low": [0.9, 0.4], "high": [1.1, 0.6], "implicit": False}},
       "claims": [{"text": "a beats b at 5", "learner": "a", "k": 5, "below": None, "above": None,
                   "better_than": ["b"], "measured": 0.2, "others": {"b": 0.5}, "holds": True}]}


def test_old_results_without_the_new_claim_fields_still_aggregate_and_report(tmp_path):
    alone = aggregate("g", {}, ["0"], ["p0"], [OLD])
    assert alone.claims[0]["holds"] is True and alone.claims[0]["comparisons"] == []
    assert "a at k=5: measured 0.2000 (expected < b's 0.5000) -> holds; holds for 1 of 1 seeds" in format_group(alone)
    second = json.loads(json.dumps(OLD))
    second["curves"]["a"]["mean"] = [1.0, 0.3]
    two = aggregate("g", {}, ["0", "1"], ["p0", "p1"], [OLD, second])
    (claim,) = two.claims  # across two seeds, paired on the seeds: both have a below b, [min, max] excludes 0
    assert claim["holds"] and claim["comparisons"][0]["high"] == pytest.approx(-0.2)
    assert claim_line(OLD["claims"][0], True).endswith("-> holds")
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(OLD))
    report = make_report([run], out=tmp_path / "report")
    assert "a" in report.markdown
