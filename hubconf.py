"""torch.hub entry points (``torch.hub.load(REPO, NAME, source="local", ...)``).

    model = torch.hub.load(".", "custom", path="runs/train/exp/weights/best.pt", source="local")
    model = torch.hub.load(".", "yolo_n", source="local", norm="gn:C/16")      # untrained

Each returns an ``engine.hub.HubModel``: call it on a file path, a numpy RGB array, a PIL image or a list of them;
it returns one ``Detections`` per image (boxes xyxy in pixels, scores, class_ids, names).
"""
from __future__ import annotations

from typing import Any

dependencies = ["torch", "torchvision", "numpy", "cv2", "yaml"]  # torch.hub checks these are importable


def custom(path: str, device: str = "", **kwargs: Any) -> Any:
    """A trained model: a NormYOLO .pt checkpoint, or an .onnx / .torchscript file from export.py.
    ``kwargs``: size, conf, iou, max_det, classes (see engine.hub.HubModel)."""
    from engine.hub import load_custom

    return load_custom(path, device, **kwargs)


def yolo_n(norm: str = "bn", nc: int = 80, device: str = "", **kwargs: Any) -> Any:
    """An untrained n model (YOLOv5n topology) with the norm spec ``norm`` (bn, gn:C/16, gn:32, ln, in, ...)."""
    from engine.hub import build_untrained

    return build_untrained("n", norm, nc, device, **kwargs)


def yolo_s(norm: str = "bn", nc: int = 80, device: str = "", **kwargs: Any) -> Any:
    """An untrained s model (YOLOv5s topology) with the norm spec ``norm``."""
    from engine.hub import build_untrained

    return build_untrained("s", norm, nc, device, **kwargs)
