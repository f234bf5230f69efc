"""Geometry tests: letterbox and its inverse, and that boxes follow the pixels through every train transform."""
from __future__ import annotations

import random

import cv2
import numpy as np
import pytest
import torch

from data.augment import HSVGain, augment_params, build_train_transform, letterbox, mosaic_canvas, scale_boxes_to_original
from utils.general import ConfigError

ZERO = {k: 0.0 for k in ("hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "perspective",
                         "fliplr", "flipud", "mosaic")}


def _extent(mask: np.ndarray) -> np.ndarray | None:
    ys, xs = np.nonzero(mask)
    return None if len(xs) == 0 else np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)


@pytest.mark.parametrize("shape", [(480, 640), (640, 427), (333, 333), (100, 250), (700, 90)])
@pytest.mark.parametrize("auto", [False, True])
def test_letterbox_inverse_exact(shape, auto):
    h0, w0 = shape
    img = np.zeros((h0, w0, 3), np.uint8)
    box = np.array([[0.21 * w0, 0.3 * h0, 0.77 * w0, 0.9 * h0]])
    x1, y1, x2, y2 = box[0].round().astype(int)
    img[y1:y2, x1:x2] = 255
    out, r, (pw, ph) = letterbox(img, 320, stride=32, auto=auto)
    assert isinstance(pw, int) and isinstance(ph, int)
    if auto:
        assert out.shape[0] % 32 == 0 and out.shape[1] % 32 == 0 and max(out.shape[:2]) == 320
        assert out.shape[0] - round(h0 * r) < 32 and out.shape[1] - round(w0 * r) < 32  # minimal padding
    else:
        assert out.shape[:2] == (320, 320)
    assert r == pytest.approx(min(320 / h0, 320 / w0))
    lb = box * r + [pw, ph, pw, ph]
    back = scale_boxes_to_original(lb, r, (pw, ph), (h0, w0))
    np.testing.assert_allclose(back, box, atol=1e-3)
    back_t = scale_boxes_to_original(torch.tensor(lb, dtype=torch.float64), r, (pw, ph), (h0, w0))
    np.testing.assert_allclose(back_t.numpy(), box, atol=1e-3)
    # the pixels agree with the geometry to within the resize's one-pixel blur
    ext = _extent(out[..., 0] > 127)
    np.testing.assert_allclose(ext, (np.array([x1, y1, x2, y2]) * r + [pw, ph, pw, ph]), atol=1.01)
    # padding is the grey 114
    if ph:
        assert (out[0] == 114).all()


def test_scale_boxes_clips_and_copies():
    b = np.array([[-50.0, 10, 500, 700]], np.float32)
    out = scale_boxes_to_original(b, 0.5, (10, 20), (480, 640))
    np.testing.assert_allclose(out, [[0, 0, 640, 480]])
    assert b[0, 0] == -50  # input untouched
    t = scale_boxes_to_original(torch.tensor([[30.0, 40.0, 50.0, 60.0, 0.9]]), 2.0, (10, 0), (100, 100))
    assert t.tolist() == [[10.0, 20.0, 20.0, 30.0, pytest.approx(0.9)]]


def test_hyp_validation():
    assert augment_params(None)["mosaic"] == 1.0
    with pytest.raises(ConfigError, match="fliplr"):
        augment_params({**ZERO, "fliplr": 2})
    with pytest.raises(ConfigError, match="'scale'"):
        augment_params({**ZERO, "scale": "big"})


def test_flip_only_mirrors_boxes():
    s = 320
    t = build_train_transform(s, {**ZERO, "fliplr": 1.0})
    img = np.zeros((240, 320, 3), np.uint8)
    img[50:90, 30:100] = 200
    out = t([(img, np.array([[30, 50, 100, 90]], np.float32), np.array([3]))])
    # the letterbox centres the 240-high image in 320 (40 px top), then the flip mirrors x: x' = 320 - x
    np.testing.assert_allclose(out["bboxes"], [[220, 90, 290, 130]], atol=1e-3)
    np.testing.assert_allclose(_extent(out["image"][..., 0] == 200), out["bboxes"][0], atol=1e-3)
    assert list(out["cls"]) == [3]


def _tile(rng: np.random.Generator, s: int, first_cls: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An s x s black tile with 4 non-overlapping 40 px squares (one in the top-left corner), each in a colour
    whose green channel identifies its class."""
    img = np.zeros((s, s, 3), np.uint8)
    slots = [0] + list(rng.choice(np.arange(1, 16), 3, replace=False))
    boxes, cls = [], []
    for k, slot in enumerate(slots):
        x, y = (slot % 4) * 64 + (0 if slot == 0 else int(rng.integers(0, 24))), (slot // 4) * 64
        c = first_cls + k
        img[y:y + 40, x:x + 40] = (200, 250 - 10 * c, 60)
        boxes.append([x, y, x + 40, y + 40])
        cls.append(c)
    return img, np.array(boxes, np.float32), np.array(cls)


def test_mosaic_keeps_visible_boxes_and_drops_cut_off_ones():
    """Each square that stays >= 2 px each way and keeps >= 10 % of its area has a box equal to its pixel extent;
    no box is left for a square the crop removed or cut below those limits (YOLOv5's box_candidates)."""
    s = 256
    t = build_train_transform(s, {**ZERO, "mosaic": 1.0})
    rng = np.random.default_rng(0)
    kept = dropped = clipped = sliver = 0
    for seed in range(16):
        t.set_random_seed(seed)
        tiles = [_tile(rng, s, 4 * j) for j in range(4)]
        out = t(tiles)
        assert out["image"].shape == (s, s, 3)
        got = {int(c): b for c, b in zip(out["cls"], out["bboxes"])}
        assert len(got) == len(out["cls"])  # no class twice: each tile used once
        for c in range(16):
            ext = _extent((out["image"][..., 1] == 250 - 10 * c) & (out["image"][..., 0] == 200))
            w, h = (0, 0) if ext is None else (ext[2] - ext[0], ext[3] - ext[1])
            if w >= 2 and h >= 2 and w * h >= 0.1 * 40 * 40:
                assert c in got, f"square {c} visible at {ext} but its box was dropped"
                np.testing.assert_allclose(got[c], ext, atol=1e-3)
                kept += 1
                clipped += int(w < 40 or h < 40)
            else:
                assert c not in got, f"box {c} kept though only {w} x {h} px of its square are visible"
                dropped += 1
                sliver += int(w * h > 0)
    assert kept > 20 and dropped > 5 and clipped > 3 and sliver > 0  # every case really happened


def _padding(out: dict) -> float:
    return 1.0 - float(out["mask"].mean())


def test_mosaic_tiles_are_flush_at_the_junction():
    """Four non-square tiles meet at one point, each at its full size: no padding between them."""
    s = 200
    colours = [(10, 200, 30), (200, 10, 30), (30, 10, 200), (200, 200, 30)]
    shapes = [(150, 200), (200, 120), (100, 200), (200, 160)]  # (h, w), long side s
    tiles = [(np.full((h, w, 3), c, np.uint8), np.zeros((0, 4), np.float32), np.zeros(0)) for (h, w), c in
             zip(shapes, colours)]
    for seed in range(5):
        canvas, _, _, mask = mosaic_canvas(tiles, s, random.Random(seed), with_mask=True)
        exts = [_extent((canvas == c).all(-1)) for c in colours]
        xc, yc = exts[0][2], exts[0][3]  # the top-left tile ends at the junction
        assert 0.5 * s <= xc <= 1.5 * s and 0.5 * s <= yc <= 1.5 * s
        np.testing.assert_array_equal(exts[1][[0, 3]], [xc, yc])  # top right starts at xc, ends at yc
        np.testing.assert_array_equal(exts[2][[1, 2]], [yc, xc])  # bottom left
        np.testing.assert_array_equal(exts[3][[0, 1]], [xc, yc])  # bottom right
        for e, (h, w) in zip(exts, shapes):  # each tile whole, or cut only by the canvas edge
            assert e[2] - e[0] == w or e[0] == 0 or e[2] == 2 * s
            assert e[3] - e[1] == h or e[1] == 0 or e[3] == 2 * s
        assert mask.sum() == sum(((canvas == c).all(-1)).sum() for c in colours)


def test_mosaic_padding_fraction_of_non_square_images():
    """4:3 and 3:4 photos: without zoom the s x s cut of the 2s canvas is almost all image (flush tiles; the old
    albumentations Mosaic padded each tile inside a square cell: ~30 %); YOLOv5's zoom 0.5..1.5 stays under 15 %."""
    s = 160
    rng = np.random.default_rng(1)
    photos = [(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8), np.zeros((0, 4), np.float32), np.zeros(0)),
              (rng.integers(0, 255, (160, 120, 3), dtype=np.uint8), np.zeros((0, 4), np.float32), np.zeros(0))]
    for hyp, limit in (({**ZERO, "mosaic": 1.0}, 0.08), ({**augment_params(None), "translate": 0.0}, 0.15)):
        t = build_train_transform(s, hyp, with_mask=True)
        t.set_random_seed(0)
        pads = [_padding(t([photos[k % 2] for k in range(i, i + 4)])) for i in range(60)]
        assert np.mean(pads) < limit, (hyp["scale"], np.mean(pads))
    assert max(pads) > 0  # the zoom-out does reach the canvas edge sometimes: the mask does see padding


def test_box_filter_area_and_aspect():
    """Boxes keeping < 10 % of their area after the crop, or with aspect > 100, are dropped (YOLOv5)."""
    s = 320
    t = build_train_transform(s, ZERO)
    img = np.zeros((s, s, 3), np.uint8)
    boxes = np.array([[10, 10, 13, 319], [20, 10, 24, 319], [50, 50, 150, 150]], np.float32)  # aspect 103, 77, 1
    out = t([(img, boxes, np.array([0, 1, 2]))])
    assert sorted(out["cls"].tolist()) == [1, 2]
    # in a mosaic: a 100 px square cut by the s x s crop to 5 % / 20 % of its area
    t = build_train_transform(s, {**ZERO, "mosaic": 1.0})
    n_kept = 0
    for seed in range(40):
        t.set_random_seed(seed)
        tiles = [(np.zeros((s, s, 3), np.uint8), np.array([[0, 0, 100, 100]], np.float32), np.array([k]))
                 for k in range(4)]
        r = random.Random(seed)  # the junction the transform draws after set_random_seed(seed)
        xc, yc = (int(r.uniform(0.5 * s, 1.5 * s)) for _ in range(2))
        out = t(tiles)
        # tile 0's square sits at canvas (xc - s, yc - s) .. +100; the crop starts at s/2
        vis = (max(0, xc - s + 100 - s // 2) * max(0, yc - s + 100 - s // 2)) / 100 ** 2
        assert (0 in out["cls"].tolist()) == (vis >= 0.1 and min(xc, yc) - s + 100 - s // 2 >= 2), (seed, vis)
        n_kept += 0 in out["cls"].tolist()
    assert 0 < n_kept < 40  # both outcomes happened


def _square_runs(hyp: dict, seeds: int, s: int = 256):
    """Yield (output dict, pixel extent) of one 40 x 60 white square on a black s x s image, per seed."""
    t = build_train_transform(s, hyp)
    img = np.zeros((s, s, 3), np.uint8)
    img[100:160, 80:120] = 255
    for seed in range(seeds):
        t.set_random_seed(seed)
        out = t([(img, np.array([[80, 100, 120, 160]], np.float32), np.array([0]))])
        yield out, _extent(out["image"][..., 0] > 127)


def test_affine_box_matches_pixels():
    """Zoom / translate of a whole image: one square on a black image; its pixel extent equals the output box."""
    for out, ext in _square_runs({**ZERO, "translate": 0.1, "scale": 0.5, "degrees": 0.0}, 10):
        assert len(out["bboxes"]) == 1
        np.testing.assert_allclose(out["bboxes"][0], ext, atol=1.01)
        w, h = ext[2] - ext[0], ext[3] - ext[1]
        assert 20 - 2 <= w <= 60 + 2 and h / w == pytest.approx(1.5, abs=0.1)  # zoom 0.5..1.5 keeps aspect


def test_hsv_gains_are_multiplicative():
    """Grey stays grey and black stays black (additive shifts would colour them); a coloured pixel's saturation
    and value move by a factor in [1 - g, 1 + g]."""
    img = np.zeros((4, 4, 3), np.uint8)
    img[0] = 128  # grey
    img[1] = (200, 100, 50)  # orange
    hsv0 = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(float)
    t = HSVGain(0.015, 0.7, 0.4, p=1.0)
    t.set_random_seed(0)
    seen_s = []
    for _ in range(30):
        out = t(image=img)["image"]
        assert (out[2:] == 0).all()  # black
        g = out[0].astype(int)
        assert (np.abs(g - g[:, :1]) <= 1).all()  # grey rows stay grey (r == g == b up to rounding)
        hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV).astype(float)
        rs, rv = hsv[1, 0, 1] / hsv0[1, 0, 1], hsv[1, 0, 2] / hsv0[1, 0, 2]
        assert 0.3 - 0.03 <= rs <= 1.7 + 0.03 and 0.6 - 0.03 <= rv <= 1.4 + 0.03
        seen_s.append(rs)
    assert max(seen_s) - min(seen_s) > 0.5  # the gain really varies


def test_perspective_keeps_boxes_inside_and_follows_pixels():
    """hyp perspective > 0 (off by default) adds A.Perspective; boxes stay inside and enclose their square."""
    for out, ext in _square_runs({**ZERO, "perspective": 0.0005}, 5):
        assert len(out["bboxes"]) == 1 and (out["bboxes"] >= 0).all() and (out["bboxes"] <= 256).all()
        np.testing.assert_allclose(out["bboxes"][0], ext, atol=3)


_IMPORT_PROBE = """
import os, sys, urllib.request
calls = []
def refuse(self, *args, **kwargs):
    calls.append(args)
    raise OSError("network refused by the test")
urllib.request.OpenerDirector.open = refuse
import data.augment
print(len(calls), os.environ.get("NO_ALBUMENTATIONS_UPDATE", "unset"))
"""


def test_importing_the_pipeline_makes_no_network_call():
    """albumentations asks pypi.org for its latest version on import unless NO_ALBUMENTATIONS_UPDATE is set; our
    import must not (nothing may download at run time), and must leave the caller's environment unchanged."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout.split()
    assert out == ["0", "unset"]


def test_scoped_env_restores_set_and_unset_variables(monkeypatch: pytest.MonkeyPatch):
    import os

    from utils.general import scoped_env

    monkeypatch.setenv("NORMYOLO_TEST_A", "before")
    monkeypatch.delenv("NORMYOLO_TEST_B", raising=False)
    with scoped_env(NORMYOLO_TEST_A="inside", NORMYOLO_TEST_B="inside"):
        assert os.environ["NORMYOLO_TEST_A"] == os.environ["NORMYOLO_TEST_B"] == "inside"
    assert os.environ["NORMYOLO_TEST_A"] == "before" and "NORMYOLO_TEST_B" not in os.environ
    with pytest.raises(RuntimeError), scoped_env(NORMYOLO_TEST_B="inside"):
        raise RuntimeError("the body failed")
    assert "NORMYOLO_TEST_B" not in os.environ
