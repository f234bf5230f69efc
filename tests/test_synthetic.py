"""The built-in dataset: determinism, content statistics, auto-generation from its dataset YAML."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from data.synthetic import CLASSES, generate, main, render_image, variant_classes


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMYOLO_CACHE_DIR", str(tmp_path / "cache"))


def test_same_seed_byte_identical_and_valid(tmp_path):
    generate(tmp_path / "a", seed=7, n_train=10, n_val=4, workers=2)
    generate(tmp_path / "b", seed=7, n_train=10, n_val=4, workers=1)  # process count does not matter
    generate(tmp_path / "c", seed=8, n_train=10, n_val=4, workers=1)
    for split in ("train", "val"):
        fa = (tmp_path / "a" / "annotations" / f"instances_{split}.json").read_bytes()
        assert fa == (tmp_path / "b" / "annotations" / f"instances_{split}.json").read_bytes()
        assert fa != (tmp_path / "c" / "annotations" / f"instances_{split}.json").read_bytes()
    assert (tmp_path / "a/images/train/train_000003.jpg").read_bytes() == \
        (tmp_path / "b/images/train/train_000003.jpg").read_bytes()
    d = json.loads((tmp_path / "a" / "annotations" / "instances_train.json").read_text())
    assert len(d["images"]) == 10 and [c["name"] for c in d["categories"]] == CLASSES
    sizes = {im["id"]: (im["width"], im["height"]) for im in d["images"]}
    for im in d["images"]:
        img = cv2.imread(str(tmp_path / "a" / "images" / "train" / im["file_name"]))
        assert img.shape[:2] == (im["height"], im["width"]) and 320 <= max(img.shape[:2]) <= 416
    for a in d["annotations"]:
        x, y, w, h = a["bbox"]
        W, H = sizes[a["image_id"]]
        assert 0 <= x and 0 <= y and x + w <= W + 1e-6 and y + h <= H + 1e-6 and w > 0 and h > 0
        assert a["area"] == pytest.approx(w * h, abs=0.01) and a["iscrowd"] == 0


def test_content_statistics():
    """Over 120 images: all classes, COCO small / medium / large all well represented, a few objects per image,
    and some boxes overlapping (partial occlusion)."""
    cls, areas, per_img, overlaps = [], [], [], 0
    for i in range(120):
        img, objs = render_image(0, "train", i)
        per_img.append(len(objs))
        b = np.array([o[1] for o in objs], float).reshape(-1, 4)
        cls += [o[0] for o in objs]
        areas += list(b[:, 2] * b[:, 3])
        xyxy = np.c_[b[:, :2], b[:, :2] + b[:, 2:]]
        for j in range(len(xyxy)):
            for k in range(j):
                iw = min(xyxy[j, 2], xyxy[k, 2]) - max(xyxy[j, 0], xyxy[k, 0])
                ih = min(xyxy[j, 3], xyxy[k, 3]) - max(xyxy[j, 1], xyxy[k, 1])
                overlaps += iw > 0 and ih > 0
    areas = np.array(areas)
    assert len(CLASSES) >= 8 and set(cls) == set(range(len(CLASSES)))
    small, large = (areas < 32 ** 2).mean(), (areas > 96 ** 2).mean()
    assert 0.15 < small < 0.5 and 0.08 < large < 0.35 and 0.3 < 1 - small - large
    assert 2.5 < np.mean(per_img) < 6 and min(per_img) >= 1
    assert overlaps >= 20
    # different images differ; the same (seed, index) gives the same pixels
    assert np.array_equal(render_image(0, "val", 3)[0], render_image(0, "val", 3)[0])
    assert render_image(0, "val", 3)[1] != render_image(0, "train", 3)[1]


def test_cli(tmp_path, capsys):
    main(["--out", str(tmp_path / "s"), "--seed", "1", "--train", "3", "--val", "2", "--workers", "1"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["train"]["images"] == 3 and out["val"]["images"] == 2
    assert len(list((tmp_path / "s" / "images" / "val").glob("*.jpg"))) == 2


def test_yaml_generates_once_and_loads(tmp_path):
    from data.loader import create_dataloader, load_data_config

    y = tmp_path / "syn.yaml"
    y.write_text(f"path: {tmp_path / 'ds'}\nformat: coco\ntrain: annotations/instances_train.json\n"
                 "train_images: images/train\nval: annotations/instances_val.json\nval_images: images/val\n"
                 "synthetic: {seed: 0, train: 8, val: 4}\n"
                 f"names: {CLASSES}\n")
    cfg = load_data_config(y)
    ann = tmp_path / "ds" / "annotations" / "instances_val.json"
    assert ann.is_file() and not list(tmp_path.glob(".ds.tmp-*"))
    mtime = ann.stat().st_mtime_ns
    load_data_config(y)
    assert ann.stat().st_mtime_ns == mtime  # not regenerated
    loader, ds = create_dataloader(cfg, "val", 320, 4, augment=False)
    imgs, targets, paths, metas = next(iter(loader))
    assert imgs.shape == (4, 3, 320, 320) and ds.cat_ids == list(range(1, 11)) and len(targets) > 0
    assert metas[0]["image_id"] == 1


def test_shipped_yaml_matches_generator():
    import yaml

    from utils.general import ROOT

    d = yaml.safe_load((ROOT / "cfg" / "data" / "synthetic.yaml").read_text())
    assert d["names"] == CLASSES and d["synthetic"]["train"] >= 2000 and d["synthetic"]["val"] >= 500


def test_concurrent_first_use_generates_once(tmp_path, monkeypatch):
    """Two ranks loading the YAML at the same time: the file lock lets one generate, the other waits and reuses."""
    import threading

    import data.synthetic as S
    from data.loader import load_data_config

    calls = []
    real = S.generate
    monkeypatch.setattr(S, "generate", lambda *a, **k: calls.append(1) or real(*a, **{**k, "workers": 1}))
    y = tmp_path / "syn.yaml"
    y.write_text(f"path: {tmp_path / 'ds'}\ntrain: annotations/instances_train.json\n"
                 "val: annotations/instances_val.json\nsynthetic: {seed: 1, train: 4, val: 2}\n"
                 f"names: {CLASSES}\n")
    out, errs = [], []

    def run():
        try:
            out.append(load_data_config(y))
        except Exception as e:  # surfaced by the assertion below
            errs.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errs and len(out) == 2 and calls == [1]
    assert out[0]["val_images"].endswith("images/val")
    assert len(list((tmp_path / "ds" / "images" / "train").iterdir())) == 4


def test_study_variant_is_smaller_and_easier_and_leaves_the_default_unchanged():
    """The study variant: 192-256 px images, no COCO-small objects, at most 5 per image; the default variant's
    pixels are those of render_image without a variant (the built-in dataset did not change)."""
    areas, per_img, sides = [], [], []
    for i in range(60):
        img, objs = render_image(0, "train", i, "study")
        sides.append(max(img.shape[:2]))
        per_img.append(len(objs))
        areas += [o[1][2] * o[1][3] for o in objs]
    assert 192 <= min(sides) and max(sides) <= 256
    assert min(per_img) >= 1 and max(per_img) <= 5
    assert np.quantile(areas, 0.05) > 16 ** 2 and (np.array(areas) < 32 ** 2).mean() < 0.1
    # six of the ten classes, ids 0-5 in the variant's own order (the study's data YAML has nc: 6)
    assert variant_classes("study") == ["circle", "square", "triangle", "star", "cross", "arrow"]
    assert variant_classes("default") == CLASSES
    seen = {o[0] for i in range(60) for o in render_image(0, "val", i, "study")[1]}
    assert seen == set(range(6))
    img_d, objs_d = render_image(0, "train", 5)
    img_v, objs_v = render_image(0, "train", 5, "default")
    assert np.array_equal(img_d, img_v) and objs_d == objs_v
    with pytest.raises(ValueError, match="unknown synthetic variant 'hard'"):
        generate(".", n_train=1, n_val=1, variant="hard")
