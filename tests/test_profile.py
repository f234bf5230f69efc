"""models/profile.py (and benchmarks/norm_layers.py's table): every Conv block hooked, each norm timed."""
from __future__ import annotations

import torch

from models.profile import bench, collect_shapes
from utils.general import ROOT


def test_norm_layer_benchmark_hooks_every_conv_block() -> None:
    from benchmarks import norm_layers as script  # tests may import scripts; the library may not

    shapes = collect_shapes(str(ROOT / "cfg/models/yolo-n-bn.yaml"), 64)
    assert sum(shapes.values()) == 57  # every Conv block of the n model (C3 inner convs included), by shape
    stem = next(s for s in shapes if s.c1 == 3)
    assert (stem.c2, stem.k, stem.s, stem.h, stem.w, stem.out_hw()) == (16, 6, 2, 64, 64, (32, 32))
    lines: list[str] = []
    rows = bench({stem: 1}, ["bn", "gn:C/16"], batch=2, reps=1, device=torch.device("cpu"), report=lines.append)
    assert len(lines) == 2 and "3->16" in lines[0] and "64x64" in lines[0]  # one line per (norm, layer shape)
    assert [r["norm"] for r in rows] == ["bn", "gn:C/16"]
    assert all(r["block_ms"] > 0 and r["alone_ms"] > 0 for r in rows)  # times themselves are machine noise
    table = script.format_table(rows, torch.device("cpu"), 2, 64)
    assert "| gn:C/16 |" in table and "| bn | " in table and table.count("\n") == 4
