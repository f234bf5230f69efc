"""Optimizer parameter groups, nominal-batch accumulation, warmup and LR / momentum schedules."""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from models.norm import is_norm_layer
from utils.general import ConfigError
from utils.hyp import OPTIMIZERS

NOMINAL_BATCH = 64  # gradients are accumulated up to this many images per optimizer step


def param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Split parameters into ``decay`` (conv / linear weights), ``norm`` (norm-layer weights) and ``bias`` (every
    bias, norm-layer biases included, and other 0-/1-d parameters). Only ``decay`` gets weight decay.

    Norm layers are recognised with ``models.norm.is_norm_layer`` rather than class names, so BN, SyncBN, GN,
    LN and IN all land in the no-decay groups (decaying GN's affine weights is what broke YOLOv5 + GN). Norm biases
    join the ``bias`` group, as in YOLOv5: they warm up from ``warmup_bias_lr`` like every other bias.
    """
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "norm": [], "bias": []}
    seen: set[int] = set()
    for module in model.modules():
        norm = is_norm_layer(module)
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if name == "bias":
                groups["bias"].append(p)
            elif norm:
                groups["norm"].append(p)
            elif p.ndim <= 1:
                groups["bias"].append(p)
            else:
                groups["decay"].append(p)
    return groups


def build_optimizer(model: nn.Module, name: str = "SGD", lr: float = 0.01, momentum: float = 0.937,
                    weight_decay: float = 5e-4) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW over the three groups of :func:`param_groups`.

    Each param group carries a ``name`` key ('bias', 'decay', 'norm') so the warmup can find the bias group
    after a resume without relying on group order.
    """
    g = param_groups(model)
    lookup = {o.lower(): o for o in OPTIMIZERS}
    if name.lower() not in lookup:
        raise ConfigError(f"--optimizer {name}: expected one of {', '.join(OPTIMIZERS)}")
    name = lookup[name.lower()]
    if name == "SGD":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            [{"params": g["bias"], "name": "bias"}], lr=lr, momentum=momentum, nesterov=True, weight_decay=0.0)
    else:
        opt = torch.optim.AdamW([{"params": g["bias"], "name": "bias"}], lr=lr, betas=(momentum, 0.999),
                                weight_decay=0.0)
    opt.add_param_group({"params": g["decay"], "weight_decay": weight_decay, "name": "decay"})
    opt.add_param_group({"params": g["norm"], "weight_decay": 0.0, "name": "norm"})
    return opt


def accumulate_steps(batch_size: int, nominal: int = NOMINAL_BATCH) -> int:
    """Batches to accumulate per optimizer step so that ``batch_size * accumulate ≈ nominal``."""
    return max(round(nominal / batch_size), 1)


def scaled_weight_decay(weight_decay: float, batch_size: int, nominal: int = NOMINAL_BATCH) -> float:
    """Weight decay scaled by the effective batch ``batch_size * accumulate / nominal``.

    SGD applies decay once per step, so with an effective batch that differs from the nominal one the
    per-image regularisation would change; scaling keeps it fixed.
    """
    return weight_decay * batch_size * accumulate_steps(batch_size, nominal) / nominal


def lr_lambda(epochs: int, lrf: float, cos: bool = False) -> Callable[[float], float]:
    """Multiplier of lr0 at (fractional) epoch x: linear or cosine from 1 at x = 0 to ``lrf`` at x = epochs."""
    if cos:
        return lambda x: ((1 - math.cos(x * math.pi / epochs)) / 2) * (lrf - 1) + 1
    return lambda x: (1 - x / epochs) * (1.0 - lrf) + lrf


class Schedule:
    """Per-iteration LR, momentum and accumulation, with a warmup then per-epoch decay.

    During warmup (first ``nw`` iterations) the bias LR falls from ``warmup_bias_lr`` to the scheduled LR (a large
    bias LR lets the objectness biases find the low prior quickly) while the other groups rise from 0; SGD momentum
    rises from ``warmup_momentum`` to ``momentum``, and accumulation ramps from 1 batch to the nominal count.

    Args:
        hyp: needs ``lr0``, ``lrf``, ``momentum``, ``warmup_epochs``, ``warmup_momentum``, ``warmup_bias_lr``.
        epochs: planned epochs; batches_per_epoch: iterations per epoch on this rank; batch_size: total batch.
        nominal: images per optimizer step that gradient accumulation aims for (``--nbs``).
    """

    def __init__(self, hyp: dict[str, Any], epochs: int, batches_per_epoch: int, batch_size: int,
                 cos_lr: bool = False, min_warmup_iters: int = 100, nominal: int = NOMINAL_BATCH) -> None:
        self.hyp, self.epochs, self.nb = hyp, epochs, batches_per_epoch
        self.lf = lr_lambda(epochs, float(hyp["lrf"]), cos_lr)
        nw = max(round(float(hyp["warmup_epochs"]) * batches_per_epoch), min_warmup_iters)
        # never spend more than a third of a (tiny) run warming up
        self.nw = min(nw, epochs * batches_per_epoch // 3) if float(hyp["warmup_epochs"]) > 0 else 0
        self.max_accumulate = accumulate_steps(batch_size, nominal)
        self.nominal = nominal
        self.accumulate = self.max_accumulate
        self.batch_size = batch_size

    def step(self, optimizer: torch.optim.Optimizer, epoch: int, ni: int) -> None:
        """Set each group's lr (and momentum) for global iteration ``ni`` in ``epoch``; updates ``accumulate``."""
        lr0, f = float(self.hyp["lr0"]), self.lf(epoch)
        if ni < self.nw:
            xi = [0, self.nw]
            self.accumulate = max(1, int(np.interp(ni, xi, [1, self.nominal / self.batch_size]).round()))
            self.accumulate = min(self.accumulate, self.max_accumulate)
            for g in optimizer.param_groups:
                start = float(self.hyp["warmup_bias_lr"]) if g.get("name") == "bias" else 0.0
                g["lr"] = float(np.interp(ni, xi, [start, lr0 * f]))
                self._set_momentum(g, float(np.interp(ni, xi, [float(self.hyp["warmup_momentum"]),
                                                               float(self.hyp["momentum"])])))
        else:
            self.accumulate = self.max_accumulate
            for g in optimizer.param_groups:
                g["lr"] = lr0 * f
                self._set_momentum(g, float(self.hyp["momentum"]))

    @staticmethod
    def _set_momentum(group: dict, m: float) -> None:
        if "momentum" in group:
            group["momentum"] = m
        elif "betas" in group:
            group["betas"] = (m, group["betas"][1])
