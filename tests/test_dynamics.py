"""Fixed-batch loss probes and the averaging model (metaopt/analysis/trajectory.py), and the trajectories recipe."""

import json
import math

import pytest
import torch
from torch import nn

from metaopt.analysis import trajectory as T
from metaopt.cli import main
from metaopt.pipelines import build, load
from metaopt.testing import shrunk


def _embedded(z: torch.Tensor, n: int = 20, seed: int = 0) -> torch.Tensor:
    """Points in R^n whose centred coordinates live in a random ``z.shape[1]``-dimensional subspace."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(n, z.shape[1], generator=g, dtype=torch.float64))
    return torch.randn(n, generator=g, dtype=torch.float64) + z @ basis.T


def test_the_quadratic_fit_recovers_a_known_quadratic():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(200, 3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.3], dtype=torch.float64)
    a = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.5]], dtype=torch.float64)
    b = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    losses = torch.stack([1.0 + z @ b + 0.5 * ((z @ a) * z).sum(-1), 2.0 + 0.5 * ((z @ (3 * a)) * z).sum(-1)])
    fit = T.fit_quadratic(_embedded(z), losses, dims=3)
    assert fit.r2.min() > 1 - 1e-6
    torch.testing.assert_close(fit.fitted, losses.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fit.curvatures[0], torch.linalg.eigvalsh(a).float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fit.curvatures[1], torch.linalg.eigvalsh(3 * a).float(), rtol=1e-4, atol=1e-5)
    assert fit.explained == pytest.approx(1.0)
    assert fit.r2_linear[1] < 0.5  # a centred bowl is not linear


def test_the_quadratic_fit_does_not_call_a_quartic_quadratic():
    z = torch.linspace(-2, 2, 300, dtype=torch.float64).unsqueeze(1)
    fit = T.fit_quadratic(_embedded(z), (z[:, 0] ** 4 - 3 * z[:, 0] ** 2), dims=1)
    assert fit.r2[0] < 0.9
    with pytest.raises(ValueError, match="more points"):
        T.fit_quadratic(_embedded(z[:5]), torch.zeros(5), dims=3)
    with pytest.raises(ValueError, match="one loss per point"):
        T.fit_quadratic(_embedded(z), torch.zeros(2, 7), dims=1)


def test_one_large_step_equals_the_closed_form_on_least_squares():
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    w = model.weight.detach().clone().reshape(-1)
    lrs = [0.01, 0.1, 0.3, 1.0]
    probe = T.one_large_step(model, (x, y), nn.functional.mse_loss, lrs)
    residual = x @ w - y[:, 0]
    gradient = 2 * x.T @ residual / len(x)
    expected = [float(((x @ (w - lr * gradient) - y[:, 0]) ** 2).mean()) for lr in lrs]
    assert probe.losses == pytest.approx(expected, rel=1e-5)
    assert probe.before == pytest.approx(float((residual**2).mean()), rel=1e-6)
    assert probe.best == min(expected) and probe.best_lr == lrs[expected.index(min(expected))]
    torch.testing.assert_close(model.weight.detach().reshape(-1), w)


def test_batch_losses_leave_batch_norm_statistics_alone():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    before = model[1].running_mean.clone()
    batches = [(torch.randn(8, 3), torch.randint(2, (8,))) for _ in range(3)]
    losses = T.batch_losses(model, batches, nn.functional.cross_entropy)
    assert losses.shape == (3,)
    torch.testing.assert_close(model[1].running_mean, before)
    assert int(model[1].num_batches_tracked) == 0


def _simulate(alpha: float, steps: int = 400, chains: int = 20000):
    """The isotropic model: x_t = (1 - α) x_{t-1} + α ε_t with ε ~ N(0, 1), started at stationarity."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(chains, generator=g, dtype=torch.float64) * math.sqrt(T.stationary_variance(alpha))
    path = []
    for _ in range(steps):
        x = (1 - alpha) * x + alpha * torch.randn(chains, generator=g, dtype=torch.float64)
        path.append(x)
    return torch.stack(path)  # [steps, chains]


def test_the_averaging_variances_match_a_simulation_of_the_model():
    alpha, path = 0.2, _simulate(0.2)
    assert path[-1].var() == pytest.approx(T.stationary_variance(alpha), rel=0.03)
    decay, ema = 0.9, path[0]
    for x in path[1:]:
        ema = decay * ema + (1 - decay) * x
    # the EMA started at a stationary point: after 400 steps it has forgotten it (0.9**400)
    assert ema.var() == pytest.approx(T.averaging_variance(alpha, "ema", decay=decay), rel=0.03)
    two = (path[-1] + path[-1 - 7]) / 2
    assert two.var() == pytest.approx(T.averaging_variance(alpha, "two_point", delta=7), rel=0.03)
    swa = path[-1 - 3 * 29::3].mean(0)  # 30 iterates 3 apart
    assert swa.var() == pytest.approx(T.averaging_variance(alpha, "swa", every=3, count=30), rel=0.03)
    with pytest.raises(ValueError, match="kind must be"):
        T.averaging_variance(alpha, "polyak")


def test_matched_rates_closed_forms():
    v = T.stationary_variance(0.1)
    assert T.matched_rates(v, [v] * 5) == pytest.approx([0.1] * 5)  # the stationary spread keeps the rate
    # half the spread: the fastest descent (a running mean, 1/n) until it is reached, then 2v*/(1 + v*)
    target = T.averaging_variance(0.1, "two_point", delta=1000)
    rates = T.matched_rates(v, [target] * 60)
    assert rates[:3] == pytest.approx([1 / 20, 1 / 21, 1 / 22])
    assert rates[-10:] == pytest.approx([2 * target / (1 + target)] * 10)
    # the running mean of the batch minima (spread 1/n) is the rate 1/n
    n0 = 5
    assert T.matched_rates(1 / n0, [1 / (n0 + k) for k in range(1, 6)]) == pytest.approx(
        [1 / (n0 + k) for k in range(1, 6)], rel=1e-6)


def test_the_trajectories_recipe_runs_shrunk_and_reports_its_claims(tmp_path):
    config = load("training_trajectories")
    assert build(config).averagers
    assert main(["run", "training_trajectories", f"output_dir={tmp_path}", *shrunk("training_trajectories")]) == 0
    (run_dir,) = (tmp_path / "training_trajectories").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["final"]) == {"last", "ema", "swa", "two_point_far", "two_point_near"}
    assert set(results["matched"]) == {"ema", "swa", "two_point_far", "constant"}
    assert len(results["claims"]) == 8 and all({"text", "measured", "holds"} <= set(c) for c in results["claims"])
    # the constant-rate branch is the main run continued on the same batches: the same last iterate
    assert results["matched"]["constant"]["test_loss"] == pytest.approx(results["final"]["last"]["test_loss"])
    for figure in ("batch_losses", "test_curves", "one_large_step"):
        assert (run_dir / "figures" / f"{figure}.png").is_file()


def test_bad_trajectory_settings_are_refused():
    from metaopt.config import ConfigError

    with pytest.raises(ConfigError, match="branch_at must be below"):
        load("training_trajectories", ["train.branch_at=5000"])
    with pytest.raises(ConfigError, match="probes.start"):
        load("training_trajectories", ["probes.start=2000"])
    with pytest.raises(ConfigError, match="two_point_near must be below"):
        load("training_trajectories", ["averaging.two_point_near=400"])
