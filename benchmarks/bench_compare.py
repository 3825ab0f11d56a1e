"""Evaluation hot paths of ``metaopt compare``, against what a user would otherwise write.

- Transformer predictions at every support size k in one masked pass vs re-running the model per k.
- Least squares / ridge batched over tasks with ``torch.linalg`` vs a per-task NumPy loop.

``--device cuda`` runs ours on the GPU (the NumPy loop stays on the CPU, where a user would run it).
"""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.timing import best_of
from metaopt.learners import LeastSquares, Ridge, Transformer
from metaopt.tasks import LinearRegression


def _transformer(episode, ks) -> dict:
    model = Transformer(x_dim=episode.x_shape[0], max_support=episode.num_support).to(episode.device).eval()
    with torch.no_grad():
        one_pass = best_of(lambda: model.predict_by_support_size(episode, ks))
        per_k = best_of(lambda: torch.stack([model(episode.take_support(k)) for k in ks]))
        torch.testing.assert_close(model.predict_by_support_size(episode, ks),
                                   torch.stack([model(episode.take_support(k)) for k in ks]), rtol=1e-4, atol=1e-4)
    return {"one_pass_s": one_pass, "rerun_per_k_s": per_k, "speedup": per_k / one_pass}


def _solver(learner, episode, numpy_fit) -> dict:
    xs, ys, xq = (t.double().cpu().numpy() for t in (episode.x_support, episode.y_support, episode.x_query))

    def loop():
        return np.stack([xq[t] @ numpy_fit(xs[t], ys[t]) for t in range(len(xs))])

    batched = best_of(lambda: learner(episode))
    looped = best_of(loop)
    fields = ("x_support", "y_support", "x_query", "y_query")
    double = episode.replace(**{k: getattr(episode, k).double() for k in fields})
    np.testing.assert_allclose(learner(double).cpu().numpy(), loop(), rtol=1e-6, atol=1e-6)
    return {"batched_s": batched, "numpy_loop_s": looped, "speedup": looped / batched}


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
