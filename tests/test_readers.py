"""Readers, bad-input counting, label cache and COCO ground truth, on coco128 and on a fuzz folder."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from data.readers import read_split, summary_line
from data.loader import load_data_config
from utils.general import LOGGER, ROOT, ConfigError


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMYOLO_CACHE_DIR", str(tmp_path / "cache"))


def _cfg(tmp_path: Path, text: str) -> dict:
    p = tmp_path / "data.yaml"
    p.write_text(text)
    return load_data_config(p)


# ------------------------------------------------------------------------------------------------ coco128
def test_coco128_yolo_and_json_agree(coco128_dir):
    a = read_split(load_data_config("coco128.yaml"), "train")
    b = read_split(load_data_config("coco128-json.yaml"), "train")
    ya = {os.path.basename(r.im_file): r for r in a.records}
    yb = {os.path.basename(r.im_file): r for r in b.records}
    assert len(ya) == len(yb) == 128 and set(ya) == set(yb)
    # the YOLO files carry no crowd regions: per image, YOLO count == JSON count - JSON crowd count
    assert sum(len(r.cls) for r in a.records) == 929
    assert sum(len(r.cls) for r in b.records) == 939 and sum(int(r.crowd.sum()) for r in b.records) == 10
    for k, ra in ya.items():
        rb = yb[k]
        assert (ra.width, ra.height) == (rb.width, rb.height)
        assert len(ra.cls) == int((~rb.crowd).sum()), k
        # same boxes and classes, within the 6-decimal rounding of the YOLO files
        sa = sorted(zip(ra.cls.tolist(), ra.boxes.round(0).tolist()))
        sb = sorted(zip(rb.cls[~rb.crowd].tolist(), rb.boxes[~rb.crowd].round(0).tolist()))
        for (ca, ba), (cb, bb) in zip(sa, sb):
            assert ca == cb and np.abs(np.array(ba) - bb).max() <= 1.0
    assert a.counts["no_label_file"] == 2  # 000000000250.jpg and 000000000508.jpg have no label file
    assert b.cat_ids[:5] == [1, 2, 3, 4, 5] and b.cat_ids[-1] == 90 and len(b.cat_ids) == 80
    assert a.cat_ids == list(range(80))


def test_coco_gt_roundtrip_with_pycocotools(coco128_dir):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from data.readers import records_to_coco_gt

    res = read_split(load_data_config("coco128-json.yaml"), "train")
    gt = records_to_coco_gt(res.records, res.names, res.cat_ids)
    orig = json.loads((coco128_dir / "annotations" / "instances_train2017.json").read_text())
    key = lambda a: (a["image_id"], a["category_id"], a["iscrowd"], tuple(round(v) for v in a["bbox"]))
    g, o = sorted(gt["annotations"], key=key), sorted(orig["annotations"], key=key)
    assert [key(a)[:3] for a in g] == [key(a)[:3] for a in o]  # original image / category ids, crowd flags back
    np.testing.assert_allclose([a["bbox"] for a in g], [a["bbox"] for a in o], atol=1e-3)  # float32 storage
    np.testing.assert_allclose([a["area"] for a in g], [a["area"] for a in o], rtol=1e-5)
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt["annotations"] if not a["iscrowd"]]
    ev = COCOeval(coco, coco.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0) and ev.stats[1] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ fuzz
def _jpeg(path: Path, h: int = 100, w: int = 160) -> bytes:
    img = np.full((h, w, 3), 90, np.uint8)
    cv2.rectangle(img, (20, 20), (60, 70), (10, 200, 30), -1)
    ok, buf = cv2.imencode(path.suffix, img)
    path.write_bytes(buf.tobytes())
    return buf.tobytes()


def _yolo_fuzz(root: Path) -> None:
    im, lb = root / "images" / "train", root / "labels" / "train"
    im.mkdir(parents=True)
    lb.mkdir(parents=True)
    _jpeg(im / "good.jpg")  # 160 x 100
    (lb / "good.txt").write_text(
        "0 0.5 0.5 0.2 0.2\n"
        "1 0.25 0.45 0.25 0.5\n"
        "0 0.5 0.5 0.2 0.2\n"          # duplicate
        "1 0.5 0.5 0.2\n"              # malformed: 4 columns
        "x 0.5 0.5 0.2 0.2\n"          # malformed: not a number
        "1 0.5 nan 0.2 0.2\n"          # malformed: nan
        "1.5 0.5 0.5 0.2 0.2\n"        # malformed: fractional class
        "7 0.5 0.5 0.2 0.2\n"          # class out of range (nc = 3)
        "-1 0.5 0.5 0.2 0.2\n"         # class out of range
        "2 0.95 0.5 0.3 0.2\n"         # partly outside: clipped
        "2 1.5 0.5 0.2 0.2\n"          # wholly outside: dropped
        "2 0.5 0.5 0.0 0.2\n"          # zero width: dropped
        "\n")
    _jpeg(im / "clip.png")
    (lb / "clip.txt").write_text("2 0.1 0.1 0.4 0.4\n")  # clipped at the top-left
    _jpeg(im / "background.jpg")  # no label file
    _jpeg(im / "empty.jpg")
    (lb / "empty.txt").write_text("")
    (im / "corrupt.jpg").write_bytes(b"\x00\x11" * 1000)
    (im / "fake.png").write_text("not a png at all")
    data = _jpeg(im / "trunc.jpg")
    (im / "trunc.jpg").write_bytes(data[: len(data) // 2])
    data = _jpeg(im / "trunc.png")
    (im / "trunc.png").write_bytes(data[: len(data) // 2])
    (im / "notes.txt").write_text("a stray file")
    (im / ".DS_Store").write_bytes(b"\x00\x01")


YOLO_YAML = "path: {root}\ntrain: images/train\nval: images/train\nnames: [a, b, c]\n"
YOLO_COUNTS = {"duplicate": 1, "malformed": 4, "bad_class": 2, "clipped": 2, "outside": 2, "no_label_file": 1,
               "empty_label_file": 1, "corrupt": 2, "truncated": 2, "not_image": 2}


def test_yolo_fuzz_counts_exact(tmp_path, caplog, monkeypatch):
    _yolo_fuzz(tmp_path / "ds")
    cfg = _cfg(tmp_path, YOLO_YAML.format(root=tmp_path / "ds"))
    monkeypatch.setattr(LOGGER, "propagate", True)
    with caplog.at_level(logging.INFO, logger="normyolo"):
        res = read_split(cfg, "train")
    assert dict(res.counts) == YOLO_COUNTS
    recs = {Path(r.im_file).name: r for r in res.records}
    assert sorted(recs) == ["background.jpg", "clip.png", "empty.jpg", "good.jpg"]
    g = recs["good.jpg"]
    np.testing.assert_allclose(g.boxes, [[64, 40, 96, 60], [20, 20, 60, 70], [128, 40, 160, 60]], atol=1e-4)
    assert g.cls.tolist() == [0, 1, 2] and not g.crowd.any()
    np.testing.assert_allclose(recs["clip.png"].boxes, [[0, 0, 48, 30]], atol=1e-4)
    line = summary_line("train", res)
    assert "4 images, 4 boxes, 2 backgrounds (1 without label file, 1 with empty label file)" in line
    assert "6 images skipped: 2 corrupt, 2 truncated, 2 not an image" in line
    assert "2 clipped, 2 dropped outside / zero area, 1 duplicate rows dropped, 4 malformed rows dropped, " \
           "2 class id out of range" in line
    assert line in caplog.text


def test_yolo_fuzz_loads_through_the_loader(tmp_path):
    from data.loader import create_dataloader

    _yolo_fuzz(tmp_path / "ds")
    cfg = _cfg(tmp_path, YOLO_YAML.format(root=tmp_path / "ds"))
    for augment in (False, True):
        loader, ds = create_dataloader(cfg, "train", 128, 4, augment=augment, workers=0, shuffle=False)
        batches = list(loader)
        assert sum(len(b[0]) for b in batches) == 4
        if not augment:
            assert sum(len(b[1]) for b in batches) == 4


def test_coco_fuzz_counts_exact(tmp_path):
    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    _jpeg(root / "images" / "a.jpg")
    _jpeg(root / "images" / "b.jpg")
    (root / "images" / "bad.jpg").write_bytes(b"GIF89a garbage")
    cats = [{"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}, {"id": 90, "name": "toothbrush"}]
    images = [{"id": 11, "file_name": "a.jpg", "width": 160, "height": 100},
              {"id": 12, "file_name": "b.jpg", "width": 160, "height": 100},
              {"id": 13, "file_name": "missing.jpg", "width": 160, "height": 100},
              {"id": 14, "file_name": "bad.jpg", "width": 160, "height": 100},
              {"id": 15, "file_name": "a.jpg", "width": 999, "height": 100}]
    anns = [{"id": 1, "image_id": 11, "category_id": 5, "bbox": [10, 10, 30, 20], "area": 500, "iscrowd": 0},
            {"id": 2, "image_id": 11, "category_id": 90, "bbox": [50, 10, 60, 80], "area": 3000, "iscrowd": 1},
            {"id": 3, "image_id": 11, "category_id": 3, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
            {"id": 4, "image_id": 11, "category_id": 1, "bbox": [150, 90, 30, 20], "area": 600, "iscrowd": 0},
            {"id": 5, "image_id": 11, "category_id": 1, "bbox": [10, 10, 30], "area": 600, "iscrowd": 0},
            {"id": 6, "image_id": 11, "category_id": 5, "bbox": [10, 10, 30, 20], "area": 500, "iscrowd": 0},
            {"id": 7, "image_id": 99, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},
            {"id": 8, "image_id": 13, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},
            {"id": 9, "image_id": 12, "category_id": 1, "bbox": [200, 10, 5, 5], "area": 25, "iscrowd": 0}]
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    cfg = _cfg(tmp_path, f"path: {root}\ntrain: ann.json\ntrain_images: images\nval: ann.json\nval_images: images\n")
    assert cfg["format"] == "coco" and cfg["names"] == ["person", "airplane", "toothbrush"] and cfg["nc"] == 3
    res = read_split(cfg, "train")
    assert dict(res.counts) == {"missing": 1, "corrupt": 1, "size_mismatch": 1, "unknown_category": 1,
                                "malformed": 1, "duplicate": 1, "clipped": 1, "outside": 1, "orphan": 2}
    assert res.cat_ids == [1, 5, 90]
    a = next(r for r in res.records if r.image_id == 11)
    assert a.cls.tolist() == [1, 2, 0] and a.crowd.tolist() == [False, True, False]
    np.testing.assert_allclose(a.boxes[2], [150, 90, 160, 100])
    from data.dataset import DetectionDataset

    ds = DetectionDataset(cfg, "val", 160, augment=False)
    gt = ds.coco_gt()
    assert {c["id"] for c in gt["categories"]} == {1, 5, 90}
    assert sorted((x["image_id"], x["category_id"], x["iscrowd"]) for x in gt["annotations"]) == \
        [(11, 1, 0), (11, 5, 0), (11, 90, 1)]
    img, labels, path, meta = ds[[r.image_id for r in ds.records].index(11)]
    assert meta["image_id"] == 11 and sorted(labels[:, 0].tolist()) == [0.0, 1.0]  # the crowd box is no target


def test_empty_dataset_names_the_path(tmp_path):
    (tmp_path / "ds" / "images").mkdir(parents=True)
    (tmp_path / "ds" / "images" / "x.jpg").write_bytes(b"junk")
    cfg = _cfg(tmp_path, YOLO_YAML.format(root=tmp_path / "ds").replace("images/train", "images"))
    with pytest.raises(ConfigError, match=r"no usable images in '.*images'.*1 corrupt"):
        read_split(cfg, "train")


def test_label_cache_hit_and_invalidation(tmp_path, monkeypatch, caplog):
    import data.readers as D

    _yolo_fuzz(tmp_path / "ds")
    cfg = _cfg(tmp_path, YOLO_YAML.format(root=tmp_path / "ds"))
    first = read_split(cfg, "train")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    calls = []
    real = D.check_image
    monkeypatch.setattr(D, "check_image", lambda p: calls.append(p) or real(p))
    again = read_split(cfg, "train")
    assert calls == [] and dict(again.counts) == dict(first.counts)  # served from the cache, counts kept
    np.testing.assert_array_equal(again.records[3].boxes, first.records[3].boxes)
    lbl = tmp_path / "ds" / "labels" / "train" / "clip.txt"
    lbl.write_text("2 0.5 0.5 0.4 0.4\n1 0.5 0.5 0.1 0.1\n")  # size changes -> key changes
    third = read_split(cfg, "train")
    assert calls and third.counts["clipped"] == 1
    assert len(next(r for r in third.records if r.im_file.endswith("clip.png")).cls) == 2


def test_unwritable_cache_dir_only_logs(tmp_path, monkeypatch, caplog):
    _yolo_fuzz(tmp_path / "ds")
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("NORMYOLO_CACHE_DIR", str(tmp_path / "afile" / "cache"))  # mkdir fails, even as root
    cfg = _cfg(tmp_path, YOLO_YAML.format(root=tmp_path / "ds"))
    monkeypatch.setattr(LOGGER, "propagate", True)
    with caplog.at_level(logging.INFO, logger="normyolo"):
        res = read_split(cfg, "train")
    assert len(res.records) == 4 and "label cache not written" in caplog.text


# ------------------------------------------------------------------------------------------------ YAML
def test_load_data_config_paths_and_errors(tmp_path, coco128_dir):
    cfg = load_data_config(ROOT / "cfg" / "data" / "coco128.yaml")
    assert cfg["path"] == str((ROOT / "../shared/coco128").resolve())  # relative path: against the repo root
    assert cfg["train"] == str(Path(cfg["path"]) / "images" / "train2017") and cfg["format"] == "yolo"
    assert cfg["nc"] == 80 and cfg["names"][0] == "person"
    js = load_data_config("coco128-json.yaml")
    assert js["format"] == "coco" and js["train_images"].endswith("images/train2017")
    d = _cfg(tmp_path, f"path: {coco128_dir}\ntrain: images/train2017\nval: images/train2017\n"
                       "names: {{0: a, 1: b}}\n".replace("{{", "{").replace("}}", "}"))
    assert d["names"] == ["a", "b"] and d["nc"] == 2
    bad = [("path: /nonexistent/xyz\ntrain: a\nval: a\nnames: [a]\nget: run get.sh\n", "not found \\(run get.sh\\)"),
           (f"path: {coco128_dir}\ntrain: images\nval: images\nnames: [a]\nnc: 3\n", "'nc' is 3"),
           (f"path: {coco128_dir}\ntrain: images\nval: images\n", "'names' is required"),
           (f"path: {coco128_dir}\ntrain: images\nval: images\nnames: [a]\nformat: voc\n", "'format'"),
           (f"path: {coco128_dir}\nnames: [a]\n", "'train' and 'val'")]
    for text, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            _cfg(tmp_path, text)
    with pytest.raises(ConfigError, match="not found"):
        load_data_config(tmp_path / "nope.yaml")


def test_coco_yaml_ships_site_layout():
    import yaml

    d = yaml.safe_load((ROOT / "cfg" / "data" / "coco.yaml").read_text())
    assert d["train"] == "annotations/instances_train2017.json" and d["train_images"] == "train2017"
    assert d["val_images"] == "val2017" and len(d["names"]) == 80
    assert (ROOT / "data" / "scripts" / "get_coco.sh").is_file()
