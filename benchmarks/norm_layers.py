"""Forward + backward time of each norm, alone and inside a Conv-Norm-Act block, at the model's real layer shapes.

The shapes are collected by hooking every Conv block of the model (default: the n model) on one image at --img;
each layer is then timed separately in train mode (the mode the BN-vs-GN question is about) and the times are
summed over the model's layers, so a row reads "what this norm costs per training step of this model".

    python benchmarks/norm_layers.py                       # n model, 320 px, batch 8, CPU (+ CUDA when present)
    python benchmarks/norm_layers.py --norms bn gn:C/16 --batch 16 --per-layer
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_NORMS = ["bn", "syncbn", "frozenbn", "gn:C/16", "gn:32", "ln", "in", "none"]


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
    from models.common import Conv
    from models.yolo import Model

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
    from utils.timing import timed

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
          per_layer: bool = False) -> list[dict]:
    """One row per norm: ms per model step for the norms alone and for the Conv-Norm-Act blocks.

    Norms are interleaved within each layer shape, so a slow spell of the machine hits every norm alike.
    """
    from models.common import make_act
    from models.norm import make_norm_builder

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
            if per_layer:
                print(f"  {spec:>9} {shp.c1:>4}->{shp.c2:<4} k{shp.k} s{shp.s} {shp.h}x{shp.w} x{count}: "
                      f"norm {1e3 * t_norm:7.2f} ms  block {1e3 * t_blk:7.2f} ms")
    return [{"norm": spec, "alone_ms": 1e3 * alone[spec], "block_ms": 1e3 * block[spec]} for spec in norms]


def format_table(rows: list[dict], device: torch.device, batch: int, img: int) -> str:
    """Markdown table; ratios are against the first norm listed (bn by default)."""
    ref = rows[0]
    out = [f"device {device}, batch {batch}, {img} px, forward + backward per training step, summed over layers",
           f"| norm | norm alone ms | ×{ref['norm']} | Conv-Norm-Act ms | ×{ref['norm']} |",
           "|---|---:|---:|---:|---:|"]
    for r in rows:
        ra = r["alone_ms"] / ref["alone_ms"] if ref["alone_ms"] > 0 else float("nan")
        rb = r["block_ms"] / ref["block_ms"]
        out.append(f"| {r['norm']} | {r['alone_ms']:.1f} | {ra:.2f} | {r['block_ms']:.1f} | {rb:.2f} |")
    return "\n".join(out)


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cfg", default=str(ROOT / "cfg/models/yolo-n-bn.yaml"), help="model whose layer shapes are used")
    p.add_argument("--img", type=int, default=320)
    p.add_argument("--batch", type=int, default=8, help="images per step")
    p.add_argument("--norms", nargs="+", default=DEFAULT_NORMS, help="norm specs; the first is the ratio baseline")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per layer (the fastest counts)")
    p.add_argument("--device", choices=["all", "cpu", "cuda"], default="all", help="all = CPU, and CUDA when present")
    p.add_argument("--per-layer", action="store_true", help="also print every layer's times")
    return p.parse_args(argv)


def main(opt: argparse.Namespace) -> list[str]:
    """Print (and return) one table per device."""
    from models.norm import make_norm_builder
    from utils.general import ConfigError

    if opt.img % 32 or opt.batch < 1 or opt.reps < 1:
        raise ConfigError("--img must be a multiple of 32, --batch and --reps >= 1")
    if opt.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine")
    for spec in opt.norms:  # bad specs stop before the model is built
        make_norm_builder(spec, where="--norms")
    devices = [torch.device("cpu")] if opt.device in ("all", "cpu") else []
    if opt.device in ("all", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda:0"))
    shapes = collect_shapes(opt.cfg, opt.img)
    print(f"{Path(opt.cfg).name}: {sum(shapes.values())} Conv-Norm-Act blocks, {len(shapes)} distinct shapes at "
          f"{opt.img} px; threads {torch.get_num_threads()}")
    tables = []
    for dev in devices:
        tables.append(format_table(bench(shapes, opt.norms, opt.batch, opt.reps, dev, opt.per_layer),
                                   dev, opt.batch, opt.img))
        print(tables[-1], flush=True)
    return tables


if __name__ == "__main__":
    if str(ROOT) not in sys.path:  # run as a script from anywhere
        sys.path.insert(0, str(ROOT))
    from utils.general import ConfigError

    try:
        main(parse_opt())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
