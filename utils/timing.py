"""Wall-clock timing that is honest on CUDA: every measurement waits for the queued GPU work first."""
from __future__ import annotations

import time
from typing import Callable

import torch


def sync(device: torch.device | str | None = None) -> None:
    """Wait for ``device``'s queued kernels (CUDA runs asynchronously: time only finished work); no-op on CPU."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn: Callable[[], object], device: torch.device | str | None = None) -> float:
    """Seconds one call of ``fn`` takes, synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def repeat_times(fn: Callable[[], object], device: torch.device | str | None = None, reps: int = 5,
                 warmup: int = 1) -> list[float]:
    """Seconds of ``reps`` timed calls after ``warmup`` untimed ones (allocator, kernel selection)."""
    for _ in range(warmup):
        fn()
    return [timed(fn, device) for _ in range(reps)]
