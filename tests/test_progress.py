"""Progress and messages: bars on a terminal, log lines elsewhere, metaopt.log_to_console, metaopt.run's default."""

import logging
import subprocess
import sys

import pytest
import yaml

import metaopt
from metaopt.pipelines import run
from metaopt.progress import PACKAGES, Progress, console_by_default, format_duration, log_to_console
from metaopt.testing import OPTIMIZER_TINY, TINY, shrunk


def test_durations_read_as_a_person_reads_them():
    assert [format_duration(s) for s in (0.4, 45, 185, 7620)] == ["0s", "45s", "3m05s", "2h07m"]


def test_without_a_terminal_progress_is_logged_and_disabled_progress_is_silent(caplog):
    with caplog.at_level(logging.INFO, logger="metaopt.progress"):
        with Progress(3, "quiet", enabled=False, unit="step") as bar:
            bar.update(3)
        assert not bar.logs and not caplog.records
        with Progress(3, "train x", unit="step", every=0) as bar:  # pytest captures the output: no terminal
            bar.update(1, loss="0.5")
            bar.update(2)
    assert bar.logs and bar.done == 3
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0].startswith("train x: 1/3 steps (33%), 0s") and lines[0].endswith(", loss 0.5")
    assert lines[-1].startswith("train x: 3 steps in ")


@pytest.fixture
def console():
    """log_to_console's handler removed and the levels restored afterwards."""
    levels = {name: logging.getLogger(name).level for name in PACKAGES}
    yield
    for name, level in levels.items():
        package = logging.getLogger(name)
        for handler in [h for h in package.handlers if getattr(h, "metaopt_console", False)]:
            package.removeHandler(handler)
        package.setLevel(level)


def test_log_to_console_is_one_handler_whatever_the_calls(console, capsys):
    handler = metaopt.log_to_console()
    assert metaopt.log_to_console("DEBUG") is handler and handler.level == logging.DEBUG
    assert all(logging.getLogger(name).handlers.count(handler) == 1 for name in PACKAGES)
    logging.getLogger("metaopt.train").debug("a debug line")
    logging.getLogger("optimizers.learned").info("an optimizer line")
    err = capsys.readouterr().err
    assert "DEBUG metaopt.train: a debug line" in err and "INFO optimizers.learned: an optimizer line" in err
    with pytest.raises(ValueError, match="level must be a logging level"):
        log_to_console("LOUD")


def test_a_configured_logging_is_left_alone(console):
    before = list(logging.getLogger("metaopt").handlers)
    with console_by_default():  # pytest's handlers are on the root logger
        assert logging.getLogger("metaopt").handlers == before


def test_metaopt_run_from_python_shows_progress_where_logging_is_not_configured(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "progress": True, "wandb": {"mode": "disabled"}}))
    code = (f"import metaopt\nresult = metaopt.run({str(recipe)!r}, ['output_dir={tmp_path / 'runs'}'])\n"
            "import logging\nprint(result.path, logging.getLogger('metaopt').handlers)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    path, handlers = result.stdout.split(maxsplit=1)
    assert f"INFO metaopt: run folder: {path}" in result.stderr
    assert "transformer trains 6 steps, lr 0.001, batch 8" in result.stderr
    assert "transformer step 3/6 loss" in result.stderr and "compare: 3 chunks in" in result.stderr
    assert handlers.strip() == "[]"  # the handler was the call's only


def test_the_optimizer_pipeline_shows_each_stage_and_its_run_folder(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="metaopt"):
        result = run("specialized_optimizer", [*OPTIMIZER_TINY, "progress=true", f"output_dir={tmp_path}"])
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0] == f"run folder: {result.path}"
    for stage in ("tune baselines: 7 runs in", "meta-train layerwise_mixture: 2 meta-steps in", "evaluate: "):
        assert any(message.startswith(stage) for message in messages), stage
    assert result.report.endswith(f"run:     {result.path}")


@pytest.mark.parametrize("recipe, stages", [
    ("training_trajectories", ("SGD run: 40 steps in", "matched-schedule branches: 80 steps in")),
    ("knowledge_priming", ("pretrain the language model: 20 steps in", "learn each fact: 9 facts in")),
    ("decentralized_distillation", ("train populations: 10 populations in",)),
])
def test_the_study_pipelines_show_each_stage_and_their_run_folder(recipe, stages, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="metaopt"):
        result = run(recipe, [*shrunk(recipe), "progress=true", f"output_dir={tmp_path}"])
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0] == f"run folder: {result.path}"
    for stage in stages:
        assert any(message.startswith(stage) for message in messages), stage
    assert result.report.endswith(f"run:     {result.path}")


def test_a_study_pipeline_without_progress_shows_none(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="metaopt"):
        run("knowledge_priming", [*shrunk("knowledge_priming"), f"output_dir={tmp_path}"])  # progress=false
    assert not [record for record in caplog.records if record.name == "metaopt.progress"]
