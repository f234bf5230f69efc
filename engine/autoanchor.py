"""AutoAnchor: check the model's anchors against the training labels and re-fit them when they fit badly.

Best possible recall (BPR) is the fraction of training boxes that at least one anchor could be assigned to under
the loss' shape-ratio rule (``max(w/a_w, a_w/w, h/a_h, a_h/h) < anchor_t``). Below 0.98 we k-means the label sizes
into ``nl * na`` anchors, refine them with a mutation search, and keep them only if BPR improves.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn

from utils.dist import de_parallel
from utils.general import LOGGER

BPR_THRESHOLD = 0.98


def label_wh(dataset: Any, img_size: int, seed: int = 0) -> np.ndarray:
    """Box sizes (n, 2) in pixels as seen at the training size (long side = ``img_size``).

    Read from ``dataset.coco_gt()`` (the documented, format-independent view of the labels); crowd regions are
    skipped. A random 0.9-1.1 scale mimics the scale augmentation, with a fixed seed so the result is repeatable.
    """
    gt = dataset.coco_gt()
    long_side = {im["id"]: max(float(im["width"]), float(im["height"])) for im in gt.get("images", [])}
    wh = [(a["bbox"][2] * img_size / long_side[a["image_id"]], a["bbox"][3] * img_size / long_side[a["image_id"]])
          for a in gt.get("annotations", []) if not a.get("iscrowd", 0) and a["image_id"] in long_side]
    wh = np.asarray(wh, dtype=np.float64).reshape(-1, 2)
    rng = np.random.default_rng(seed)
    return wh * rng.uniform(0.9, 1.1, size=(len(wh), 1))


def anchor_metrics(anchors: np.ndarray, wh: np.ndarray, thr: float) -> tuple[float, float]:
    """Best possible recall and anchors-above-threshold per box.

    Args:
        anchors: (k, 2) anchor sizes in pixels; wh: (n, 2) label sizes in pixels; thr: the loss' ``anchor_t``.
    """
    r = wh[:, None] / anchors[None]  # (n, k, 2)
    x = np.minimum(r, 1 / r).min(2)  # (n, k): worst-side ratio, 1 = perfect fit
    best = x.max(1)
    return float((best > 1 / thr).mean()), float((x > 1 / thr).sum(1).mean())


def _fitness(anchors: np.ndarray, wh: np.ndarray, thr: float) -> float:
    """Mean best ratio over boxes, counting only matchable ones (what the evolution maximises)."""
    r = wh[:, None] / anchors[None]
    best = np.minimum(r, 1 / r).min(2).max(1)
    return float((best * (best > 1 / thr)).mean())


def kmean_anchors(wh: np.ndarray, n: int = 9, thr: float = 4.0, gen: int = 1000, seed: int = 0,
                  restarts: int = 30) -> np.ndarray:
    """Fit ``n`` anchors (n, 2) in pixels, sorted by area: k-means on whitened sizes, then mutation search.

    YOLOv5's recipe: boxes with both sides under 2 px are left out; k-means on sizes divided by their standard
    deviation, the lowest-distortion codebook of ``restarts`` runs (as scipy's ``kmeans(iter=30)``); then a
    1000-generation evolution maximises the fitness (mean best shape ratio over matchable boxes). On coco128 at
    320 px it gives anchors close to YOLOv5's own (5,6 11,12 26,28 | 68,44 46,81 70,151 | 131,117 178,207 269,176).
    A log-size k-means we tried instead matched more tiny boxes (its largest anchor was 177 px) and changed the
    early losses and the from-scratch result on coco128 (benchmarks/peer_coco128.md).
    """
    rng = np.random.default_rng(seed)
    wh = wh[(wh >= 2.0).any(1)]  # boxes under 2 px both ways cannot be learned and distort the clusters
    if len(wh) > 30000:  # cost is linear in n; a sample keeps the search short
        wh = wh[rng.choice(len(wh), 30000, replace=False)]
    std = wh.std(0) + 1e-9
    x = wh / std
    best_c, best_d = None, np.inf
    for _ in range(max(1, restarts)):  # k random boxes as the start, Lloyd iterations; keep the lowest distortion
        c = x[rng.choice(len(x), n, replace=len(x) < n)]
        for _ in range(100):
            assign = ((x[:, None] - c[None]) ** 2).sum(2).argmin(1)
            new = np.stack([x[assign == i].mean(0) if (assign == i).any() else c[i] for i in range(n)])
            if np.allclose(new, c):
                break
            c = new
        dist = np.sqrt(((x[:, None] - c[None]) ** 2).sum(2).min(1)).mean()
        if dist < best_d:
            best_c, best_d = c, dist
    k = best_c * std
    # evolution: multiplicative mutations of the anchor sizes, keep a child only when it fits better
    f = _fitness(k, wh, thr)
    for _ in range(gen):
        v = np.ones_like(k)
        while (v == 1).all():  # make sure something changes
            v = ((rng.random(k.shape) < 0.9) * rng.random() * rng.standard_normal(k.shape) * 0.1 + 1).clip(0.3, 3.0)
        kg = (k * v).clip(min=2.0)
        fg = _fitness(kg, wh, thr)
        if fg > f:
            f, k = fg, kg
    return k[np.argsort(k.prod(1))]


def check_anchors(model: nn.Module, dataset: Any, thr: float = 4.0, img_size: int = 640, seed: int = 0) -> dict:
    """Check the Detect anchors on ``dataset`` at ``img_size``; re-fit and write them into the model if BPR < 0.98.

    The anchors are a buffer of the Detect head (nl, na, 2) in grid units, so the choice is saved with every
    checkpoint and broadcast to the other ranks when DDP wraps the model.
    Returns ``{'bpr_before', 'bpr_after', 'changed'}``.
    """
    det = de_parallel(model).model[-1]
    stride = det.stride.detach().cpu().double().view(-1, 1, 1)
    anchors_px = (det.anchors.detach().cpu().double() * stride).view(-1, 2).numpy()
    wh = label_wh(dataset, img_size, seed)
    out = {"bpr_before": float("nan"), "bpr_after": float("nan"), "changed": False}
    if len(wh) < anchors_px.shape[0]:
        LOGGER.warning(f"AutoAnchor: only {len(wh)} labels, keeping the model's anchors")
        return out
    bpr, aat = anchor_metrics(anchors_px, wh, thr)
    out["bpr_before"] = out["bpr_after"] = bpr
    msg = f"AutoAnchor: {aat:.2f} anchors/target, best possible recall {bpr:.4f}"
    if bpr >= BPR_THRESHOLD:
        LOGGER.info(f"{msg}; current anchors fit the dataset")
        return out
    LOGGER.info(f"{msg}; below {BPR_THRESHOLD}, fitting new anchors (k-means + evolution)")
    new = kmean_anchors(wh, n=anchors_px.shape[0], thr=thr, seed=seed)
    new_bpr, _ = anchor_metrics(new, wh, thr)
    if new_bpr > bpr:
        grid = torch.as_tensor(new, dtype=torch.float64).view_as(det.anchors) / stride  # small to large levels
        with torch.no_grad():
            det.anchors.copy_(grid.to(det.anchors.dtype))
        out.update(bpr_after=new_bpr, changed=True)
        LOGGER.info(f"AutoAnchor: new anchors (px) {np.round(new).astype(int).tolist()}; "
                    f"best possible recall {bpr:.4f} -> {new_bpr:.4f}")
    else:
        LOGGER.info(f"AutoAnchor: new anchors not better (best possible recall {new_bpr:.4f}); keeping the originals")
    return out
