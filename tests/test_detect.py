"""detect.py end to end on real coco128 images, a video and bad inputs; data/sources.py resolution rules."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import detect
from data.sources import MediaSource, resolve_source
from models.yolo import Model
from engine.checkpoint import model_state, save_checkpoint
from utils.general import ConfigError
from utils.plots import box_label
from logcapture import call_logged


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A random-weights n-BN checkpoint with 80 classes (only the plumbing is under test here)."""
    torch.manual_seed(0)
    m = Model("cfg/models/yolo-n-bn.yaml", nc=80)
    path = tmp_path_factory.mktemp("ckpt") / "rand.pt"
    save_checkpoint({"model": model_state(m), "ema": None, "model_yaml": m.yaml, "epoch": -1,
                     "names": [f"class{i}" for i in range(80)]}, path)
    return path


def run_detect(args: list[str]) -> tuple[dict, list[str]]:
    return call_logged(lambda a: detect.main(detect.parse_opt(a)), args)


def test_folder_of_coco128_images_with_a_corrupt_file(coco128_dir, weights, tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    images = sorted((coco128_dir / "images" / "train2017").glob("*.jpg"))[:3]
    for p in images:
        shutil.copy(p, src / p.name)
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (src / "truncated.jpg").write_bytes(images[0].read_bytes()[:3000])  # cv2.imread half-decodes this silently
    (src / "notes.md").write_text("ignored: not an image extension")
    out, lines = run_detect(["--weights", str(weights), "--source", str(src), "--img", "320", "--conf-thres", "0",
                             "--max-det", "3", "--save-txt", "--save-conf", "--save-json", "--device", "cpu",
                             "--project", str(tmp_path / "runs"), "--name", "exp"])
    save = Path(out["save_dir"])
    assert out["images"] == 3 and out["detections"] == 9
    assert sorted(out["skipped"]) == [str(src / "broken.jpg"), str(src / "truncated.jpg")]
    assert any("skipping" in ln and "broken.jpg" in ln for ln in lines)
    assert any("skipping" in ln and "truncated.jpg" in ln and "truncated" in ln.split(":")[-1] for ln in lines)
    assert sorted(p.name for p in save.glob("*.jpg")) == sorted(p.name for p in images)
    labels = sorted((save / "labels").glob("*.txt"))
    assert [p.stem for p in labels] == sorted(p.stem for p in images)
    for p in labels:
        rows = np.loadtxt(p, ndmin=2)
        assert rows.shape == (3, 6)  # class cx cy w h conf
        assert np.all((rows[:, 1:5] >= 0) & (rows[:, 1:5] <= 1))
    for img_path in images:  # the annotated image keeps the original size and differs from the input (boxes)
        a, b = cv2.imread(str(save / img_path.name)), cv2.imread(str(img_path))
        assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).mean() > 0.01
    per_image = [ln for ln in lines if ln.endswith("ms") and "/5 " in ln]  # 5 files listed, 3 readable
    assert len(per_image) == 3 and all("class" in ln for ln in per_image)


def test_video_with_vid_stride(weights, tmp_path):
    video = tmp_path / "clip.mp4"
    wr = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (96, 64))
    for i in range(6):
        wr.write(np.full((64, 96, 3), 30 * i, np.uint8))
    wr.release()
    out, _ = run_detect(["--weights", str(weights), "--source", str(video), "--img", "128", "--vid-stride", "2",
                         "--save-txt", "--device", "cpu", "--project", str(tmp_path / "runs")])
    save = Path(out["save_dir"])
    assert out["images"] == 3
    assert sorted(p.name for p in (save / "labels").glob("*.txt")) == ["clip_0.txt", "clip_2.txt", "clip_4.txt"]
    cap = cv2.VideoCapture(str(save / "clip.mp4"))
    assert cap.isOpened() and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    cap.release()


def test_bad_inputs_exit_2_with_one_line(weights, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert detect.cli(["--weights", str(weights), "--source", str(empty), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(empty) in err and "\n" not in err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    (tmp_path / "a.jpg").write_bytes(cv2.imencode(".jpg", np.zeros((32, 32, 3), np.uint8))[1].tobytes())
    assert detect.cli(["--weights", str(bad), "--source", str(tmp_path / "a.jpg"), "--device", "cpu"]) == 2
    assert "bad.pt" in capsys.readouterr().err


def test_source_resolution(tmp_path):
    for name in ("b.jpg", "a.png", "c.mp4", "skip.txt.bak"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in resolve_source(tmp_path)] == ["a.png", "b.jpg", "c.mp4"]
    assert [p.name for p in resolve_source(str(tmp_path / "*.jpg"))] == ["b.jpg"]
    lst = tmp_path / "list.txt"
    lst.write_text("b.jpg\n\n# comment\n" + str(tmp_path / "a.png") + "\n")
    assert resolve_source(lst) == [tmp_path / "b.jpg", tmp_path / "a.png"]
    assert resolve_source("0") == 0
    with pytest.raises(ConfigError, match="not found"):
        resolve_source(tmp_path / "missing.jpg")
    with pytest.raises(ConfigError, match="glob matches no"):
        resolve_source(str(tmp_path / "*.bmp"))
    with pytest.raises(ConfigError, match="no camera at webcam index 7"):
        MediaSource("7")  # a webcam index is accepted only when that camera opens
    with pytest.raises(ConfigError, match="vid-stride"):
        MediaSource(tmp_path, vid_stride=0)
    # every listed file is unreadable (b'x'): all skipped, none fatal
    src = MediaSource(tmp_path)
    assert list(src) == [] and len(src.skipped) == 3


def test_box_label_text_is_drawn_in_contrasting_colour():
    for tag_col, dark_text in (((200, 255, 255), True), ((120, 30, 0), False)):  # light yellow, dark blue (BGR)
        img = np.zeros((100, 200, 3), np.uint8)
        box_label(img, (20, 50, 120, 90), "person 0.87", tag_col, lw=2)
        tag = img[30:50, 20:120]  # the filled tag sits above the box
        assert (tag == tag_col).all(-1).mean() > 0.5
        text = (tag.sum(-1) < 100) if dark_text else (tag.min(-1) > 200)
        assert text.sum() > 30  # the label's strokes, in the contrasting colour


def test_folder_listing_and_reader_share_one_image_suffix_list(tmp_path: Path) -> None:
    """A folder lists only what data.readers.read_image decodes (a .dng used to be listed, then rejected)."""
    from data.readers import IMG_EXTS, read_image

    cv2.imwrite(str(tmp_path / "a.jpg"), np.full((8, 8, 3), 50, np.uint8))
    (tmp_path / "b.dng").write_bytes((tmp_path / "a.jpg").read_bytes())
    assert resolve_source(tmp_path) == [tmp_path / "a.jpg"]
    assert ".dng" not in IMG_EXTS and read_image(tmp_path / "b.dng") == (None, "not_image")
