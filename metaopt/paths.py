"""Where a source checkout keeps its recipes and benchmarks, and the recipes found there.

Nothing but :mod:`pathlib` (and YAML, to read the recipes' descriptions) is imported here, so that
``metaopt --help`` and ``metaopt recipes`` answer without loading torch or the pipeline.
"""

from pathlib import Path

__all__ = ["BENCHMARK_DIR", "CHECKOUT", "RECIPE_DIR", "recipes"]

CHECKOUT = Path(__file__).resolve().parent.parent
"""The folder holding the ``metaopt`` package (a clone's root)."""
RECIPE_DIR = CHECKOUT / "recipes"
"""The bundled recipes."""
BENCHMARK_DIR = CHECKOUT / "benchmarks"
"""The performance benchmarks (``metaopt bench``); they ship with the source checkout only."""


def recipes() -> dict[str, str]:
    """Every recipe in ``./recipes`` and the bundled ones, by name, with its description (sorted by name).

    The paper-scale presets of a ``paper/`` folder are named ``paper/<name>``, which
    :func:`metaopt.config.find_recipe` also takes. A file that is not a readable YAML mapping is listed with what
    is wrong with it in place of a description (loading it names the error in full).
    """
    import yaml

    found = {path.resolve(): (path.relative_to(root).with_suffix("").as_posix(), path)
             for root in (RECIPE_DIR, Path("recipes")) for path in [*root.glob("*.yaml"), *root.glob("paper/*.yaml")]}
    listed = {}
    for name, path in sorted(found.values(), key=lambda item: item[0]):
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            listed[name] = f"(not readable as YAML: {str(error).splitlines()[0]})"
            continue
        listed[name] = (str(data.get("description", "") or "") if isinstance(data, dict)
                        else "(not a recipe: not a YAML mapping)")
    return listed
