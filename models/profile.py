"""What each norm costs at a model's real layer shapes: forward + backward time of the norm alone and of the
Conv-Norm-Act block, per layer shape, summed over the model (benchmarks/norm_layers.py prints it)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from models.common import Conv, make_act
from models.norm import make_norm_builder
from models.yolo import Model
from utils.timing import timed


@dataclass(frozen=True)
class ConvShape:
    """One Conv block of the model: conv hyper-parameters and its input feature size."""

    c1: int
    c2: int
    k: int
    s: int
    p: int
    g: int
    h: int
    w: int

    def out_hw(self) -> tuple[int, int]:
        return ((self.h + 2 * self.p - self.k) // self.s + 1, (self.w + 2 * self.p - self.k) // self.s + 1)


def collect_shapes(cfg: str, img: int) -> Counter[ConvShape]:
    """Every Conv block's shape (with how many times it occurs) in one forward of `cfg` at img x img."""
    model = Model(cfg).eval()
    shapes: Counter[ConvShape] = Counter()

    def hook(m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        c = m.conv
        shapes[ConvShape(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0], c.groups,
                         inputs[0].shape[2], inputs[0].shape[3])] += 1

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, Conv)]
    with torch.no_grad():
        model(torch.zeros(1, 3, img, img))
    for h in handles:
        h.remove()
    return shapes


def time_fwd_bwd(module: nn.Module, x: torch.Tensor, reps: int) -> float:
    """Fastest of `reps` forward + backward passes (input and parameter gradients) in train mode, in seconds.

    The minimum, not the mean: other processes on a shared machine only ever add time.
    """
    module.train()
    grad = torch.randn_like(module(x))
    times = []
    for i in range(reps + 1):  # the first pass warms up the allocator and kernels
        xi = x.detach().requires_grad_(True)
        t = timed(lambda: module(xi).backward(grad), x.device)
        if i:
            times.append(t)
        module.zero_grad(set_to_none=True)
    return min(times)


def bench(shapes: Counter[ConvShape], norms: list[str], batch: int, reps: int, device: torch.device,
          report: Callable[[str], None] | None = None) -> list[dict]:
    """One row per norm: ms per model step for the norms alone and for the Conv-Norm-Act blocks; ``report``
    receives one line per (norm, layer shape) when given.

    Norms are interleaved within each layer shape, so a slow spell of the machine hits every norm alike.
    """
    builders = {spec: make_norm_builder(spec, where="--norms") for spec in norms}
    alone = dict.fromkeys(norms, 0.0)
    block = dict.fromkeys(norms, 0.0)
    for shp, count in shapes.items():
        oh, ow = shp.out_hw()
        x_norm = torch.randn(batch, shp.c2, oh, ow, device=device)
        x_conv = torch.randn(batch, shp.c1, shp.h, shp.w, device=device)
        for spec, builder in builders.items():
            torch.manual_seed(0)
            t_norm = time_fwd_bwd(builder(shp.c2).to(device), x_norm, reps)
            conv = nn.Conv2d(shp.c1, shp.c2, shp.k, shp.s, shp.p, groups=shp.g, bias=not builder.has_norm)
            t_blk = time_fwd_bwd(nn.Sequential(conv, builder(shp.c2), make_act("leakyrelu")).to(device), x_conv, reps)
            alone[spec] += count * t_norm
            block[spec] += count * t_blk
            if report is not None:
                report(f"  {spec:>9} {shp.c1:>4}->{shp.c2:<4} k{shp.k} s{shp.s} {shp.h}x{shp.w} x{count}: "
                       f"norm {1e3 * t_norm:7.2f} ms  block {1e3 * t_blk:7.2f} ms")
    return [{"norm": spec, "alone_ms": 1e3 * alone[spec], "block_ms": 1e3 * block[spec]} for spec in norms]
