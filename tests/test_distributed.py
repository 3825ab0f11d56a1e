"""Meta-training and comparison on 2 gloo processes: the same results as one process, rank 0 alone writes."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metaopt import distributed
from metaopt.compare import compare
from metaopt.learners import MAML, LeastSquares, Transformer
from metaopt.log import Run
from metaopt.streams import TrainingStreams
from metaopt.seeds import SeedPlan
from metaopt.tasks import LinearRegression, Sinusoid
from metaopt.train import MetaTrainer

WORLD = 2
TIMEOUT_S = 180  # a hang fails the test instead of blocking the suite
ROOT = Path(__file__).resolve().parent.parent


def spawn(fn, folder: Path, *args) -> None:
    """Run ``fn(rank, folder, *args)`` on 2 gloo processes joined through a file store; fail on a hang."""
    context = mp.start_processes(_join, args=(fn, str(folder), args), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} processes did not finish within {TIMEOUT_S} s")


def _join(rank: int, fn, folder: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        fn(rank, Path(folder), *args)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------- learners and trainers
def _learner(kind: str):
    torch.manual_seed(0)
    if kind == "transformer":
        return Transformer(x_dim=2, max_support=6, n_embd=16, n_layer=1, n_head=2), LinearRegression(2)
    network = {"kind": "mlp", "in_features": 1, "hidden": [16], "out_features": 1}
    return MAML(network, steps=2, inner_lr=0.05, strategy=kind.removeprefix("maml_")), Sinusoid()


def _trainer(kind: str, run=None, **changes) -> MetaTrainer:
    learner, family = _learner(kind)
    settings = dict(steps=20, batch_size=10, support=6, lr=3e-3, val_every=10, val_tasks=15, checkpoint_every=10,
                    log_every=5, seed=3, progress=False, name="learner", run=run)
    return MetaTrainer(learner, family, **{**settings, **changes})


KINDS = ["transformer", "maml_batched", "maml_folded", "maml_loop"]
SHARDS = (1, 2)


def _compare_tiny():
    learner, family = _learner("transformer")
    return compare({"tf": learner, "ls": LeastSquares()}, family, support_sizes=[0, 2, 5], num_tasks=37,
                   chunk_size=8, seed=4, bootstrap=50, progress=False).to_dict()


def _on_each_rank(rank: int, folder: Path) -> None:
    """What each rank of the 2-process job does: train every kind, checkpoint a run, compare."""
    out = {}
    for shards in SHARDS:
        for kind in KINDS:
            trainer = _trainer(kind, shards=shards)
            result = trainer.fit()
            out[kind, shards] = {"params": trainer.learner.state_dict(), "val": result.val_loss,
                                 "sampled": trainer.streams.sampled_per_step}
    run = Run("r", {}, root=folder / "runs", wandb_mode="disabled")
    _trainer("transformer", run=run, shards=2).fit()
    out["run"], out["compare"] = run.path, json.dumps(_compare_tiny())
    torch.save(out, folder / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The two ranks' results of one 2-process job (one start-up for every test below)."""
    folder = tmp_path_factory.mktemp("two_ranks")
    spawn(_on_each_rank, folder)
    torch.set_num_threads(1)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def assert_trained_alike(params: dict, expected: dict, what: str) -> None:
    """Equal to summation-order tolerance. atol 1e-4: the attention key bias has no gradient in exact arithmetic
    (softmax ignores a shift), so AdamW steps by the sign of float noise there; every other entry agrees to 1e-5."""
    for name, value in expected.items():
        torch.testing.assert_close(params[name], value, rtol=1e-4, atol=1e-4, msg=f"{what}: {name}")


@pytest.mark.parametrize("shards", SHARDS)
@pytest.mark.parametrize("kind", KINDS)
def test_two_processes_train_like_one(ranks, kind, shards):
    """20 steps on 2 processes equal 20 steps on 1 (the same tasks; summation-order tolerance), for the
    transformer and every InnerLoop strategy; with shards=2 each rank samples only its own half."""
    single = _trainer(kind, shards=shards)
    single.fit()
    mine, other = ranks[0][kind, shards], ranks[1][kind, shards]
    assert mine["sampled"] == (10 if shards == 1 else 5)
    for name, value in mine["params"].items():
        assert torch.equal(value, other["params"][name]), name  # the ranks never drift apart
    assert_trained_alike(mine["params"], single.learner.state_dict(), kind)
    assert mine["val"] == pytest.approx(single.validate(), rel=1e-4)


def test_streams_give_the_same_tasks_on_any_number_of_processes():
    family = LinearRegression(3)
    for shards in (1, 2, 3, 7):
        whole = TrainingStreams(SeedPlan(5), 7, shards, current=distributed.World(0, 1))
        expected = [whole.draw(family, 4, 1, "cpu").x_query for _ in range(3)]
        for size in (2, 3):
            parts = [TrainingStreams(SeedPlan(5), 7, shards, current=distributed.World(r, size)) for r in range(size)]
            for step in range(3):
                got = torch.cat([p.draw(family, 4, 1, "cpu").x_query for p in parts])
                assert torch.equal(got, expected[step]), (shards, size, step)
    with pytest.raises(ValueError, match="smaller than the 4 processes"):
        TrainingStreams(SeedPlan(0), 3, 1, current=distributed.World(0, 4))


def test_rank0_alone_writes_and_one_process_resumes_a_two_process_run(ranks, caplog):
    path = Path(ranks[0]["run"])
    assert ranks[1]["run"] == path and sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert sorted(p.name for p in (path / "checkpoints" / "learner").iterdir()) == ["step_00000010.pt",
                                                                                  "step_00000020.pt"]
    steps = [json.loads(line)["learner/step"] for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 10, 15, 20, 20]  # loss rows and validation rows, each once
    (path / "checkpoints" / "learner" / "step_00000020.pt").unlink()
    resumed = _trainer("transformer", run=Run("r", {}, path=path, wandb_mode="disabled"), shards=2)
    assert resumed.resume() and resumed.step == 10
    assert "written by 2 process(es); continuing on 1" in caplog.text
    resumed.fit()
    straight = _trainer("transformer", shards=2)
    straight.fit()
    assert_trained_alike(resumed.learner.state_dict(), straight.learner.state_dict(), "resumed")


def test_sharded_compare_equals_single_process_compare(ranks):
    """5 chunks of 8 tasks over 2 ranks: every number identical to the single-process comparison."""
    single = json.loads(json.dumps(_compare_tiny()))
    for rank in range(WORLD):
        assert json.loads(ranks[rank]["compare"]) == single


# ---------------------------------------------------------------------- the command line on 2 processes
SHRUNK = ["train.steps=6", "train.batch_size=8", "train.val_every=3", "train.val_tasks=8", "train.checkpoint_every=3",
          "train.log_every=1", "compare.num_tasks=40", "compare.chunk_size=8", "compare.bootstrap=20",
          "wandb.mode=disabled", "progress=false", "threads=1"]


def metaopt(*args: str, cwd: Path, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "metaopt", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _run_dir(cwd: Path, name: str = "quickstart") -> Path:
    (found,) = (cwd / "runs" / name).iterdir()
    return found


def test_cli_two_processes_rank0_writes_and_compare_is_identical(tmp_path):
    """`metaopt run --nproc 2`: one run folder, every metric row once, and a results.json that a single-process
    `metaopt compare` of the run reproduces exactly."""
    done = metaopt("run", "quickstart", "--nproc", "2", *SHRUNK, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    path = _run_dir(tmp_path)
    assert "distributed run: 2 processes (gloo)" in done.stderr and done.stdout.count("results: ") == 1
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    losses = [row["transformer/step"] for row in rows if "transformer/loss" in row]
    assert losses == [1, 2, 3, 4, 5, 6]  # logged once, by rank 0
    two = json.loads((path / "results.json").read_text())
    one = metaopt("compare", str(path), cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    (again,) = (path / "compare").iterdir()
    assert json.loads((again / "results.json").read_text()) == two


def _ranks_of(launcher: int) -> dict[int, int]:
    """The worker processes torchrun started under ``launcher``, by RANK (read from /proc)."""
    found = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            parent = int(next(line for line in status.read_text().splitlines() if line.startswith("PPid:")).split()[1])
            environ = (status.parent / "environ").read_bytes().split(b"\0")
        except (OSError, StopIteration):
            continue
        rank = [item[5:] for item in environ if item.startswith(b"RANK=")]
        if parent == launcher and rank:
            found[int(rank[0])] = int(status.parent.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker processes through /proc")
def test_killed_rank_stops_the_run_and_resume_continues_on_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    steps = ["train.steps=60", "train.checkpoint_every=5", "train.val_every=30"]
    launcher = subprocess.Popen([sys.executable, "-m", "metaopt", "run", "quickstart", "--nproc", "2", *SHRUNK, *steps],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT_S
    while not list(tmp_path.glob("runs/quickstart/*/checkpoints/transformer/step_*.pt")):
        assert launcher.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.2)
    workers = _ranks_of(launcher.pid)
    os.kill(workers[1], signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=TIMEOUT_S)
    assert launcher.returncode != 0
    assert "rank 1 of 2 failed (exit code -9)" in stderr and "metaopt resume" in stderr
    path = _run_dir(tmp_path)
    resumed = metaopt("resume", str(path), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "written by 2 process(es); continuing on 1" in resumed.stderr
    assert (path / "checkpoints" / "transformer" / "step_00000060.pt").exists()


# ---------------------------------------------------------------------- every kind of recipe on 2 processes
def _every_kind() -> dict[str, list[str]]:
    from test_optimizer_experiment import TINY
    from test_recipes_smoke import shrunk

    continual = ["train.steps=2", "train.batch_size=2", "train.val_tasks=2", "train.val_every=2",
                 "learners.protonet_merged_support.train.steps=2", "task.queries=1", "train.query=15",
                 "compare.query=15", "compare.num_tasks=4", "compare.bootstrap=10", "wandb.mode=disabled",
                 "progress=false", "evaluate=[{_target_: hypernets.continual.evaluate_sequences, lengths: [3], "
                 "sequences: 2}]"]
    return {
        "quickstart": shrunk("quickstart"),  # regression in context
        "boolean_icl": shrunk("boolean_icl"),  # Boolean functions
        "maml_sinusoid": shrunk("maml_sinusoid"),  # the MAML family
        "hypertransformer": shrunk("hypertransformer"),  # HyperTransformer (and MAML/ProtoNet on a CNN)
        "continual_hypertransformer": continual,
        "specialized_optimizer": TINY,  # the optimizer pipeline
    }


def _run_every_kind(rank: int, folder: Path) -> None:
    from metaopt.pipelines import run

    paths = {name: run(name, [*overrides, f"output_dir={folder / 'runs'}"]).path
             for name, overrides in _every_kind().items()}
    torch.save(paths, folder / f"paths{rank}.pt")


def test_every_recipe_kind_runs_on_two_processes(tmp_path):
    spawn(_run_every_kind, tmp_path)
    paths = [torch.load(tmp_path / f"paths{r}.pt", weights_only=False) for r in range(WORLD)]
    assert paths[0] == paths[1]
    for name, path in paths[0].items():
        assert [p.name for p in path.parent.iterdir()] == [path.name], name  # one run folder, by rank 0
        assert (path / "results.json").is_file() and (path / "config.yaml").is_file(), name
    assert (paths[0]["continual_hypertransformer"] / "continual.json").is_file()
