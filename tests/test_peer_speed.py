"""benchmarks/peer_speed.py's training table, with the timed runs faked (no YOLOv5 needed): NormYOLO's CPU kernels
are built before the first timed run, and the per-round ratio is the per-epoch difference of the two runs."""
from __future__ import annotations

import pytest


def test_kernels_built_untimed_first_and_ratio_per_round(tmp_path, monkeypatch, capsys: pytest.CaptureFixture):
    from benchmarks import peer_speed as script  # tests may import scripts; the library may not

    coco = tmp_path / "coco128"
    (coco / "images" / "train2017").mkdir(parents=True)
    for i in range(4):
        (coco / "images" / "train2017" / f"{i}.jpg").write_bytes(b"")
    # NormYOLO 2 s per epoch, YOLOv5 3 s, start-up 10 s / 20 s: ratio 1.5 in every round
    wall = {("normyolo", 1): 12.0, ("normyolo", 4): 18.0, ("yolov5", 1): 23.0, ("yolov5", 4): 32.0}
    calls: list[str] = []

    def fake_timed(argv, cwd, env, log):
        if "-c" in argv:
            calls.append("kernels")
            return 31.0
        side = "normyolo" if "cfg/data/coco128.yaml" in argv else "yolov5"
        calls.append(side)
        return wall[side, int(argv[argv.index("--epochs") + 1])]

    monkeypatch.setattr(script, "timed", fake_timed)
    opt = script.parse_opt(["--yolov5", str(tmp_path), "--python", "py", "--coco128", str(coco), "--rounds", "2"])
    (tmp_path / "out").mkdir()
    script.print_training(opt, tmp_path / "out", coco)
    assert calls[0] == "kernels" and calls.count("kernels") == 1 and len(calls) == 1 + 2 * 2 * 2
    assert calls[1:5] == ["normyolo", "yolov5", "normyolo", "yolov5"]  # round 0: NormYOLO first
    assert calls[5:9] == ["yolov5", "normyolo", "yolov5", "normyolo"]  # round 1: YOLOv5 first
    out = capsys.readouterr().out
    assert "untimed: 31.0 s" in out
    assert "| 0 | 2.00 | 2.0 | 3.00 | 1.3 | 1.50x |" in out and "median of 2: 1.50x" in out
