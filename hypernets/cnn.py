"""The HyperTransformer's target CNN, run on per-task weights passed in as a dict.

Zhmoginov, Sandler & Vladymyrov (ICML 2022): the generated network is 4 × (3×3 conv, ReLU,
2×2 max-pool, batch norm) followed by a logits layer. The conv and logits weights are *generated*
per task (or meta-learned and shared, in the logits-only setting); the batch-norm scale and shift
are ordinary meta-learned parameters, held by this module.

Weights are a flat dict ``{"conv0_weight": [T, C1, C0, 3, 3], "conv0_bias": [T, C1], ...,
"logits_weight": [T, K, F], "logits_bias": [T, K]}`` with the task dimension first, and inputs are
``[T, N, C, H, W]``. Batch-norm statistics are computed per task from the first ``norm_examples``
inputs (the labelled support set when the caller puts it first), then applied to every input, so a
query's output never depends on the other queries, and unlabelled or query images do not move the
statistics.

Strategies to run the convolutions of all tasks at once (all give the same numbers):

- ``"grouped"``: tasks are folded into the channel dimension, channels-last (:func:`fold`: ``[N, T·C, H, W]``
  with memory order ``N, H, W, T, C``), and every conv is one grouped convolution with ``groups=T``; the
  activations stay folded from the first conv block to the logits layer;
- ``"vmap"``: ``torch.func.vmap`` over tasks of a plain convolution;
- ``"loop"``: a Python loop of plain per-task convolutions.

Measured on this project's 2-core CPU (quiet), one thread, forward + backward of 16 tasks × 30 images of
28×28 (``python -m hypernets.cnn``): width 4: grouped 22 ms, vmap 44 ms, loop 53 ms; width 8: 29, 76, 93 ms;
width 16: 68, 122, 133 ms; width 32: 200, 302, 345 ms, so ``"auto"`` picks ``"grouped"``. Channels-last is
what makes the folded layout win at every width on CPU: oneDNN's grouped convolution with one input channel per
group and the 2×2 max-pool are both ~3–6× faster on channels-last tensors than on contiguous ``NCHW`` ones, and
the folded batch-norm statistics are a cheap two-pass reduction (``torch.var_mean`` over those dimensions is
~10× slower).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaopt.checks import integer, positive_int, sequence_of

STRATEGIES = ("auto", "grouped", "vmap", "loop")
NUM_CONV = 4
Params = dict[str, Tensor]


@dataclass(frozen=True)
class LayerSpec:
    """One generated layer: ``out_channels`` weight slices of ``slice_size = fan_in + 1`` numbers each (weights, bias).

    ``in_shape`` is the shape ``(C, H, W)`` of the layer's input activations for one image (``(F,)`` for the
    logits layer, which reads the flattened features).
    """

    name: str
    in_shape: tuple[int, ...]
    out_channels: int
    kernel_size: int

    @property
    def is_conv(self) -> bool:
        return self.kernel_size > 0

    @property
    def fan_in(self) -> int:
        return self.in_shape[0] * self.kernel_size**2 if self.is_conv else self.in_shape[0]

    @property
    def slice_size(self) -> int:
        return self.fan_in + 1

    def weight_shape(self) -> tuple[int, ...]:
        if self.is_conv:
            return (self.out_channels, self.in_shape[0], self.kernel_size, self.kernel_size)
        return (self.out_channels, self.in_shape[0])

    def from_slices(self, slices: Tensor) -> Params:
        """``{name_weight, name_bias}`` with a task dimension from slices ``[T, out_channels, slice_size]``."""
        num_tasks = slices.shape[0]
        return {f"{self.name}_weight": slices[..., :-1].reshape(num_tasks, *self.weight_shape()),
                f"{self.name}_bias": slices[..., -1]}

    def to_slices(self, params: Params) -> Tensor:
        """The inverse of :meth:`from_slices`: ``[T, out_channels, slice_size]``."""
        weight, bias = params[f"{self.name}_weight"], params[f"{self.name}_bias"]
        return torch.cat([weight.flatten(2), bias.unsqueeze(-1)], dim=-1)


def _widths(widths: int | Sequence[int]) -> tuple[int, ...]:
    values = (widths,) * NUM_CONV if isinstance(widths, int) else widths
    return sequence_of("widths", values, positive_int, owner="FunctionalCNN", length=NUM_CONV)


def fold(x: Tensor) -> Tensor:
    """Per-task images ``[T, N, C, H, W]`` → task-folded, channels-last ``[N, T·C, H, W]`` (tasks = channel groups)."""
    T, N, C, H, W = x.shape
    return x.permute(1, 3, 4, 0, 2).contiguous().view(N, H, W, T * C).permute(0, 3, 1, 2)  # memory N, H, W, T, C


def unfold(h: Tensor, num_tasks: int) -> Tensor:
    """The inverse of :func:`fold` as a view: ``[N, T·C, ...]`` → ``[T, N, C, ...]``."""
    return h.unflatten(1, (num_tasks, -1)).transpose(0, 1)


def tile(v: Tensor, num_tasks: int) -> Tensor:
    """``v`` repeated for every task along its first dimension (``T·len(v)``); a view for one task (unlike ``repeat``)."""
    return v.expand(num_tasks, *v.shape).flatten(0, 1)


def folded_conv(h: Tensor, weight: Tensor, bias: Tensor, *, stride: int | tuple[int, ...] = 1,
                padding: int | tuple[int, ...] = 1) -> Tensor:
    """Every task's convolution at once on folded activations ``[N, T·C, H, W]`` (one grouped conv, ``groups=T``).

    ``weight`` ``[T, O, C, k, k]`` and ``bias`` ``[T, O]`` are per task (the generated layers); ``[O, C, k, k]``
    and ``[O]`` are shared by all tasks (the HyperTransformer's feature extractors), repeated ``T`` times.
    """
    num_tasks = h.shape[1] // weight.shape[-3]
    if weight.dim() == 4:
        weight, bias = tile(weight, num_tasks), tile(bias, num_tasks)
    else:
        weight, bias = weight.flatten(0, 1), bias.flatten()
    if num_tasks == 1 and not torch.is_grad_enabled() and h.device.type == "cpu":
        # one task at test time on CPU: oneDNN's ~40 µs set-up per call outweighs these small convolutions; torch's
        # native kernel (forward only here: its backward refuses channels-last) writes one episode 25% faster
        kernel = list(weight.shape[-2:])
        out = torch.ops.aten.thnn_conv2d(h, weight, kernel, bias, _pair(stride), _pair(padding))
    else:
        out = F.conv2d(h, weight, bias, stride=stride, padding=padding, groups=num_tasks)
    # a one-channel input (one task's images) is as contiguous as it is channels-last, and oneDNN then answers
    # NCHW; keep the folded layout channels-last (a no-op otherwise) so that pooling stays fast
    return out.contiguous(memory_format=torch.channels_last)


def _pair(value: int | tuple[int, ...]) -> list[int]:
    return [value, value] if isinstance(value, int) else list(value)


class FunctionalCNN(nn.Module):
    """4 × (3×3 conv, ReLU, max-pool 2, batch norm) + a linear logits layer, on weights passed per task.

    Args:
        widths: output channels of the four convs (an int repeats it), e.g. 8 (the HyperTransformer's
            small-CNN regime) up to 64.
        in_channels: image channels.
        num_classes: outputs of the last layer (the ways; or the embedding size when the CNN embeds,
            as in the continual HyperTransformer).
        image_size: side of the square input images (the logits layer reads ``widths[-1] · s²``
            features, ``s`` the side after four 2×2 poolings, at least 1).
        eps: batch-norm epsilon.
        strategy: how the tasks are batched (module docstring): auto, grouped, vmap or loop.
    """

    def __init__(
        self,
        widths: int | Sequence[int] = 8,
        *,
        in_channels: int = 1,
        num_classes: int = 5,
        image_size: int = 28,
        eps: float = 1e-5,
        strategy: str = "auto",
    ) -> None:
        super().__init__()
        self.widths = _widths(widths)
        for name, value, low in (("in_channels", in_channels, 1), ("num_classes", num_classes, 1),
                                 ("image_size", image_size, 16)):
            integer(name, value, owner="FunctionalCNN", low=low)
        if strategy not in STRATEGIES:
            raise ValueError(f"FunctionalCNN: strategy must be one of {STRATEGIES}; got {strategy!r}")
        self.strategy, self.eps = strategy, eps
        layers, channels, side = [], in_channels, image_size
        for i, width in enumerate(self.widths):
            layers.append(LayerSpec(f"conv{i}", (channels, side, side), width, 3))
            channels, side = width, side // 2
        self.feature_size = channels * side * side
        layers.append(LayerSpec("logits", (self.feature_size,), num_classes, 0))
        self.layers: tuple[LayerSpec, ...] = tuple(layers)
        # batch norm after each pool: learned, never generated (as in the HyperTransformer paper)
        self.norm_weight = nn.ParameterList([nn.Parameter(torch.ones(w)) for w in self.widths])
        self.norm_bias = nn.ParameterList([nn.Parameter(torch.zeros(w)) for w in self.widths])

    # ------------------------------------------------------------------ weights
    def init_params(self, generator: torch.Generator | None = None) -> Params:
        """Fresh weights without a task dimension: Kaiming-normal convs and logits, zero biases."""
        params = {}
        for layer in self.layers:
            gain = 2.0 if layer.is_conv else 1.0
            weight = torch.randn(layer.weight_shape(), generator=generator) * (gain / layer.fan_in) ** 0.5
            params[f"{layer.name}_weight"], params[f"{layer.name}_bias"] = weight, torch.zeros(layer.out_channels)
        return params

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each weight of one task (a dict of ``[T, *shape]`` tensors is what ``forward`` takes)."""
        return {k: tuple(v.shape) for k, v in self.init_params().items()}

    def check_params(self, params: Params, num_tasks: int) -> None:
        """Refuse a weight dict with missing keys or wrong shapes, naming the first offender."""
        for name, shape in self.param_shapes().items():
            got = params.get(name)
            if got is None or tuple(got.shape) != (num_tasks, *shape):
                raise ValueError(f"FunctionalCNN: params[{name!r}] must have shape {(num_tasks, *shape)} (tasks first);"
                                 f" got {None if got is None else tuple(got.shape)}")

    def resolved_strategy(self) -> str:
        """``auto`` is ``grouped``: it wins or ties on CPU (module docstring) and is one kernel launch on CUDA."""
        return "grouped" if self.strategy == "auto" else self.strategy

    # ------------------------------------------------------------------ layers
    def _conv(self, weight: Tensor, bias: Tensor, h: Tensor) -> Tensor:
        """Per-task 3×3 conv, padding 1, one task at a time (``vmap`` or ``loop``): ``h`` ``[T, N, C, H, W]``."""
        if self.resolved_strategy() == "vmap":
            return torch.func.vmap(lambda w, b, x: F.conv2d(x, w, b, padding=1))(weight, bias, h)
        return torch.stack([F.conv2d(h[t], weight[t], bias[t], padding=1) for t in range(h.shape[0])])

    def _norm(self, index: int, h: Tensor, norm_examples: int | None) -> Tensor:
        """Batch norm with per-task statistics of the first ``norm_examples`` inputs: ``h`` ``[T, N, C, H, W]``."""
        reference = h if norm_examples is None else h[:, :norm_examples]
        var, mean = torch.var_mean(reference, dim=(1, 3, 4), keepdim=True, unbiased=False)
        scale = self.norm_weight[index].view(1, 1, -1, 1, 1) * torch.rsqrt(var + self.eps)
        return (h - mean) * scale + self.norm_bias[index].view(1, 1, -1, 1, 1)

    def _folded_norm(self, index: int, h: Tensor, norm_examples: int | None) -> Tensor:
        """:meth:`_norm` on folded activations ``[N, T·C, H, W]``: statistics per (task, channel).

        With every input as reference this is one fused training-mode batch norm over the folded channels;
        otherwise the statistics of the first ``norm_examples`` inputs, in two passes.
        """
        num_tasks = h.shape[1] // self.widths[index]
        weight, bias = tile(self.norm_weight[index], num_tasks), tile(self.norm_bias[index], num_tasks)
        if norm_examples is None or norm_examples >= h.shape[0]:
            return torch.batch_norm(h, weight, bias, None, None, True, 0.0, self.eps, False)
        dims = (0, 2, 3)
        mean = h[:norm_examples].mean(dims, keepdim=True)
        centered = h - mean
        var = centered[:norm_examples].square().mean(dims, keepdim=True)
        return torch.addcmul(bias.view(1, -1, 1, 1), centered, weight.view(1, -1, 1, 1) * torch.rsqrt(var + self.eps))

    def folded_block(self, index: int, params: Params, h: Tensor, norm_examples: int | None = None) -> Tensor:
        """Layer ``index`` on task-folded activations ``h`` ``[N, T·C, H, W]`` (:func:`fold`), whatever the strategy.

        A conv block returns folded activations; the logits layer (``index`` 4) returns logits ``[T, N, K]``.
        """
        layer = self.layers[index]
        weight, bias = params[f"{layer.name}_weight"], params[f"{layer.name}_bias"]
        if not layer.is_conv:
            return self.block(index, params, unfold(h, weight.shape[0]))
        # pool before the ReLU: max commutes with it exactly, and the ReLU then touches 4× fewer numbers
        h = F.max_pool2d(folded_conv(h, weight, bias), 2).relu_()
        return self._folded_norm(index, h, norm_examples)

    def block(self, index: int, params: Params, h: Tensor, norm_examples: int | None = None) -> Tensor:
        """Layer ``index`` (0–3 conv blocks, 4 the logits) on activations ``h`` ``[T, N, *in_shape]``."""
        layer = self.layers[index]
        weight, bias = params[f"{layer.name}_weight"], params[f"{layer.name}_bias"]
        if not layer.is_conv:
            return torch.einsum("tnf,tkf->tnk", h.flatten(2), weight) + bias.unsqueeze(1)
        if self.resolved_strategy() == "grouped":
            return unfold(self.folded_block(index, params, fold(h), norm_examples), h.shape[0])
        num_tasks, n = h.shape[:2]
        h = F.relu(self._conv(weight, bias, h))
        h = F.max_pool2d(h.flatten(0, 1), 2).unflatten(0, (num_tasks, n))
        return self._norm(index, h, norm_examples)

    def features(self, params: Params, x: Tensor, norm_examples: int | None = None) -> Tensor:
        """The flattened activations ``[T, N, F]`` after the four conv blocks (folded once for ``grouped``)."""
        if self.resolved_strategy() != "grouped":
            h = x
            for index in range(NUM_CONV):
                h = self.block(index, params, h, norm_examples)
            return h.flatten(2)
        h = fold(x)
        for index in range(NUM_CONV):
            h = self.folded_block(index, params, h, norm_examples)
        return unfold(h, x.shape[0]).flatten(2)

    def forward(self, params: Params, x: Tensor, norm_examples: int | None = None) -> Tensor:
        """Logits ``[T, N, num_classes]`` of images ``x`` ``[T, N, C, H, W]`` under per-task ``params``.

        ``norm_examples``: batch-norm statistics come from ``x[:, :norm_examples]`` (default: all of ``x``).
        """
        if x.dim() != 5:
            raise ValueError(f"FunctionalCNN: x must have shape [tasks, examples, C, H, W]; got {tuple(x.shape)}")
        return self.block(NUM_CONV, params, self.features(params, x, norm_examples), norm_examples)


class TargetCNN(nn.Module):
    """The same CNN as an ordinary module on one batch ``[N, C, H, W]``, with its own weights.

    The baselines (ProtoNet, MAML) use it through their ``network`` argument, so every learner of a
    recipe runs the identical architecture. ``num_classes=None`` drops the logits layer (an
    embedding network for ProtoNet). Batch-norm statistics come from the whole batch.
    """

    def __init__(self, widths: int | Sequence[int] = 8, *, in_channels: int = 1, num_classes: int | None = 5,
                 image_size: int = 28) -> None:
        super().__init__()
        self.cnn = FunctionalCNN(widths, in_channels=in_channels, num_classes=num_classes or 1,
                                 image_size=image_size, strategy="loop")
        self.embed_only = num_classes is None
        init = self.cnn.init_params()
        self.weights = nn.ParameterDict({n: nn.Parameter(v) for n, v in init.items()
                                         if not (self.embed_only and n.startswith("logits"))})

    def forward(self, x: Tensor) -> Tensor:
        params = {k: v.unsqueeze(0) for k, v in self.weights.items()}
        if self.embed_only:
            return self.cnn.features(params, x.unsqueeze(0)).squeeze(0)
        return self.cnn(params, x.unsqueeze(0)).squeeze(0)


def _measure(widths: Sequence[int] = (4, 8, 16, 32), num_tasks: int = 16, repeats: int = 5) -> dict:
    """Forward + backward seconds per strategy (the numbers behind the module docstring)."""
    results = {}
    x = torch.rand(num_tasks, 30, 1, 28, 28)
    for width in widths:
        cnn = FunctionalCNN(width)
        params = {k: v.expand(num_tasks, *v.shape).clone().requires_grad_() for k, v in cnn.init_params().items()}
        for strategy in STRATEGIES[1:]:
            cnn.strategy = strategy
            times = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                cnn(params, x, norm_examples=5).sum().backward()
                times.append(time.perf_counter() - start)
            results[f"width{width}/{strategy}"] = min(times[1:])
    return results


def main() -> None:
    torch.set_num_threads(1)
    for key, seconds in _measure().items():
        print(f"{key:20s} {seconds * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
