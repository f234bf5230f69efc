"""benchmarks/loss_drift.py (three training trajectories from the same weights and batches, compared per step) and
benchmarks/cpu_kernel_ab.py (the fused training kernel on / off, alternating step by step)."""
from __future__ import annotations

import re

import pytest


def test_loss_drift_runs_three_trajectories_that_start_equal(syn_yaml, capsys: pytest.CaptureFixture) -> None:
    from benchmarks import loss_drift as script  # tests may import scripts; the library may not

    assert script.main(["--data", str(syn_yaml), "--steps", "2", "--img", "64", "--batch-size", "1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"torch ops, 2 threads", "fused kernel, 2 threads", "torch ops, 1 thread"}
    losses = [float(c) for c in rows["torch ops, 2 threads"][:-1]]
    assert len(losses) == 2 and all(x > 0 for x in losses)  # steps 0 and 1 (the split's two images)
    for name in ("fused kernel, 2 threads", "torch ops, 1 thread"):
        first = float(rows[name][0])  # same weights, same batch: the first losses agree to float rounding
        assert abs(first) < 1e-4, (name, first)
        assert re.fullmatch(r"\s*\d\.\d\de[-+]\d\d\s*", rows[name][-1])  # an RMS over the steps


def test_cpu_kernel_ab_alternates_within_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each pair runs one step with the kernel and one without, the order alternating; the switch ends on."""
    from benchmarks import cpu_kernel_ab as script
    import models.norm_act_train as nat

    seen: list[bool] = []
    on, off = script.ab(lambda: seen.append(nat._enabled[0]), pairs=3, warmup=1)
    assert seen == [True, False, False, True, True, False, False, True]
    assert len(on) == len(off) == 3 and nat._enabled[0]


def test_cpu_kernel_ab_prints_a_row_per_norm(syn_yaml, capsys: pytest.CaptureFixture) -> None:
    from benchmarks import cpu_kernel_ab as script
    from models.norm_act_train import load_train_kernel

    if load_train_kernel() is None:
        pytest.skip("the fused CPU training kernel could not be built here")
    argv = ["--data", str(syn_yaml), "--norms", "bn", "in", "--pairs", "2", "--warmup", "0", "--img", "64",
            "--batch-size", "2"]
    assert script.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\| (bn|in) \|", line)]
    # median (quartile range) of the on / off ratios; with no warm-up on a busy machine one ratio can exceed 10
    ratio = r"\d+\.\d{3}"
    assert len(rows) == 2 and all(re.search(rf"\| {ratio} \({ratio}-{ratio}\) \|$", r) for r in rows)


def test_cpu_kernel_ab_quartiles_stay_inside_the_data() -> None:
    """statistics.quantiles' default ('exclusive') extrapolates past the data for few pairs: [0.5, 1.5] would give a
    lower quartile of 0.25; the printed range must lie within the measured ratios."""
    from benchmarks.cpu_kernel_ab import quartiles

    assert quartiles([0.5, 1.5]) == (0.75, 1.0, 1.25)
    assert quartiles([0.9]) == (0.9, 0.9, 0.9)
    lo, med, hi = quartiles([0.95, 0.97, 0.99, 1.01, 0.80])
    assert 0.80 <= lo <= med <= hi <= 1.01 and med == 0.97
