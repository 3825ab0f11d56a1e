"""Batch norm and max-pool with the numbers of torch's own, but faster second-order MAML on CPU.

Both are ``torch.autograd.Function``s whose backward is differentiable again, so they serve the inner loop's
``create_graph=True`` gradients and the meta-gradient through them (``tests/test_fast_layers.py`` checks them
with ``gradcheck`` and ``gradgradcheck``). Measured on the folded 4-conv MAML meta-step
(``benchmarks/bench_maml.py``, 16 tasks), together they take ~10% off:

- :func:`batch_norm_batch_stats`: torch's fused kernels forward and, for a plain backward, backward. When the
  backward itself is to be differentiated (the inner loop's gradients), it is written in a few elementwise ops
  and reductions instead: differentiating that costs less than torch's generic ``batchnorm_double_backward``
  (the largest single item of the meta-step, ~20%, before).
- :func:`max_pool2d`: the forward runs torch's channels-last kernel (≈6× faster than the contiguous one on
  CPU) and converts back; its indices are the same as the contiguous kernel's (the first maximum of each
  window), so the backward is torch's own ``max_pool2d_with_indices_backward``, differentiable as usual.

Under ``torch.compile`` both are torch's plain operations: the compiler generates its own kernels, and the
inner loop's gradients then come from ``torch.func``, which these Functions do not support.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["batch_norm_batch_stats", "max_pool2d"]

_DIMS = (0, 2, 3)  # normalised over examples and positions, per channel
_SHAPE = (1, -1, 1, 1)


class _BatchNormBatchStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        out, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)[:3]
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        x, weight, mean, invstd = ctx.saved_tensors
        if not torch.is_grad_enabled():  # a plain backward: torch's fused kernel
            dx, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
                grad, x, weight, None, None, mean, invstd, True, ctx.eps, [True, True, True])
            return dx, dweight, dbias, None
        # create_graph: the statistics as functions of x, so that the second order flows through them
        centered = x - x.mean(_DIMS, keepdim=True)
        invstd = torch.rsqrt(centered.square().mean(_DIMS) + ctx.eps)
        normalised = centered * invstd.view(_SHAPE)
        count = x.numel() // x.shape[1]
        dbias = grad.sum(_DIMS)
        dweight = (grad * normalised).sum(_DIMS)
        centred_grad = grad - (dbias / count).view(_SHAPE)
        dx = torch.addcmul(centred_grad, normalised, (dweight / -count).view(_SHAPE)) * (weight * invstd).view(_SHAPE)
        return dx, dweight, dbias, None


def batch_norm_batch_stats(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """Training-mode batch norm of ``x`` ``[N, C, H, W]`` with its own batch statistics and affine ``weight``,
    ``bias`` ``[C]`` (``F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)``)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():  # nothing to differentiate, or compiled
        return torch.batch_norm(x, weight, bias, None, None, True, 0.0, eps, False)
    return _BatchNormBatchStats.apply(x, weight, bias, eps)


class _MaxPool2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, kernel: list[int], stride: list[int]) -> Tensor:
        out, indices = torch.ops.aten.max_pool2d_with_indices(x.contiguous(memory_format=torch.channels_last),
                                                              kernel, stride)
        ctx.save_for_backward(x, indices.contiguous())
        ctx.kernel, ctx.stride = kernel, stride
        return out.contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        x, indices = ctx.saved_tensors
        dx = torch.ops.aten.max_pool2d_with_indices_backward(
            grad, x, ctx.kernel, ctx.stride, [0, 0], [1, 1], False, indices)
        return dx, None, None


def max_pool2d(x: Tensor, kernel: list[int], stride: list[int]) -> Tensor:
    """``F.max_pool2d(x, kernel, stride)`` (no padding or dilation) of a contiguous ``[N, C, H, W]`` ``x``."""
    if torch.compiler.is_compiling():
        return torch.nn.functional.max_pool2d(x, kernel, stride)
    return _MaxPool2d.apply(x, list(kernel), list(stride))
