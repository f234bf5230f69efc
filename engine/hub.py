"""The Python API behind hubconf.py: a detector you call on images and that returns per-image detections.

    model = torch.hub.load("path/to/NormYOLO", "custom", path="best.pt", source="local")   # or .onnx / .torchscript
    det = model("image.jpg")[0]          # also numpy RGB arrays, PIL images, or a list of any of these
    det.boxes, det.scores, det.class_ids, det.names

It runs through ``engine.backends`` and ``engine.predict.predict_image``: the letterboxing, NMS and box scaling of
detect.py.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch

from engine.backends import Backend, TorchBackend, load_backend
from engine.predict import predict_image
from models.yolo import Model
from utils.general import ROOT, ConfigError, select_device


@dataclass
class Detections:
    """One image's detections, in its own pixels: ``boxes`` (n, 4) x1, y1, x2, y2; ``scores`` (n,);
    ``class_ids`` (n,) ints; ``names`` (n,) the class name of each box; ``shape`` the image's (height, width)."""

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    names: list[str]
    shape: tuple[int, int]
    source: str

    def __len__(self) -> int:
        return len(self.scores)

    def __repr__(self) -> str:
        counts = ", ".join(f"{n} {c}" for c, n in sorted(Counter(self.names).items())) or "no detections"
        return f"Detections({self.source}, {self.shape[0]}x{self.shape[1]}: {counts})"


def to_bgr(img: Any) -> tuple[np.ndarray, str]:
    """(H, W, 3) uint8 BGR and a label from a file path, a PIL image or an (H, W[, 3|4]) RGB numpy array."""
    if isinstance(img, (str, Path)):
        bgr = cv2.imread(str(img))
        if bgr is None:
            raise ConfigError(f"image '{img}' not found or not readable")
        return bgr, str(img)
    arr = np.asarray(img.convert("RGB") if hasattr(img, "convert") else img)  # PIL: any mode -> RGB
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ConfigError(f"image array of shape {arr.shape}: expected (H, W), (H, W, 3) or (H, W, 4) RGB(A)")
    if arr.dtype != np.uint8:  # floats in 0..1 (as matplotlib) or 0..255
        arr = arr * 255 if arr.dtype.kind == "f" and arr.max() <= 1.0 else arr
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr[:, :, 2::-1]), f"{type(img).__name__} image"


class HubModel:
    """A callable detector: ``model(images, size=None) -> list[Detections]``, one per image.

    ``backend``: any ``engine.backends.Backend``. ``size``: inference size in pixels (an exported fixed-shape file
    uses its own). ``conf``, ``iou``, ``max_det``, ``classes``: the NMS settings of detect.py, changeable as
    attributes."""

    def __init__(self, backend: Backend, size: int = 640, conf: float = 0.25, iou: float = 0.45,
                 max_det: int = 1000, classes: Sequence[int] | None = None) -> None:
        self.backend, self.size, self.conf, self.iou, self.max_det, self.classes = \
            backend, size, conf, iou, max_det, classes

    @property
    def names(self) -> list[str]:
        return self.backend.names

    def __call__(self, images: Any, size: int | None = None) -> list[Detections]:
        batch = images if isinstance(images, (list, tuple)) else [images]
        return [self._detect(img, size or self.size) for img in batch]

    def _detect(self, img: Any, size: int) -> Detections:
        bgr, label = to_bgr(img)
        det, _ = predict_image(self.backend, bgr, size, conf_thres=self.conf, iou_thres=self.iou,
                               classes=self.classes, max_det=self.max_det)
        det = det.float().numpy()
        ids = det[:, 5].astype(np.int64)
        return Detections(det[:, :4].copy(), det[:, 4].copy(), ids, [self.names[i] for i in ids],
                          tuple(bgr.shape[:2]), label)


def load_custom(path: str | Path, device: str = "", **kwargs: Any) -> HubModel:
    """A trained model from a .pt checkpoint, .onnx or .torchscript file (``kwargs``: HubModel settings)."""
    return HubModel(load_backend(path, select_device(device)), **kwargs)


def build_untrained(scale: str, norm: str = "bn", nc: int = 80, device: str = "", **kwargs: Any) -> HubModel:
    """A randomly initialised ``scale`` ('n' or 's') model with the given norm spec (e.g. 'gn:C/16'), BN folded."""
    model = Model(ROOT / "cfg" / "models" / f"yolo-{scale}-bn.yaml", nc=nc, norm=norm)
    model = model.to(select_device(device)).eval().fuse()
    model.requires_grad_(False)
    return HubModel(TorchBackend(model), **kwargs)
