"""Forward + backward time of each norm, alone and inside a Conv-Norm-Act block, at the model's real layer shapes.

The shapes are collected by hooking every Conv block of the model (default: the n model) on one image at --img;
each layer is then timed separately in train mode (the mode the BN-vs-GN question is about) and the times are
summed over the model's layers, so a row reads "what this norm costs per training step of this model". The
measuring is ``models.profile`` (``collect_shapes``, ``bench``); this script parses, calls it and prints tables.

    python benchmarks/norm_layers.py                       # n model, 320 px, batch 8, CPU (+ CUDA when present)
    python benchmarks/norm_layers.py --norms bn gn:C/16 --batch 16 --per-layer
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_NORMS = ["bn", "syncbn", "frozenbn", "gn:C/16", "gn:32", "ln", "in", "none"]


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
    from models.profile import bench, collect_shapes
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
        rows = bench(shapes, opt.norms, opt.batch, opt.reps, dev, print if opt.per_layer else None)
        tables.append(format_table(rows, dev, opt.batch, opt.img))
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
