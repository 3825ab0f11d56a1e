"""Meta-gradient estimators: ES and PES against autograd on a quadratic, truncation, antithetic baselines."""

from __future__ import annotations

import pytest
import torch

import optimizers as O
from optimizers.environments import Environment, mlp_apply, mlp_init
from optimizers.estimators import PES, AntitheticES, FullBackprop, GradientEstimate, TruncatedBackprop




X = torch.tensor([[2.0, 0.0], [0.5, 1.0]], dtype=torch.float64)
META = {"lr": torch.tensor(0.1, dtype=torch.float64), "momentum": torch.tensor(0.5, dtype=torch.float64)}


def _quadratic(horizon: int = 4, offset: float = 0.0) -> Environment:
    """``ℓ(w) = ½ mean_i (x_i · w)² + offset``, full batch: a quadratic inner problem."""

    def loss(out, y):
        return 0.5 * ((out - y) ** 2).sum(-1).mean() + offset

    def apply(params, x):
        return (x * params["w"]).sum(-1, keepdim=True)

    init = {"w": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    return Environment(apply, init, X, torch.zeros(2, 1, dtype=torch.float64), horizon=horizon, batch_size=None,
                       loss=loss)


def _sgd(meta):
    return O.sgd(meta["lr"], meta["momentum"])


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _relative_error(estimate: GradientEstimate, reference: GradientEstimate) -> float:
    diff = sum(((estimate.grads[k] - reference.grads[k]) ** 2).sum() for k in META)
    return float(torch.sqrt(diff / sum((reference.grads[k] ** 2).sum() for k in META)))


def test_full_backprop_matches_finite_differences():
    env = _quadratic()
    exact = FullBackprop().estimate(env, _sgd, META, generator=_gen())
    h = 1e-6
    for k in META:
        shifted = [{**META, k: META[k] + s * h} for s in (1, -1)]
        with torch.no_grad():
            plus, minus = (float(env.unroll(_sgd, m, 4, generator=_gen()).losses.mean()) for m in shifted)
        torch.testing.assert_close(float(exact.grads[k]), (plus - minus) / (2 * h), rtol=1e-6, atol=1e-9)
    assert exact.metrics["backprop_steps"] == 4 and exact.grads["lr"].abs() > 0.1


def test_es_agrees_with_autograd_on_a_quadratic():
    env = _quadratic()
    exact = FullBackprop().estimate(env, _sgd, META, generator=_gen())
    es = AntitheticES(sigma=0.01, pairs=1000).estimate(env, _sgd, META, generator=_gen(1))
    assert _relative_error(es, exact) < 0.12  # the docstring's tolerance; about 3 standard errors at 1000 pairs
    assert abs(es.loss - exact.loss) < 5e-3  # the pair average is the loss at φ up to O(σ²)


def test_pes_over_a_whole_run_agrees_with_autograd_on_a_quadratic():
    """The PES estimates of a run's truncations, averaged, estimate the gradient of the whole unroll."""
    env = _quadratic()
    exact = FullBackprop().estimate(env, _sgd, META, generator=_gen())
    pes, generator = PES(truncation=2, sigma=0.01, pairs=1000), _gen(2)
    parts = [pes.estimate(env, _sgd, META, generator=generator) for _ in range(2)]
    assert [p.metrics["inner_step"] for p in parts] == [2, 4]
    mean = GradientEstimate(sum(p.loss for p in parts) / 2, {k: sum(p.grads[k] for p in parts) / 2 for k in META})
    assert _relative_error(mean, exact) < 0.12
    truncated = TruncatedBackprop(truncation=2).estimate(env, _sgd, META, generator=_gen())
    assert _relative_error(truncated, exact) > 0.5  # what persistence fixes: the truncated gradient is biased
    pes.estimate(env, _sgd, META, generator=generator)
    assert pes.step == 2  # the run was done: a new one started


def test_truncated_equals_full_when_truncation_is_the_horizon():
    torch.manual_seed(0)
    mixture = O.LayerwiseMixture(list(mlp_init([4, 6, 3], _gen())), horizon=5,
                                 direction_kwargs={"adam": {"eps_root": 1e-16}, "rmsprop": {"eps_root": 1e-16}})
    with torch.no_grad():
        for p in mixture.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = _gen(3)
    env = Environment(mlp_apply, lambda gen: mlp_init([4, 6, 3], gen), torch.randn(32, 4, generator=g),
                      torch.randint(3, (32,), generator=g), horizon=5, batch_size=8)
    meta = dict(mixture.named_parameters())
    full = FullBackprop().estimate(env, mixture.optimizer, meta, generator=_gen(4))
    truncated = TruncatedBackprop(truncation=5).estimate(env, mixture.optimizer, meta, generator=_gen(4))
    shorter = TruncatedBackprop(truncation=2).estimate(env, mixture.optimizer, meta, generator=_gen(4))
    first_order = FullBackprop(first_order=True).estimate(env, mixture.optimizer, meta, generator=_gen(4))
    assert full.loss == pytest.approx(truncated.loss) == pytest.approx(shorter.loss) == pytest.approx(first_order.loss)
    for k in meta:
        torch.testing.assert_close(truncated.grads[k], full.grads[k], rtol=0, atol=0)
    assert any(not torch.allclose(shorter.grads[k], full.grads[k]) for k in meta)
    assert any(not torch.allclose(first_order.grads[k], full.grads[k]) for k in meta)


@pytest.mark.parametrize("make", [lambda: AntitheticES(sigma=0.05, pairs=4), lambda: PES(truncation=2, sigma=0.05,
                                                                                         pairs=4)])
def test_antithetic_pairs_cancel_a_constant_baseline(make):
    plain = make().estimate(_quadratic(), _sgd, META, generator=_gen(5))
    shifted = make().estimate(_quadratic(offset=100.0), _sgd, META, generator=_gen(5))
    for k in META:
        torch.testing.assert_close(shifted.grads[k], plain.grads[k], rtol=1e-6, atol=1e-9)
    assert shifted.loss == pytest.approx(plain.loss + 100.0)


def test_estimators_leave_meta_parameters_alone_and_return_every_key():
    meta = {k: v.clone() for k, v in META.items()}
    for estimator in (FullBackprop(), TruncatedBackprop(truncation=1), AntitheticES(pairs=2), PES(truncation=2,
                                                                                                     pairs=2)):
        result = estimator.estimate(_quadratic(), _sgd, meta, generator=_gen())
        assert set(result.grads) == set(META) and all(torch.isfinite(g).all() for g in result.grads.values())
        assert all(torch.equal(meta[k], META[k]) for k in META)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: AntitheticES(sigma=0.0), "AntitheticES: sigma must be a finite number > 0"),
        (lambda: AntitheticES(pairs=0), "AntitheticES: pairs must be an int >= 1"),
        (lambda: PES(truncation=0), "PES: truncation must be an int >= 1"),
        (lambda: TruncatedBackprop(4, truncation=5), "truncation must be <= steps"),
        (lambda: Environment(mlp_apply, {}, X, X, horizon=0), "Environment: horizon must be an int >= 1"),
        (lambda: Environment(mlp_apply, {}, X, X, horizon=3, loss="hinge"), "unknown loss"),
    ],
)
def test_invalid_settings_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_mixture_no_grad_fast_path_matches_the_differentiable_path():
    """ES, PES and evaluation run LayerwiseMixture under no_grad, where it takes a fused foreach path."""
    g = _gen(6)
    env = Environment(mlp_apply, lambda gen: mlp_init([4, 6, 3], gen, dtype=torch.float64),
                      torch.randn(32, 4, generator=g, dtype=torch.float64), torch.randint(3, (32,), generator=g),
                      horizon=6, batch_size=8)
    torch.manual_seed(0)
    mixture = O.LayerwiseMixture({"a": ["0.weight", "0.bias"], "b": ["1.weight", "1.bias"]}, horizon=6,
                                 direction_kwargs={"adam": {"eps_root": 1e-16, "b1": 0.8}}).double()
    with torch.no_grad():
        for p in mixture.parameters():
            p.add_(0.3 * torch.randn_like(p))
    with torch.no_grad():
        fast = env.unroll(mixture.optimizer, None, 6, generator=_gen(7))
    reference = env.unroll(mixture.optimizer, None, 6, generator=_gen(7))
    torch.testing.assert_close(fast.losses, reference.losses.detach(), rtol=1e-12, atol=1e-14)
    for k, v in reference.state.params.items():
        torch.testing.assert_close(fast.state.params[k], v.detach(), rtol=1e-12, atol=1e-14)
    assert [c.item() for c in fast.state.opt_state.directions[2].count.values()] == [6] * 4  # per parameter
