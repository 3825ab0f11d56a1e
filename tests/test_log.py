import json
import logging

import wandb

from metaopt.log import Run


def test_run_writes_local_files(tmp_path):
    run = Run("demo", {"a": 1}, root=tmp_path, wandb_mode="disabled")
    run.log({"loss": 0.5}, step=1)
    run.log({"loss": float("nan")}, step=2)
    run.summary({"final": 0.25})
    run.write_config("a: 1\n")
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": "nan"}]
    assert json.loads((run.path / "summary.json").read_text()) == {"final": 0.25}
    assert run.path.parent.name == "demo" and (run.path / "config.yaml").exists()


def test_wandb_failing_to_start_is_reported_once_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    def broken_init(*args, **kwargs):
        raise RuntimeError("no W&B today")

    monkeypatch.setattr(wandb, "init", broken_init)
    with caplog.at_level(logging.WARNING):
        run = Run("demo", {}, root=tmp_path, wandb_mode="online")
        run.log({"loss": 1.0}, step=0)
        run.summary({"x": 1})
        run.finish()
    assert not run.wandb_active
    assert sum("no W&B today" in r.message for r in caplog.records) == 1
    assert (run.path / "metrics.jsonl").exists()


def test_wandb_failing_mid_run_disables_mirroring_only(tmp_path, monkeypatch, caplog):
    class FlakyRun:
        summary = {}

        def log(self, *args, **kwargs):
            raise ConnectionError("network down")

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda *a, **k: FlakyRun())
    with caplog.at_level(logging.WARNING):
        run = Run("demo", {}, root=tmp_path, wandb_mode="online")
        for step in range(3):
            run.log({"loss": 1.0}, step=step)
    assert sum("network down" in r.message for r in caplog.records) == 1
    assert len((run.path / "metrics.jsonl").read_text().splitlines()) == 3


def test_run_folders_are_made_exclusively(tmp_path, monkeypatch):
    """Two runs whose clocks read the same instant still get two folders."""
    import datetime as real

    from metaopt import log

    instants = iter([real.datetime(2026, 1, 1, 12, 0, 0, 5)] * 2 + [real.datetime(2026, 1, 1, 12, 0, 0, 6)])

    class Clock(real.datetime):
        @classmethod
        def now(cls, tz=None):
            return next(instants)

    monkeypatch.setattr(log._dt, "datetime", Clock)
    first = Run("same", {}, root=tmp_path, wandb_mode="disabled")
    second = Run("same", {}, root=tmp_path, wandb_mode="disabled")
    assert first.path != second.path and first.path.name == "20260101-120000-000005"
