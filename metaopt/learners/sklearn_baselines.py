"""Per-task scikit-learn regressors (greedy trees, gradient boosting): references, not hot paths."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from metaopt.checks import optional, positive_float, positive_int
from metaopt.episodes import Episode
from metaopt.learners.base import Example, Learner

if TYPE_CHECKING:  # scikit-learn is imported when an estimator is made: importing it costs seconds at every launch
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.tree import DecisionTreeRegressor


class PerTaskRegressor(Learner):
    """Fits a fresh scikit-learn regressor to each task's support set and predicts its queries.

    Subclasses build the estimator in ``make_estimator``; an empty support set predicts 0.
    """

    kinds = ("regression",)
    capabilities = frozenset()  # the fit runs in scikit-learn, outside torch's autograd
    multi_output = True  # whether the estimator takes vector targets itself

    def make_estimator(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, episode: Episode) -> torch.Tensor:
        self.check_episode(episode)
        out = episode.y_query.new_zeros(episode.y_query.shape)
        if episode.num_support == 0:
            return out
        xs = episode.x_support.flatten(2).detach().cpu().double().numpy()
        ys = episode.y_support.flatten(2).detach().cpu().double().numpy()
        xq = episode.x_query.flatten(2).detach().cpu().double().numpy()
        predictions = np.stack([self._fit_predict(xs[t], ys[t], xq[t]) for t in range(episode.num_tasks)])
        return torch.as_tensor(predictions, dtype=out.dtype, device=out.device).reshape(out.shape)

    def _fit_predict(self, x: np.ndarray, y: np.ndarray, x_query: np.ndarray) -> np.ndarray:
        estimator = self.make_estimator()
        if y.shape[1] == 1:
            return estimator.fit(x, y[:, 0]).predict(x_query)[:, None]
        if not self.multi_output:
            from sklearn.multioutput import MultiOutputRegressor

            estimator = MultiOutputRegressor(estimator)
        return estimator.fit(x, y).predict(x_query)


class DecisionTreeBaseline(PerTaskRegressor):
    """scikit-learn's greedy CART regression tree per task (Garg et al.'s "greedy tree learning")."""

    def __init__(self, max_depth: int | None = None, random_state: int = 0) -> None:
        super().__init__()
        self.max_depth = optional(positive_int, "max_depth", max_depth, owner="DecisionTreeBaseline")
        self.random_state = random_state

    def make_estimator(self) -> DecisionTreeRegressor:
        from sklearn.tree import DecisionTreeRegressor

        return DecisionTreeRegressor(max_depth=self.max_depth, random_state=self.random_state)

    def extra_repr(self) -> str:
        return f"max_depth={self.max_depth}"


class GradientBoostingBaseline(PerTaskRegressor):
    """scikit-learn's gradient-boosted trees per task (stands in for Garg et al.'s XGBoost baseline)."""

    multi_output = False

    @classmethod
    def example(cls) -> Example:
        return Example(cls(n_estimators=5))

    def __init__(
        self, n_estimators: int = 100, max_depth: int = 3, learning_rate: float = 0.1, random_state: int = 0
    ) -> None:
        super().__init__()
        for name, value in (("n_estimators", n_estimators), ("max_depth", max_depth)):
            positive_int(name, value, owner="GradientBoostingBaseline")
        positive_float("learning_rate", learning_rate, owner="GradientBoostingBaseline")
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.learning_rate = float(learning_rate)
        self.random_state = random_state

    def make_estimator(self) -> GradientBoostingRegressor:
        from sklearn.ensemble import GradientBoostingRegressor

        return GradientBoostingRegressor(
            n_estimators=self.n_estimators, max_depth=self.max_depth, learning_rate=self.learning_rate,
            random_state=self.random_state,
        )

    def extra_repr(self) -> str:
        return f"n_estimators={self.n_estimators}, max_depth={self.max_depth}, learning_rate={self.learning_rate}"


__all__ = ["PerTaskRegressor", "DecisionTreeBaseline", "GradientBoostingBaseline"]
