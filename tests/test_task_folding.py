"""Task folding (metaopt/learners/task_folding.py): every task's weights at once, equal to a loop over tasks."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metaopt.learners.maml import conv4
from metaopt.learners.task_folding import (
    FoldedModel,
    fold,
    foldable,
    folded_call,
    folded_forward,
    linear_stack,
    linear_stack_call,
    per_task_call,
    resolve_strategy,
    unfold,
)


def _per_task(model: nn.Module, tasks: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {k: v.detach() + 0.1 * torch.randn(tasks, *v.shape, generator=generator, dtype=v.dtype)
            for k, v in model.named_parameters()}


@pytest.mark.parametrize(
    "model",
    [
        conv4(in_channels=2, channels=4, out_features=3, image_size=16),
        nn.Sequential(nn.Conv1d(3, 5, 3, padding=1, stride=2), nn.GELU(), nn.AvgPool1d(2), nn.Flatten(),
                      nn.Sequential(nn.Linear(10, 4), nn.Tanh()), nn.Linear(4, 2)),
    ],
    ids=["conv4_batchnorm", "conv1d_nested"],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_call_equals_a_loop_over_tasks_with_gradients(model, channels_last):
    model = model.double()
    g = torch.Generator().manual_seed(0)
    tasks = 3
    params = {k: v.requires_grad_() for k, v in _per_task(model, tasks, g).items()}
    shape = (2, 16, 16) if isinstance(model[0], nn.Conv2d) else (3, 8)
    x = torch.randn(tasks, 6, *shape, generator=g, dtype=torch.float64)
    assert foldable(model)
    folded = folded_call(model, params, x, channels_last=channels_last)
    looped = torch.stack([functional_call(model, {k: v[t] for k, v in params.items()}, (x[t],)) for t in range(tasks)])
    torch.testing.assert_close(folded, looped)
    weights = torch.randn(folded.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((folded * weights).sum(), list(params.values()))
    expected = torch.autograd.grad((looped * weights).sum(), list(params.values()))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten()),
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)),  # running statistics are buffers to update
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout()),
        nn.Sequential(nn.Flatten(0), nn.Linear(4, 2)),  # flattens the examples away
        nn.Linear(2, 2),  # not a Sequential
    ],
)
def test_models_that_cannot_be_folded_are_refused(model):
    assert not foldable(model)


def test_every_strategy_gives_the_loop_s_outputs_and_shared_weights_need_no_task_dimension():
    model = conv4(in_channels=1, channels=3, out_features=2, image_size=16).double()
    g = torch.Generator().manual_seed(1)
    params = _per_task(model, 2, g)
    x = torch.randn(2, 5, 1, 16, 16, generator=g, dtype=torch.float64)
    loop = per_task_call(model, params, x, strategy="loop")
    for strategy in ("folded", "batched", "vmap"):
        torch.testing.assert_close(per_task_call(model, params, x, strategy=strategy), loop)
    # a weight left out is the model's own; one given without the task dimension is shared just the same
    partial = {k: v for k, v in params.items() if not k.startswith("0.")}
    shared = partial | {k: v for k, v in model.named_parameters() if k.startswith("0.")}
    expected = per_task_call(model, partial, x, strategy="loop")
    torch.testing.assert_close(folded_call(model, partial, x), expected)
    torch.testing.assert_close(unfold(folded_forward(model, shared, fold(x))), expected)
    # statistics of the first examples only: the queries after them do not move a task's outputs
    first = per_task_call(model, params, x, strategy="folded", norm_examples=3)
    torch.testing.assert_close(first, per_task_call(model, params, x, strategy="loop", norm_examples=3))
    torch.testing.assert_close(first[:, :3], per_task_call(model, params, x[:, :3], strategy="folded"))


def test_auto_strategy_and_refusals():
    assert resolve_strategy("auto", conv4(channels=2)) == "folded"
    assert resolve_strategy("auto", nn.Sequential(nn.Linear(2, 2))) == "batched"
    assert resolve_strategy("auto", nn.Sequential(nn.Conv2d(1, 1, 3, padding_mode="circular"))) == "loop"
    assert resolve_strategy("loop", conv4(channels=2)) == "loop"
    with pytest.raises(ValueError, match="strategy"):
        resolve_strategy("grouped", conv4(channels=2))
    with pytest.raises(ValueError, match="cannot be folded"):
        FoldedModel(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout()))
    with pytest.raises(ValueError, match="norm_examples"):
        per_task_call(nn.Linear(2, 2), {}, torch.zeros(1, 3, 2), strategy="loop", norm_examples=2)


def test_a_linear_stack_runs_without_vmap_and_equals_a_loop_over_tasks_with_gradients():
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Sequential(nn.Linear(6, 4, bias=False), nn.ReLU()),
                          nn.Linear(4, 2)).double()
    assert linear_stack(model)
    g = torch.Generator().manual_seed(2)
    params = {k: v.requires_grad_() for k, v in _per_task(model, 3, g).items()}
    params["3.bias"] = model[3].bias.detach().clone().requires_grad_()  # shared by every task
    del params["0.bias"]  # the model's own
    for x in (torch.randn(3, 5, 3, generator=g, dtype=torch.float64),
              torch.randn(3, 5, 2, 3, generator=g, dtype=torch.float64)):  # middle dimensions too
        out = linear_stack_call(model, params, x)
        per_task = {k: v.expand(3, *v.shape) if v.dim() == 1 else v for k, v in params.items()}
        loop = per_task_call(model, per_task, x, strategy="loop")
        torch.testing.assert_close(out, loop)
        torch.testing.assert_close(per_task_call(model, params, x, strategy="batched"), loop)
        weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
        ours = torch.autograd.grad((out * weights).sum(), list(params.values()))
        theirs = torch.autograd.grad((loop * weights).sum(), list(params.values()))
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("model", [
    nn.Linear(2, 2), nn.Sequential(nn.ReLU()), nn.Sequential(nn.Linear(2, 2), nn.Dropout()),
    nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), nn.Sequential(nn.ReLU(inplace=True), nn.Linear(2, 2)),
], ids=["not_sequential", "no_linear", "dropout", "layer_norm", "inplace"])
def test_other_models_are_not_linear_stacks(model):
    assert not linear_stack(model)
