"""metaopt: implicit (in-context) and explicit optimisers on one episode API.

``metaopt.run(recipe, overrides)`` runs a recipe end to end, as ``metaopt run`` does (:mod:`metaopt.pipelines`).
"""

from typing import Any

from metaopt.episodes import Episode

__version__ = "0.1.0"
__all__ = ["Episode", "__version__", "run"]


def __getattr__(name: str) -> Any:
    """``metaopt.run`` without importing the whole pipeline on ``import metaopt``."""
    if name == "run":
        from metaopt.pipelines import run

        return run
    raise AttributeError(f"module 'metaopt' has no attribute {name!r}")
