"""Inference on media for detect.py: letterbox a frame, run the model, NMS, boxes back in the frame's pixels; and
the per-frame outputs (annotated image / video, YOLO label lines, crops, JSON records)."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch
import torch.nn as nn

from data.augment import letterbox, scale_boxes_to_original
from engine.backends import Backend, as_backend
from utils.boxes import label_lines, non_max_suppression
from utils.plots import default_line_width, draw_detections


def preprocess(img_bgr: np.ndarray, img_size: int | tuple[int, int], stride: int, device: torch.device,
               channels_last: bool, auto: bool = True) -> tuple[torch.Tensor, float, tuple[int, int]]:
    """BGR (H0, W0, 3) uint8 -> letterboxed RGB (1, 3, H, W) float 0..1, ratio, pad. ``auto``: minimal padding
    (to the next stride multiple); False pads to the full ``img_size`` (a fixed-shape exported model)."""
    img, r, pad = letterbox(img_bgr, img_size, stride=stride, auto=auto)
    x = torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))).to(device)
    x = x.float().div_(255).unsqueeze(0)
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), r, pad


def predict_image(model: nn.Module | Backend, img_bgr: np.ndarray, img_size: int, *, conf_thres: float,
                  iou_thres: float, classes: Sequence[int] | None = None, agnostic: bool = False, max_det: int = 1000
                  ) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Detections (n, 6) x1, y1, x2, y2, conf, cls in the image's own pixels (CPU), and the input shape used.

    ``model``: an nn.Module or any ``engine.backends.Backend``; a fixed-shape exported file gets its own input size.
    """
    backend = as_backend(model)
    fixed = backend.fixed_shape
    x, r, pad = preprocess(img_bgr, fixed or img_size, backend.stride, backend.device, backend.channels_last,
                           auto=fixed is None)
    with torch.inference_mode():
        out = backend(x)
    det = non_max_suppression(out.float(), conf_thres, iou_thres, classes=classes, agnostic=agnostic,
                              max_det=max_det)[0].cpu()
    return torch.as_tensor(scale_boxes_to_original(det, r, pad, img_bgr.shape[:2])), tuple(x.shape)


class VideoWriters:
    """One cv2.VideoWriter per video / stream, opened on its first frame and closed at the end."""

    def __init__(self) -> None:
        self.open: dict[str, cv2.VideoWriter] = {}

    def write(self, key: str, path: Path, frame: np.ndarray, fps: float) -> None:
        if key not in self.open:
            h, w = frame.shape[:2]
            self.open[key] = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
        self.open[key].write(frame)

    def close(self) -> None:
        for wr in self.open.values():
            wr.release()
        self.open.clear()


def counts_text(det: torch.Tensor, names: list[str]) -> str:
    """'2 person, 1 car' for a (n, 6) detection tensor; '(no detections)' when empty."""
    c = Counter(int(k) for k in det[:, 5].tolist())
    if not c:
        return "(no detections)"
    return ", ".join(f"{n} {names[k]}" for k, n in sorted(c.items()))


def json_records(det: torch.Tensor, path: str, frame: int, names: list[str]) -> list[dict[str, Any]]:
    """predictions.json entries of one frame (boxes xyxy in its pixels, rounded)."""
    return [{"file": path, "frame": frame, "class": int(c), "name": names[int(c)], "score": round(float(s), 5),
             "bbox_xyxy": [round(v, 2) for v in b]}
            for b, s, c in zip(det[:, :4].tolist(), det[:, 4].tolist(), det[:, 5].tolist())]


def save_crops(det: torch.Tensor, img_bgr: np.ndarray, names: list[str], crops_dir: Path, stem: str) -> None:
    """crops_dir/<class>/<stem>_<j>.jpg for every detection with a non-empty box."""
    for j, (*b, _s, c) in enumerate(det.tolist()):
        x1, y1, x2, y2 = (int(round(v)) for v in b)
        if x2 > x1 and y2 > y1:
            crop_dir = crops_dir / names[int(c)]
            crop_dir.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(crop_dir / f"{stem}_{j}.jpg"), img_bgr[y1:y2, x1:x2])


@dataclass
class FrameSaver:
    """What detect.py writes per frame under ``save_dir``: labels/*.txt, predictions.json, crops/, and the
    annotated image or video (unless ``nosave``)."""

    save_dir: Path
    names: list[str]
    save_txt: bool = False
    save_conf: bool = False
    save_json: bool = False
    save_crop: bool = False
    nosave: bool = False
    line_thickness: int | None = None
    hide_labels: bool = False
    hide_conf: bool = False
    records: list[dict[str, Any]] = field(default_factory=list)
    writers: VideoWriters = field(default_factory=VideoWriters)

    def __post_init__(self) -> None:
        if self.save_txt:
            (self.save_dir / "labels").mkdir(exist_ok=True)

    def save(self, frame: Any, det: torch.Tensor) -> None:
        """Write the outputs of one ``data.sources.Frame`` and its (n, 6) detections in its pixels."""
        p, kind = Path(frame.path), frame.kind
        stem = p.stem if kind == "image" else f"{p.stem if kind == 'video' else 'webcam'}_{frame.index}"
        if self.save_txt:
            (self.save_dir / "labels" / f"{stem}.txt").write_text(label_lines(det, frame.image.shape[:2],
                                                                              conf=self.save_conf))
        if self.save_json:
            self.records += json_records(det, frame.path, frame.index, self.names)
        if self.save_crop:
            save_crops(det, frame.image, self.names, self.save_dir / "crops", stem)
        if self.nosave:
            return
        img = draw_detections(frame.image.copy(), det, self.names,
                              self.line_thickness or default_line_width(frame.image.shape), self.hide_labels,
                              self.hide_conf)
        if kind == "image":
            cv2.imwrite(str(self.save_dir / p.name), img)
        else:
            self.writers.write(frame.path, self.save_dir / f"{p.stem if kind == 'video' else 'webcam'}.mp4", img,
                               frame.fps)

    def close(self) -> None:
        """Finish the videos (also after an error or Ctrl-C: the files stay playable)."""
        self.writers.close()

    def write_json(self) -> None:
        """predictions.json with every frame's records (when asked), once the source is done."""
        if self.save_json:
            (self.save_dir / "predictions.json").write_text(json.dumps(self.records))
