"""The distributed benchmark (its float64 gradient check and quick mode) and the GPU check's CPU dry run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from benchmarks.__main__ import main as benchmarks
from benchmarks.gpu import main as gpu_check
from benchmarks.gpu import run_benchmarks, run_recipes

ROOT = Path(__file__).resolve().parent.parent


def test_quick_distributed_benchmark_checks_gradients_and_writes_its_figures(tmp_path):
    start = time.monotonic()
    assert benchmarks(["distributed", "--quick", "--out", str(tmp_path)]) == 0
    assert time.monotonic() - start < 150  # about 45 s on a quiet 2-core machine
    result = json.loads((tmp_path / "distributed.json").read_text())
    assert result["check"]["gradients_match_1_process_in_float64_to"] == 1e-10
    assert set(result["check"]["max_abs_difference"]) == {"transformer_quickstart", "maml_targetcnn_glyphs"}
    assert result["matmul_gflops_fp32_1_thread"] > 0 and result["machine"]["device"] == "cpu"
    for case in ("transformer_quickstart_batch_256", "maml_targetcnn_glyphs_batch_32"):
        entry = result[case]
        one, two = entry["1_process"], entry["2_processes"]
        assert one["processes"] == 1 and two["processes"] == 2 and one["batch_size"] == two["batch_size"]
        assert one["episodes_per_s"] > 0 and two["episodes_per_s"] > 0
        assert entry["scaling_efficiency"] == pytest.approx(two["episodes_per_s"] / one["episodes_per_s"] / 2)
        assert len(one["peak_memory_mib_per_rank"]) == 1 and len(two["peak_memory_mib_per_rank"]) == 2
        assert two["all_reduce_ms_per_step"] > 0 and two["all_reduce_alone_ms"] > 0
        assert 0 < two["all_reduce_share_of_step"] < 1
        assert "2_processes_shards_2" not in entry  # the full run's configuration only


def test_gpu_check_without_cuda_says_so_and_fails(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert gpu_check([]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err and "--device cpu" in err


def test_gpu_check_dry_run_on_the_cpu_writes_one_json(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    code = gpu_check(["--device", "cpu", "--recipes", "quickstart,maml_sinusoid", "--benchmarks", "none",
                      "--out", str(out)])
    report = json.loads(out.read_text())
    assert code == 0, report
    assert report["machine"]["device"] == "cpu" and set(report["machine"]["matmul_tflops"]) == {"fp32", "bf16"}
    entries = {(entry["recipe"], entry["precision"]): entry for entry in report["recipes"]}
    assert set(entries) == {(r, p) for r in ("quickstart", "maml_sinusoid") for p in ("fp32", "bf16")}
    assert all(entry["status"] == "ok" and entry["seconds"] > 0 for entry in entries.values()), entries
    assert report["two_processes"]["status"] == "ok" and report["two_processes"]["backend"] == "gloo"
    assert report["summary"] == {"ok": 5} and report["seconds"] < report["budget_s"]
    assert "quickstart on 2 processes" in capsys.readouterr().out


def test_gpu_check_records_cpu_only_benchmarks_without_running_them(tmp_path):
    results = run_benchmarks(["maml", "optimizers"], "cuda", quick=True, deadline=time.monotonic() + 60,
                             scratch=tmp_path)
    assert results == {"maml": {"status": "cpu-only"}, "optimizers": {"status": "cpu-only"}}


def hanging_family(dim: int = 5) -> None:
    """A task that never finishes building (the worker imports it from this file)."""
    del dim
    time.sleep(600)


@pytest.mark.slow
def test_a_recipe_past_its_time_limit_is_stopped_and_the_next_one_runs(tmp_path, monkeypatch):
    """About 30 s, mostly two workers' start-up."""
    recipe = tmp_path / "hangs.yaml"
    text = (ROOT / "recipes" / "quickstart.yaml").read_text()
    recipe.write_text(text.replace("_target_: metaopt.tasks.LinearRegression", "_target_: test_bench_distributed."
                                                                               "hanging_family"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))
    start = time.monotonic()
    results = run_recipes([(str(recipe), "fp32"), ("quickstart", "fp32")], "cpu", limit_s=10.0,
                          deadline=time.monotonic() + 120, scratch=tmp_path)
    assert [entry["status"] for entry in results] == ["timeout", "ok"], results
    assert "over its limit of 10 s" in results[0]["error"] and time.monotonic() - start < 90
