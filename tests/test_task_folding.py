"""Task folding (metaopt/learners/task_folding.py): every task's weights at once, equal to a loop over tasks."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metaopt.learners.maml import conv4
from metaopt.learners.task_folding import foldable, folded_call


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
def test_folded_call_equals_a_loop_over_tasks_with_gradients(model):
    model = model.double()
    g = torch.Generator().manual_seed(0)
    tasks = 3
    params = {k: v.requires_grad_() for k, v in _per_task(model, tasks, g).items()}
    shape = (2, 16, 16) if isinstance(model[0], nn.Conv2d) else (3, 8)
    x = torch.randn(tasks, 6, *shape, generator=g, dtype=torch.float64)
    assert foldable(model)
    folded = folded_call(model, params, x)
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
