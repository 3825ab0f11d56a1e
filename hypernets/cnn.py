"""The HyperTransformer's target CNN: an ordinary module, and the same module run on weights passed per task.

Zhmoginov, Sandler & Vladymyrov (ICML 2022): the generated network is 4 × (3×3 conv, ReLU, 2×2 max-pool,
batch norm) followed by a logits layer. The conv and logits weights are *generated* per task (or meta-learned
and shared, in the logits-only setting); the batch-norm scale and shift are ordinary meta-learned parameters.

- :class:`TargetCNN` is that network as an ``nn.Sequential`` of torch layers with weights of its own (the
  baselines' network: MAML, ANIL, ProtoNet). Its layers all fold, so ``InnerLoop``'s ``"auto"`` strategy runs it
  with the tasks folded into its channels (``metaopt.learners.task_folding``). Each block pools before its ReLU:
  max commutes with it exactly, and the ReLU then touches 4× fewer numbers.
- :class:`FunctionalCNN` runs the same architecture through ``metaopt.learners.task_folding.per_task_call`` on
  weights passed as a flat dict ``{"conv0_weight": [T, C1, C0, 3, 3], "conv0_bias": [T, C1], ...,
  "logits_weight": [T, K, F], "logits_bias": [T, K]}`` with the task dimension first, inputs being
  ``[T, N, C, H, W]``. Its module holds no weights: the conv and logits weights arrive with every call, and the
  batch norms' scale and shift are :class:`FunctionalCNN`'s parameters ``norm_weight``, ``norm_bias``.
  Batch-norm statistics are computed per task from the first ``norm_examples`` inputs (the labelled support set
  when the caller puts it first), then applied to every input, so a query's output never depends on the other
  queries, and unlabelled or query images do not move the statistics.

Strategies (``metaopt.learners.task_folding.STRATEGIES``; all give the same numbers), measured with
``python -m hypernets.cnn`` (one thread, forward + backward of 16 tasks × 30 images of 28×28, statistics of the
first 5) on this project's 2-core CPU while shared, so about twice a quiet machine's times: width 4: folded
52 ms, batched 75 ms, loop 116 ms; width 8: 65, 135, 152 ms; width 16: 143, 237, 234 ms; width 32: 332, 450,
458 ms, so ``"auto"`` picks ``"folded"``. This CNN folds its images channels-last, which is what makes folding
win at every width on CPU (``task_folding``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import skip_init

from metaopt.checks import integer, one_of, positive_int, sequence_of
from metaopt.learners.task_folding import STRATEGIES, FoldedModel, per_task_call, resolve_strategy

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


def layer_specs(owner: str, widths: int | Sequence[int], in_channels: int, num_classes: int,
                image_size: int) -> tuple[LayerSpec, ...]:
    """The four conv layers and the logits layer, validated (``owner`` names the class in error messages)."""
    values = (widths,) * NUM_CONV if isinstance(widths, int) else widths
    values = sequence_of("widths", values, positive_int, owner=owner, length=NUM_CONV)
    for name, value, low in (("in_channels", in_channels, 1), ("num_classes", num_classes, 1),
                             ("image_size", image_size, 16)):
        integer(name, value, owner=owner, low=low)
    layers, channels, side = [], in_channels, image_size
    for i, width in enumerate(values):
        layers.append(LayerSpec(f"conv{i}", (channels, side, side), width, 3))
        channels, side = width, side // 2
    layers.append(LayerSpec("logits", (channels * side * side,), num_classes, 0))
    return tuple(layers)


def init_weights(layers: Sequence[LayerSpec], generator: torch.Generator | None = None) -> Params:
    """Fresh weights without a task dimension: Kaiming-normal convs and logits, zero biases."""
    params = {}
    for layer in layers:
        gain = 2.0 if layer.is_conv else 1.0
        weight = torch.randn(layer.weight_shape(), generator=generator) * (gain / layer.fan_in) ** 0.5
        params[f"{layer.name}_weight"], params[f"{layer.name}_bias"] = weight, torch.zeros(layer.out_channels)
    return params


def _modules(layers: Sequence[LayerSpec], eps: float) -> list[nn.Module]:
    """4 × (conv, max-pool, ReLU, batch norm), then the head (flatten, logits); conv and logits uninitialised."""
    modules: list[nn.Module] = []
    for layer in layers:
        if layer.is_conv:
            channels = layer.out_channels
            modules.append(nn.Sequential(
                skip_init(nn.Conv2d, layer.in_shape[0], channels, layer.kernel_size, padding=layer.kernel_size // 2),
                nn.MaxPool2d(2), nn.ReLU(inplace=True), nn.BatchNorm2d(channels, eps=eps, track_running_stats=False)))
        else:
            modules.append(nn.Sequential(nn.Flatten(), skip_init(nn.Linear, layer.in_shape[0], layer.out_channels)))
    return modules


def _generated(index: int, layer: LayerSpec) -> str:
    """The module path of layer ``index``'s weights: a block's conv (``i.0``), the head's linear layer (``4.1``)."""
    return f"{index}.{0 if layer.is_conv else 1}"


class TargetCNN(nn.Sequential):
    """The CNN as an ordinary module on one batch ``[N, C, H, W]``, with its own weights.

    The baselines (ProtoNet, MAML, ANIL) use it through their ``network`` argument, so every learner of a recipe
    runs the identical architecture. Modules ``0``–``3`` are the conv blocks (``i.0`` conv, ``i.1`` max-pool,
    ``i.2`` ReLU, ``i.3`` batch norm), ``4`` the head (``4.0`` flatten, ``4.1`` logits). ``num_classes=None``
    drops the logits layer (an embedding network for ProtoNet). Batch-norm statistics come from the whole batch.
    """

    def __init__(self, widths: int | Sequence[int] = 8, *, in_channels: int = 1, num_classes: int | None = 5,
                 image_size: int = 28, eps: float = 1e-5) -> None:
        layers = layer_specs("TargetCNN", widths, in_channels, num_classes or 1, image_size)
        modules = _modules(layers, eps)
        if num_classes is None:
            modules[-1] = modules[-1][0]  # the flatten alone
        super().__init__(*modules)
        weights = init_weights(layers)  # a 1-class head is drawn too: the embedding's weights do not depend on it
        generated = layers if num_classes is not None else layers[:-1]
        with torch.no_grad():
            for index, layer in enumerate(generated):
                module = self.get_submodule(_generated(index, layer))
                module.weight.copy_(weights[f"{layer.name}_weight"])
                module.bias.copy_(weights[f"{layer.name}_bias"])


class FunctionalCNN(nn.Module):
    """4 × (3×3 conv, max-pool 2, ReLU, batch norm) + a linear logits layer, on weights passed per task.

    Args:
        widths: output channels of the four convs (an int repeats it), e.g. 8 (the HyperTransformer's
            small-CNN regime) up to 64.
        in_channels: image channels.
        num_classes: outputs of the last layer (the ways; or the embedding size when the CNN embeds,
            as in the continual HyperTransformer).
        image_size: side of the square input images (the logits layer reads ``widths[-1] · s²``
            features, ``s`` the side after four 2×2 poolings, at least 1).
        eps: batch-norm epsilon.
        strategy: how the tasks are batched (``metaopt.learners.task_folding.STRATEGIES``; ``"vmap"`` is
            ``"batched"`` here, there being no inner loop).
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
        self.layers: tuple[LayerSpec, ...] = layer_specs("FunctionalCNN", widths, in_channels, num_classes,
                                                         image_size)
        one_of("strategy", strategy, STRATEGIES, owner="FunctionalCNN")
        self.widths = tuple(layer.out_channels for layer in self.layers[:NUM_CONV])
        self.feature_size = self.layers[-1].in_shape[0]
        self.strategy, self.eps = strategy, eps
        self.net = nn.Sequential(*_modules(self.layers, eps))
        for module in self.net.modules():  # the architecture alone: every weight arrives with the call
            for name in list(module._parameters):
                module.register_parameter(name, None)
        self._folded_blocks = tuple(FoldedModel(block, channels_last=True) for block in self.net)
        # (key in a weight dict, name in its block) of each block's generated weights
        self._block_names = tuple(
            tuple((f"{layer.name}_{kind}", f"{_generated(index, layer).split('.', 1)[1]}.{kind}")
                  for kind in ("weight", "bias"))
            for index, layer in enumerate(self.layers))
        # batch norm after each pool: learned, never generated (as in the HyperTransformer paper)
        self.norm_weight = nn.ParameterList([nn.Parameter(torch.ones(w)) for w in self.widths])
        self.norm_bias = nn.ParameterList([nn.Parameter(torch.zeros(w)) for w in self.widths])

    # ------------------------------------------------------------------ weights
    def init_params(self, generator: torch.Generator | None = None) -> Params:
        """Fresh weights without a task dimension: Kaiming-normal convs and logits, zero biases."""
        return init_weights(self.layers, generator)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each weight of one task (a dict of ``[T, *shape]`` tensors is what ``forward`` takes)."""
        shapes = {}
        for layer in self.layers:
            shapes[f"{layer.name}_weight"], shapes[f"{layer.name}_bias"] = layer.weight_shape(), (layer.out_channels,)
        return shapes

    def check_params(self, params: Params, num_tasks: int) -> None:
        """Refuse a weight dict with missing keys or wrong shapes, naming the first offender."""
        for name, shape in self.param_shapes().items():
            got = params.get(name)
            if got is None or tuple(got.shape) != (num_tasks, *shape):
                raise ValueError(f"FunctionalCNN: params[{name!r}] must have shape {(num_tasks, *shape)} (tasks first);"
                                 f" got {None if got is None else tuple(got.shape)}")

    def resolved_strategy(self) -> str:
        """``auto`` is ``folded``: it wins on CPU (module docstring) and is one kernel launch per layer on CUDA."""
        return resolve_strategy(self.strategy, self.net)

    def _module_params(self, params: Params, blocks: range) -> Params:
        """``params`` and the batch norms' scale and shift (expanded to every task) under ``self.net``'s names."""
        num_tasks = next(iter(params.values())).shape[0]
        named = {}
        for index in blocks:
            named |= {f"{index}.{path}": params[key] for key, path in self._block_names[index]}
            if index < NUM_CONV:
                named[f"{index}.3.weight"] = self.norm_weight[index].expand(num_tasks, -1)
                named[f"{index}.3.bias"] = self.norm_bias[index].expand(num_tasks, -1)
        return named

    # ------------------------------------------------------------------ running
    def folded_block(self, index: int, params: Params, h: Tensor, norm_examples: int | None = None) -> Tensor:
        """Block ``index`` (0–3 conv blocks, 4 the logits) on task-folded activations ``h`` ``[N, T, *in_shape]``.

        The input and the output are folded channels-last (``task_folding.fold(x, channels_last=True)``),
        whatever the strategy.
        """
        block = {path: params[key] for key, path in self._block_names[index]}
        if index < NUM_CONV:  # the batch norm's scale and shift, shared by every task
            block["3.weight"], block["3.bias"] = self.norm_weight[index], self.norm_bias[index]
        return self._folded_blocks[index](block, h, norm_examples=norm_examples)

    def features(self, params: Params, x: Tensor, norm_examples: int | None = None) -> Tensor:
        """The flattened activations ``[T, N, F]`` after the four conv blocks."""
        body = self.net[:NUM_CONV]
        h = per_task_call(body, self._module_params(params, range(NUM_CONV)), x, strategy=self.resolved_strategy(),
                          norm_examples=norm_examples, channels_last=True)
        return h.flatten(2)

    def forward(self, params: Params, x: Tensor, norm_examples: int | None = None) -> Tensor:
        """Logits ``[T, N, num_classes]`` of images ``x`` ``[T, N, C, H, W]`` under per-task ``params``.

        ``norm_examples``: batch-norm statistics come from ``x[:, :norm_examples]`` (default: all of ``x``).
        """
        if x.dim() != 5:
            raise ValueError(f"FunctionalCNN: x must have shape [tasks, examples, C, H, W]; got {tuple(x.shape)}")
        return per_task_call(self.net, self._module_params(params, range(len(self.layers))), x,
                             strategy=self.resolved_strategy(), norm_examples=norm_examples, channels_last=True)


def _measure(widths: Sequence[int] = (4, 8, 16, 32), num_tasks: int = 16, repeats: int = 5) -> dict:
    """Forward + backward seconds per strategy (the numbers behind the module docstring)."""
    results = {}
    x = torch.rand(num_tasks, 30, 1, 28, 28)
    for width in widths:
        cnn = FunctionalCNN(width)
        params = {k: v.expand(num_tasks, *v.shape).clone().requires_grad_() for k, v in cnn.init_params().items()}
        for strategy in ("folded", "batched", "loop"):
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
