"""Detections -> COCO results -> pycocotools COCOeval: the one mAP of this project, plus what it lets us read off.

Everything is taken from a single ``COCOeval`` run:
- mAP50-95 / mAP50 and the 12-line summary: ``COCOeval.stats`` / ``summarize()``;
- per-class AP: ``eval['precision']`` (T=10 IoUs, R=101 recall points, K classes, A=4 areas, M=3 max-dets);
- precision / recall at the confidence that maximises the mean F1: the detection <-> ground-truth matches COCOeval
  made at IoU 0.5 (``evalImgs[...]['dtMatches']``), swept over a confidence grid.
The confusion matrix is the only thing computed apart, because COCOeval never matches across classes.
"""
from __future__ import annotations

import contextlib
import io
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert, box_iou

from utils.boxes import xyxy_to_xywh
from utils.general import ConfigError

CONF_GRID = np.linspace(0.0, 1.0, 1000)  # confidences at which the P / R / F1 curves are sampled


@dataclass
class CocoMetrics:
    """What one COCOeval run yields. Class-indexed arrays follow ``class_ids`` (classes with ground truth)."""

    stats: list[float]  # the 12 COCOeval.stats values
    summary: str  # pycocotools' 12-line summary text
    map50: float
    map50_95: float
    precision: float  # mean over classes, at best_conf
    recall: float
    best_conf: float
    class_ids: list[int] = field(default_factory=list)  # contiguous class indices that have ground truth
    ap50: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (K,)
    ap50_95: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (K,)
    class_p: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (K,) at best_conf
    class_r: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (K,) at best_conf
    pr_curve: np.ndarray = field(default_factory=lambda: np.zeros((0, 101)))  # (K, 101) precision at IoU 0.5
    p_curve: np.ndarray = field(default_factory=lambda: np.zeros((0, CONF_GRID.size)))  # (K, 1000) over CONF_GRID
    r_curve: np.ndarray = field(default_factory=lambda: np.zeros((0, CONF_GRID.size)))
    f1_curve: np.ndarray = field(default_factory=lambda: np.zeros((0, CONF_GRID.size)))


def detections_to_coco(dets: torch.Tensor, image_id: int, cat_ids: list[int]) -> list[dict[str, Any]]:
    """One image's detections -> COCO result dicts.

    Args:
        dets (Tensor): (n, 6) x1, y1, x2, y2 in ORIGINAL image pixels, conf, contiguous class index.
        image_id: the COCO image id (``metas[i]['image_id']``).
        cat_ids: contiguous class index -> COCO category id.
    Returns:
        ``[{'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'}, ...]``; bbox rounded to 1e-3 px and score to
        1e-5 (the values written to JSON are the values evaluated, so rounding never makes the two disagree).
    """
    if dets.numel() == 0:
        return []
    d = dets.detach().double().cpu()
    # rounded as arrays: one numpy call per column instead of a Python round() per number (a validation early in
    # training yields up to 150,000 detections)
    xywh = np.round(xyxy_to_xywh(d[:, :4]).numpy(), 3).tolist()
    scores = np.round(d[:, 4].numpy(), 5).tolist()
    cats = np.asarray(cat_ids, dtype=np.int64)[d[:, 5].long().numpy()].tolist()
    image_id = int(image_id)
    return [{"image_id": image_id, "category_id": c, "bbox": box, "score": s} for box, s, c in zip(xywh, scores, cats)]


def load_coco_gt(gt: dict[str, Any] | str | Path) -> COCO:
    """A pycocotools COCO object from an in-memory COCO dict or a JSON file, without pycocotools' chatter."""
    if isinstance(gt, (str, Path)):
        p = Path(gt)
        if not p.is_file():
            raise ConfigError(f"ground-truth JSON '{p}' not found")
        try:
            gt = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"ground-truth JSON '{p}': cannot read ({e})") from None
    if not isinstance(gt, dict) or not {"images", "annotations", "categories"} <= gt.keys():
        raise ConfigError("ground truth: expected a COCO dict with 'images', 'annotations' and 'categories'")
    coco = COCO()
    coco.dataset = _copy_dataset(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _copy_dataset(gt: dict[str, Any]) -> dict[str, Any]:
    """A copy of a COCO dict that pycocotools may edit: bbox evaluation only adds or sets top-level keys of the
    annotation dicts (COCOeval's ``ignore``), so the lists and each image / annotation / category dict are copied,
    the values inside them (bbox lists, segmentations) are shared, which is much cheaper than a deep copy."""
    out = dict(gt)
    for k in ("images", "annotations", "categories"):
        out[k] = [dict(x) for x in gt[k]]
    return out


def _load_results(coco_gt: COCO, results: list[dict[str, Any]]) -> COCO:
    """The detections as a pycocotools COCO object, as ``coco_gt.loadRes(results)`` builds it for bbox results.

    loadRes writes ``area`` (w * h), ``id`` (1-based position) and ``iscrowd`` (0) into every result dict, plus a
    four-corner ``segmentation`` polygon that bbox evaluation never reads. Here each dict is copied with the first
    three added (the caller's list stays as it was), and the polygon is left out: early in training a validation
    yields up to 150,000 results, and the copies and polygons were most of the time spent outside COCOeval itself.
    ``tests/test_coco_eval.py`` checks all 12 stats against loadRes. An empty list gives an empty COCO (loadRes
    indexes ``anns[0]``; an empty result set must still score 0, not crash)."""
    anns = [{**r, "area": r["bbox"][2] * r["bbox"][3], "id": i, "iscrowd": 0} for i, r in enumerate(results, 1)]
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "categories": coco_gt.dataset["categories"],
                       "annotations": anns}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt.createIndex()
    return coco_dt


def run_cocoeval(gt: dict[str, Any] | str | Path | COCO, results: list[dict[str, Any]], *,
                 area_breakdown: bool = True) -> tuple[COCOeval, str]:
    """Run COCOeval (bbox) and return it with the text of its 12-line summary.

    ``area_breakdown=False`` evaluates COCO's area range 'all' only: mAP50, mAP50-95 and everything taken from area
    'all' are the same numbers, the small / medium / large lines read -1 (pycocotools' "not computed"), and
    COCOeval matches each image once instead of once per area range (training's per-epoch validation uses it)."""
    coco_gt = gt if isinstance(gt, COCO) else load_coco_gt(gt)
    known = set(coco_gt.getImgIds())
    stray = {r["image_id"] for r in results} - known
    if stray:
        raise ConfigError(f"results name image ids absent from the ground truth, e.g. {sorted(stray)[:3]}")
    coco_dt = _load_results(coco_gt, results)
    ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
    if not area_breakdown:
        ev.params.areaRng, ev.params.areaRngLbl = ev.params.areaRng[:1], ev.params.areaRngLbl[:1]  # 'all' is first
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ev.evaluate()
        ev.accumulate()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ev.summarize()
    return ev, buf.getvalue().rstrip("\n")


def _class_pr_over_conf(ev: COCOeval, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Precision and recall of category index ``k`` (in ev.params.catIds) at each CONF_GRID value, IoU 0.5, area all.

    Uses COCOeval's own matches, so a detection counts as TP exactly when COCOeval matched it at IoU 0.5;
    detections matched to crowd / ignored ground truth are left out as COCOeval leaves them out.
    Returns (p (1000,), r (1000,), number of non-ignored ground-truth boxes).
    """
    n_area, n_img = len(ev.params.areaRng), len(ev.params.imgIds)
    start = k * n_area * n_img  # evalImgs is ordered category x area range x image; area index 0 = 'all'
    evs = [e for e in ev.evalImgs[start:start + n_img] if e is not None]
    n_gt = int(sum(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0) for e in evs))
    p, r = np.zeros(CONF_GRID.size), np.zeros(CONF_GRID.size)
    if not evs:
        return p, r, n_gt
    scores = np.concatenate([np.asarray(e["dtScores"], dtype=float) for e in evs])
    if scores.size == 0:
        return p, r, n_gt  # ground truth but no detections: P = R = 0 at every confidence
    tp = np.concatenate([np.asarray(e["dtMatches"])[0] for e in evs]) > 0
    ignored = np.concatenate([np.asarray(e["dtIgnore"])[0] for e in evs]).astype(bool)
    scores, tp = scores[~ignored], tp[~ignored]
    if scores.size == 0:
        return p, r, n_gt
    order = np.argsort(-scores, kind="mergesort")  # the sort COCOeval.accumulate uses
    scores, cum_tp = scores[order], np.cumsum(tp[order])
    n_kept = np.searchsorted(-scores, -CONF_GRID, side="right")  # detections with score >= c
    tp_at = np.where(n_kept > 0, cum_tp[np.maximum(n_kept - 1, 0)], 0)
    p = np.where(n_kept > 0, tp_at / np.maximum(n_kept, 1), 1.0)  # nothing kept above c: precision 1 by convention
    r = tp_at / max(n_gt, 1)
    return p, r, n_gt


def evaluate(gt: dict[str, Any] | str | Path | COCO, results: list[dict[str, Any]], cat_ids: list[int], *,
             area_breakdown: bool = True) -> CocoMetrics:
    """COCO bbox evaluation of ``results`` against ``gt``.

    Args:
        gt: COCO ground truth (dict from ``dataset.coco_gt()``, a JSON path, or a COCO object).
        results: COCO result dicts (original category ids, xywh in original pixels).
        cat_ids: contiguous class index -> COCO category id (``dataset.cat_ids``).
        area_breakdown: False skips the small / medium / large area ranges (their stats read -1; see run_cocoeval).
    """
    ev, summary = run_cocoeval(gt, results, area_breakdown=area_breakdown)
    precision = ev.eval["precision"]  # (T, R, K, A, M); -1 where a category has no ground truth
    cat_index = {c: i for i, c in enumerate(cat_ids)}
    class_ids, ap50, ap, pr, pc, rc = [], [], [], [], [], []
    for k, cat in enumerate(ev.params.catIds):
        pk = precision[:, :, k, 0, -1]  # area 'all', maxDets 100
        if cat not in cat_index or not (pk > -1).any():
            continue
        class_ids.append(cat_index[cat])
        ap.append(float(pk[pk > -1].mean()))
        p50 = pk[0]
        ap50.append(float(p50[p50 > -1].mean()))
        pr.append(np.where(p50 > -1, p50, 0.0))
        p, r, _ = _class_pr_over_conf(ev, k)
        pc.append(p)
        rc.append(r)
    if class_ids:
        pc_a, rc_a = np.stack(pc), np.stack(rc)
        f1 = 2 * pc_a * rc_a / np.maximum(pc_a + rc_a, 1e-16)
        mean_f1 = f1.mean(0)
        best = int(mean_f1.size - 1 - mean_f1[::-1].argmax())  # on a plateau, the highest confidence reaching it
    else:
        pc_a = rc_a = f1 = np.zeros((0, CONF_GRID.size))
        best = 0
    stats = [float(s) for s in ev.stats]
    return CocoMetrics(
        stats=stats, summary=summary, map50=max(stats[1], 0.0), map50_95=max(stats[0], 0.0),
        precision=float(pc_a[:, best].mean()) if class_ids else 0.0,
        recall=float(rc_a[:, best].mean()) if class_ids else 0.0,
        best_conf=float(CONF_GRID[best]), class_ids=class_ids, ap50=np.array(ap50), ap50_95=np.array(ap),
        class_p=pc_a[:, best], class_r=rc_a[:, best],
        pr_curve=np.stack(pr) if pr else np.zeros((0, 101)), p_curve=pc_a, r_curve=rc_a, f1_curve=f1,
    )


def gt_counts(gt: dict[str, Any], cat_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per contiguous class: (instances, images) counted over non-crowd ground-truth boxes (what COCOeval scores)."""
    cat_index = {c: i for i, c in enumerate(cat_ids)}
    inst = np.zeros(len(cat_ids), dtype=int)
    imgs: dict[int, set] = defaultdict(set)
    for a in gt["annotations"]:
        if a.get("iscrowd", 0) or a["category_id"] not in cat_index:
            continue
        k = cat_index[a["category_id"]]
        inst[k] += 1
        imgs[k].add(a["image_id"])
    return inst, np.array([len(imgs[k]) for k in range(len(cat_ids))], dtype=int)


def confusion_matrix(
    gt: dict[str, Any], results: list[dict[str, Any]], cat_ids: list[int], conf_thres: float = 0.25,
    iou_thres: float = 0.45,
) -> np.ndarray:
    """Detection confusion matrix (nc + 1, nc + 1): rows = predicted class, columns = true class, last = background.

    Detections with score >= conf_thres are matched one-to-one to non-crowd ground truth of ANY class by decreasing
    IoU (> iou_thres). Matched pair -> [pred, true]; unmatched detection -> [pred, background] (false positive);
    unmatched ground truth -> [background, true] (missed).
    """
    nc = len(cat_ids)
    cat_index = {c: i for i, c in enumerate(cat_ids)}
    m = np.zeros((nc + 1, nc + 1), dtype=np.int64)
    gts: dict[int, list] = defaultdict(list)
    for a in gt["annotations"]:
        if not a.get("iscrowd", 0) and a["category_id"] in cat_index:
            gts[a["image_id"]].append((*a["bbox"], cat_index[a["category_id"]]))
    dts: dict[int, list] = defaultdict(list)
    for d in results:
        if d["score"] >= conf_thres and d["category_id"] in cat_index:
            dts[d["image_id"]].append((*d["bbox"], cat_index[d["category_id"]]))
    for img in {i["id"] for i in gt["images"]}:
        g = torch.tensor(gts.get(img, []), dtype=torch.float64).reshape(-1, 5)
        d = torch.tensor(dts.get(img, []), dtype=torch.float64).reshape(-1, 5)
        g_cls, d_cls = g[:, 4].long().tolist(), d[:, 4].long().tolist()
        g_hit, d_hit = set(), set()
        if len(g) and len(d):
            iou = box_iou(box_convert(d[:, :4], "xywh", "xyxy"), box_convert(g[:, :4], "xywh", "xyxy"))
            di, gi = (iou > iou_thres).nonzero(as_tuple=True)
            for n in iou[di, gi].argsort(descending=True, stable=True).tolist():  # greedy, best overlap first
                a, b = int(di[n]), int(gi[n])
                if a not in d_hit and b not in g_hit:
                    d_hit.add(a)
                    g_hit.add(b)
                    m[d_cls[a], g_cls[b]] += 1
        for b, c in enumerate(g_cls):
            if b not in g_hit:
                m[nc, c] += 1
        for a, c in enumerate(d_cls):
            if a not in d_hit:
                m[c, nc] += 1
    return m
