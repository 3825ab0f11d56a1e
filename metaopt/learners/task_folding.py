"""Run a model on every task's own weights at once: the tasks folded into its channels, batched, or one by one.

An inner loop (and a hypernetwork) gives each of an episode's ``T`` tasks its own weights ``{name: [T, *shape]}``
and its own inputs ``[T, N, *x]``; :func:`per_task_call` runs an ordinary module on them with one of the
:data:`STRATEGIES`, which all give the same numbers:

- ``"folded"``: task ``t``'s channel ``c`` becomes channel ``t·C + c`` of one batch (:func:`fold`). Then a
  convolution with per-task weights is one grouped convolution (its groups multiplied by ``T``), batch norm with
  per-task scale and shift is one batch norm over ``T·C`` channels whose statistics are still each task's own,
  activations and pooling, which treat every channel alone, run unchanged, flattening is a view, and a linear
  layer is one batched matmul over tasks. The activations stay folded from the first layer to the last
  (:func:`folded_forward`), for an ``nn.Sequential`` (nested ones too) of the layers :func:`foldable` lists.
- ``"batched"``: ``torch.func.vmap`` over tasks of ``functional_call`` (batched matmuls; for convolutions
  grouped convolutions too, but with the tasks transposed in and out of the channels around every layer and
  batch norm's affine part as separate multiplications). A stack of linear layers and elementwise activations
  (an MLP, :func:`linear_stack`) runs as one batched matmul per layer without vmap: the same operations,
  without vmap's per-operation dispatch, which is most of the cost of a small MLP's inner step (MAML's
  sinusoid network, ``benchmarks/bench_maml.py``).
- ``"vmap"``: for an inner loop (:class:`~metaopt.learners.inner_loop.InnerLoop`), ``vmap`` over tasks of the
  whole loop, its gradients included; for one call of a model it is ``"batched"``.
- ``"loop"``: task by task, plain operations.
- ``"auto"``: :func:`resolve_strategy`.

Folded activations are ``[N, T, C, *spatial]``: examples first (so ``h[:k]`` are the first ``k`` examples of
every task), then each task's channels. Folded images are contiguous (``N, T, C, H, W`` in memory) or, with
``channels_last=True``, channels-last (``N, H, W, T, C``), where on CPU oneDNN's grouped convolutions with few
input channels per group and the max-pool are several times faster. Channels-last suits the forward pass and
first-order training (the HyperTransformer's target CNN). A second-order inner loop stays contiguous: torch's
channels-last batch norm computes its statistics ~70× less precisely in float32, and a MAML meta-gradient
amplifies that to a few percent, while the meta-step is no faster (``benchmarks/bench_maml.py``). On CPU the gain
over a loop over tasks is one operation per layer instead of ``T`` small ones, which is what dominates a
few-shot support set.

``norm_examples=k`` makes every batch norm normalise with the statistics of the first ``k`` examples of each task
(a hypernetwork's labelled support set) and apply them to all of them, so that a query's output never depends
on the other queries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from metaopt.checks import one_of
from metaopt.learners.fast_layers import batch_norm_batch_stats, max_pool2d

Strategy = Literal["auto", "batched", "folded", "vmap", "loop"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)

# Layers that act on every channel of every example alone: they run on the folded batch as they are.
_ELEMENTWISE_LAYERS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid,
    nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Identity,
)
_CHANNELWISE = _ELEMENTWISE_LAYERS + (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_EXACT_CHANNELWISE = frozenset(_CHANNELWISE)
# Layers that act on every entry alone: between linear layers they run on ``[T, N, features]`` as they are.
_ELEMENTWISE = frozenset(_ELEMENTWISE_LAYERS)
_CONVOLUTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

Weights = dict[str, Tensor]


# ---------------------------------------------------------------------- the folded layout
def fold(x: Tensor, *, channels_last: bool = False) -> Tensor:
    """Per-task inputs ``[T, N, C, *spatial]`` → folded activations ``[N, T, C, *spatial]``.

    ``channels_last``: images ``[T, N, C, H, W]`` laid out ``N, H, W, T, C`` in memory (module docstring).
    """
    if channels_last and x.dim() == 5:
        return x.permute(1, 3, 4, 0, 2).contiguous().permute(0, 3, 4, 1, 2)
    return x.transpose(0, 1)


def unfold(h: Tensor) -> Tensor:
    """The inverse of :func:`fold`, a view: ``[N, T, ...]`` → ``[T, N, ...]``."""
    return h.transpose(0, 1)


def tile(v: Tensor, num_tasks: int) -> Tensor:
    """A weight shared by every task, repeated for each along its first dimension (``[T·len(v), ...]``)."""
    return v if num_tasks == 1 else v.expand(num_tasks, *v.shape).flatten(0, 1)


def _merged(weight: Tensor, num_tasks: int, shared_dim: int) -> Tensor:
    """A weight for the tasks' merged channels ``[T·O, ...]``: per task ``[T, O, ...]`` (one dimension more than a
    shared weight's ``shared_dim``) flattened, shared ``[O, ...]`` tiled."""
    return weight.flatten(0, 1) if weight.dim() > shared_dim else tile(weight, num_tasks)


def folded_conv(h: Tensor, weight: Tensor, bias: Tensor | None = None, *, stride: int | tuple[int, ...] = 1,
                padding: int | str | tuple[int, ...] = 0, dilation: int | tuple[int, ...] = 1,
                groups: int = 1) -> Tensor:
    """Every task's convolution at once on folded activations ``[N, T, C, *spatial]``: one grouped convolution.

    ``weight`` ``[T, O, C/groups, *kernel]`` and ``bias`` ``[T, O]`` are per task; without the leading ``T``
    (``[O, C/groups, *kernel]``, ``[O]``) they are shared by every task. Returns ``[N, T, O, *spatial']``,
    channels-last when ``h`` is (one input channel in all counts as channels-last).
    """
    num_tasks, x = h.shape[1], h.flatten(1, 2)
    out = _grouped_conv(x, num_tasks, weight, bias, stride, padding, dilation, groups)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        out = _channels_last(out)
    return out.unflatten(1, (num_tasks, -1))


def _grouped_conv(x: Tensor, num_tasks: int, weight: Tensor, bias: Tensor | None, stride: int | tuple[int, ...],
                  padding: int | str | tuple[int, ...], dilation: int | tuple[int, ...], groups: int) -> Tensor:
    """:func:`folded_conv` on activations with the tasks merged into the channels, ``[N, T·C, *spatial]``."""
    weight, bias = _merged(weight, num_tasks, x.dim()), None if bias is None else _merged(bias, num_tasks, 1)
    if (x.dim() == 4 and num_tasks == 1 and groups == 1 and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.is_contiguous(memory_format=torch.channels_last) and not isinstance(padding, str)
            and _pair(dilation) == [1, 1]):
        # one task at test time on CPU: oneDNN's ~40 µs set-up per call outweighs these small convolutions; torch's
        # native kernel (forward only here: its backward refuses channels-last) writes one episode 25% faster
        return torch.ops.aten.thnn_conv2d(x, weight, list(weight.shape[-2:]), bias, _pair(stride), _pair(padding))
    return _CONVOLUTIONS[x.dim() - 2](x, weight, bias, stride, padding, dilation, groups * num_tasks)


def _channels_last(x: Tensor) -> Tensor:
    """``x`` channels-last: a one-channel input (one task's grey images) is as contiguous as it is channels-last,
    and the convolution then answers contiguous (a no-op otherwise)."""
    return x.contiguous(memory_format=torch.channels_last)


def _pair(value: int | tuple[int, ...]) -> list[int]:
    return [value, value] if isinstance(value, int) else list(value)


def batch_norm_first(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, count: int) -> Tensor:
    """Batch norm of ``x`` ``[N, C, *spatial]`` with the statistics of its first ``count`` examples (two passes)."""
    dims = [0, *range(2, x.dim())]
    shape = (1, -1, *[1] * (x.dim() - 2))
    centered = x - x[:count].mean(dims, keepdim=True)
    scale = torch.rsqrt(centered[:count].square().mean(dims, keepdim=True) + eps)
    if weight is not None:
        scale = scale * weight.view(shape)
    return centered * scale if bias is None else torch.addcmul(bias.view(shape), centered, scale)


# ---------------------------------------------------------------------- folded layers
# Each maps activations with the tasks merged into the first per-example dimension, ``[N, T·C, ...]``, and the
# layer's weights, per task ``[T, *shape]`` or shared ``[*shape]``, to the next such activations; between layers
# that act on channels (convolution, batch norm, activations, pooling) nothing is reshaped.
def _conv(module: nn.modules.conv._ConvNd, weights: Weights, x: Tensor, num_tasks: int,
          norm_examples: int | None) -> Tensor:
    del norm_examples
    return _grouped_conv(x, num_tasks, weights["weight"], weights.get("bias"), module.stride, module.padding,
                         module.dilation, module.groups)


def _batch_norm(module: nn.modules.batchnorm._BatchNorm, weights: Weights, x: Tensor, num_tasks: int,
                norm_examples: int | None) -> Tensor:
    scale, shift = weights.get("weight"), weights.get("bias")
    scale = None if scale is None else _merged(scale, num_tasks, 1)
    shift = None if shift is None else _merged(shift, num_tasks, 1)
    if norm_examples is not None and norm_examples < x.shape[0]:
        return batch_norm_first(x, scale, shift, module.eps, norm_examples)
    if x.dim() == 4 and scale is not None and shift is not None:
        return batch_norm_batch_stats(x, scale, shift, module.eps)
    return F.batch_norm(x, None, None, scale, shift, training=True, eps=module.eps)


def _linear(module: nn.Linear, weights: Weights, x: Tensor, num_tasks: int, norm_examples: int | None) -> Tensor:
    del module, norm_examples
    weight, bias = weights["weight"], weights.get("bias")
    h = x.unflatten(1, (num_tasks, -1))
    out = torch.einsum("nt...i,toi->nt...o" if weight.dim() == 3 else "nt...i,oi->nt...o", h, weight)
    if bias is not None:  # broadcast over the examples and any middle dimensions
        out = out + (bias.view(num_tasks, *[1] * (out.dim() - 3), bias.shape[1]) if bias.dim() == 2 else bias)
    return out.flatten(1, 2)


def _flatten(module: nn.Flatten, weights: Weights, x: Tensor, num_tasks: int, norm_examples: int | None) -> Tensor:
    del weights, norm_examples
    end = module.end_dim + 1 if module.end_dim >= 0 else module.end_dim  # one more leading dim: the task's
    return x.unflatten(1, (num_tasks, -1)).flatten(module.start_dim + 1, end).flatten(1, 2)


def _channelwise(module: nn.Module, weights: Weights, x: Tensor, num_tasks: int, norm_examples: int | None) -> Tensor:
    del weights, num_tasks, norm_examples
    return module.forward(x)  # as the other folded layers, without nn.Module's call machinery (~3 µs a layer)


def _max_pool_via_channels_last(module: nn.MaxPool2d, weights: Weights, x: Tensor, num_tasks: int,
                                norm_examples: int | None) -> Tensor:
    del weights, num_tasks, norm_examples
    if x.dim() != 4:
        return module.forward(x)
    return max_pool2d(x, _pair(module.kernel_size), _pair(module.stride or module.kernel_size))


FoldedLayer = Callable[[nn.Module, Weights, Tensor, int, "int | None"], Tensor]
_WITH_WEIGHTS = (_conv, _batch_norm, _linear)


def _folded_layer(module: nn.Module) -> FoldedLayer | None:
    """The folded version of one layer, or ``None`` if it has none (then the model cannot be folded)."""
    if type(module) in _EXACT_CHANNELWISE and not vars(module).get("return_indices"):  # the common case first
        return _channelwise
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


def _plain_max_pool2d(module: nn.Module) -> bool:
    return (isinstance(module, nn.MaxPool2d) and _pair(module.padding) == [0, 0]
            and _pair(module.dilation) == [1, 1] and not module.ceil_mode and not module.return_indices)


def _layers(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """The leaf layers of nested ``nn.Sequential``s in order, with their parameter-name prefixes."""
    for name, child in model._modules.items():
        if child is None:
            continue
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


class FoldedModel:
    """A foldable ``nn.Sequential`` with each layer resolved once to its folded version: :func:`folded_forward`
    without the model.

    :func:`folded_forward` makes one per call. A model run many times with little work per layer (a
    hypernetwork's target CNN on one episode, ~1 ms) keeps one: resolving the layers costs as much as their
    kernels then.

    Args:
        model: a model for which :func:`foldable` holds.
        channels_last: the folded images' layout (module docstring), as :func:`fold` made them.
    """

    def __init__(self, model: nn.Sequential, *, channels_last: bool = False) -> None:
        if not isinstance(model, nn.Sequential):
            raise ValueError(f"FoldedModel: model must be an nn.Sequential; got {type(model).__name__}")
        steps = []
        for prefix, layer in _layers(model):
            folded_layer = _folded_layer(layer)
            if folded_layer is None:
                raise ValueError(f"FoldedModel: layer {prefix[:-1]!r} ({type(layer).__name__}) cannot be folded; "
                                 "expected a model for which foldable() holds")
            if not channels_last and _plain_max_pool2d(layer):  # torch's pool is ~6x faster channels-last
                folded_layer = _max_pool_via_channels_last
            names = tuple((name, prefix + name) for name in ("weight", "bias")) if folded_layer in _WITH_WEIGHTS else ()
            steps.append((folded_layer, layer, names, channels_last and folded_layer is _conv))
        self.steps = tuple(steps)

    def __call__(self, params: Weights, h: Tensor, *, norm_examples: int | None = None) -> Tensor:
        num_tasks, x = h.shape[1], h.flatten(1, 2)
        for folded_layer, layer, names, relayout in self.steps:
            weights = {}
            for name, key in names:  # given for this call, else the layer's own
                weight = params.get(key)
                if weight is None:
                    weight = layer._parameters.get(name)
                if weight is not None:
                    weights[name] = weight
            x = folded_layer(layer, weights, x, num_tasks, norm_examples)
            if relayout and x.dim() == 4:
                x = _channels_last(x)
        return x.unflatten(1, (num_tasks, -1))


def folded_forward(model: nn.Sequential, params: Weights, h: Tensor, *, norm_examples: int | None = None,
                   channels_last: bool = False) -> Tensor:
    """``model`` on folded activations ``h`` ``[N, T, *x]`` (:func:`fold`) → folded outputs ``[N, T, *y]``.

    Args:
        model: a model for which :func:`foldable` holds.
        params: weights by parameter name, per task ``[T, *shape]`` or shared by every task ``[*shape]``; a
            parameter not in it is the model's own, shared.
        h: folded inputs, the same number of examples ``N`` in every task.
        norm_examples: batch-norm statistics of the first ``norm_examples`` examples (default: all).
        channels_last: the layout of folded images (module docstring), as :func:`fold` made ``h``.
    """
    return FoldedModel(model, channels_last=channels_last)(params, h, norm_examples=norm_examples)


def folded_call(model: nn.Sequential, params: Weights, x: Tensor, *, norm_examples: int | None = None,
                channels_last: bool = False) -> Tensor:
    """``model``'s outputs ``[T, N, *y]`` with task ``t`` run on weights ``params[name][t]`` and inputs ``x[t]``.

    Args:
        model: a model for which :func:`foldable` holds; its own values serve only for parameters not in ``params``.
        params: weights by parameter name, per task ``[T, *shape]`` or shared ``[*shape]`` (:func:`folded_forward`).
        x: inputs ``[T, N, *x]``, the same number of examples ``N`` in every task.
        norm_examples: batch-norm statistics of the first ``norm_examples`` examples of each task (default: all).
        channels_last: fold images channels-last (module docstring).
    """
    h = fold(x, channels_last=channels_last)
    return unfold(folded_forward(model, params, h, norm_examples=norm_examples, channels_last=channels_last))


# ---------------------------------------------------------------------- linear stacks
def linear_stack(model: nn.Module) -> bool:
    """Whether ``model`` is an ``nn.Sequential`` (nested ones too) of ``nn.Linear`` layers and elementwise
    activations only, which :func:`linear_stack_call` runs on per-task weights without vmap."""
    if not isinstance(model, nn.Sequential):
        return False
    layers = [layer for _, layer in _layers(model)]
    return any(type(layer) is nn.Linear for layer in layers) and all(
        type(layer) is nn.Linear or (type(layer) in _ELEMENTWISE and not vars(layer).get("inplace"))
        for layer in layers)


def linear_stack_call(model: nn.Sequential, params: Weights, x: Tensor) -> Tensor:
    """``model``'s outputs ``[T, N, ..., out]`` on inputs ``[T, N, ..., in]``, task ``t`` with weights
    ``params[name][t]`` (``[T, *shape]``; a weight without the leading ``T``, or not in ``params``, is shared).

    One ``baddbmm`` per linear layer (``model`` must satisfy :func:`linear_stack`).
    """
    h = x.flatten(1, -2) if x.dim() > 3 else x
    for prefix, layer in _layers(model):
        if type(layer) is not nn.Linear:
            h = layer.forward(h)
            continue
        weight, bias = params.get(prefix + "weight", layer.weight), params.get(prefix + "bias", layer.bias)
        if weight.dim() == 3:
            bias = None if bias is None else bias.unsqueeze(1) if bias.dim() == 2 else bias
            h = torch.bmm(h, weight.mT) if bias is None else torch.baddbmm(bias, h, weight.mT)
        else:
            h = F.linear(h, weight, None if bias is None or bias.dim() == 2 else bias)
            if bias is not None and bias.dim() == 2:
                h = h + bias.unsqueeze(1)
    return h.unflatten(1, x.shape[1:-1]) if x.dim() > 3 else h


# ---------------------------------------------------------------------- every strategy
def resolve_strategy(strategy: str, model: nn.Module) -> str:
    """The strategy actually used for ``model``: ``strategy`` itself unless it is ``"auto"``.

    ``"auto"`` is ``"batched"`` for models without convolutions, ``"folded"`` for conv nets that :func:`foldable`
    accepts, and ``"loop"`` for other conv nets (on CPU, vmapped convolutions are slow grouped convolutions).
    """
    one_of("strategy", strategy, STRATEGIES, owner="resolve_strategy")
    if strategy != "auto":
        return strategy
    if not any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()):
        return "batched"
    return "folded" if foldable(model) else "loop"


def per_task_call(model: nn.Module, params: Weights, x: Tensor, *, strategy: str = "auto",
                  norm_examples: int | None = None, channels_last: bool = False) -> Tensor:
    """``model``'s outputs ``[T, N, *y]``, task ``t`` run on weights ``params[name][t]`` and inputs ``x[t]``.

    Args:
        model: any ``nn.Module`` mapping one task's inputs ``[N, *x]`` to outputs ``[N, *y]``.
        params: per-task weights ``[T, *shape]`` by parameter name; a parameter not in it is the model's own,
            shared by every task.
        x: inputs ``[T, N, *x]``.
        strategy: one of :data:`STRATEGIES` (module docstring).
        norm_examples: batch-norm statistics of the first ``norm_examples`` examples of each task (default: all);
            only for an ``nn.Sequential``.
        channels_last: the folded strategy's layout (module docstring).
    """
    strategy = resolve_strategy(strategy, model)
    if strategy == "folded":
        return folded_call(model, params, x, norm_examples=norm_examples, channels_last=channels_last)
    if norm_examples is not None and not isinstance(model, nn.Sequential):
        raise ValueError(f"per_task_call: norm_examples needs an nn.Sequential; got {type(model).__name__}; "
                         "expected norm_examples=None")
    if strategy == "loop":
        return torch.stack([_one_task(model, {k: v[t] for k, v in params.items()}, x[t], norm_examples)
                            for t in range(x.shape[0])])
    if norm_examples is None and linear_stack(model):
        return linear_stack_call(model, params, x)
    return vmap(lambda p, inputs: _one_task(model, p, inputs, norm_examples))(params, x)


def _one_task(model: nn.Module, params: Weights, x: Tensor, norm_examples: int | None) -> Tensor:
    """One task's outputs; with ``norm_examples``, layer by layer, so that batch norms use the first examples."""
    if norm_examples is None:
        return functional_call(model, params, (x,))
    h = x
    for prefix, layer in _layers(model):
        weights = {name: p for name, p in layer._parameters.items() if p is not None}
        weights |= {name[len(prefix):]: p for name, p in params.items() if name.startswith(prefix)}
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            h = batch_norm_first(h, weights.get("weight"), weights.get("bias"), layer.eps, norm_examples)
        else:
            h = functional_call(layer, weights, (h,))
    return h


__all__ = ["STRATEGIES", "Strategy", "fold", "unfold", "tile", "folded_conv", "batch_norm_first", "foldable",
           "FoldedModel", "folded_forward", "folded_call", "linear_stack", "linear_stack_call", "resolve_strategy",
           "per_task_call"]
