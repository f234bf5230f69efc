"""Evaluate NormYOLO checkpoints with the COCO protocol (pycocotools COCOeval).

    python val.py --data cfg/data/coco128.yaml --weights runs/train/exp/weights/best.pt --img 640 --verbose

Training calls ``run(model, dataloader, dataset)`` every epoch; ``main(opt)`` is the command line.
See docs/evaluation.md for what every number means.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from utils.boxes import non_max_suppression, xyxy_to_xywhn
from utils.coco_eval import CONF_GRID, confusion_matrix, detections_to_coco, evaluate, gt_counts, load_coco_gt
from utils.general import LOGGER, ConfigError, increment_path, run_cli, select_device, setup_logging

ROOT = Path(__file__).resolve().parent


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate NormYOLO checkpoints with pycocotools COCOeval.")
    p.add_argument("--data", default=str(ROOT / "cfg/data/coco128.yaml"), help="dataset YAML")
    p.add_argument("--weights", nargs="+", required=True, help="one or more checkpoints, evaluated in turn")
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # CUDA runs asynchronously: time only finished work
        torch.cuda.synchronize(device)


def _format_row(name: str, images: int, instances: int, p: float, r: float, ap50: float, ap: float) -> str:
    return f"{name:>22}{images:>11}{instances:>11}{p:>11.3g}{r:>11.3g}{ap50:>11.3g}{ap:>11.3g}"


def run(
    model: nn.Module,
    dataloader: Any,
    dataset: Any,
    *,
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    max_det: int = 300,
    save_dir: str | Path | None = None,
    plots: bool = False,
    half: bool = False,
    verbose: bool = False,
    save_json: bool = False,
    save_txt: bool = False,
    log_summary: bool = True,
    info: dict[str, Any] | None = None,
    gt: dict[str, Any] | str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on a letterboxed ``dataloader`` with COCOeval; the model is left as it was given.

    Args:
        model: a Model (fused or not, any device); switched to eval for the loop and restored afterwards.
        dataloader: yields ``(imgs (N, 3, H, W) 0..1, targets (M, 6), paths, metas)`` (docs/architecture.md).
        dataset: provides ``coco_gt()``, ``names`` and ``cat_ids``.
        save_dir: where metrics.json (and plots / predictions.json / labels when asked) go; None writes nothing.
        half: FP16 autocast on CUDA (ignored on CPU).
        verbose: per-class rows in the table.
        log_summary: log pycocotools' 12-line summary and the speed line (training may turn it off).
        info: extra plain values merged into the returned metrics (weights path, data file, ...).
        gt: the ground truth: a COCO JSON path (COCO-format data: the file itself is the reference) or dict;
            None = ``dataset.coco_gt()`` (built from the records, e.g. for YOLO-txt labels).
    Returns:
        metrics dict: mAP50, mAP50_95, precision, recall, best_conf, per_class, coco_stats, speed_ms
        {preprocess, inference, nms} (per image), images, instances, and the thresholds used.
    """
    device = next(model.parameters()).device
    # feed channels_last when the model's convs are (load_model does that on CPU): no per-layer conversions
    conv_w = next((m.weight for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels_last = (conv_w is not None and not conv_w.is_contiguous()
                     and conv_w.is_contiguous(memory_format=torch.channels_last))
    names = [str(n) for n in (getattr(dataset, "names", None) or model.names)]
    cat_ids = [int(c) for c in getattr(dataset, "cat_ids", range(len(names)))]
    gt_src = dataset.coco_gt() if gt is None else gt
    coco_gt = load_coco_gt(gt_src)  # a private copy: COCOeval adds keys to the annotations it reads
    gt_dict = coco_gt.dataset
    use_half = half and device.type == "cuda"
    save_dir = Path(save_dir) if save_dir is not None else None
    if save_dir is not None and save_txt:
        (save_dir / "labels").mkdir(parents=True, exist_ok=True)

    results: list[dict[str, Any]] = []
    seen, dt, shape = 0, [0.0, 0.0, 0.0], ()
    was_training = model.training
    model.eval()
    try:
        for bi, (imgs, targets, paths, metas) in enumerate(tqdm(dataloader, desc="val", leave=False,
                                                                  disable=not log_summary)):
            t0 = time.perf_counter()
            imgs = imgs.to(device, non_blocking=True)
            if channels_last:
                imgs = imgs.contiguous(memory_format=torch.channels_last)
            _sync(device)
            t1 = time.perf_counter()
            with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.float16,
                                                        enabled=use_half):
                out = model(imgs)
            out = out[0] if isinstance(out, (list, tuple)) else out
            _sync(device)
            t2 = time.perf_counter()
            dets = non_max_suppression(out.float(), conf_thres, iou_thres, multi_label=True, max_det=max_det)
            _sync(device)
            dt[0], dt[1], dt[2] = dt[0] + t1 - t0, dt[1] + t2 - t1, dt[2] + time.perf_counter() - t2
            seen += imgs.shape[0]
            shape = shape or tuple(imgs.shape)  # the full first batch, for the speed line
            for d, path, meta in zip(dets, paths, metas):
                # float64 so that un-letterboxing is exact to the printed digits
                d_orig = scale_boxes(d.detach().double().cpu(), meta)
                results.extend(detections_to_coco(d_orig, meta["image_id"], cat_ids))
                if save_dir is not None and save_txt:
                    _write_txt(save_dir / "labels" / f"{Path(path).stem}.txt", d_orig, meta["orig_shape"])
            if plots and save_dir is not None and bi == 0:
                _plot_batch0(imgs, targets, dets, paths, names, save_dir)
    finally:
        model.train(was_training)
    if seen == 0:
        raise ConfigError("validation: the dataloader yielded no images")

    m = evaluate(coco_gt, results, cat_ids)
    inst, img_counts = gt_counts(gt_dict, cat_ids)
    per_class = {}
    for j, c in enumerate(m.class_ids):
        key = names[c] if names[c] not in per_class else f"{names[c]}_{c}"
        per_class[key] = {"class": c, "images": int(img_counts[c]), "instances": int(inst[c]),
                          "precision": float(m.class_p[j]), "recall": float(m.class_r[j]),
                          "ap50": float(m.ap50[j]), "ap50_95": float(m.ap50_95[j])}
    speed = {k: 1000 * t / seen for k, t in zip(("preprocess", "inference", "nms"), dt)}
    metrics: dict[str, Any] = {
        "mAP50": m.map50, "mAP50_95": m.map50_95, "precision": m.precision, "recall": m.recall,
        "best_conf": m.best_conf, "per_class": per_class, "coco_stats": m.stats, "speed_ms": speed,
        "images": seen, "instances": int(inst.sum()), "detections": len(results),
        "conf_thres": conf_thres, "iou_thres": iou_thres, "max_det": max_det, "img_shape": list(shape[2:]),
        **(info or {}),
    }

    if log_summary:
        LOGGER.info(m.summary)
    LOGGER.info(f"{'Class':>22}{'Images':>11}{'Instances':>11}{'P':>11}{'R':>11}{'mAP50':>11}{'mAP50-95':>11}")
    LOGGER.info(_format_row("all", seen, int(inst.sum()), m.precision, m.recall, m.map50, m.map50_95))
    if verbose:
        for name, pc in per_class.items():
            LOGGER.info(_format_row(name, pc["images"], pc["instances"], pc["precision"], pc["recall"], pc["ap50"],
                                    pc["ap50_95"]))
    if log_summary:
        LOGGER.info(f"Speed: {speed['preprocess']:.1f}ms pre-process, {speed['inference']:.1f}ms inference, "
                    f"{speed['nms']:.1f}ms NMS per image at shape {shape}")

    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        if save_json:
            # The evaluated list itself is written, so pycocotools on this file reproduces mAP exactly.
            (save_dir / "predictions.json").write_text(json.dumps(results))
            metrics["predictions_json"] = str(save_dir / "predictions.json")
            if isinstance(gt_src, dict):  # in-memory ground truth: write it, so the numbers can be re-checked
                (save_dir / "ground_truth.json").write_text(json.dumps(gt_src))
            metrics["ground_truth"] = str(save_dir / "ground_truth.json") if isinstance(gt_src, dict) else str(gt_src)
        if plots:
            _plot_metrics(m, gt_dict, results, cat_ids, names, save_dir)
        (save_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def scale_boxes(d: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """(n, 6) detections in letterboxed pixels -> the same in original pixels (data.augment's exact inverse)."""
    from data.augment import scale_boxes_to_original

    return torch.as_tensor(scale_boxes_to_original(d, meta["ratio"], meta["pad"], meta["orig_shape"]))


def _write_txt(path: Path, d: torch.Tensor, orig_shape: tuple[int, int]) -> None:
    """YOLO label lines 'class cx cy w h conf', normalised to the original image."""
    h0, w0 = orig_shape
    xywhn = xyxy_to_xywhn(d[:, :4], w0, h0).tolist()
    lines = [f"{int(c)} {' '.join(f'{v:.6f}' for v in b)} {s:.5f}"
             for b, s, c in zip(xywhn, d[:, 4].tolist(), d[:, 5].tolist())]
    path.write_text("".join(ln + "\n" for ln in lines))


def _plot_batch0(imgs, targets, dets, paths, names, save_dir: Path) -> None:
    from utils.plots import plot_batch, targets_per_image

    h, w = imgs.shape[2:]
    plot_batch(imgs, targets_per_image(targets, len(imgs), h, w), names, save_dir / "val_batch0_labels.jpg", paths)
    shown = [d[d[:, 4] >= 0.25].cpu() for d in dets]  # the full conf-0.001 list would hide the image
    plot_batch(imgs, shown, names, save_dir / "val_batch0_pred.jpg", paths)


def _plot_metrics(m, gt, results, cat_ids, names, save_dir: Path) -> None:
    from utils.plots import plot_confusion_matrix, plot_metric_curve, plot_pr_curve

    cls_names = [names[c] for c in m.class_ids]
    plot_pr_curve(m.pr_curve, m.ap50, cls_names, save_dir / "PR_curve.png")
    plot_metric_curve(CONF_GRID, m.f1_curve, cls_names, save_dir / "F1_curve.png", ylabel="F1")
    plot_confusion_matrix(confusion_matrix(gt, results, cat_ids), names, save_dir / "confusion_matrix.png")


def load_model(weights: str | Path, device: torch.device, fuse: bool = True) -> nn.Module:
    """A checkpoint's model (EMA weights preferred), BN folded, channels_last on CPU (faster there, see
    benchmarks/inference.py), in eval mode. An unreadable checkpoint is a ConfigError naming it."""
    from utils.checkpoint import model_from_checkpoint

    model = model_from_checkpoint(weights, device=device, prefer_ema=True)
    model.eval()
    if fuse:
        model.fuse()
    if device.type == "cpu":
        model.to(memory_format=torch.channels_last)
    return model


def main(opt: argparse.Namespace) -> dict[str, Any]:
    """Evaluate each of ``opt.weights`` in turn (own run folder each); returns the metrics of the last one."""
    from data.loader import create_dataloader, load_data_config

    setup_logging()
    device = select_device(opt.device)
    if opt.half and device.type != "cuda":
        raise ConfigError("--half needs a CUDA device (FP16 convolutions are not supported on CPU)")
    if opt.batch_size < 1 or opt.img < 32:
        raise ConfigError(f"--batch-size {opt.batch_size} / --img {opt.img}: expected >= 1 and >= 32")
    data = load_data_config(opt.data)
    split = "test" if opt.task == "test" else "val"
    if not data.get(split):
        raise ConfigError(f"{opt.data}: no '{split}' split to evaluate (--task {opt.task})")
    conf, iou = (0.25, 0.45) if opt.task == "speed" else (opt.conf_thres, opt.iou_thres)
    models = [(w, load_model(w, device)) for w in opt.weights]  # read all first: a bad path fails before work
    stride = max(int(m.stride.max()) for _, m in models)
    img = -(-opt.img // stride) * stride
    if img != opt.img:
        LOGGER.warning(f"--img {opt.img} is not a multiple of the stride {stride}: using {img}")
    dataloader, dataset = create_dataloader(data, split, img, opt.batch_size, augment=False, workers=opt.workers)
    # COCO-format data is scored against its own JSON file (the official reference), YOLO labels via coco_gt()
    gt = data[split] if data["format"] == "coco" else None
    metrics: dict[str, Any] = {}
    for w, model in models:
        if model.model[-1].nc != len(dataset.names):
            raise ConfigError(f"checkpoint '{w}' predicts {model.model[-1].nc} classes but {opt.data} has "
                              f"{len(dataset.names)}")
        save_dir = increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok)
        LOGGER.info(f"val: {w} on {opt.data} '{split}' ({len(dataset)} images) at {img} px -> {save_dir}")
        metrics = run(model, dataloader, dataset, conf_thres=conf, iou_thres=iou, max_det=opt.max_det, gt=gt,
                      save_dir=save_dir, plots=opt.task != "speed", half=opt.half, verbose=opt.verbose,
                      save_json=opt.save_json and opt.task != "speed", save_txt=opt.save_txt,
                      info={"weights": str(w), "data": str(opt.data), "split": split, "save_dir": str(save_dir)})
        LOGGER.info(f"metrics written to {save_dir / 'metrics.json'}")
    return metrics


def cli(argv: list[str] | None = None) -> int:
    """Command-line entry: ConfigError -> 'error: ...' on stderr and exit code 2."""
    return run_cli(main, parse_opt, argv)


if __name__ == "__main__":
    sys.exit(cli())
