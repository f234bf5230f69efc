"""DataLoader contract: batch format, exact inverse mapping of val boxes, determinism, DDP sampler, RAM cache."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from data.augment import scale_boxes_to_original
from data.loader import create_dataloader, load_data_config


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMYOLO_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def c128_json(coco128_dir):
    return load_data_config("coco128-json.yaml")


def _xyxy(t: torch.Tensor, s: int) -> np.ndarray:
    cx, cy, w, h = (t[:, k].numpy() * s for k in range(2, 6))
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)


def test_val_batch_format_and_inverse(c128_json):
    loader, ds = create_dataloader(c128_json, "val", 320, 8, augment=False)
    imgs, targets, paths, metas = next(iter(loader))
    assert imgs.shape == (8, 3, 320, 320) and imgs.dtype == torch.float32
    assert 0 <= imgs.min() and imgs.max() <= 1 and imgs.max() > 0.5
    assert targets.dtype == torch.float32 and targets.shape[1] == 6
    assert len(paths) == len(metas) == 8 and paths[0] == ds.records[0].im_file
    assert ((targets[:, 2:] >= 0) & (targets[:, 2:] <= 1)).all()
    for k, m in enumerate(metas):
        rec = ds.records[k]
        assert m["image_id"] == rec.image_id and m["orig_shape"] == (rec.height, rec.width)
        t = targets[targets[:, 0] == k]
        keep = ~rec.crowd  # crowd regions are no targets
        assert len(t) == int(keep.sum()) and t[:, 1].tolist() == rec.cls[keep].tolist()
        back = scale_boxes_to_original(_xyxy(t, 320), m["ratio"], m["pad"], m["orig_shape"])
        np.testing.assert_allclose(back, rec.boxes[keep], atol=2e-3)
    # the image itself is letterboxed: grey padding rows for a landscape 640x480 image
    m0 = metas[0]
    assert m0["pad"] == (0, 40) and torch.allclose(imgs[0, :, :40], torch.tensor(114 / 255))


def test_train_batch_format_and_determinism(c128_json):
    def first_batches(seed, workers):
        loader, ds = create_dataloader(c128_json, "train", 256, 4, augment=True, workers=workers, seed=seed)
        it = iter(loader)
        return [next(it) for _ in range(2)]

    a = first_batches(0, 0)
    imgs, targets, paths, metas = a[0]
    assert imgs.shape == (4, 3, 256, 256) and targets.shape[1] == 6
    assert set(targets[:, 0].long().tolist()) <= {0, 1, 2, 3}
    assert (targets[:, 1] >= 0).all() and (targets[:, 1] < 80).all()
    assert ((targets[:, 2:] >= 0) & (targets[:, 2:] <= 1)).all() and (targets[:, 4:] > 0).all()
    b = first_batches(0, 0)
    c = first_batches(1, 0)
    for x, y in zip(a, b):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2]
    assert not torch.equal(a[0][0], c[0][0])
    w1, w2 = first_batches(5, 2), first_batches(5, 2)  # worker processes: same seed, same batches
    for x, y in zip(w1, w2):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])


def test_distributed_sampler_partitions_and_reshuffles(c128_json):
    parts = []
    for rank in (0, 1):
        loader, _ = create_dataloader(c128_json, "train", 128, 8, augment=False, rank=rank, world_size=2, seed=3)
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
        loader.sampler.set_epoch(0)
        e0 = list(loader.sampler)
        loader.sampler.set_epoch(1)
        e1 = list(loader.sampler)
        assert len(e0) == 64 and e0 != e1  # a new permutation each epoch
        parts.append(set(list(iter(loader.sampler))))
    assert parts[0].isdisjoint(parts[1]) and len(parts[0] | parts[1]) == 128


def test_ram_cache_gives_same_batches(c128_json):
    a_loader, _ = create_dataloader(c128_json, "val", 256, 16, augment=False)
    b_loader, ds = create_dataloader(c128_json, "val", 256, 16, augment=False, cache=True)
    assert all(im is not None for im in ds._imgs)
    a, b = next(iter(a_loader)), next(iter(b_loader))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_file_broken_after_scan_never_crashes_a_worker(tmp_path, coco128_dir):
    root = tmp_path / "c"
    shutil.copytree(coco128_dir / "images" / "train2017", root / "images" / "train2017")
    shutil.copytree(coco128_dir / "labels" / "train2017", root / "labels" / "train2017")
    (tmp_path / "d.yaml").write_text(f"path: {root}\ntrain: images/train2017\nval: images/train2017\n"
                                     f"names: {list(map(str, range(80)))}\n")
    cfg = load_data_config(tmp_path / "d.yaml")
    for augment in (True, False):
        loader, ds = create_dataloader(cfg, "train", 128, 32, augment=augment, workers=1, shuffle=False)
        for r in ds.records[:20]:
            open(r.im_file, "wb").close()  # emptied after the scan
        n = sum(len(b[0]) for b in loader)
        assert n == 128
        for r in ds.records[:20]:
            shutil.copy(coco128_dir / "images" / "train2017" / r.im_file.split("/")[-1], r.im_file)


@pytest.fixture(scope="module")
def syn_train_yaml(tmp_path_factory):
    """12 training images of the built-in synthetic dataset (generated into a temporary folder)."""
    root = tmp_path_factory.mktemp("syn_train")
    y = root / "syn.yaml"
    y.write_text(f"path: {root / 'data'}\nformat: coco\ntrain: annotations/instances_train.json\n"
                 "train_images: images/train\nval: annotations/instances_val.json\nval_images: images/val\n"
                 "synthetic: {seed: 0, train: 12, val: 1}\nnc: 10\nnames: [a, b, c, d, e, f, g, h, i, j]\n")
    return y


def test_in_process_loading_draws_one_workers_batches(syn_train_yaml):
    """--workers 0 trains on exactly the batches of --workers 1 (persistent worker): two epochs with mosaic, then
    a loader rebuilt over the same dataset without mosaic and with another seed, as close_mosaic does."""
    from data.loader import InProcessLoader, build_loader

    def epochs(workers):
        loader, ds = create_dataloader(syn_train_yaml, "train", 128, 4, augment=True, workers=workers, seed=7,
                                       cache=True)
        out = [[b for b in loader] for _ in range(2)]
        ds.set_mosaic(0.0)
        out.append(list(build_loader(ds, 4, workers=workers, seed=8, shuffle=True)))
        return type(loader), out

    kind0, in_process = epochs(0)
    kind1, worker = epochs(1)
    assert kind0 is InProcessLoader and kind1 is not InProcessLoader
    for e0, e1 in zip(in_process, worker):
        assert len(e0) == len(e1) == 3
        for (i0, t0, p0, _), (i1, t1, p1, _) in zip(e0, e1):
            assert p0 == p1 and torch.equal(i0, i1) and torch.equal(t0, t1)
    assert not torch.equal(in_process[0][0][0], in_process[1][0][0])  # each epoch reshuffles and re-augments
