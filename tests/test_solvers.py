import numpy as np
import pytest
import torch

from conftest import generator
from metaopt.learners import GradientDescent, LeastSquares, Ridge
from metaopt.tasks import LinearRegression


@pytest.mark.parametrize("support", [0, 2, 4, 6, 20])
def test_least_squares_matches_numpy_min_norm(support):
    ep = LinearRegression(6, noise_std=0.3).sample(5, support, 3, generator=generator())
    ep = ep.replace(x_support=torch.randn(5, support, 6, dtype=torch.float64),  # one dtype: all of them at once
                    y_support=torch.randn(5, support, 1, dtype=torch.float64), x_query=ep.x_query.double(),
                    y_query=ep.y_query.double())
    pred = LeastSquares()(ep)
    for t in range(5):
        if support == 0:
            w = np.zeros((6, 1))
        else:
            w = np.linalg.lstsq(ep.x_support[t].numpy(), ep.y_support[t].numpy(), rcond=None)[0]
        np.testing.assert_allclose(pred[t].numpy(), ep.x_query[t].numpy() @ w, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("support", [0, 3, 12])
def test_ridge_matches_closed_form(support):
    lam = 0.7
    ep = LinearRegression(5, noise_std=0.5).sample(4, support, 3, generator=generator())
    pred = Ridge(lam)(ep)
    for t in range(4):
        X = ep.x_support[t].double().numpy()
        y = ep.y_support[t].double().numpy()
        w = np.linalg.solve(X.T @ X + lam * np.eye(5), X.T @ y)
        np.testing.assert_allclose(pred[t].double().numpy(), ep.x_query[t].double().numpy() @ w, rtol=1e-4, atol=1e-5)


def test_ridge_refuses_nonpositive_penalty():
    with pytest.raises(ValueError, match="lam must be a finite number > 0"):
        Ridge(0.0)


def test_gradient_descent_matches_a_per_task_loop():
    ep = LinearRegression(4).sample(3, 8, 2, generator=generator())
    gd = GradientDescent(steps=3, lr=0.2)
    pred = gd(ep)
    for t in range(3):
        X, y = ep.x_support[t], ep.y_support[t]
        w = torch.zeros(4, 1)
        for _ in range(3):
            grad = X.T @ (X @ w - y) / 8  # gradient of 0.5 * mean squared error
            w = w - 0.2 * grad
        torch.testing.assert_close(pred[t], ep.x_query[t] @ w)


def test_gradient_descent_converges_to_least_squares_on_well_conditioned_tasks():
    ep = LinearRegression(5, noise_std=0.2).sample(16, 200, 4, generator=generator())
    gd = GradientDescent(steps=200, lr=0.5)(ep)
    ls = LeastSquares()(ep)
    torch.testing.assert_close(gd, ls, rtol=1e-4, atol=1e-4)


def test_gradient_descent_step_size_is_differentiable_when_learned():
    ep = LinearRegression(4).sample(8, 6, 2, generator=generator())
    gd = GradientDescent(steps=2, lr=0.1, learn_lr=True)
    assert gd.is_trainable and not GradientDescent(steps=2).is_trainable
    gd.loss(ep).backward()
    assert gd.lr.grad is not None and gd.lr.grad.abs() > 0


def test_solvers_refuse_other_episode_kinds():
    x = torch.randn(2, 3, 4)
    y = torch.randint(0, 2, (2, 3))
    from metaopt.episodes import Episode

    ep = Episode(x, y, x, y, kind="classification", num_classes=2)
    with pytest.raises(ValueError, match="handles episodes of kind"):
        LeastSquares()(ep)
