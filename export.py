"""Export a NormYOLO checkpoint to ONNX and TorchScript, beside it, and check the files against PyTorch.

    python export.py --weights runs/train/exp/weights/best.pt --include onnx torchscript --img 320
    python export.py --weights best.pt --include onnx --dynamic --opset 17

BN / SyncBN / FrozenBN are folded into the convs; GN / LN / IN stay layers. Class names, stride and input size are
stored in the files, so ``val.py`` and ``detect.py`` run them as ``--weights best.onnx`` / ``best.torchscript``.
Needs ``pip install -r requirements-export.txt``. See docs/export.md.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from utils.general import run_cli, setup_logging


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Export a NormYOLO checkpoint to ONNX / TorchScript.")
    p.add_argument("--weights", required=True, help="the .pt checkpoint to export (its EMA weights)")
    p.add_argument("--include", nargs="+", default=["onnx", "torchscript"], help="formats: onnx, torchscript")
    p.add_argument("--img", "--img-size", type=int, default=None, dest="img",
                   help="square input size in pixels (default: the size the checkpoint trained at)")
    p.add_argument("--batch-size", type=int, default=1, help="batch size of a static ONNX file")
    p.add_argument("--dynamic", action="store_true", help="ONNX: free batch size and image size")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset")
    p.add_argument("--simplify-off", action="store_true",
                   help="ONNX: keep the exporter's graph (default: fold it with ONNX Runtime's basic optimizations)")
    p.add_argument("--source", default=None, help="image to check the files on (default: a built-in dataset image)")
    return p.parse_args(argv)


def main(opt: argparse.Namespace) -> dict[str, Any]:
    """Export and check; returns per format its path, size, time and max |exported - PyTorch|."""
    from engine.exporter import export_weights

    setup_logging()
    return export_weights(opt.weights, opt.include, img=opt.img, batch=opt.batch_size, dynamic=opt.dynamic,
                          opset=opt.opset, simplify=not opt.simplify_off, source=opt.source)


def cli(argv: list[str] | None = None) -> int:
    """'error: ...' and exit 2 for bad input (run_cli); exit 1 when an exported file disagrees with PyTorch."""
    from engine.exporter import ExportMismatch

    return run_cli(main, parse_opt, argv, failures=(ExportMismatch,))


if __name__ == "__main__":
    sys.exit(cli())
