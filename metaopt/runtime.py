"""Where and how a run computes: its device, its floating-point precision, and whether its loss is compiled.

The same recipe runs on a laptop's CPU and on a GPU: ``device: auto`` picks CUDA when there is one,
``precision: bf16 | fp16`` runs the learner under autocast (fp16 with loss scaling, :class:`LossScaler`), and
``compile: true`` hands the learner's loss to ``torch.compile`` where that works and falls back to eager, with
one warning, where it does not (:func:`compile_loss`). Closed-form solvers that lose too much in half precision
(Cholesky, solve, pseudo-inverse) run in float32 whatever the autocast state (:func:`full_precision`).
Nothing here requires a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import warnings
from typing import Any, Callable, ContextManager, Literal, TypeVar, get_args

import torch

from metaopt.checks import ArgumentError, one_of

__all__ = [
    "DEVICE_FORMS", "PRECISIONS", "CompiledLoss", "LossScaler", "Precision", "autocast", "check_device",
    "check_precision", "compile_loss", "full_precision", "resolve_device",
]

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_HALF = (torch.float16, torch.bfloat16)

DEVICE_FORMS = "auto, cpu, cuda or cuda:N (N a CUDA device index)"
_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")

F = TypeVar("F", bound=Callable[..., Any])


# ---------------------------------------------------------------------- device
def check_device(spec: object, *, owner: str = "device") -> str:
    """``spec`` if it is written as a device a recipe may name (auto, cpu, cuda, cuda:N); no CUDA needed.

    A syntax check only, for load time: whether the device exists is :func:`resolve_device`'s question.
    """
    if not isinstance(spec, str) or not _DEVICE_PATTERN.fullmatch(spec):
        raise ArgumentError(owner, "device", DEVICE_FORMS, spec)
    return spec


def resolve_device(spec: str | torch.device) -> torch.device:
    """The ``torch.device`` a run computes on, from a recipe's ``device`` (auto, cpu, cuda, cuda:N).

    ``auto`` is CUDA when ``torch.cuda.is_available()``, else the CPU. Under ``torchrun`` (``LOCAL_RANK`` in the
    environment) ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK``, one GPU per process of a node, as NCCL wants;
    ``cuda:N`` is taken as given. The caller makes the device current (``metaopt.distributed.session`` does).

    Raises:
        ValueError: ``spec`` is not one of those forms, CUDA is asked for and absent, or the index is not a
            visible device.
    """
    spec = check_device(str(spec), owner="resolve_device")
    cuda = torch.cuda.is_available()
    if spec == "cpu" or (spec == "auto" and not cuda):
        return torch.device("cpu")
    if not cuda:
        raise ValueError(f"device={spec!r} but no CUDA device is available; use device=auto or cpu")
    count = torch.cuda.device_count()
    if spec in ("auto", "cuda"):
        local_rank = os.environ.get("LOCAL_RANK", "0")
        if not local_rank.isdigit() or int(local_rank) >= count:
            raise ValueError(f"device={spec!r} under torchrun uses cuda:LOCAL_RANK, but LOCAL_RANK={local_rank!r} "
                             f"and {count} CUDA device(s) are visible; start at most {count} process(es) per node "
                             "or give device=cuda:N")
        return torch.device("cuda", int(local_rank))
    index = int(spec.partition(":")[2])
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        raise ValueError(f"device={spec!r} would put every process of this machine on one GPU; under torchrun "
                         "give device=auto or cuda (cuda:LOCAL_RANK for each process)")
    if index >= count:
        raise ValueError(f"device={spec!r} but only {count} CUDA device(s) are visible (cuda:0 .. cuda:{count - 1}); "
                         "use device=auto, cuda or a visible index")
    return torch.device("cuda", index)


# ---------------------------------------------------------------------- precision
def check_precision(precision: object, device: torch.device | str) -> Precision:
    """``precision`` if autocast on ``device`` supports it; pipelines call this when they build a run.

    The check enters ``torch.autocast`` once and asks whether it took effect, so it follows what this torch
    supports (torch 2.13 runs CPU autocast in bfloat16 and float16 alike; a GPU without bfloat16 refuses bf16).

    Raises:
        ValueError: ``precision`` is not one of :data:`PRECISIONS`, or autocast on this device refuses it.
    """
    one_of("precision", precision, PRECISIONS, owner="check_precision")
    device = torch.device(device)
    if precision == "fp32":
        return precision
    dtype = _AUTOCAST_DTYPES[precision]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an unsupported dtype only warns and disables autocast
            with torch.autocast(device.type, dtype=dtype):
                supported = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == dtype
    except RuntimeError:  # e.g. "Current CUDA Device does not support bfloat16"
        supported = False
    if not supported:
        raise ValueError(f"precision={precision!r} is not supported by autocast on {device} with torch "
                         f"{torch.__version__}; use precision=fp32" + ("" if precision == "bf16" else " or bf16"))
    return precision


def autocast(precision: Precision, device: torch.device | str) -> ContextManager[Any]:
    """The context a learner's forward and loss run in: nothing for fp32, ``torch.autocast`` for bf16 / fp16.

    Parameters stay float32 (autocast casts per op); validate the pair once with :func:`check_precision`.
    """
    one_of("precision", precision, PRECISIONS, owner="autocast")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_AUTOCAST_DTYPES[precision])


def _autocast_off() -> ContextManager[Any]:
    """Autocast disabled on every device type where it is on (a no-op context when it is on nowhere)."""
    stack = contextlib.ExitStack()
    for device_type in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device_type):
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def _float32(value: Any) -> Any:
    return value.float() if isinstance(value, torch.Tensor) and value.dtype in _HALF else value


def full_precision(fn: F) -> F:
    """Decorate a solver so that it computes in float32 even under autocast.

    Cholesky factorisations, linear solves and pseudo-inverses of Gram matrices lose most of their digits in
    bfloat16 / float16 (and CUDA has no half-precision kernels for them), so the decorated function runs with
    autocast disabled and its half-precision tensor arguments cast up to float32; float32 and float64 arguments
    are left as they are. Its result is float32 (or float64), which later autocast ops cast down as they need.
    """
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _autocast_off():
            return fn(*map(_float32, args), **{key: _float32(value) for key, value in kwargs.items()})

    return wrapper  # type: ignore[return-value]


class LossScaler:
    """Loss scaling for fp16 (``torch.amp.GradScaler``); a pass-through for fp32 and bf16.

    The training step reads the same in every precision::

        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)            # true gradients from here on: clip them now
        skipped = scaler.step(optimizer)      # no step when fp16 gradients overflowed
        scaler.update()

    fp16 is scaled on CPU too (torch 2.13's CPU autocast runs float16, and its gradients underflow there as
    on a GPU). ``GradScaler.step`` reads the overflow flag on the host, one synchronisation per fp16 step,
    unless the optimizer is fused (``AdamW(fused=True)`` on CUDA).

    Args:
        precision: the run's precision; scaling is on for ``fp16`` only.
        device: the device the gradients live on.
    """

    def __init__(self, precision: Precision, device: torch.device | str) -> None:
        one_of("precision", precision, PRECISIONS, owner="LossScaler")
        self.device = torch.device(device)
        self._scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")

    @property
    def enabled(self) -> bool:
        """Whether the loss is scaled (fp16)."""
        return self._scaler.is_enabled()

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call ``backward`` on: multiplied by the current scale under fp16, else ``loss`` itself."""
        return self._scaler.scale(loss)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the optimizer's gradients by the scale in place (once per step, before clipping)."""
        self._scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """``optimizer.step()`` unless the unscaled gradients hold inf/NaN (fp16); returns whether it skipped.

        The flag is a 0-dim float tensor on the gradients' device (1.0: skipped), not a bool, so that reading it
        is the caller's choice: sum it over steps and read it when logging (every step under fp32/bf16 gives 0).
        """
        if not self.enabled:
            optimizer.step()
            return torch.zeros((), device=self.device)
        self._scaler.step(optimizer)
        found = self._scaler._found_inf_per_device(optimizer).values()  # filled by unscale_, explicit or in step
        if not found:  # no parameter had a gradient
            return torch.zeros((), device=self.device)
        return torch.stack([flag.to(self.device) for flag in found]).sum()

    def current_scale(self) -> float:
        """The loss scale now (1.0 when scaling is off); reading it waits for the device."""
        return float(self._scaler.get_scale()) if self.enabled else 1.0

    def update(self) -> None:
        """Adjust the scale for the next step (halved after an overflow, doubled after a run of clean steps)."""
        self._scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """The scale and its growth tracker (empty when scaling is off); checkpoints hold it."""
        return self._scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a scale; an empty state (a checkpoint of an fp32 or bf16 run) keeps the fresh scale."""
        if state:
            self._scaler.load_state_dict(state)


# ---------------------------------------------------------------------- compile
class CompiledLoss:
    """A loss through ``torch.compile`` that falls back to eager, for good, the first time compiling fails.

    A failure shows either when the compiled function runs (an op dynamo cannot trace, no C++ compiler for
    inductor) or only when its graph is differentiated (``torch.compile`` does not support double backward,
    which MAML-style inner loops need). So the first call with gradients on also differentiates the loss with
    respect to every leaf tensor its graph reaches, as ``backward`` would but without touching any ``.grad``
    (one extra backward pass, once), and falls back if that fails. Either way one warning names the loss and
    the error, and the call is answered by the eager function (the failed compiled call may already have drawn
    random numbers, e.g. for dropout). An error the eager function raises too is the caller's and is re-raised as
    such; compiling stays on.

    Args:
        fn: the eager loss.
        name: how the warning names it (e.g. the learner's name).
        backend: ``torch.compile``'s backend (``inductor``; ``eager`` or ``aot_eager`` compile faster).
    """

    def __init__(self, fn: Callable[..., Any], name: str, *, backend: str = "inductor") -> None:
        self.fn, self.name = fn, name
        self.compiled: Callable[..., Any] | None = None
        try:
            self.compiled = torch.compile(fn, backend=backend)
        except Exception as error:  # noqa: BLE001 - e.g. an unknown backend, or a Python torch.compile refuses
            self._fall_back(error)
        self._backward_checked = False

    @property
    def active(self) -> bool:
        """Whether calls still go through the compiled function (False after a fallback)."""
        return self.compiled is not None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is None:
            return self.fn(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
            if not self._backward_checked and torch.is_grad_enabled():
                self._check_backward(out)
            return out
        except Exception as error:  # noqa: BLE001 - any compile failure means eager; the eager call re-raises its own
            eager = self.fn(*args, **kwargs)
            self._fall_back(error)
            return eager

    def _check_backward(self, out: Any) -> None:
        if not isinstance(out, torch.Tensor) or out.grad_fn is None:
            return  # nothing to differentiate (yet): check at the next call
        leaves = _leaves(out.grad_fn)
        if leaves:
            torch.autograd.grad(out.sum(), leaves, retain_graph=True, allow_unused=True)
        self._backward_checked = True

    def _fall_back(self, error: Exception) -> None:
        lines = str(error).strip().splitlines()
        logger.warning("compile: %s runs eagerly, torch.compile failed (%s: %s)",
                       self.name, type(error).__name__, lines[0] if lines else "")
        self.compiled = None


def _leaves(root: Any) -> list[torch.Tensor]:
    """The leaf tensors an autograd graph accumulates gradients into (every one ``backward`` would reach)."""
    leaves, seen, stack = [], set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # an AccumulateGrad node
            leaves.append(node.variable)
        stack.extend(child for child, _ in node.next_functions)
    return leaves


def compile_loss(fn: Callable[..., Any], enabled: bool, name: str, *, backend: str = "inductor") -> Callable[..., Any]:
    """``fn`` itself when ``enabled`` is False, else a :class:`CompiledLoss` that falls back to ``fn``."""
    if not enabled:
        return fn
    return CompiledLoss(fn, name, backend=backend)
