"""The one place that reaches torch's private optimizer kernels, each behind a fallback in public ops.

torch's fused optimizer kernels (``torch._fused_adam_`` and ``torch._fused_sgd_``, what ``torch.optim.Adam`` and
``SGD`` run with ``fused=True``) do a whole step in one pass over memory; the same step in separate in-place ops
takes about three times as long. They are private, so a torch release may change or drop them. Here each is used
only on tensors it is known to take (one dtype and device, CPU or CUDA, contiguous), and when it is missing or
raises, the step runs in public in-place ops instead, from then on, with one logged warning.
``tests/test_inplace_kernels.py`` checks that both paths agree.

Each function adds ``scales[i] * direction_i`` to ``targets[i]`` and advances the direction's state tensors in
place, for lists of tensors (foreach-style). ``scratch[i]`` is a temporary shaped like ``grads[i]`` whose contents
are overwritten. Nothing here records an autograd graph: callers run under ``torch.no_grad()``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["adam_", "is_plain", "momentum_", "rmsprop_"]

log = logging.getLogger(__name__)

Tensors = Sequence[Tensor]


class _Private:
    """A private torch function looked up by name; after its first failure it is dropped for the public fallback."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.fn: Callable[..., object] | None = getattr(torch, name, None)

    def __call__(self, *args: object, **kwargs: object) -> bool:
        """Run it; False (run the fallback) when it is missing or raises."""
        if self.fn is None:
            return False
        try:
            self.fn(*args, **kwargs)
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as error:
            log.warning("torch.%s failed (%s); using public in-place ops from now on", self.name, error)
            self.fn = None
            return False
        return True


FUSED_ADAM = _Private("_fused_adam_")
FUSED_SGD = _Private("_fused_sgd_")


def is_plain(tensor: Tensor) -> bool:
    """Whether ``tensor`` owns its memory: false for ``torch.func`` wrappers (vmap's batched tensors, grad's)."""
    try:
        tensor.data_ptr()
    except RuntimeError:
        return False
    return True


_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fusable(*lists: Tensors) -> bool:
    """Whether torch's fused kernels take these tensors: they walk raw memory, so one dtype, device and layout."""
    tensors = [t for ts in lists for t in ts]
    kinds = {(t.dtype, t.device) for t in tensors}
    if len(kinds) != 1:
        return False
    ((dtype, device),) = kinds
    return device.type in ("cpu", "cuda") and dtype in _FUSED_DTYPES and all(t.is_contiguous() for t in tensors)


def _run_fused(fused: Callable[[int], bool], count: int) -> int:
    """Run ``fused(i)`` for ``i = 0, 1, ...`` up to its first failure; how many tensors it did."""
    done = 0
    while done < count and fused(done):
        done += 1
    return done


def adam_(
    targets: Tensors, grads: Tensors, mus: Tensors, nus: Tensors, scratch: Tensors, *, scales: Sequence[float],
    count: int | Sequence[int], b1: float, b2: float, eps: float, eps_root: float,
) -> None:
    """Adam's direction at step ``count`` (>= 1; one for all tensors or one per tensor):
    ``m̂_t / (sqrt(v̂_t + eps_root) + eps)``, advancing ``m`` and ``v``.

    The fused kernel covers ``eps_root = 0``.
    """
    counts = [count] * len(targets) if isinstance(count, int) else list(count)
    done = 0
    if eps_root == 0 and _fusable(targets, grads, mus, nus):
        steps = {c: torch.full((), float(c), dtype=torch.float32, device=grads[0].device) for c in set(counts)}
        done = _run_fused(
            lambda i: _fused_adam(targets[i], grads[i], mus[i], nus[i], scales[i], steps[counts[i]], b1=b1, b2=b2,
                                  eps=eps),
            len(targets),
        )
    for i in range(done, len(targets)):
        correction1, correction2 = 1.0 - b1 ** counts[i], 1.0 - b2 ** counts[i]
        g, mu, nu, tmp = grads[i], mus[i], nus[i], scratch[i]
        mu.lerp_(g, 1.0 - b1)
        nu.lerp_(torch.mul(g, g, out=tmp), 1.0 - b2)
        if eps_root == 0:  # torch's exact expression
            denom = torch.sqrt(nu, out=tmp).div_(math.sqrt(correction2)).add_(eps)
        else:
            denom = torch.div(nu, correction2, out=tmp).add_(eps_root).sqrt_().add_(eps)
        targets[i].addcdiv_(mu, denom, value=scales[i] / correction1)


def _fused_adam(
    target: Tensor, g: Tensor, mu: Tensor, nu: Tensor, c: float, step: Tensor, *, b1: float, b2: float, eps: float
) -> bool:
    """``target += c · m̂_t / (sqrt(v̂_t) + eps)`` by torch's fused Adam kernel; ``step``: t, a float32 tensor."""
    return FUSED_ADAM(
        [target], [g], [mu], [nu], [], [step],
        lr=-c, beta1=b1, beta2=b2, weight_decay=0.0, eps=eps, amsgrad=False, maximize=False,
    )


def rmsprop_(
    targets: Tensors, grads: Tensors, nus: Tensors, scratch: Tensors, *, scales: Sequence[float], alpha: float,
    eps: float, eps_root: float,
) -> None:
    """RMSProp's direction ``g_t / (sqrt(v_t + eps_root) + eps)`` (not centered), advancing ``v`` in place.

    With ``eps_root = 0`` this is Adam with ``b1 = 0`` (so ``m_t = g_t``, from a zeroed first moment) and
    ``b2 = alpha`` at step 1, whose bias correction ``sqrt(1 - alpha)`` of ``sqrt(v)`` is undone by dividing the
    scale and ``eps`` by it: the fused Adam kernel does it in one pass.
    """
    done = 0
    if eps_root == 0 and _fusable(targets, grads, nus, scratch):
        k = math.sqrt(1.0 - alpha)
        one = torch.ones((), dtype=torch.float32, device=grads[0].device)
        done = _run_fused(
            lambda i: _fused_adam(
                targets[i], grads[i], scratch[i].zero_(), nus[i], scales[i] / k, one, b1=0.0, b2=alpha, eps=eps / k
            ),
            len(targets),
        )
    for i in range(done, len(targets)):
        g, nu, tmp = grads[i], nus[i], scratch[i]
        nu.lerp_(torch.mul(g, g, out=tmp), 1.0 - alpha)
        targets[i].addcdiv_(g, torch.add(nu, eps_root, out=tmp).sqrt_().add_(eps), value=scales[i])


def momentum_(
    targets: Tensors, grads: Tensors, traces: Tensors, *, scales: Sequence[float], beta: float, nesterov: bool
) -> None:
    """Heavy ball ``b_t = beta · b_{t-1} + g_t``, direction ``b_t`` (or ``g_t + beta · b_t`` when ``nesterov``).

    Advances ``b`` in place; torch's fused SGD kernel does a tensor in one pass.
    """
    done = 0
    if _fusable(targets, grads, traces):
        done = _run_fused(
            lambda i: FUSED_SGD(
                [targets[i]], [grads[i]], [traces[i]], weight_decay=0.0, momentum=beta, lr=-scales[i], dampening=0.0,
                nesterov=nesterov, maximize=False, is_first_step=False,
            ),
            len(targets),
        )
    for i in range(done, len(targets)):
        g, trace, c = grads[i], traces[i], scales[i]
        torch.add(g, trace, alpha=beta, out=trace)
        if nesterov:
            targets[i].add_(g, alpha=c)
        targets[i].add_(trace, alpha=c * beta if nesterov else c)
