"""Non-maximum suppression over the model's decoded output, and small box helpers (torchvision.ops underneath)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.ops import batched_nms, box_convert

from utils.general import ConfigError

# More candidates than this per image are cut to the top-scoring ones before NMS: with conf 0.001 an untrained
# model can pass every anchor, and NMS cost grows quadratically with the candidate count.
MAX_NMS_CANDIDATES = 30000


def non_max_suppression(
    prediction: torch.Tensor,
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    classes: Sequence[int] | None = None,
    agnostic: bool = False,
    multi_label: bool = False,
    max_det: int = 300,
) -> list[torch.Tensor]:
    """Filter and suppress the decoded model output.

    Args:
        prediction (Tensor): (N, A, 5 + nc): cx, cy, w, h in input pixels, objectness, nc class probabilities.
        conf_thres: keep candidates whose confidence (objectness x class probability) exceeds this.
        iou_thres: IoU above which the lower-scoring of two boxes of the same class is suppressed.
        classes: keep only these class indices (None = all).
        agnostic: suppress across classes (one box per location whatever its class).
        multi_label: one candidate per (box, class) whose confidence passes (used for mAP, where it helps recall);
            otherwise only the best class of each box.
        max_det: at most this many detections per image, highest confidence first.

    Returns:
        list of N tensors (n_i, 6): x1, y1, x2, y2 (input pixels), conf, class index (as float).
    """
    if not 0.0 <= conf_thres <= 1.0:
        raise ConfigError(f"conf_thres {conf_thres}: expected a value in [0, 1]")
    if not 0.0 <= iou_thres <= 1.0:
        raise ConfigError(f"iou_thres {iou_thres}: expected a value in [0, 1]")
    if max_det < 1:
        raise ConfigError(f"max_det {max_det}: expected a positive integer")
    if isinstance(prediction, (list, tuple)):  # some heads return (decoded, raw); the decoded tensor comes first
        prediction = prediction[0]
    if prediction.dim() != 3 or prediction.shape[2] < 6:
        raise ValueError(f"prediction must be (N, A, 5 + nc), got {tuple(prediction.shape)}")

    device = prediction.device
    nc = prediction.shape[2] - 5
    allowed = None
    if classes is not None:
        allowed = torch.zeros(nc, dtype=torch.bool, device=device)
        allowed[[c for c in classes if 0 <= c < nc]] = True
    return [_suppress_one(x, conf_thres, iou_thres, allowed, multi_label, agnostic, max_det) for x in prediction]


def _suppress_one(x: torch.Tensor, conf_thres: float, iou_thres: float, allowed: torch.Tensor | None,
                  multi_label: bool, agnostic: bool, max_det: int) -> torch.Tensor:
    """non_max_suppression for one image: (A, 5 + nc) decoded rows -> (n, 6) x1, y1, x2, y2, conf, class."""
    nc = x.shape[1] - 5
    k_top = max(8 * max_det, 2000)
    x = x[x[:, 4] > conf_thres].float()  # objectness bounds the confidence from above: a cheap first cut
    scores = x[:, 5:] * x[:, 4:5]  # (a, nc) confidence = obj * cls
    if allowed is not None:
        scores = scores * allowed  # excluded classes score 0 and never pass the threshold
    best_cls = None
    if multi_label:
        flat = scores.flatten()  # candidate c is box c // nc, class c % nc
    else:
        flat, best_cls = scores.max(dim=1) if x.shape[0] else (scores.new_zeros(0), scores.new_zeros(0).long())
    keep = None
    if flat.numel() > k_top:
        # Exact shortcut: a box's NMS fate depends only on higher-scoring boxes, so NMS over the top-k
        # candidates keeps exactly what full NMS keeps among them; if that is already max_det boxes, done.
        # With conf 0.001 on a young model this avoids NMS over tens of thousands of candidates.
        top_v, top_i = flat.topk(k_top)
        cand = top_i[top_v > conf_thres]
        kept = _nms(x, flat, cand, nc, multi_label, best_cls, iou_thres, agnostic)
        if kept[0].shape[0] >= max_det or top_v[-1] <= conf_thres:
            keep = kept
    if keep is None:
        cand = (flat > conf_thres).nonzero().squeeze(1)
        if cand.numel() > MAX_NMS_CANDIDATES:
            cand = cand[flat[cand].topk(MAX_NMS_CANDIDATES).indices]
        keep = _nms(x, flat, cand, nc, multi_label, best_cls, iou_thres, agnostic)
    boxes, conf, cls = (t[:max_det] for t in keep)
    return torch.cat((boxes, conf[:, None], cls[:, None].float()), dim=1)


def _nms(x: torch.Tensor, flat: torch.Tensor, cand: torch.Tensor, nc: int, multi_label: bool,
         best_cls: torch.Tensor | None, iou_thres: float, agnostic: bool
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """batched_nms over candidates ``cand`` (indices into ``flat``).

    Returns the kept (boxes (k, 4) xyxy, conf (k,), cls (k,)), highest confidence first.
    """
    box_i, cls = (cand // nc, cand % nc) if multi_label else (cand, best_cls[cand])
    boxes = box_convert(x[box_i, :4], in_fmt="cxcywh", out_fmt="xyxy")
    conf = flat[cand]
    keep = batched_nms(boxes, conf, torch.zeros_like(cls) if agnostic else cls, iou_thres)  # decreasing score
    return boxes[keep], conf[keep], cls[keep]


def xyxy_to_xywhn(boxes: torch.Tensor | np.ndarray, width: int, height: int) -> torch.Tensor | np.ndarray:
    """(n, 4) x1, y1, x2, y2 in pixels -> (n, 4) cx, cy, w, h normalised to the image size (YOLO label format),
    float32; a tensor gives a tensor (val / detect label files), an array an array (the dataloader's targets)."""
    is_tensor = isinstance(boxes, torch.Tensor)
    b = boxes.float().reshape(-1, 4) if is_tensor else np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    cols = ((x1 + x2) / (2 * width), (y1 + y2) / (2 * height), (x2 - x1) / width, (y2 - y1) / height)
    return torch.stack(cols, 1) if is_tensor else np.stack(cols, 1)


def xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """(n, 4) x1, y1, x2, y2 -> (n, 4) x_min, y_min, w, h (COCO bbox format), same units."""
    return box_convert(boxes, in_fmt="xyxy", out_fmt="xywh")


def label_lines(det: torch.Tensor, orig_shape: tuple[int, int], conf: bool = True) -> str:
    """YOLO label text for (n, 6) xyxy detections in original pixels: one 'class cx cy w h [conf]' line each,
    normalised to ``orig_shape`` (h0, w0); what val.py --save-txt and detect.py --save-txt write."""
    h0, w0 = orig_shape
    xywhn = xyxy_to_xywhn(det[:, :4], w0, h0).tolist()
    lines = [f"{int(c)} " + " ".join(f"{v:.6f}" for v in b) + (f" {s:.5f}" if conf else "")
             for b, s, c in zip(xywhn, det[:, 4].tolist(), det[:, 5].tolist())]
    return "".join(ln + "\n" for ln in lines)
