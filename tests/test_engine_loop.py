"""engine/loop.py: non-finite steps are skipped and counted, accumulation counts optimizer steps across epochs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.general import ROOT


class _NaNSometimes:
    """Wraps ComputeLoss and turns the loss of the listed calls into NaN."""

    def __init__(self, inner, bad: set[int]) -> None:
        self.inner, self.bad, self.calls = inner, bad, 0

    def __call__(self, preds, targets):
        loss, items = self.inner(preds, targets)
        self.calls += 1
        if self.calls - 1 in self.bad:
            return loss * float("nan"), items * float("nan")
        return loss, items


def test_nonfinite_steps_are_skipped_then_stop() -> None:
    from models.loss import ComputeLoss
    from models.yolo import Model
    from engine.ema import ModelEMA
    from engine.loop import TrainingDiverged, train_one_epoch
    from utils.general import load_yaml
    from engine.optim import Schedule, build_optimizer

    torch.manual_seed(0)
    hyp = load_yaml(ROOT / "cfg" / "hyp" / "scratch.yaml")
    model = Model(ROOT / "cfg" / "models" / "yolo-n-bn.yaml", nc=2)
    batch = (torch.rand(2, 3, 64, 64), torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.3]]), ["a", "b"], [{}, {}])
    loader = [batch] * 6
    opt = build_optimizer(model, "SGD", hyp["lr0"])
    sched = Schedule(hyp, epochs=1, batches_per_epoch=6, batch_size=32)  # accumulate 2
    ema = ModelEMA(model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = _NaNSometimes(ComputeLoss(model, hyp, 64), bad={1, 2})
    res = train_one_epoch(model, loader, loss, opt, sched, ema, scaler, torch.device("cpu"), 0, 1, img_size=64,
                          amp=False, main=False, nonfinite_limit=3)
    assert res["nonfinite"] == 2 and res["images"] == 12
    assert all(np.isfinite(res["loss"]))  # averages only over the good batches
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert ema.updates == 3  # steps after batches 0, 4 and 5; the one due after the skipped batch 2 is dropped
    bad_all = _NaNSometimes(ComputeLoss(model, hyp, 64), bad=set(range(6)))
    with pytest.raises(TrainingDiverged, match="3 non-finite losses in a row"):
        train_one_epoch(model, loader, bad_all, opt, sched, ema, scaler, torch.device("cpu"), 0, 1, img_size=64,
                        amp=False, main=False, nonfinite_limit=3)


def test_accumulation_counts_optimizer_steps_across_epochs() -> None:
    """Two epochs of 3 batches, accumulate 2: steps after global batches 1, 3 and 5 (the final flush). The batch
    left over at the end of epoch 0 carries into epoch 1 instead of stepping, and epoch 1 does not open with a step
    on one batch's gradient (the old per-epoch counter made 4 steps here)."""
    from models.loss import ComputeLoss
    from models.yolo import Model
    from engine.loop import train_one_epoch
    from utils.general import load_yaml
    from engine.optim import Schedule, build_optimizer

    torch.manual_seed(0)
    hyp = {**load_yaml(ROOT / "cfg" / "hyp" / "scratch.yaml"), "warmup_epochs": 0.0}
    model = Model(ROOT / "cfg" / "models" / "yolo-n-bn.yaml", nc=2)
    batch = (torch.rand(2, 3, 64, 64), torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.3]]), ["a", "b"], [{}, {}])
    opt = build_optimizer(model, "SGD", hyp["lr0"])
    sched = Schedule(hyp, epochs=2, batches_per_epoch=3, batch_size=32)
    assert sched.nw == 0 and sched.max_accumulate == 2
    calls = []
    real_step = opt.step
    opt.step = lambda *a, **k: (calls.append(1), real_step(*a, **k))[1]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = ComputeLoss(model, hyp, 64)
    accum = {"last_step": -1, "pending": 0}
    kw = dict(img_size=64, amp=False, main=False, accum=accum)
    r0 = train_one_epoch(model, [batch] * 3, loss, opt, sched, None, scaler, torch.device("cpu"), 0, 2, flush=False,
                         **kw)
    assert r0["steps"] == 1 and accum == {"last_step": 1, "pending": 1}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())  # carried, not lost
    r1 = train_one_epoch(model, [batch] * 3, loss, opt, sched, None, scaler, torch.device("cpu"), 1, 2, flush=True,
                         **kw)
    assert r1["steps"] == 2 and len(calls) == 3 and accum == {"last_step": 5, "pending": 0}
