"""Draw sample images of the built-in dataset with their boxes and class names (the README picture).

    python scripts/plot_samples.py [--n 8] [--seed 0] [--out docs/images/synthetic_samples.jpg]

Renders images straight from ``data.synthetic.render_image`` (no dataset folder needed), so the picture shows
exactly what the generator writes for the default seed's first train images.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def draw_boxes(img: np.ndarray, objs: list[tuple[int, list[float]]], names: list[str]) -> np.ndarray:
    """Draw xywh pixel boxes with class names on a BGR image (a copy); one colour per class."""
    out = img.copy()
    for c, (x, y, w, h) in objs:
        col = tuple(int(v) for v in cv2.cvtColor(np.uint8([[[c * 18 % 180, 255, 255]]]), cv2.COLOR_HSV2BGR)[0, 0])
        p1, p2 = (int(round(x)), int(round(y))), (int(round(x + w)), int(round(y + h)))
        cv2.rectangle(out, p1, p2, col, 1, cv2.LINE_AA)
        (tw, th), _ = cv2.getTextSize(names[c], cv2.FONT_HERSHEY_SIMPLEX, 0.35, 1)
        ty = p1[1] - 2 if p1[1] - th - 3 >= 0 else p2[1] + th + 2
        cv2.rectangle(out, (p1[0], ty - th - 2), (p1[0] + tw + 2, ty + 2), col, -1)
        cv2.putText(out, names[c], (p1[0] + 1, ty), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def grid(images: list[np.ndarray], cols: int, cell: int = 320, pad: int = 4) -> np.ndarray:
    """Letterbox each image into a cell x cell tile and tile them on a white canvas."""
    rows = (len(images) + cols - 1) // cols
    canvas = np.full((rows * (cell + pad) + pad, cols * (cell + pad) + pad, 3), 255, np.uint8)
    for k, im in enumerate(images):
        r = cell / max(im.shape[:2])
        im = cv2.resize(im, (round(im.shape[1] * r), round(im.shape[0] * r)), interpolation=cv2.INTER_AREA)
        y = pad + (k // cols) * (cell + pad) + (cell - im.shape[0]) // 2
        x = pad + (k % cols) * (cell + pad) + (cell - im.shape[1]) // 2
        canvas[y:y + im.shape[0], x:x + im.shape[1]] = im
    return canvas


def main(argv: list[str] | None = None) -> int:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from data.synthetic import CLASSES, render_image

    ap = argparse.ArgumentParser(description="Write a grid of synthetic samples with boxes drawn")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cols", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "docs" / "images" / "synthetic_samples.jpg"))
    a = ap.parse_args(argv)
    tiles = [draw_boxes(*render_image(a.seed, "train", i), CLASSES) for i in range(a.n)]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), grid(tiles, a.cols), [cv2.IMWRITE_JPEG_QUALITY, 90])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
