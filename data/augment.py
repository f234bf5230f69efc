"""Image geometry for training and inference: the train transform, letterbox and its exact inverse.

Boxes are ``xyxy`` in pixels throughout. Training follows YOLOv5's geometry: a mosaic of four tiles flush at a
random junction of a 2s x 2s canvas (our code: albumentations' Mosaic pads tiles inside fixed cells), then
albumentations' Affine on the whole canvas and a CenterCrop to s x s, HSV gains, flips and the box filter.
``letterbox`` is a plain resize + constant pad because val.py and detect.py need the exact scale and padding back
to map predictions to original pixels.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from utils.general import ConfigError, scoped_env
from utils.hyp import SCRATCH, load_hyp

with scoped_env(NO_ALBUMENTATIONS_UPDATE="1"):  # else its import asks pypi.org for a newer release (a network call)
    import albumentations as A

PAD_VALUE = 114  # grey used for every padded / uncovered pixel (train and val alike)
AUG_KEYS = ("hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "perspective", "fliplr", "flipud",
            "mosaic")
OPTIONAL_AUG = {"perspective": 0.0}  # keys a hyp file may leave out (YOLOv5's hyp files have perspective: 0.0)
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


def augment_params(hyp: dict[str, Any] | str | Path | None) -> dict[str, float]:
    """The augmentation keys of a hyp dict, range-checked; a path (None: cfg/hyp/scratch.yaml) is read with
    ``utils.hyp.load_hyp`` first. ``perspective`` is optional (default 0, as in YOLOv5's hyp files)."""
    src = "cfg/hyp/scratch.yaml" if hyp is None else (str(hyp) if not isinstance(hyp, dict) else "hyp")
    if not isinstance(hyp, dict):
        hyp = load_hyp(SCRATCH if hyp is None else hyp)
    hyp = {**OPTIONAL_AUG, **hyp}
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
    for k in ("hsv_h", "hsv_s", "hsv_v"):
        if out[k] > 1:
            raise ConfigError(f"{src}: key '{k}' is a gain fraction, expected a number in [0, 1], got {out[k]}")
    return out


class HSVGain(A.ImageOnlyTransform):
    """YOLOv5's colour jitter: hue, saturation and value each multiplied by a gain drawn from [1 - g, 1 + g].

    Gains (not albumentations' additive ``HueSaturationValue`` shifts, nor ``ColorJitter``'s blend with the luma
    image) keep grey pixels grey and black pixels black. Hue is in OpenCV units (0..180) and wraps around.
    Input and output: RGB uint8 (H, W, 3).
    """

    def __init__(self, hgain: float, sgain: float, vgain: float, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.gains = (float(hgain), float(sgain), float(vgain))

    def get_params(self) -> dict[str, Any]:
        return {"r": [self.py_random.uniform(-1, 1) * g + 1 for g in self.gains]}

    def apply(self, img: np.ndarray, r: list[float] | None = None, **params: Any) -> np.ndarray:
        x = np.arange(256, dtype=np.float32)
        lut_h = ((x * r[0]) % 180).astype(np.uint8)
        lut_s = np.clip(x * r[1], 0, 255).astype(np.uint8)
        lut_v = np.clip(x * r[2], 0, 255).astype(np.uint8)
        h, s, v = cv2.split(cv2.cvtColor(img, cv2.COLOR_RGB2HSV))
        hsv = cv2.merge((cv2.LUT(h, lut_h), cv2.LUT(s, lut_s), cv2.LUT(v, lut_v)))
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("gains",)


Tile = tuple[np.ndarray, np.ndarray, np.ndarray]  # (image (h, w, 3) uint8, boxes (n, 4) xyxy px, cls (n,))


def mosaic_canvas(tiles: list[Tile], s: int, rng: random.Random, fill: int = PAD_VALUE,
                  with_mask: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Four tiles flush against a random junction on a 2s x 2s canvas (YOLOv4/v5 mosaic geometry).

    The junction (xc, yc) is uniform in [s/2, 3s/2]^2; tile 0 ends at it from the top-left, tile 1 from the top
    right, tile 2 from the bottom left, tile 3 from the bottom right, each at its own size (long side s, aspect
    kept, never padded to a square); what falls outside the canvas is cut. albumentations' ``Mosaic`` cannot give
    this: its cells sit on a fixed grid and pad a non-square image inside its cell.

    Returns (canvas (2s, 2s, 3) uint8, boxes (n, 4) xyxy canvas pixels clipped, cls (n,), mask (2s, 2s) uint8 of
    image pixels or None).
    """
    if len(tiles) != 4:
        raise ValueError(f"mosaic_canvas: expected 4 tiles, got {len(tiles)}")
    xc, yc = (int(rng.uniform(0.5 * s, 1.5 * s)) for _ in range(2))
    canvas = np.full((2 * s, 2 * s, 3), fill, np.uint8)
    mask = np.zeros((2 * s, 2 * s), np.uint8) if with_mask else None
    all_boxes, all_cls = [], []
    for k, (img, boxes, cls) in enumerate(tiles):
        h, w = img.shape[:2]
        x0 = xc - w if k in (0, 2) else xc  # top-left corner of the tile on the canvas
        y0 = yc - h if k in (0, 1) else yc
        cx1, cy1, cx2, cy2 = max(x0, 0), max(y0, 0), min(x0 + w, 2 * s), min(y0 + h, 2 * s)
        canvas[cy1:cy2, cx1:cx2] = img[cy1 - y0:cy2 - y0, cx1 - x0:cx2 - x0]
        if mask is not None:
            mask[cy1:cy2, cx1:cx2] = 1
        if len(boxes):
            all_boxes.append(np.asarray(boxes, np.float32).reshape(-1, 4) + np.array([x0, y0, x0, y0], np.float32))
            all_cls.append(np.asarray(cls).reshape(-1))
    boxes = np.concatenate(all_boxes) if all_boxes else np.zeros((0, 4), np.float32)
    cls = np.concatenate(all_cls) if all_cls else np.zeros(0)
    boxes = np.clip(boxes, 0, 2 * s)
    keep = (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)  # wholly outside the canvas
    return canvas, boxes[keep], cls[keep], mask


class AffineCrop(A.Affine):
    """``A.Affine`` of a large canvas whose output is only its central ``size x size`` window.

    The same random affine (about the canvas centre) followed by a centre crop, in one warp: the crop's offset is
    folded into albumentations' matrices, so only the ``size x size`` output pixels are computed (a separate
    ``A.CenterCrop`` would warp the whole 2s x 2s canvas first, 4x the pixels). Boxes go through albumentations'
    own box warp and filter.
    """

    def __init__(self, size: int, **affine_kwargs: Any) -> None:
        super().__init__(**affine_kwargs)
        self.size = int(size)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        out = super().get_params_dependent_on_data(params, data)
        h, w = params["shape"][:2]
        shift = np.array([[1.0, 0.0, -(w - self.size) / 2], [0.0, 1.0, -(h - self.size) / 2], [0.0, 0.0, 1.0]])
        out["matrix"] = shift @ out["matrix"]
        out["bbox_matrix"] = shift @ out["bbox_matrix"]
        out["output_shape"] = (self.size, self.size)
        return out


class TrainTransform:
    """The training geometry of YOLOv5: mosaic on a 2s canvas, one random affine of the whole canvas, the s x s cut.

    ``__call__(tiles)`` takes 4 tiles (mosaic) or 1 tile (whole image, letterboxed to s x s) with images already
    resized to long side s, and returns ``{'image': (s, s, 3) uint8, 'bboxes': (n, 4) xyxy px, 'cls': (n,)}``
    (plus ``'mask'`` (s, s) uint8, 1 = image pixel, with ``with_mask=True``; for statistics).

    albumentations does the per-pixel work: ``Affine`` (zoom, rotation, shear and translation about the canvas
    centre, as YOLOv5's ``random_perspective``) with the s x s centre cut of a 2s mosaic canvas folded in
    (:class:`AffineCrop`: a zoom-out shows more canvas, i.e. more image, not padding), ``Perspective`` when the hyp
    asks for it, flips, and the box filter: a box survives when it is >= 2 px each way, keeps >= 10 % of its area
    through each geometric step and its aspect ratio is <= 100 (YOLOv5's ``box_candidates``).
    """

    def __init__(self, img_size: int, hyp: dict[str, float], pad_value: int = PAD_VALUE,
                 with_mask: bool = False) -> None:
        self.s, self.hyp, self.fill, self.with_mask = int(img_size), hyp, pad_value, with_mask
        self.rng = random.Random(0)
        self.mosaic = self._compose(2 * self.s, crop=True)
        self.single = self._compose(self.s, crop=False)

    def _compose(self, canvas: int, crop: bool) -> A.Compose:
        hyp, s, fill = self.hyp, self.s, (self.fill,) * 3
        t = hyp["translate"] * s / canvas  # translation is a fraction of the output size, as in YOLOv5
        geo: list[A.BasicTransform] = []
        if hyp.get("perspective", 0.0) > 0:  # default 0: off. YOLOv5's projective term p moves a corner by
            # about p * s / 2 of the output size; A.Perspective's scale is a fraction of the input (canvas) size
            geo.append(A.Perspective(scale=(0.0, hyp["perspective"] * s / 2 * s / canvas), keep_size=True,
                                     fit_output=False,
                                     border_mode=cv2.BORDER_CONSTANT, fill=fill, fill_mask=0, p=1.0))
        affine = dict(scale=(1 - hyp["scale"], 1 + hyp["scale"]), translate_percent=(-t, t),
                      rotate=(-hyp["degrees"], hyp["degrees"]), shear=(-hyp["shear"], hyp["shear"]), keep_ratio=True,
                      border_mode=cv2.BORDER_CONSTANT, fill=fill, fill_mask=0, p=1.0)
        # the mosaic's s x s cut of the 2s canvas is folded into the affine warp (AffineCrop)
        geo.append(AffineCrop(s, **affine) if crop else A.Affine(**affine))
        pix: list[A.BasicTransform] = []
        if any(hyp[k] for k in ("hsv_h", "hsv_s", "hsv_v")):
            pix.append(HSVGain(hyp["hsv_h"], hyp["hsv_s"], hyp["hsv_v"], p=1.0))
        pix += [A.HorizontalFlip(p=hyp["fliplr"]), A.VerticalFlip(p=hyp["flipud"])]
        # checked after every step: >= 2 px each way, >= 10 % of the area the step gave it, aspect <= 100
        bbox_params = A.BboxParams(format="pascal_voc", label_fields=["cls"], min_width=2, min_height=2,
                                   min_visibility=0.1, max_accept_ratio=100.0, clip=True)
        return A.Compose(geo + pix, bbox_params=bbox_params, seed=0)

    def set_random_seed(self, seed: int) -> None:
        self.rng.seed(seed)
        self.mosaic.set_random_seed(seed)
        self.single.set_random_seed(seed + 1)

    def __call__(self, tiles: list[Tile]) -> dict[str, Any]:
        if len(tiles) == 4:
            img, boxes, cls, mask = mosaic_canvas(tiles, self.s, self.rng, self.fill, self.with_mask)
            pipe = self.mosaic
        elif len(tiles) == 1:
            img0, boxes, cls = tiles[0]
            img, r, (pw, ph) = letterbox(img0, self.s, auto=False, color=(self.fill,) * 3)
            boxes = np.asarray(boxes, np.float32).reshape(-1, 4) * r + np.array([pw, ph, pw, ph], np.float32)
            mask = None
            if self.with_mask:
                mask = np.zeros(img.shape[:2], np.uint8)
                mask[ph:ph + round(img0.shape[0] * r), pw:pw + round(img0.shape[1] * r)] = 1
            pipe = self.single
        else:
            raise ValueError(f"TrainTransform: expected 1 or 4 tiles, got {len(tiles)}")
        kw = {"mask": mask} if mask is not None else {}
        out = pipe(image=img, bboxes=np.asarray(boxes, np.float32).reshape(-1, 4), cls=np.asarray(cls), **kw)
        out["bboxes"] = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
        out["cls"] = np.asarray(out["cls"])
        return out


def build_train_transform(img_size: int, hyp: dict[str, float], pad_value: int = PAD_VALUE,
                          with_mask: bool = False) -> TrainTransform:
    """The training transform for ``img_size`` and validated ``hyp`` (see :class:`TrainTransform`)."""
    return TrainTransform(img_size, hyp, pad_value, with_mask)
