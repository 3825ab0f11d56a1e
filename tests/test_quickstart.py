"""The README's main job end to end (slow: about 3 minutes on one core; `make test-all` runs it)."""

import json

import pytest

from metaopt.cli import main


@pytest.mark.slow
def test_quickstart_transformer_learns_regression_in_context(tmp_path):
    assert main(["run", "quickstart", f"output_dir={tmp_path}", "wandb.mode=disabled", "progress=false"]) == 0
    (run_dir,) = (tmp_path / "quickstart").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    ks = results["support_sizes"]
    transformer = results["curves"]["transformer"]["mean"]
    least_squares = results["curves"]["least_squares"]["mean"]
    assert transformer[ks.index(10)] < 0.2
    assert all(claim["holds"] for claim in results["claims"])
    # decreasing in k like least squares: clearly better with 5 examples than with 1, and with 10 than with 5
    assert transformer[ks.index(10)] < transformer[ks.index(5)] < transformer[ks.index(1)]
    assert least_squares[ks.index(10)] < least_squares[ks.index(1)]
