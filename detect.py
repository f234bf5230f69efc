"""Run a NormYOLO checkpoint on images, folders, globs, videos, .txt lists or a webcam.

    python detect.py --weights runs/train/exp/weights/best.pt --source data/images --save-txt

Annotated images / videos go to runs/detect/exp*/ (labels/, crops/ and predictions.json when asked).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from utils.general import LOGGER, ROOT, ConfigError, increment_path, run_cli, select_device, setup_logging
from utils.memory import retain_freed_memory

# detect.py flags that go to engine.predict.FrameSaver as they are
SAVER_FLAGS = ("save_txt", "save_conf", "save_json", "save_crop", "nosave", "line_thickness", "hide_labels",
               "hide_conf")


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Detect objects with a NormYOLO checkpoint.")
    p.add_argument("--weights", required=True, help=".pt checkpoint (EMA weights preferred), .onnx or .torchscript")
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


def main(opt: argparse.Namespace) -> dict[str, Any]:
    """Detect on every frame of ``opt.source``; returns {'save_dir', 'images', 'skipped', 'detections'}."""
    from data.sources import MediaSource
    from engine.backends import load_backend
    from engine.predict import FrameSaver, counts_text, predict_image

    setup_logging()
    for flag, v in (("--conf-thres", opt.conf_thres), ("--iou-thres", opt.iou_thres)):
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{flag} {v}: expected a value in [0, 1]")
    device = select_device(opt.device)
    if device.type == "cpu":
        retain_freed_memory()  # utils/memory.py: large activations are reused, not page-faulted in again
    source = MediaSource(opt.source, vid_stride=opt.vid_stride)  # an empty / missing source fails here
    model = load_backend(opt.weights, device)  # .pt, .onnx or .torchscript: the same pre- / post-processing
    names = [str(n) for n in model.names]
    if opt.classes and any(not 0 <= c < len(names) for c in opt.classes):
        raise ConfigError(f"--classes {opt.classes}: the model has classes 0..{len(names) - 1}")
    save_dir = increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok)
    saver = FrameSaver(save_dir, names, **{k: getattr(opt, k) for k in SAVER_FLAGS})
    n_frames = n_dets = 0
    try:
        for frame in source:
            t0 = time.perf_counter()
            det, shape = predict_image(model, frame.image, opt.img, conf_thres=opt.conf_thres,
                                       iou_thres=opt.iou_thres, classes=opt.classes, agnostic=opt.agnostic_nms,
                                       max_det=opt.max_det)
            ms = (time.perf_counter() - t0) * 1000
            n_frames, n_dets = n_frames + 1, n_dets + len(det)
            where = f"frame {frame.index + 1}/{frame.count or '?'} " if frame.kind != "image" else ""
            LOGGER.info(f"{frame.file_index + 1}/{len(source)} {frame.path}: {where}{shape[2]}x{shape[3]} "
                        f"{counts_text(det, names)}, {ms:.1f}ms")
            saver.save(frame, det)
    except KeyboardInterrupt:  # the way to stop a webcam: finish the files cleanly
        LOGGER.info("interrupted")
    finally:
        saver.close()
    saver.write_json()
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
