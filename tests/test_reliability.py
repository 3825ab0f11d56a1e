"""Faults a user meets: bad settings refused before any work (exit 2, the key named), nothing left behind.

docs/reliability.md lists every fault tried and its outcome; this file holds the recipe-level ones.
"""

from pathlib import Path

import pytest
import torch
import yaml

from metaopt.cli import main
from metaopt.testing import TINY

RIDGE = "learners.ridge={_target_: metaopt.learners.Ridge, lam: %s}"
DIMS = "train.curriculum.dims={start: 1, end: %d, increment: 1, every: 2}"

BAD_SETTINGS = [  # (override, what the message must say)
    ("compare.num_tasks=0", "compare.num_tasks must be an int >= 1; got 0"),
    ("compare.num_tasks=-1", "compare.num_tasks must be an int >= 1; got -1"),
    ("compare.query=0", "compare.query must be an int >= 1; got 0"),
    ("compare.support_sizes=[]", "support_sizes must be a non-empty list"),
    ("compare.support_sizes=[-1,2]", "compare.support_sizes[0] must be an int >= 0; got -1"),
    ("compare.support_sizes=[0,2,50]", "learners.transformer cannot take the episodes that compare.support_sizes"),
    ("train.support=50", "learners.transformer cannot take the episodes that train.support asks for"),
    ("compare.chunk_size=0", "compare.chunk_size must be an int >= 1; got 0"),
    ("compare.bootstrap=0", "compare.bootstrap must be an int >= 1; got 0"),
    ("learners.transformer.x_dim=3", "Transformer was built for x_dim=3"),
    ("train.grad_clip=-1", "train.grad_clip must be None or a finite number > 0"),
    ("train.grad_clip=nan", "train.grad_clip must be None or a finite number > 0"),
    (RIDGE % "nan", "lam must be a finite number > 0"),
    (RIDGE % "inf", "lam must be a finite number > 0"),
    ("task.noise_std=inf", "noise_std must be a finite number >= 0"),
    ("task.noise_std=nan", "noise_std must be a finite number >= 0"),
    ("train.warmup_steps=-5", "train.warmup_steps must be an int >= 0; got -5"),
    (DIMS % 9, "active dims must be an int in [1, 2]; got 9"),
    ("threads=-1", "threads must be None or an int >= 1; got -1"),
    ("device=banana", "device must be auto, cpu, cuda or cuda:N"),
    ("learners.gd.lr=nan", "GradientDescent: lr must be a finite number > 0"),
    ("learners.gd.learn_lr=maybe", "learn_lr"),
    ("learners.gd._target_=metaopt.tasks.LinearRegression", "is a LinearRegression, not a metaopt.learners.base.Learner"),
    ("learners.gd._target_=math.pi", "learners.gd._target_='math.pi' is a float; it must name a class or a function"),
    ("learners.gd._target_=metaopt.learners", "is a module; it must name a class or a function"),
    ("task._target_=metaopt.learners.Ridge", "is a Ridge, not a metaopt.tasks.base.TaskFamily"),
    ("train.lr=-1", "train.lr must be a finite number > 0"),
    ("seed=-3", "seed must be an int >= 0; got -3"),
]


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.mark.parametrize("override, message", BAD_SETTINGS, ids=[o for o, _ in BAD_SETTINGS])
def test_bad_setting_is_refused_before_any_work(recipe, tmp_path, capsys, override, message):
    out = tmp_path / "runs"
    assert main(["run", str(recipe), f"output_dir={out}", override]) == 2
    error = capsys.readouterr().err
    assert error.startswith("metaopt: error:") and message in error, error
    assert "Traceback" not in error
    assert not out.exists(), "a run folder was made before the setting was refused"


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a cuda:7")
def test_absent_cuda_device_is_refused(recipe, tmp_path, capsys):
    assert main(["run", str(recipe), f"output_dir={tmp_path / 'runs'}", "device=cuda:7"]) == 2
    assert "cuda:7" in capsys.readouterr().err


def test_output_dir_that_cannot_be_made_is_refused_before_work(recipe, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["run", str(recipe), f"output_dir={blocker / 'runs'}"]) == 2
    assert f"{blocker} is a file, not a folder" in capsys.readouterr().err
    assert blocker.read_text() == "not a folder"


def test_unwritable_output_dir_is_refused_before_work(recipe, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.mkdtemp", refuse)  # root may write anywhere: the refusal is simulated
    assert main(["run", str(recipe), f"output_dir={tmp_path / 'runs'}"]) == 2
    assert "cannot be created or written" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_corrupt_image_in_the_evaluation_split_is_refused_before_work(omniglot_root, tmp_path, capsys):
    (drawing,) = sorted((omniglot_root / "images_evaluation").rglob("*.png"))[:1]
    drawing.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "runs"
    overrides = [f"task.source.root={omniglot_root}", "task.source.val_alphabets=1", "task.queries=2",
                 "train.query=10", "compare.query=10", f"output_dir={out}", "wandb.mode=disabled"]
    assert main(["run", "omniglot", *overrides]) == 2
    error = capsys.readouterr().err
    assert f"could not decode image {drawing}" in error and not out.exists()



# ---------------------------------------------------------------------- files: planted checkpoints, a full disk
class _Planted:
    """Unpickling this runs ``Path.touch`` on a marker: what a malicious checkpoint would do with os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _trained_run(recipe: Path, tmp_path: Path) -> Path:
    out = tmp_path / "runs"
    assert main(["run", str(recipe), f"output_dir={out}", "wandb.mode=disabled"]) == 0
    (run_dir,) = (out / "tiny").iterdir()
    return run_dir


@pytest.mark.parametrize("command", ["resume", "compare"])
def test_planted_checkpoint_is_refused_and_runs_no_code(recipe, tmp_path, capsys, command):
    run_dir = _trained_run(recipe, tmp_path)
    marker = tmp_path / "code_ran"
    for checkpoint in (run_dir / "checkpoints" / "transformer").glob("step_*.pt"):
        state = torch.load(checkpoint, weights_only=True)
        state["learner"]["planted"] = _Planted(marker)
        torch.save(state, checkpoint)
    capsys.readouterr()
    assert main([command, str(run_dir)]) == 2
    error = capsys.readouterr().err
    assert "is not a plain-data checkpoint and was not opened" in error and "Traceback" not in error
    assert not marker.exists(), "loading the checkpoint ran code"
    assert not list(run_dir.rglob("*.corrupt")), "a planted file is refused, not set aside as damage"


def test_full_disk_at_a_checkpoint_stops_with_the_path_and_keeps_the_previous_one(recipe, tmp_path, capsys,
                                                                                monkeypatch):
    real_save = torch.save

    def save(state, file, *args, **kwargs):
        if "step_00000006" in str(getattr(file, "name", file)):
            raise OSError(28, "No space left on device")
        return real_save(state, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "runs"
    assert main(["run", str(recipe), f"output_dir={out}", "wandb.mode=disabled"]) == 1
    error = capsys.readouterr().err
    (run_dir,) = (out / "tiny").iterdir()
    folder = run_dir / "checkpoints" / "transformer"
    assert f"could not write {folder / 'step_00000006.pt'}: No space left on device" in error
    assert "MiB free" in error and "metaopt resume" in error
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000003.pt"], "no temporary or partial file is left"
    monkeypatch.setattr(torch, "save", real_save)  # space freed: the run continues from step 3
    assert main(["resume", str(run_dir)]) == 0
    assert (folder / "step_00000006.pt").exists() and (run_dir / "results.json").exists()


def test_full_disk_while_writing_a_result_keeps_the_old_file(tmp_path, monkeypatch):
    from metaopt.checkpoints import WriteError
    from metaopt.log import Run

    run = Run("tiny", {}, root=tmp_path, wandb_mode="disabled")
    run.save_json({"a": 1}, "results")

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(WriteError, match=r"could not write .*results.json: No space left on device \(.* free"):
        run.save_json({"a": 2}, "results")
    monkeypatch.undo()
    assert (run.path / "results.json").read_text().replace(" ", "").replace("\n", "") == '{"a":1}'
    assert [p.name for p in run.path.iterdir() if p.suffix == ".tmp"] == []


# ---------------------------------------------------------------------- secrets
def test_environment_values_are_never_written_to_the_run_folder_or_wandb(tmp_path, monkeypatch, capsys):
    secret = "tok-5f1e0c9a-not-for-disk"
    monkeypatch.setenv("METAOPT_TEST_TOKEN", secret)
    recipe = tmp_path / "secret.yaml"
    learners = {**TINY["learners"], "gd": {**TINY["learners"]["gd"], "lr": "${oc.decode:${oc.env:METAOPT_TEST_LR}}"}}
    monkeypatch.setenv("METAOPT_TEST_LR", "0.25")
    recipe.write_text(yaml.safe_dump({**TINY, "description": "${oc.env:METAOPT_TEST_TOKEN}", "learners": learners,
                                      "wandb": {"tags": ["kept"]}}))
    out = tmp_path / "runs"
    assert main(["run", str(recipe), f"output_dir={out}", "wandb.mode=offline"]) == 0
    (run_dir,) = (out / "tiny").iterdir()
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files), "the offline W&B run is in the run folder"
    leaked = [p for p in files if secret.encode() in p.read_bytes()]
    assert not leaked, f"the environment value was written to {leaked}"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["description"] == "${oc.env:METAOPT_TEST_TOKEN}" and saved["wandb"]["tags"] == ["kept"]
    assert saved["learners"]["gd"]["lr"] == "${oc.decode:${oc.env:METAOPT_TEST_LR}}"
    assert saved["train"]["steps"] == 6  # everything else is resolved as before
    assert main(["compare", str(run_dir), "wandb.mode=disabled"]) == 0  # the run reads its environment again


def test_a_run_folder_runs_only_the_import_paths_it_recorded(recipe, tmp_path, capsys):
    run_dir = _trained_run(recipe, tmp_path)
    capsys.readouterr()
    evil = "learners.extra={_target_: metaopt.learners.Ridge, lam: 1.0}"
    assert main(["compare", str(run_dir), evil]) == 2
    assert "may not add _target_ import paths the run did not record (metaopt.learners.Ridge)" in capsys.readouterr().err
    assert main(["compare", str(run_dir), "compare.num_tasks=16"]) == 0  # the recorded ones are fine


# ---------------------------------------------------------------------- resume: no duplicated metric rows
def _rows(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_a_crash_between_checkpoints_logs_every_row_once(recipe, tmp_path, monkeypatch):
    from metaopt.train import MetaTrainer

    reference = _rows(_trained_run(recipe, tmp_path / "uninterrupted"))
    real_step = MetaTrainer._train_step

    def crash_in_step_5(self, *args, **kwargs):
        if self.step == 4:  # after the checkpoint at step 3 and the rows of step 4
            raise RuntimeError("simulated crash")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(MetaTrainer, "_train_step", crash_in_step_5)
    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["run", str(recipe), f"output_dir={out}", "wandb.mode=disabled"])
    (run_dir,) = (out / "tiny").iterdir()
    assert any(row.get("transformer/step") == 4 for row in _rows(run_dir))
    monkeypatch.undo()
    assert main(["resume", str(run_dir)]) == 0
    assert _rows(run_dir) == reference


def test_resume_after_a_crash_during_the_comparison_logs_its_rows_once(recipe, tmp_path, monkeypatch):
    reference = _rows(_trained_run(recipe, tmp_path / "uninterrupted"))

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash after the comparison rows")

    monkeypatch.setattr("metaopt.pipelines.episodes._evaluate", crash)
    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["run", str(recipe), f"output_dir={out}", "wandb.mode=disabled"])
    (run_dir,) = (out / "tiny").iterdir()
    monkeypatch.undo()
    assert main(["resume", str(run_dir)]) == 0
    assert _rows(run_dir) == reference


def test_kill_9_between_checkpoints_then_resume_equals_an_uninterrupted_run(tmp_path):
    """SIGKILL (no handler runs) once the first checkpoint is on disk: resume ends where an uninterrupted run does."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    recipe = tmp_path / "long.yaml"
    train = {**TINY["train"], "steps": 400, "checkpoint_every": 40, "val_every": 100, "log_every": 20}
    recipe.write_text(yaml.safe_dump({**TINY, "threads": 1, "train": train}))  # one thread: the same sums in both
    whole = _trained_run(recipe, tmp_path / "whole")
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "metaopt", "run", str(recipe), f"output_dir={out}",
                                "wandb.mode=disabled"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob("tiny/*/checkpoints/transformer/step_*.pt")) and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    (run_dir,) = (out / "tiny").iterdir()
    assert not (run_dir / "results.json").exists(), "the run finished before it was killed; lengthen it"
    assert main(["resume", str(run_dir)]) == 0
    final = "checkpoints/transformer/step_00000400.pt"
    a, b = (torch.load(d / final, weights_only=True) for d in (whole, run_dir))
    assert all(torch.equal(a["learner"][k], b["learner"][k]) for k in a["learner"])
    assert all(torch.equal(x, y) for x, y in zip(a["streams"], b["streams"]))
    assert json.loads((run_dir / "results.json").read_text()) == json.loads((whole / "results.json").read_text())
    assert _rows(run_dir) == _rows(whole)
