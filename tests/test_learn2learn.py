"""Meta-gradients of metaopt's MAML family equal learn2learn's (the reference a user would otherwise pick).

learn2learn adapts one task at a time (``clone`` + ``adapt``); metaopt batches the tasks. Both differentiate the
mean query loss over tasks with respect to the same module's parameters (and Meta-SGD's step sizes).
"""

import pytest
import torch
import torch.nn.functional as F

from metaopt.episodes import Episode
from metaopt.learners import FOMAML, MAML, MetaSGD
from metaopt.learners.maml import conv4
from metaopt.learners.mlp import mlp
from metaopt.tasks import Sinusoid

from conftest import generator

STEPS, LR = 3, 0.05


def learn2learn_meta_gradient(wrapper, episode, loss_fn, wrt):
    losses = []
    for t in range(episode.num_tasks):
        learner = wrapper.clone()
        for _ in range(STEPS):
            learner.adapt(loss_fn(learner(episode.x_support[t]), episode.y_support[t]))
        losses.append(loss_fn(learner(episode.x_query[t]), episode.y_query[t]))
    return torch.autograd.grad(torch.stack(losses).mean(), wrt)


def sinusoid_episode():
    return Sinusoid().sample(6, 10, 10, generator=generator(3))


@pytest.mark.parametrize("first_order", [False, True])
def test_maml_meta_gradient_equals_learn2learn(learn2learn, first_order):
    model = mlp(1, (40, 40), 1)
    episode = sinusoid_episode()
    ours = (FOMAML(model, STEPS, LR) if first_order else MAML(model, STEPS, LR)).loss(episode)
    expected = learn2learn_meta_gradient(learn2learn.algorithms.MAML(model, lr=LR, first_order=first_order),
                                         episode, F.mse_loss, list(model.parameters()))
    for got, want in zip(torch.autograd.grad(ours, list(model.parameters())), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_meta_sgd_gradients_for_weights_and_step_sizes_equal_learn2learn(learn2learn):
    model = mlp(1, (16,), 1)
    episode = sinusoid_episode()
    ours = MetaSGD(model, STEPS, LR)
    step_sizes = list(ours.learned_optimizer.lrs)
    theirs = learn2learn.algorithms.MetaSGD(model, lr=LR)
    got = torch.autograd.grad(ours.loss(episode), list(model.parameters()) + step_sizes)
    want = learn2learn_meta_gradient(theirs, episode, F.mse_loss, list(model.parameters()) + list(theirs.lrs))
    assert len(got) == len(want) == 2 * len(list(model.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_conv_maml_meta_gradient_equals_learn2learn(learn2learn):
    model = conv4(1, 4, 3, image_size=16)
    x = torch.randn(2, 3 * 3, 1, 16, 16, generator=generator(1))
    y = torch.arange(3).repeat(2, 3)
    episode = Episode(x[:, :3], y[:, :3], x[:, 3:], y[:, 3:], kind="classification", num_classes=3)
    ours = torch.autograd.grad(MAML(model, STEPS, LR).loss(episode), list(model.parameters()))
    want = learn2learn_meta_gradient(learn2learn.algorithms.MAML(model, lr=LR), episode, F.cross_entropy,
                                     list(model.parameters()))
    for g, w in zip(ours, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
