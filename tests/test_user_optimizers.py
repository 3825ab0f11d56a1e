"""A specialized optimizer for a user's own model: the environment from a module, one-file save and load (onto
other depths by layer kind), the plain-loop contract, the pipeline's user factories, optimizers_for, examples."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import metaopt
import optimizers as O
from metaopt import wandb_native
from metaopt.config import RECIPE_DIR
from metaopt.environments import digits_finetuning

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _mlp(depth: int = 2, width: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(4, width), nn.Tanh()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 3)).double()


X = torch.randn(32, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
Y = torch.randint(3, (32,), generator=torch.Generator().manual_seed(2))


def _perturbed(module: nn.Module) -> nn.Module:
    """Meta-parameters moved off their (partly zero) initialisation, so that every one of them matters."""
    torch.manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return module


def _trained_mixture(model: nn.Module, **kwargs) -> O.LayerwiseMixture:
    return _perturbed(O.LayerwiseMixture.for_parameters(model.named_parameters(), horizon=6, **kwargs).double())


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, *, give_loss: bool = True) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(X), Y)
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss) if give_loss else opt.step()
        losses.append(loss.item())
    return losses


# --- 1. an environment from a user's module ----------------------------------------------------------------------


@pytest.mark.parametrize("form", ["tensors", "dataloader", "dataset"])
def test_an_environment_from_a_user_module_follows_the_digits_environment(form):
    """The same weights, data and mini-batches: the loss trajectory of the built-in environment, to the bit."""
    builtin = digits_finetuning(horizon=6, pretrain_steps=5)
    start = builtin.init(lambda _: O.sgd(0.0), None, torch.Generator().manual_seed(0)).params
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5))
    model.load_state_dict({"0.weight": start["0.weight"], "0.bias": start["0.bias"],
                           "2.weight": start["1.weight"], "2.bias": start["1.bias"]})
    data = {"tensors": (builtin.x, builtin.y), "dataset": TensorDataset(builtin.x, builtin.y),
            "dataloader": DataLoader(TensorDataset(builtin.x, builtin.y), batch_size=64)}[form]
    mine = O.Environment.from_module(model, data, F.cross_entropy, horizon=6)
    assert mine.batch_size == builtin.batch_size == 64
    mixture = _perturbed(O.LayerwiseMixture.for_parameters(model.named_parameters(), horizon=6))
    # the built-in names its layers 0 and 1, the module 0 and 2: the same mixture under either naming
    renamed = O.LayerwiseMixture({"0": ["0.weight", "0.bias"], "2": ["1.weight", "1.bias"]}, horizon=6)
    renamed.load_state_dict(mixture.state_dict())
    with torch.no_grad():
        expected = builtin.unroll(renamed.optimizer, None, 6, generator=torch.Generator().manual_seed(0)).losses
        got = mine.unroll(mixture.optimizer, None, 6, generator=torch.Generator().manual_seed(0)).losses
    assert torch.equal(got, expected) and got[-1] < got[0]


def test_an_environment_from_a_factory_draws_fresh_initialisations_from_the_run_generator():
    env = O.Environment.from_module(lambda: nn.Linear(4, 3).double(), (X, Y), "cross_entropy", horizon=2)
    first, again, other = (env.init(lambda _: O.sgd(0.1), None, torch.Generator().manual_seed(s)).params
                           for s in (0, 0, 1))
    assert torch.equal(first["weight"], again["weight"]) and not torch.equal(first["weight"], other["weight"])
    with pytest.raises(ValueError, match=r"data must give \(x, y\) pairs"):
        O.Environment.from_module(nn.Linear(4, 3), [X], "mse", horizon=2)
    with pytest.raises(ValueError, match="model must be an nn.Module"):
        O.Environment.from_module(lambda: 3, (X, Y), "mse", horizon=2)


def test_the_whole_set_loss_is_measured_on_a_fixed_subset_of_eval_examples():
    model = _mlp()
    full = O.Environment.from_module(model, (X, Y), F.cross_entropy, horizon=3, batch_size=8)
    sub = O.Environment.from_module(model, (X, Y), F.cross_entropy, horizon=3, batch_size=8, eval_examples=10)
    params = dict(model.named_parameters())
    # the subset: 10 distinct examples of the training set, the same ones every time (a seed of its own)
    chosen = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))[:10]
    with torch.no_grad():
        expected = float(F.cross_entropy(model(X[chosen]), Y[chosen]))
    assert sub.evaluate(params) == pytest.approx(expected, abs=1e-12)
    assert full.evaluate(params) == pytest.approx(float(F.cross_entropy(model(X), Y).detach()), abs=1e-12)
    assert sub.evaluate(params) != pytest.approx(full.evaluate(params), abs=1e-6)
    # training itself still draws its mini-batches from every example: the same runs, only measured on fewer
    adam = lambda _: O.adam(0.01)  # noqa: E731
    with torch.no_grad():
        assert torch.equal(sub.unroll(adam, None, 3, generator=torch.Generator().manual_seed(0)).losses,
                           full.unroll(adam, None, 3, generator=torch.Generator().manual_seed(0)).losses)
    more = O.Environment.from_module(model, (X, Y), F.cross_entropy, horizon=3, eval_examples=100)
    assert more.evaluate(params) == full.evaluate(params)  # more than there are: all of them
    with pytest.raises(ValueError, match="eval_examples"):
        O.Environment.from_module(model, (X, Y), F.cross_entropy, horizon=3, eval_examples=0)


# --- 2. one file: save -> load ------------------------------------------------------------------------------------


class _ItemNet(nn.Module):
    """A model vmap cannot batch: it reads a value back to Python."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3).double()

    def forward(self, x):
        return self.linear(x) * (1.0 if self.linear.weight.sum().item() < 1e9 else 0.0)


@pytest.mark.parametrize("batch_size", [8, None])
def test_batched_inner_runs_give_the_sequential_estimate(batch_size):
    env = O.Environment.from_module(lambda: _mlp(3), (X, Y), F.cross_entropy, horizon=5, batch_size=batch_size)
    mixture = _perturbed(O.LayerwiseMixture.for_parameters(_mlp(3).named_parameters(), horizon=5,
                                                          direction_kwargs={"adam": {"eps_root": 1e-16}}).double())
    meta = dict(mixture.named_parameters())
    # the batched runs reproduce unroll's losses run by run
    metas = [{k: v.detach() + 0.01 * i for k, v in meta.items()} for i in range(3)]
    batched = env.unroll_runs(mixture.optimizer, metas, 5, [torch.Generator().manual_seed(i) for i in range(3)])
    with torch.no_grad():
        one_by_one = torch.stack([env.unroll(mixture.optimizer, m, 5, generator=torch.Generator().manual_seed(i)).losses
                                  for i, m in enumerate(metas)])
    assert batched.shape == (3, 5) and torch.allclose(batched, one_by_one, rtol=0, atol=1e-12)
    # and so the ES estimate does not depend on how many runs go together
    estimates = [O.AntitheticES(sigma=0.01, pairs=3, batch_runs=b).estimate(
        env, mixture.optimizer, meta, generator=torch.Generator().manual_seed(7)) for b in (1, 4, None)]
    for other in estimates[1:]:
        assert other.loss == pytest.approx(estimates[0].loss, abs=1e-12)
        assert all(torch.allclose(other.grads[k], estimates[0].grads[k], rtol=0, atol=1e-9) for k in meta)


def test_an_unbatchable_model_falls_back_to_one_run_after_another():
    env = O.Environment.from_module(_ItemNet(), (X, Y), F.cross_entropy, horizon=3, batch_size=8)
    sgd = lambda meta: O.sgd(meta["lr"])  # noqa: E731
    meta = {"lr": torch.tensor(0.1, dtype=torch.float64)}
    reference = O.AntitheticES(pairs=2, batch_runs=1).estimate(env, sgd, meta,
                                                               generator=torch.Generator().manual_seed(0))
    estimator = O.AntitheticES(pairs=2, batch_runs=None)
    with pytest.warns(RuntimeWarning, match="could not be batched"):
        estimate = estimator.estimate(env, sgd, meta, generator=torch.Generator().manual_seed(0))
    assert estimate.loss == reference.loss and torch.equal(estimate.grads["lr"], reference.grads["lr"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        estimator.estimate(env, sgd, meta, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="batch_runs must be an int >= 1"):
        O.AntitheticES(batch_runs=0)



@pytest.mark.parametrize("static", [False, True])
def test_save_then_load_gives_the_same_updates_bit_for_bit(tmp_path, static):
    model, copy = _mlp(), _mlp()
    mixture = _trained_mixture(model, static=static, base_lrs={"adam": 0.02})
    path = O.save(mixture, tmp_path / "mixture.pt", recipe={"steps": 3, "grid": (1, 2)}, metrics={"loss": 0.5})
    content = torch.load(path, weights_only=True)  # plain data only
    assert content["class"] == "LayerwiseMixture" and content["horizon"] == 6 and content["base_lrs"]["adam"] == 0.02
    assert [(layer["name"], layer["kind"]) for layer in content["layers"]] == [("0", "matrix"), ("2", "matrix")]
    assert content["recipe"] == {"steps": 3, "grid": [1, 2]} and content["metrics"] == {"loss": 0.5}
    reference = O.as_torch_optimizer(mixture.optimizer(), model.named_parameters())
    loaded = O.load(path, copy.named_parameters())
    assert _train(model, reference, 6) == _train(copy, loaded, 6)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), copy.parameters()))


def test_a_per_parameter_mlp_round_trips_and_loads_onto_any_model(tmp_path):
    learned = _perturbed(O.PerParameterMLP(hidden=4).double())
    path = O.save(O.as_torch_optimizer(learned.optimizer(), _mlp().parameters()), tmp_path / "mlp.pt")
    model, copy = _mlp(), _mlp()
    reference = O.as_torch_optimizer(learned.optimizer(), model.parameters())
    assert _train(model, reference, 4) == _train(copy, O.load(path, copy.named_parameters()), 4)
    deeper = _mlp(depth=4)
    assert _train(deeper, O.load(path, deeper.named_parameters()), 2)[-1] < 10


def test_files_that_are_not_learned_optimizers_are_refused(tmp_path):
    torch.save({"embedding": torch.ones(2)}, tmp_path / "state.pt")
    with pytest.raises(ValueError, match="is not a learned-optimizer file"):
        O.load(tmp_path / "state.pt", _mlp().named_parameters())
    with pytest.raises(ValueError, match="save takes a LayerwiseMixture or PerParameterMLP"):
        O.save(nn.Linear(2, 2), tmp_path / "x.pt")
    with pytest.raises(ValueError, match="needs named parameters"):
        O.load(O.save(_trained_mixture(_mlp()), tmp_path / "m.pt"), _mlp().parameters())


# --- 3. onto another depth, by layer kind -------------------------------------------------------------------------


def test_a_mixture_loads_onto_a_deeper_model_by_layer_kind_and_relative_depth(tmp_path):
    mixture = _trained_mixture(_mlp(depth=2))
    path = O.save(mixture, tmp_path / "mixture.pt")
    deeper = _mlp(depth=4)
    mapped = O.load_learned(path, deeper.named_parameters())
    assert mapped.layer_names == ["0", "2", "4", "6"] and mapped.layer_kinds == ["matrix"] * 4
    rows = [0, 0, 1, 1]  # first and last keep theirs; the middle ones take the nearest by relative depth
    assert torch.equal(mapped.embedding, mixture.embedding[rows]) and torch.equal(mapped.alpha0, mixture.alpha0[rows])
    assert all(torch.equal(a, b) for a, b in zip(mapped.mlp.parameters(), mixture.mlp.parameters()))
    losses = _train(deeper, O.load(path, deeper.named_parameters()), 6)
    assert losses[-1] < losses[0]
    assert O.match_layers(["matrix", "vector", "matrix"], ["matrix", "vector", "matrix", "vector", "matrix"]) == [
        0, 1, 0, 1, 2]


def test_loading_where_it_cannot_map_says_why(tmp_path):
    path = O.save(_trained_mixture(_mlp()), tmp_path / "mixture.pt")
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 3))  # the MLP's parameter names, other kinds
    with pytest.raises(ValueError, match=r"no layer of kind \['conv2d'\].*layers of kinds \['matrix'\]"):
        O.load(path, conv.named_parameters())
    names_only = _perturbed(O.LayerwiseMixture(["0.weight", "0.bias", "2.weight", "2.bias"], horizon=6).double())
    bare = O.save(names_only, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="records no layer kinds, so it loads only onto parameters of those names"):
        O.load(bare, _mlp(depth=3).named_parameters())
    recorded = O.save(names_only, tmp_path / "kinds.pt", params=_mlp().named_parameters())
    assert O.load_learned(recorded, _mlp(depth=3).named_parameters()).layer_kinds == ["matrix"] * 3


# --- 4. in a plain loop -----------------------------------------------------------------------------------------------


def test_step_without_the_loss_holds_the_running_estimate(tmp_path):
    path = O.save(_trained_mixture(_mlp()), tmp_path / "mixture.pt")
    model = _mlp()
    opt = O.load(path, model.named_parameters())
    _train(model, opt, 3)
    state = opt.functional_states[0]
    decays = torch.tensor([0.9, 0.99], dtype=torch.float64)
    estimate = state.loss_ema / (1 - decays ** state.count)
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, 2, give_loss=False)  # what a generic trainer does
    after = opt.functional_states[0]
    assert int(after.count) == 5 and not any(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert torch.allclose(after.loss_ema / (1 - decays ** after.count), estimate, rtol=1e-12)
    fresh = _mlp()
    never = O.load(path, fresh.named_parameters())  # no loss at all: the averages read 0
    _train(fresh, never, 2, give_loss=False)
    assert int(never.functional_states[0].count) == 2 and not never.functional_states[0].loss_ema.any()
    closure_model, given_model = _mlp(), _mlp()
    closure_opt = O.load(path, closure_model.named_parameters(), missing_loss="error")
    given_opt = O.load(path, given_model.named_parameters())
    for _ in range(3):  # step(closure) feeds the loss exactly as step(loss=...)
        for net, optimizer, by_closure in ((closure_model, closure_opt, True), (given_model, given_opt, False)):
            loss = F.cross_entropy(net(X), Y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step(lambda loss=loss: loss) if by_closure else optimizer.step(loss=loss)
    assert all(torch.equal(a, b) for a, b in zip(closure_model.parameters(), given_model.parameters()))
    with pytest.raises(ValueError, match="missing_loss='estimate'"):
        _train(closure_model, closure_opt, 1, give_loss=False)


def test_a_refused_param_group_leaves_the_optimizer_as_it_was(tmp_path):
    path = O.save(_trained_mixture(_mlp()), tmp_path / "mixture.pt")
    model = _mlp()
    opt = O.load(path, model.named_parameters())
    _train(model, opt, 2)
    before = opt.state_dict()
    norm = nn.LayerNorm(3).double()  # a vector layer: the mixture has none
    with pytest.raises(ValueError, match=r"kind 'vector', and this mixture's layers are of kinds \['matrix'\]"):
        opt.add_param_group({"params": list(norm.named_parameters(prefix="norm"))})
    with pytest.raises(ValueError, match="lists a parameter more than once"):
        head = nn.Linear(3, 3).double()
        opt.add_param_group({"params": [("head.weight", head.weight), ("head.bias", head.weight)]})
    assert len(opt.param_groups) == 1 and len(opt.functional_states) == 1
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["state"][i][k], v)
               for i, entries in before["state"].items() for k, v in entries.items())
    _train(model, opt, 1)  # and it steps on


def test_a_new_param_group_takes_the_coefficients_of_the_last_layer_of_its_kind(tmp_path):
    model = _mlp(depth=3)
    mixture = _trained_mixture(model, static=True)
    opt = O.load(O.save(mixture, tmp_path / "static.pt"), model.named_parameters())
    head = nn.Linear(3, 2).double()
    opt.add_param_group({"params": list(head.named_parameters(prefix="head")), "lr": 0.5})
    loss = F.cross_entropy(head(model(X)), Y[:, None].remainder(2).squeeze(1))
    loss.backward()
    opt.step(loss=loss)
    coefficients = opt.functional_states[1].coefficients  # the mixture's layers, then the added one
    assert coefficients.shape == (4, 5) and torch.equal(coefficients[-1], mixture.alpha[-1])
    cnn_file = O.save(O.LayerwiseMixture.for_parameters(nn.Conv2d(1, 2, 3).named_parameters(prefix="c"), horizon=4),
                      tmp_path / "conv.pt")
    conv = nn.Conv2d(1, 2, 3)
    conv_opt = O.load(cnn_file, conv.named_parameters(prefix="c"))
    with pytest.raises(ValueError, match="kind 'matrix'"):
        conv_opt.add_param_group({"params": list(nn.Linear(2, 2).named_parameters(prefix="fc"))})


def test_past_the_horizon_one_warning_says_how_the_rule_extrapolates(tmp_path):
    model = _mlp()
    opt = O.load(O.save(_trained_mixture(model), tmp_path / "mixture.pt"), model.named_parameters())
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(10):  # horizon 6
            _train(model, opt, 1)
            scheduler.step()
    (warning,) = [w for w in caught if "past the horizon" in str(w.message)]
    assert "step 7 is past the horizon T=6" in str(warning.message)
    assert "extrapolates" in str(warning.message) and "horizon=N" in str(warning.message)
    assert warning.filename == __file__  # attributed to the line that called step()
    stretched = O.load(tmp_path / "mixture.pt", _mlp().named_parameters(), horizon=20)
    assert stretched._default_optimizer.hyperparams.factory.__self__.horizon == 20


# --- the pipeline's user factories, the W&B artifact, optimizers_for, the examples ---------------------------------


def user_environment(horizon: int, width: int = 8) -> O.Environment:
    """A user's ``make_env``: their module, their data, their loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 3))
    data = DataLoader(TensorDataset(X.float(), Y), batch_size=16)
    return O.Environment.from_module(model, data, F.cross_entropy, horizon=horizon)


def test_an_optimizer_recipe_takes_a_users_environment_factory_and_logs_the_one_file(tmp_path, monkeypatch):
    recipe = OmegaConf.load(RECIPE_DIR / "specialized_optimizer.yaml")
    recipe.environment = {"_target_": "test_user_optimizers.user_environment", "horizon": 3}
    recipe.environments = {}
    del recipe.learned["per_parameter_mlp"]
    del recipe.learned["layerwise_mixture_uniform"]
    recipe.claims = []  # they name the bundled recipe's environments and learned optimizers
    path = tmp_path / "mine.yaml"
    path.write_text(OmegaConf.to_yaml(recipe))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    metaopt.run(str(path), [
        f"output_dir={tmp_path}", "wandb.mode=offline", "threads=1", "progress=false", "meta_train.steps=1",
        "meta_train.estimator.pairs=1", "evaluation.seeds=1", "tuning.seeds=1", "baselines.sgd.lrs=[0.1]",
        "baselines.momentum.lrs=[0.1]", "baselines.adam.lrs=[0.01,0.1]"])
    (run_dir,) = (tmp_path / "specialized_optimizer").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["evaluation"]) == {"environment"}
    file = wandb_native.learned_optimizer_path(run_dir, "layerwise_mixture")
    content = torch.load(file, weights_only=True)
    assert [layer["parameters"] for layer in content["layers"]] == [["0.weight", "0.bias"], ["2.weight", "2.bias"]]
    assert content["recipe"]["environment"]["_target_"] == "test_user_optimizers.user_environment"
    assert content["metrics"]["meta_training"]["meta_steps"] == 1 and "environment" in content["metrics"]["evaluation"]
    assert content["base_lrs"]["adam"] == results["tuned_learning_rates"]["adam"]["best"]
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3), nn.Tanh(), nn.Linear(3, 3))  # deeper
    assert O.load(file, net.named_parameters()).param_groups[0]["lr"] == 1.0
    artifacts = [a for kind, a in wandb_native.offline_records(run_dir) if kind == "artifact"]
    assert [(a.type, sorted(e.path for e in a.manifest.contents)) for a in artifacts] == [
        ("learned-optimizer", ["optimizers/layerwise_mixture.pt"])]
    assert torch.equal(wandb_native.learned_optimizer_state(run_dir, "layerwise_mixture")["embedding"],
                       content["state_dict"]["embedding"])


def test_optimizers_for_meta_trains_and_returns_a_torch_optimizer(tmp_path, caplog):
    model = _mlp().float()
    caplog.set_level("INFO", logger="metaopt")
    opt = metaopt.optimizers_for(model, (X.float(), Y), F.cross_entropy, horizon=3, steps=2, batch_size=8,
                                 estimator=O.AntitheticES(pairs=1), adam_lrs=[0.01, 0.1], tuning_seeds=1,
                                 init=lambda: _mlp(seed=3).float(), save_to=tmp_path / "mine.pt")
    assert isinstance(opt, torch.optim.Optimizer)
    loss = F.cross_entropy(model(X.float()), Y)
    loss.backward()
    before = model[0].weight.detach().clone()
    opt.step()  # no loss: a generic trainer's call
    assert not torch.equal(before, model[0].weight)
    content = torch.load(tmp_path / "mine.pt", weights_only=True)
    assert content["recipe"]["optimizers_for"]["steps"] == 2 and len(content["metrics"]["meta_losses"]) == 2
    assert content["base_lrs"]["adam"] == content["metrics"]["tuned_adam_lr"] in (0.01, 0.1)
    assert content["recipe"]["optimizers_for"]["eval_examples"] == 1024
    # the progress of both phases is shown (log lines where there is no terminal for a bar)
    shown = [r.getMessage() for r in caplog.records if r.name == "metaopt.progress"]
    assert any(m.startswith("tune Adam: 2 runs") for m in shown) and any(m.startswith("meta-train: 2 meta-steps")
                                                                         for m in shown), shown
    with pytest.raises(ValueError, match="adam_lrs is empty"):
        metaopt.optimizers_for(model, (X, Y), F.cross_entropy, adam_lrs=[])


@pytest.mark.parametrize("example", ["digits_cnn", "char_transformer"])
def test_the_examples_run_shrunk(example, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.delitem(sys.modules, example, raising=False)
    module = __import__(example)
    results = module.main(["--quick", "--out", str(tmp_path)])
    folder = tmp_path / example
    assert {p.name for p in folder.iterdir()} == {"mixture.pt", "loss_curves.png", "results.json"}
    assert set(results["steps_to_tuned_adam"]) == {"adam", "adam_cosine", "specialized"}
    assert results["steps_to_tuned_adam"]["adam"] <= results["horizon"]
    assert O.saving.read(folder / "mixture.pt")["class"] == "LayerwiseMixture"
