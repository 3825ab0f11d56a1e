"""Learned optimizers: LayerwiseMixture (Kristiansen et al. 2024) and PerParameterMLP."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

import optimizers as O

LAYERS = ["0.weight", "0.bias", "2.weight", "2.bias"]
GROUPS = {"hidden": ["0.weight", "0.bias"], "head": ["2.weight", "2.bias"]}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)


NET = _net()
X, Y = _data()


def _loss(params, x=X, y=Y):
    return ((functional_call(NET, params, (x,)) - y) ** 2).mean()


def _params():
    return {k: v.detach().clone() for k, v in NET.named_parameters()}


def _unroll(optimizer, params, steps, x=X, y=Y):
    state = optimizer.init(params)
    for _ in range(steps):
        grads, loss = grad_and_value(_loss)(params, x, y)
        updates, state = optimizer.update(grads, state, params, loss=loss)
        params = O.apply_updates(params, updates)
    return params, state


def _mixture(**kwargs):
    torch.manual_seed(3)
    return O.LayerwiseMixture(kwargs.pop("layers", LAYERS), **{"horizon": 10, **kwargs}).double()


def _perturbed(module: nn.Module, scale: float = 0.3) -> nn.Module:
    """A copy with every meta-parameter moved off its (partly zero) initialisation."""
    module = copy.deepcopy(module)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


LEARNED = {
    "mixture": lambda: _perturbed(_mixture()),
    "mixture_grouped": lambda: _perturbed(_mixture(layers=GROUPS)),
    "mixture_static": lambda: _perturbed(_mixture(static=True), 0.1),
    "per_parameter_mlp": lambda: _perturbed(O.PerParameterMLP(step_mult=1e-2).double()),
}


# --- LayerwiseMixture ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers, expected", [(LAYERS, 4), (GROUPS, 2)])
@pytest.mark.parametrize("static", [False, True])
def test_mixture_coefficients_have_one_row_per_layer(layers, expected, static):
    mixture = _mixture(layers=layers, static=static)
    _, state = _unroll(mixture.optimizer(), _params(), 3)
    assert state.coefficients.shape == (expected, 5)
    assert mixture.layer_names == list(layers)
    assert mixture.direction_names == ["sgd", "momentum", "adam", "rmsprop", "sign"]
    assert state.count.item() == 3 and state.loss_ema.shape == (2,)


@pytest.mark.parametrize("static", [False, True])
def test_one_hot_on_adam_reproduces_adam(static):
    mixture = _mixture(static=static, initial={"adam": 1.0}, base_lrs={"adam": 0.01})
    ours, _ = _unroll(mixture.optimizer(), _params(), 20)
    adam, _ = _unroll(O.adam(0.01), _params(), 20)
    for k in adam:
        torch.testing.assert_close(ours[k], adam[k], rtol=1e-12, atol=1e-14)


def test_mixture_mixes_directions_linearly():
    """α = (0.5 on SGD, 2 on sign) per layer gives -0.5 η_sgd g - 2 η_sign sign(g) on the first step."""
    mixture = _mixture(static=True, directions=("sgd", "sign"), initial={"sgd": 0.5, "sign": 2.0})
    params = _params()
    grads = torch.func.grad(_loss)(params)
    updates, _ = mixture.optimizer().update(grads, mixture.optimizer().init(params), params)
    for k, g in grads.items():
        torch.testing.assert_close(updates[k], -0.5 * 0.1 * g - 2.0 * 1e-3 * torch.sign(g))


def test_coefficients_vary_per_layer_and_step():
    mixture = _perturbed(_mixture())
    optimizer = mixture.optimizer()
    params, state = _params(), optimizer.init(_params())
    seen = []
    for _ in range(3):
        grads, loss = grad_and_value(_loss)(params)
        updates, state = optimizer.update(grads, state, params, loss=loss)
        params = O.apply_updates(params, updates)
        seen.append(state.coefficients)
    assert not torch.allclose(seen[0], seen[1]) and not torch.allclose(seen[1][0], seen[1][1])


@pytest.mark.parametrize("eps_root, finite", [(0.0, True), (1e-16, True)])  # 0: the safe sqrt's zero gradient
def test_eps_root_keeps_the_meta_gradient_finite_at_zero_gradients(eps_root, finite):
    kwargs = {"adam": {"eps_root": eps_root}, "rmsprop": {"eps_root": eps_root}}
    mixture = _mixture(layers=["w"], direction_kwargs=kwargs)
    params = {"w": torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)}  # the middle gradient is exactly zero

    def loss_fn(p):
        return (p["w"] ** 2).sum()

    optimizer, state = mixture.optimizer(), mixture.optimizer().init(params)
    for _ in range(3):
        grads, loss = grad_and_value(loss_fn)(params)
        updates, state = optimizer.update(grads, state, params, loss=loss)
        params = O.apply_updates(params, updates)
    meta_grads = torch.autograd.grad(loss_fn(params), list(mixture.parameters()), allow_unused=True)
    assert all(torch.isfinite(g).all() for g in meta_grads if g is not None) == finite


# --- shared checks over every learned optimizer ------------------------------------------------------------------


@pytest.mark.parametrize("name", LEARNED)
def test_unrolled_meta_gradient_matches_finite_differences(name):
    module = LEARNED[name]()
    meta = dict(module.named_parameters())

    def meta_loss(meta_params):
        final, _ = _unroll(module.optimizer(meta_params), _params(), 4)
        return _loss(final)

    grads = torch.autograd.grad(meta_loss(meta), list(meta.values()))
    assert all(torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0
    torch.manual_seed(7)
    direction = {k: torch.randn_like(v) for k, v in meta.items()}
    analytic = sum((g * direction[k]).sum() for g, k in zip(grads, meta))
    h = 1e-6
    with torch.no_grad():
        plus = meta_loss({k: v + h * direction[k] for k, v in meta.items()})
        minus = meta_loss({k: v - h * direction[k] for k, v in meta.items()})
    torch.testing.assert_close(analytic, (plus - minus) / (2 * h), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("name", LEARNED)
def test_learned_optimizer_under_vmap_equals_loop(name):
    optimizer = LEARNED[name]().optimizer()
    g = torch.Generator().manual_seed(2)
    params = {k: v + 0.1 * torch.randn(3, *v.shape, generator=g, dtype=v.dtype) for k, v in _params().items()}
    xs = torch.randn(3, 16, 4, generator=g, dtype=torch.float64)
    ys = torch.randn(3, 16, 3, generator=g, dtype=torch.float64)

    def train(p, x, y):
        return _unroll(optimizer, p, 3, x, y)[0]

    batched = vmap(train)(params, xs, ys)
    for t in range(3):
        single = train({k: v[t] for k, v in params.items()}, xs[t], ys[t])
        for k in single:
            torch.testing.assert_close(batched[k][t], single[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", LEARNED)
def test_checkpointed_learned_optimizer_runs_as_torch_optimizer(name):
    """Save the meta-parameters and an optimizer state mid-run; reload both into fresh objects; same trajectory."""
    module = LEARNED[name]()

    def run(net, opt, steps):
        for _ in range(steps):
            loss = ((net(X) - Y) ** 2).mean()
            loss.backward()
            opt.step(loss=loss)
            opt.zero_grad()

    straight = _net()
    run(straight, O.as_torch_optimizer(module.optimizer(), straight.named_parameters()), 8)

    net = _net()
    opt = O.as_torch_optimizer(module.optimizer(), net.named_parameters())
    run(net, opt, 5)
    buffer = io.BytesIO()
    torch.save({"meta": module.state_dict(), "model": net.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    fresh_module = copy.deepcopy(module)
    with torch.no_grad():
        for p in fresh_module.parameters():
            p.zero_()
    fresh_module.load_state_dict(saved["meta"])
    resumed = _net()
    resumed.load_state_dict(saved["model"])
    fresh_opt = O.as_torch_optimizer(fresh_module.optimizer(), resumed.named_parameters())
    fresh_opt.load_state_dict(saved["opt"])
    run(resumed, fresh_opt, 3)
    for a, b in zip(resumed.parameters(), straight.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert not torch.equal(straight[0].weight, _net()[0].weight)


@pytest.mark.parametrize("eps_root", [0.0, 1e-12])  # 0: torch's fused Adam/SGD kernels; > 0: the in-place ops
def test_in_place_torch_step_follows_the_reference_rule(eps_root):
    """as_torch_optimizer's in-place step (float32) equals the directions' own update rule (float64), frozen included.

    The bias receives no gradient from step 3 on: it stays put and its state stays as it was (a None gradient).
    """
    kwargs = {"adam": {"eps_root": eps_root}, "rmsprop": {"eps_root": eps_root}}
    module = _perturbed(_mixture(direction_kwargs=kwargs), 0.1)
    net = _net().float()
    optimizer = O.as_torch_optimizer(copy.deepcopy(module).float().optimizer(), net.named_parameters())
    assert isinstance(module.optimizer().update, O.InPlaceUpdate)
    reference, params = module.optimizer(), _params()
    state = reference.init(params)
    for step in range(6):
        net.zero_grad()
        loss = ((net(X.float()) - Y.float()) ** 2).mean()
        loss.backward()
        grads, ref_loss = grad_and_value(_loss)(params)
        if step >= 2:
            net[2].bias.grad = None
            grads["2.bias"] = None
        optimizer.step(loss=loss)
        with torch.enable_grad():  # the graph path: each direction's own update
            updates, state = reference.update(grads, state, params, loss=ref_loss)
        params = O.apply_updates(params, updates)
        for k, p in net.named_parameters():
            torch.testing.assert_close(p.double(), params[k], rtol=1e-4, atol=1e-5)
    assert not torch.equal(net[0].weight, _net()[0].weight.float())
    adam = module.direction_names.index("adam")
    assert optimizer.functional_states[0].directions[adam].count["2.bias"].item() == 2
    assert optimizer.functional_states[0].directions[adam].count["2.weight"].item() == 6


def test_no_grad_update_equals_the_graph_update_and_leaves_the_state_alone():
    optimizer, params = _perturbed(_mixture()).optimizer(), _params()
    state = optimizer.init(params)
    for _ in range(3):
        grads, loss = grad_and_value(_loss)(params)
        before = [t.clone() for t in torch.utils._pytree.tree_leaves(state)]
        with torch.no_grad():
            fast, _ = optimizer.update(grads, state, params, loss=loss)
        assert all(torch.equal(a, b) for a, b in zip(before, torch.utils._pytree.tree_leaves(state)))
        slow, state = optimizer.update(grads, state, params, loss=loss)
        for k in slow:
            torch.testing.assert_close(fast[k], slow[k], rtol=1e-10, atol=1e-12)
        params = O.apply_updates(params, slow)


# --- PerParameterMLP ------------------------------------------------------------------------------------------------


def test_per_parameter_mlp_shapes_and_state():
    lopt = O.PerParameterMLP(momentum_decays=(0.5, 0.9, 0.99, 0.999)).double()
    assert lopt(torch.randn(7, 5, lopt.num_features, dtype=torch.float64)).shape == (7, 5)
    params, state = _unroll(lopt.optimizer(), _params(), 2)
    assert len(state.momenta) == 4 and state.momenta[3]["0.weight"].shape == (8, 4)
    assert all(c.item() == 2 for c in state.count.values()) and state.count.keys() == _params().keys()
    assert all(params[k].shape == v.shape for k, v in _params().items())


# --- validation -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: O.LayerwiseMixture(LAYERS), "LayerwiseMixture: horizon must be an int >= 1"),
        (
            lambda: O.LayerwiseMixture(LAYERS, horizon=5, directions=("adam", "sophia")),
            r"unknown directions \['sophia'\]",
        ),
        (lambda: O.LayerwiseMixture({"a": ["0.weight"], "b": ["0.weight"]}, horizon=5), "exactly one layer"),
        (lambda: O.LayerwiseMixture({"a": "0.weight"}, horizon=5), "non-empty list of parameter names"),
        (lambda: O.LayerwiseMixture(LAYERS, horizon=5, initial={"lion": 1.0}), "must refer to directions"),
        (lambda: O.LayerwiseMixture(LAYERS, horizon=5, loss_decays=(1.0,)), "loss_decays in"),
        (lambda: O.LayerwiseMixture(LAYERS, horizon=5, direction_kwargs={"lion": {}}), "direction_kwargs names"),
        (lambda: O.LayerwiseMixture(LAYERS, horizon=5, direction_kwargs={"adam": {"b1": 2.0}}), "invalid b1"),
        (lambda: O.PerParameterMLP(momentum_decays=(0.9, 1.2)), "decays must lie in"),
        (lambda: O.PerParameterMLP(step_mult=0.0), "step_mult must be a finite number > 0"),
    ],
)
def test_invalid_settings_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_mixture_refuses_missing_loss_and_foreign_parameters():
    optimizer = _mixture().optimizer()
    params = _params()
    state = optimizer.init(params)
    with pytest.raises(ValueError, match="needs the training loss"):
        optimizer.update(params, state, params)
    with pytest.raises(ValueError, match=r"missing \['2.bias'\]"):
        optimizer.init({k: v for k, v in params.items() if k != "2.bias"})
