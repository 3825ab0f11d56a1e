"""Where a source checkout keeps its recipes and benchmarks.

Nothing but :mod:`pathlib` is imported here, so that ``metaopt --help`` can name these folders without
loading torch or the pipeline.
"""

from pathlib import Path

__all__ = ["BENCHMARK_DIR", "CHECKOUT", "RECIPE_DIR"]

CHECKOUT = Path(__file__).resolve().parent.parent
"""The folder holding the ``metaopt`` package (a clone's root)."""
RECIPE_DIR = CHECKOUT / "recipes"
"""The bundled recipes."""
BENCHMARK_DIR = CHECKOUT / "benchmarks"
"""The performance benchmarks (``metaopt bench``); they ship with the source checkout only."""
