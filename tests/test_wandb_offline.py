"""The offline W&B run of a run folder, read back from its files (no network): table, charts, axes, artifacts."""

import json
import shutil

import pytest
import torch
import wandb

import metaopt
from metaopt import wandb_native
from metaopt.cli import main
from metaopt.config import ConfigError
from metaopt.testing import shrunk

OFFLINE = ["compare.support_sizes=[0,5,10]", "wandb.mode=offline"]


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_DATA_DIR", str(root / "wandb-data"))  # W&B's staging area, not the home folder
        return metaopt.run("quickstart", [*shrunk("quickstart"), *OFFLINE, f"output_dir={root}",
                                          "wandb.group=lr-sweep"])


def test_offline_run_holds_table_chart_axes_group_and_artifact(offline_run):
    records = list(wandb_native.offline_records(offline_run.path))
    kinds = {kind for kind, _ in records}
    assert {"run", "metric", "artifact", "history"} <= kinds
    run = next(r for kind, r in records if kind == "run")
    assert (run.run_group, run.job_type) == ("lr-sweep", "train")

    steps = {m.glob_name: m.step_metric for kind, m in records if kind == "metric" and m.glob_name}
    assert steps == {"transformer/*": "transformer/step", "compare/*": "compare/k"}

    tables = list(offline_run.path.glob("wandb/offline-run-*/files/media/table/compare/results_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == list(wandb_native.RESULT_COLUMNS)
    assert len(table["data"]) == 4 * 3  # 4 learners x 3 support sizes
    row = table["data"][0]
    curve = offline_run.comparison.curves[row[0]]
    assert row[1:] == [0, "normalized_error", curve.mean[0], curve.low[0], curve.high[0], 8]
    charts = [json.loads(c.value_json) for kind, r in records if kind == "config" for c in r.update
              if "compare/results_chart" in list(c.nested_key)]
    assert charts and charts[0]["panel_config"]["fieldSettings"] == {"x": "k", "y": "mean", "stroke": "learner"}

    artifacts = {a.type: a for kind, a in records if kind == "artifact"}
    model = artifacts["model"]
    assert model.name == "quickstart-learners"
    assert sorted(e.path for e in model.manifest.contents) == ["checkpoints/transformer/step_00000003.pt",
                                                               "config.yaml"]
    metadata = json.loads(model.metadata)
    assert metadata["recipe"] == "quickstart" and metadata["learners"] == ["transformer"]
    assert metadata["mean"]["ridge"]["10"] == pytest.approx(offline_run.comparison.value("ridge", 10))


def test_compare_starts_from_an_artifact_reference(offline_run, tmp_path, monkeypatch, capsys):
    class Artifact:  # W&B's public API, answering as if the run had been synced
        def download(self, root):
            shutil.copytree(offline_run.path, root, ignore=shutil.ignore_patterns("wandb", "compare"))
            return root

    asked = []
    monkeypatch.setattr(wandb, "Api", lambda: type("Api", (), {"artifact": lambda self, ref: asked.append(ref)
                                                                or Artifact()})())
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "me/metaopt/quickstart-learners:v0", "wandb.mode=disabled"]) == 0
    assert asked == ["me/metaopt/quickstart-learners:v0"]
    assert (tmp_path / "runs" / "artifacts" / "quickstart-learners_v0" / "config.yaml").is_file()
    assert "transformer" in capsys.readouterr().out


def test_learned_optimizer_loads_from_a_run_folder_and_a_missing_artifact_is_explained(tmp_path, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    torch.save({"alpha": torch.ones(2)}, tmp_path / "checkpoints" / "mixture.pt")
    assert torch.equal(wandb_native.learned_optimizer_state(tmp_path, "mixture")["alpha"], torch.ones(2))
    with pytest.raises(ConfigError, match="no learned optimizer 'other'"):
        wandb_native.learned_optimizer_state(tmp_path, "other")

    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "Api", offline)
    assert wandb_native.is_artifact_reference("me/metaopt/run-mixture:latest")
    with pytest.raises(ConfigError, match="could not fetch W&B artifact"):
        wandb_native.learned_optimizer_state("me/metaopt/run-mixture:latest", "mixture")
