"""metaopt: implicit (in-context) and explicit optimisers on one episode API.

``metaopt.run(recipe, overrides)`` runs a recipe end to end, as ``metaopt run`` does (:mod:`metaopt.pipelines`).
``metaopt.optimizers_for(model, data, loss)`` meta-trains a specialized optimizer for a model of the user's own
and returns it as a ``torch.optim.Optimizer`` (:mod:`metaopt.specialize`).
``metaopt.log_to_console()`` shows metaopt's progress and messages on stderr (:mod:`metaopt.progress`).

Every name is imported when first used, so that ``import metaopt`` (and ``metaopt --help``) loads neither
torch nor the pipeline.
"""

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["Episode", "__version__", "log_to_console", "optimizers_for", "run"]

_SOURCES = {"Episode": "metaopt.episodes", "log_to_console": "metaopt.progress", "optimizers_for": "metaopt.specialize",
            "run": "metaopt.pipelines"}


def __getattr__(name: str) -> Any:
    """The public names, each imported from its module on first use."""
    if name in _SOURCES:
        return getattr(importlib.import_module(_SOURCES[name]), name)
    raise AttributeError(f"module 'metaopt' has no attribute {name!r}")
