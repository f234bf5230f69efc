"""Dataset YAML loading and ``create_dataloader`` over ``data.dataset.DetectionDataset``.

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
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from data.dataset import DetectionDataset
from data.readers import read_coco_categories
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
    from data.synthetic import VARIANTS, generate  # imported lazily: only needed the first time

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
        variant = str(spec.get("variant", "default"))
        if variant not in VARIANTS:
            raise ConfigError(f"{yaml_file}: key 'synthetic.variant' expected one of {', '.join(VARIANTS)}, "
                              f"got {variant!r}")
        generate(tmp, seed=int(spec.get("seed", 0)), n_train=int(spec.get("train", 2000)),
                 n_val=int(spec.get("val", 500)), variant=variant)
        if root.exists():  # a half-written folder from an older interrupted run
            import shutil

            shutil.rmtree(root)
        os.replace(tmp, root)


def load_data_config(path: str | Path) -> dict[str, Any]:
    """Read a dataset YAML (see docs/data.md) and resolve its paths.

    A relative ``path:`` resolves against the repository root (like YOLOv5); split entries resolve against
    ``path``. A bare name such as ``coco128.yaml`` is also looked up in cfg/data/. Returns the YAML's keys plus
    ``path`` (absolute str), ``train`` / ``val`` (/ ``test``) absolute, ``names`` list, ``nc``, ``format`` and, for
    COCO, ``<split>_images`` folders. An optional ``cache: ram`` is the dataset's default for train.py's ``--cache``.
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
    if d.get("cache") not in (None, False, "ram"):
        raise ConfigError(f"{p}: key 'cache' expected 'ram' or false, got {d['cache']!r}")
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


# ---------------------------------------------------------------------------------------------- loader
def collate_fn(batch: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, list[str], list[dict]]:
    """Stack items into the batch format of this module's docstring (uint8 -> float 0..1 here, in the worker)."""
    imgs, labels, paths, metas = zip(*batch)
    targets = [torch.cat([torch.full((len(lb), 1), float(k)), lb], 1) for k, lb in enumerate(labels)]
    return torch.stack(imgs).float().div_(255.0), torch.cat(targets, 0), list(paths), list(metas)


def worker_init_fn(worker_id: int) -> None:
    """Per-worker seeding from torch's worker seed (deterministic given the loader's generator). Workers are
    persistent, so this runs once per loader, not once per epoch."""
    cv2.setNumThreads(0)  # one decode thread per worker: OpenCV's own pool would oversubscribe the cores
    info = torch.utils.data.get_worker_info()
    seed = info.seed % 2**32
    random.seed(seed)
    np.random.seed(seed)
    info.dataset.reseed(seed)


class InProcessLoader(DataLoader):
    """``workers=0``: batches built in the calling process, identical to those of one persistent worker.

    A loader with one persistent worker draws a base seed from its generator once, at its first epoch, and the
    worker reseeds its dataset with it (``worker_init_fn``); later epochs draw only the sampler's permutation.
    torch's in-process iterator instead draws a new base seed every epoch and never reseeds the dataset, so
    ``--workers 0`` used to train on other batches than ``--workers 1``. This loader repeats the worker's draws
    (the dataset's augmentations use only its own RNGs, so the process globals that a worker also seeds are left
    alone). The equality holds for epochs read to their end (training reads them so): a worker augments a few
    batches ahead, so an epoch abandoned early leaves its dataset RNG further on than this loader's. Where loading
    competes with training for the same cores, in-process loading is the faster layout
    (engine.config.default_workers)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, num_workers=0, **kwargs)
        self._seeded = False

    def __iter__(self) -> Iterator[tuple]:
        if not self._seeded:  # the draw a multi-process iterator makes when it is created, before its workers start
            base_seed = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator).item())
            self.dataset.reseed(base_seed % 2**32)  # worker 0's seed: base_seed + worker_id
            self._seeded = True
        return self._batches()

    def _batches(self) -> Iterator[tuple]:
        for batch in self.batch_sampler:
            imgs, targets, *rest = self.collate_fn([self.dataset[i] for i in batch])
            if self.pin_memory:  # as a worker loader's pinning thread would, for non-blocking copies to the GPU
                imgs, targets = imgs.pin_memory(), targets.pin_memory()
            yield (imgs, targets, *rest)


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
    common = dict(batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                  collate_fn=collate_fn, generator=gen, pin_memory=torch.cuda.is_available())
    if workers == 0:
        return InProcessLoader(ds, **common)
    return DataLoader(ds, num_workers=workers, worker_init_fn=worker_init_fn, persistent_workers=True,
                      prefetch_factor=4, **common)
