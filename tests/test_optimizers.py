"""Functional optimizers: equivalence with torch.optim, torch adapter, differentiability, vmap, schedules."""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import optimizers as O



STEPS = 50


# --- independent slow references for optimizers torch does not ship ---------------------------------------


class _ReferenceLion(torch.optim.Optimizer):
    """Lion written straight from Chen et al. 2023, Algorithm 2 (decoupled weight decay), element by element."""

    def __init__(self, params, lr, b1, b2, weight_decay):
        super().__init__(params, dict(lr=lr, b1=b1, b2=b2, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                m = self.state[p].setdefault("m", [0.0] * p.numel())
                flat_p, flat_g = p.view(-1), p.grad.view(-1)
                for i in range(p.numel()):
                    g, w = flat_g[i].item(), flat_p[i].item()
                    c = group["b1"] * m[i] + (1 - group["b1"]) * g
                    flat_p[i] = w - group["lr"] * (math.copysign(1.0, c) * (c != 0) + group["weight_decay"] * w)
                    m[i] = group["b2"] * m[i] + (1 - group["b2"]) * g


class _ReferenceSignSGD(_ReferenceLion):
    """Sign descent is Lion with b1 = 0 and no weight decay."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr, b1=0.0, b2=0.0, weight_decay=0.0)


class _ScheduledAdam:
    """torch Adam with a LambdaLR scheduler stepped after every update."""

    def __init__(self, params, peak, schedule):
        self.opt = torch.optim.Adam(params, lr=peak)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda t: float(schedule(torch.tensor(t))) / peak)

    def step(self):
        self.opt.step()
        self.sched.step()

    def zero_grad(self):
        self.opt.zero_grad()


# --- the cases ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[object], O.GradientTransformation]  # learning rate -> functional optimizer
    lr: float
    reference: Callable[[list[nn.Parameter], float], object]  # (params, lr) -> object with .step()

    def __repr__(self) -> str:
        return self.name


_warmup_cosine = O.warmup_cosine_decay_schedule(1.0, 10, 40, end_value=0.1)

CASES = [
    Case("sgd", lambda lr: O.sgd(lr), 0.1, lambda p, lr: torch.optim.SGD(p, lr=lr)),
    Case(
        "sgd_wd",
        lambda lr: O.sgd(lr, weight_decay=0.05),
        0.1,
        lambda p, lr: torch.optim.SGD(p, lr, weight_decay=0.05),
    ),
    Case("momentum", lambda lr: O.sgd(lr, 0.9), 0.05, lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9)),
    Case(
        "nesterov",
        lambda lr: O.sgd(lr, 0.9, nesterov=True),
        0.05,
        lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True),
    ),
    Case("adam", lambda lr: O.adam(lr, 0.8, 0.95), 0.01, lambda p, lr: torch.optim.Adam(p, lr=lr, betas=(0.8, 0.95))),
    Case(
        "adamw",
        lambda lr: O.adamw(lr, weight_decay=0.1),
        0.01,
        lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.1),
    ),
    Case("rmsprop", lambda lr: O.rmsprop(lr), 0.01, lambda p, lr: torch.optim.RMSprop(p, lr=lr)),
    Case(
        "rmsprop_centered_momentum",
        lambda lr: O.rmsprop(lr, alpha=0.9, momentum=0.5, centered=True),
        0.005,
        lambda p, lr: torch.optim.RMSprop(p, lr=lr, alpha=0.9, momentum=0.5, centered=True),
    ),
    Case(
        "adagrad",
        lambda lr: O.adagrad(lr, lr_decay=0.01, initial_accumulator_value=0.1),
        0.1,
        lambda p, lr: torch.optim.Adagrad(p, lr=lr, lr_decay=0.01, initial_accumulator_value=0.1),
    ),
    Case("sign", lambda lr: O.sign_descent(lr), 0.003, lambda p, lr: _ReferenceSignSGD(p, lr)),
    Case(
        "lion",
        lambda lr: O.lion(lr, weight_decay=0.1),
        0.003,
        lambda p, lr: _ReferenceLion(p, lr, b1=0.9, b2=0.99, weight_decay=0.1),
    ),
    Case(
        "adam_warmup_cosine",
        lambda lr: O.adam(lambda t: lr * _warmup_cosine(t)),
        0.02,
        lambda p, lr: _ScheduledAdam(p, lr, lambda t: lr * _warmup_cosine(t)),
    ),
]


# --- a small network and its data -------------------------------------------------------------------------------


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)


def _loss_fn(net: nn.Module):
    def loss(params, x, y):
        return ((functional_call(net, params, (x,)) - y) ** 2).mean()

    return loss


def _train_torch(optimizer_factory, steps: int = STEPS, net: nn.Module | None = None, opt=None):
    net = net or _net()
    x, y = _data()
    opt = opt or optimizer_factory(net)
    for _ in range(steps):
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return net, opt


def _train_functional(optimizer: O.GradientTransformation, params: dict, steps: int, x, y, loss_fn):
    state = optimizer.init(params)
    for _ in range(steps):
        grads, loss = torch.func.grad_and_value(loss_fn)(params, x, y)
        updates, state = optimizer.update(grads, state, params, loss=loss)
        params = O.apply_updates(params, updates)
    return params


def _assert_params_close(actual: dict, expected: dict, tol: float = 1e-6) -> None:
    assert actual.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=tol, atol=tol, msg=lambda m: f"{k}: {m}")


@functools.cache
def _reference_params(case: Case) -> dict:
    net, _ = _train_torch(lambda net: case.reference(list(net.parameters()), case.lr))
    return {k: v.detach() for k, v in net.named_parameters()}


# --- equivalence with torch.optim --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_functional_api_matches_torch(case):
    net = _net()
    x, y = _data()
    params = {k: v.detach() for k, v in net.named_parameters()}
    final = _train_functional(case.make(case.lr), params, STEPS, x, y, _loss_fn(net))
    expected = _reference_params(case)
    assert not torch.equal(expected["0.weight"], params["0.weight"]), "the reference did not move"
    _assert_params_close(final, expected)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_as_torch_optimizer_matches_torch(case):
    net, _ = _train_torch(lambda net: O.as_torch_optimizer(case.make(case.lr), net.named_parameters()))
    _assert_params_close({k: v.detach() for k, v in net.named_parameters()}, _reference_params(case))


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_state_dict_round_trip_continues_identically(case):
    def make(net):
        return O.as_torch_optimizer(case.make(case.lr), net.named_parameters())

    straight, _ = _train_torch(make, steps=15)

    first, opt = _train_torch(make, steps=10)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _net()
    with torch.no_grad():
        for p in resumed.parameters():
            p.add_(1.0)  # make sure everything really comes from the checkpoint
    resumed.load_state_dict(saved["model"])
    fresh = make(resumed)
    fresh.load_state_dict(saved["opt"])
    _train_torch(None, steps=5, net=resumed, opt=fresh)
    for (k, a), b in zip(resumed.named_parameters(), straight.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=lambda m: f"{k}: {m}")


# --- differentiability and vectorisation --------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_gradient_wrt_learning_rate_matches_finite_differences(case):
    net = _net()
    x, y = _data()
    loss_fn = _loss_fn(net)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def final_loss(lr):
        return loss_fn(_train_functional(case.make(lr), params, 5, x, y, loss_fn), x, y)

    lr = torch.tensor(case.lr, dtype=torch.float64, requires_grad=True)
    (analytic,) = torch.autograd.grad(final_loss(lr), lr)
    h = 1e-6 * case.lr
    with torch.no_grad():
        plus, minus = (final_loss(torch.tensor(case.lr + s, dtype=torch.float64)) for s in (h, -h))
        numeric = (plus - minus) / (2 * h)
    assert analytic.abs() > 1e-6, "the learning rate should matter"
    torch.testing.assert_close(analytic, numeric.to(analytic.dtype), rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_vmap_over_tasks_equals_loop(case):
    net = _net()
    loss_fn = _loss_fn(net)
    tasks = 3
    g = torch.Generator().manual_seed(2)
    base = {k: v.detach() for k, v in net.named_parameters()}
    params = {k: v + 0.1 * torch.randn(tasks, *v.shape, generator=g, dtype=v.dtype) for k, v in base.items()}
    xs = torch.randn(tasks, 16, 4, generator=g, dtype=torch.float64)
    ys = torch.randn(tasks, 16, 3, generator=g, dtype=torch.float64)
    optimizer = case.make(case.lr)

    def train(p, x, y):
        return _train_functional(optimizer, p, 3, x, y, loss_fn)

    batched = vmap(train)(params, xs, ys)
    for t in range(tasks):
        single = train({k: v[t] for k, v in params.items()}, xs[t], ys[t])
        _assert_params_close({k: v[t] for k, v in batched.items()}, single, tol=1e-10)


def test_vmapped_state_carries_a_task_dimension():
    params = {"w": torch.randn(4, 3, dtype=torch.float64)}
    optimizer = O.adam(0.1)
    state = vmap(optimizer.init)(params)
    updates, state = vmap(optimizer.update)(params, state, params)
    adam_state = state[1]  # after the (L2 weight decay) slot
    assert adam_state.count["w"].shape == (4,) and adam_state.mu["w"].shape == (4, 3)
    assert updates["w"].shape == (4, 3)


def test_meta_gradient_through_inner_torch_func_grad():
    """A learned per-layer learning rate receives a gradient through several updates under torch.func.grad."""
    net = _net()
    x, y = _data()
    loss_fn = _loss_fn(net)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def meta_loss(log_lr):
        optimizer = O.chain(O.adam_direction(), O.scale_by_learning_rate(torch.exp(log_lr)))
        return loss_fn(_train_functional(optimizer, params, 4, x, y, loss_fn), x, y)

    meta_grad = grad(meta_loss)(torch.tensor(math.log(0.01), dtype=torch.float64))
    assert torch.isfinite(meta_grad) and meta_grad.abs() > 0


# --- schedules ---------------------------------------------------------------------------------------------------

T = torch.arange(0, 60)


def test_constant_and_linear_schedules():
    torch.testing.assert_close(O.constant_schedule(0.3)(T), torch.full((60,), 0.3, dtype=torch.float64))
    expected = torch.tensor([0.5 + (2.0 - 0.5) * min(max(t - 5, 0) / 20, 1.0) for t in T.tolist()], dtype=torch.float64)
    torch.testing.assert_close(O.linear_schedule(0.5, 2.0, 20, transition_begin=5)(T), expected)


def test_cosine_decay_matches_torch_cosine_annealing():
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=0.7)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30, eta_min=0.05)
    torch_values = []
    for _ in range(31):
        torch_values.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = O.cosine_decay_schedule(0.7, 30, end_value=0.05)(torch.arange(31))
    torch.testing.assert_close(ours, torch.tensor(torch_values, dtype=torch.float64))
    assert O.cosine_decay_schedule(0.7, 30, end_value=0.05)(torch.tensor(45)).item() == pytest.approx(0.05)


def test_warmup_cosine_closed_form():
    values = O.warmup_cosine_decay_schedule(2.0, 10, 50, init_value=0.2, end_value=0.1)(T)
    for t, v in enumerate(values.tolist()):
        if t < 10:
            expected = 0.2 + (2.0 - 0.2) * t / 10
        else:
            expected = 0.1 + (2.0 - 0.1) * 0.5 * (1 + math.cos(math.pi * min(t - 10, 40) / 40))
        assert v == pytest.approx(expected, abs=1e-12), t


def test_join_schedules_restarts_each_piece_and_is_differentiable():
    peak = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    schedule = O.join_schedules([O.constant_schedule(0.1), O.linear_schedule(peak, 0.0, 10)], [5])
    values = schedule(torch.arange(20))
    assert values[:5].tolist() == [0.1] * 5
    assert values[5].item() == pytest.approx(1.5) and values[10].item() == pytest.approx(0.75)
    (d_peak,) = torch.autograd.grad(values.sum(), peak)
    assert d_peak.item() == pytest.approx(sum(1 - k / 10 for k in range(10)))


# --- the torch adapter ---------------------------------------------------------------------------------------------


def test_param_groups_get_their_own_optimizer_and_learning_rate():
    net = _net()
    x, y = _data()
    first, second = net[0], net[2]
    opt = O.as_torch_optimizer(
        O.adam(0.01),
        [
            {"params": list(first.named_parameters())},
            {"params": list(second.named_parameters()), "optimizer": O.sgd(0.1, 0.9), "lr": 0.05},  # absolute
        ],
    )
    ref_net = _net()
    ref = [
        torch.optim.Adam(ref_net[0].parameters(), lr=0.01),
        torch.optim.SGD(ref_net[2].parameters(), lr=0.05, momentum=0.9),
    ]
    for _ in range(10):
        for model, optimizers in ((net, [opt]), (ref_net, ref)):
            ((model(x) - y) ** 2).mean().backward()
            for o in optimizers:
                o.step()
                o.zero_grad()
    for a, b in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert [g["param_names"] for g in opt.state_dict()["param_groups"]] == [["weight", "bias"], ["weight", "bias"]]


def test_parameters_without_gradient_stay_put_and_lr_scheduler_works():
    net = _net()
    x, y = _data()
    opt = O.as_torch_optimizer(O.sgd(0.1, 0.9), dict(net.named_parameters()))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    frozen = net[0].weight.detach().clone()
    for _ in range(3):
        ((net(x) - y) ** 2).mean().backward()
        net[0].weight.grad = None
        opt.step()
        opt.zero_grad()
        sched.step()
    torch.testing.assert_close(net[0].weight.detach(), frozen, rtol=0, atol=0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.125)  # the absolute rate, halved three times


def test_closure_loss_reaches_the_update():
    seen = []

    def update(grads, state, params=None, *, loss=None):
        seen.append(loss)
        return O.tree_map(torch.zeros_like, grads), state

    param = nn.Parameter(torch.ones(2))
    opt = O.as_torch_optimizer(O.GradientTransformation(lambda params: (), update), [param])

    def closure():
        opt.zero_grad()
        loss = (param**2).sum()
        loss.backward()
        return loss

    returned = opt.step(closure)
    assert returned.item() == pytest.approx(2.0) and seen[0].item() == pytest.approx(2.0)


def test_load_state_dict_refuses_a_mismatched_state():
    net = _net()
    adam_sd = O.as_torch_optimizer(O.adam(0.1), net.named_parameters()).state_dict()
    with pytest.raises(ValueError, match="'eps' is not an option of sgd"):
        O.as_torch_optimizer(O.sgd(0.1, 0.9), net.named_parameters()).load_state_dict(adam_sd)
    with pytest.raises(ValueError, match="'decoupled_weight_decay' is not an option of adam"):
        O.as_torch_optimizer(O.adam(0.1), net.named_parameters()).load_state_dict(
            torch.optim.Adam(net.parameters()).state_dict()
        )
    adam_sd["state"][0] = {"exp_avg": adam_sd["state"][0]["mu"]}  # entries named as torch.optim.Adam's
    with pytest.raises(ValueError, match=r"parameter 0 \('0.weight'\) has entries \['exp_avg'\]"):
        O.as_torch_optimizer(O.adam(0.1), net.named_parameters()).load_state_dict(adam_sd)


# --- validation -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: O.sgd(-0.1), r"invalid lr: got -0.1; expected lr in \[0.0"),
        (lambda: O.sgd(0.1, -0.5), "invalid momentum: got -0.5"),
        (lambda: O.sgd(0.1, nesterov=True), "nesterov=True needs momentum > 0"),
        (lambda: O.adam(0.1, b1=1.0), r"invalid b1: got 1.0; expected b1 in \[0.0, 1.0\)"),
        (lambda: O.adam(0.1, eps=-1e-8), "invalid eps"),
        (lambda: O.adam("fast"), "lr must be a number or a tensor"),
        (lambda: O.adam(torch.tensor(1)), "floating-point tensor"),
        (lambda: O.adamw(0.1, weight_decay=-0.1), "invalid weight_decay"),
        (lambda: O.rmsprop(0.1, alpha=1.5), "invalid alpha"),
        (lambda: O.adagrad(0.1, lr_decay=-1.0), "adagrad: lr_decay must be a finite number >= 0"),
        (lambda: O.lion(0.1, b2=1.0), "invalid b2"),
        (lambda: O.adam(float("nan")), "invalid lr: got nan"),
        (lambda: O.cosine_decay_schedule(1.0, 0), "decay_steps must be an int >= 1"),
        (lambda: O.linear_schedule(1.0, 0.0, 2.5), "transition_steps must be an int >= 1"),
        (lambda: O.join_schedules([O.constant_schedule(1.0)], [3]), "one boundary between"),
        (lambda: O.warmup_cosine_decay_schedule(1.0, 10, 5), "decay_steps must be an int > warmup_steps"),
        (lambda: O.as_torch_optimizer(object(), [nn.Parameter(torch.ones(1))]), "init and update"),
        (lambda: O.as_torch_optimizer(O.sgd(0.1), [nn.Parameter(torch.ones(1))], lr=-1.0),
         "FunctionalOptimizer: lr must be a finite number >= 0"),
    ],
)
def test_invalid_hyperparameters_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_chain_refuses_a_foreign_state():
    with pytest.raises(ValueError, match="chain state has 1 entries; expected 3"):
        O.adam(0.1).update({"w": torch.ones(1)}, ((),), {"w": torch.ones(1)})
