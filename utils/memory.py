"""Process memory policy for CPU runs: keep freed memory in the process instead of returning it to the OS.

glibc's malloc serves blocks above its mmap threshold (at most 32 MB on 64-bit) with a fresh ``mmap`` and gives them
back with ``munmap`` on free, and trims the heap top when it is freed. A CPU forward pass allocates and frees the
same large activations every call (the stem output of a batch of 32 at 320 px is 52 MB), so each call page-faults
that memory in again: the kernel maps and zeroes it page by page. Serving everything from the heap and never trimming
it removes that work; it is what the PyTorch CPU tuning guides get by preloading jemalloc or tcmalloc, done here with
glibc's own ``mallopt`` so nothing has to be installed. The cost: the process keeps its peak memory until it exits.
The effect is measured by benchmarks/inference.py and benchmarks/train_speed.py (docs/speed.md).
"""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # trimming only starts once 2 GB at the heap top are free
# the same policy for a process started with these variables (glibc reads them at start-up), e.g. a peer program
GLIBC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
_applied = False


def retain_freed_memory() -> bool:
    """Ask glibc's malloc to serve every allocation from its heap and keep what is freed (no mmap, no trimming).

    Call once at the start of a CPU run (train, val, detect); later allocations are served this way. Returns True
    when the policy is in force (glibc on Linux), False elsewhere (nothing is changed there). Calling again is a
    no-op.
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc's soname; musl and others fail here and are left alone
    except OSError:
        return False
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):  # the latter: glibc only
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1  # 1: success
    return _applied
