"""Evaluation hot paths of ``metaopt compare``, against what a user would otherwise write.

- Transformer predictions at every support size k in one masked pass vs re-running the model per k.
- Least squares / ridge batched over tasks with ``torch.linalg`` vs a per-task NumPy loop.

Both are checked before timing, in float64 (float32 rounding differs between machines): the one pass equals the
reruns to 1e-9, the batched solvers equal NumPy's to 1e-6. The times are float32 (the solvers' NumPy loop: float64,
as a user would run it). Achieved GFLOP/s (``benchmarks.flops``): the transformer's counted matmuls and
attention; the solvers' the normal equations' ``2Sd² + 2Sd + d³/3 + 2d² + 2Qd`` per task (Gram matrix, moment,
Cholesky, two triangular solves, prediction), the problem's work whatever the algorithm.

``--device cuda`` runs ours on the GPU (the NumPy loop stays on the CPU, where a user would run it).
"""

from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch
from torch import nn

from benchmarks.bench_maml import float64
from benchmarks.flops import achieved, count_flops
from benchmarks.timing import best_of
from metaopt.episodes import Episode
from metaopt.learners import LeastSquares, Ridge, Transformer
from metaopt.tasks import LinearRegression

NumpyFit = Callable[[np.ndarray, np.ndarray], np.ndarray]
TOLERANCE = 1e-9  # the transformer's one pass against its reruns, both float64
SOLVER_TOLERANCE = 1e-6  # the batched solvers against NumPy's: the ridge solve runs in float32 whatever the input


def check_transformer(model: Transformer, episode: Episode, ks: list[int]) -> None:
    """The one masked pass predicts what re-running ``model`` on each support size does (float64, to
    ``TOLERANCE``)."""
    model64, episode64 = copy.deepcopy(model).double(), float64(episode)
    torch.testing.assert_close(model64.predict_by_support_size(episode64, ks),
                               torch.stack([model64(episode64.take_support(k)) for k in ks]),
                               rtol=TOLERANCE, atol=TOLERANCE)


def _transformer(episode: Episode, ks: list[int]) -> dict:
    model = Transformer(x_dim=episode.x_shape[0], max_support=episode.num_support).to(episode.device).eval()
    with torch.no_grad():
        check_transformer(model, episode, ks)
        one_pass = best_of(lambda: model.predict_by_support_size(episode, ks))
        per_k = best_of(lambda: torch.stack([model(episode.take_support(k)) for k in ks]))
        one_pass_flop = count_flops(lambda: model.predict_by_support_size(episode, ks))
        per_k_flop = count_flops(lambda: [model(episode.take_support(k)) for k in ks])
    return {"one_pass_s": one_pass, "rerun_per_k_s": per_k, "speedup": per_k / one_pass,
            "one_pass_rate": achieved(one_pass_flop, one_pass, device=episode.device),
            "rerun_per_k_rate": achieved(per_k_flop, per_k, device=episode.device)}


def normal_equations_flop(episode: Episode) -> int:
    """FLOPs of solving every task's least squares through its normal equations and predicting its queries."""
    T, S, Q, d = episode.num_tasks, episode.num_support, episode.num_query, episode.x_shape[0]
    return T * (2 * S * d * d + 2 * S * d + d**3 // 3 + 2 * d * d + 2 * Q * d)


def check_solver(learner: nn.Module, episode: Episode, numpy_fit: NumpyFit) -> None:
    """The batched ``learner`` on the float64 episode predicts what the NumPy loop does, to ``SOLVER_TOLERANCE``."""
    np.testing.assert_allclose(learner(float64(episode)).cpu().numpy(), _numpy_loop(episode, numpy_fit),
                               rtol=SOLVER_TOLERANCE, atol=SOLVER_TOLERANCE)


def _numpy_loop(episode: Episode, numpy_fit: NumpyFit) -> np.ndarray:
    xs, ys, xq = (t.double().cpu().numpy() for t in (episode.x_support, episode.y_support, episode.x_query))
    return np.stack([xq[t] @ numpy_fit(xs[t], ys[t]) for t in range(len(xs))])


def _solver(learner: nn.Module, episode: Episode, numpy_fit: NumpyFit) -> dict:
    check_solver(learner, episode, numpy_fit)
    batched = best_of(lambda: learner(episode))
    looped = best_of(lambda: _numpy_loop(episode, numpy_fit))
    flop = normal_equations_flop(episode)
    return {"batched_s": batched, "numpy_loop_s": looped, "speedup": looped / batched,
            "batched_rate": achieved(flop, batched, device=episode.device), "numpy_loop_rate": achieved(flop, looped)}


def run(*, device: str = "cpu") -> dict:
    family = LinearRegression(5)
    episode = family.sample(512, 11, 4, generator=torch.Generator().manual_seed(0)).to(device)
    ks = list(range(12))
    solver_episode = LinearRegression(20, noise_std=0.1).sample(2000, 40, 4,
                                                                generator=torch.Generator().manual_seed(1)).to(device)
    lam = 0.5
    return {
        "transformer_all_k_512_tasks": _transformer(episode, ks),
        "least_squares_2000_tasks": _solver(LeastSquares(), solver_episode,
                                            lambda x, y: np.linalg.lstsq(x, y, rcond=None)[0]),
        "ridge_2000_tasks": _solver(Ridge(lam), solver_episode,
                                    lambda x, y: np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y)),
    }
