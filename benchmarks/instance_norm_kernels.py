"""Per-layer timings behind models/instance_norm_cpu.py's choice of InstanceNorm kernel on channels-last CPU input.

    python benchmarks/instance_norm_kernels.py                      # n model, 320 px, batch 16, bfloat16
    python benchmarks/instance_norm_kernels.py --dtype float32 --img 640 --batch-size 8

For every distinct IN input shape of the model, ms per call of each candidate of models/instance_norm_cpu.py: the
forward by torch's channels-last GroupNorm (one channel per group), by BatchNorm one image at a time, and by
GroupNorm through NCHW and back; the backward by BatchNorm one image at a time, by GroupNorm's NCHW backward (the
gradient's conversions included; the input's NCHW copy comes from the forward) and by torch's channels-last
GroupNorm backward. The last column is the module's per-image / NCHW choice (``kernel_path``); the channels-last
forward also serves bfloat16 maps of ``CL_MIN_HW`` pixels and more, within its precision guard. Run it on a quiet
machine; re-tune the thresholds from it.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CL = torch.channels_last


def best_ms(fn: Callable[[], object], reps: int = 10, rounds: int = 3) -> float:
    """The fastest of ``rounds`` averages of ``reps`` calls, in ms."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return 1000 * best


def model_shapes(cfg: str, img: int, batch: int) -> Counter:
    """(N, C, H, W) of every InstanceNorm2d input in one forward of the model -> how many layers see it."""
    from models.norm import InstanceNorm2d
    from models.yolo import Model

    model = Model(cfg, norm="in").to(memory_format=CL).eval()
    shapes: Counter = Counter()
    hooks = [m.register_forward_hook(lambda mod, inp, out: shapes.update([tuple(inp[0].shape)]))
             for m in model.modules() if isinstance(m, InstanceNorm2d)]
    with torch.no_grad():
        model(torch.zeros(batch, 3, img, img).contiguous(memory_format=CL))
    for h in hooks:
        h.remove()
    return shapes


def candidates(x: torch.Tensor, dy: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The candidate kernels of models/instance_norm_cpu.py for one (N, C, H, W) channels-last input x and incoming
    gradient dy, each with the layout conversions its path makes."""
    from models.instance_norm_cpu import (backward_nchw, backward_per_image, forward_channels_last, forward_nchw,
                                          forward_per_image)

    n, c, h, w = x.shape
    weight, bias = torch.rand(c) + 0.5, torch.randn(c)
    _, mean, rstd = forward_per_image(x, weight, bias, 1e-5)
    every, xc = [True, True, True], x.contiguous()  # the NCHW backward reuses the forward's NCHW copy
    return {
        "fwd channels-last": lambda: forward_channels_last(x, weight, bias, 1e-5),
        "fwd per-image": lambda: forward_per_image(x, weight, bias, 1e-5),
        "fwd nchw": lambda: forward_nchw(x.contiguous(), weight, bias, 1e-5),
        "bwd per-image": lambda: backward_per_image(dy, x, weight, mean, rstd, 1e-5),
        "bwd nchw": lambda: backward_nchw(dy, xc, weight, mean, rstd, every),
        "bwd channels-last": lambda: torch.ops.aten.native_group_norm_backward(dy, x, mean, rstd, weight, n, c, h * w,
                                                                               c, every),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cfg", default=str(ROOT / "cfg" / "models" / "yolo-n-bn.yaml"))
    p.add_argument("--img", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    opt = p.parse_args(argv)
    from engine.accel import set_cpu_threads
    from models.instance_norm_cpu import kernel_path

    set_cpu_threads()
    dtype = getattr(torch, opt.dtype)
    print(f"InstanceNorm kernels, {opt.dtype}, {torch.get_num_threads()} threads, ms per call "
          f"(n model at {opt.img} px, batch {opt.batch_size})")
    print("| shape (N, C, H, W) | layers | fwd channels-last | fwd per-image | fwd nchw | bwd per-image | bwd nchw "
          "| bwd channels-last | picked |\n|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for shape, count in sorted(model_shapes(opt.cfg, opt.img, opt.batch_size).items(), key=lambda t: -t[0][2]):
        x = torch.randn(*shape, dtype=dtype).contiguous(memory_format=CL)
        dy = torch.randn(*shape, dtype=dtype).contiguous(memory_format=CL)
        ms = [best_ms(fn, *((2, 1) if name == "bwd channels-last" else ()))
              for name, fn in candidates(x, dy).items()]
        picked = kernel_path(*shape[1:])
        print(f"| {shape} | {count} | " + " | ".join(f"{v:.3f}" for v in ms) + f" | {picked} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
