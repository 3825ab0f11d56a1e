"""Iterate averaging (optimizers/averaging.py) against torch.optim.swa_utils and closed forms."""

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.func import grad
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

import optimizers as O

TOL = {"rtol": 1e-5, "atol": 1e-6}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def _batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)


def _loss(net, t):
    x, y = _batch(t)
    return ((net(x) - y) ** 2).mean()


def _train(net, opt, steps, on_step=lambda t: None, scheduler=None):
    for t in range(steps):
        opt.zero_grad()
        _loss(net, t).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        on_step(t + 1)


def _functional(transform, steps):
    """The pure path: the iterates θ_0 … θ_steps and the final state."""
    net = _net()
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    state = transform.init(params)
    iterates = [params]

    def loss(p, t):
        x, y = _batch(t)
        return ((torch.func.functional_call(net, p, (x,)) - y) ** 2).mean()

    for t in range(steps):
        updates, state = transform.update(grad(loss)(params, t), state, params)
        params = O.apply_updates(params, updates)
        iterates.append(params)
    return iterates, state


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TOL, msg=lambda m: f"{k}: {m}")


def test_ema_equals_torch_averaged_model_and_leaves_the_optimizer_unchanged():
    net, reference_net = _net(), _net()
    opt = O.as_torch_optimizer(O.averaged(O.sgd(0.1, momentum=0.9), ema=O.ema_averaging(0.8)),
                               net.named_parameters())
    torch_opt = torch.optim.SGD(reference_net.parameters(), lr=0.1, momentum=0.9)
    ema = AveragedModel(reference_net, multi_avg_fn=get_ema_multi_avg_fn(0.8))
    ema.update_parameters(reference_net)  # the first call copies θ_0, as the average starts there
    _train(reference_net, torch_opt, 12, on_step=lambda t: ema.update_parameters(reference_net))
    _train(net, opt, 12)
    _close(dict(net.named_parameters()), dict(reference_net.named_parameters()))
    _close(O.averaged_params(opt.functional_states[0]), dict(ema.module.named_parameters()))


def test_swa_equals_torch_averaged_model_under_a_changing_group_lr():
    net, reference_net = _net(), _net()
    opt = O.as_torch_optimizer(O.averaged(O.sgd(0.1, momentum=0.5), swa=O.swa_averaging(start=4, every=3)),
                               net.named_parameters())
    torch_opt = torch.optim.SGD(reference_net.parameters(), lr=0.1, momentum=0.5)
    swa = AveragedModel(reference_net)  # the running mean

    def on_step(t):
        if t >= 4 and (t - 4) % 3 == 0:
            swa.update_parameters(reference_net)

    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.3) for o in (opt, torch_opt)]
    _train(reference_net, torch_opt, 16, on_step=on_step, scheduler=schedulers[1])
    _train(net, opt, 16, scheduler=schedulers[0])
    assert int(swa.n_averaged) == 5
    _close(O.averaged_params(opt.functional_states[0]), dict(swa.module.named_parameters()))


def test_swa_before_its_start_is_the_current_iterate():
    iterates, state = _functional(O.averaged(O.sgd(0.1), swa=O.swa_averaging(start=10)), 6)
    _close(O.averaged_params(state), iterates[-1])


@pytest.mark.parametrize("delta", [1, 3, 20])
def test_two_point_is_the_mean_of_now_and_delta_steps_ago(delta):
    iterates, state = _functional(O.averaged(O.sgd(0.1, momentum=0.9), two=O.two_point_averaging(delta)), 9)
    earlier = iterates[max(9 - delta, 0)]
    _close(O.averaged_params(state), {k: (iterates[-1][k] + earlier[k]) / 2 for k in earlier})


def test_ema_bias_correction_and_warmup_closed_forms():
    decay, steps = 0.7, 6
    iterates, state = _functional(O.averaged(O.sgd(0.1), ema=O.ema_averaging(decay, bias_correction=True)), steps)
    weights = [(1 - decay) * decay ** (steps - i) for i in range(1, steps + 1)]
    expected = {k: sum(w * it[k] for w, it in zip(weights, iterates[1:])) / (1 - decay**steps) for k in iterates[0]}
    _close(O.averaged_params(state), expected)
    # warmup=1: d_t = t / (t + 1) while below decay, the uniform mean of θ_0 … θ_t
    iterates, state = _functional(O.averaged(O.sgd(0.1), ema=O.ema_averaging(0.999, warmup=1)), steps)
    _close(O.averaged_params(state), {k: sum(it[k] for it in iterates) / len(iterates) for k in iterates[0]})


def _averagings():
    return {"ema": O.ema_averaging(0.9), "swa": O.swa_averaging(2, 2), "two": O.two_point_averaging(3),
            "debiased": O.ema_averaging(0.9, bias_correction=True)}


def test_the_in_place_path_equals_the_pure_path_for_every_averaging():
    transform = O.averaged(O.adam(0.05), **_averagings())
    _, state = _functional(transform, 7)
    net = _net()
    opt = O.as_torch_optimizer(transform, net.named_parameters())
    _train(net, opt, 7)
    for name in _averagings():
        _close(O.averaged_params(opt.functional_states[0], name), O.averaged_params(state, name))


def test_state_dict_round_trip_and_pickle_continue_exactly():
    def make(net):
        return O.as_torch_optimizer(O.averaged(O.sgd(0.1, momentum=0.9), **_averagings()), net.named_parameters())

    net = _net()
    opt = make(net)
    _train(net, opt, 5)
    saved, pickled = copy.deepcopy(opt.state_dict()), pickle.loads(pickle.dumps(opt))
    assert {"average.ema", "average.two", "memory.two", "count"} <= set(saved["state"][0])
    resumed_net = copy.deepcopy(net)
    resumed = make(resumed_net)
    resumed.load_state_dict(saved)
    for continued in (opt, resumed):
        _train(net if continued is opt else resumed_net, continued, 4)
    for name in _averagings():
        _close(O.averaged_params(resumed.functional_states[0], name), O.averaged_params(opt.functional_states[0], name))
    assert isinstance(pickled.functional_states[0], O.AveragedState)


def test_swap_averaged_swaps_in_and_out_even_on_error():
    net = _net()
    opt = O.as_torch_optimizer(O.averaged(O.sgd(0.3), ema=O.ema_averaging(0.5), swa=O.swa_averaging()),
                               net.named_parameters())
    _train(net, opt, 4)
    own = {k: v.detach().clone() for k, v in net.named_parameters()}
    with O.swap_averaged(opt, "swa"):
        _close({k: v.detach() for k, v in net.named_parameters()}, O.averaged_params(opt.functional_states[0], "swa"))
        assert not torch.equal(net[0].weight, own["0.weight"])
    _close({k: v.detach() for k, v in net.named_parameters()}, own)
    with pytest.raises(RuntimeError, match="inside"):
        with O.swap_averaged(opt, "ema"):
            raise RuntimeError("inside")
    _close({k: v.detach() for k, v in net.named_parameters()}, own)
    with pytest.raises(ValueError, match="name one of"):
        with O.swap_averaged(opt):
            pass
    plain = O.as_torch_optimizer(O.sgd(0.1), net.parameters())
    with pytest.raises(ValueError, match="not stepped by an averaged"):
        with O.swap_averaged(plain):
            pass


def test_a_parameter_without_gradient_keeps_its_averages():
    net = _net()
    opt = O.as_torch_optimizer(O.averaged(O.sgd(0.1), ema=O.ema_averaging(0.5)), net.named_parameters())
    _train(net, opt, 2)
    before = O.averaged_params(opt.functional_states[0])["2.bias"].clone()
    count = opt.functional_states[0].count["2.bias"].clone()
    net[2].bias.requires_grad_(False)
    _train(net, opt, 3)
    torch.testing.assert_close(O.averaged_params(opt.functional_states[0])["2.bias"], before)
    assert opt.functional_states[0].count["2.bias"] == count == 2
    assert opt.functional_states[0].count["0.weight"] == 5


def test_the_average_is_differentiable_in_the_learning_rate():
    lr = torch.tensor(0.1, requires_grad=True)
    params = {"w": torch.ones(3)}
    transform = O.averaged(O.sgd(lr), ema=O.ema_averaging(0.5), two=O.two_point_averaging(2))
    state = transform.init(params)
    for _ in range(3):
        updates, state = transform.update({"w": 2 * params["w"]}, state, params)
        params = O.apply_updates(params, updates)
    (d_ema,) = torch.autograd.grad(O.averaged_params(state, "ema")["w"].sum(), lr, retain_graph=True)
    (d_two,) = torch.autograd.grad(O.averaged_params(state, "two")["w"].sum(), lr)
    # w_t = (1 - 2 lr)^t, ema = Σ weights w_t: both averages fall as lr grows
    assert d_ema < 0 and d_two < 0


def test_recompute_batchnorm_equals_torch_update_bn():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    reference = copy.deepcopy(model)
    batches = [(torch.randn(16, 3) * (i + 1), torch.zeros(16)) for i in range(4)]
    model.eval()
    O.recompute_batchnorm(model, batches)
    update_bn(batches, reference)
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)
    assert not model.training and model[1].momentum == 0.1


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="decay must be in"):
        O.ema_averaging(1.0)
    with pytest.raises(ValueError, match="not both"):
        O.ema_averaging(0.9, bias_correction=True, warmup=3)
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        O.swa_averaging(1, every=0)
    with pytest.raises(ValueError, match="delta must be an int >= 1"):
        O.two_point_averaging(0)
    with pytest.raises(ValueError, match="at least one averaging"):
        O.averaged(O.sgd(0.1))
    with pytest.raises(ValueError, match="is not an averaging"):
        O.averaged(O.sgd(0.1), ema=0.9)
    with pytest.raises(ValueError, match="also a parameter name"):
        O.averaged(O.sgd(0.1), w=O.ema_averaging(0.9)).init({"w": torch.zeros(2)})
    transform = O.averaged(O.sgd(0.1), ema=O.ema_averaging(0.9))
    with pytest.raises(ValueError, match="needs params"):
        transform.update({"w": torch.ones(2)}, transform.init({"w": torch.zeros(2)}))
