"""The built-in dataset: deterministic synthetic shapes written as COCO JSON + JPEG images.

Ten shape classes at COCO small / medium / large scale, with random colour, fill pattern, rotation and aspect,
partial occlusion (at most ~40 % of an object's box covered), distractor clutter (lines, arcs, dots, text)
and textured backgrounds. Each image is drawn from its own RNG seeded by (seed, split, index), so the output
does not depend on the number of processes, and the same seed gives byte-identical annotation files.

    python -m data.synthetic --out datasets/synthetic [--seed 0] [--train 2000 --val 500] [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

CLASSES = ["circle", "square", "triangle", "star", "cross", "ring", "hexagon", "arrow", "crescent", "heart"]
SIZES = [(320, 320), (352, 352), (384, 384), (416, 416), (416, 320), (320, 416), (384, 288), (288, 384), (416, 288)]
SCALE_BINS = [(0.30, 11, 28), (0.50, 34, 90), (0.20, 100, 200)]  # (probability, min, max box side px)
SPLITS = {"train": 0, "val": 1}
# Variants: "default" is the built-in dataset above. "study" is the BN-vs-GN study's smaller, easier variant
# (compare.py --preset gn-paper): 192-256 px images, objects of COCO medium size and up only, at most 5 per image,
# lighter clutter, and six of the ten classes (the most distinct outlines), so short runs get far enough to compare
# norms. Same renderer and randomness. "classes" (optional) is the subset a variant draws, in category-id order.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {"sizes": SIZES, "bins": SCALE_BINS, "objects": (1, 9), "clutter": (3, 12)},
    "study": {"sizes": [(224, 224), (256, 256), (256, 192), (192, 256), (224, 192), (192, 224)],
              "bins": [(0.55, 32, 72), (0.45, 72, 150)], "objects": (1, 6), "clutter": (1, 5),
              "classes": ["circle", "square", "triangle", "star", "cross", "arrow"]},
}


def _ngon(n: int, r: float = 1.0, start: float = -np.pi / 2) -> np.ndarray:
    t = start + np.arange(n) * 2 * np.pi / n
    return np.stack([np.cos(t), np.sin(t)], 1) * r


def _shapes() -> dict[str, list[np.ndarray]]:
    """Unit-size contours per class (several contours = holes, filled even-odd by cv2.fillPoly)."""
    star = _ngon(10) * np.where(np.arange(10) % 2 == 0, 1.0, 0.42)[:, None]
    a, w = 1.0, 0.34
    cross = np.array([(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w),
                      (-a, -w), (-w, -w)])
    arrow = np.array([(-1, -0.28), (0.15, -0.28), (0.15, -0.7), (1, 0), (0.15, 0.7), (0.15, 0.28), (-1, 0.28)])
    # crescent = unit disc minus a disc of radius 0.8 centred at (0.45, 0); they cross at x = 0.625
    t1 = np.linspace(np.arctan2(0.78, 0.625), 2 * np.pi - np.arctan2(0.78, 0.625), 32)
    t2 = np.linspace(2 * np.pi - np.arctan2(0.78, 0.175), np.arctan2(0.78, 0.175), 24)
    crescent = np.concatenate([np.stack([np.cos(t1), np.sin(t1)], 1),
                               np.stack([0.45 + 0.8 * np.cos(t2), 0.8 * np.sin(t2)], 1)])
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    heart_y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    heart = np.stack([16 * np.sin(t) ** 3, -heart_y], 1)
    heart = (heart - (heart.max(0) + heart.min(0)) / 2) / 16.5
    return {"circle": [_ngon(40)], "square": [_ngon(4, 1.0, np.pi / 4)], "triangle": [_ngon(3) + [0, 0.25]],
            "star": [star], "cross": [cross], "ring": [_ngon(40), _ngon(40, 0.55)], "hexagon": [_ngon(6)],
            "arrow": [arrow], "crescent": [crescent], "heart": [heart]}


SHAPES = _shapes()


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Gradient + low-frequency colour noise + one of several faint textures + pixel noise (uint8 BGR).

    Smooth parts are built on a coarse grid and upsampled: full-resolution float maths dominated the run time.
    """
    c0, c1 = rng.uniform(20, 235, 3).astype(np.float32), rng.uniform(20, 235, 3).astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    cell = int(rng.integers(24, 96))
    gh, gw = h // cell + 2, w // cell + 2
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    g = ((xx * w / (gw - 1) * np.cos(ang) + yy * h / (gh - 1) * np.sin(ang)) / max(h, w) + 1) / 2
    small = c0 + (c1 - c0) * g[..., None] + rng.normal(0, rng.uniform(8, 25), (gh, gw, 3)).astype(np.float32)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    kind = rng.integers(4)
    if kind == 1:  # stripes: a 1-D sine profile rotated into place
        f, a = rng.uniform(0.05, 0.3), rng.uniform(8, 20)
        d = max(h, w) * 2
        prof = np.tile((a * np.sin(np.arange(d, dtype=np.float32) * f))[None, :], (d, 1))
        m = cv2.getRotationMatrix2D((d / 2, d / 2), float(np.degrees(ang)), 1.0)
        img += cv2.warpAffine(prof, m, (d, d))[:h, :w, None]
    elif kind == 2:  # grid lines
        step = int(rng.integers(16, 48))
        img[::step] += rng.uniform(-30, 30, 3).astype(np.float32)
        img[:, ::step] += rng.uniform(-30, 30, 3).astype(np.float32)
    elif kind == 3:  # mottled: a second, finer noise layer (drawn blobs would look like the 'circle' class)
        fine = rng.normal(0, rng.uniform(10, 25), (h // 8 + 2, w // 8 + 2, 3)).astype(np.float32)
        img += cv2.resize(fine, (w, h), interpolation=cv2.INTER_LINEAR)
    img += (rng.standard_normal((h, w), dtype=np.float32) * np.float32(rng.uniform(2, 7)))[..., None]
    return cv2.convertScaleAbs(img)  # saturating float -> uint8


def _clutter(rng: np.random.Generator, img: np.ndarray, n: int) -> None:
    """Distractors that are none of the classes: thin lines, arcs, dot clusters, scribbles and text."""
    h, w = img.shape[:2]
    for _ in range(n):
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        x, y = int(rng.integers(w)), int(rng.integers(h))
        k = rng.integers(5)
        if k == 0:
            cv2.line(img, (x, y), (int(rng.integers(w)), int(rng.integers(h))), col, int(rng.integers(1, 3)),
                     cv2.LINE_AA)
        elif k == 1:
            ax = (int(rng.integers(8, 60)), int(rng.integers(8, 60)))
            a0 = int(rng.integers(360))
            cv2.ellipse(img, (x, y), ax, 0, a0, a0 + int(rng.integers(40, 200)), col, int(rng.integers(1, 3)),
                        cv2.LINE_AA)
        elif k == 2:
            for _ in range(int(rng.integers(3, 12))):
                cv2.circle(img, (x + int(rng.integers(-20, 21)), y + int(rng.integers(-20, 21))),
                           int(rng.integers(1, 3)), col, -1, cv2.LINE_AA)
        elif k == 3:
            pts = np.cumsum(rng.normal(0, 8, (int(rng.integers(4, 10)), 2)), 0) + [x, y]
            cv2.polylines(img, [pts.astype(np.int32)], False, col, 1, cv2.LINE_AA)
        else:
            txt = "".join(chr(c) for c in rng.integers(65, 91, int(rng.integers(2, 6))))
            cv2.putText(img, txt, (x, y), cv2.FONT_HERSHEY_SIMPLEX, float(rng.uniform(0.3, 0.8)), col, 1, cv2.LINE_AA)


def _colour_against(rng: np.random.Generator, bg_mean: np.ndarray) -> np.ndarray:
    """A saturated-enough BGR colour at least ~90 (L1) away from the local background, so objects stay visible."""
    for _ in range(20):
        hsv = np.array([[[rng.integers(0, 180), rng.integers(90, 256), rng.integers(80, 256)]]], np.uint8)
        c = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)
        if np.abs(c - bg_mean).sum() >= 90:
            break
    return c


def render_image(seed: int, split: str, index: int, variant: str = "default"
                 ) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    """One image (BGR uint8) and its objects as (class index, [x, y, w, h]) in pixels."""
    v = VARIANTS[variant]
    classes = variant_classes(variant)
    rng = np.random.default_rng([seed, SPLITS[split], index])
    w, h = v["sizes"][int(rng.integers(len(v["sizes"])))]
    img = _background(rng, h, w)
    _clutter(rng, img, int(rng.integers(*v["clutter"])))
    boxes: list[np.ndarray] = []
    objs = []
    bins = _cum_bins(v["bins"])
    for _ in range(int(rng.integers(*v["objects"]))):
        c = int(rng.integers(len(classes)))
        p = rng.random()
        lo, hi = next((lo, hi) for q, lo, hi in bins if p < q)
        side = float(np.exp(rng.uniform(np.log(lo), np.log(min(hi, 0.7 * min(h, w))))))
        asp = float(np.exp(rng.uniform(np.log(0.75), np.log(1.33))))
        rot = rng.uniform(0, 2 * np.pi)
        R = np.array([[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]])
        S = np.diag([np.sqrt(asp), 1 / np.sqrt(asp)])
        for _try in range(25):  # rejection sampling keeps occlusion partial
            ctr = rng.uniform([0.35 * side, 0.35 * side], [w - 0.35 * side, h - 0.35 * side])
            polys = [(p_ @ S.T @ R.T) * (side / 2) for p_ in SHAPES[classes[c]]]
            pts = np.concatenate(polys)
            ext = (pts.max(0) - pts.min(0)).max()
            polys = [q * (side / ext) + ctr for q in polys]  # longest box side == side
            pts = np.concatenate(polys)
            b = np.concatenate([pts.min(0).clip(0, [w, h]), pts.max(0).clip(0, [w, h])])
            area = (b[2] - b[0]) * (b[3] - b[1])
            if area < 60 or _occludes(b, boxes):
                continue
            _draw_object(rng, img, polys, b)
            boxes.append(b)
            objs.append((c, [round(float(b[0]), 2), round(float(b[1]), 2), round(float(b[2] - b[0]), 2),
                             round(float(b[3] - b[1]), 2)]))
            break
    _clutter(rng, img, int(rng.integers(0, 3)))  # a few thin distractors on top: extra light occlusion
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (3, 3), 0)
    return img, objs


def variant_classes(variant: str) -> list[str]:
    """The class names a variant draws, in category-id order (a variant may use a subset of CLASSES)."""
    return list(VARIANTS[variant].get("classes", CLASSES))


def _cum_bins(bins: list[tuple[float, int, int]]) -> list[tuple[float, int, int]]:
    acc, out = 0.0, []
    for q, lo, hi in bins:
        acc += q
        out.append((acc if len(out) < len(bins) - 1 else 1.01, lo, hi))
    return out


def _occludes(b: np.ndarray, boxes: list[np.ndarray]) -> bool:
    """True if drawing box b on top would hide more than 40 % of an earlier box (or b mostly overlaps one)."""
    for e in boxes:
        iw = min(b[2], e[2]) - max(b[0], e[0])
        ih = min(b[3], e[3]) - max(b[1], e[1])
        if iw > 0 and ih > 0:
            inter = iw * ih
            if inter > 0.4 * (e[2] - e[0]) * (e[3] - e[1]) or inter > 0.6 * (b[2] - b[0]) * (b[3] - b[1]):
                return True
    return False


def _draw_object(rng: np.random.Generator, img: np.ndarray, polys: list[np.ndarray], b: np.ndarray) -> None:
    x0, y0, x1, y1 = int(b[0]), int(b[1]), int(np.ceil(b[2])), int(np.ceil(b[3]))
    roi = img[y0:y1 + 1, x0:x1 + 1]
    col = _colour_against(rng, roi.reshape(-1, 3).mean(0))
    ipolys = [np.round((q - [x0, y0]) * 16).astype(np.int32) for q in polys]  # 4 fractional bits
    style = rng.random()
    if style < 0.65:  # solid
        cv2.fillPoly(roi, ipolys, tuple(float(v) for v in col), cv2.LINE_AA, shift=4)
    else:  # striped / two-tone fill through a mask
        mask = np.zeros(roi.shape[:2], np.uint8)
        cv2.fillPoly(mask, ipolys, 255, cv2.LINE_AA, shift=4)
        yy, xx = np.mgrid[0:roi.shape[0], 0:roi.shape[1]]
        period = rng.uniform(3, 10)
        stripes = (np.sin((xx * np.cos(style * 20) + yy * np.sin(style * 20)) / period * np.pi) > 0)[..., None]
        pattern = np.where(stripes, col, col * 0.55).astype(np.float32)
        a = (mask.astype(np.float32) / 255)[..., None]
        roi[:] = (pattern * a + roi * (1 - a)).astype(np.uint8)
    if rng.random() < 0.3:  # darker outline
        cv2.polylines(roi, ipolys, True, tuple(float(v) for v in col * 0.4), 1, cv2.LINE_AA, shift=4)


def _render_chunk(args: tuple[int, str, list[int], str, str]) -> list[tuple[dict, list[tuple[int, list[float]]]]]:
    seed, split, idxs, img_dir, variant = args
    cv2.setNumThreads(1)
    out = []
    for i in idxs:
        img, objs = render_image(seed, split, i, variant)
        name = f"{split}_{i:06d}.jpg"
        quality = 85 + (i * 7919 + seed) % 11  # varied JPEG quality, still a pure function of (seed, index)
        cv2.imwrite(os.path.join(img_dir, name), img, [cv2.IMWRITE_JPEG_QUALITY, quality])
        out.append(({"id": i + 1, "file_name": name, "width": img.shape[1], "height": img.shape[0]}, objs))
    return out


def generate(out: str | Path, seed: int = 0, n_train: int = 2000, n_val: int = 500, workers: int = 2,
             variant: str = "default") -> dict[str, Any]:
    """Write images/{train,val}/*.jpg and annotations/instances_{train,val}.json under ``out``; returns counts.
    ``variant``: a key of VARIANTS."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown synthetic variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    out = Path(out)
    stats: dict[str, Any] = {}
    # spawn, not fork: forking a process whose OpenCV / OpenMP thread pools already ran can deadlock the child
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(workers) if workers > 1 else None
    try:
        for split, n in (("train", n_train), ("val", n_val)):
            img_dir = out / "images" / split
            img_dir.mkdir(parents=True, exist_ok=True)
            chunks = [(seed, split, list(range(a, min(a + 25, n))), str(img_dir), variant) for a in range(0, n, 25)]
            images, anns = [], []
            with tqdm(total=n, desc=f"synthetic {split}", unit="img") as bar:
                for res in (pool.imap if pool else map)(_render_chunk, chunks):  # ordered: deterministic JSON
                    for im, objs in res:
                        images.append(im)
                        for c, bb in objs:
                            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": c + 1, "bbox": bb,
                                         "area": round(bb[2] * bb[3], 2), "iscrowd": 0})
                    bar.update(len(res))
            coco = {"info": {"description": "NormYOLO synthetic shapes", "version": "1", "seed": seed},
                    "licenses": [], "images": images, "annotations": anns,
                    "categories": [{"id": i + 1, "name": n_, "supercategory": "shape"}
                                   for i, n_ in enumerate(variant_classes(variant))]}
            (out / "annotations").mkdir(parents=True, exist_ok=True)
            (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco, separators=(",", ":")))
            stats[split] = {"images": len(images), "boxes": len(anns)}
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return stats


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=2000, help="number of train images")
    ap.add_argument("--val", type=int, default=500, help="number of val images")
    ap.add_argument("--workers", type=int, default=2, help="processes")
    ap.add_argument("--variant", default="default", choices=sorted(VARIANTS), help="default, or the study's variant")
    a = ap.parse_args(argv)
    if a.train < 0 or a.val < 0 or a.train + a.val == 0:
        ap.error("--train / --val: expected non-negative counts, not both zero")
    print(json.dumps(generate(a.out, a.seed, a.train, a.val, a.workers, a.variant)))


if __name__ == "__main__":
    main()
