"""``DetectionDataset``: the records of one split as torch items; mosaic + albumentations for training, letterbox
for validation. Item: (img uint8 tensor (3, S, S) RGB, labels float32 (n, 5) = class, cx, cy, w, h normalised,
path, meta) with meta = image_id, orig_shape (h0, w0), ratio r, pad (pad_w, pad_h).
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
from torch.utils.data import Dataset
from tqdm import tqdm

from data.augment import PAD_VALUE, augment_params, build_train_transform, letterbox
from data.readers import ReadResult, read_split, records_to_coco_gt
from utils.boxes import xyxy_to_xywhn
from utils.general import ConfigError, LOGGER


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
