import pytest
import torch

from conftest import generator
from metaopt.learners import Transformer
from metaopt.learners.incontext import PrefixLearner
from metaopt.tasks import LinearRegression


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Transformer(x_dim=3, max_support=8, n_embd=32, n_layer=2, n_head=4).eval()


@pytest.fixture
def episode():
    return LinearRegression(3).sample(4, 8, 3, generator=generator())


def test_changing_a_later_example_leaves_earlier_predictions_unchanged(model, episode):
    before = model.predict_prefixes(episode)
    x = episode.x_support.clone()
    y = episode.y_support.clone()
    x[:, 5] += 3.0
    y[:, 5] -= 2.0
    after = model.predict_prefixes(episode.replace(x_support=x, y_support=y))
    # the prediction at position i sees examples < i and x_i: positions 0..5 are untouched by y_5,
    # positions 0..4 also by x_5
    torch.testing.assert_close(after[:, :5], before[:, :5])
    assert not torch.allclose(after[:, 6:], before[:, 6:])


def test_predictions_by_support_size_equal_rerunning_on_truncated_support(model, episode):
    ks = [0, 1, 4, 8]
    together = model.predict_by_support_size(episode, ks)
    assert together.shape == (4, 4, 3, 1)
    for i, k in enumerate(ks):
        torch.testing.assert_close(together[i], model(episode.take_support(k)), rtol=1e-5, atol=1e-5)


def test_queries_do_not_see_each_other(model, episode):
    before = model(episode)
    xq = episode.x_query.clone()
    xq[:, 1] = 10.0
    after = model(episode.replace(x_query=xq))
    torch.testing.assert_close(after[:, [0, 2]], before[:, [0, 2]])


def test_query_at_k_agrees_with_prefix_prediction(model, episode):
    """A query identical to support x_k, seen with k examples, is predicted like position k."""
    k = 5
    probe = episode.take_support(k).replace(x_query=episode.x_support[:, k : k + 1], y_query=episode.y_support[:, k : k + 1])
    torch.testing.assert_close(model(probe)[:, 0], model.predict_prefixes(episode)[:, k], rtol=1e-5, atol=1e-5)


def test_loss_averages_every_prefix_and_the_queries(model, episode):
    prefixes = model.predict_prefixes(episode)
    queries = model(episode)
    expected = torch.cat([(prefixes - episode.y_support) ** 2, (queries - episode.y_query) ** 2], dim=1).mean()
    torch.testing.assert_close(model.loss(episode), expected)


def test_layout_mask(model):
    """Support x1 y1 x2 y2, then a query for k = 0 and one for k = 2: the positions and mask the blocks get."""
    seen = {}
    model.pos_emb.register_forward_pre_hook(lambda _, args: seen.update(positions=args[0]))
    model.blocks[0].register_forward_pre_hook(lambda _, args: seen.update(mask=args[1]))
    model.predict_by_support_size(LinearRegression(3).sample(1, 2, 1, generator=generator()), [0, 2])
    positions, mask = seen["positions"], seen["mask"]
    assert positions.tolist() == [0, 1, 2, 3, 0, 4]
    assert mask[4].tolist() == [False, False, False, False, True, False]
    assert mask[5].tolist() == [True, True, True, True, False, True]
    assert mask[2].tolist() == [True, True, True, False, False, False]


def test_refuses_too_long_support_and_wrong_dims(model):
    with pytest.raises(ValueError, match="max_support=8"):
        model(LinearRegression(3).sample(2, 9, 1, generator=generator()))
    with pytest.raises(ValueError, match="x_dim=3"):
        model(LinearRegression(4).sample(2, 3, 1, generator=generator()))
    with pytest.raises(ValueError, match="divisible"):
        Transformer(x_dim=3, max_support=4, n_embd=30, n_head=4)


def test_is_a_prefix_learner_that_checks_support_sizes(model, episode):
    assert isinstance(model, PrefixLearner)
    with pytest.raises(ValueError, match="support_sizes"):
        model.predict_by_support_size(episode, [9])
