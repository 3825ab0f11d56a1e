"""Run a model on every task's own weights at once by folding the tasks into its channels.

The inner loop gives each of an episode's ``T`` tasks its own weights, ``{name: [T, *shape]}``, and its own
inputs ``[T, N, *x]``. Folding lays task ``t``'s channel ``c`` out as channel ``t·C + c`` of one batch
``[N, T·C, *spatial]``. Then

- a convolution with per-task weights is one grouped convolution (its groups multiplied by ``T``),
- batch norm with per-task scale and shift is one batch norm over ``T·C`` channels, whose statistics are
  still each task's own batch statistics (over its ``N`` examples and the spatial positions),
- activations and pooling, which treat every channel alone, run unchanged, and flattening is a view,
- a linear layer is one batched matmul over tasks.

``torch.func.vmap`` over tasks builds the same grouped convolutions, but transposes the tasks in and out of
the channels around every layer and applies batch norm's affine part as separate multiplications; folding
keeps the layout ``[N, T, *per-task shape]`` from the first layer to the last. On CPU the gain over a loop
over tasks is one operation per layer instead of ``T`` small ones, which is what dominates a few-shot
support set (``benchmarks/bench_maml.py``).

Folding applies to an ``nn.Sequential`` (nested ones too) of the layers listed in :func:`foldable`; anything
else runs task by task or under ``vmap``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaopt.learners.fast_layers import batch_norm_batch_stats, max_pool2d

# Layers that act on every channel of every example alone: they run on the folded batch as they are.
_CHANNELWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid,
    nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_CONVOLUTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

Weights = dict[str, Tensor]


def _conv(module: nn.modules.conv._ConvNd, weights: Weights, h: Tensor) -> Tensor:
    num_tasks = h.shape[1]
    bias = weights["bias"].flatten() if "bias" in weights else None
    out = _CONVOLUTIONS[module.weight.dim() - 2](
        h.flatten(1, 2), weights["weight"].flatten(0, 1), bias, module.stride, module.padding, module.dilation,
        module.groups * num_tasks)
    return out.unflatten(1, (num_tasks, -1))


def _batch_norm(module: nn.modules.batchnorm._BatchNorm, weights: Weights, h: Tensor) -> Tensor:
    scale, shift = (weights[k].flatten() if k in weights else None for k in ("weight", "bias"))
    folded = h.flatten(1, 2)
    if folded.dim() == 4 and scale is not None and shift is not None:
        out = batch_norm_batch_stats(folded, scale, shift, module.eps)
    else:
        out = F.batch_norm(folded, None, None, scale, shift, training=True, eps=module.eps)
    return out.unflatten(1, (h.shape[1], -1))


def _linear(module: nn.Linear, weights: Weights, h: Tensor) -> Tensor:
    del module
    out = torch.einsum("nt...i,toi->nt...o", h, weights["weight"])
    if "bias" not in weights:
        return out
    bias = weights["bias"]  # [T, out], broadcast over the examples and any middle dimensions
    return out + bias.view(bias.shape[0], *[1] * (out.dim() - 3), bias.shape[1])


def _flatten(module: nn.Flatten, weights: Weights, h: Tensor) -> Tensor:
    del weights
    end = module.end_dim + 1 if module.end_dim >= 0 else module.end_dim  # one more leading dim: the task's
    return h.flatten(module.start_dim + 1, end)


def _channelwise(module: nn.Module, weights: Weights, h: Tensor) -> Tensor:
    del weights
    folded = h.flatten(1, 2)
    if _plain_max_pool2d(module) and folded.dim() == 4:
        out = max_pool2d(folded, _pair(module.kernel_size), _pair(module.stride or module.kernel_size))
    else:
        out = module(folded)
    return out.unflatten(1, (h.shape[1], -1))


def _plain_max_pool2d(module: nn.Module) -> bool:
    return (isinstance(module, nn.MaxPool2d) and _pair(module.padding) == [0, 0]
            and _pair(module.dilation) == [1, 1] and not module.ceil_mode)


def _pair(value: int | tuple[int, ...]) -> list[int]:
    return [value, value] if isinstance(value, int) else list(value)


def _folded_layer(module: nn.Module) -> Callable[[nn.Module, Weights, Tensor], Tensor] | None:
    """The folded version of one layer, or ``None`` if it has none (then the model cannot be folded)."""
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        return _conv if module.padding_mode == "zeros" else None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _batch_norm if module.running_mean is None else None  # batch statistics only, no buffers to update
    if isinstance(module, nn.Linear):
        return _linear
    if isinstance(module, nn.Flatten):
        return _flatten if module.start_dim >= 1 else None
    if isinstance(module, _CHANNELWISE) and not getattr(module, "return_indices", False):
        return _channelwise
    return None


def _layers(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """The leaf layers of nested ``nn.Sequential``s in order, with their parameter-name prefixes."""
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential):
            yield from _layers(child, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}.", child


def foldable(model: nn.Module) -> bool:
    """Whether :func:`folded_call` can run ``model``.

    It can for an ``nn.Sequential`` (nested ones included) of convolutions with zero padding, batch norm
    without running statistics (``track_running_stats=False``, normalised by each task's batch), linear
    layers, ``nn.Flatten`` that keeps the batch dimension, and layers that act on each channel alone
    (activations, pooling, ``nn.Identity``).
    """
    return isinstance(model, nn.Sequential) and all(_folded_layer(m) is not None for _, m in _layers(model))


def folded_call(model: nn.Sequential, params: dict[str, Tensor], x: Tensor) -> Tensor:
    """``model``'s outputs ``[T, N, *y]`` with task ``t`` run on weights ``params[name][t]`` and inputs ``x[t]``.

    Args:
        model: a model for which :func:`foldable` holds; its own parameter values are not used.
        params: every parameter of ``model`` by name, each ``[T, *shape]`` (expand a shared one).
        x: inputs ``[T, N, *x]``, the same number of examples ``N`` in every task.
    """
    h = x.transpose(0, 1)  # [N, T, *x]: tasks next to the channels they are folded with
    for prefix, layer in _layers(model):
        weights = {name: params[prefix + name] for name, _ in layer.named_parameters()}
        h = _folded_layer(layer)(layer, weights, h)
    return h.transpose(0, 1)


__all__ = ["foldable", "folded_call"]
