"""The paper reproduction recipes: each loads, builds, and runs end to end when shrunk drastically.

The full runs (minutes each) are recorded in docs/reproductions.md; the slow test below re-runs the
fastest one and checks its paper claims.
"""

import json

import pytest

from metaopt.cli import main
from metaopt.config import RECIPE_DIR
from metaopt.pipelines import build, load
from metaopt.testing import shrunk

REPRODUCTIONS = [
    "lsa_is_gd",
    "lsa_is_gd_half_range",
    "lsa_multilayer",
    "transformer_tracks_ols",
    "noisy_linear_transformers",
    "mesa",
    "boolean_architectures",
    "boolean_architectures_dnf",
    "boolean_architectures_parity",
    "icl_vs_finetuning",
    "icl_vs_finetuning_classification",
    "frozen_lm_boolean",
    "frozen_lm_nearest_neighbour",
]
# The variants docs/reproductions.md names as overrides.
VARIANTS = [
    ("boolean_architectures", ["task.teaching=true"]),
    ("boolean_architectures_dnf", ["task.teaching=true", "train.support=48",
                                   "compare.support_sizes=[0,8,16,24,32,40,45,48]",
                                   "learners.transformer.max_support=48", "learners.hyena.max_support=48"]),
    ("boolean_architectures_parity", ["task.teaching=true"]),
]


@pytest.mark.parametrize("recipe", REPRODUCTIONS)
def test_reproduction_recipe_loads_and_builds(recipe):
    assert (RECIPE_DIR / f"{recipe}.yaml").is_file()
    config = load(recipe)
    assert config.claims, f"{recipe} states no paper claim"
    experiment = build(config)
    assert any(learner.implicit for learner in experiment.learners.values())


@pytest.mark.parametrize("recipe,overrides", VARIANTS)
def test_documented_variants_build(recipe, overrides):
    build(load(recipe, overrides))


@pytest.mark.parametrize("recipe", REPRODUCTIONS)
def test_reproduction_recipe_runs_shrunk(recipe, tmp_path):
    assert main(["run", recipe, f"output_dir={tmp_path}", *shrunk(recipe)]) == 0
    (run_dir,) = (tmp_path / load(recipe).name).iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["curves"]) == set(load(recipe).learners)
    assert len(results["claims"]) == len(load(recipe).claims)
    for analysis in load(recipe).compare.analysis:
        name = analysis if isinstance(analysis, str) else analysis.name
        assert name in results["analysis"]


@pytest.mark.slow
def test_lsa_is_gd_full_run_holds_its_claims(tmp_path):
    """The full recipe (about 20-40 s on one core): one LSA layer matches the best GD step."""
    assert main(["run", "lsa_is_gd", f"output_dir={tmp_path}", "wandb.mode=disabled", "progress=false"]) == 0
    (run_dir,) = (tmp_path / "lsa_is_gd").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert all(claim["holds"] for claim in results["claims"])
    cosine = results["analysis"]["sensitivity"]["lsa_1_layer vs gd_best_step"]["cosine"]
    assert cosine[-1] > 0.99
