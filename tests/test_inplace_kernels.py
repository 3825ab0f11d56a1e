"""In-place kernels: every direction's kernel against its pure update, torch's private kernels against their
public fallback, and the learned mixture's fast path, with and without kernels, against its graph path."""

from __future__ import annotations

import logging
import shutil
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

import optimizers as O
from optimizers import _fused_mix
from optimizers import _torch_kernels as kernels
from optimizers.alias import DEFAULT_BASE_LRS

F64 = torch.float64

# every entry of DIRECTIONS with its defaults, and the variants that take another path through its kernel
VARIANTS = {
    **{name: make for name, make in O.DIRECTIONS.items()},
    "adam_eps_root": lambda: O.adam_direction(eps_root=1e-12),
    "adam_b1_0": lambda: O.adam_direction(b1=0.0),
    "rmsprop_eps_root": lambda: O.rmsprop_direction(eps_root=1e-12),
    "rmsprop_centered": lambda: O.rmsprop_direction(centered=True),
    "adagrad_initial": lambda: O.adagrad_direction(initial_accumulator_value=0.1),
}


def _params(contiguous: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(4, 6, generator=g, dtype=F64)
    return {
        "w": torch.randn(5, 3, generator=g, dtype=F64),
        "b": torch.randn(3, generator=g, dtype=F64),
        "t": t if contiguous else t.T,  # a transposed one is refused by the fused kernels
    }


def _leaves(tree) -> list[torch.Tensor]:
    """The tensors of a state, depth first (named tuples, tuples, lists, dicts)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    values = tree.values() if isinstance(tree, dict) else tree
    return [leaf for value in values for leaf in _leaves(value)]


def _grads(step: int, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    grads = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in like.items()}
    grads["b"][0] = 0.0  # an exactly zero entry (sign 0, rmsprop/adam at v = 0 on the first step)
    return grads


def _assert_trees_close(a, b, **tolerance) -> None:
    leaves_a, leaves_b = _leaves(a), _leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        torch.testing.assert_close(x, y, **tolerance)


def _kernel_against_update(transform: O.GradientTransformation, steps: int = 4, *, contiguous: bool = True) -> None:
    """``apply_`` into the parameters, state advanced in place, equals ``params + scale * update`` (float64)."""
    params = _params(contiguous)
    fast, slow = {k: v.clone() for k, v in params.items()}, {k: v.clone() for k, v in params.items()}
    fast_state, slow_state = transform.init(fast), transform.init(slow)
    scale, workspace = {"w": -0.1, "b": 0.5, "t": -2.0}, O.Workspace()
    for step in range(steps):
        grads = _grads(step, params)
        with torch.no_grad():
            fast_state = transform.update.apply_(fast, grads, fast_state, fast, scale=scale, workspace=workspace)
        updates, slow_state = transform.update(grads, slow_state, slow)
        slow = {k: v + scale[k] * updates[k] for k, v in slow.items()}
        for k in params:
            torch.testing.assert_close(fast[k], slow[k], rtol=1e-12, atol=1e-14)
        _assert_trees_close(fast_state, slow_state, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("contiguous", [True, False], ids=["fusable", "strided"])
@pytest.mark.parametrize("name", VARIANTS)
def test_every_direction_carries_a_kernel_that_follows_its_pure_update(name, contiguous):
    transform = VARIANTS[name]()
    assert isinstance(transform.update, O.InPlaceUpdate)
    _kernel_against_update(transform, contiguous=contiguous)


@pytest.mark.parametrize("name", ["adam", "rmsprop", "momentum", "nesterov"])
def test_the_public_fallback_of_a_private_kernel_follows_the_pure_update(name, monkeypatch):
    monkeypatch.setattr(kernels.FUSED_ADAM, "fn", None)
    monkeypatch.setattr(kernels.FUSED_SGD, "fn", None)
    _kernel_against_update(VARIANTS[name]())


def _run_kernels() -> dict[str, list[torch.Tensor]]:
    """Each private-kernel helper once on fusable float64 tensors (contiguous, one dtype and device); all it wrote."""
    g = torch.Generator().manual_seed(7)

    def tensors(positive: bool = False) -> list[torch.Tensor]:
        drawn = [torch.randn(64, 33, generator=g, dtype=F64), torch.randn(17, generator=g, dtype=F64)]
        return [t.abs() for t in drawn] if positive else drawn

    t = {name: tensors() for name in ("adam", "rmsprop", "momentum", "nesterov")}
    grads, mu, nu, nu2, trace, trace2 = tensors(), tensors(), tensors(True), tensors(True), tensors(), tensors()
    scratch, scales = [torch.empty_like(x) for x in grads], [-0.3, 0.7]
    kernels.adam_(t["adam"], grads, mu, nu, scratch, scales=scales, count=3, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0)
    kernels.rmsprop_(t["rmsprop"], grads, nu2, scratch, scales=scales, alpha=0.99, eps=1e-8, eps_root=0.0)
    kernels.momentum_(t["momentum"], grads, trace, scales=scales, beta=0.9, nesterov=False)
    kernels.momentum_(t["nesterov"], grads, trace2, scales=scales, beta=0.9, nesterov=True)
    return {**t, "mu": mu, "nu": nu, "nu2": nu2, "trace": trace, "trace2": trace2, "grads": grads}


def test_private_kernels_and_their_public_fallback_agree_in_float64(monkeypatch):
    calls = {"adam": 0, "sgd": 0}
    for key, private in (("adam", kernels.FUSED_ADAM), ("sgd", kernels.FUSED_SGD)):
        if private.fn is None:
            pytest.skip(f"this torch has no torch.{private.name}; only the public path runs")

        def counted(*args, _fn=private.fn, _key=key, **kwargs):
            calls[_key] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(private, "fn", counted)
    fused = _run_kernels()
    assert calls == {"adam": 4, "sgd": 4}  # two tensors each: Adam and RMSProp by Adam's kernel, both momenta by SGD's

    monkeypatch.setattr(kernels.FUSED_ADAM, "fn", None)
    monkeypatch.setattr(kernels.FUSED_SGD, "fn", None)
    public = _run_kernels()
    assert fused.keys() == public.keys()
    for name in fused:
        for a, b in zip(fused[name], public[name]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=lambda m, name=name: f"{name}: {m}")


def test_a_private_kernel_that_raises_is_dropped_for_the_fallback(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no such overload")

    monkeypatch.setattr(kernels.FUSED_ADAM, "fn", broken)
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        _kernel_against_update(O.adam_direction(), steps=2)
    assert kernels.FUSED_ADAM.fn is None
    assert "torch._fused_adam_ failed (no such overload)" in caplog.text


def test_workspace_lends_one_distinct_tensor_per_key_and_keeps_it():
    workspace, like = O.Workspace(), {"a": torch.zeros(3, 4), "b": torch.zeros(5), "c": torch.zeros(2, dtype=F64)}
    views = workspace.like(like)
    assert {k: (v.shape, v.dtype) for k, v in views.items()} == {k: (v.shape, v.dtype) for k, v in like.items()}
    for v in views.values():
        v.fill_(1.0)
    views["a"].zero_()
    assert views["b"].eq(1.0).all() and views["c"].eq(1.0).all()  # no two keys share memory
    assert workspace.like(like) is views
    assert workspace.like({"a": torch.zeros(7)})["a"].shape == (7,)


def test_is_plain_tells_torch_func_wrappers_apart():
    seen = []

    def probe(t):
        seen.append(kernels.is_plain(t))
        return t.sum()

    x = torch.randn(3, 2)
    probe(x)
    vmap(probe)(x)
    torch.func.grad(probe)(x)
    assert seen == [True, False, False]


# --- the learned mixture's fast path ------------------------------------------------------------------------------


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _mixture(directions, **kwargs) -> O.LayerwiseMixture:
    torch.manual_seed(3)
    names = [n for n, _ in _net().named_parameters()]
    mixture = O.LayerwiseMixture(names, horizon=10, directions=directions,
                                 initial={d: 1.0 / len(directions) for d in directions}, **kwargs).double()
    with torch.no_grad():
        for p in mixture.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mixture


def _torch_step_against_graph_path(mixture: O.LayerwiseMixture, steps: int = 5, **options) -> None:
    """The in-place step of ``as_torch_optimizer`` (of ``mixture.optimizer(**options)``) equals the mixture's
    differentiable update, in float64."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=g, dtype=F64), torch.randn(16, 3, generator=g, dtype=F64)
    net, reference = _net(), _net()
    optimizer = O.as_torch_optimizer(mixture.optimizer(**options), net.named_parameters())
    functional = mixture.optimizer()
    params = {k: v.detach().clone() for k, v in reference.named_parameters()}
    state = functional.init(params)
    for _ in range(steps):
        net.zero_grad()
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        optimizer.step(loss=loss)
        grads, ref_loss = grad_and_value(lambda p: ((functional_call(reference, p, (x,)) - y) ** 2).mean())(params)
        updates, state = functional.update(grads, state, params, loss=ref_loss)
        params = O.apply_updates(params, updates)
        for k, p in net.named_parameters():
            torch.testing.assert_close(p.detach(), params[k], rtol=1e-10, atol=1e-12)
    _assert_trees_close(optimizer.functional_states[0].directions, state.directions, rtol=1e-10, atol=1e-12)


def test_mixture_of_every_direction_steps_in_place_like_its_graph_path():
    _torch_step_against_graph_path(_mixture(tuple(O.DIRECTIONS)))


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor's CPU backend needs a C++ compiler")
@pytest.mark.parametrize("eps_root", [0.0, 1e-12])
def test_compiled_fused_step_of_every_direction_equals_its_graph_path(eps_root, caplog):
    """One compiled pass for all directions: parameters and every direction's state (momentum traces, Adam's
    moments and counts, ...) after five steps, from the first, with each layer's own coefficients."""
    roots = {"adam": {"eps_root": eps_root}, "rmsprop": {"eps_root": eps_root}}
    mixture = _mixture(tuple(O.DIRECTIONS), direction_kwargs=roots)
    plan = _fused_mix.plan(mixture._directions)
    assert plan is not None and [kind for kind, _ in plan] == list(O.DIRECTIONS)
    with caplog.at_level(logging.WARNING):
        _torch_step_against_graph_path(mixture, compile=True)
    assert _fused_mix._COMPILED[plan] is not None  # it compiled and ran, rather than falling back
    assert not [r for r in caplog.records if "failed" in r.getMessage()]  # nor did the coefficients fall back

    # the no-grad functional update takes the same compiled step, on a copy of the state
    compiled, graph = mixture.optimizer(compile=True), mixture.optimizer()
    params = {k: v.detach().clone() for k, v in _net().named_parameters()}
    state, reference = compiled.init(params), graph.init(params)
    g = torch.Generator().manual_seed(4)
    for step in range(3):
        grads = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in params.items()}
        with torch.no_grad():
            updates, state = compiled.update(grads, state, params, loss=torch.tensor(1.0 + step, dtype=F64))
        expected, reference = graph.update(grads, reference, params, loss=torch.tensor(1.0 + step, dtype=F64))
        _assert_trees_close(updates, expected, rtol=1e-10, atol=1e-12)
        params = O.apply_updates(params, updates)
    _assert_trees_close(state.directions, reference.directions, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_adams_bias_corrections_of_the_fused_step_hold_in_low_precision(dtype):
    """1 - 0.999^t in bfloat16 arithmetic is 0 (0.999 rounds to 1): the corrections are computed in float64."""
    state = SimpleNamespace(count={"w": torch.zeros((), dtype=torch.int64)})
    steps = (("adam", (("b1", 0.9), ("b2", 0.999), ("eps", 1e-8), ("eps_root", 0.0))),)
    (numbers,) = _fused_mix._advance_counts(steps, [state], ["w"], torch.zeros(3, dtype=dtype))
    expected = torch.tensor([[0.1, 1e-3, 1e-3 ** 0.5]], dtype=torch.float64).to(dtype)
    assert numbers.dtype == dtype and state.count["w"] == 1
    torch.testing.assert_close(numbers, expected, rtol=0, atol=0)


def test_compiled_step_falls_back_to_the_kernels_when_compiling_fails(monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(_fused_mix, "_COMPILED", {})
    mixture = _mixture(("sgd", "momentum", "adam", "rmsprop", "sign"))
    with caplog.at_level(logging.WARNING):
        _torch_step_against_graph_path(mixture, compile=True)  # Adam's counts are not advanced twice
    assert list(_fused_mix._COMPILED.values()) == [None]
    assert sum("fused mixture step failed" in r.getMessage() for r in caplog.records) == 1
    assert sum("coefficients failed" in r.getMessage() for r in caplog.records) == 1


def test_only_directions_with_a_known_rule_and_number_hyperparameters_are_fused():
    assert _fused_mix.plan([O.adam_direction(b1=0.8), O.sign_direction()]) == (
        ("adam", (("b1", 0.8), ("b2", 0.999), ("eps", 1e-8), ("eps_root", 0.0))), ("sign", ()))
    assert _fused_mix.plan([O.adam_direction(amsgrad=True)]) is None
    assert _fused_mix.plan([O.rmsprop_direction(centered=True)]) is None
    assert _fused_mix.plan([O.adam_direction(b1=torch.tensor(0.8))]) is None
    assert _fused_mix.plan([O.chain(O.adam_direction(), O.scale(2.0))]) is None
    with pytest.raises(ValueError, match="compile must be True or False"):
        _mixture(("adam",)).optimizer(compile="yes")


def test_a_direction_without_a_kernel_is_mixed_correctly(monkeypatch):
    """A new direction with only a pure update (here 2 x Adam) still gives the mixture's exact steps."""

    def doubled_adam() -> O.GradientTransformation:
        return O.chain(O.adam_direction(), O.scale(2.0))

    assert not isinstance(doubled_adam().update, O.InPlaceUpdate)
    monkeypatch.setitem(O.DIRECTIONS, "doubled_adam", doubled_adam)
    monkeypatch.setitem(DEFAULT_BASE_LRS, "doubled_adam", 5e-4)
    _torch_step_against_graph_path(_mixture(("sgd", "doubled_adam", "rmsprop")))


def test_tensor_hyperparameters_take_the_pure_path_inside_the_fast_step():
    b1 = torch.tensor(0.8, dtype=F64)
    assert not isinstance(O.adam_direction(b1=b1).update, O.InPlaceUpdate)
    _torch_step_against_graph_path(_mixture(("adam", "sign"), direction_kwargs={"adam": {"b1": b1}}))


def test_no_grad_update_under_vmap_takes_the_pure_path():
    """Batched tensors cannot be stepped in place: vmapped over tasks, the no-grad update equals the loop."""
    mixture = _mixture(("sgd", "momentum", "adam", "rmsprop", "sign"))
    optimizer = mixture.optimizer()
    g = torch.Generator().manual_seed(2)
    params = {k: torch.randn(3, *v.shape, generator=g, dtype=F64) for k, v in _net().named_parameters()}
    grads = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in params.items()}
    loss = torch.rand(3, generator=g, dtype=F64)

    def one(p, gr, lo):
        return optimizer.update(gr, optimizer.init(p), p, loss=lo)[0]

    with torch.no_grad():
        batched = vmap(one)(params, grads, loss)
        for t in range(3):
            single = one({k: v[t] for k, v in params.items()}, {k: v[t] for k, v in grads.items()}, loss[t])
            for k in single:
                torch.testing.assert_close(batched[k][t], single[k], rtol=1e-10, atol=1e-12)


def test_a_bare_direction_runs_through_as_torch_optimizer_by_its_kernel():
    """as_torch_optimizer steps any InPlaceUpdate in place: the sign direction, the group's lr as the scale."""
    net, params = _net(), {k: v.detach().clone() for k, v in _net().named_parameters()}
    optimizer = O.as_torch_optimizer(O.sign_direction(), net.named_parameters(), lr=0.01)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    for k, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), params[k] + 0.01 * torch.sign(p.grad))
