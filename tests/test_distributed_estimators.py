"""ES and PES on 2 gloo processes: the pairs are split over the ranks and the estimates equal one process's."""

from __future__ import annotations

import datetime
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_estimators import META, _gen, _quadratic, _sgd

from optimizers._distributed import all_reduce_sum_, world
from optimizers.environments import Environment, mlp_apply, mlp_init
from optimizers.estimators import PES, AntitheticES, FullBackprop, TruncatedBackprop

WORLD = 2
TIMEOUT_S = 120  # a hang fails the test instead of blocking the suite


def _minibatch() -> Environment:
    """A fresh MLP per run and mini-batches drawn from the run's seed: the inner randomness each pair must match."""
    g = _gen(3)
    return Environment(mlp_apply, lambda gen: mlp_init([4, 6, 3], gen), torch.randn(32, 4, generator=g),
                       torch.randint(3, (32,), generator=g), horizon=4, batch_size=8)


ESTIMATORS = {  # name -> (a fresh estimator, calls in a row)
    "es": (lambda: AntitheticES(sigma=0.05, pairs=5), 1),  # 5 pairs: 3 on rank 0, 2 on rank 1
    "pes": (lambda: PES(truncation=2, sigma=0.05, pairs=5), 3),  # calls 1-2 continue the runs, call 3 restarts them
    "truncated": (lambda: TruncatedBackprop(truncation=2), 1),
    "full": (FullBackprop, 1),
}


def _estimates() -> dict:
    """Every estimator's estimates on both environments and the generator state after them: what a rank reports."""
    meta32 = {k: v.float() for k, v in META.items()}
    environments = {"quadratic": (_quadratic(), META), "minibatch": (_minibatch(), meta32)}
    out = {}
    for name, (make, calls) in ESTIMATORS.items():
        for env_name, (env, meta) in environments.items():
            estimator, generator = make(), _gen(11)
            parts = [estimator.estimate(env, _sgd, meta, generator=generator) for _ in range(calls)]
            out[name, env_name] = parts, generator.get_state()
    return out


def _child(rank: int, folder: str) -> None:
    """One rank: every estimate, the pairs it ran, the reduction helper, and PES refusing a changed group."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        result = {"world": world(), "estimates": _estimates()}
        env, unrolls = _quadratic(), []
        unroll = env.unroll
        env.unroll = lambda *args, **kwargs: unrolls.append(1) or unroll(*args, **kwargs)
        for estimator in (AntitheticES(pairs=5), PES(truncation=2, pairs=5)):
            estimator.estimate(env, _sgd, META, generator=_gen())
        result["unrolls"] = len(unrolls)  # 2 per pair this rank owns, for each of the two estimators
        mixed = [torch.full((2,), rank + 1.0), torch.tensor([[rank]], dtype=torch.float64)]
        all_reduce_sum_(mixed)
        result["reduced"] = mixed
        pes = PES(truncation=1, pairs=2)
        pes.estimate(_quadratic(), _sgd, META, generator=_gen())
    finally:
        dist.destroy_process_group()
    with pytest.raises(RuntimeError, match="call reset"):
        pes.estimate(_quadratic(), _sgd, META, generator=_gen())  # its other rank's runs are gone
    torch.save(result, f"{folder}/rank{rank}.pt")


def _same(a, b) -> None:
    """Bit-identical estimates (the pair losses are shared exactly, then combined as one process does)."""
    assert a.loss == b.loss and a.metrics == b.metrics and a.grads.keys() == b.grads.keys()
    for k in a.grads:
        assert a.grads[k].dtype == b.grads[k].dtype and torch.equal(a.grads[k], b.grads[k]), k


def test_two_ranks_return_the_single_process_estimates(tmp_path):
    started = time.monotonic()
    context = mp.spawn(_child, args=(str(tmp_path),), nprocs=WORLD, join=False)
    try:
        while not context.join(timeout=max(1.0, TIMEOUT_S - (time.monotonic() - started))):
            if time.monotonic() - started > TIMEOUT_S:
                pytest.fail(f"the {WORLD} estimator processes did not finish within {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert [r["world"] for r in ranks] == [(0, WORLD), (1, WORLD)] and world() == (0, 1)
    assert [r["unrolls"] for r in ranks] == [2 * 2 * 3, 2 * 2 * 2]  # pairs 0, 2, 4 on rank 0; 1, 3 on rank 1
    for r in ranks:  # one buffer, float32 and float64 tensors summed in place
        assert torch.equal(r["reduced"][0], torch.full((2,), 3.0))
        assert torch.equal(r["reduced"][1], torch.ones(1, 1, dtype=torch.float64))
    single = _estimates()
    assert single.keys() == ranks[0]["estimates"].keys() == ranks[1]["estimates"].keys()
    for key, (expected, state) in single.items():
        for r in ranks:
            got, got_state = r["estimates"][key]
            assert torch.equal(got_state, state), key  # the caller checkpoints one generator for every rank
            assert len(got) == len(expected)
            for g, e in zip(got, expected):
                _same(g, e)
    assert all([p.metrics["inner_step"] for p in single["pes", env][0]] == [2, 4, 2] for env in ("quadratic",
                                                                                                   "minibatch"))
