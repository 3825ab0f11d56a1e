"""The optimizer pipeline (the specialized-optimizer experiment): a tiny end-to-end run, the learning-rate grid,
the environments, its recipe's `_target_` entries and their checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import optimizers as O
from metaopt.cli import main as cli_main
from metaopt.config import RECIPE_DIR, ConfigError
from metaopt.environments import digits_finetuning, load_digits_classes, tabular_environment
from metaopt.pipelines import build, load
from metaopt.pipelines.optimizer import steps_to_reach, tune_learning_rate
from metaopt.pipelines.optimizer_claims import OptimizerClaim, check_claims, claim_lines
from metaopt.testing import OPTIMIZER_TINY as TINY
from optimizers.environments import Environment

RECIPE = str(RECIPE_DIR / "specialized_optimizer.yaml")



def test_tiny_run_writes_results_and_figures(tmp_path, capsys):
    """Through `metaopt run`, which dispatches on the recipe's `pipeline: optimizer`; its claims are printed."""
    assert cli_main(["run", RECIPE, f"output_dir={tmp_path}", *TINY]) == 0
    (run_dir,) = (tmp_path / "specialized_optimizer").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert {p.name for p in (run_dir / "figures").iterdir()} == {
        "loss_curves.png", "coefficients.png", "coefficients_layerwise_mixture_uniform.png"}
    names = {"layerwise_mixture", "layerwise_mixture_uniform", "per_parameter_mlp"}  # weights, and checkpoints
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == names | {f"{n}.pt" for n in names}
    assert set(results["evaluation"]) == {"seen", "new_init", "unseen_wine"}
    seen_t = results["evaluation"]["seen"]["T"]
    assert seen_t["steps"] == 4 and results["evaluation"]["seen"]["2T"]["steps"] == 8
    assert set(seen_t["optimizers"]) == {"sgd", "momentum", "adam", "adam_cosine", *names}
    adam = seen_t["optimizers"]["adam"]
    assert results["reference"] == "adam"
    assert adam["final_loss"] == seen_t["reference_final_loss"] and adam["steps_to_reference_final"] <= 4
    assert results["tuned_learning_rates"]["adam"]["best"] in (0.01, 0.1)
    assert len(results["curves"]["seen"]["layerwise_mixture"]) == 9
    best = seen_t["best_baseline"]
    assert seen_t["best_baseline_final_loss"] == min(seen_t["optimizers"][b]["final_loss"]
                                                     for b in ("sgd", "momentum", "adam", "adam_cosine"))
    assert seen_t["optimizers"][best]["steps_to_best_baseline_final"] <= 4
    cosine = results["scheduled_curves"]["seen"]["adam_cosine"]  # one run per horizon, its schedule spanning it
    assert len(cosine["T"]) == 5 and cosine["2T"] == results["curves"]["seen"]["adam_cosine"]
    assert seen_t["optimizers"]["adam_cosine"]["final_loss"] == cosine["T"][4]
    records = results["claims"]  # the recipe's claims, one cell per environment, horizon and other optimizer
    assert [r["optimizer"] for r in records] == ["layerwise_mixture", "layerwise_mixture_uniform",
                                                 "layerwise_mixture", "layerwise_mixture"]
    assert len(records[0]["cells"]) == 3 * 2 * 2 and len(records[3]["cells"]) == 2 * 2
    out = capsys.readouterr().out
    assert "steps to adam" in out and "steps to best*" in out and f"{best}*" in out
    assert "claims:" in out and all(r["text"] in out for r in records)


def test_learning_rate_grid_picks_the_best_rate():
    """GD on ½‖w‖²: lr = 1 solves it in one step, smaller rates are slower, 2.5 diverges."""
    env = Environment(lambda p, x: x * p["w"], {"w": torch.ones(1, 3)}, torch.ones(1, 3), torch.zeros(1, 3),
                      horizon=3, batch_size=None, loss="mse")
    search = tune_learning_rate(env, lambda lr: O.sgd(lr), [0.1, 0.5, 1.0, 1.5, 2.5], steps=3, seeds=[0])
    assert search.best == 1.0 and search.scores[1.0] == 0.0
    assert search.scores[0.1] > search.scores[0.5] > search.scores[1.0] and search.scores[2.5] > search.scores[0.1]
    with pytest.raises(ValueError, match="grid is empty"):
        tune_learning_rate(env, lambda lr: O.sgd(lr), [], steps=3, seeds=[0])


def test_steps_to_reach():
    curve = torch.tensor([3.0, 2.0, 1.0, 1.5, 0.5])
    assert steps_to_reach(curve, 1.0) == 2 and steps_to_reach(curve, 0.1) is None


def test_environments_share_layer_names_and_learn():
    digits = digits_finetuning((8,), horizon=5, pretrain_steps=5)
    wine = tabular_environment("wine", (8,), horizon=5)
    g = torch.Generator().manual_seed(0)
    names = [set(env.init(lambda _: O.sgd(0.1), None, g).params) for env in (digits, wine)]
    assert names[0] == names[1] == {"0.weight", "0.bias", "1.weight", "1.bias"}
    curve = wine.curve(lambda _: O.adam(0.03), None, 20, g)
    assert curve[-1] < 0.5 * curve[0]
    x, y, x_test, _ = load_digits_classes([5, 6, 7, 8, 9])
    assert set(y.tolist()) == {0, 1, 2, 3, 4} and x.max() <= 1.0 and len(x_test) > 0


@pytest.mark.parametrize(
    "override, message",
    [("meta_train.estimator._target_=optimizers.Adahessian", "meta_train.estimator._target_"),
     ("meta_train.estimator._target_=optimizers.sgd", "must be an optimizers.GradientEstimator"),
     ("environments.unseen_wine.name=iris", "environments.unseen_wine: unknown data set 'iris'"),
     ("environment.horizon=0", "environments.seen: .*horizon must be"), ("meta_train.step=3", "step"),
     ("oops", "key=value"), ("tuning.reference=lion", "tuning.reference='lion' is not one of the baselines"),
     ("baselines.sgd.lrs=[]", "baselines.sgd.lrs must be a non-empty list"),
     ("learned.per_parameter_mlp.width=3", r"learned.per_parameter_mlp: unknown argument\(s\) \['width'\]"),
     ("baselines.adam.optimizer.beta=0.9", r"baselines.adam.optimizer: unknown argument\(s\) \['beta'\]"),
     ("evaluation.seeds=0", "evaluation.seeds must be an int >= 1"),
     ("environment.horizn=3", "environment.horizn is not used by any environment")],
)
def test_bad_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        build(load(RECIPE, [override]))


def test_bundled_recipe_loads_its_targets():
    config = load(RECIPE)
    assert config.meta_train.estimator._target_ == "optimizers.AntitheticES" and Path(RECIPE).is_file()
    experiment = build(config)
    assert list(experiment.environments) == ["seen", "new_init", "unseen_wine"]
    assert experiment.baselines["momentum"](0.1).init  # a partial optimizer: the learning rate comes last
    assert set(experiment.learned) == {"layerwise_mixture", "layerwise_mixture_uniform", "per_parameter_mlp"}
    assert experiment.schedules == {"sgd": "constant", "momentum": "constant", "adam": "constant",
                                    "adam_cosine": "cosine"}


def test_a_learned_optimizer_of_the_users_own_is_meta_trained(tmp_path):
    """Any nn.Module with an .optimizer factory is a learned optimizer: the pipeline builds it by _target_."""
    out = tmp_path / "runs"
    assert cli_main(["run", RECIPE, f"output_dir={out}", *TINY,
                     "learned.small_mlp={_target_: optimizers.PerParameterMLP, hidden: 4}"]) == 0
    (run_dir,) = (out / "specialized_optimizer").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["meta_training"]) == {"layerwise_mixture", "layerwise_mixture_uniform", "per_parameter_mlp",
                                             "small_mlp"}
    assert (run_dir / "checkpoints" / "small_mlp.pt").exists()
    assert "small_mlp" in results["evaluation"]["unseen_wine"]["2T"]["optimizers"]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _without_timings(results: dict) -> dict:
    return {**results, "meta_training": {name: {k: v for k, v in r.items() if k != "seconds"}
                                         for name, r in results["meta_training"].items()}}


def test_an_interrupted_optimizer_run_resumes_exactly(tmp_path, monkeypatch):
    """Killed during meta-training (after the checkpoint at meta-step 2): resume ends as an uninterrupted run."""
    from metaopt.log import Run

    steps = [*TINY, "meta_train.steps=5", "meta_train.checkpoint_every=2"]
    assert cli_main(["run", RECIPE, f"output_dir={tmp_path / 'whole'}", *steps]) == 0
    (whole,) = (tmp_path / "whole" / "specialized_optimizer").iterdir()
    real_log = Run.log

    def crash_at_meta_step_3(self, metrics, step=None):
        if metrics.get("layerwise_mixture/meta_step") == 3:
            raise RuntimeError("simulated crash")
        return real_log(self, metrics, step)

    monkeypatch.setattr(Run, "log", crash_at_meta_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli_main(["run", RECIPE, f"output_dir={tmp_path / 'cut'}", *steps])
    monkeypatch.undo()
    (cut,) = (tmp_path / "cut" / "specialized_optimizer").iterdir()
    assert [p.name for p in (cut / "checkpoints" / "layerwise_mixture").iterdir()] == ["step_00000002.pt"]
    assert cli_main(["resume", str(cut)]) == 0
    expected, resumed = (json.loads((d / "results.json").read_text()) for d in (whole, cut))
    assert _without_timings(resumed) == _without_timings(expected)
    assert _rows(cut) == _rows(whole)
    for name in ("layerwise_mixture", "per_parameter_mlp"):
        a, b = (torch.load(d / "checkpoints" / f"{name}.pt", weights_only=True) for d in (whole, cut))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_recomparing_an_optimizer_run_writes_its_own_folder_and_leaves_the_run_alone(tmp_path):
    out = tmp_path / "runs"
    assert cli_main(["run", RECIPE, f"output_dir={out}", *TINY]) == 0
    (run_dir,) = (out / "specialized_optimizer").iterdir()
    record = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert cli_main(["compare", str(run_dir), "evaluation.seeds=2"]) == 0
    assert {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*")
            if p.is_file() and "compare" not in p.relative_to(run_dir).parts} == record
    (again,) = (run_dir / "compare").iterdir()
    original, recompared = (json.loads((d / "results.json").read_text()) for d in (run_dir, again))
    assert recompared["meta_training"] == original["meta_training"]  # loaded, not trained again
    assert recompared["tuned_learning_rates"] == original["tuned_learning_rates"]
    assert "evaluation:\n  seeds: 2" in (again / "config.yaml").read_text()
    assert not (again / "checkpoints").exists()


def _evaluation(steps_mixture: int | None, loss_mixture: float, adam_steps: int | None = 10) -> dict:
    """One environment, one horizon: Adam needs ``adam_steps`` steps to its own final loss 0.5 (None: diverged)."""
    return {"seen": {"T": {"optimizers": {
        "adam": {"final_loss": 0.5, "steps_to_baseline_final": {"adam": adam_steps}},
        "mixture": {"final_loss": loss_mixture, "steps_to_baseline_final": {"adam": steps_mixture}}}}}}


@pytest.mark.parametrize("steps, loss, holds", [(8, 0.4, True), (9, 0.4, False), (None, 0.4, False),
                                                 (8, 0.5, False)])
def test_optimizer_claims_count_steps_and_compare_final_losses(steps, loss, holds):
    """20% fewer steps than Adam's 10 means at most 8; a lower final loss means strictly lower."""
    claim = OptimizerClaim(text="faster", optimizer="mixture", fewer_steps_than=["adam"], by=0.2,
                           lower_loss_than=["adam"])
    (record,) = check_claims([claim], _evaluation(steps, loss))
    assert record["holds"] is holds and record["verdict"] == ("holds" if holds else "does not hold")
    fewer, lower = record["cells"]
    assert fewer["threshold"] == 8.0 and fewer["other"] == 10 and fewer["holds"] is (steps is not None and steps <= 8)
    assert lower["holds"] is (loss < 0.5)
    lines = claim_lines([record], seeds=3)
    assert lines[0] == f"- faster -> {'holds' if holds else 'DOES NOT HOLD'} (means of 3 seeds)" and len(lines) == 3


def test_optimizer_claims_edge_cases():
    """Equal steps are not fewer (by = 0); a diverged baseline fails its cell instead of crashing; a claim
    restricted to a horizon or environment the results lack has no cell and does not hold."""
    faster = OptimizerClaim(optimizer="mixture", fewer_steps_than=["adam"])
    assert check_claims([faster], _evaluation(9, 0.4))[0]["holds"] is True
    assert check_claims([faster], _evaluation(10, 0.4))[0]["holds"] is False
    (diverged,) = check_claims([faster], _evaluation(3, 0.4, adam_steps=None))
    assert diverged["holds"] is False and diverged["cells"][0]["threshold"] is None
    assert "never reaches its own final loss" in claim_lines([diverged], seeds=1)[1]
    for where in ({"horizons": ["2T"]}, {"environments": ["other"]}):
        (record,) = check_claims([OptimizerClaim(optimizer="mixture", lower_loss_than=["adam"], **where)],
                                 _evaluation(8, 0.4))
        assert record["cells"] == [] and record["holds"] is False
        assert claim_lines([record], seeds=1)[0].endswith("no environment and horizon matched)")


@pytest.mark.parametrize(
    "claim, message",
    [("{optimizer: lion, lower_loss_than: [adam]}", r"claims\[0\].optimizer: 'lion' is not one of"),
     ("{optimizer: layerwise_mixture}", r"claims\[0\]: a claim needs fewer_steps_than or lower_loss_than"),
     ("{optimizer: layerwise_mixture, fewer_steps_than: [per_parameter_mlp]}",
      r"claims\[0\].fewer_steps_than: 'per_parameter_mlp' is not one of the recipe's baselines"),
     ("{optimizer: layerwise_mixture, lower_loss_than: [adam], horizons: [3T]}", r"claims\[0\].horizons: '3T'"),
     ("{optimizer: layerwise_mixture, lower_loss_than: [adam], environments: [mnist]}",
      r"claims\[0\].environments: 'mnist'"),
     ("{optimizer: layerwise_mixture, fewer_steps_than: [adam], by: 1.5}", r"claims\[0\].by must be a fraction"),
     ("{optimizer: adam, lower_loss_than: [adam]}", "compared with itself")],
)
def test_bad_optimizer_claims_are_refused_at_load(claim, message):
    with pytest.raises(ConfigError, match=message):
        load(RECIPE, [f"claims=[{claim}]"])
