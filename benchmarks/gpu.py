"""The GPU check: ``python -m benchmarks gpu`` (``make gpu-check``), one command for a GPU lent briefly.

It writes one JSON (``benchmarks/results/gpu.json``): the GPU, the torch and CUDA versions, the matmul rate in
fp32 and bf16, and an entry for every part below, rewritten after each part so that a check cut short keeps what
it measured. It finishes within ``--budget`` seconds (450: under 8 minutes with start-up), each part within its
share and every process within a hard time limit:

1. **recipes** (at most 240 s): every bundled recipe shrunk (:func:`metaopt.testing.shrunk`) on the device,
   in fp32 for all of them, then in bf16: ok / failed (the error's first line) / timeout / skipped (a recipe
   whose data folder is absent) / unsupported (a recipe that refuses the precision, as the optimizer pipeline
   refuses bf16), seconds, peak CUDA memory. The runs follow one another in a worker process;
   one that passes its time limit (``--recipe-limit``, 60 s) is killed with its worker, and a fresh worker takes
   the next recipe (so it does after a crash, or after an error that leaves the device unusable).
2. **2 processes** (at most 60 s): the shrunk quickstart through ``metaopt run quickstart --nproc 2`` (NCCL) when
   two GPUs are visible; skipped otherwise.
3. **benchmarks** (what is left, at most 150 s): each benchmark that takes a device runs on it in its own process
   (``python -m benchmarks NAME --device cuda``, time-limited); the others are recorded as cpu-only.

Without CUDA it says so in one line and exits with 2, unless ``--device cpu`` asks for a dry run: the same check
on the CPU (gloo for the 2-process run), which the tests use. It exits with 1 when an entry failed or timed out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.timing import matmul_gflops

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
PRECISIONS = ("fp32", "bf16")
BUDGET_S = 450
SHARES_S = {"recipes": 240, "two_processes": 60, "benchmarks": 150}
RECIPE_LIMIT_S = 60
BENCHMARK_LIMIT_S = 120
POLL_S = 0.2
BAD = ("failed", "timeout")


def _first_line(error: BaseException | str) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {line}" if isinstance(error, BaseException) else line


def _environment() -> dict[str, str]:
    """This process's environment with the repository importable (the children run ``-m`` modules from it)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def bundled_recipes() -> list[str]:
    """The bundled recipes by name (the paper-scale presets of ``recipes/paper/`` are left out: GPU-sized, they
    are smoke-tested shrunk on the CPU; name one in ``--recipes`` to include it)."""
    from metaopt.paths import recipes

    return [name for name in recipes() if not name.startswith("paper/")]


# ---------------------------------------------------------------------- the machine
def machine(device: str) -> dict[str, Any]:
    """What the figures were measured on, and its matmul rate in fp32 and bf16 (TFLOP/s)."""
    info: dict[str, Any] = {"device": device, "python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "threads": torch.get_num_threads()}
    size = 512  # CPU bf16 matmuls run at about 1 GFLOP/s
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        info |= {"gpu": properties.name, "gpus": torch.cuda.device_count(),
                 "gpu_memory_gib": properties.total_memory / 2**30,
                 "compute_capability": f"{properties.major}.{properties.minor}",
                 "cudnn": torch.backends.cudnn.version(), "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
        size = 8192
    else:
        info["processor"] = platform.processor() or platform.machine()
    info["matmul_tflops"] = {name: matmul_gflops(size, device=device, dtype=dtype) / 1e3
                             for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    if device == "cuda":
        torch.cuda.empty_cache()  # the recipes' workers get the memory back
    return info


# ---------------------------------------------------------------------- recipes (in a worker process)
def _missing_data(recipe: str) -> str | None:
    """Why a recipe cannot run here (its task reads a data folder that is absent), or None."""
    from omegaconf import OmegaConf

    from metaopt.pipelines import load

    root = OmegaConf.select(load(recipe), "task.source.root")
    if root is not None and not Path(root).exists():
        return f"needs its data folder {root} (task.source.root)"
    return None


def run_recipe(recipe: str, precision: str, device: str, output_dir: Path) -> dict[str, Any]:
    """One shrunk run of ``recipe`` on ``device`` in ``precision``: status, seconds, peak CUDA memory, error."""
    from metaopt.config import ConfigError
    from metaopt.pipelines import load, run
    from metaopt.testing import shrunk

    missing = _missing_data(recipe)
    if missing is not None:
        return {"status": "skipped", "seconds": 0.0, "peak_memory_mib": None, "error": missing}
    common = [*shrunk(recipe), f"device={device}", f"output_dir={output_dir}"]
    overrides = [*common, f"precision={precision}"]
    try:
        load(recipe, overrides)
    except ConfigError as error:
        try:
            load(recipe, common)
            status = "unsupported"  # the recipe loads in fp32 and refuses this precision
        except ConfigError:
            status = "failed"
        return {"status": status, "seconds": 0.0, "peak_memory_mib": None, "error": _first_line(error)}
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    status, error = "ok", None
    try:
        run(recipe, overrides)
        if cuda:
            torch.cuda.synchronize()
    except Exception as failure:  # noqa: BLE001 - every failure is recorded, the check goes on
        status, error = "failed", _first_line(failure)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return {"status": status, "seconds": seconds, "peak_memory_mib": peak, "error": error}


def _device_usable(device: str) -> bool:
    """Whether the device still runs work (an illegal memory access, say, leaves a CUDA context unusable)."""
    if not device.startswith("cuda"):
        return True
    try:
        torch.ones(1, device=device).add_(1)
        torch.cuda.synchronize()
        return True
    except RuntimeError:
        return False


def worker(spec: dict[str, Any]) -> int:
    """Run ``spec["jobs"]`` (recipe, precision) in turn, appending a start and a result line each to
    ``spec["progress"]``; exit code 3 when the device became unusable (the parent starts a fresh worker)."""
    import logging

    import metaopt.pipelines  # noqa: F401 - imported before the first time limit starts
    import metaopt.testing  # noqa: F401

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if spec["device"].startswith("cuda"):
        torch.ones(1, device=spec["device"])  # the CUDA context too, before the first time limit starts
    progress = Path(spec["progress"])
    for index, (recipe, precision) in zip(spec["ids"], spec["jobs"]):
        with progress.open("a") as stream:
            stream.write(json.dumps({"id": index}) + "\n")
        try:
            result = run_recipe(recipe, precision, spec["device"], Path(spec["output_dir"]))
        except Exception as error:  # noqa: BLE001 - e.g. a recipe that does not load: recorded, the next one runs
            result = {"status": "failed", "seconds": 0.0, "peak_memory_mib": None, "error": _first_line(error)}
        with progress.open("a") as stream:
            stream.write(json.dumps({"id": index, "result": result}) + "\n")
        if result["status"] == "failed" and not _device_usable(spec["device"]):
            return 3
    return 0


# ---------------------------------------------------------------------- recipes (in the check's process)
def _events(progress: Path) -> list[dict[str, Any]]:
    lines = progress.read_text().splitlines() if progress.exists() else []
    return [json.loads(line) for line in lines if line.endswith("}")]


def _report(entry: dict[str, Any]) -> None:
    memory = "" if entry.get("peak_memory_mib") is None else f" {entry['peak_memory_mib']:8.1f} MiB"
    error = f"  {entry['error']}" if entry.get("error") else ""
    print(f"{entry['status']:11s} {entry['recipe']:34s} {entry['precision']:5s} {entry['seconds']:6.1f} s"
          f"{memory}{error}", flush=True)


def run_recipes(jobs: list[tuple[str, str]], device: str, *, limit_s: float, deadline: float,
                scratch: Path) -> list[dict[str, Any]]:
    """Every (recipe, precision) of ``jobs`` in worker processes, each run within ``limit_s`` and all by ``deadline``
    (``time.monotonic()``); what is left when the deadline passes is recorded as skipped."""
    results: dict[int, dict[str, Any]] = {}
    remaining = list(range(len(jobs)))
    workers = 0
    while remaining and time.monotonic() < deadline:
        workers += 1
        progress, log = scratch / f"progress_{workers}.jsonl", scratch / f"worker_{workers}.log"
        spec = {"jobs": [jobs[i] for i in remaining], "ids": remaining, "device": device,
                "progress": str(progress), "output_dir": str(scratch / "runs")}
        with log.open("w") as output:
            process = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu", "--worker", json.dumps(spec)],
                                       cwd=ROOT, env=_environment(), stdout=output, stderr=subprocess.STDOUT)
        started: dict[int, float] = {}  # job -> when its start line was seen
        stopped = None  # why the worker was killed, if it was
        while True:
            running = process.poll() is None
            for event in _events(progress):
                if "result" in event and event["id"] not in results:
                    results[event["id"]] = event["result"]
                    _report({"recipe": jobs[event["id"]][0], "precision": jobs[event["id"]][1], **event["result"]})
                started.setdefault(event["id"], time.monotonic())
            current = next((i for i in reversed(list(started)) if i not in results), None)
            now = time.monotonic()
            if not running:
                break
            if current is not None and now - started[current] > limit_s:
                stopped = f"over its limit of {limit_s:.0f} s"
            elif now > deadline:
                stopped = "the recipes' time budget ran out"
            if stopped is not None:
                process.kill()
                process.wait()
                break
            time.sleep(POLL_S)
        if current is not None and current not in results:  # killed in it, or the worker died in it
            tail = log.read_text().strip().splitlines()
            error = stopped or f"worker exit code {process.returncode}: {tail[-1] if tail else ''}"
            results[current] = {"status": "timeout" if stopped else "failed",
                                "seconds": time.monotonic() - started[current], "peak_memory_mib": None,
                                "error": error}
            _report({"recipe": jobs[current][0], "precision": jobs[current][1], **results[current]})
        if not started and stopped is None:  # the worker died before its first recipe: another would too
            tail = log.read_text().strip().splitlines()
            for i in remaining:
                results[i] = {"status": "failed", "seconds": 0.0, "peak_memory_mib": None,
                              "error": f"the worker did not start (exit code {process.returncode}): "
                                       f"{tail[-1] if tail else ''}"}
        remaining = [i for i in remaining if i not in results]
    for i in remaining:
        results[i] = {"status": "skipped", "seconds": 0.0, "peak_memory_mib": None,
                      "error": "the recipes' time budget ran out"}
    return [{"recipe": recipe, "precision": precision, **results[i]} for i, (recipe, precision) in enumerate(jobs)]


# ---------------------------------------------------------------------- the other parts
def _subprocess(command: list[str], timeout: float) -> tuple[str, float, str | None]:
    """Run ``command`` from the repository within ``timeout`` seconds: status, seconds, error's first line."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=_environment(), capture_output=True, text=True,
                              timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start, f"over its limit of {timeout:.0f} s"
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
        return "failed", seconds, f"exit code {done.returncode}: {lines[-1] if lines else ''}"
    return "ok", seconds, None


def two_processes(device: str, *, deadline: float, scratch: Path) -> dict[str, Any]:
    """The shrunk quickstart on 2 processes through ``metaopt run --nproc 2`` (NCCL on CUDA, gloo on the CPU)."""
    from metaopt.testing import shrunk

    if device == "cuda" and torch.cuda.device_count() < 2:
        return {"status": "skipped", "error": f"needs 2 GPUs; {torch.cuda.device_count()} visible"}
    output_dir = scratch / "two_processes"
    command = [sys.executable, "-m", "metaopt", "run", "quickstart", "--nproc", "2", *shrunk("quickstart"),
               f"device={device}", f"output_dir={output_dir}"]
    status, seconds, error = _subprocess(command, min(SHARES_S["two_processes"], deadline - time.monotonic()))
    if status == "ok" and not any(output_dir.glob("quickstart/*/results.json")):
        status, error = "failed", "no results.json in the run folder"
    return {"status": status, "seconds": seconds, "error": error,
            "backend": "nccl" if device == "cuda" else "gloo", "command": "metaopt run quickstart --nproc 2 ..."}


def run_benchmarks(names: list[str], device: str, *, quick: bool, deadline: float, scratch: Path) -> dict[str, Any]:
    """Each benchmark on ``device`` in its own process (cpu-only ones recorded as such), by ``deadline``."""
    from benchmarks.__main__ import takes_device

    results: dict[str, Any] = {}
    for name in names:
        if device != "cpu" and not takes_device(name):
            results[name] = {"status": "cpu-only"}
            continue
        left = deadline - time.monotonic()
        if left < 5:
            results[name] = {"status": "skipped", "error": "the benchmarks' time budget ran out"}
            continue
        command = [sys.executable, "-m", "benchmarks", name, "--device", device, "--out", str(scratch / "benchmarks"),
                   *(["--quick"] if quick else [])]
        status, seconds, error = _subprocess(command, min(BENCHMARK_LIMIT_S, left))
        results[name] = {"status": status, "seconds": seconds, "error": error}
        if status == "ok":
            results[name]["result"] = json.loads((scratch / "benchmarks" / f"{name}.json").read_text())
        print(f"{status:11s} benchmark {name:24s} {seconds:6.1f} s{'  ' + error if error else ''}", flush=True)
    return results


# ---------------------------------------------------------------------- the check
def _names(value: str | None, default: list[str], what: str, allowed: list[str] | None = None) -> list[str]:
    """A comma-separated list (``none``: empty; None: ``default``), each name checked against ``allowed``."""
    if value is None:
        return default
    names = [] if value == "none" else [name for name in value.split(",") if name]
    unknown = [name for name in names if allowed is not None and name not in allowed]
    if unknown:
        raise SystemExit(f"python -m benchmarks gpu: unknown {what} {unknown}; expected some of {allowed}")
    return names


def check(*, device: str, recipes: list[str], precisions: list[str], benchmarks: list[str], budget_s: float,
          recipe_limit_s: float, quick: bool, out: Path) -> dict[str, Any]:
    """Run the three parts within ``budget_s`` seconds, writing ``out`` after each; returns the report."""
    start = time.monotonic()
    deadline = start + budget_s
    report: dict[str, Any] = {"machine": machine(device), "budget_s": budget_s}
    out.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        report["seconds"] = time.monotonic() - start
        out.write_text(json.dumps(report, indent=2))

    with tempfile.TemporaryDirectory(prefix="metaopt-gpu-check-") as folder:
        scratch = Path(folder)
        jobs = [(recipe, precision) for precision in precisions for recipe in recipes]
        part_end = min(deadline, time.monotonic() + SHARES_S["recipes"])
        report["recipes"] = run_recipes(jobs, device, limit_s=recipe_limit_s, deadline=part_end, scratch=scratch)
        write()
        part_end = min(deadline, time.monotonic() + SHARES_S["two_processes"])
        report["two_processes"] = two_processes(device, deadline=part_end, scratch=scratch)
        print(f"{report['two_processes']['status']:11s} quickstart on 2 processes", flush=True)
        write()
        part_end = min(deadline, time.monotonic() + SHARES_S["benchmarks"])
        report["benchmarks"] = run_benchmarks(benchmarks, device, quick=quick, deadline=part_end, scratch=scratch)
    statuses = [entry["status"] for entry in report["recipes"]]
    statuses += [report["two_processes"]["status"], *(entry["status"] for entry in report["benchmarks"].values())]
    report["summary"] = {status: statuses.count(status) for status in sorted(set(statuses))}
    write()
    return report


def main(argv: list[str] | None = None) -> int:
    from benchmarks.__main__ import available

    parser = argparse.ArgumentParser(prog="python -m benchmarks gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default), or cpu for a dry run of the same check")
    parser.add_argument("--recipes", help="comma-separated recipe names (default: every bundled recipe)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated (default: fp32,bf16)")
    parser.add_argument("--benchmarks", help=f"comma-separated, or none (default: all of {available()})")
    parser.add_argument("--quick", action="store_true", help="the benchmarks at their small size where they have one")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for the whole check ({BUDGET_S})")
    parser.add_argument("--recipe-limit", type=float, default=RECIPE_LIMIT_S,
                        help=f"seconds one recipe run may take ({RECIPE_LIMIT_S})")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of this process (the matmul rate)")
    parser.add_argument("--out", help="the JSON file (default: benchmarks/results/gpu.json, or gpu_dry_run_cpu.json "
                                      "for --device cpu)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return worker(json.loads(args.worker))
    if args.device == "cuda" and not torch.cuda.is_available():
        build = "this torch has no CUDA" if torch.version.cuda is None else "no GPU is visible"
        print(f"python -m benchmarks gpu: no CUDA device ({build}, torch {torch.__version__}); "
              "give --device cpu for a dry run on the CPU", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from metaopt.paths import recipes

    out = Path(args.out) if args.out else RESULTS / ("gpu.json" if args.device == "cuda" else "gpu_dry_run_cpu.json")
    report = check(
        device=args.device,
        recipes=_names(args.recipes, bundled_recipes(), "recipes", list(recipes())),
        precisions=_names(args.precisions, list(PRECISIONS), "precisions", ["fp32", "bf16", "fp16"]),
        benchmarks=_names(args.benchmarks, available(), "benchmarks", available()),
        budget_s=args.budget, recipe_limit_s=args.recipe_limit, quick=args.quick, out=out,
    )
    print(f"summary: {report['summary']} in {report['seconds']:.0f} s; written to {out}")
    return 1 if any(report["summary"].get(status) for status in BAD) else 0


if __name__ == "__main__":
    sys.exit(main())
