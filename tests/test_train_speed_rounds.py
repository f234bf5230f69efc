"""benchmarks/train_speed.py --rounds: ABBA order and per-round ratios (no timing: the rows are given)."""
from __future__ import annotations

import pytest


def test_rounds_alternate_order_and_ratios_are_per_round(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    from benchmarks import train_speed as script  # tests may import scripts; the library may not
    import engine.throughput as throughput

    calls: list[str] = []
    # a machine that slows down by 10 % per measurement: the order must not favour the norms measured first
    def fake(norm: str, *args, **kwargs) -> dict:
        calls.append(norm)
        speed = {"bn": 100.0, "gn:C/16": 100.0, "in": 80.0}[norm] * 0.9 ** (len(calls) - 1)
        return {"norm": norm, "images_per_s": speed, "warmup_s": 0.0, "amp": "off"}

    monkeypatch.setattr(throughput, "train_throughput", fake)
    assert script.main(["--data", "cfg/data/synthetic.yaml", "--norms", "bn", "gn:C/16", "in", "--rounds", "2"]) == 0
    assert calls == ["bn", "gn:C/16", "in", "in", "gn:C/16", "bn"]
    out = capsys.readouterr().out
    # round 0: gn 1/0.9, in 1/(0.8 * 0.81); round 1: gn 0.9 / 1 ... each against bn of the same round
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "1.111 / 0.900" in rows["gn:C/16"] and "1.543 / 1.012" in rows["in"]
    assert "GN/BN time ratio (median): 1.006" in out  # median of two = mean: (1.111 + 0.900) / 2


def test_cpu_kernels_both_measures_each_norm_with_and_without_the_kernel(monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture) -> None:
    from benchmarks import train_speed as script
    import engine.throughput as throughput
    import models.norm_act_train as nat

    calls: list[tuple[str, bool]] = []

    def fake(norm: str, *args, **kwargs) -> dict:  # the kernel makes bn 25 % and gn 10 % faster
        on = nat._enabled[0]
        calls.append((norm, on))
        speed = {"bn": 100.0, "gn:C/16": 90.0}[norm] * ({"bn": 1.25, "gn:C/16": 1.1}[norm] if on else 1.0)
        return {"norm": norm, "images_per_s": speed, "warmup_s": 0.0, "amp": "off"}

    monkeypatch.setattr(throughput, "train_throughput", fake)
    argv = ["--data", "cfg/data/synthetic.yaml", "--norms", "bn", "gn:C/16", "--cpu-kernels", "both", "--rounds", "2"]
    assert script.main(argv) == 0
    order = [("bn", True), ("bn", False), ("gn:C/16", True), ("gn:C/16", False)]
    assert calls == order + order[::-1]
    assert nat._enabled[0]  # switched back on afterwards
    out = capsys.readouterr().out
    assert "| bn/torch |" in out and "| gn:C/16/torch |" in out
    assert "bn: time with the fused CPU kernel / with torch's ops (median): 0.800" in out
    assert "gn:C/16: time with the fused CPU kernel / with torch's ops (median): 0.909" in out
