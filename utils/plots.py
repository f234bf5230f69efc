"""Drawing (OpenCV) and evaluation plots (matplotlib, object API: no pyplot global state, no backend switching)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from matplotlib.figure import Figure

# 20 distinguishable colours (matplotlib's tab20 order, as RGB); class i uses PALETTE[i % 20].
_TAB20 = ("1f77b4", "ff7f0e", "2ca02c", "d62728", "9467bd", "8c564b", "e377c2", "7f7f7f", "bcbd22", "17becf",
          "aec7e8", "ffbb78", "98df8a", "ff9896", "c5b0d5", "c49c94", "f7b6d2", "c7c7c7", "dbdb8d", "9edae5")
PALETTE = [tuple(int(h[i:i + 2], 16) for i in (0, 2, 4)) for h in _TAB20]


def color(i: int, bgr: bool = True) -> tuple[int, int, int]:
    """The colour of class ``i``, BGR for OpenCV by default."""
    r, g, b = PALETTE[int(i) % len(PALETTE)]
    return (b, g, r) if bgr else (r, g, b)


def default_line_width(shape: Sequence[int]) -> int:
    """A box line width that stays visible on big images and thin on small ones: ~0.3% of the image size."""
    return max(round(sum(shape[:2]) / 2 * 0.003), 2)


def box_label(img: np.ndarray, xyxy: Sequence[float], label: str = "", col: tuple[int, int, int] = (128, 128, 128),
              lw: int | None = None) -> None:
    """Draw one box with an optional filled label tag on a BGR uint8 image (in place).

    The tag sits above the box, or inside it when the box touches the top edge; text is white or black, whichever
    contrasts with the tag colour, so class names stay legible on any palette entry.
    """
    lw = lw or default_line_width(img.shape)
    p1, p2 = (int(xyxy[0]), int(xyxy[1])), (int(xyxy[2]), int(xyxy[3]))
    cv2.rectangle(img, p1, p2, col, thickness=lw, lineType=cv2.LINE_AA)
    if not label:
        return
    font_scale, tf = max(lw / 3, 0.4), max(lw - 1, 1)  # never below ~9 px glyphs: thin boxes keep readable labels
    (w, h), baseline = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, tf)
    outside = p1[1] - h - baseline - 3 >= 0
    top = p1[1] - h - baseline - 3 if outside else p1[1]
    cv2.rectangle(img, (p1[0], top), (p1[0] + w + 2, top + h + baseline + 3), col, -1, cv2.LINE_AA)
    luminance = 0.299 * col[2] + 0.587 * col[1] + 0.114 * col[0]
    text_col = (0, 0, 0) if luminance > 150 else (255, 255, 255)
    cv2.putText(img, label, (p1[0] + 1, top + h + 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale, text_col, tf, cv2.LINE_AA)


def draw_detections(img: np.ndarray, dets: torch.Tensor | np.ndarray, names: Sequence[str], lw: int | None = None,
                    hide_labels: bool = False, hide_conf: bool = False) -> np.ndarray:
    """Draw (n, 6) x1, y1, x2, y2, conf, cls detections (or (n, 5) without conf) on a BGR image, in place."""
    d = dets.detach().cpu().numpy() if isinstance(dets, torch.Tensor) else np.asarray(dets)
    has_conf = d.shape[1] == 6 if d.ndim == 2 else False
    for row in d[::-1]:  # lowest confidence first, so the best boxes end up on top
        c = int(row[-1])
        name = names[c] if 0 <= c < len(names) else str(c)
        label = "" if hide_labels else (name if hide_conf or not has_conf else f"{name} {row[4]:.2f}")
        box_label(img, row[:4], label, color(c), lw)
    return img


def targets_per_image(targets: torch.Tensor, n: int, height: int, width: int) -> list[np.ndarray]:
    """Batch targets (M, 6) image_index, cls, cx, cy, w, h (normalised) -> n arrays (m_i, 5) x1, y1, x2, y2, cls."""
    t = targets.detach().cpu().numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
    out = []
    for i in range(n):
        ti = t[t[:, 0] == i]
        cx, cy, w, h = ti[:, 2] * width, ti[:, 3] * height, ti[:, 4] * width, ti[:, 5] * height
        out.append(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, ti[:, 1]], axis=1))
    return out


def plot_batch(imgs: torch.Tensor, boxes: Sequence[np.ndarray | torch.Tensor], names: Sequence[str],
               path: str | Path, paths: Sequence[str] | None = None, max_images: int = 16,
               max_size: int = 1920) -> Path:
    """Save :func:`batch_mosaic` of the batch as an image file."""
    path = Path(path)
    cv2.imwrite(str(path), batch_mosaic(imgs, boxes, names, paths, max_images, max_size))
    return path


def batch_mosaic(imgs: torch.Tensor, boxes: Sequence[np.ndarray | torch.Tensor], names: Sequence[str],
                 paths: Sequence[str] | None = None, max_images: int = 16, max_size: int = 1920) -> np.ndarray:
    """A BGR uint8 mosaic of up to ``max_images`` batch images with their boxes.

    Args:
        imgs (Tensor): (N, 3, H, W) RGB in 0..1 (the letterboxed batch).
        boxes: per image, (n, 5) x1, y1, x2, y2, cls (labels) or (n, 6) with conf before cls (predictions), in the
            batch image's pixels.
        paths: file names written in each tile's corner.
    """
    n = min(len(imgs), max_images)
    h, w = imgs.shape[2:]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    scale = min(1.0, max_size / (max(h, w) * cols))  # keep the mosaic under max_size pixels across
    th, tw = int(h * scale), int(w * scale)
    mosaic = np.full((rows * th, cols * tw, 3), 255, dtype=np.uint8)
    for i in range(n):
        tile = (imgs[i].detach().float().cpu().permute(1, 2, 0).numpy() * 255).clip(0, 255).astype(np.uint8)
        tile = cv2.cvtColor(tile, cv2.COLOR_RGB2BGR)
        if scale != 1.0:
            tile = cv2.resize(tile, (tw, th), interpolation=cv2.INTER_AREA)
        if paths is not None:  # file name on a dark strip, readable over any image
            name = Path(paths[i]).name[:40]
            (text_w, text_h), _ = cv2.getTextSize(name, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
            cv2.rectangle(tile, (0, 0), (text_w + 8, text_h + 8), (40, 40, 40), -1)
            cv2.putText(tile, name, (4, text_h + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (240, 240, 240), 1, cv2.LINE_AA)
        b = boxes[i].detach().cpu().numpy() if isinstance(boxes[i], torch.Tensor) else np.asarray(boxes[i])
        if b.size:
            b = b.copy()
            b[:, :4] *= scale
            draw_detections(tile, b, names, lw=max(1, default_line_width(tile.shape) // 2))
        y, x = (i // cols) * th, (i % cols) * tw
        mosaic[y:y + th, x:x + tw] = tile
        cv2.rectangle(mosaic, (x, y), (x + tw - 1, y + th - 1), (255, 255, 255), 2)
    return mosaic


def _class_legend(ax, n: int) -> None:
    if n < 21:  # beyond ~20 curves a legend is unreadable; the mean curve carries the message
        ax.legend(loc="lower left", bbox_to_anchor=(1.02, 0), fontsize=7, frameon=False)
    else:
        ax.legend(handles=ax.get_lines()[-1:], loc="lower left", bbox_to_anchor=(1.02, 0), fontsize=7, frameon=False)


def plot_pr_curve(pr: np.ndarray, ap50: np.ndarray, names: Sequence[str], path: str | Path) -> Path:
    """Precision-recall at IoU 0.5 from COCOeval's precision array: pr (K, 101) over recall 0..1, ap50 (K,)."""
    fig = Figure(figsize=(9, 6), tight_layout=True)
    ax = fig.subplots()
    recall = np.linspace(0, 1, pr.shape[1] if pr.ndim == 2 else 101)
    for k in range(len(pr)):
        ax.plot(recall, pr[k], linewidth=1, label=f"{names[k]} {ap50[k]:.3f}")
    if len(pr):
        ax.plot(recall, pr.mean(0), linewidth=3, color="blue", label=f"all classes {ap50.mean():.3f} mAP@0.5")
    ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.01), title="Precision-Recall (IoU 0.5)")
    _class_legend(ax, len(pr))
    fig.savefig(path, dpi=200)
    return Path(path)


def plot_metric_curve(x: np.ndarray, y: np.ndarray, names: Sequence[str], path: str | Path,
                      ylabel: str = "F1") -> Path:
    """A per-class metric against confidence: x (P,) confidences, y (K, P); the mean curve is labelled at its peak."""
    fig = Figure(figsize=(9, 6), tight_layout=True)
    ax = fig.subplots()
    for k in range(len(y)):
        ax.plot(x, y[k], linewidth=1, label=str(names[k]))
    if len(y):
        mean = y.mean(0)
        i = int(mean.size - 1 - mean[::-1].argmax())  # highest confidence reaching the peak, as val.py reports
        ax.plot(x, mean, linewidth=3, color="blue", label=f"all classes {mean[i]:.2f} at {x[i]:.3f}")
    ax.set(xlabel="Confidence", ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.01), title=f"{ylabel}-Confidence")
    _class_legend(ax, len(y))
    fig.savefig(path, dpi=200)
    return Path(path)


def plot_confusion_matrix(matrix: np.ndarray, names: Sequence[str], path: str | Path, normalize: bool = True) -> Path:
    """(nc + 1, nc + 1) matrix, rows = predicted, columns = true, last row / column = background.

    Normalised per column (each true class sums to 1), so a column reads "where did this class's boxes go".
    """
    m = matrix.astype(float)
    if normalize:
        m = m / np.maximum(m.sum(0, keepdims=True), 1e-9)
    m[m < 0.005] = np.nan  # blank near-empty cells so the real confusions stand out
    labels = [*names, "background"]
    n = len(labels)
    fig = Figure(figsize=(min(4 + 0.35 * n, 20), min(3 + 0.3 * n, 17)), tight_layout=True)
    ax = fig.subplots()
    im = ax.imshow(m, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046)
    if n <= 30:  # tick labels and values only while they fit
        ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(n), labels, fontsize=8)
        for i in range(n):
            for j in range(n):
                if not np.isnan(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}" if normalize else f"{int(m[i, j])}", ha="center", va="center",
                            fontsize=7, color="white" if m[i, j] > 0.5 else "black")
    ax.set(xlabel="True", ylabel="Predicted", title="Confusion matrix" + (" (normalised)" if normalize else ""))
    fig.savefig(path, dpi=150)
    return Path(path)
