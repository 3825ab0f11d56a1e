"""InnerLoop: the func backend against the higher reference, strategies against each other, GD equivalence."""

import logging
from types import SimpleNamespace

import higher
import pytest
import torch
from torch import nn

from metaopt.episodes import Episode
from metaopt.learners import GradientDescent, InnerLoop
from metaopt.learners.maml import conv4
from metaopt.learners.mlp import mlp
from metaopt.runtime import compile_loss
from metaopt.tasks import LinearRegression, Sinusoid
from optimizers import LayerwiseMixture, adam, sgd


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def sinusoid_episode(tasks=3, support=6, query=4, dtype=torch.float64, seed=0):
    episode = Sinusoid().sample(tasks, support, query, generator=torch.Generator().manual_seed(seed))
    return episode.replace(**{k: getattr(episode, k).to(dtype)
                              for k in ("x_support", "y_support", "x_query", "y_query")})


def small_mlp(seed=1):
    torch.manual_seed(seed)
    return mlp(1, (8, 8), 1).double()


def meta_gradient(learner, episode):
    loss = learner.loss(episode)
    grads = torch.autograd.grad(loss, [p for p in learner.parameters() if p.requires_grad])
    return loss.detach(), torch.cat([g.flatten() for g in grads])


def _conv_episode() -> tuple[nn.Module, Episode]:
    torch.manual_seed(0)
    net = conv4(in_channels=1, channels=4, out_features=3, image_size=16).double()
    x = torch.randn(2, 6, 1, 16, 16, dtype=torch.float64)
    y = torch.arange(3).repeat(2, 2)
    return net, Episode(x[:, :3], y[:, :3], x[:, 3:], y[:, 3:], kind="classification", num_classes=3)


OPTIMIZERS = {"sgd": lambda: sgd(0.05), "adam": lambda: adam(0.05, eps_root=1e-16)}
MODES = {"full": {}, "first_order": {"first_order": True}, "truncated": {"truncate": 1}}


@pytest.mark.parametrize("strategy", ["batched", "vmap", "loop"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_meta_gradient_equals_higher(strategy, mode, opt):
    episode = sinusoid_episode()
    ours = InnerLoop(small_mlp(), OPTIMIZERS[opt](), 3, strategy=strategy, **MODES[mode])
    reference = InnerLoop(small_mlp(), OPTIMIZERS[opt](), 3, backend="higher", **MODES[mode])
    loss, grad = meta_gradient(ours, episode)
    ref_loss, ref_grad = meta_gradient(reference, episode)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_modes_give_different_meta_gradients():
    """First-order and truncation really drop second-order terms (else the equality tests prove little)."""
    episode = sinusoid_episode()
    grads = {mode: meta_gradient(InnerLoop(small_mlp(), sgd(0.1), 3, **kw), episode)[1] for mode, kw in MODES.items()}
    assert not torch.allclose(grads["full"], grads["first_order"], atol=1e-6)
    assert not torch.allclose(grads["full"], grads["truncated"], atol=1e-6)
    assert not torch.allclose(grads["truncated"], grads["first_order"], atol=1e-6)
    no_truncation = meta_gradient(InnerLoop(small_mlp(), sgd(0.1), 3, truncate=3), episode)[1]
    torch.testing.assert_close(no_truncation, grads["full"])


def test_higher_backend_equals_higher_with_torch_sgd():
    """The reference is honest: our functional SGD inside higher equals higher's own differentiable SGD."""
    episode = sinusoid_episode()
    learner = InnerLoop(small_mlp(), sgd(0.05), 3, backend="higher")
    model = small_mlp()
    losses = []
    for t in range(episode.num_tasks):
        with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.05),
                                  copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(nn.functional.mse_loss(fmodel(episode.x_support[t]), episode.y_support[t]))
            losses.append(nn.functional.mse_loss(fmodel(episode.x_query[t]), episode.y_query[t]))
    ref_grad = torch.autograd.grad(torch.stack(losses).mean(), list(model.parameters()))
    _, grad = meta_gradient(learner, episode)
    torch.testing.assert_close(grad, torch.cat([g.flatten() for g in ref_grad]))


@pytest.mark.parametrize("strategy", ["batched", "vmap", "loop"])
def test_vectorised_predictions_equal_a_loop_over_tasks(strategy):
    episode = sinusoid_episode(tasks=4)
    learner = InnerLoop(small_mlp(), adam(0.05), 3, strategy=strategy)
    looped = torch.cat([learner(episode.select_tasks(slice(t, t + 1))) for t in range(episode.num_tasks)])
    torch.testing.assert_close(learner(episode), looped)


def test_conv_strategies_agree():
    net, episode = _conv_episode()
    results = {s: meta_gradient(InnerLoop(net, sgd(0.1), 2, strategy=s), episode) for s in ("batched", "folded", "loop")}
    reference = meta_gradient(InnerLoop(net, sgd(0.1), 2, backend="higher"), episode)
    for loss, grad in results.values():
        torch.testing.assert_close(loss, reference[0])
        torch.testing.assert_close(grad, reference[1])
    assert InnerLoop(net, sgd(0.1), 2).resolved_strategy() == "folded"
    unfoldable = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular"), nn.Flatten(), nn.Linear(512, 3))
    assert InnerLoop(unfoldable, sgd(0.1), 2).resolved_strategy() == "loop"
    assert InnerLoop(small_mlp(), sgd(0.1), 2).resolved_strategy() == "batched"
    with pytest.raises(ValueError, match="batch/instance/layer norm"):  # functorch gets their meta-gradient wrong
        InnerLoop(net, sgd(0.1), 2, strategy="vmap")


@pytest.mark.parametrize("case", ["mlp_full", "mlp_first_order", "mlp_truncated", "conv_folded"])
def test_a_compiled_meta_loss_compiles_and_equals_higher(case, caplog):
    """``compile: true`` works for the inner loop: its gradients are torch.func's under torch.compile, which
    cannot differentiate autograd's double backward (the loss would fall back to eager with a warning), and the
    folded conv net's custom batch-norm and pool Functions give way to torch's own there."""
    torch._dynamo.reset()
    if case == "conv_folded":
        (net, episode), kwargs = _conv_episode(), {}
    else:
        net, episode, kwargs = small_mlp(), sinusoid_episode(), MODES[case.removeprefix("mlp_")]
    learner = InnerLoop(net, sgd(0.1), 2, **kwargs)
    compiled = compile_loss(learner.loss, True, "inner loop", backend="aot_eager")
    with caplog.at_level(logging.WARNING, logger="metaopt.runtime"):
        loss, grad = meta_gradient(SimpleNamespace(loss=compiled, parameters=learner.parameters), episode)
    assert compiled.active and not caplog.records
    ref_loss, ref_grad = meta_gradient(InnerLoop(net, sgd(0.1), 2, backend="higher", **kwargs), episode)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("steps", [1, 4])
def test_zero_init_linear_model_with_sgd_is_gradient_descent(steps):
    """GradientDescent minimises ½·MSE, the inner loop MSE: sgd(lr/2) from zero equals GradientDescent(lr)."""
    episode = LinearRegression(3).sample(5, 8, 2, generator=torch.Generator().manual_seed(0))
    inner = InnerLoop(nn.Linear(3, 1, bias=False), sgd(0.05), steps, init="zero")
    assert not inner.is_trainable
    torch.testing.assert_close(inner(episode), GradientDescent(steps=steps, lr=0.1)(episode))


def test_meta_learned_step_size_inside_the_optimizer_gets_a_gradient():
    episode = sinusoid_episode()
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    grads = []
    for backend in ("func", "higher"):
        learner = InnerLoop(small_mlp(), sgd(lr), 3, init="random", backend=backend)
        grads.append(torch.autograd.grad(learner.loss(episode), lr)[0])
    assert grads[0].abs() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_layerwise_learned_optimizer_is_vmapped_and_matches_higher():
    """A non-elementwise learned optimizer (per-layer norms) runs per task and gets the reference meta-gradient."""
    episode = sinusoid_episode()
    names = [n for n, _ in small_mlp().named_parameters()]
    results = []
    for backend in ("func", "higher"):
        torch.manual_seed(3)
        mixture = LayerwiseMixture(names, horizon=3, direction_kwargs={"adam": {"eps_root": 1e-16},
                                                                       "rmsprop": {"eps_root": 1e-16}}).double()
        learner = InnerLoop(small_mlp(), mixture, 3, init="random", backend=backend)
        assert not learner.elementwise_optimizer()
        results.append(meta_gradient(learner, episode))
    assert results[0][1].abs().sum() > 0
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_no_grad_forward_adapts_without_a_graph():
    episode = sinusoid_episode()
    learner = InnerLoop(small_mlp(), sgd(0.05), 3)
    with torch.no_grad():
        quiet = learner(episode)
    assert not quiet.requires_grad
    torch.testing.assert_close(quiet, learner(episode).detach())
    unadapted = InnerLoop(small_mlp(), sgd(0.05), 0)(episode)
    assert not torch.allclose(quiet, unadapted)
    assert learner(episode.take_support(0)).shape == episode.y_query.shape


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=-1), "steps"),
    (dict(init="ones"), "init"),
    (dict(backend="jax"), "backend"),
    (dict(strategy="fast"), "strategy"),
    (dict(truncate=-2), "truncate"),
    (dict(adapt=["nothing"]), "adapt"),
    (dict(optimizer=object()), "optimizer"),
])
def test_invalid_settings_are_refused(kwargs, message):
    settings = dict(model=small_mlp(), optimizer=sgd(0.1), steps=2) | kwargs
    with pytest.raises(ValueError, match=message):
        InnerLoop(**settings)
