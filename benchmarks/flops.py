"""FLOP counts and achieved rates, so that figures from machines of different speeds compare.

Every benchmark reports, beside its times, the GFLOP/s its hot path achieved and that rate's share of this
machine's fp32 matmul rate (``machine_rate``, measured once per process, device and thread count): a share
moves little between machines where a time moves by their speed.

- ``count_flops``: the multiply-adds of matmuls, convolutions and attention, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add), with two CPU kernels torch miscounts
  (flash attention, left out; the native convolution, whose arguments it misreads) counted as their CUDA and
  oneDNN twins are. Elementwise work is not counted: for these paths it is small.
- ``pointwise_flops``: one FLOP per output element of every elementwise (and ``_foreach_``) operation, for
  paths that do no matmuls at all (an optimizer's step). Such paths are bound by memory traffic: their share
  of the matmul rate is small by nature and compares only with the same path elsewhere.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import (FlopCounterMode, conv_flop_count, sdpa_backward_flop_count,
                                      sdpa_flop_count)

from benchmarks.timing import matmul_gflops



def _attention(query, key, value, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001 (shapes)
    del args, out_shape, kwargs
    return sdpa_flop_count(query, key, value)


def _attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
    del args, out_shape, kwargs
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _native_conv2d(x, weight, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001 (shapes)
    del args, kwargs
    return conv_flop_count(x, weight, out_shape)


_CPU_KERNELS = {
    # counted as torch counts the CUDA kernels: dense, whatever the mask
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward,
    # torch's native CPU convolution: its registered formula reads the arguments in `convolution`'s order
    torch.ops.aten._slow_conv2d_forward: _native_conv2d,
}


@functools.cache
def _rate(device: str, threads: int) -> float:
    del threads  # part of the cache key only: the rate is measured with the current thread count
    return matmul_gflops(device=device)


def machine_rate(device: torch.device | str = "cpu") -> float:
    """This machine's fp32 matmul rate in GFLOP/s (1024² products), with the current thread count; measured on
    the first call for a device and thread count, the same figure afterwards."""
    return _rate(str(torch.device(device)), torch.get_num_threads())


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matmuls, convolutions and attention that ``fn()`` runs (forward and backward)."""
    with FlopCounterMode(display=False, custom_mapping=_CPU_KERNELS) as counter:
        fn()
    return counter.get_total_flops()


class _PointwiseCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's signature)
        out = func(*args, **(kwargs or {}))
        if func.name().split("::")[-1].startswith("_foreach_"):
            self.flops += sum(t.numel() for t in tree_leaves(args[0]) if isinstance(t, torch.Tensor))
        elif torch.Tag.pointwise in func.tags:
            self.flops += sum(t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def pointwise_flops(fn: Callable[[], Any]) -> int:
    """One FLOP per output element of each elementwise or ``_foreach_`` operation that ``fn()`` runs."""
    with _PointwiseCounter() as counter:
        fn()
    return counter.flops


def achieved(flop: float, seconds: float, *, device: torch.device | str = "cpu") -> dict[str, float]:
    """``flop`` done in ``seconds``: the GFLOP, the GFLOP/s and their share of ``machine_rate(device)``."""
    gflops = flop / seconds / 1e9
    return {"gflop": flop / 1e9, "gflops": gflops, "share_of_matmul_rate": gflops / machine_rate(device)}
