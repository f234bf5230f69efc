"""YOLO-txt and COCO-JSON readers -> one ``Record`` type; label validation with counted reasons; the label cache.

Bad input never raises: each problem is repaired or skipped and counted under a reason (a key of ``IMAGE_SKIPS``,
``BACKGROUNDS`` or ``BOX_FIXES``), and ``summary_line`` turns the counts into the start-of-run line. Only a split
left with no image at all raises ``ConfigError``. Boxes are ``xyxy`` pixels of the original image.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import cv2
import numpy as np

from utils.general import LOGGER, ROOT, ConfigError, atomic_write

IMG_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
CACHE_VERSION = 3
CLIP_TOL = 0.5  # px: overshoot from rounding in label files is clipped silently, more is counted as 'clipped'

# reason -> phrase in the summary line; the first group skips images, the second notes kept backgrounds
IMAGE_SKIPS = {"corrupt": "corrupt", "truncated": "truncated", "not_image": "not an image", "missing": "missing",
               "size_mismatch": "size differs from JSON"}
BACKGROUNDS = {"no_label_file": "without label file", "empty_label_file": "with empty label file"}
BOX_FIXES = {"clipped": "clipped", "outside": "dropped outside / zero area", "duplicate": "duplicate rows dropped",
             "malformed": "malformed rows dropped", "bad_class": "class id out of range",
             "unknown_category": "unknown category id", "orphan": "annotations of unknown / skipped images"}


@dataclass
class Record:
    """One image and its boxes. boxes (n, 4) float32 xyxy px; cls (n,) int64 contiguous; crowd (n,) bool;
    area (n,) float32 (COCO's annotation area, or box w*h for YOLO labels)."""

    im_file: str
    width: int
    height: int
    image_id: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    cls: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    crowd: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    area: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))


@dataclass
class ReadResult:
    records: list[Record]
    names: list[str]
    cat_ids: list[int]
    counts: Counter


# ---------------------------------------------------------------------------------------------- image checks
def read_image(path: str | Path) -> tuple[np.ndarray | None, str | None]:
    """Decode an image fully: (BGR uint8 (H, W, 3), None), or (None, reason). Truncation is detected from the end
    marker because libjpeg / libpng decode a cut-off file into a grey-filled image without an error."""
    p = Path(path)
    if p.suffix.lower() not in IMG_EXTS:
        return None, "not_image"
    try:
        buf = np.fromfile(p, dtype=np.uint8)
    except OSError:
        return None, "missing" if not p.exists() else "corrupt"
    head, tail = buf[:8].tobytes(), buf[-32:].tobytes().rstrip(b"\x00\r\n ")
    if head[:2] == b"\xff\xd8" and not tail.endswith(b"\xff\xd9"):
        return None, "truncated"
    if head == b"\x89PNG\r\n\x1a\n" and b"IEND" not in tail:
        return None, "truncated"
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if img is None:
        return None, "corrupt"
    return img, None


def check_image(path: str | Path) -> tuple[str | None, int, int]:
    """(reason or None, width, height) of an image file, decoded fully (see read_image)."""
    img, reason = read_image(path)
    return (reason, 0, 0) if img is None else (None, int(img.shape[1]), int(img.shape[0]))


def _check_all(paths: list[str]) -> list[tuple[str | None, int, int]]:
    # cv2 releases the GIL while decoding, so threads scale; the label cache makes this a one-time cost
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as ex:
        return list(ex.map(check_image, paths, chunksize=16))


def _clip_boxes(boxes: np.ndarray, w: int, h: int, counts: Counter) -> np.ndarray:
    """Clip (n, 4) xyxy boxes to the image; returns a keep mask; counts 'clipped' and 'outside'."""
    if not len(boxes):
        return np.zeros(0, bool)
    orig = boxes.copy()
    boxes[:, 0] = boxes[:, 0].clip(0, w)
    boxes[:, 2] = boxes[:, 2].clip(0, w)
    boxes[:, 1] = boxes[:, 1].clip(0, h)
    boxes[:, 3] = boxes[:, 3].clip(0, h)
    keep = (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)
    moved = np.abs(boxes - orig).max(1) > CLIP_TOL
    counts["outside"] += int((~keep).sum())
    counts["clipped"] += int((moved & keep).sum())
    return keep


# ---------------------------------------------------------------------------------------------- YOLO txt
def list_yolo_images(sources: Iterable[str | Path], counts: Counter) -> list[str]:
    """Image files from folders (recursive) and / or list files (one path a line, relative to the list file)."""
    files: list[str] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            files += sorted(str(f) for f in p.rglob("*") if f.is_file())
        elif p.is_file() and p.suffix == ".txt":
            for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.strip():
                    q = Path(line.strip())
                    files.append(str(q if q.is_absolute() else (p.parent / q).resolve()))
        else:
            raise ConfigError(f"dataset source '{p}' not found (expected an image folder or a .txt list of images)")
    out = []
    for f in files:
        if Path(f).suffix.lower() in IMG_EXTS:
            out.append(f)
        else:
            counts["not_image"] += 1
    return out


def label_path(im_file: str) -> Path:
    """images/x/a.jpg -> labels/x/a.txt (last 'images' component swapped, like YOLOv5); else a.txt beside it."""
    parts = list(Path(im_file).parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return Path(im_file).with_suffix(".txt")


def parse_yolo_label(text: str, w: int, h: int, nc: int, counts: Counter) -> tuple[np.ndarray, np.ndarray]:
    """Rows 'cls cx cy w h' (normalised) -> (boxes (n, 4) xyxy px, cls (n,)); bad rows dropped and counted."""
    rows, seen = [], set()
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        try:
            vals = [float(v) for v in parts]
        except ValueError:
            vals = []
        if len(vals) != 5 or not all(math.isfinite(v) for v in vals) or vals[0] != int(vals[0]):
            counts["malformed"] += 1
            continue
        if not 0 <= vals[0] < nc:
            counts["bad_class"] += 1
            continue
        key = tuple(round(v, 6) for v in vals)
        if key in seen:
            counts["duplicate"] += 1
            continue
        seen.add(key)
        rows.append(vals)
    if not rows:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    a = np.array(rows, dtype=np.float64)
    boxes = np.stack([(a[:, 1] - a[:, 3] / 2) * w, (a[:, 2] - a[:, 4] / 2) * h,
                      (a[:, 1] + a[:, 3] / 2) * w, (a[:, 2] + a[:, 4] / 2) * h], 1)
    keep = (a[:, 3] > 0) & (a[:, 4] > 0)
    counts["outside"] += int((~keep).sum())
    boxes, cls = boxes[keep], a[keep, 0].astype(np.int64)
    keep = _clip_boxes(boxes, w, h, counts)
    return boxes[keep].astype(np.float32), cls[keep]


def read_yolo(sources: list[str | Path], names: list[str], counts: Counter) -> ReadResult:
    """Read YOLO-txt data: images from ``sources``, labels from the twin ``labels/`` folder."""
    files = list_yolo_images(sources, counts)
    records: list[Record] = []
    for f, (reason, w, h) in zip(files, _check_all(files)):
        if reason:
            counts[reason] += 1
            continue
        lp = label_path(f)
        try:
            text = lp.read_text(encoding="utf-8", errors="replace")
        except OSError:
            counts["no_label_file"] += 1
            text = None
        if text is not None and not text.strip():
            counts["empty_label_file"] += 1
        boxes, cls = parse_yolo_label(text or "", w, h, len(names), counts)
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).astype(np.float32)
        records.append(Record(f, w, h, len(records), boxes, cls, np.zeros(len(cls), bool), area))
    return ReadResult(records, list(names), list(range(len(names))), counts)


# ---------------------------------------------------------------------------------------------- COCO JSON
def read_coco_categories(json_path: str | Path) -> tuple[list[int], list[str], dict]:
    """Parse a COCO instances JSON; returns (sorted category ids, their names, the whole JSON dict)."""
    try:
        with open(json_path, encoding="utf-8") as fh:
            d = json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"COCO annotation file '{json_path}' not found") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"COCO annotation file '{json_path}': unreadable JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict) or not all(isinstance(d.get(k), list) for k in ("images", "categories")):
        raise ConfigError(f"COCO annotation file '{json_path}': expected a mapping with 'images' and 'categories'")
    try:
        cats = sorted((int(c["id"]), str(c["name"])) for c in d["categories"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"COCO annotation file '{json_path}': each category needs an integer 'id' and 'name'") \
            from None
    return [c[0] for c in cats], [c[1] for c in cats], d


def read_coco(json_path: str | Path, images_dir: str | Path, names: list[str] | None, counts: Counter) -> ReadResult:
    """Read a COCO instances JSON; category ids (any integers) map to contiguous indices in sorted-id order."""
    cat_ids, cat_names, d = read_coco_categories(json_path)
    if names is not None and len(names) != len(cat_ids):
        raise ConfigError(f"'{json_path}' has {len(cat_ids)} categories but the dataset YAML lists {len(names)} names")
    cat_index = {c: i for i, c in enumerate(cat_ids)}
    images = [im for im in d["images"] if isinstance(im, dict) and "id" in im and "file_name" in im]
    counts["corrupt"] += len(d["images"]) - len(images)
    files = [str(Path(images_dir) / str(im["file_name"])) for im in images]
    for f in files:  # a file the JSON names but the folder lacks is 'missing', not 'corrupt'
        if not os.path.isfile(f):
            counts["missing"] += 1
    present = [(im, f) for im, f in zip(images, files) if os.path.isfile(f)]
    anns: dict[int, list[dict]] = {}
    for a in d.get("annotations") or []:
        if isinstance(a, dict) and isinstance(a.get("image_id"), (int, str)):
            anns.setdefault(a["image_id"], []).append(a)
        else:
            counts["malformed"] += 1
    records: list[Record] = []
    used_ids = set()
    for (im, f), (reason, w, h) in zip(present, _check_all([f for _, f in present])):
        if reason is None and (w, h) != (im.get("width", w), im.get("height", h)):
            reason = "size_mismatch"
        if reason:
            counts[reason] += 1
            continue
        used_ids.add(im["id"])
        rows, seen = [], set()
        for a in anns.get(im["id"], []):
            bbox = a.get("bbox")
            if a.get("category_id") not in cat_index:
                counts["unknown_category"] += 1
                continue
            try:
                x, y, bw, bh = (float(v) for v in bbox)
                assert all(math.isfinite(v) for v in (x, y, bw, bh))
            except (TypeError, ValueError, AssertionError):
                counts["malformed"] += 1
                continue
            if bw <= 0 or bh <= 0:
                counts["outside"] += 1
                continue
            key = (a["category_id"], round(x, 3), round(y, 3), round(bw, 3), round(bh, 3), bool(a.get("iscrowd", 0)))
            if key in seen:
                counts["duplicate"] += 1
                continue
            seen.add(key)
            rows.append((x, y, x + bw, y + bh, cat_index[a["category_id"]], key[-1], float(a.get("area", bw * bh))))
        boxes = np.array([r[:4] for r in rows], np.float32).reshape(-1, 4)
        keep = _clip_boxes(boxes, w, h, counts)
        cls = np.array([r[4] for r in rows], np.int64)[keep]
        crowd = np.array([r[5] for r in rows], bool)[keep]
        area = np.array([r[6] for r in rows], np.float32)[keep]
        records.append(Record(f, w, h, int(im["id"]), boxes[keep], cls, crowd, area))
    counts["orphan"] += sum(len(v) for k, v in anns.items() if k not in used_ids)
    return ReadResult(records, list(names) if names is not None else cat_names, cat_ids, counts)


# ---------------------------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    """NORMYOLO_CACHE_DIR or <repo>/datasets/.cache: never inside a dataset folder (those may be read-only/shared)."""
    return Path(os.environ.get("NORMYOLO_CACHE_DIR") or ROOT / "datasets" / ".cache")


def stat_key(paths: Iterable[str | Path], extra: str = "") -> str:
    """sha1 over (path, size, mtime_ns) of every path (absent files count too): any change invalidates."""
    h = hashlib.sha1(f"v{CACHE_VERSION}|{extra}".encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}|-\n".encode())
    return h.hexdigest()


def save_cache(path: Path, key: str, res: ReadResult) -> None:
    """Write atomically (temp file + os.replace); an unwritable cache folder only costs a log line."""
    recs = res.records
    arrays = {
        "key": np.array(key), "files": np.array([r.im_file for r in recs], dtype=str),
        "wh_id": np.array([[r.width, r.height, r.image_id] for r in recs], np.int64).reshape(-1, 3),
        "offsets": np.cumsum([0] + [len(r.cls) for r in recs]).astype(np.int64),
        "boxes": np.concatenate([r.boxes for r in recs] or [np.zeros((0, 4), np.float32)]),
        "cls": np.concatenate([r.cls for r in recs] or [np.zeros(0, np.int64)]),
        "crowd": np.concatenate([r.crowd for r in recs] or [np.zeros(0, bool)]),
        "area": np.concatenate([r.area for r in recs] or [np.zeros(0, np.float32)]),
        "meta": np.array(json.dumps({"names": res.names, "cat_ids": res.cat_ids, "counts": dict(res.counts)})),
    }
    try:
        atomic_write(path, lambda fh: np.savez(fh, **arrays))
    except OSError as e:
        LOGGER.info(f"label cache not written ({path.parent} not writable: {e.strerror}); next start rescans")


def load_cache(path: Path, key: str) -> ReadResult | None:
    """The cached ReadResult when ``key`` matches, else None (missing, stale or unreadable cache)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            z = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError):
        return None
    meta, off = json.loads(str(z["meta"])), z["offsets"]
    recs = [Record(str(f), int(w), int(h), int(i), z["boxes"][a:b], z["cls"][a:b], z["crowd"][a:b], z["area"][a:b])
            for f, (w, h, i), a, b in zip(z["files"], z["wh_id"], off[:-1], off[1:])]
    return ReadResult(recs, meta["names"], meta["cat_ids"], Counter(meta["counts"]))


# ---------------------------------------------------------------------------------------------- summary / GT
def summary_line(prefix: str, res: ReadResult) -> str:
    """'train: 125 images, 930 boxes (10 crowd), 3 backgrounds (...); 3 images skipped: 2 corrupt, 1 missing; ...'"""
    c, recs = res.counts, res.records
    nb = sum(len(r.cls) for r in recs)
    ncrowd = sum(int(r.crowd.sum()) for r in recs)
    s = f"{prefix}: {len(recs)} images, {nb} boxes" + (f" ({ncrowd} crowd)" if ncrowd else "")
    bg = [f"{c[k]} {v}" for k, v in BACKGROUNDS.items() if c.get(k)]
    nbg = sum(1 for r in recs if not len(r.cls))
    s += f", {nbg} backgrounds" + (f" ({', '.join(bg)})" if bg else "")
    skipped = [f"{c[k]} {v}" for k, v in IMAGE_SKIPS.items() if c.get(k)]
    n_skip = sum(c.get(k, 0) for k in IMAGE_SKIPS)
    s += f"; {n_skip} images skipped" + (f": {', '.join(skipped)}" if skipped else "")
    fixes = [f"{c[k]} {v}" for k, v in BOX_FIXES.items() if c.get(k)]
    return s + ("; boxes: " + ", ".join(fixes) if fixes else "")


def records_to_coco_gt(records: list[Record], names: list[str], cat_ids: list[int]) -> dict[str, Any]:
    """COCO-format ground truth for pycocotools (original category ids, iscrowd kept, bbox x, y, w, h px)."""
    images, anns = [], []
    for r in records:
        images.append({"id": r.image_id, "file_name": os.path.basename(r.im_file), "width": r.width,
                       "height": r.height})
        for b, c, cr, ar in zip(r.boxes.tolist(), r.cls.tolist(), r.crowd.tolist(), r.area.tolist()):
            anns.append({"id": len(anns) + 1, "image_id": r.image_id, "category_id": cat_ids[c],
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": ar, "iscrowd": int(cr)})
    cats = [{"id": i, "name": n, "supercategory": ""} for i, n in zip(cat_ids, names)]
    return {"info": {"description": "NormYOLO ground truth"}, "images": images, "annotations": anns, "categories": cats}


def read_split(data_cfg: dict[str, Any], split: str, cache_dir: str | Path | None = None) -> ReadResult:
    """Read one split of a ``load_data_config`` dict through the label cache; logs the summary line.

    Raises ConfigError when the split is not in the config or no usable image is left.
    """
    src = data_cfg.get(split)
    if not src:
        raise ConfigError(f"dataset '{data_cfg.get('yaml_file', '?')}': no '{split}' key")
    fmt, names = data_cfg["format"], list(data_cfg["names"])
    counts: Counter = Counter()
    if fmt == "coco":
        images_dir = Path(data_cfg[f"{split}_images"])
        if not images_dir.is_dir():
            raise ConfigError(f"dataset '{data_cfg.get('yaml_file', '?')}': image folder '{images_dir}' not found")
        key_paths = [src] + sorted(e.path for e in os.scandir(images_dir))
        ident = f"coco|{src}|{images_dir}|{names}"
    else:
        sources = src if isinstance(src, list) else [src]
        files = list_yolo_images(sources, Counter())
        key_paths = [p for f in files for p in (f, label_path(f))] + [s for s in sources if Path(s).is_file()]
        ident = f"yolo|{sources}|{names}"
    key = stat_key(key_paths, ident)
    cache_file = Path(cache_dir or default_cache_dir()) / f"{split}-{hashlib.sha1(ident.encode()).hexdigest()[:16]}.npz"
    res = load_cache(cache_file, key)
    from_cache = res is not None
    if res is None:
        if fmt == "coco":
            res = read_coco(src, images_dir, names, counts)
        else:
            res = read_yolo(sources, names, counts)
        if res.records:
            save_cache(cache_file, key, res)
    LOGGER.info(summary_line(split, res) + (" (from label cache)" if from_cache else ""))
    if not res.records:
        raise ConfigError(f"dataset split '{split}' has no usable images in '{src}' ({summary_line(split, res)})")
    return res
