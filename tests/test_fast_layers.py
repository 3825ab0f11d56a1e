"""metaopt/learners/fast_layers.py: torch's batch norm and max-pool numbers, first and second order."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from metaopt.learners.fast_layers import batch_norm_batch_stats, max_pool2d


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    return x, weight, bias


def test_batch_norm_matches_torch_to_the_second_order():
    x, weight, bias = _inputs()
    ours = batch_norm_batch_stats(x, weight, bias, 1e-5)
    theirs = F.batch_norm(x, None, None, weight, bias, training=True, eps=1e-5)
    torch.testing.assert_close(ours, theirs)
    with torch.no_grad():  # the fused kernel without the autograd Function
        torch.testing.assert_close(batch_norm_batch_stats(x, weight, bias, 1e-5), theirs.detach())
    probe = torch.randn_like(ours)
    first = torch.autograd.grad((ours * probe).sum(), (x, weight, bias), create_graph=True)
    expected = torch.autograd.grad((theirs * probe).sum(), (x, weight, bias), create_graph=True)
    for a, b in zip(first, expected):
        torch.testing.assert_close(a, b)
    second = torch.autograd.grad(sum((g * g).sum() for g in first), (x, weight))  # through the gradients
    expected = torch.autograd.grad(sum((g * g).sum() for g in expected), (x, weight))  # (bias does not enter)
    for a, b in zip(second, expected):
        torch.testing.assert_close(a, b)
    assert gradcheck(lambda *t: batch_norm_batch_stats(*t, 1e-5), (x, weight, bias))
    assert gradgradcheck(lambda *t: batch_norm_batch_stats(*t, 1e-5), (x, weight, bias))


@pytest.mark.parametrize("kernel, stride", [([2, 2], [2, 2]), ([3, 2], [1, 2])])
def test_max_pool_matches_torch_with_ties(kernel, stride):
    x, _, _ = _inputs(1)
    tied = torch.relu(x).detach().requires_grad_()  # ReLU'd inputs: windows full of tied zeros
    ours, theirs = max_pool2d(tied, kernel, stride), F.max_pool2d(tied, kernel, stride)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    probe = torch.randn_like(ours)
    ours_grad, = torch.autograd.grad((ours * probe).sum(), tied)
    theirs_grad, = torch.autograd.grad((theirs * probe).sum(), tied)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=0, atol=0)  # the same (first) maximum of each window
    assert gradcheck(lambda t: max_pool2d(t, kernel, stride), (x,))
    assert gradgradcheck(lambda t: max_pool2d(t, kernel, stride), (x,))
