"""``as_torch_optimizer`` keeps the whole ``torch.optim`` contract, for every optimizer ``optimizers`` exports.

torch's optimizer test protocol re-expressed against metaopt: float64 parity with ``torch.optim`` over option grids
(through the functional API and the adapter), parameters without gradient, per-group options, every scheduler of
``torch.optim.lr_scheduler``, state_dict round trips (also under other parameter names), deepcopy and pickle,
``optimizer.state``, hooks, closures, error inputs, complex parameters, and MAML through Adam at ``eps_root=0``.
Optimizers torch does not ship (Lion, sign descent, the learned ones) are pinned to the functional API instead.
"""

from __future__ import annotations

import copy
import io
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad_and_value
from torch.optim import lr_scheduler as S

import optimizers as O

STEPS = 10
TOL = {"rtol": 1e-9, "atol": 1e-12}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


NET = _net()  # the module functional_call runs on given weights
NAMES = [k for k, _ in NET.named_parameters()]
_g = torch.Generator().manual_seed(1)
X, Y = torch.randn(16, 4, generator=_g, dtype=torch.float64), torch.randn(16, 3, generator=_g, dtype=torch.float64)


def _loss(net: nn.Module) -> torch.Tensor:
    return ((net(X) - Y) ** 2).mean()


def _functional_loss(params: dict) -> torch.Tensor:
    return ((functional_call(NET, params, (X,)) - Y) ** 2).mean()


def _perturbed(module: nn.Module) -> nn.Module:
    torch.manual_seed(5)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return module


def _mixture(layers=tuple(NAMES), names=None) -> O.GradientTransformation:
    torch.manual_seed(3)
    return _perturbed(O.LayerwiseMixture(list(layers), horizon=20).double()).optimizer(names=names)


def _mlp(layers=None, names=None) -> O.GradientTransformation:
    del layers, names
    torch.manual_seed(4)
    return _perturbed(O.PerParameterMLP(step_mult=1e-2).double()).optimizer()


def _fk(options: dict) -> dict:
    """torch-named options as the functional optimizers' keyword arguments (``betas`` is ``b1, b2``)."""
    options = dict(options)
    if "betas" in options:
        options["b1"], options["b2"] = options.pop("betas")
    return options


@dataclass(frozen=True)
class Subject:
    name: str
    make: Callable[..., O.GradientTransformation]  # (lr, **torch-named options) -> functional optimizer
    lr: float
    torch: Callable | None = None  # (params, lr, **options) -> the torch.optim optimizer, where torch has one
    grid: tuple = ({},)
    learned: bool = False
    rejected: str = "amsgrad"  # a torch option it does not have
    extra: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return self.name


def _learned(make: Callable) -> Callable:
    def build(lr=None, *, maximize=False, layers=tuple(NAMES), names=None):
        del lr
        transform = make(layers, names)
        return O.maximize(transform) if maximize else transform

    return build


SUBJECTS = [
    Subject("sgd", lambda lr, **o: O.sgd(lr, **_fk(o)), 0.05, lambda p, lr, **o: torch.optim.SGD(p, lr, **o),
            ({}, {"weight_decay": 0.1}, {"maximize": True})),
    Subject("momentum", lambda lr, **o: O.sgd(lr, 0.9, **_fk(o)), 0.02,
            lambda p, lr, **o: torch.optim.SGD(p, lr, momentum=0.9, **o),
            ({}, {"dampening": 0.3}, {"weight_decay": 0.1, "maximize": True})),
    Subject("nesterov", lambda lr, **o: O.sgd(lr, 0.9, nesterov=True, **_fk(o)), 0.02,
            lambda p, lr, **o: torch.optim.SGD(p, lr, momentum=0.9, nesterov=True, **o),
            ({}, {"weight_decay": 0.1}, {"maximize": True})),
    Subject("adam", lambda lr, **o: O.adam(lr, **_fk(o)), 0.01, lambda p, lr, **o: torch.optim.Adam(p, lr, **o),
            ({}, {"betas": (0.8, 0.95), "eps": 1e-6}, {"weight_decay": 0.1}, {"amsgrad": True}, {"maximize": True},
             {"amsgrad": True, "weight_decay": 0.05, "maximize": True}), rejected="momentum"),
    Subject("adamw", lambda lr, **o: O.adamw(lr, **_fk(o)), 0.01, lambda p, lr, **o: torch.optim.AdamW(p, lr, **o),
            ({}, {"weight_decay": 0.3, "amsgrad": True}, {"maximize": True}), rejected="momentum"),
    Subject("rmsprop", lambda lr, **o: O.rmsprop(lr, **_fk(o)), 0.005,
            lambda p, lr, **o: torch.optim.RMSprop(p, lr, **o),
            ({}, {"alpha": 0.9, "centered": True, "momentum": 0.5}, {"weight_decay": 0.1}, {"maximize": True})),
    Subject("adagrad", lambda lr, **o: O.adagrad(lr, **_fk(o)), 0.05,
            lambda p, lr, **o: torch.optim.Adagrad(p, lr, **o),
            ({}, {"lr_decay": 0.01, "initial_accumulator_value": 0.1}, {"weight_decay": 0.1}, {"maximize": True})),
    Subject("lion", lambda lr, **o: O.lion(lr, **_fk(o)), 0.003, None,
            ({}, {"weight_decay": 0.1, "betas": (0.8, 0.9)}, {"maximize": True})),
    Subject("sign", lambda lr, **o: O.sign_descent(lr, **_fk(o)), 0.003, None,
            ({}, {"momentum": 0.5}, {"maximize": True})),
    Subject("LayerwiseMixture", _learned(_mixture), 1.0, None, ({}, {"maximize": True}), learned=True,
            rejected="weight_decay"),
    Subject("PerParameterMLP", _learned(_mlp), 1.0, None, ({}, {"maximize": True}), learned=True,
            rejected="weight_decay"),
]
TORCH = [s for s in SUBJECTS if s.torch is not None]
STATELESS = {"sgd", "sign"}
GRID = [(s, o) for s in SUBJECTS for o in s.grid]
TORCH_GRID = [(s, o) for s, o in GRID if s.torch is not None]


def _ids(case) -> str:
    subject, options = case
    return f"{subject.name}-{'-'.join(f'{k}={v}' for k, v in options.items()) or 'defaults'}"


def _ours(subject: Subject, net: nn.Module, options: dict | None = None, **kwargs) -> O.FunctionalOptimizer:
    return O.as_torch_optimizer(subject.make(subject.lr, **(options or {})), net.named_parameters(), **kwargs)


def _step(opt, loss: torch.Tensor) -> None:
    if isinstance(opt, O.FunctionalOptimizer):
        opt.step(loss=loss)
    else:
        opt.step()


def _train(net: nn.Module, opt, steps: int = STEPS, *, frozen: nn.Parameter | None = None, scheduler=None,
           each: Callable | None = None) -> list[float]:
    """The ordinary loop; ``frozen`` gets no gradient from the third step on."""
    losses = []
    for t in range(steps):
        opt.zero_grad()
        loss = _loss(net)
        loss.backward()
        if frozen is not None and t >= 2:
            frozen.grad = None
        _step(opt, loss)
        losses.append(loss.item())
        if scheduler is not None:
            scheduler.step(loss.item()) if isinstance(scheduler, S.ReduceLROnPlateau) else scheduler.step()
        if each is not None:
            each(t)
    return losses


def _functional(transform: O.GradientTransformation, steps: int = STEPS, *, frozen: str | None = None):
    params = {k: v.detach().clone() for k, v in _net().named_parameters()}
    state = transform.init(params)
    for t in range(steps):
        grads, loss = grad_and_value(_functional_loss)(params)
        if frozen is not None and t >= 2:
            grads[frozen] = None
        updates, state = transform.update(grads, state, params, loss=loss)
        params = O.apply_updates(params, updates)
    return params, state


def _assert_nets_equal(a: nn.Module, b: nn.Module | dict, **tol) -> None:
    other = dict(b.named_parameters()) if isinstance(b, nn.Module) else b
    for k, p in a.named_parameters():
        torch.testing.assert_close(p.detach(), other[k].detach(), **(tol or TOL), msg=lambda m: f"{k}: {m}")


def _moved(net: nn.Module) -> bool:
    return not torch.equal(net[0].weight, _net()[0].weight)


def test_the_suite_covers_every_exported_optimizer_and_scheduler():
    exported = {"sgd", "adam", "adamw", "rmsprop", "adagrad", "lion", "sign_descent", "LayerwiseMixture",
                "PerParameterMLP"}
    assert exported <= set(O.__all__)
    assert {s.name for s in SUBJECTS} == {"sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad",
                                          "lion", "sign", "LayerwiseMixture", "PerParameterMLP"}
    assert set(SCHEDULERS) == set(S.__all__) - {"LRScheduler"}


# --- step-for-step parity ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", TORCH_GRID, ids=_ids)
def test_functional_api_matches_torch(case):
    subject, options = case
    final, _ = _functional(subject.make(subject.lr, **options))
    reference = _net()
    _train(reference, subject.torch(reference.parameters(), subject.lr, **options))
    assert _moved(reference)
    _assert_nets_equal(reference, final)


@pytest.mark.parametrize("case", TORCH_GRID, ids=_ids)
def test_as_torch_optimizer_matches_torch(case):
    subject, options = case
    net, reference = _net(), _net()
    _train(net, _ours(subject, net, options))
    _train(reference, subject.torch(reference.parameters(), subject.lr, **options))
    _assert_nets_equal(net, reference)


@pytest.mark.parametrize("case", GRID, ids=_ids)
def test_as_torch_optimizer_matches_the_functional_api(case):
    subject, options = case
    net = _net()
    _train(net, _ours(subject, net, options))
    assert _moved(net)
    _assert_nets_equal(net, _functional(subject.make(subject.lr, **options))[0], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("subject", SUBJECTS, ids=repr)
def test_the_group_lr_scales_the_step(subject):
    """One step at lr = 2·lr0 moves every parameter by twice the step at lr0 (lr multiplies the direction)."""
    moves = []
    for factor in (1.0, 2.0):
        net = _net()
        opt = _ours(subject, net)
        assert opt.param_groups[0]["lr"] == subject.lr  # the optimizer's own rate (learned ones: 1, the factor)
        opt.param_groups[0]["lr"] = factor * subject.lr
        _train(net, opt, 1)
        moves.append({k: p.detach() - q for (k, p), q in zip(net.named_parameters(), _net().parameters())})
    for k in moves[0]:
        torch.testing.assert_close(moves[1][k], 2 * moves[0][k], rtol=1e-12, atol=1e-15)


def test_group_lr_is_absolute_and_may_be_a_tensor():
    net, reference = _net(), _net()
    opt = O.as_torch_optimizer(O.adam(torch.tensor(0.01, dtype=torch.float64)), net.named_parameters())
    torch_opt = torch.optim.Adam(reference.parameters(), lr=torch.tensor(0.01, dtype=torch.float64))

    for model, optimizer in ((net, opt), (reference, torch_opt)):
        _train(model, optimizer, each=lambda t, o=optimizer: o.param_groups[0].__setitem__("lr", 1e-4) if t == 3
               else None)  # as a torch user writes it
    _assert_nets_equal(net, reference)
    assert O.as_torch_optimizer(O.adam(1e-3), net.parameters(), lr=0.5).param_groups[0]["lr"] == 0.5


# --- parameters without gradient -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", GRID, ids=_ids)
def test_a_parameter_without_gradient_is_skipped(case):
    """torch skips it: it stays put (weight decay included), and its state and step count stay as they were."""
    subject, options = case
    net = _net()
    opt = _ours(subject, net, options)
    snapshots = {}
    _train(net, opt, frozen=net[2].bias,
           each=lambda t: snapshots.setdefault(t, {k: v.clone() for k, v in opt.state[net[2].bias].items()}))
    torch.testing.assert_close(net[2].bias.detach(), _train_until_frozen(subject, options), rtol=0, atol=0)
    for name, value in snapshots[1].items():  # after the last step with a gradient
        if not (subject.learned and name in ("count", "loss_ema", "coefficients")):  # the group's, not the bias's
            torch.testing.assert_close(opt.state[net[2].bias][name], value, rtol=0, atol=0, msg=name)
    if subject.torch is not None:
        reference = _net()
        _train(reference, subject.torch(reference.parameters(), subject.lr, **options), frozen=reference[2].bias)
        _assert_nets_equal(net, reference)
    else:
        final, _ = _functional(subject.make(subject.lr, **options), frozen="2.bias")
        _assert_nets_equal(net, final, rtol=1e-7, atol=1e-9)


def _train_until_frozen(subject: Subject, options: dict) -> torch.Tensor:
    net = _net()
    _train(net, _ours(subject, net, options), 2)
    return net[2].bias.detach()


@pytest.mark.parametrize("subject", SUBJECTS, ids=repr)
def test_the_functional_api_takes_none_gradients(subject):
    transform = subject.make(subject.lr)
    params = {k: v.detach() for k, v in _net().named_parameters()}
    state = transform.init(params)
    grads, loss = grad_and_value(_functional_loss)(params)
    _, state = transform.update(grads, state, params, loss=loss)
    before = {str(p): leaf for p, leaf in torch.utils._pytree.tree_flatten_with_path(state)[0]}
    grads, loss = grad_and_value(_functional_loss)(params)
    grads["0.weight"] = None
    updates, state = transform.update(grads, state, params, loss=loss)
    assert updates["0.weight"] is None and all(updates[k] is not None for k in NAMES[1:])
    assert torch.equal(O.apply_updates(params, updates)["0.weight"], params["0.weight"])
    for path, leaf in torch.utils._pytree.tree_flatten_with_path(state)[0]:
        if "'0.weight'" in str(path):
            assert torch.equal(leaf, before[str(path)]), path


# --- per-group options -----------------------------------------------------------------------------------------------


def _two_groups(net: nn.Module, options: dict, lr: float, named: bool = True) -> list[dict]:
    first, second = (list(m.named_parameters(prefix=p)) for m, p in ((net[0], "0"), (net[2], "2")))
    if not named:
        first, second = [p for _, p in first], [p for _, p in second]
    return [{"params": first}, {"params": second, "lr": lr, **options}]


@pytest.mark.parametrize("case", [(s, s.grid[-1]) for s in SUBJECTS], ids=_ids)
def test_a_groups_options_override_the_optimizers(case):
    subject, options = case
    net, other = _net(), _net()
    opt = O.as_torch_optimizer(subject.make(subject.lr), _two_groups(net, options, 0.5 * subject.lr))
    assert all(opt.param_groups[1][k] == v for k, v in options.items())
    _train(net, opt)
    if subject.torch is not None:
        _train(other, subject.torch(_two_groups(other, options, 0.5 * subject.lr, named=False), subject.lr))
        _assert_nets_equal(net, other)
    else:  # the same as two optimizers, each with one group's settings
        first = subject.make(subject.lr, names=NAMES[:2]) if subject.learned else subject.make(subject.lr)
        second = (subject.make(subject.lr, names=NAMES[2:], **options) if subject.learned
                  else subject.make(subject.lr, **options))
        opts = [O.as_torch_optimizer(first, list(other.named_parameters())[:2]),
                O.as_torch_optimizer(second, list(other.named_parameters())[2:], lr=0.5 * subject.lr)]
        for _ in range(STEPS):
            loss = _loss(other)
            loss.backward()
            for o in opts:
                o.step(loss=loss)
                o.zero_grad()
        _assert_nets_equal(net, other)


@pytest.mark.parametrize("subject", TORCH, ids=repr)
def test_an_option_changed_mid_training_takes_effect_as_in_torch(subject):
    key, value = ("betas", (0.5, 0.9)) if "betas" in _ours(subject, _net()).defaults else ("weight_decay", 0.2)
    nets, opts = [_net(), _net()], []
    opts = [_ours(subject, nets[0]), subject.torch(nets[1].parameters(), subject.lr)]
    for net, opt in zip(nets, opts):
        _train(net, opt, each=lambda t, opt=opt: opt.param_groups[0].__setitem__(key, value) if t == 3 else None)
    _assert_nets_equal(*nets)


@pytest.mark.parametrize("subject", SUBJECTS, ids=repr)
def test_an_option_the_optimizer_lacks_is_refused_by_name(subject):
    net = _net()
    with pytest.raises(ValueError, match=f"param group 1: '{subject.rejected}' is not an option of"):
        O.as_torch_optimizer(subject.make(subject.lr), _two_groups(net, {subject.rejected: 0.5}, subject.lr))
    opt = _ours(subject, net)
    opt.param_groups[0][subject.rejected] = 0.5
    with pytest.raises(ValueError, match=f"'{subject.rejected}' is not an option"):
        _train(net, opt, 1)
    opt = _ours(subject, net)
    opt.param_groups[0]["note"] = "kept"  # keys that are no torch option are a user's or a tool's
    opt.param_groups[0]["foreach"] = None
    _train(net, opt, 1)


# --- schedulers ------------------------------------------------------------------------------------------------------

SCHEDULERS = {
    "LambdaLR": lambda o: S.LambdaLR(o, lambda t: 0.9**t),
    "MultiplicativeLR": lambda o: S.MultiplicativeLR(o, lambda t: 0.95),
    "StepLR": lambda o: S.StepLR(o, 3, 0.5),
    "MultiStepLR": lambda o: S.MultiStepLR(o, [2, 5], 0.3),
    "ConstantLR": lambda o: S.ConstantLR(o, factor=0.5, total_iters=4),
    "LinearLR": lambda o: S.LinearLR(o, start_factor=0.2, total_iters=5),
    "ExponentialLR": lambda o: S.ExponentialLR(o, 0.8),
    "SequentialLR": lambda o: S.SequentialLR(o, [S.LinearLR(o, 0.2, total_iters=3), S.ExponentialLR(o, 0.8)],
                                             milestones=[3]),
    "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, T_max=6, eta_min=1e-4),
    "ChainedScheduler": lambda o: S.ChainedScheduler([S.ConstantLR(o, 0.5, total_iters=3), S.ExponentialLR(o, 0.9)]),
    "ReduceLROnPlateau": lambda o: S.ReduceLROnPlateau(o, patience=0, factor=0.5, min_lr=1e-4, threshold=0.5),
    "CyclicLR": lambda o: S.CyclicLR(o, base_lr=1e-4, max_lr=0.02, step_size_up=3),  # cycle_momentum=True
    "CosineAnnealingWarmRestarts": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=3, eta_min=1e-4),
    "OneCycleLR": lambda o: S.OneCycleLR(o, max_lr=0.02, total_steps=STEPS),  # cycle_momentum=True
    "PolynomialLR": lambda o: S.PolynomialLR(o, total_iters=8, power=2.0),
}


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("subject", TORCH, ids=repr)
def test_every_scheduler_drives_it_as_it_drives_torch(subject, scheduler):
    net, reference = _net(), _net()
    ours, theirs = _ours(subject, net), subject.torch(reference.parameters(), subject.lr)
    lrs = ([], [])
    try:
        torch_scheduler = SCHEDULERS[scheduler](theirs)
    except ValueError as error:  # cycle_momentum on an optimizer without momentum: refused alike
        with pytest.raises(ValueError, match=re.escape(str(error))):
            SCHEDULERS[scheduler](ours)
        return
    _train(net, ours, scheduler=SCHEDULERS[scheduler](ours), each=lambda t: lrs[0].append(ours.param_groups[0]["lr"]))
    _train(reference, theirs, scheduler=torch_scheduler, each=lambda t: lrs[1].append(theirs.param_groups[0]["lr"]))
    assert lrs[0] == pytest.approx(lrs[1], rel=1e-12) and len(set(lrs[0])) > 1
    _assert_nets_equal(net, reference)


@pytest.mark.parametrize("scheduler", ["OneCycleLR", "CyclicLR", "ReduceLROnPlateau", "SequentialLR",
                                       "CosineAnnealingLR"])
@pytest.mark.parametrize("subject", [s for s in SUBJECTS if s.torch is None], ids=repr)
def test_schedulers_drive_the_optimizers_torch_does_not_ship(subject, scheduler):
    """The learning rates follow torch's (on a torch optimizer with the same defaults), and they are used."""
    net = _net()
    ours = _ours(subject, net)
    twin = (torch.optim.Adam if "betas" in ours.defaults else
            torch.optim.SGD if "momentum" in ours.defaults else torch.optim.Adagrad)([nn.Parameter(torch.ones(1))],
                                                                                    lr=subject.lr)
    try:
        twin_scheduler = SCHEDULERS[scheduler](twin)
    except ValueError as error:  # no momentum or betas: cycle_momentum=True is refused as for torch.optim.Adagrad
        with pytest.raises(ValueError, match=re.escape(str(error))):
            SCHEDULERS[scheduler](ours)
        ours_scheduler = {"OneCycleLR": lambda o: S.OneCycleLR(o, max_lr=2.0, total_steps=STEPS,
                                                                 cycle_momentum=False),
                          "CyclicLR": lambda o: S.CyclicLR(o, 0.1, 2.0, step_size_up=3, cycle_momentum=False)}
        _train(net, ours, scheduler=ours_scheduler[scheduler](ours))
        assert _moved(net)
        return
    lrs = ([], [])
    _train(net, ours, scheduler=SCHEDULERS[scheduler](ours), each=lambda t: lrs[0].append(ours.param_groups[0]["lr"]))
    for t in range(STEPS):
        twin.step()
        twin_scheduler.step(_train_losses(subject)[t]) if scheduler == "ReduceLROnPlateau" else twin_scheduler.step()
        lrs[1].append(twin.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(lrs[1], rel=1e-12)
    assert _moved(net)


def _train_losses(subject: Subject) -> list[float]:
    net = _net()
    opt = _ours(subject, net)
    return _train(net, opt, scheduler=SCHEDULERS["ReduceLROnPlateau"](opt))


# --- state_dict, other names, copies ----------------------------------------------------------------------------------


def _saved(obj) -> object:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("subject", SUBJECTS, ids=repr)
def test_state_dict_round_trip_mid_training_continues_as_uninterrupted(subject):
    def make(net):
        opt = _ours(subject, net)
        return opt, S.CosineAnnealingLR(opt, T_max=STEPS, eta_min=0.1 * subject.lr)

    straight = _net()
    opt, sched = make(straight)
    _train(straight, opt, STEPS, scheduler=sched)

    first = _net()
    opt, sched = make(first)
    _train(first, opt, 6, scheduler=sched)
    saved = _saved({"model": first.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    resumed = _net()
    with torch.no_grad():
        for p in resumed.parameters():
            p.add_(1.0)
    resumed.load_state_dict(saved["model"])
    opt, sched = make(resumed)
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    _train(resumed, opt, STEPS - 6, scheduler=sched)
    _assert_nets_equal(resumed, straight, rtol=0, atol=0)


@pytest.mark.parametrize("rename", ["module_prefix", "named_to_unnamed"])
@pytest.mark.parametrize("subject", SUBJECTS, ids=repr)
def test_load_state_dict_maps_parameters_by_position(subject, rename):
    if subject.name == "LayerwiseMixture" and rename == "named_to_unnamed":
        pytest.skip("a LayerwiseMixture finds its layers by parameter name")
    straight = _net()
    _train(straight, _ours(subject, straight))
    wrapped = _net()
    prefixed = [(f"module.{k}", p) for k, p in wrapped.named_parameters()]
    make = (lambda names: subject.make(subject.lr, layers=names)) if subject.learned else (
        lambda names: subject.make(subject.lr))
    opt = O.as_torch_optimizer(make(tuple(k for k, _ in prefixed)), prefixed)
    _train(wrapped, opt, 4)
    saved = _saved(opt.state_dict())
    resumed = _net()
    resumed.load_state_dict(wrapped.state_dict())
    params = resumed.named_parameters() if rename == "module_prefix" else resumed.parameters()
    fresh = O.as_torch_optimizer(make(tuple(NAMES)), params)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["param_names"] == [k for k, _ in prefixed]  # copied, as torch does
    _train(resumed, fresh, STEPS - 4)
    _assert_nets_equal(resumed, straight, rtol=0, atol=0)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("subject", SUBJECTS, ids=repr)
def test_a_copy_keeps_the_state_and_goes_its_own_way(subject, how):
    straight = _net()
    _train(straight, _ours(subject, straight))
    net = _net()
    opt = _ours(subject, net)
    _train(net, opt, 4)
    net_copy, opt_copy = copy.deepcopy((net, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((net, opt)))
    _train(net_copy, opt_copy, STEPS - 4)
    _assert_nets_equal(net_copy, straight, rtol=0, atol=0)
    assert not torch.equal(net[0].weight, net_copy[0].weight)  # the original did not move with the copy
    _train(net, opt, STEPS - 4)
    _assert_nets_equal(net, straight, rtol=0, atol=0)


def test_a_transform_that_does_not_record_how_it_was_built_deep_copies_and_refuses_pickling_clearly():
    net = _net()
    opt = O.as_torch_optimizer(O.chain(O.scale_by_adam(), O.scale_by_learning_rate(0.01)), net.named_parameters())
    _train(net, opt, 2)
    net_copy, opt_copy = copy.deepcopy((net, opt))
    _train(net_copy, opt_copy, 2)
    with pytest.raises((AttributeError, pickle.PicklingError, TypeError), match="local"):
        pickle.dumps(opt)


# --- optimizer.state, hooks, closures -------------------------------------------------------------------------------


@pytest.mark.parametrize("subject", SUBJECTS, ids=repr)
def test_optimizer_state_exposes_each_parameters_state(subject):
    net = _net()
    opt = _ours(subject, net)
    _train(net, opt, 2)
    functional = {id(t) for t in torch.utils._pytree.tree_leaves(opt.functional_states)}
    assert set(opt.state) == set(net.parameters())
    if subject.name in STATELESS:  # nothing to expose, as torch's SGD without momentum
        assert not any(opt.state[p] for p in net.parameters())
        return
    for p in net.parameters():
        entries = opt.state[p]
        assert entries and all(isinstance(v, torch.Tensor) for v in entries.values())
        assert all(id(v) in functional for v in entries.values())  # views of the functional state, not copies
    before = {k: v.clone() for k, v in opt.state[net[0].weight].items()}
    _train(net, opt, 1)
    assert any(not torch.equal(before[k], v) for k, v in opt.state[net[0].weight].items())
    if subject.name == "adam":
        assert set(opt.state[net[0].weight]) == {"count", "mu", "nu"}
        assert opt.state[net[0].weight]["count"].item() == 3


@pytest.mark.parametrize("subject", SUBJECTS, ids=repr)
def test_hooks_see_everything(subject):
    net = _net()
    opt = _ours(subject, net)
    seen = {}
    def record(key, value):  # a hook that returns None leaves the state dict as it is
        seen[key] = value

    opt.register_state_dict_pre_hook(lambda o: record("pre", True))
    opt.register_state_dict_post_hook(lambda o, sd: record("post", {k: set(v) for k, v in sd["state"].items()}))
    opt.register_load_state_dict_pre_hook(lambda o, sd: record("load_pre", len(sd["state"])))
    opt.register_load_state_dict_post_hook(lambda o: record("load_post", len(o.state)))
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.setdefault("steps", []).append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.setdefault("steps", []).append("post"))
    _train(net, opt, 2)
    state_dict = opt.state_dict()
    assert seen["pre"] and seen["post"] == {k: set(v) for k, v in state_dict["state"].items()}
    assert set(seen["post"]) == set(range(len(NAMES)))
    assert all(seen["post"].values()) or subject.name in STATELESS
    opt.load_state_dict(state_dict)
    assert seen["load_pre"] == len(NAMES) and seen["load_post"] == len(NAMES)
    assert seen["steps"] == ["pre", "post"] * 2


@pytest.mark.parametrize("subject", SUBJECTS, ids=repr)
def test_step_takes_torchs_closure(subject):
    net, other = _net(), _net()
    opt, other_opt = _ours(subject, net), _ours(subject, other)

    def closure():
        opt.zero_grad()
        loss = _loss(net)
        loss.backward()
        return loss

    for _ in range(3):
        returned = opt.step(closure)
        assert isinstance(returned, torch.Tensor) and returned.requires_grad
    _train(other, other_opt, 3)
    _assert_nets_equal(net, other, rtol=0, atol=0)


def test_a_mixture_needs_the_loss_and_says_how_to_give_it():
    net = _net()
    opt = O.as_torch_optimizer(_mixture(), net.named_parameters())
    _loss(net).backward()
    with pytest.raises(ValueError, match=r"step\(loss=loss\) or step\(closure\)"):
        opt.step()


# --- the learned mixture over param groups ---------------------------------------------------------------------------


def test_a_mixtures_layers_spread_over_groups_with_their_own_learning_rates():
    net, other = _net(), _net()
    opt = O.as_torch_optimizer(_mixture(), [{"params": list(net.named_parameters())[:2]},
                                            {"params": list(net.named_parameters())[2:], "lr": 0.5}])
    _train(net, opt)
    transform, params = _mixture(), {k: v.detach().clone() for k, v in other.named_parameters()}
    state = transform.init(params)
    for _ in range(STEPS):
        grads, loss = grad_and_value(_functional_loss)(params)
        updates, state = transform.update(grads, state, params, loss=loss)
        params = {k: p + (0.5 if k.startswith("2.") else 1.0) * updates[k] for k, p in params.items()}
    _assert_nets_equal(net, params, rtol=1e-10, atol=1e-13)


def test_a_mixtures_layers_can_be_added_later_and_unknown_ones_are_refused():
    net = _net()
    opt = O.as_torch_optimizer(_mixture(), list(net.named_parameters())[:2])  # the head still frozen
    _train(net, opt, 3)
    head = net[2].weight.detach().clone()
    opt.add_param_group({"params": list(net.named_parameters())[2:], "lr": 0.5})
    _train(net, opt, 3)
    assert not torch.equal(net[2].weight, head)
    with pytest.raises(ValueError, match=r"no coefficients for parameters \['extra'\]"):
        opt.add_param_group({"params": [("extra", nn.Parameter(torch.ones(2, dtype=torch.float64)))]})
    with pytest.raises(ValueError, match=r"split a layer"):
        O.as_torch_optimizer(O.LayerwiseMixture({"all": NAMES}, horizon=5).double().optimizer(),
                             list(_net().named_parameters())[:2])
    assert len(opt.param_groups) == 2 and len(opt.functional_states) == 2  # the refused group left nothing behind


# --- error inputs ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda p: O.as_torch_optimizer(O.adam(1e-3), p, lr=-1.0), ValueError,
         "FunctionalOptimizer: lr must be a finite number >= 0"),
        (lambda p: O.as_torch_optimizer(O.adam(1e-3), [{"params": p, "lr": -0.1}]), ValueError,
         "lr must be a finite number >= 0"),
        (lambda p: O.as_torch_optimizer(O.adam(1e-3), []), ValueError, "empty parameter list"),
        (lambda p: O.as_torch_optimizer(O.adam(1e-3), {}), ValueError, "empty parameter list"),
        (lambda p: O.as_torch_optimizer(O.adam(1e-3), p + p[:1]), ValueError, "lists a parameter more than once"),
        (lambda p: O.as_torch_optimizer(O.adam(1e-3), [{"params": p[:2]}, {"params": p[1:]}]), ValueError,
         "more than one parameter group"),
        (lambda p: O.as_torch_optimizer(O.adam(1e-3), [{"params": p, "betas": (0.9,)}]), ValueError,
         r"betas must be a pair"),
        (lambda p: O.as_torch_optimizer(O.adam(1e-3), [{"params": p, "betas": (1.5, 0.9)}]), ValueError,
         "invalid b1"),
        (lambda p: O.as_torch_optimizer(O.sgd(1e-3), [{"params": p, "fused": True}]), ValueError,
         "'fused' is not an option of sgd"),
        (lambda p: O.as_torch_optimizer(object(), p), ValueError, "init and update"),
    ],
)
def test_error_inputs_are_refused_clearly(build, error, message):
    with pytest.raises(error, match=message):
        build(list(_net().parameters()))


# --- complex parameters ----------------------------------------------------------------------------------------------

_A = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.complex128)
_B = torch.randn(5, generator=torch.Generator().manual_seed(3), dtype=torch.complex128)


def _complex_train(opt, z: nn.Parameter, steps: int = STEPS) -> None:
    for _ in range(steps):
        opt.zero_grad()
        loss = (_A @ (torch.view_as_complex(z) if not z.is_complex() else z) - _B).abs().pow(2).mean()
        loss.backward()
        _step(opt, loss)


@pytest.mark.parametrize("subject", SUBJECTS, ids=repr)
def test_complex_parameters_are_stepped_as_real_ones_as_torch_does(subject):
    start = torch.randn(3, generator=torch.Generator().manual_seed(4), dtype=torch.complex128)
    z = nn.Parameter(start.clone())

    def make(param, name):
        transform = subject.make(subject.lr, layers=(name,)) if subject.learned else subject.make(subject.lr)
        return O.as_torch_optimizer(transform, [(name, param)])

    _complex_train(make(z, "z"), z)
    assert not torch.equal(z.detach(), start)
    if subject.torch is not None:  # torch views a complex parameter (and its state) as real
        reference = nn.Parameter(start.clone())
        _complex_train(subject.torch([reference], subject.lr), reference)
    else:  # the same as the real view of it
        reference = nn.Parameter(torch.view_as_real(start).clone())
        _complex_train(make(reference, "z"), reference)
        reference = torch.view_as_complex(reference.detach())
    torch.testing.assert_close(z.detach(), reference.detach(), **TOL)


@pytest.mark.parametrize("make", [O.adam(0.1), O.sign_descent(0.1), O.lion(0.1), O.sgd(0.1, 0.9)], ids=repr)
def test_the_functional_api_refuses_complex_parameters_clearly(make):
    params = {"z": torch.ones(3, dtype=torch.complex128)}
    with pytest.raises(ValueError, match=r"parameter 'z' is complex .*torch.view_as_real"):
        make.update(params, make.init(params), params)


# --- MAML through Adam -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adam", "rmsprop", "adagrad"])
def test_maml_through_adam_at_eps_root_zero_has_a_finite_meta_gradient(name):
    """A gradient entry exactly 0 (a masked weight): d sqrt(v)/dv at v = 0 used to turn the meta-gradient NaN."""
    optimizer = {"adam": O.adam(0.1), "rmsprop": O.rmsprop(0.1), "adagrad": O.adagrad(0.1)}[name]
    init = torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)  # the middle gradient is exactly zero

    def inner_loss(p):
        return ((p["w"] * mask - 0.3) ** 2).sum()

    params = {"w": init}
    state = optimizer.init(params)
    for _ in range(3):
        grads = dict(zip(params, torch.autograd.grad(inner_loss(params), list(params.values()), create_graph=True)))
        updates, state = optimizer.update(grads, state, params)
        params = O.apply_updates(params, updates)
    (meta_grad,) = torch.autograd.grad(inner_loss(params) + params["w"].sum(), init)
    assert torch.isfinite(meta_grad).all() and meta_grad[0] != 0


# --- the README's training loop -------------------------------------------------------------------------------------


def test_the_readme_training_loop_runs(tmp_path, monkeypatch):
    """The README's example as a user runs it: a scheduler and a checkpoint round trip, and the loss goes down."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### A learned optimizer in your own training loop", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "ckpt.pt").exists() and namespace["last"] < namespace["first"]
    assert isinstance(namespace["opt"], torch.optim.Optimizer) and namespace["opt"].state
