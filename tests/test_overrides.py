"""The rule for `train.*` overrides, each learner's resolved settings at the start, the curriculum warning."""

import logging

import pytest
import yaml
from omegaconf import OmegaConf

from metaopt.pipelines import load, run
from metaopt.pipelines.episodes import implied_overrides, train_settings
from metaopt.testing import TINY
from metaopt.train import Stage, TrainSettings

OWN_BLOCKS = {"ht_all_layers": 1200, "ht_logits_only": 1200, "protonet": 800, "maml": 300}  # hypertransformer.yaml


def steps(config) -> dict[str, int]:
    return {name: train_settings(config, name).steps for name in OWN_BLOCKS}


def test_a_learners_own_train_block_stands_without_overrides():
    assert steps(load("hypertransformer")) == OWN_BLOCKS
    assert train_settings(load("hypertransformer"), "maml").batch_size == 8


@pytest.mark.parametrize("override", ["train.steps=30", "train={steps: 30}"])
def test_a_top_level_train_override_reaches_learners_with_their_own_block(override):
    config = load("hypertransformer", [override])
    assert steps(config) == dict.fromkeys(OWN_BLOCKS, 30)
    assert train_settings(config, "maml").batch_size == 8  # keys the override does not name stay the learner's
    assert OmegaConf.to_container(config.learners.maml.train) == {"steps": 30, "batch_size": 8}  # as config.yaml


@pytest.mark.parametrize("order", [1, -1])
def test_an_override_naming_the_learner_wins_in_any_order(order):
    overrides = ["train.steps=30", "learners.maml.train.steps=7", "train.batch_size=4"][::order]
    config = load("hypertransformer", overrides)
    assert steps(config) == {**dict.fromkeys(OWN_BLOCKS, 30), "maml": 7}
    assert {name: train_settings(config, name).batch_size for name in OWN_BLOCKS} == dict.fromkeys(OWN_BLOCKS, 4)
    whole = load("hypertransformer", ["learners.maml.train={steps: 9}", "train.steps=30"])
    assert steps(whole)["maml"] == 9 and steps(whole)["protonet"] == 30


def test_only_train_overrides_imply_others():
    config = load("hypertransformer")
    assert implied_overrides(config, ["compare.num_tasks=10", "learners.maml.steps=3"]) == []
    assert implied_overrides(load("quickstart"), ["train.steps=5"]) == []  # no learner has its own block
    assert implied_overrides(config, ["train.lr=0.01"]) == [f"learners.{name}.train.lr=0.01" for name in
                                                            ("protonet", "maml")]


def test_the_curriculum_says_when_the_steps_are_too_few():
    quickstart = train_settings(load("quickstart", ["train.steps=150"]), "transformer")
    (problem,) = quickstart.unfinished_curriculum()
    assert "curriculum.dims to reach 5" in problem and "at 1 when training ends" in problem
    assert "train.steps >= 721" in problem and "train.curriculum.dims.every <= 37" in problem
    assert train_settings(load("quickstart", ["train.steps=721"]), "transformer").unfinished_curriculum() == []
    assert train_settings(load("quickstart"), "transformer").unfinished_curriculum() == []
    support = TrainSettings(steps=3, support=8, curriculum={"support": {"start": 2, "end": 8, "increment": 2,
                                                                        "every": 5}})
    assert Stage(2, 8, 2, 5).full_at == 15 and "train.steps >= 16" in support.unfinished_curriculum()[0]
    assert "every" not in support.unfinished_curriculum()[0].split("set ")[1]  # no every >= 1 is short enough


@pytest.fixture
def two_learners(tmp_path):
    """TINY with a second trainable learner and a train: block of the transformer's own."""
    recipe = {**TINY, "wandb": {"mode": "disabled"}, "progress": True, "learners": {
        **TINY["learners"], "transformer": {**TINY["learners"]["transformer"], "train": {"steps": 9, "lr": 3e-3}},
        "lsa": {"_target_": "metaopt.learners.LinearSelfAttention", "x_dim": 2}}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_the_run_logs_each_learners_resolved_settings_and_warns_of_a_short_curriculum(two_learners, tmp_path,
                                                                                     caplog):
    curriculum = "train.curriculum={dims: {start: 1, end: 2, every: 3}}"
    claims = "claims=[{text: the transformer learns, learner: transformer, k: 2, below: 0.5}]"
    with caplog.at_level(logging.INFO, logger="metaopt"):
        result = run(str(two_learners), [f"output_dir={tmp_path / 'runs'}", "train.steps=3", curriculum, claims])
    messages = [record.getMessage() for record in caplog.records]
    assert "transformer trains 3 steps, lr 0.003, batch 8 (train + learners.transformer.train)" in messages
    assert "lsa trains 3 steps, lr 0.001, batch 8 (train)" in messages
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith("transformer: 3 steps are too few for curriculum.dims") and
               "its claims will likely fail (the transformer learns)" in w for w in warnings)
    first, second = [name for name in load(str(two_learners)).learners if name in ("lsa", "transformer")]
    assert f"learner 1 of 2: {first} (3 steps)" in messages
    assert any(m.startswith(f"learner 2 of 2: {second} (3 steps); about ") for m in messages)  # with the time left
    assert "steps: 3" in (result.path / "config.yaml").read_text()  # the run folder records what ran
