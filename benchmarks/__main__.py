"""Run benchmarks and write their results as JSON: ``python -m benchmarks [name ...]``."""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
from pathlib import Path

import torch

from metaopt.allocator import keep_freed_memory

HERE = Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {available()})")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON results")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, as on CI machines)")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as the CLI does: ours and the references alike reuse freed memory
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.names or available():
        if name not in available():
            print(f"unknown benchmark {name!r}; available: {available()}", file=sys.stderr)
            return 2
        result = importlib.import_module(f"benchmarks.bench_{name}").run()
        result["machine"] = {"python": platform.python_version(), "torch": torch.__version__,
                             "threads": torch.get_num_threads(), "processor": platform.processor()}
        (out / f"{name}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
