"""metaopt.allocator: after keep_freed_memory, steps that allocate the same large tensors stop faulting in pages."""

import platform
import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys, torch
from metaopt.allocator import keep_freed_memory
tuned = sys.argv[1] == "tuned" and keep_freed_memory()
def faults_of_one_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    activations = [torch.empty(n * 2**20).fill_(1.0) for n in (16, 8, 4)]  # 64, 32 and 16 MB, freed together
    del activations
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
steps = [faults_of_one_step() for _ in range(12)]
print(tuned, sum(steps[-3:]))
"""
PAGES = 3 * (64 + 32 + 16) * 2**20 // 4096  # touched by the last three steps


def _last_steps_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True,
                         env={"METAOPT_MALLOC_TUNING": "1", "PATH": ""}).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    tuned, faults = _last_steps_faults("tuned")
    assert tuned == "True" and faults < PAGES // 20
    _, default_faults = _last_steps_faults("default")
    assert default_faults > max(10 * faults, 100)  # glibc's default: fresh (perhaps huge) pages in every step


def test_opt_out_by_environment(monkeypatch):
    from metaopt.allocator import keep_freed_memory

    monkeypatch.setenv("METAOPT_MALLOC_TUNING", "0")
    assert keep_freed_memory() is False
