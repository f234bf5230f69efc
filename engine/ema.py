"""Exponential moving average of model weights (the weights that are validated and saved)."""
from __future__ import annotations

import math
from copy import deepcopy

import torch
import torch.nn as nn

from utils.dist import de_parallel


class ModelEMA:
    """Keep ``ema = d * ema + (1 - d) * model`` over every floating-point parameter and buffer.

    The decay ramps up as ``d = decay * (1 - exp(-updates / tau))``, so early on the average follows the fast-moving
    weights closely instead of being dominated by the random initialisation (as in YOLOv5 / timm ``ModelEmaV2``).
    Buffers (BN running statistics) are averaged too; integer buffers are copied.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0) -> None:
        self.ema = deepcopy(de_parallel(model)).eval()
        self.decay, self.tau, self.updates = decay, tau, updates
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay that the next ``update`` will use."""
        return self.decay * (1 - math.exp(-(self.updates + 1) / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the current weights of ``model`` into the average (call after each optimizer step)."""
        d = self.current_decay()
        self.updates += 1
        msd = de_parallel(model).state_dict()
        for k, v in self.ema.state_dict().items():
            src = msd[k].detach()
            if v.dtype.is_floating_point:
                v.lerp_(src.to(v.dtype), 1.0 - d)  # v += (1 - d) * (src - v)
            else:
                v.copy_(src)

    def update_attr(self, model: nn.Module, include: tuple[str, ...] = ("yaml", "names", "nc", "hyp")) -> None:
        """Copy plain attributes (names, config) from ``model`` so the EMA model is self-describing."""
        src = de_parallel(model)
        for k in include:
            if hasattr(src, k):
                setattr(self.ema, k, getattr(src, k))
