"""Run a NormYOLO checkpoint on images, folders, globs, videos, .txt lists or a webcam.

    python detect.py --weights runs/train/exp/weights/best.pt --source data/images --save-txt

Annotated images / videos go to runs/detect/exp*/ (labels/, crops/ and predictions.json when asked).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from utils.boxes import label_lines, non_max_suppression
from utils.general import LOGGER, ConfigError, increment_path, run_cli, select_device, setup_logging

ROOT = Path(__file__).resolve().parent


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Detect objects with a NormYOLO checkpoint.")
    p.add_argument("--weights", required=True, help="checkpoint (EMA weights preferred)")
    p.add_argument("--source", required=True, help="image, folder, glob, video, .txt list, or webcam index")
    p.add_argument("--img", "--img-size", type=int, default=640, dest="img", help="inference size (pixels)")
    p.add_argument("--conf-thres", type=float, default=0.25)
    p.add_argument("--iou-thres", type=float, default=0.45)
    p.add_argument("--max-det", type=int, default=1000)
    p.add_argument("--classes", type=int, nargs="+", help="keep only these class indices")
    p.add_argument("--agnostic-nms", action="store_true", help="class-agnostic NMS")
    p.add_argument("--device", default="", help="cuda device, i.e. 0, or cpu")
    p.add_argument("--save-txt", action="store_true", help="write labels/*.txt (class cx cy w h, normalised)")
    p.add_argument("--save-conf", action="store_true", help="append the confidence to --save-txt lines")
    p.add_argument("--save-json", action="store_true", help="write predictions.json")
    p.add_argument("--save-crop", action="store_true", help="write crops/<class>/<file>.jpg")
    p.add_argument("--nosave", action="store_true", help="do not write annotated images / videos")
    p.add_argument("--line-thickness", type=int, default=None, help="box line width (pixels; default by size)")
    p.add_argument("--hide-labels", action="store_true")
    p.add_argument("--hide-conf", action="store_true")
    p.add_argument("--vid-stride", type=int, default=1, help="keep every n-th video frame")
    p.add_argument("--project", default=str(ROOT / "runs/detect"))
    p.add_argument("--name", default="exp")
    p.add_argument("--exist-ok", action="store_true")
    return p.parse_args(argv)


def preprocess(img_bgr: np.ndarray, img_size: int, stride: int, device: torch.device,
               channels_last: bool) -> tuple[torch.Tensor, float, tuple[int, int]]:
    """BGR (H0, W0, 3) uint8 -> letterboxed (minimal padding) RGB (1, 3, H, W) float 0..1, ratio, pad."""
    from data.augment import letterbox

    img, r, pad = letterbox(img_bgr, img_size, stride=stride, auto=True)
    x = torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))).to(device)
    x = x.float().div_(255).unsqueeze(0)
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), r, pad


class _Writers:
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


def _counts(det: torch.Tensor, names: list[str]) -> str:
    """'2 person, 1 car' for a (n, 6) detection tensor; '(no detections)' when empty."""
    c = Counter(int(k) for k in det[:, 5].tolist())
    if not c:
        return "(no detections)"
    return ", ".join(f"{n} {names[k]}" for k, n in sorted(c.items()))


def main(opt: argparse.Namespace) -> dict[str, Any]:
    """Detect on every frame of ``opt.source``; returns {'save_dir', 'images', 'skipped', 'detections'}."""
    from data.augment import scale_boxes_to_original
    from data.sources import MediaSource
    from utils.plots import box_label, color, default_line_width
    from engine.checkpoint import load_model

    setup_logging()
    for flag, v in (("--conf-thres", opt.conf_thres), ("--iou-thres", opt.iou_thres)):
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{flag} {v}: expected a value in [0, 1]")
    device = select_device(opt.device)
    source = MediaSource(opt.source, vid_stride=opt.vid_stride)  # an empty / missing source fails here
    model = load_model(opt.weights, device)
    names = [str(n) for n in model.names]
    if opt.classes and any(not 0 <= c < len(names) for c in opt.classes):
        raise ConfigError(f"--classes {opt.classes}: the model has classes 0..{len(names) - 1}")
    stride = int(model.stride.max())
    channels_last = device.type == "cpu"
    save_dir = increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok)
    if opt.save_txt:
        (save_dir / "labels").mkdir(exist_ok=True)
    writers, records, n_frames, n_dets = _Writers(), [], 0, 0
    try:
        for frame in source:
            t0 = time.perf_counter()
            x, r, pad = preprocess(frame.image, opt.img, stride, device, channels_last)
            with torch.inference_mode():
                out = model(x)
            out = out[0] if isinstance(out, (list, tuple)) else out
            det = non_max_suppression(out.float(), opt.conf_thres, opt.iou_thres, classes=opt.classes,
                                      agnostic=opt.agnostic_nms, max_det=opt.max_det)[0].cpu()
            det = torch.as_tensor(scale_boxes_to_original(det, r, pad, frame.image.shape[:2]))
            ms = (time.perf_counter() - t0) * 1000
            n_frames += 1
            n_dets += len(det)
            p = Path(frame.path)
            stem = p.stem if frame.kind == "image" else f"{p.stem if frame.kind == 'video' else 'webcam'}_{frame.index}"
            where = f"frame {frame.index + 1}/{frame.count or '?'} " if frame.kind != "image" else ""
            LOGGER.info(f"{frame.file_index + 1}/{len(source)} {frame.path}: {where}{x.shape[2]}x{x.shape[3]} "
                        f"{_counts(det, names)}, {ms:.1f}ms")
            h0, w0 = frame.image.shape[:2]
            if opt.save_txt:
                (save_dir / "labels" / f"{stem}.txt").write_text(label_lines(det, (h0, w0), conf=opt.save_conf))
            if opt.save_json:
                records += [{"file": frame.path, "frame": frame.index, "class": int(c), "name": names[int(c)],
                             "score": round(float(s), 5), "bbox_xyxy": [round(v, 2) for v in b]}
                            for b, s, c in zip(det[:, :4].tolist(), det[:, 4].tolist(), det[:, 5].tolist())]
            if opt.save_crop:
                for j, (*b, s, c) in enumerate(det.tolist()):
                    x1, y1, x2, y2 = (int(round(v)) for v in b)
                    if x2 > x1 and y2 > y1:
                        crop_dir = save_dir / "crops" / names[int(c)]
                        crop_dir.mkdir(parents=True, exist_ok=True)
                        cv2.imwrite(str(crop_dir / f"{stem}_{j}.jpg"), frame.image[y1:y2, x1:x2])
            if not opt.nosave:
                img = frame.image.copy()
                lw = opt.line_thickness or default_line_width(img.shape)
                for *b, s, c in reversed(det.tolist()):  # best boxes drawn last, on top
                    label = "" if opt.hide_labels else (names[int(c)] if opt.hide_conf else f"{names[int(c)]} {s:.2f}")
                    box_label(img, b, label, color(int(c)), lw)
                if frame.kind == "image":
                    cv2.imwrite(str(save_dir / p.name), img)
                else:
                    name = f"{p.stem if frame.kind == 'video' else 'webcam'}.mp4"
                    writers.write(frame.path, save_dir / name, img, frame.fps)
    except KeyboardInterrupt:  # the way to stop a webcam: finish the files cleanly
        LOGGER.info("interrupted")
    finally:
        writers.close()
    if opt.save_json:
        (save_dir / "predictions.json").write_text(json.dumps(records))
    if n_frames == 0:
        raise ConfigError(f"source '{opt.source}': none of its {len(source)} file(s) could be read")
    if source.skipped:
        LOGGER.warning(f"{len(source.skipped)} input(s) skipped as unreadable")
    saved = f", {len(list((save_dir / 'labels').glob('*.txt')))} label files in labels/" if opt.save_txt else ""
    LOGGER.info(f"{n_frames} frame(s), {n_dets} detections; results saved to {save_dir}{saved}")
    return {"save_dir": str(save_dir), "images": n_frames, "skipped": list(source.skipped), "detections": n_dets}


def cli(argv: list[str] | None = None) -> int:
    """Command-line entry: ConfigError -> 'error: ...' on stderr and exit code 2."""
    return run_cli(main, parse_opt, argv)


if __name__ == "__main__":
    sys.exit(cli())
