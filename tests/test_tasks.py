import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import generator
from metaopt.episodes import Episode
from metaopt.tasks import LinearRegression


def test_same_generator_state_gives_same_episodes():
    family = LinearRegression(4, noise_std=0.1)
    a = family.sample(8, 5, 2, generator=generator(3))
    b = family.sample(8, 5, 2, generator=generator(3))
    c = family.sample(8, 5, 2, generator=generator(4))
    assert torch.equal(a.x_support, b.x_support) and torch.equal(a.y_query, b.y_query)
    assert not torch.equal(a.x_support, c.x_support)


def test_labels_follow_true_weights_without_noise():
    ep = LinearRegression(6).sample(10, 7, 3, generator=generator())
    w = ep.info["w"]
    assert w.shape == (10, 6)
    torch.testing.assert_close(ep.y_support[..., 0], torch.einsum("tsd,td->ts", ep.x_support, w))
    torch.testing.assert_close(ep.y_query[..., 0], torch.einsum("tsd,td->ts", ep.x_query, w))


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_label_variance_is_d_plus_noise(noise):
    d = 5
    ep = LinearRegression(d, noise_std=noise).sample(4000, 20, 1, generator=generator())
    var = ep.y_support.var().item()
    assert abs(var - (d + noise**2)) < 0.05 * (d + noise**2)


def test_uniform_inputs_range_and_scale():
    family = LinearRegression(10, x_dist="uniform", x_range=(-0.5, 0.5))
    ep = family.sample(500, 20, 1, generator=generator())
    assert ep.x_support.min() >= -0.5 and ep.x_support.max() <= 0.5
    assert math.isclose(family.error_scale, 10 / 12)
    assert abs(ep.y_support.pow(2).mean().item() - family.error_scale) < 0.05 * family.error_scale


@pytest.mark.parametrize(
    "kwargs, fragment",
    [({"dim": 0}, "dim must be an int >= 1"), ({"dim": 3, "noise_std": -1}, "noise_std must be a finite number >= 0"),
     ({"dim": 3, "x_dist": "cauchy"}, "x_dist must be one of"), ({"dim": 3, "x_range": (1, -1)}, "low < high")],
)
def test_invalid_parameters_are_refused(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        LinearRegression(**kwargs)


def test_invalid_sample_sizes_are_refused():
    with pytest.raises(ValueError, match="query must be an int >= 1"):
        LinearRegression(3).sample(2, 4, 0)


@settings(max_examples=25, deadline=None)
@given(
    dim=st.integers(1, 12), tasks=st.integers(1, 6), support=st.integers(0, 12), query=st.integers(1, 4),
    noise=st.floats(0, 2), x_dist=st.sampled_from(["normal", "uniform"]),
)
def test_any_valid_parameters_give_valid_episodes(dim, tasks, support, query, noise, x_dist):
    ep = LinearRegression(dim, noise_std=noise, x_dist=x_dist).sample(tasks, support, query, generator=generator())
    assert isinstance(ep, Episode)
    assert ep.x_support.shape == (tasks, support, dim) and ep.y_query.shape == (tasks, query, 1)
    assert torch.isfinite(ep.y_support).all()


def test_active_dims_zero_the_remaining_inputs_and_labels_follow():
    family = LinearRegression(4).with_active_dims(2)
    ep = family.sample(6, 5, 2, generator=generator())
    assert (ep.x_support[..., 2:] == 0).all() and (ep.x_support[..., :2] != 0).all()
    torch.testing.assert_close(ep.y_support[..., 0], torch.einsum("tsd,td->ts", ep.x_support, ep.info["w"]))
    assert LinearRegression(4).active_dims is None
    with pytest.raises(ValueError, match="active dims must be an int in"):
        LinearRegression(4).with_active_dims(5)
