"""The experiment pipeline from Python: metaopt.run, the kind mapping, evaluate hooks, python -m metaopt."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

import metaopt
from metaopt.cli import main
from metaopt.compare import Comparison
from metaopt.learners import Learner
from metaopt.config import ConfigError
from metaopt.pipelines import PIPELINES, Pipeline, load, run
from test_cli import TINY

CALLS = []


class Exploding(Learner):
    """A trainable learner whose loss is NaN: training must stop with the divergence message."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, episode):
        return episode.x_query[..., :1] * self.scale * float("nan")


def record_hook(learners, run, *, tag: str = "x"):
    """An evaluate hook that asks for two of the arguments a hook may take."""
    CALLS.append((sorted(learners), run.path, tag))
    return {"tag": tag}


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY | {"wandb": {"mode": "disabled"}}))
    return path


def test_run_from_python_returns_what_results_json_holds(recipe, tmp_path):
    result = metaopt.run(str(recipe), [f"output_dir={tmp_path / 'runs'}", "train.steps=3"])
    assert isinstance(result.comparison, Comparison)
    saved = json.loads((result.path / "results.json").read_text())
    assert saved == json.loads(json.dumps(result.comparison.to_dict()))
    assert result.comparison.value("least_squares", 2) < 1e-4 and result.config.train.steps == 3
    again = run(None, ["compare.num_tasks=16"], run_dir=result.path, train=False)
    assert again.path.parent == result.path / "compare" and again.comparison.num_tasks == 16
    assert json.loads((again.path / "results.json").read_text())["num_tasks"] == 16


def test_a_loaded_config_runs_and_overrides_apply(recipe, tmp_path):
    config = load(str(recipe), [f"output_dir={tmp_path}"])
    result = run(config, ["compare.support_sizes=[0,4]", "claims=[]"])
    assert result.comparison.support_sizes == [0, 4]


def test_evaluate_hooks_get_the_arguments_they_name(recipe, tmp_path):
    CALLS.clear()
    result = run(str(recipe), [f"output_dir={tmp_path}", "evaluate=[{_target_: test_pipeline.record_hook, tag: y}]"])
    assert CALLS == [(["gd", "least_squares", "transformer"], result.path, "y")]
    assert result.results["evaluations"] == {"0:record_hook": {"tag": "y"}}
    with pytest.raises(ConfigError, match=r"evaluate\[0\]: test_pipeline.record_hook does not take \['colour'\]"):
        load(str(recipe), ["evaluate=[{_target_: test_pipeline.record_hook, colour: 1}]"])


def test_pipeline_kinds_are_a_plain_mapping(recipe, tmp_path, monkeypatch):
    seen = {}

    def execute(experiment, opened, *, resume, train, trained):
        seen["experiment"] = experiment
        return {"done": True}, "echoed"

    echo = Pipeline(PIPELINES["episodes"].schema, lambda config, source: None, lambda config: "built", execute)
    monkeypatch.setitem(PIPELINES, "echo", echo)
    recipe.write_text("pipeline: echo\n" + recipe.read_text())
    result = run(str(recipe), [f"output_dir={tmp_path}"])
    assert seen == {"experiment": "built"} and result.results == {"done": True} and result.report == "echoed"
    with pytest.raises(AttributeError, match="has no comparison"):
        result.comparison


def test_resume_needs_a_run_folder_and_bad_input_fails_before_work(recipe, tmp_path):
    with pytest.raises(ConfigError, match="need run_dir"):
        run(str(recipe), resume=True)
    with pytest.raises(ConfigError, match="train.steps must be an int >= 1; got 0"):
        run(str(recipe), [f"output_dir={tmp_path / 'runs'}", "train.steps=0"])
    assert not (tmp_path / "runs").exists()


def test_python_dash_m_metaopt_is_the_cli():
    result = subprocess.run([sys.executable, "-m", "metaopt", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: metaopt" in result.stdout and "resume" in result.stdout
    result = subprocess.run([sys.executable, "-m", "metaopt", "run", "no_such_recipe"], capture_output=True, text=True)
    assert result.returncode == 2 and "not found" in result.stderr


def test_divergence_is_reported_with_its_exit_code(recipe, tmp_path, capsys):
    code = main(["run", str(recipe), f"output_dir={tmp_path}", "learners={boom: {_target_: test_pipeline.Exploding}}",
                 "claims=[]"])
    assert code == 3 and "training diverged" in capsys.readouterr().err


def test_a_pipeline_override_is_the_kind_and_a_bad_one_is_refused(recipe, tmp_path):
    with pytest.raises(ConfigError, match="pipeline='foo' is not allowed"):
        load(str(recipe), ["pipeline=foo"])
    with pytest.raises(ConfigError, match="not in 'OptimizerRecipe'"):  # checked against the optimizer schema
        load(str(recipe), ["pipeline=optimizer"])


def test_hooks_taking_any_option_and_unresolvable_interpolations(recipe, tmp_path):
    config = load(str(recipe), ["evaluate=[{_target_: test_pipeline.any_options_hook, tag: 1, colour: red}]"])
    assert len(config.evaluate) == 1
    with pytest.raises(ConfigError, match="unknown purpose"):
        load(str(recipe), ["learners.least_squares.ridge=${seed:tunning}"])
    with pytest.raises(ConfigError, match="give a recipe or a run_dir"):
        run(str(recipe), run_dir=tmp_path)


def any_options_hook(learners, **options):
    """A hook that takes any option."""
    return options


def test_run_folders_made_before_the_kinds_were_named_still_load():
    from metaopt.pipelines import validate

    assert validate(TINY | {"pipeline": "learners"}).pipeline == "episodes"
