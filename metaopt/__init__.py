"""metaopt: implicit (in-context) and explicit optimisers on one episode API.

``metaopt.run(recipe, overrides)`` runs a recipe end to end, as ``metaopt run`` does (:mod:`metaopt.pipelines`).
``metaopt.optimizers_for(model, data, loss)`` meta-trains a specialized optimizer for a model of the user's own
and returns it as a ``torch.optim.Optimizer`` (:mod:`metaopt.specialize`).
"""

from typing import Any

from metaopt.episodes import Episode

__version__ = "0.1.0"
__all__ = ["Episode", "__version__", "optimizers_for", "run"]


def __getattr__(name: str) -> Any:
    """``metaopt.run`` and ``metaopt.optimizers_for`` without importing the whole pipeline on ``import metaopt``."""
    if name == "run":
        from metaopt.pipelines import run

        return run
    if name == "optimizers_for":
        from metaopt.specialize import optimizers_for

        return optimizers_for
    raise AttributeError(f"module 'metaopt' has no attribute {name!r}")
