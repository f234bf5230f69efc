"""engine/optim.py and engine/ema.py: parameter groups, weight-decay scaling, warmup and decay, EMA."""
from __future__ import annotations

import math

import pytest
import torch

from models.norm import is_norm_layer
from models.yolo import Model
from engine.ema import ModelEMA
from utils.general import ROOT, ConfigError, load_yaml
from engine.optim import Schedule, accumulate_steps, build_optimizer, param_groups, scaled_weight_decay

HYP = load_yaml(ROOT / "cfg" / "hyp" / "scratch.yaml")


@pytest.mark.parametrize("cfg", ["yolo-n-bn.yaml", "yolo-n-gn.yaml"])
def test_norm_params_and_biases_get_no_decay(cfg: str) -> None:
    model = Model(ROOT / "cfg" / "models" / cfg, nc=2)
    groups = param_groups(model)
    norms = [m for m in model.modules() if is_norm_layer(m)]
    assert norms and {id(p) for p in groups["norm"]} == {id(m.weight) for m in norms}
    assert all(p.ndim == 4 for p in groups["decay"])  # only conv weights decay
    # every bias: the three Detect conv biases (Conv blocks have none before a norm) and every norm bias
    assert {id(p) for p in groups["bias"]} == {id(m.bias) for m in norms} | {id(m.bias) for m in model.modules()
                                                                           if isinstance(m, torch.nn.Conv2d)
                                                                           and m.bias is not None}
    assert len(groups["bias"]) == len(norms) + 3
    assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))
    opt = build_optimizer(model, "SGD", lr=0.01, momentum=0.937, weight_decay=5e-4)
    wd = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert wd == {"bias": 0.0, "decay": 5e-4, "norm": 0.0}
    assert opt.param_groups[0]["nesterov"] is True


@pytest.mark.parametrize("cfg", ["yolo-n-bn.yaml", "yolo-n-gn.yaml"])
def test_norm_bias_warms_up_from_warmup_bias_lr(cfg: str) -> None:
    """As in YOLOv5, every bias (norm biases included) starts the warmup at warmup_bias_lr; weights start at 0."""
    model = Model(ROOT / "cfg" / "models" / cfg, nc=2)
    opt = build_optimizer(model, "SGD", HYP["lr0"])
    Schedule(HYP, epochs=100, batches_per_epoch=50, batch_size=16).step(opt, epoch=0, ni=0)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    norm = next(m for m in model.modules() if is_norm_layer(m))
    assert lr_of[id(norm.bias)] == pytest.approx(HYP["warmup_bias_lr"]) == pytest.approx(0.1)
    assert lr_of[id(norm.weight)] == 0.0


def test_adamw_and_bad_name() -> None:
    model = Model(ROOT / "cfg" / "models" / "yolo-n-bn.yaml", nc=2)
    opt = build_optimizer(model, "adamw", lr=0.001, momentum=0.9, weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.9, 0.999)
    with pytest.raises(ConfigError, match="--optimizer"):
        build_optimizer(model, "lion")


def test_nominal_batch_accumulation_and_decay_scaling() -> None:
    assert [accumulate_steps(b) for b in (1, 8, 16, 24, 64, 128)] == [64, 8, 4, 3, 1, 1]
    assert scaled_weight_decay(5e-4, 16) == pytest.approx(5e-4)  # 16 * 4 = 64
    assert scaled_weight_decay(5e-4, 24) == pytest.approx(5e-4 * 72 / 64)
    assert scaled_weight_decay(5e-4, 128) == pytest.approx(1e-3)
    # --nbs 16: a batch of 16 steps every batch, a batch of 2 accumulates 8; decay is per 16 images
    assert [accumulate_steps(b, 16) for b in (2, 4, 16, 32)] == [8, 4, 1, 1]
    assert scaled_weight_decay(5e-4, 2, 16) == pytest.approx(5e-4)
    assert scaled_weight_decay(5e-4, 32, 16) == pytest.approx(1e-3)


def _opt() -> torch.optim.Optimizer:
    return build_optimizer(Model(ROOT / "cfg" / "models" / "yolo-n-bn.yaml", nc=2), "SGD", HYP["lr0"])


def test_warmup_then_linear_decay() -> None:
    opt = _opt()
    s = Schedule(HYP, epochs=100, batches_per_epoch=50, batch_size=16)
    assert s.nw == 150  # 3 warmup epochs of 50 batches
    s.step(opt, epoch=0, ni=0)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["bias"] == pytest.approx(HYP["warmup_bias_lr"]) and lrs["decay"] == 0.0
    assert opt.param_groups[0]["momentum"] == pytest.approx(HYP["warmup_momentum"])
    assert s.accumulate == 1  # accumulation ramps up with the warmup
    s.step(opt, epoch=2, ni=149)
    assert s.accumulate == 4
    s.step(opt, epoch=3, ni=150)
    expect = HYP["lr0"] * ((1 - 3 / 100) * (1 - HYP["lrf"]) + HYP["lrf"])
    assert all(g["lr"] == pytest.approx(expect) for g in opt.param_groups)
    assert opt.param_groups[1]["momentum"] == pytest.approx(HYP["momentum"])
    s.step(opt, epoch=99, ni=99 * 50)
    assert opt.param_groups[1]["lr"] == pytest.approx(HYP["lr0"] * (HYP["lrf"] + (1 - HYP["lrf"]) / 100))


def test_cosine_schedule_and_short_run_warmup() -> None:
    opt = _opt()
    s = Schedule(HYP, epochs=10, batches_per_epoch=5, batch_size=64, cos_lr=True)
    assert s.nw == 16  # 100-iteration minimum capped at a third of a 50-iteration run
    s.step(opt, epoch=5, ni=25)
    assert opt.param_groups[2]["lr"] == pytest.approx(HYP["lr0"] * (1 + HYP["lrf"]) / 2)
    assert s.accumulate == 1


def test_schedule_accumulates_to_the_given_nominal_batch() -> None:
    opt = _opt()
    s = Schedule(HYP, epochs=10, batches_per_epoch=400, batch_size=2, nominal=16)
    assert s.max_accumulate == 8
    s.step(opt, epoch=0, ni=0)
    assert s.accumulate == 1
    s.step(opt, epoch=0, ni=s.nw // 2)
    assert s.accumulate == round(1 + 7 / 2)  # ramps with the warmup, from 1 to 8
    s.step(opt, epoch=5, ni=s.nw + 1)
    assert s.accumulate == 8


def test_ema_follows_the_decay_ramp() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9, tau=1.0)
    w0 = ema.ema[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(2.0)
    d = 0.9 * (1 - math.exp(-1))
    ema.update(model)
    assert ema.updates == 1
    assert torch.allclose(ema.ema[0].weight, d * w0 + (1 - d) * model[0].weight)
    assert torch.allclose(ema.ema[1].running_mean, torch.full((2,), (1 - d) * 2.0))
    assert not ema.ema[0].weight.requires_grad and not ema.ema.training
