"""The LayerwiseMixture's compiled in-place step (``optimizer(compile=True)``) against its eager step."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import optimizers as O
from optimizers import _fused_mixture

X = torch.randn(16, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
Y = torch.randint(3, (16,), generator=torch.Generator().manual_seed(1))


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3), nn.Linear(3, 3)).double()
    model[3].requires_grad_(False)  # a layer without gradients: left alone by both steps
    return model


def _train(compile: bool, steps: int = 4) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _model()
    torch.manual_seed(1)
    mixture = O.LayerwiseMixture.for_parameters(model.named_parameters(), horizon=10).double()
    with torch.no_grad():  # coefficients off their initialisation, so that every direction contributes
        for p in mixture.parameters():
            p.add_(0.3 * torch.randn_like(p))
    opt = O.as_torch_optimizer(mixture.optimizer(compile=compile), model.named_parameters(), lr=0.5)
    schedule = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.7)  # a new lr every step: no recompiling
    for _ in range(steps):
        loss = F.cross_entropy(model(X), Y)
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss)
        schedule.step()
    return model, opt


def _leaves(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(opt.state_dict()["state"]) if isinstance(t, torch.Tensor)]


def test_the_compiled_step_equals_the_eager_step():
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    eager_model, eager_opt = _train(compile=False)
    model, opt = _train(compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1  # compiled once, for all 4 steps
    for p, q in zip(model.parameters(), eager_model.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-14)
    assert torch.equal(model[3].weight, _model()[3].weight)
    states, eager_states = _leaves(opt), _leaves(eager_opt)
    assert len(states) == len(eager_states) > 0
    for s, e in zip(states, eager_states):  # moments, momentum buffers and step counts advanced alike
        assert torch.allclose(s.double(), e.double(), rtol=0, atol=1e-14)
    assert not torch.equal(model[0].weight, _model()[0].weight)


def test_a_failed_compile_falls_back_to_the_eager_step(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(_fused_mixture.torch, "compile", lambda fn, **kwargs: broken)
    eager_model, _ = _train(compile=False, steps=2)
    with caplog.at_level(logging.WARNING, logger="optimizers._fused_mixture"):
        model, _ = _train(compile=True, steps=2)
    assert [r.getMessage() for r in caplog.records].count(
        "compiling the LayerwiseMixture step failed (no C++ compiler); running it eagerly from now on") == 1
    for p, q in zip(model.parameters(), eager_model.parameters()):
        assert torch.equal(p, q)


def test_compile_is_recorded_with_the_optimizer_settings():
    mixture = O.LayerwiseMixture(["w"], horizon=3)
    assert mixture.optimizer(compile=True).hyperparams.kwargs["compile"] is True
    with pytest.raises(ValueError, match="missing_loss"):
        mixture.optimizer(missing_loss="zero", compile=True)
