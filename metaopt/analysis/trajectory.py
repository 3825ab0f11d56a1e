"""Fixed-batch loss probes along a training trajectory (Sandler, Zhmoginov, Vladymyrov & Miller 2023).

"Training trajectories, mini-batch losses and the curious role of the learning rate" measures the loss of a few
*fixed* mini-batches at every step of SGD and finds it convex-like and close to quadratic, and that one gradient
step on such a batch with a large learning rate brings its loss very low. Their per-batch quadratic model relates
the iterates to the minima of the batches, and makes iterate averages equivalent to learning-rate schedules.

What the paper leaves open at this scale, and what is chosen here:

- **The quadratic fit** (:func:`fit_quadratic`) is a full quadratic ``c + bᵀz + ½ zᵀQz`` in the coordinates
  ``z`` of the iterates along the top ``dims`` principal directions of the (centred) trajectory, fitted by least
  squares to each batch's losses; R² says how much of the batch loss's variation along the path it explains, and
  the eigenvalues of ``Q`` whether it is convex. The linear fit in the same coordinates is reported as a control.
- **One large step** (:func:`one_large_step`): the batch's loss after ``θ - λ ∇L_b(θ)`` on a log grid of ``λ``.
- **The averaging model** (:func:`averaging_variance`, :func:`matched_rates`): the isotropic per-batch model,
  every batch loss ``½ h ||θ - θ_b||²`` with the batch minima ``θ_b`` spread around ``θ*`` with variance ``σ²``.
  SGD with rate ``λ`` is then ``θ_{t+1} = (1 - α) θ_t + α θ_{b_t}`` with ``α = λ h``, an exponential average of
  the batch minima, whose spread around ``θ*`` is ``α / (2 - α) σ²``; the best single step on a batch is
  ``λ = 1 / h``, which is how ``h`` is measured. An average of the iterates has a smaller spread, and the rate
  schedule that gives the plain iterate the same spread at every step is "the matched schedule". Heavy-ball
  momentum ``μ`` enters as its long-run step ``λ / (1 - μ)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "OneStep",
    "QuadraticFit",
    "averaging_variance",
    "batch_losses",
    "fit_quadratic",
    "matched_rates",
    "one_large_step",
    "stationary_variance",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


def _loss_at(model: nn.Module, params: dict[str, Tensor], batch: tuple[Tensor, Tensor], loss_fn: LossFn) -> Tensor:
    """``model``'s loss on ``batch`` with weights ``params``; its buffers (batch-norm statistics) left untouched."""
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    return loss_fn(torch.func.functional_call(model, {**params, **buffers}, (batch[0],)), batch[1])


@torch.no_grad()
def batch_losses(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], loss_fn: LossFn) -> Tensor:
    """The loss of each fixed batch at the model's current weights, ``[B]`` (its buffers are not updated)."""
    params = dict(model.named_parameters())
    return torch.stack([_loss_at(model, params, batch, loss_fn) for batch in batches]).detach()


@dataclass(frozen=True)
class QuadraticFit:
    """A quadratic fit of batch losses along a trajectory (see the module docstring)."""

    r2: Tensor  # [B] coefficient of determination of each batch's quadratic fit
    r2_linear: Tensor  # [B] the same for a linear fit (the control)
    curvatures: Tensor  # [B, dims] eigenvalues of each batch's fitted Q, in weight units (all >= 0: convex)
    explained: float  # share of the trajectory's variance in the ``dims`` principal directions
    fitted: Tensor  # [B, T] the quadratic fits' values along the trajectory


def _r2(target: Tensor, fitted: Tensor) -> Tensor:
    residual = (target - fitted).pow(2).sum(-1)
    total = (target - target.mean(-1, keepdim=True)).pow(2).sum(-1)
    return 1.0 - residual / total.clamp(min=torch.finfo(target.dtype).tiny)


def fit_quadratic(points: Tensor, losses: Tensor, *, dims: int = 3) -> QuadraticFit:
    """Fit each batch's losses along a trajectory by a quadratic in the trajectory's top principal coordinates.

    Args:
        points: ``[T, n]`` the flattened weights at each recorded step.
        losses: ``[B, T]`` each fixed batch's loss at those steps (or ``[T]`` for one batch).
        dims: how many principal directions the quadratic lives in; it has ``(dims + 1)(dims + 2) / 2``
            coefficients, which must be fewer than ``T``.

    Raises:
        ValueError: shapes that do not match, or too few points for ``dims``.
    """
    if points.dim() != 2:
        raise ValueError(f"points must be [steps, weights]; got shape {tuple(points.shape)}")
    losses = losses.unsqueeze(0) if losses.dim() == 1 else losses
    if losses.dim() != 2 or losses.shape[1] != points.shape[0]:
        raise ValueError(f"losses must be [batches, {points.shape[0]}] (one loss per point); got {tuple(losses.shape)}")
    terms = (dims + 1) * (dims + 2) // 2
    if not isinstance(dims, int) or dims < 1 or points.shape[0] <= terms:
        raise ValueError(f"dims must be an int >= 1 with more points than the quadratic's {terms} coefficients; "
                         f"got dims={dims!r} with {points.shape[0]} points")
    points, losses = points.double(), losses.double()
    centred = points - points.mean(0)
    _, singular, basis = torch.linalg.svd(centred, full_matrices=False)
    z = centred @ basis[:dims].T  # [T, dims]
    scale = z.std(0).clamp(min=1e-300)
    z = z / scale  # unit scale: a well-conditioned least-squares problem
    rows, cols = torch.triu_indices(dims, dims)
    design = torch.cat([torch.ones(len(z), 1, dtype=z.dtype), z, z[:, rows] * z[:, cols]], dim=1)
    coefficients = torch.linalg.lstsq(design, losses.T).solution  # [terms, B]
    fitted = (design @ coefficients).T
    linear = (design[:, : dims + 1] @ torch.linalg.lstsq(design[:, : dims + 1], losses.T).solution).T
    hessian = torch.zeros(losses.shape[0], dims, dims, dtype=z.dtype)
    second = coefficients[dims + 1:].T  # [B, pairs]: the coefficient of z_i z_j
    hessian[:, rows, cols] = second
    hessian = hessian + hessian.transpose(1, 2)  # Q_ii = 2 c_ii, Q_ij = c_ij
    hessian = hessian / scale[:, None] / scale[None, :]  # back in the units of the weights
    share = float(singular[:dims].pow(2).sum() / singular.pow(2).sum().clamp(min=1e-300))
    return QuadraticFit(_r2(losses, fitted).float(), _r2(losses, linear).float(),
                        torch.linalg.eigvalsh(hessian).float(), share, fitted.float())


@dataclass(frozen=True)
class OneStep:
    """How low one gradient step gets a fixed batch: its loss before, after each ``lr``, and the best."""

    before: float
    lrs: list[float]
    losses: list[float]

    @property
    def best(self) -> float:
        finite = [loss for loss in self.losses if math.isfinite(loss)]
        return min(finite) if finite else math.inf

    @property
    def best_lr(self) -> float:
        return self.lrs[self.losses.index(self.best)] if math.isfinite(self.best) else math.nan

    @property
    def ratio(self) -> float:
        """Best loss after one step over the loss before (small: one step nearly solves the batch)."""
        return self.best / self.before


def one_large_step(model: nn.Module, batch: tuple[Tensor, Tensor], loss_fn: LossFn, lrs: Sequence[float]) -> OneStep:
    """The batch's loss after one plain gradient step ``θ - λ ∇L_b(θ)`` for each ``λ`` of ``lrs``.

    The model's weights and buffers are left as they were.
    """
    if not lrs or any(not (lr > 0) for lr in lrs):
        raise ValueError(f"lrs must be a non-empty list of learning rates > 0; got {list(lrs)!r}")
    params = {k: p.detach().requires_grad_(True) for k, p in model.named_parameters()}
    before = _loss_at(model, params, batch, loss_fn)
    grads = torch.autograd.grad(before, list(params.values()))
    losses = []
    with torch.no_grad():
        for lr in lrs:
            stepped = {k: p - lr * g for (k, p), g in zip(params.items(), grads)}
            losses.append(float(_loss_at(model, stepped, batch, loss_fn)))
    return OneStep(before.item(), [float(lr) for lr in lrs], losses)


def stationary_variance(alpha: float) -> float:
    """The spread of the SGD iterate around ``θ*`` in the isotropic model, in units of ``σ²``: ``α / (2 - α)``."""
    if not 0 < alpha < 2:
        raise ValueError(f"alpha (the step λh of the isotropic model) must be in (0, 2); got {alpha!r}")
    return alpha / (2.0 - alpha)


def averaging_variance(alpha: float, kind: str, *, decay: float = 0.0, delta: int = 1, every: int = 1,
                       count: int = 1) -> float:
    """The spread (units of ``σ²``) of an average of stationary SGD iterates in the isotropic model.

    The iterates are an AR(1) process with coefficient ``a = 1 - α`` and variance :func:`stationary_variance`.

    Args:
        kind: ``"ema"`` (``decay``), ``"two_point"`` (``delta``) or ``"swa"`` (``count`` iterates ``every`` apart).
    """
    v, a = stationary_variance(alpha), 1.0 - alpha
    if kind == "ema":
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1); got {decay!r}")
        return v * (1 - decay) ** 2 * (1 + a * decay) / ((1 - decay**2) * (1 - a * decay))
    if kind == "two_point":
        return v * (1 + a**delta) / 2
    if kind == "swa":
        r = a**every
        lags = torch.arange(1, count, dtype=torch.float64)
        return v * float(count + 2 * ((count - lags) * r**lags).sum()) / count**2
    raise ValueError(f"kind must be 'ema', 'two_point' or 'swa'; got {kind!r}")


def matched_rates(initial: float, targets: Sequence[float]) -> list[float]:
    """The per-step rates ``α_s`` that take the plain SGD iterate's spread from ``initial`` along ``targets``.

    Under the isotropic model one step with rate ``α`` maps the spread ``v`` to ``(1 - α)² v + α²`` (units of
    ``σ²``). Each ``α_s`` is the larger root that lands on ``targets[s]`` (the smaller one stops learning: at a
    constant spread ``v*`` it is 0, the larger the stationary rate ``2v* / (1 + v*)``), or the spread-minimising
    ``v / (v + 1)`` when the target is below what one step can reach (the running mean, ``α_n = 1 / n``, moves
    along that minimum).
    """
    rates, v = [], float(initial)
    for target in targets:
        disc = v * v - (v + 1) * (v - target)  # of (v + 1) α² - 2 v α + (v - target) = 0
        alpha = v / (v + 1) if disc < 0 else min((v + math.sqrt(disc)) / (v + 1), 1.0)
        rates.append(alpha)
        v = (1 - alpha) ** 2 * v + alpha**2
    return rates
