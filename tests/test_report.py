"""`metaopt report`: runs, re-comparisons and sweeps side by side, from local folders."""

import csv
import shutil

import pytest

import metaopt
from metaopt.cli import main
from metaopt.config import ConfigError
from metaopt.report import differing_keys, make_report
from metaopt.testing import shrunk


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    base = [*shrunk("quickstart"), "compare.support_sizes=[0,5,10]", f"output_dir={root}"]
    return [metaopt.run("quickstart", [*base, f"train.lr={lr}"]).path for lr in ("1e-3", "1e-2")]


def test_report_on_two_runs_writes_table_csv_and_plot(two_runs, tmp_path):
    report = make_report(two_runs, out=tmp_path / "report")
    assert [e.label for e in report.entries] == ["train.lr=0.001", "train.lr=0.01"]
    assert report.files["markdown"].read_text() == report.markdown
    assert "| train.lr=0.001 | ridge | 8 tasks |" in report.markdown and "k=10" in report.markdown
    rows = list(csv.DictReader(report.files["csv"].open()))
    assert len(rows) == 2 * 4 * 3 and set(rows[0]) == {"run", "learner", "metric", "k", "mean", "lower", "upper", "n"}
    ridge = [r for r in rows if r["run"] == "train.lr=0.01" and r["learner"] == "ridge" and r["k"] == "10"]
    assert float(ridge[0]["mean"]) == pytest.approx(report.entries[1].results["curves"]["ridge"]["mean"][2])
    assert report.files["normalized_error"].stat().st_size > 10_000  # a PNG with lines


def test_report_takes_compare_folders_and_folders_of_runs(two_runs, tmp_path, capsys):
    again = two_runs[0] / "compare" / "20260101-000000-000000"  # the layout of a re-comparison
    again.mkdir(parents=True)
    for name in ("config.yaml", "results.json"):
        shutil.copy(two_runs[0] / name, again / name)
    entries = make_report([again, two_runs[1]], out=tmp_path / "a").entries
    assert [e.source for e in entries] == [again, two_runs[1]]
    assert main(["report", str(two_runs[0].parent), "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "train.lr=0.001" in out and "(20260101-000000-000000" not in out.split("runs (named")[0]
    assert (tmp_path / "b" / "report.csv").is_file()
    shutil.rmtree(again.parent)


def test_report_refuses_folders_without_results(tmp_path):
    with pytest.raises(ConfigError, match="holds no results.json"):
        make_report([tmp_path])
    with pytest.raises(ConfigError, match="is not a folder"):
        make_report([tmp_path / "missing"])


def test_differing_keys():
    assert differing_keys([{"a": 1, "b": 2}, {"a": 1, "b": 3}, {"a": 1}]) == ["b"]
    assert differing_keys([{"a": 1}, {"a": 1}]) == []
