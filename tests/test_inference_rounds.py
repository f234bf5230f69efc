"""benchmarks/inference.py --rounds: warm-up first, ABBA order, per-round ratios (no timing: a fake clock)."""
from __future__ import annotations

import pytest


def test_rounds_warm_up_alternate_and_compare_within_a_round(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    from benchmarks import inference as script  # tests may import scripts; the library may not

    timed: list[int] = []

    # ms/image by parameter count (each norm's model differs), times a machine that slows by 10 % per timing
    def fake(model, x, warmup, iters) -> float:
        timed.append(sum(p.numel() for p in model.parameters()))
        return 10.0 * 1.1 ** (len(timed) - 1) * (2.0 if any("GroupNorm" in type(m).__name__
                                                          for m in model.modules()) else 1.0)

    monkeypatch.setattr(script, "time_model", fake)
    opt = script.parse_opt(["--norms", "bn", "gn:C/16", "--sizes", "64", "--batches", "1", "--fused-only",
                            "--no-ort", "--rounds", "2", "--warmup", "0", "--min-images", "1", "--min-iters", "1"])
    rows = script.main(opt)
    out = capsys.readouterr().out
    # warm-up (1 timing), then per setting two timings (contiguous, channels-last): bn gn | gn bn
    assert len(timed) == 1 + 2 * 4
    assert [r["norm"] for r in rows] == ["bn", "gn:C/16", "gn:C/16", "bn"]
    assert [r["round"] for r in rows] == [0, 0, 1, 1]
    # the smaller of each setting's two timings: bn 1.1, gn 2 * 1.1^3 | gn 2 * 1.1^5, bn 1.1^7 (x 10 ms)
    ratios = script.round_ratios(rows, opt.norms)[("gn:C/16", 64, 1)]
    assert ratios == pytest.approx([2 * 1.1 ** 2, 2 * 1.1 ** -2])
    assert "2.420 / 1.653   median 2.036" in out  # against the pure 2.0, a 21 % drift leaves 1.8 %
