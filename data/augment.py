"""Image geometry for training and inference: albumentations train pipeline, letterbox and its exact inverse.

Boxes are ``xyxy`` in pixels throughout. The train pipeline is built from albumentations transforms
(Mosaic, Affine, HueSaturationValue, flips); ``letterbox`` is a plain resize + constant pad because
val.py and detect.py need the exact scale and padding back to map predictions to original pixels.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch

from utils.general import ROOT, ConfigError, load_yaml

PAD_VALUE = 114  # grey used for every padded / uncovered pixel (train and val alike)
AUG_KEYS = ("hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "fliplr", "flipud", "mosaic")
_PROB_KEYS = ("fliplr", "flipud", "mosaic")


def letterbox(
    img: np.ndarray,
    new_shape: int | tuple[int, int],
    stride: int = 32,
    auto: bool = False,
    color: tuple[int, int, int] = (PAD_VALUE, PAD_VALUE, PAD_VALUE),
    scaleup: bool = True,
) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Resize keeping the aspect ratio, then pad with ``color``.

    Args:
        img: (H0, W0, C) uint8 image.
        new_shape: target size, an int (square) or (h, w). Rounded up to a multiple of ``stride``.
        auto: pad only to the smallest stride multiple around the resized image (detect.py), instead of the
            full ``new_shape`` (val, fixed batch shapes).
        scaleup: allow r > 1 (set False at inference to never upsample).
    Returns:
        (padded image (H, W, C), ratio r, (pad_w, pad_h)) with integer pads, so that
        ``x_orig = (x - pad_w) / r`` and ``y_orig = (y - pad_h) / r`` exactly.
    """
    h0, w0 = img.shape[:2]
    nh, nw = (new_shape, new_shape) if isinstance(new_shape, int) else (int(new_shape[0]), int(new_shape[1]))
    nh, nw = math.ceil(nh / stride) * stride, math.ceil(nw / stride) * stride
    r = min(nh / h0, nw / w0)
    if not scaleup:
        r = min(r, 1.0)
    w, h = max(1, round(w0 * r)), max(1, round(h0 * r))
    if auto:  # minimal padding: each side up to the next stride multiple
        nh, nw = math.ceil(h / stride) * stride, math.ceil(w / stride) * stride
    if (w, h) != (w0, h0):
        # INTER_AREA keeps thin structures when shrinking; LINEAR is the cheap choice when enlarging
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR)
    pad_w, pad_h = (nw - w) // 2, (nh - h) // 2
    if (nh, nw) != (h, w):
        img = cv2.copyMakeBorder(img, pad_h, nh - h - pad_h, pad_w, nw - w - pad_w, cv2.BORDER_CONSTANT, value=color)
    return img, r, (pad_w, pad_h)


def scale_boxes_to_original(
    boxes_xyxy: np.ndarray | torch.Tensor,
    r: float,
    pad: tuple[float, float],
    orig_shape: tuple[int, int],
) -> np.ndarray | torch.Tensor:
    """Map boxes from letterboxed pixels back to original pixels (a new array / tensor; clipped to the image).

    Args:
        boxes_xyxy: (n, 4+) boxes; only the first 4 columns are mapped, extra columns are copied.
        r, pad: the ratio and (pad_w, pad_h) returned by ``letterbox`` (or a batch's metas).
        orig_shape: (h0, w0) of the original image.
    """
    h0, w0 = orig_shape
    pw, ph = float(pad[0]), float(pad[1])
    if isinstance(boxes_xyxy, torch.Tensor):
        out = boxes_xyxy.clone()
        out[:, [0, 2]] = ((out[:, [0, 2]] - pw) / r).clamp(0, w0)
        out[:, [1, 3]] = ((out[:, [1, 3]] - ph) / r).clamp(0, h0)
        return out
    out = np.array(boxes_xyxy, dtype=np.float64 if np.asarray(boxes_xyxy).dtype == np.float64 else np.float32)
    out[:, [0, 2]] = np.clip((out[:, [0, 2]] - pw) / r, 0, w0)
    out[:, [1, 3]] = np.clip((out[:, [1, 3]] - ph) / r, 0, h0)
    return out


def load_hyp(hyp: dict[str, Any] | str | Path | None) -> dict[str, float]:
    """Augmentation hyper-parameters from a dict or hyp YAML (None -> cfg/hyp/scratch.yaml), validated."""
    src = "cfg/hyp/scratch.yaml" if hyp is None else (str(hyp) if not isinstance(hyp, dict) else "hyp")
    if not isinstance(hyp, dict):
        hyp = load_yaml(ROOT / "cfg" / "hyp" / "scratch.yaml" if hyp is None else hyp, "hyp file")
    out: dict[str, float] = {}
    for k in AUG_KEYS:
        v = hyp.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"{src}: key '{k}' expected a non-negative number, got {v!r}")
        if k in _PROB_KEYS and v > 1:
            raise ConfigError(f"{src}: key '{k}' is a probability, expected a number in [0, 1], got {v!r}")
        out[k] = float(v)
    if out["scale"] >= 1:
        raise ConfigError(f"{src}: key 'scale' expected a number in [0, 1) (zoom 1 +/- scale), got {out['scale']}")
    return out


def build_train_transform(img_size: int, hyp: dict[str, float], pad_value: int = PAD_VALUE) -> A.Compose:
    """The training pipeline; output is always img_size x img_size.

    Call it with ``image`` (RGB uint8, long side already resized to img_size), ``bboxes`` (n, 4) pascal_voc
    pixels, ``cls`` (n,), and ``mosaic_metadata``: a list of 3 dicts with the same keys for the other tiles
    (A.Mosaic puts the primary image in the largest visible cell and the extra ones in the others).

    HSV: hyp fractions follow YOLOv5's meaning (hue as a fraction of the hue circle, saturation / value as
    relative gains); A.HueSaturationValue shifts additively in OpenCV units, so a gain g becomes a shift of
    g * 127.5 (the gain's effect at mid-scale) and hue h becomes h * 180 (OpenCV hue spans 0..180).
    """
    s = int(img_size)
    fill = (pad_value,) * 3
    p_hsv = 1.0 if any(hyp[k] for k in ("hsv_h", "hsv_s", "hsv_v")) else 0.0
    t = [
        # Cells as large as the output: each tile contributes a corner region at its letterbox scale, so object
        # scale in training matches validation before the random zoom below.
        A.Mosaic(grid_yx=(2, 2), target_size=(s, s), cell_shape=(s, s), center_range=(0.25, 0.75),
                 fit_mode="contain", fill=fill, p=hyp["mosaic"]),
        A.PadIfNeeded(min_height=s, min_width=s, position="center", border_mode=cv2.BORDER_CONSTANT, fill=fill),
        A.Affine(scale=(1 - hyp["scale"], 1 + hyp["scale"]), translate_percent=(-hyp["translate"], hyp["translate"]),
                 rotate=(-hyp["degrees"], hyp["degrees"]), shear=(-hyp["shear"], hyp["shear"]), keep_ratio=True,
                 border_mode=cv2.BORDER_CONSTANT, fill=fill, p=1.0),
        A.HueSaturationValue(hue_shift_limit=hyp["hsv_h"] * 180, sat_shift_limit=hyp["hsv_s"] * 127.5,
                             val_shift_limit=hyp["hsv_v"] * 127.5, p=p_hsv),
        A.HorizontalFlip(p=hyp["fliplr"]),
        A.VerticalFlip(p=hyp["flipud"]),
    ]
    # min_width/height 2 px drop slivers left by crops; clip=True absorbs sub-pixel overshoot from resize rounding
    bbox_params = A.BboxParams(format="pascal_voc", label_fields=["cls"], min_width=2, min_height=2, clip=True)
    return A.Compose(t, bbox_params=bbox_params, seed=0)


def xyxy_to_cxcywh_norm(boxes: np.ndarray, w: int, h: int) -> np.ndarray:
    """(n, 4) pixel xyxy -> (n, 4) cx, cy, w, h normalised by the image width / height (float32)."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    out = np.empty_like(b)
    out[:, 0] = (b[:, 0] + b[:, 2]) / (2 * w)
    out[:, 1] = (b[:, 1] + b[:, 3]) / (2 * h)
    out[:, 2] = (b[:, 2] - b[:, 0]) / w
    out[:, 3] = (b[:, 3] - b[:, 1]) / h
    return out
