"""The paper-scale presets (recipes/paper/, meant for GPUs): each loads, builds and runs end to end when shrunk
on CPU, keeps its CPU recipe's structure, and really is larger than it, so a preset cannot silently be a copy."""

import importlib
import inspect
import json
from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf

from conftest import draw
from metaopt.cli import main
from metaopt.config import RECIPE_DIR, find_recipe
from metaopt.paths import recipes
from metaopt.pipelines import build, load
from test_recipes_smoke import shrunk

PAPER_DIR = RECIPE_DIR / "paper"
# preset (named as its CPU recipe) -> the sizes that must exceed the CPU recipe's
LARGER = {
    "lsa_multilayer": ["train.steps", "train.batch_size", "compare.num_tasks", "learners.gd_3_steps.num_tasks",
                       "learners.gdpp_3_steps.num_tasks"],
    "noisy_linear_transformers": ["train.steps", "train.batch_size", "compare.num_tasks",
                                  "learners.const_rr.num_tasks", "learners.tuned_rr.num_tasks"],
    "boolean_architectures": ["train.steps", "task.n_bits", "train.support", "learners.transformer.n_embd",
                              "learners.transformer.n_layer", "learners.lstm.hidden", "learners.hyena.width"],
    "boolean_architectures_dnf": ["train.steps", "task.n_bits", "train.support", "learners.transformer.n_embd",
                                  "learners.transformer.n_layer", "learners.lstm.hidden", "learners.hyena.width"],
    "garg_function_classes": ["train.steps", "task.dim", "task.nonzeros", "train.support", "compare.num_tasks",
                              "learners.transformer.n_embd", "learners.transformer.n_layer"],
    "garg_function_classes_trees": ["train.steps", "task.dim", "train.support", "compare.num_tasks",
                                    "learners.transformer.n_embd", "learners.transformer.n_layer"],
    "icl_vs_finetuning": ["train.steps", "task.dim", "train.support", "compare.num_tasks",
                          "learners.transformer.n_embd", "learners.transformer.n_layer",
                          "learners.transformer_momentum.n_embd", "learners.transformer_momentum.n_layer"],
    "hypertransformer": ["train.steps", "task.ways", "compare.num_tasks", "learners.ht_all_layers.widths",
                         "learners.ht_all_layers.label_dim", "learners.ht_all_layers.embedder_channels",
                         "learners.protonet.train.steps"],
    "hypertransformer_semisupervised": ["train.steps", "task.ways", "compare.num_tasks",
                                        "learners.ht_2_layers_unlabeled.label_dim",
                                        "learners.ht_2_layers_unlabeled.embedder_channels"],
    "continual_hypertransformer": ["train.steps", "task.ways", "compare.num_tasks",
                                   "learners.cht_class_incremental.label_dim",
                                   "learners.cht_class_incremental.embedder_channels"],
}
PRESETS = sorted(LARGER)
# What the shrunk runs change beyond tests/test_recipes_smoke.shrunk: the GPU-sized models at the CPU recipes'
# sizes (the structure test builds them at full size), short tuning grids, a short dual form, small sequences.
BOOLEAN_MODELS = ["learners.transformer.n_embd=32", "learners.transformer.n_layer=2", "learners.lstm.hidden=32",
                  "learners.hyena.width=32", "learners.hyena.layers=2"]
GARG_MODEL = ["learners.transformer.n_embd=32", "learners.transformer.n_layer=2", "learners.transformer.n_head=2"]
EXTRA = {
    "lsa_multilayer": [f"learners.{n}.lrs=[0.5,1.5]" for n in ("gd_2_steps", "gd_3_steps", "gdpp_2_steps",
                                                              "gdpp_3_steps")]
    + ["learners.gdpp_2_steps.gammas=[0.0,0.1]", "learners.gdpp_3_steps.gammas=[0.0,0.1]"],
    "boolean_architectures": BOOLEAN_MODELS,
    "boolean_architectures_dnf": BOOLEAN_MODELS,
    "garg_function_classes": GARG_MODEL,
    "garg_function_classes_trees": GARG_MODEL,
    "icl_vs_finetuning": [f"learners.{n}.{k}={v}" for n in ("transformer", "transformer_momentum")
                          for k, v in (("n_embd", 32), ("n_layer", 2))]
    + ["compare.analysis=[{name: dual_form, num_tasks: 2, shared: 1, lr: 0.1, demonstrations: 4}]"],
    "hypertransformer": ["train.batch_size=2", "task.queries=1", "train.query=20", "compare.query=20",
                         "learners.maml.train.batch_size=2",
                         "evaluate=[{_target_: hypernets.specificity.weight_specificity, episodes: 4}]"],
    "hypertransformer_semisupervised": ["train.batch_size=2", "task.queries=1", "train.query=20", "compare.query=20"],
    "continual_hypertransformer": [
        "train.batch_size=2", "task.queries=1", "train.query=25", "compare.query=25",
        "evaluate=[{_target_: hypernets.continual.evaluate_sequences, lengths: [5], sequences: 2}]"],
}


@pytest.fixture
def omniglot(tmp_path, monkeypatch):
    """A folder in Omniglot's layout big enough for 25-way episodes in every split (4 rotations per character)."""
    index = 0
    for part, alphabets in (("images_background", 9), ("images_evaluation", 4)):  # 5 background ones: val
        for a in range(alphabets):
            for c in range(2):
                folder = tmp_path / "omniglot" / part / f"Alphabet_{a}" / f"character{c + 1:02d}"
                folder.mkdir(parents=True)
                for drawing in range(6):  # 1 shot + 3 queries + 2 unlabelled
                    draw(folder / f"{index:04d}_{drawing:02d}.png", 35, "1", index)
                index += 1
    monkeypatch.setenv("OMNIGLOT_ROOT", str(tmp_path / "omniglot"))
    return tmp_path / "omniglot"


def size(config: DictConfig, key: str) -> Any:
    """A recipe's value at ``key``; a learner argument the recipe leaves out is its constructor's default."""
    value = OmegaConf.select(config, key)
    if value is None and key.startswith("learners."):
        _, learner, argument = key.split(".")
        module, _, name = config.learners[learner]._target_.rpartition(".")
        value = inspect.signature(getattr(importlib.import_module(module), name)).parameters[argument].default
    return value


def test_every_preset_is_tested_and_listed():
    assert sorted(p.stem for p in PAPER_DIR.glob("*.yaml")) == PRESETS
    listed = recipes()
    for name in PRESETS:
        assert find_recipe(f"paper/{name}").resolve() == (PAPER_DIR / f"{name}.yaml").resolve()
        assert f"paper/{name}" in listed and listed[f"paper/{name}"]
        assert name in listed, "the CPU recipe is still listed under its own name"
    assert "quickstart" in listed
    assert {n for n in listed if n.startswith("paper/")} == {f"paper/{n}" for n in PRESETS}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_keeps_its_recipe_structure_and_says_what_it_follows(name, omniglot):
    preset, recipe = load(f"paper/{name}"), load(name)
    header = (PAPER_DIR / f"{name}.yaml").read_text()
    assert header.startswith("# Paper-scale preset of recipes/") and "Expected cost" in header
    assert preset.device == "auto" and preset.name != recipe.name and preset.description
    assert list(preset.learners) == list(recipe.learners)
    for key in ("_target_", "parameterization", "attention", "use_unlabeled", "scenario", "feedback", "target"):
        for learner, spec in recipe.learners.items():
            assert preset.learners[learner].get(key) == spec.get(key), f"learners.{learner}.{key} changed"
    assert [c.learner for c in preset.claims] == [c.learner for c in recipe.claims]
    assert [(c.below is None, c.above is None) for c in preset.claims] == \
        [(c.below is None, c.above is None) for c in recipe.claims]
    names = [a if isinstance(a, str) else a.name for a in preset.compare.analysis]
    assert names == [a if isinstance(a, str) else a.name for a in recipe.compare.analysis]
    assert [e._target_ for e in preset.get("evaluate", [])] == [e._target_ for e in recipe.get("evaluate", [])]
    experiment = build(load(f"paper/{name}", ["device=cpu"]))
    assert set(experiment.learners) == set(recipe.learners)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_is_larger_than_its_cpu_recipe(name, omniglot):
    preset, recipe = load(f"paper/{name}"), load(name)
    assert preset.train.steps * preset.train.batch_size > recipe.train.steps * recipe.train.batch_size
    for key in LARGER[name]:
        assert size(preset, key) > size(recipe, key), f"{key}: {size(preset, key)} vs {size(recipe, key)}"


@pytest.mark.parametrize("name", PRESETS)
def test_preset_runs_shrunk_on_cpu(name, omniglot, tmp_path):
    recipe = f"paper/{name}"
    overrides = [f"output_dir={tmp_path / 'runs'}", "device=cpu", *shrunk(recipe), *EXTRA.get(name, [])]
    assert main(["run", recipe, *overrides]) == 0
    config = load(recipe)
    (run_dir,) = (tmp_path / "runs" / config.name).iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["curves"]) == set(config.learners)
    assert len(results["claims"]) == len(config.claims)
    for analysis in config.compare.analysis:
        assert (analysis if isinstance(analysis, str) else analysis.name) in results["analysis"]
