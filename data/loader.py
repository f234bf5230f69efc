"""Dataset YAML loading, the torch Dataset (mosaic train / letterbox val) and ``create_dataloader``.

A batch is ``(imgs, targets, paths, metas)``:
    imgs    float32 (N, 3, H, W), RGB, 0..1 (H = W = img_size);
    targets float32 (M, 6) = image_index, class, cx, cy, w, h, normalised to the batch image's W and H;
    paths   list[str];
    metas   list[dict]: image_id, orig_shape (h0, w0), ratio r, pad (pad_w, pad_h): x_orig = (x - pad_w) / r
            (exact for letterboxed val images; for mosaic-augmented train images pad is (0, 0) and not invertible).
"""
from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from data.augment import PAD_VALUE, augment_params, build_train_transform, letterbox
from data.datasets import ReadResult, read_coco_categories, read_split, records_to_coco_gt
from utils.boxes import xyxy_to_xywhn
from utils.general import ROOT, ConfigError, LOGGER, load_yaml

SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------------------------------------- dataset YAML
def _names_list(names: Any, yaml_file: Path) -> list[str]:
    if isinstance(names, dict):  # YOLOv5 style {0: person, 1: bicycle}
        keys = sorted(names)
        if keys != list(range(len(keys))):
            raise ConfigError(f"{yaml_file}: key 'names' as a mapping needs keys 0..{len(keys) - 1}, got {keys[:5]}...")
        names = [names[k] for k in keys]
    if not isinstance(names, list) or not names:
        raise ConfigError(f"{yaml_file}: key 'names' expected a non-empty list of class names")
    return [str(n) for n in names]


def _ensure_synthetic(root: Path, spec: Any, yaml_file: Path) -> None:
    """Generate the built-in dataset into ``root`` once; a file lock keeps concurrent DDP ranks from racing."""
    if (root / "annotations" / "instances_val.json").is_file():
        return
    if not isinstance(spec, dict):
        raise ConfigError(f"{yaml_file}: key 'synthetic' expected a mapping (seed, train, val)")
    from data.synthetic import generate  # imported lazily: only needed the first time

    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # the second rank waits here, then finds the data ready
        except ImportError:  # no fcntl (Windows): the temp-dir + rename below still keeps the result whole
            pass
        if (root / "annotations" / "instances_val.json").is_file():
            return
        LOGGER.info(f"generating the built-in dataset into {root} (first use only)")
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
        generate(tmp, seed=int(spec.get("seed", 0)), n_train=int(spec.get("train", 2000)),
                 n_val=int(spec.get("val", 500)))
        if root.exists():  # a half-written folder from an older interrupted run
            import shutil

            shutil.rmtree(root)
        os.replace(tmp, root)


def load_data_config(path: str | Path) -> dict[str, Any]:
    """Read a dataset YAML (see docs/data.md) and resolve its paths.

    A relative ``path:`` resolves against the repository root (like YOLOv5); split entries resolve against
    ``path``. A bare name such as ``coco128.yaml`` is also looked up in cfg/data/. Returns the YAML's keys plus
    ``path`` (absolute str), ``train`` / ``val`` (/ ``test``) absolute, ``names`` list, ``nc``, ``format`` and, for
    COCO, ``<split>_images`` folders.
    """
    p = Path(path)
    if not p.is_file() and not p.is_absolute() and (ROOT / "cfg" / "data" / p).is_file():
        p = ROOT / "cfg" / "data" / p
    d = load_yaml(p, "dataset YAML")
    root = Path(str(d.get("path", "")))
    root = (root if root.is_absolute() else ROOT / root).resolve()
    if "synthetic" in d:
        _ensure_synthetic(root, d["synthetic"], p)
    if not root.is_dir():
        hint = f" ({d['get']})" if d.get("get") else ""
        raise ConfigError(f"{p}: key 'path': dataset folder '{root}' not found{hint}")
    if "train" not in d and "val" not in d:
        raise ConfigError(f"{p}: expected keys 'train' and 'val' (image folders, list files or COCO JSON files)")

    def res(v: Any) -> str | list[str]:
        if isinstance(v, list):
            return [str((root / str(x)).resolve()) for x in v]
        return str((root / str(v)).resolve())

    fmt = d.get("format") or ("coco" if str(d.get("train", d.get("val"))).endswith(".json") else "yolo")
    if fmt not in ("yolo", "coco"):
        raise ConfigError(f"{p}: key 'format' expected 'yolo' or 'coco', got {fmt!r}")
    out = dict(d, path=str(root), format=fmt, yaml_file=str(p))
    for s in SPLITS:
        if d.get(s):
            out[s] = res(d[s])
            if fmt == "coco":
                if not isinstance(d[s], str) or not d[s].endswith(".json"):
                    raise ConfigError(f"{p}: key '{s}' expected a COCO instances .json file for format 'coco'")
                stem = Path(d[s]).stem.replace("instances_", "")
                if d.get(f"{s}_images"):
                    out[f"{s}_images"] = res(d[f"{s}_images"])
                else:  # COCO site layout (<root>/train2017) or YOLOv5 layout (<root>/images/train2017)
                    cands = [root / stem, root / "images" / stem]
                    out[f"{s}_images"] = str(next((c for c in cands if c.is_dir()), cands[0]))
    if d.get("names") is not None:
        out["names"] = _names_list(d["names"], p)
    elif fmt == "coco":  # names from the JSON's categories (sorted by id)
        out["names"] = read_coco_categories(out.get("train") or out["val"])[1]
    else:
        raise ConfigError(f"{p}: key 'names' is required for YOLO-format datasets")
    if d.get("nc") is not None and int(d["nc"]) != len(out["names"]):
        raise ConfigError(f"{p}: key 'nc' is {d['nc']} but 'names' lists {len(out['names'])} classes")
    out["nc"] = len(out["names"])
    return out


# ---------------------------------------------------------------------------------------------- dataset
class DetectionDataset(Dataset):
    """Records of one split; train items go through mosaic + albumentations, val items are letterboxed.

    Item: (img uint8 tensor (3, S, S) RGB, labels float32 (n, 5) = class, cx, cy, w, h normalised, path, meta).
    """

    def __init__(self, data_cfg: dict[str, Any], split: str, img_size: int, augment: bool,
                 hyp: dict[str, Any] | None = None, cache: bool | str = False, seed: int = 0,
                 stride: int = 32, cache_dir: str | Path | None = None) -> None:
        if img_size % stride:
            raise ConfigError(f"--img-size {img_size}: expected a multiple of the model stride {stride}")
        res: ReadResult = read_split(data_cfg, split, cache_dir)
        self.records, self.names, self.cat_ids = res.records, res.names, res.cat_ids
        self.counts = res.counts
        self.nc, self.img_size, self.augment, self.stride = len(self.names), img_size, augment, stride
        self.hyp = augment_params(hyp) if augment else None
        self.transform = build_train_transform(img_size, self.hyp) if augment else None
        self._warned: set[str] = set()
        self._imgs: list[np.ndarray | None] = [None] * len(self.records)
        if cache not in (False, None, True, "ram"):  # no disk cache: refused, never silently RAM
            raise ConfigError(f"--cache {cache!r}: expected 'ram' (or nothing); a disk cache is not implemented")
        if cache:
            self._cache_images()
        self.reseed(seed)

    def set_mosaic(self, p: float) -> None:
        """Change the mosaic probability (e.g. 0 for the final epochs); loaders created afterwards see it."""
        if self.hyp is None:
            raise ValueError("set_mosaic: this dataset does not augment")
        self.hyp = augment_params({**self.hyp, "mosaic": p})
        self.transform = build_train_transform(self.img_size, self.hyp)

    def reseed(self, seed: int) -> None:
        """Seed mosaic choice, partners, junction and albumentations (called per worker by ``worker_init_fn``)."""
        self._rng = random.Random(seed)
        if self.transform is not None:
            self.transform.set_random_seed(seed)

    def __len__(self) -> int:
        return len(self.records)

    def _cache_images(self) -> None:
        with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as ex:
            it = ex.map(self._read_resized, range(len(self)))
            for i, im in enumerate(tqdm(it, total=len(self), desc="caching images", leave=False)):
                self._imgs[i] = im
        gb = sum(im.nbytes for im in self._imgs if im is not None) / 1e9
        LOGGER.info(f"cached {len(self)} images in RAM ({gb:.2f} GB)")

    def _read_resized(self, i: int) -> np.ndarray | None:
        """RGB uint8 image with its long side resized to img_size, or None (logged once) when unreadable."""
        rec = self.records[i]
        r = self.img_size / max(rec.height, rec.width)
        flag = cv2.IMREAD_COLOR
        if self.augment and r <= 0.5:  # training only: libjpeg decodes at 1/2, 1/4, 1/8 scale far faster
            flag = cv2.IMREAD_REDUCED_COLOR_4 if r <= 0.25 else cv2.IMREAD_REDUCED_COLOR_2
        img = cv2.imread(rec.im_file, flag)
        if img is None:
            if rec.im_file not in self._warned:
                self._warned.add(rec.im_file)
                LOGGER.warning(f"WARNING: image became unreadable after the scan, substituting: {rec.im_file}")
            return None
        size = (max(1, round(rec.width * r)), max(1, round(rec.height * r)))
        if (img.shape[1], img.shape[0]) != size:
            # LINEAR for augmented training (speed), AREA for val (same pixels as detect.py's letterbox)
            interp = cv2.INTER_LINEAR if self.augment or r > 1 else cv2.INTER_AREA
            img = cv2.resize(img, size, interpolation=interp)
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)

    def load_image(self, i: int) -> np.ndarray | None:
        return self._imgs[i] if self._imgs[i] is not None else self._read_resized(i)

    def _boxes(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Non-crowd boxes of record i in resized-image pixels (crowd regions are never training positives)."""
        rec = self.records[i]
        keep = ~rec.crowd
        return rec.boxes[keep] * (self.img_size / max(rec.height, rec.width)), rec.cls[keep]

    def train_sample(self, i: int) -> dict[str, Any] | None:
        """Augmented sample of image i, or None when an image is unreadable (logged).

        With probability ``mosaic`` image i goes into a mosaic with 3 random others, at a random position.
        Returns the transform's dict (``image`` (S, S, 3) uint8, ``bboxes`` (n, 4) xyxy px, ``cls`` (n,), ``mask``
        when the transform makes one) plus ``boxes_in``: the boxes of the tiles before the geometry.
        """
        if self.hyp["mosaic"] > 0 and self._rng.random() < self.hyp["mosaic"]:
            idx = [i] + [self._rng.randrange(len(self)) for _ in range(3)]
            self._rng.shuffle(idx)
        else:
            idx = [i]
        tiles = []
        for j in idx:
            img = self.load_image(j)
            if img is None:
                return None
            tiles.append((img, *self._boxes(j)))
        try:
            out = self.transform(tiles)
        except (ValueError, cv2.error) as e:  # e.g. an odd image mode: logged, and the caller picks another image
            LOGGER.warning(f"WARNING: augmentation failed on {self.records[i].im_file} ({e}); using another image")
            return None
        out["boxes_in"] = sum(len(t[1]) for t in tiles)
        return out

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str, dict[str, Any]]:
        s = self.img_size
        item = None
        if self.augment:
            out = self.train_sample(i)
            for _ in range(10):  # a file broken after the scan: train on another image rather than crash
                if out is not None:
                    break
                i = self._rng.randrange(len(self))
                out = self.train_sample(i)
            item = None if out is None else (out["image"], out["bboxes"], out["cls"])
            if item is None:  # every try failed (all logged): an empty grey image keeps the batch shape
                item = (np.full((s, s, 3), PAD_VALUE, np.uint8), np.zeros((0, 4)), np.zeros(0))
        rec = self.records[i]
        r = s / max(rec.height, rec.width)
        meta = {"image_id": rec.image_id, "orig_shape": (rec.height, rec.width), "ratio": r, "pad": (0, 0)}
        if item is not None:
            img, boxes, cls = item
        else:
            img = self.load_image(i)
            if img is None:  # keep the image id (evaluation sees no detections there, and the warning says why)
                img = np.full((round(rec.height * r), round(rec.width * r), 3), PAD_VALUE, np.uint8)
            img, r2, pad = letterbox(img, s, self.stride, auto=False)
            boxes, cls = self._boxes(i)
            boxes = boxes * r2 + np.array([pad[0], pad[1], pad[0], pad[1]], np.float32)
            meta.update(ratio=r * r2, pad=pad)
        h, w = img.shape[:2]
        labels = np.concatenate([np.asarray(cls, np.float32).reshape(-1, 1), xyxy_to_xywhn(boxes, w, h)], 1)
        chw = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        return chw, torch.from_numpy(labels), rec.im_file, meta

    def coco_gt(self) -> dict[str, Any]:
        """COCO-format ground truth of this split (original category ids, crowd regions kept)."""
        return records_to_coco_gt(self.records, self.names, self.cat_ids)


# ---------------------------------------------------------------------------------------------- loader
def collate_fn(batch: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, list[str], list[dict]]:
    """Stack items into the batch format of this module's docstring (uint8 -> float 0..1 here, in the worker)."""
    imgs, labels, paths, metas = zip(*batch)
    targets = [torch.cat([torch.full((len(lb), 1), float(k)), lb], 1) for k, lb in enumerate(labels)]
    return torch.stack(imgs).float().div_(255.0), torch.cat(targets, 0), list(paths), list(metas)


def worker_init_fn(worker_id: int) -> None:
    """Per-worker seeding from torch's per-epoch worker seed (deterministic given the loader's generator)."""
    cv2.setNumThreads(0)  # one decode thread per worker: OpenCV's own pool would oversubscribe the cores
    info = torch.utils.data.get_worker_info()
    seed = info.seed % 2**32
    random.seed(seed)
    np.random.seed(seed)
    info.dataset.reseed(seed)


def create_dataloader(data_cfg: dict[str, Any] | str | Path, split: str, img_size: int, batch_size: int, *,
                      augment: bool, hyp: dict[str, Any] | str | Path | None = None, workers: int = 0, seed: int = 0,
                      rank: int = -1, world_size: int = 1, cache: bool | str = False,
                      shuffle: bool | None = None) -> tuple[DataLoader, DetectionDataset]:
    """Build the dataset and its DataLoader (batch format: see the module docstring).

    With ``world_size > 1`` the loader uses a ``DistributedSampler``: call ``loader.sampler.set_epoch(epoch)``
    each epoch to reshuffle. Deterministic for a given ``seed`` (loader generator + ``worker_init_fn``).
    ``cache=True`` / ``'ram'`` decodes and resizes every image once into RAM before the workers start.
    """
    if not isinstance(data_cfg, dict):
        data_cfg = load_data_config(data_cfg)
    if batch_size < 1 or workers < 0:
        raise ConfigError(f"--batch-size {batch_size} / --workers {workers}: expected batch >= 1 and workers >= 0")
    shuffle = (split == "train") if shuffle is None else shuffle
    ds = DetectionDataset(data_cfg, split, img_size, augment, hyp, cache, seed=seed + max(rank, 0))
    return build_loader(ds, batch_size, workers=workers, seed=seed, rank=rank, world_size=world_size,
                        shuffle=shuffle), ds


def build_loader(ds: DetectionDataset, batch_size: int, *, workers: int = 0, seed: int = 0, rank: int = -1,
                 world_size: int = 1, shuffle: bool = False) -> DataLoader:
    """The DataLoader of ``create_dataloader`` over an existing dataset (e.g. after ``ds.set_mosaic(0)``)."""
    sampler = None
    if world_size > 1:
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank}: expected 0 <= rank < world_size ({world_size}) for distributed loading")
        sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    gen = torch.Generator()
    gen.manual_seed(seed + max(rank, 0))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                        num_workers=workers, collate_fn=collate_fn, worker_init_fn=worker_init_fn if workers else None,
                        generator=gen, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                        prefetch_factor=4 if workers else None)
    return loader
