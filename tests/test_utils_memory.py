"""utils.memory.retain_freed_memory: a forward pass no longer page-faults its large activations in again."""
from __future__ import annotations

import subprocess
import sys

import pytest

from utils.general import ROOT

# Repeated forward passes of a small conv stem at batch 32, 320 px (a 52 MB activation, as in the detector's first
# layer); prints the minor page faults of 5 passes after 8 warm-up passes.
PROBE = r"""
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
from utils.memory import retain_freed_memory
applied = retain_freed_memory() if sys.argv[2] == "on" else False
torch.set_num_threads(1)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.LeakyReLU(0.1), torch.nn.Conv2d(16, 32, 3, 2, 1))
x = torch.rand(32, 3, 320, 320)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
with torch.inference_mode():
    for _ in range(8):  # the heap may still grow a few times before reuse settles
        net(x)
    f0 = faults()
    for _ in range(5):
        net(x)
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
    assert faults_off > 5 * 12_000  # each pass maps its 52 MB stem output (12,800 pages) afresh without the policy
    # with it the freed memory is reused: measured 0 in most runs, 12,800 (one 52 MB block mapped again while the
    # heap grows) in about one in ten, against ~320,000 without the policy
    assert faults_on < faults_off / 8


def test_second_call_is_a_no_op() -> None:
    from utils.memory import retain_freed_memory

    first = retain_freed_memory()
    assert retain_freed_memory() == first
