"""Meta-training throughput on 1 vs 2 processes (torch.distributed), the same global meta-batch.

- The quickstart transformer (recipes/quickstart.yaml: its learner, task and batch of 256 tasks).
- The conv-MAML meta-step: MAML on ``hypernets.TargetCNN`` from recipes/hypertransformer.yaml (held at 8
  channels, the width its figures were measured at), on its 5-way 1-shot glyph task, 32 tasks per step (16 per
  process on 2, the meta-batch of ``bench_maml``). At the recipe's 8 tasks per process the step's costs that do
  not shrink with the batch (five inner steps of small ops) weigh: one process on 8 tasks runs at 0.67-0.81 of
  its rate on 16, which bounds the scaling efficiency of 16 tasks.

Each case on each process count is a fresh ``python -m torch.distributed.run --standalone --nproc-per-node N`` of
this module (``--worker``), 1 thread per process, so that 1 and 2 processes start alike; ``MetaTrainer`` steps are
timed after a warm-up in blocks, with no synchronisation inside a block (losses stay on the device), and the
fastest block counts (the machine is shared: other work only ever slows a block down). Reported per
configuration: episodes/s, the all-reduce's time per step as ``MetaTrainer`` calls it (which includes waiting for
the slower rank) and alone after a barrier (the transfer itself), the time spent sampling episodes, and each
rank's peak memory (``ru_maxrss`` on CPU, ``torch.cuda.max_memory_allocated`` on CUDA); per case the scaling
efficiency ``(eps_2 / eps_1) / 2`` (goal >= 0.85), with each rank sampling the whole meta-batch
(``train.shards=1``, the default) and only its half (``train.shards=2``).

Two diagnostics say where a shortfall comes from: one process on half the batch (the bound that halving the
batch alone sets: per-step costs that do not shrink with it) and 2 processes that skip the all-reduce (what the
two processes cost each other on this machine, without communicating). The machine's fp32 matmul rate at 1 thread
sits beside them: CPU figures are ratios, GPU figures come only from a GPU run (``python -m benchmarks gpu``). Each
configuration's achieved GFLOP/s (one step's FLOPs per episode, counted by ``benchmarks.flops``, times its
episodes/s) is given with its share of that rate times the processes.

Checked first in every launch: one meta-step's all-reduced meta-gradient on 2 processes equals 1 process's, in
float64, to 1e-10.

Measured with ``python -m benchmarks distributed`` on a 2-core VM shared with other work (three runs; matmul 54-72
GFLOP/s at 1 thread): the transformer scales at 0.89-0.97 (shards=2: 0.81-1.02), conv-MAML at 0.65-0.77
(shards=2: 0.72-0.81). The all-reduce itself takes 1.6-3.6 ms a step (1-3% of it); ``MetaTrainer`` spends
8-23 ms in it, mostly waiting for the slower rank, and skipping it altogether does not raise the efficiency.
Most of what MAML loses is the two processes slowing each other down: without communicating, two processes on 16
tasks each run 15-23% slower than one alone on 16 tasks, likely for the memory that its task-folded activations
stream through (tens of MB a layer, past the shared 32 MiB L3; the transformer's are a few MB). Glyph sampling
(58 ms a step for 32 tasks) is replicated on every rank with shards=1; shards=2 halves it (+0.04-0.07). Peak
memory: ~500 MiB per rank (transformer) and ~570 (MAML) on 2 processes, 556 and 690 on one (~340 of it is the
imports: torch, scikit-learn, scipy).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

import metaopt.distributed as distributed
from benchmarks.bench_maml import float64
from benchmarks.flops import count_flops, machine_rate
from benchmarks.timing import synchronize
from benchmarks.trainers import recipe_trainer
from metaopt.allocator import keep_freed_memory
from metaopt.runtime import resolve_device
from metaopt.train import MetaTrainer

ROOT = Path(__file__).resolve().parent.parent
GOAL = 0.85
TOLERANCE = 1e-10
CASES = {  # name -> (recipe, learner, tasks per step in the timing, tasks in the float64 check, recipe overrides)
    "transformer_quickstart": ("quickstart", "transformer", 256, 8, ()),
    "maml_targetcnn_glyphs": ("hypertransformer", "maml", 32, 4, ("learners.maml.network.widths=8",)),
}
SIZES = {"full": {"warmup": 2, "blocks": 4, "steps": 4}, "quick": {"warmup": 1, "blocks": 1, "steps": 2}}
LAUNCH_TIMEOUT_S = 300


# ---------------------------------------------------------------------- in a worker process
def _trainer(case: str, batch_size: int, steps: int, device: torch.device, **changes: Any) -> MetaTrainer:
    """The case's learner and task as its recipe builds them, with the recipe's settings (no curriculum)."""
    recipe, name, _, _, overrides = CASES[case]
    return recipe_trainer(recipe, name, batch_size, steps, device, overrides=overrides, **changes)


class Stopwatch:
    """Total time spent in the calls of a wrapped function (waiting for the device before and after each)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            synchronize()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            synchronize()
            self.seconds += time.perf_counter() - start
            return out

        return timed


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def _all_reduce_alone_ms(trainer: MetaTrainer, repeats: int = 10) -> float:
    """The all-reduce of a step's flat buffer after a barrier each time: the transfer, without waiting for a peer."""
    if trainer.world.size == 1:
        return 0.0
    buffer = [torch.zeros(sum(p.numel() for p in trainer.learner.parameters()) + 1, device=trainer.device)]
    watch = Stopwatch()
    reduce = watch.wrap(distributed.all_reduce_mean_)
    for _ in range(repeats):
        distributed.barrier()
        reduce(buffer, trainer.streams.weight)
    return 1e3 * watch.seconds / repeats


def _time_case(case: str, *, batch_size: int, shards: int, all_reduce: bool, warmup: int, blocks: int, steps: int,
               device: torch.device) -> dict:
    """Steady-state steps of one configuration: the fastest of ``blocks`` blocks of ``steps`` steps (as the other
    benchmarks take the best of repeats: other work on the machine only ever slows a block down).

    ``all_reduce=False`` skips the gradients' reduction (a diagnostic: the ranks then train apart, and the time is
    what 2 processes cost without communicating).
    """
    trainer = _trainer(case, batch_size, warmup + blocks * steps, device, shards=shards)
    communication, sampling = Stopwatch(), Stopwatch()
    reduce = distributed.all_reduce_mean_
    distributed.all_reduce_mean_ = communication.wrap(reduce if all_reduce else lambda tensors, weight: None)
    trainer.streams.draw = sampling.wrap(trainer.streams.draw)  # MetaTrainer calls both through these names
    timed = []  # per block: seconds, all-reduce seconds, sampling seconds
    try:
        for _ in range(warmup):
            trainer._train_step()
        for _ in range(blocks):
            communication.seconds = sampling.seconds = 0.0
            synchronize()
            distributed.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                trainer._train_step()
            synchronize()
            distributed.barrier()
            timed.append((time.perf_counter() - start, communication.seconds, sampling.seconds))
    finally:
        distributed.all_reduce_mean_ = reduce
    bad, loss, _ = trainer._read_pending()
    if bad is not None:
        raise RuntimeError(f"{case}: non-finite loss at step {bad}")
    ranks = distributed.all_gather_objects({"blocks": timed, "peak_memory_mib": _peak_memory_mib(device)})
    best = min(range(blocks), key=lambda b: ranks[0]["blocks"][b][0])  # the barriers align the ranks' blocks
    seconds = ranks[0]["blocks"][best][0]
    step_ms = 1e3 * seconds / steps
    all_reduce_ms = sum(1e3 * r["blocks"][best][1] / steps for r in ranks) / len(ranks)
    return {
        "processes": trainer.world.size, "shards": shards, "batch_size": batch_size, "all_reduce": all_reduce,
        "tasks_sampled_per_rank_per_step": trainer.streams.sampled_per_step,
        "timed_steps": f"best of {blocks} x {steps}", "episodes_per_s": batch_size * steps / seconds,
        "step_ms": step_ms, "slowest_block_step_ms": 1e3 * max(b[0] for b in ranks[0]["blocks"]) / steps,
        "all_reduce_ms_per_step": all_reduce_ms, "all_reduce_share_of_step": all_reduce_ms / step_ms,
        "all_reduce_alone_ms": _all_reduce_alone_ms(trainer),
        "sampling_ms_per_step": sum(1e3 * r["blocks"][best][2] / steps for r in ranks) / len(ranks),
        "peak_memory_mib_per_rank": [r["peak_memory_mib"] for r in ranks],
        "parameters": sum(p.numel() for p in trainer.learner.parameters()), "final_loss": loss,
    }


def _check_gradients(case: str, device: torch.device) -> dict[str, torch.Tensor]:
    """One meta-step in float64: the all-reduced meta-gradient of every parameter (on the CPU)."""
    trainer = _trainer(case, CASES[case][3], 1, device, dtype=torch.float64, grad_clip=None)
    draw = trainer.streams.draw
    trainer.streams.draw = lambda *args: float64(draw(*args))
    trainer._train_step()
    return {name: p.grad.cpu() for name, p in trainer.learner.named_parameters() if p.grad is not None}


def _flop_per_episode(case: str, tasks: int = 2) -> float:
    """FLOPs of one meta-training step per episode (``benchmarks.flops``; an inner loop counted task by task:
    torch's counter overcounts grouped convolutions)."""
    trainer = _trainer(case, tasks, 1, torch.device("cpu"))
    if hasattr(trainer.learner, "strategy"):
        trainer.learner.strategy = "loop"
    return count_flops(trainer._train_step) / tasks


def worker(spec: dict) -> None:
    """One launched process: check (float64, small batch, first), then time each of ``spec["runs"]`` for each of
    ``spec["cases"]``; rank 0 saves both.

    The check's batch is at most a quarter of the timed one in twice the bytes, so it does not raise the peak
    memory; the timed runs go from the largest batch to the smallest, so the peak memory is the first run's.
    """
    keep_freed_memory()  # as `metaopt run` does
    torch.set_num_threads(1)
    device = resolve_device(spec["device"])
    with distributed.session(device) as current:
        gradients = {case: _check_gradients(case, device) for case in spec["cases"] if spec["check"]}
        timing = {case: {run["key"]: _time_case(case, batch_size=CASES[case][2] // run["divide_batch"],
                                                shards=run["shards"], all_reduce=run["all_reduce"],
                                                warmup=spec["warmup"], blocks=spec["blocks"], steps=spec["steps"],
                                                device=device)
                         for run in spec["runs"]}
                  for case in spec["cases"]}
        if current.is_main:
            torch.save({"gradients": gradients, "timing": timing}, spec["out"])
        distributed.barrier()


# ---------------------------------------------------------------------- in the benchmark's process
def _runs(processes: int, quick: bool) -> list[dict]:
    """The timed configurations of a launch on ``processes`` processes (``quick``: the plain one only)."""
    if processes == 1:
        runs = [{"key": "1_process", "shards": 1, "all_reduce": True, "divide_batch": 1},
                # what 2 processes could reach if nothing but the batch were halved
                {"key": "1_process_half_batch", "shards": 1, "all_reduce": True, "divide_batch": 2}]
    else:
        runs = [{"key": "2_processes", "shards": 1, "all_reduce": True, "divide_batch": 1},
                {"key": "2_processes_shards_2", "shards": 2, "all_reduce": True, "divide_batch": 1},
                {"key": "2_processes_without_all_reduce", "shards": 1, "all_reduce": False, "divide_batch": 1}]
    return runs[:1] if quick else runs


def _launch(processes: int, spec: dict) -> dict:
    """Run :func:`worker` on ``processes`` processes through ``torch.distributed.run``; rank 0's result."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.pt"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
                   "-m", "benchmarks.bench_distributed", "--worker", json.dumps({**spec, "out": str(out)})]
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"the {processes}-process worker failed with exit code {done.returncode}:\n"
                               f"{done.stderr[-3000:]}")
        return torch.load(out, weights_only=True)


def _processes_available(device: str) -> int:
    """How many processes a case can have: 2 on the CPU, one per visible GPU (at most 2) on CUDA."""
    return 2 if device == "cpu" else min(2, torch.cuda.device_count())


def _compare_gradients(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor], case: str) -> float:
    """The largest difference between the 2-process and the 1-process meta-gradients (AssertionError past
    :data:`TOLERANCE`)."""
    if one.keys() != two.keys():
        raise AssertionError(f"{case}: the parameters with gradients differ between 1 and 2 processes")
    for name, gradient in one.items():
        torch.testing.assert_close(two[name], gradient, rtol=TOLERANCE, atol=TOLERANCE,
                                   msg=lambda message, n=name: f"{case}: {n}: 2 processes vs 1: {message}")
    return max(float((two[name] - gradient).abs().max()) for name, gradient in one.items())


def _efficiencies(entry: dict) -> dict:
    """``(eps_2 / eps_1) / 2`` of every 2-process configuration that ran, and the bound that halving the batch
    alone sets (``eps_half_batch / eps_1``): above it nothing but the batch's size would be lost."""
    one = entry["1_process"]["episodes_per_s"]
    found = {f"scaling_efficiency{key.removeprefix('2_processes')}": entry[key]["episodes_per_s"] / one / 2
             for key in entry if key.startswith("2_processes") and "episodes_per_s" in entry[key]}
    if "1_process_half_batch" in entry:
        found["efficiency_bound_of_the_half_batch"] = entry["1_process_half_batch"]["episodes_per_s"] / one
    return found


def run(*, quick: bool = False, device: str = "cpu") -> dict:
    """Time every case on 1 and 2 processes after checking their meta-gradients agree.

    One launch per case and process count, so that each peak memory is the case's own (the 2-process
    configurations of a case, all with the same share per rank, share a launch). ``quick`` (the tests' size):
    2 timed steps, both cases in one launch per process count, no diagnostic configurations.
    """
    load_before = os.getloadavg()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each process of the timed runs
    rate = machine_rate(resolve_device(device))
    flop = {case: _flop_per_episode(case) for case in CASES}
    torch.set_num_threads(threads)
    size = SIZES["quick" if quick else "full"]
    available = _processes_available(device)
    check: dict[str, Any] = {} if available > 1 else {"skipped": "needs 2 processes on their own devices"}
    entries: dict[str, dict] = {case: {} for case in CASES}
    for cases in [list(CASES)] if quick else [[case] for case in CASES]:
        gradients = {}
        for processes in (1, 2):
            if processes > available:
                for case in cases:
                    entries[case] |= {run["key"]: {"skipped": f"needs {processes} devices"}
                                      for run in _runs(processes, quick)}
                continue
            out = _launch(processes, {"cases": cases, "runs": _runs(processes, quick), "check": available > 1,
                                      "device": device, **size})
            gradients[processes] = out["gradients"]
            for case in cases:
                entries[case] |= out["timing"][case]
        if available > 1:
            check |= {case: _compare_gradients(gradients[1][case], gradients[2][case], case) for case in cases}
    result: dict[str, Any] = {"device": device, "matmul_gflops_fp32_1_thread": rate, "goal_efficiency": GOAL}
    if "skipped" not in check:
        check = {"gradients_match_1_process_in_float64_to": TOLERANCE, "max_abs_difference": check}
    result["check"] = check
    for case, (recipe, learner, batch, _, _) in CASES.items():
        entry = entries[case]
        for timed in entry.values():
            if "episodes_per_s" in timed:
                gflops = flop[case] * timed["episodes_per_s"] / 1e9
                timed |= {"gflops": gflops, "share_of_matmul_rate": gflops / (rate * timed["processes"])}
        result[f"{case}_batch_{batch}"] = {"recipe": recipe, "learner": learner, "gflop_per_episode": flop[case] / 1e9,
                                           **entry, **_efficiencies(entry)}
    result["load_average_before_after"] = [load_before[0], os.getloadavg()[0]]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the worker of benchmarks/bench_distributed.py (under torchrun); "
                                                 "run the benchmark with `python -m benchmarks distributed`")
    parser.add_argument("--worker", required=True, help="what to run, as JSON")
    worker(json.loads(parser.parse_args(argv).worker))
    return 0


if __name__ == "__main__":
    sys.exit(main())
