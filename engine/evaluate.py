"""Evaluation as a library: ``evaluate(model, dataloader, dataset)`` scores a model with pycocotools COCOeval.

Training calls it every epoch, ``val.py`` once per checkpoint. See docs/evaluation.md for what every number means.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from tqdm import tqdm

from data.augment import scale_boxes_to_original
from engine.backends import Backend, as_backend
from utils.boxes import label_lines, non_max_suppression
from utils.coco_eval import CONF_GRID, CocoMetrics, confusion_matrix, detections_to_coco, gt_counts, load_coco_gt
from utils.coco_eval import evaluate as coco_evaluate
from utils.general import LOGGER, ConfigError
from utils.plots import plot_batch, plot_confusion_matrix, plot_metric_curve, plot_pr_curve, targets_per_image
from utils.timing import sync

# called with the first batch: (imgs (N, 3, H, W) 0..1, per-image detections (n, 6) in its pixels, paths)
Batch0Hook = Callable[[torch.Tensor, list[torch.Tensor], list[str]], None]
TABLE_HEADER = f"{'Class':>22}{'Images':>11}{'Instances':>11}{'P':>11}{'R':>11}{'mAP50':>11}{'mAP50-95':>11}"


def _format_row(name: str, images: int, instances: int, p: float, r: float, ap50: float, ap: float) -> str:
    return f"{name:>22}{images:>11}{instances:>11}{p:>11.3g}{r:>11.3g}{ap50:>11.3g}{ap:>11.3g}"


def scale_boxes(d: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """(n, 6) detections in letterboxed pixels -> the same in original pixels (data.augment's exact inverse)."""
    return torch.as_tensor(scale_boxes_to_original(d, meta["ratio"], meta["pad"], meta["orig_shape"]))


def _predict(model: Backend, dataloader: Any, cat_ids: list[int], *, conf_thres: float, iou_thres: float,
             max_det: int, use_half: bool, progress: bool, labels_dir: Path | None,
             plot: tuple[list[str], Path] | None, on_batch0: Batch0Hook | None = None
             ) -> tuple[list[dict[str, Any]], int, list[float], tuple]:
    """Run the model over the loader; returns (COCO results, images seen, [pre, inference, nms] seconds, shape)."""
    device, channels_last = model.device, model.channels_last
    if labels_dir is not None:
        labels_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    seen, dt, shape = 0, [0.0, 0.0, 0.0], ()
    for bi, (imgs, targets, paths, metas) in enumerate(tqdm(dataloader, desc="val", leave=False,
                                                              disable=not progress)):
        t0 = time.perf_counter()
        imgs = imgs.to(device, non_blocking=True)
        if channels_last:
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        sync(device)
        t1 = time.perf_counter()
        with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.float16,
                                                    enabled=use_half):
            out = model(imgs)
        sync(device)
        t2 = time.perf_counter()
        dets = non_max_suppression(out.float(), conf_thres, iou_thres, multi_label=True, max_det=max_det)
        sync(device)
        dt[0], dt[1], dt[2] = dt[0] + t1 - t0, dt[1] + t2 - t1, dt[2] + time.perf_counter() - t2
        seen += imgs.shape[0]
        shape = shape or tuple(imgs.shape)  # the full first batch, for the speed line
        for d, path, meta in zip(dets, paths, metas):
            # float64 so that un-letterboxing is exact to the printed digits
            d_orig = scale_boxes(d.detach().double().cpu(), meta)
            results.extend(detections_to_coco(d_orig, meta["image_id"], cat_ids))
            if labels_dir is not None:
                (labels_dir / f"{Path(path).stem}.txt").write_text(label_lines(d_orig, meta["orig_shape"]))
        if plot is not None and bi == 0:
            _plot_batch0(imgs, targets, dets, paths, *plot)
        if on_batch0 is not None and bi == 0:
            on_batch0(imgs, dets, paths)
    return results, seen, dt, shape


def _per_class(m: CocoMetrics, gt_dict: dict[str, Any], cat_ids: list[int], names: list[str]
               ) -> tuple[dict[str, dict[str, Any]], int]:
    """Per-class rows keyed by name (``name_i`` when two classes share a name) and the total instance count."""
    inst, img_counts = gt_counts(gt_dict, cat_ids)
    per_class: dict[str, dict[str, Any]] = {}
    for j, c in enumerate(m.class_ids):
        key = names[c] if names[c] not in per_class else f"{names[c]}_{c}"
        per_class[key] = {"class": c, "images": int(img_counts[c]), "instances": int(inst[c]),
                          "precision": float(m.class_p[j]), "recall": float(m.class_r[j]),
                          "ap50": float(m.ap50[j]), "ap50_95": float(m.ap50_95[j])}
    return per_class, int(inst.sum())


def _metrics(m: CocoMetrics, per_class: dict[str, Any], instances: int, seen: int, dt: list[float], shape: tuple,
             detections: int) -> dict[str, Any]:
    """The metrics.json content (thresholds and ``info`` are added by the caller); speeds in ms per image."""
    return {"mAP50": m.map50, "mAP50_95": m.map50_95, "precision": m.precision, "recall": m.recall,
            "best_conf": m.best_conf, "per_class": per_class, "coco_stats": m.stats,
            "speed_ms": {k: 1000 * t / seen for k, t in zip(("preprocess", "inference", "nms"), dt)},
            "images": seen, "instances": instances, "detections": detections}


def _log_table(m: CocoMetrics, metrics: dict[str, Any], *, verbose: bool, log_summary: bool) -> None:
    if log_summary:
        LOGGER.info(m.summary)
    LOGGER.info(TABLE_HEADER)
    LOGGER.info(_format_row("all", metrics["images"], metrics["instances"], m.precision, m.recall, m.map50,
                            m.map50_95))
    if verbose:
        for name, pc in metrics["per_class"].items():
            LOGGER.info(_format_row(name, pc["images"], pc["instances"], pc["precision"], pc["recall"], pc["ap50"],
                                    pc["ap50_95"]))
    if log_summary:
        speed, shape = metrics["speed_ms"], metrics["_shape"]
        LOGGER.info(f"Speed: {speed['preprocess']:.1f}ms pre-process, {speed['inference']:.1f}ms inference, "
                    f"{speed['nms']:.1f}ms NMS per image at shape {shape}")


@contextmanager
def _eval_mode(model: nn.Module | Backend) -> Iterator[None]:
    """An nn.Module in eval mode for the block, then back in the mode it was given in (a Backend is left alone)."""
    if not isinstance(model, nn.Module):
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def evaluate(
    model: nn.Module | Backend,
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
    on_batch0: Batch0Hook | None = None,
    area_breakdown: bool = True,
) -> dict[str, Any]:
    """Evaluate ``model`` on a letterboxed ``dataloader`` with COCOeval; the model is left as it was given.

    ``model``: an nn.Module (fused or not, any device; eval for the loop, its mode restored after) or an
    ``engine.backends.Backend`` (a .pt, .onnx or .torchscript file loaded by ``load_backend``). ``dataloader`` yields
    ``(imgs (N, 3, H, W) 0..1, targets (M, 6), paths, metas)``; ``dataset`` gives ``coco_gt()``, ``names``,
    ``cat_ids``. ``save_dir``: metrics.json (and plots / predictions.json / labels when asked); None writes nothing.
    ``half``: FP16 autocast on CUDA only. ``log_summary``: pycocotools' 12-line summary and the speed line.
    ``info``: plain values merged into the result. ``gt``: a COCO JSON path (COCO data: the file is the reference)
    or dict; None = ``dataset.coco_gt()`` (built from the records, e.g. for YOLO-txt labels). ``on_batch0``: called
    with the first batch and its detections (training's TensorBoard image). ``area_breakdown=False``: COCO's area
    range 'all' only (same mAP, its small / medium / large stats read -1; one of COCOeval's four area passes).

    Returns the metrics: mAP50, mAP50_95, precision, recall, best_conf, per_class, coco_stats, speed_ms
    {preprocess, inference, nms} (ms per image), images, instances, detections and the thresholds used.
    """
    backend = as_backend(model)
    names = [str(n) for n in (getattr(dataset, "names", None) or backend.names)]
    cat_ids = [int(c) for c in getattr(dataset, "cat_ids", range(len(names)))]
    gt_src = dataset.coco_gt() if gt is None else gt
    coco_gt = load_coco_gt(gt_src)  # a private copy: COCOeval adds keys to the annotations it reads
    save_dir = Path(save_dir) if save_dir is not None else None
    labels_dir = save_dir / "labels" if save_dir is not None and save_txt else None
    with _eval_mode(model):
        results, seen, dt, shape = _predict(
            backend, dataloader, cat_ids, conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det,
            use_half=half and backend.device.type == "cuda", progress=log_summary, labels_dir=labels_dir,
            plot=(names, save_dir) if plots and save_dir is not None else None, on_batch0=on_batch0)
    if seen == 0:
        raise ConfigError("validation: the dataloader yielded no images")

    m = coco_evaluate(coco_gt, results, cat_ids, area_breakdown=area_breakdown)
    per_class, instances = _per_class(m, coco_gt.dataset, cat_ids, names)
    metrics = {**_metrics(m, per_class, instances, seen, dt, shape, len(results)),
               "conf_thres": conf_thres, "iou_thres": iou_thres, "max_det": max_det, "img_shape": list(shape[2:]),
               **(info or {})}
    _log_table(m, {**metrics, "_shape": shape}, verbose=verbose, log_summary=log_summary)
    if save_dir is not None:
        _save_outputs(save_dir, metrics, m, coco_gt.dataset, gt_src, results, cat_ids, names, save_json=save_json,
                      plots=plots)
    return metrics


def _save_outputs(save_dir: Path, metrics: dict[str, Any], m: CocoMetrics, gt_dict: dict[str, Any],
                  gt_src: Any, results: list[dict[str, Any]], cat_ids: list[int], names: list[str], *,
                  save_json: bool, plots: bool) -> None:
    """metrics.json, and predictions.json (+ the ground truth it was scored against) / plots when asked."""
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


def _plot_batch0(imgs: torch.Tensor, targets: torch.Tensor, dets: list[torch.Tensor], paths: list[str],
                 names: list[str], save_dir: Path) -> None:
    h, w = imgs.shape[2:]
    plot_batch(imgs, targets_per_image(targets, len(imgs), h, w), names, save_dir / "val_batch0_labels.jpg", paths)
    shown = [d[d[:, 4] >= 0.25].cpu() for d in dets]  # the full conf-0.001 list would hide the image
    plot_batch(imgs, shown, names, save_dir / "val_batch0_pred.jpg", paths)


def _plot_metrics(m: CocoMetrics, gt: dict[str, Any], results: list[dict[str, Any]], cat_ids: list[int],
                  names: list[str], save_dir: Path) -> None:
    cls_names = [names[c] for c in m.class_ids]
    plot_pr_curve(m.pr_curve, m.ap50, cls_names, save_dir / "PR_curve.png")
    plot_metric_curve(CONF_GRID, m.f1_curve, cls_names, save_dir / "F1_curve.png", ylabel="F1")
    plot_confusion_matrix(confusion_matrix(gt, results, cat_ids), names, save_dir / "confusion_matrix.png")
