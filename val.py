"""Evaluate NormYOLO checkpoints with the COCO protocol (pycocotools COCOeval).

    python val.py --data cfg/data/coco128.yaml --weights runs/train/exp/weights/best.pt --img 640 --verbose

The evaluation itself is ``engine.evaluate.evaluate`` (training calls it every epoch); this script parses the
command line, loads the checkpoints and calls it. See docs/evaluation.md for what every number means.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from utils.general import LOGGER, ROOT, ConfigError, increment_path, run_cli, select_device, setup_logging
from utils.memory import retain_freed_memory


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate NormYOLO checkpoints with pycocotools COCOeval.")
    p.add_argument("--data", default=str(ROOT / "cfg/data/coco128.yaml"), help="dataset YAML")
    p.add_argument("--weights", nargs="+", required=True,
                   help="one or more .pt checkpoints or exported .onnx / .torchscript files, evaluated in turn")
    p.add_argument("--img", "--img-size", type=int, default=640, dest="img", help="inference size (pixels)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--conf-thres", type=float, default=0.001, help="confidence threshold")
    p.add_argument("--iou-thres", type=float, default=0.6, help="NMS IoU threshold")
    p.add_argument("--max-det", type=int, default=300, help="maximum detections per image")
    p.add_argument("--device", default="", help="cuda device, i.e. 0, or cpu")
    p.add_argument("--task", default="val", choices=("val", "test", "speed"), help="split to evaluate, or speed")
    p.add_argument("--workers", type=int, default=2, help="dataloader workers")
    p.add_argument("--save-json", action="store_true", help="write predictions.json (COCO results format)")
    p.add_argument("--save-txt", action="store_true", help="write labels/*.txt (class cx cy w h conf, normalised)")
    p.add_argument("--verbose", action="store_true", help="per-class rows in the table")
    p.add_argument("--half", action="store_true", help="FP16 inference (CUDA only)")
    p.add_argument("--project", default=str(ROOT / "runs/val"), help="save to project/name")
    p.add_argument("--name", default="exp", help="save to project/name")
    p.add_argument("--exist-ok", action="store_true", help="reuse project/name instead of incrementing")
    return p.parse_args(argv)


def main(opt: argparse.Namespace) -> dict[str, Any]:
    """Evaluate each of ``opt.weights`` in turn (own run folder each); returns the metrics of the last one."""
    from data.loader import create_dataloader, load_data_config
    from engine.backends import load_backend
    from engine.evaluate import evaluate

    setup_logging()
    device = select_device(opt.device)
    if device.type == "cpu":
        retain_freed_memory()  # utils/memory.py: large activations are reused, not page-faulted in again
    if opt.half and device.type != "cuda":
        raise ConfigError("--half needs a CUDA device (FP16 convolutions are not supported on CPU)")
    if opt.batch_size < 1 or opt.img < 32:
        raise ConfigError(f"--batch-size {opt.batch_size} / --img {opt.img}: expected >= 1 and >= 32")
    data = load_data_config(opt.data)
    split = "test" if opt.task == "test" else "val"
    if not data.get(split):
        raise ConfigError(f"{opt.data}: no '{split}' split to evaluate (--task {opt.task})")
    conf, iou = (0.25, 0.45) if opt.task == "speed" else (opt.conf_thres, opt.iou_thres)
    models = [(w, load_backend(w, device)) for w in opt.weights]  # read all first: a bad file fails before work
    img = input_size(opt.img, [m for _, m in models])
    dataloader, dataset = create_dataloader(data, split, img, opt.batch_size, augment=False, workers=opt.workers)
    # COCO-format data is scored against its own JSON file (the official reference), YOLO labels via coco_gt()
    gt = data[split] if data["format"] == "coco" else None
    metrics: dict[str, Any] = {}
    for w, model in models:
        if model.nc != len(dataset.names):
            raise ConfigError(f"weights '{w}' predict {model.nc} classes but {opt.data} has "
                              f"{len(dataset.names)}")
        save_dir = increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok)
        LOGGER.info(f"val: {w} ({model.kind}) on {opt.data} '{split}' ({len(dataset)} images) at {img} px -> "
                    f"{save_dir}")
        metrics = evaluate(model, dataloader, dataset, conf_thres=conf, iou_thres=iou, max_det=opt.max_det, gt=gt,
                           save_dir=save_dir, plots=opt.task != "speed", half=opt.half, verbose=opt.verbose,
                           save_json=opt.save_json and opt.task != "speed", save_txt=opt.save_txt,
                           info={"weights": str(w), "data": str(opt.data), "split": split, "save_dir": str(save_dir)})
        LOGGER.info(f"metrics written to {save_dir / 'metrics.json'}")
    return metrics


def input_size(img: int, backends: list[Any]) -> int:
    """--img rounded up to the largest stride; an exported file with a fixed input size imposes its own."""
    fixed = {b.fixed_shape for b in backends if b.fixed_shape is not None}
    if len(fixed) > 1 or any(h != w for h, w in fixed):
        raise ConfigError(f"the weights have different or non-square fixed input sizes {sorted(fixed)}; evaluate them "
                          "one at a time, or export with --dynamic")
    if fixed:
        size = fixed.pop()[0]
        if size != img:
            LOGGER.warning(f"--img {img}: the exported file takes {size}x{size} inputs only; evaluating at {size}")
        return size
    stride = max(b.stride for b in backends)
    size = -(-img // stride) * stride
    if size != img:
        LOGGER.warning(f"--img {img} is not a multiple of the stride {stride}: using {size}")
    return size


def cli(argv: list[str] | None = None) -> int:
    """Command-line entry: ConfigError -> 'error: ...' on stderr and exit code 2."""
    return run_cli(main, parse_opt, argv)


if __name__ == "__main__":
    sys.exit(cli())
