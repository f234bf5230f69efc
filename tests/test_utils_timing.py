"""utils/timing.py: timed / repeat_times measure the call (and only it), warm-up calls are not timed."""
from __future__ import annotations

import time

from utils.timing import repeat_times, sync, timed


def test_timed_and_repeat_times_measure_the_calls() -> None:
    calls = []
    t = timed(lambda: (calls.append(1), time.sleep(0.02)), "cpu")
    assert 0.02 <= t < 0.5 and calls == [1]
    times = repeat_times(lambda: (calls.append(1), time.sleep(0.01)), "cpu", reps=3, warmup=2)
    assert len(times) == 3 and len(calls) == 6 and all(0.01 <= x < 0.5 for x in times)
    sync("cpu")  # a no-op off CUDA
    sync(None)
