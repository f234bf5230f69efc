"""Geometry tests: letterbox and its inverse, and that boxes follow the pixels through every train transform."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data.augment import build_train_transform, letterbox, load_hyp, scale_boxes_to_original
from utils.general import ConfigError

ZERO = {k: 0.0 for k in ("hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "fliplr", "flipud",
                         "mosaic")}


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
    assert load_hyp(None)["mosaic"] == 1.0
    with pytest.raises(ConfigError, match="fliplr"):
        load_hyp({**ZERO, "fliplr": 2})
    with pytest.raises(ConfigError, match="'scale'"):
        load_hyp({**ZERO, "scale": "big"})


def test_flip_only_mirrors_boxes():
    s = 320
    t = build_train_transform(s, {**ZERO, "fliplr": 1.0})
    img = np.zeros((240, 320, 3), np.uint8)
    img[50:90, 30:100] = 200
    out = t(image=img, bboxes=np.array([[30, 50, 100, 90]], np.float32), cls=np.array([3]))
    # PadIfNeeded centres the 240-high image in 320 (40 px top), then the flip mirrors x: x' = 320 - x
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
    """After A.Mosaic each square still visible (>= 2 px each way) has a box equal to its pixel extent, and no box
    is left for a square the crop removed."""
    s = 256
    t = build_train_transform(s, {**ZERO, "mosaic": 1.0})
    rng = np.random.default_rng(0)
    kept = dropped = clipped = 0
    for seed in range(12):
        t.set_random_seed(seed)
        tiles = [_tile(rng, s, 4 * j) for j in range(4)]
        meta = [{"image": im, "bboxes": b, "cls": c} for im, b, c in tiles[1:]]
        out = t(image=tiles[0][0], bboxes=tiles[0][1], cls=tiles[0][2], mosaic_metadata=meta)
        assert out["image"].shape == (s, s, 3)
        got = {int(c): b for c, b in zip(out["cls"], out["bboxes"])}
        assert len(got) == len(out["cls"])  # no class twice: each tile used once
        for c in range(16):
            ext = _extent((out["image"][..., 1] == 250 - 10 * c) & (out["image"][..., 0] == 200))
            if ext is not None and ext[2] - ext[0] >= 2 and ext[3] - ext[1] >= 2:
                assert c in got, f"square {c} visible at {ext} but its box was dropped"
                np.testing.assert_allclose(got[c], ext, atol=1e-3)
                kept += 1
                clipped += int(ext[2] - ext[0] < 40 or ext[3] - ext[1] < 40)
            else:
                assert c not in got, f"box {c} kept though its square is cut off"
                dropped += 1
    assert kept > 20 and dropped > 5 and clipped > 3  # all three cases really happened


def test_affine_box_matches_pixels():
    """Zoom / translate: one square on a black image; its pixel extent after Affine equals the output box."""
    s = 256
    t = build_train_transform(s, {**ZERO, "translate": 0.1, "scale": 0.5, "degrees": 0.0})
    img = np.zeros((s, s, 3), np.uint8)
    img[100:160, 80:120] = 255
    for seed in range(10):
        t.set_random_seed(seed)
        out = t(image=img, bboxes=np.array([[80, 100, 120, 160]], np.float32), cls=np.array([0]))
        ext = _extent(out["image"][..., 0] > 127)
        assert len(out["bboxes"]) == 1
        np.testing.assert_allclose(out["bboxes"][0], ext, atol=1.01)
        w, h = ext[2] - ext[0], ext[3] - ext[1]
        assert 20 - 2 <= w <= 60 + 2 and h / w == pytest.approx(1.5, abs=0.1)  # zoom 0.5..1.5 keeps aspect
