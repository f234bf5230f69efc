"""utils.memory.retain_freed_memory: a large block freed and allocated again no longer page-faults back in."""
from __future__ import annotations

import subprocess
import sys

import pytest

from utils.general import ROOT

# Allocates, touches and frees a 64 MB tensor 12 times; prints the minor page faults of the last 4 rounds (the
# first rounds may grow the heap: an aligned block does not always fit the space the previous one left).
PROBE = r"""
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
from utils.memory import retain_freed_memory
applied = retain_freed_memory() if sys.argv[2] == "on" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    x = torch.empty(16 * 2**20).fill_(1.0)
    del x
f0 = faults()
for _ in range(4):
    x = torch.empty(16 * 2**20).fill_(1.0)
    del x
print(applied, faults() - f0)
"""


def _probe(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), mode], capture_output=True, text=True, check=True,
                         timeout=120).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc policy: Linux only")
def test_freed_blocks_are_reused_without_page_faults() -> None:
    applied_off, faults_off = _probe("off")
    applied_on, faults_on = _probe("on")
    if not applied_on:
        pytest.skip("not glibc: retain_freed_memory() leaves the allocator alone")
    assert not applied_off
    assert faults_off > 4 * 16000 * 0.5  # 4 x 64 MB = 4 x 16,384 pages mapped afresh without the policy
    assert faults_on < faults_off / 10  # with it, the same memory is reused


def test_second_call_is_a_no_op() -> None:
    from utils.memory import retain_freed_memory

    first = retain_freed_memory()
    assert retain_freed_memory() == first
