"""engine/throughput.py: Capped cuts a loader, Repeated repeats its first batch; train_throughput counts the timed
images (warm-up pass excluded)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data.loader import load_data_config
from engine.throughput import Capped, Repeated, train_throughput
from test_train import make_dataset
from utils.general import ROOT
from utils.hyp import load_hyp


def test_capped_keeps_the_first_batches() -> None:
    c = Capped([10, 11, 12, 13], 3)
    assert len(c) == 3 and list(c) == [10, 11, 12] and c.sampler is None
    assert len(Capped([1], 5)) == 1


def test_repeated_yields_the_first_batch_n_times_on_every_pass() -> None:
    r = Repeated(iter([("a", 1), ("b", 2)]), 3)
    assert len(r) == 3 and r.sampler is None
    assert list(r) == [("a", 1)] * 3 and list(r) == [("a", 1)] * 3  # a second pass repeats it again


def test_train_throughput_counts_only_the_timed_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NORMYOLO_CACHE_DIR", str(tmp_path / "cache"))
    data = load_data_config(make_dataset(tmp_path / "data", n=8))
    hyp = load_hyp(ROOT / "cfg" / "hyp" / "scratch.yaml")
    res = train_throughput("gn:C/16", str(ROOT / "cfg" / "models" / "yolo-n-bn.yaml"), data, hyp,
                           torch.device("cpu"), img=64, batch_size=2, epochs=2, workers=0, max_batches=3)
    assert res["norm"] == "gn:C/16" and res["images"] == 2 * 3 * 2  # 2 timed passes x 3 batches x 2 images
    assert res["seconds"] > 0 and res["images_per_s"] == pytest.approx(res["images"] / res["seconds"])
    # the n model has 1,872,157 parameters with 80 classes; 2 classes shrink its 3 head convs (64, 128, 256 inputs)
    # from 255 to 21 outputs: (64 + 128 + 256 + 3 biases) * 234 fewer. GN keeps BN's parameter count.
    assert res["params"] == 1_872_157 - (64 + 128 + 256 + 3) * 234 == 1_766_623


def test_fixed_batch_times_the_step_on_one_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NORMYOLO_CACHE_DIR", str(tmp_path / "cache"))
    data = load_data_config(make_dataset(tmp_path / "data", n=8))
    hyp = load_hyp(ROOT / "cfg" / "hyp" / "scratch.yaml")
    res = train_throughput("bn", str(ROOT / "cfg" / "models" / "yolo-n-bn.yaml"), data, hyp, torch.device("cpu"),
                           img=64, batch_size=2, epochs=1, workers=0, max_batches=5, fixed_batch=True,
                           channels_last=False)
    assert res["images"] == 1 * 5 * 2 and res["warmup_s"] > 0  # 1 timed pass x 5 repeats x 2 images
