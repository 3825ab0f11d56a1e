"""Run benchmarks and write their results as JSON: ``python -m benchmarks [name ...]``.

Each result's ``machine`` entry holds this machine's fp32 matmul rate (``benchmarks.flops.machine_rate``, the rate
the benchmark's shares are of). A benchmark whose ``run`` takes ``out`` writes its figures (PNG) there too.

``python -m benchmarks gpu`` is the GPU check instead (:mod:`benchmarks.gpu`, ``make gpu-check``)."""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import platform
import sys
from pathlib import Path

import torch

from benchmarks.flops import machine_rate
from metaopt.allocator import keep_freed_memory

HERE = Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def takes_device(name: str) -> bool:
    """Whether benchmark ``name`` can run on another device than the CPU (its ``run`` takes ``device``)."""
    return "device" in inspect.signature(importlib.import_module(f"benchmarks.bench_{name}").run).parameters


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["gpu"]:
        from benchmarks.gpu import main as gpu_check

        return gpu_check(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {available()})")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON results")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, as on CI machines)")
    parser.add_argument("--device", default="cpu", help="where the benchmarks that take a device run (e.g. cuda); "
                                                        "the others refuse anything but cpu")
    parser.add_argument("--quick", action="store_true", help="the small size of the benchmarks that have one")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as the CLI does: ours and the references alike reuse freed memory
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.names or available()
    unknown = [name for name in names if name not in available()]
    cpu_only = [name for name in names if name not in unknown and args.device != "cpu" and not takes_device(name)]
    if unknown or cpu_only:
        problem = f"unknown benchmark(s) {unknown}" if unknown else f"{cpu_only} run on the CPU only"
        print(f"{problem}; available: {available()}", file=sys.stderr)
        return 2
    for name in names:
        run = importlib.import_module(f"benchmarks.bench_{name}").run
        options = {"device": args.device, "quick": args.quick, "out": out}
        result = run(**{key: value for key, value in options.items() if key in inspect.signature(run).parameters})
        result["machine"] = {"python": platform.python_version(), "torch": torch.__version__,
                             "threads": torch.get_num_threads(), "processor": platform.processor(),
                             "device": args.device, "matmul_gflops_fp32": machine_rate(args.device)}
        (out / f"{name}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
