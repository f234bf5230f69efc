"""train.py end to end on a tiny generated dataset: outputs, kill -9 + --resume, and 2-process DDP with SyncBN."""
from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from utils.general import ROOT

TINY = ["--img", "64", "--batch-size", "4", "--workers", "0", "--noautoanchor", "--patience", "0"]


def make_dataset(root: Path, n: int = 8, size: int = 64) -> Path:
    """``n`` images with 1-3 bright rectangles of 2 classes (red / blue), YOLO labels, and a data YAML."""
    rng = np.random.default_rng(0)
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    for i in range(n):
        img = np.full((size, size, 3), 90, np.uint8)
        rows = []
        for _ in range(int(rng.integers(1, 4))):
            c = int(rng.integers(0, 2))
            w, h = rng.integers(12, 30, size=2)
            x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            img[y0:y0 + h, x0:x0 + w] = (0, 0, 255) if c == 0 else (255, 0, 0)  # BGR on disk
            rows.append(f"{c} {(x0 + w / 2) / size:.6f} {(y0 + h / 2) / size:.6f} {w / size:.6f} {h / size:.6f}")
        cv2.imwrite(str(root / "images" / "train" / f"im{i}.png"), img)
        (root / "labels" / "train" / f"im{i}.txt").write_text("\n".join(rows) + "\n")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/train",
                                   "names": ["red", "blue"]}))
    return cfg


@pytest.fixture(autouse=True)
def _label_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NORMYOLO_CACHE_DIR", str(tmp_path / "cache"))  # keep the label cache out of the repo


def _env() -> dict[str, str]:
    """The repo first on the path, ahead of (not instead of) the caller's PYTHONPATH, which may hold packages."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")


def _epochs(csv_path: Path) -> list[int]:
    import csv
    with open(csv_path, newline="") as f:
        return [int(float(r["epoch"])) for r in csv.DictReader(f)]


def test_tiny_run_writes_everything(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import train
    from engine.checkpoint import load_checkpoint, model_from_checkpoint

    from tests.logcapture import call_logged

    data = make_dataset(tmp_path / "data")
    argv = ["--data", str(data), "--epochs", "3", "--project", str(tmp_path / "runs"), "--seed", "1", *TINY]
    res, lines = call_logged(train.main, train.parse_opt(argv + ["--close-mosaic", "1"]))
    assert sum("Closing mosaic: the last 1 epochs" in ln for ln in lines) == 1
    run = Path(res["save_dir"])
    assert run == tmp_path / "runs" / "exp"
    for k in ("mAP50", "mAP50_95", "precision", "recall", "train_images_per_s", "wall_time_s"):
        assert np.isfinite(res[k]) and res[k] >= 0, k
    assert res["epochs"] == 3 and res["params"] > 1e6 and res["train_images_per_s"] > 0
    assert _epochs(run / "results.csv") == [0, 1, 2]
    for f in ("results.png", "hyp.yaml", "opt.yaml", "weights/last.pt", "weights/best.pt", "train_batch0.jpg"):
        assert (run / f).is_file(), f
    batch0 = cv2.imread(str(run / "train_batch0.jpg"))
    assert batch0.shape == (2 * 64, 2 * 64, 3) and batch0.std() > 10  # 4 images of 64 px in a 2 x 2 grid
    assert yaml.safe_load((run / "opt.yaml").read_text())["img"] == 64
    assert yaml.safe_load((run / "hyp.yaml").read_text())["close_mosaic"] == 1  # the flag overrides the hyp file
    last, best = load_checkpoint(run / "weights" / "last.pt"), load_checkpoint(run / "weights" / "best.pt")
    assert last["epoch"] == 2 and last["optimizer"] is not None and best["optimizer"] is None
    assert last["names"] == ["red", "blue"] and last["model_yaml"]["norm"] == "bn"
    torch.load(run / "weights" / "last.pt", weights_only=True)  # plain contents only
    model = model_from_checkpoint(run / "weights" / "best.pt")
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3 * (8 * 8 + 4 * 4 + 2 * 2), 7)
    import csv
    rows = list(csv.DictReader(open(run / "results.csv")))
    loss = [sum(float(r[k]) for k in ("train/box_loss", "train/obj_loss", "train/cls_loss")) for r in rows]
    assert loss[-1] < loss[0]  # it learns
    assert float(rows[0]["x/lr0"]) > float(rows[0]["x/lr1"])  # bias lr warms down from warmup_bias_lr
    assert all(0 < float(r["val_time_s"]) < float(res["wall_time_s"]) for r in rows)  # validated every epoch
    check_tensorboard(run, rows)

    # a second run increments the folder; --norm overrides the YAML norm
    res2 = train.main(train.parse_opt(argv[:2] + ["--epochs", "1", "--norm", "gn:C/16", "--noval",
                                                  "--no-tensorboard"] + argv[4:]))
    assert Path(res2["save_dir"]).name == "exp2"
    assert not list(Path(res2["save_dir"]).glob("events.out.tfevents.*"))  # --no-tensorboard
    assert load_checkpoint(Path(res2["save_dir"]) / "weights" / "last.pt")["model_yaml"]["norm"] == "gn:C/16"

    # bad input: one line, exit code 2
    assert train.cli(["--data", str(data), "--img", "100", "--project", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --img 100")


def check_tensorboard(run: Path, rows: list[dict[str, str]]) -> None:
    """The run folder's event file holds every epoch's losses, mAP and lr (the results.csv values) and the first
    validation batch image per epoch."""
    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip("tensorboard not installed (requirements-export.txt)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
    ev.Reload()
    tags = ev.Tags()
    assert {"train/box_loss", "train/obj_loss", "metrics/mAP50", "metrics/mAP50-95", "x/lr0"} <= set(tags["scalars"])
    for key in ("train/box_loss", "metrics/mAP50-95", "x/lr1"):
        events = ev.Scalars(key)
        assert [e.step for e in events] == [0, 1, 2]
        assert [e.value for e in events] == pytest.approx([float(r[key]) for r in rows], rel=1e-4, abs=1e-7)
    images = ev.Images("val/batch0_pred")
    assert [e.step for e in images] == [0, 1, 2]
    assert images[0].width == images[0].height == 3 * 64  # the 8 val images in a 3 x 3 grid


def test_kill9_then_resume(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data")
    project = tmp_path / "runs"
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(data), "--epochs", "4", "--project", str(project),
           *TINY]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = project / "exp" / "weights" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)  # mid-epoch 1 (or mid-write): nothing may be lost or duplicated
    proc.wait()
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", "--project", str(project)],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Resuming" in out.stderr
    run = project / "exp"
    assert not (project / "exp2").exists()
    assert _epochs(run / "results.csv") == [0, 1, 2, 3]
    ck = torch.load(run / "weights" / "last.pt", weights_only=True)
    assert ck["epoch"] == 3 and ck["opt"]["epochs"] == 4 and ck["opt"]["img"] == 64
    # a finished run cannot be resumed again: clear one-line error, exit 2
    again = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(run / "weights" / "last.pt")],
                           cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].startswith("error: --resume")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, argv: list[str], out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import train
    import engine.fit as engine

    seen = {}
    real = engine.train_one_epoch

    def spy(model, *args, **kwargs):  # keep a handle on the trained (DDP-wrapped) model of this rank
        seen["model"] = model
        return real(model, *args, **kwargs)

    engine.train_one_epoch = spy
    train.main(train.parse_opt(argv))
    m = seen["model"].module
    stats = {k: v.clone() for k, v in m.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    torch.save({"stats": stats, "types": sorted({type(x).__name__ for x in m.modules()})},
               Path(out_dir) / f"rank{rank}.pt")


def _spawn(tmp_path: Path, name: str, extra: list[str]) -> tuple[dict, dict, Path]:
    data = tmp_path / "data" / "tiny.yaml"
    if not data.exists():
        make_dataset(tmp_path / "data")
    out = tmp_path / name
    out.mkdir()
    argv = ["--data", str(data), "--epochs", "1", "--device", "cpu", "--project", str(tmp_path / "runs"),
            "--name", name, *TINY[:2], "--batch-size", "8", "--workers", "0", "--noautoanchor", *extra]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), argv, str(out)), nprocs=2, join=True)
    r0 = torch.load(out / "rank0.pt", weights_only=True)
    r1 = torch.load(out / "rank1.pt", weights_only=True)
    return r0, r1, tmp_path / "runs" / name


def test_ddp_two_cpu_processes_with_sync_bn(tmp_path: Path) -> None:
    from engine.checkpoint import model_from_checkpoint

    r0, r1, run = _spawn(tmp_path, "sync", ["--sync-bn"])
    assert "SyncBatchNorm" in r0["types"] and "BatchNorm2d" not in r0["types"]
    stats0, stats1 = r0["stats"], r1["stats"]
    assert len(stats0) > 100
    for k in stats0:
        assert torch.equal(stats0[k], stats1[k]), k  # synchronised statistics: bit-identical across ranks
    assert any(v.abs().sum() > 0 and not torch.allclose(v, torch.ones_like(v)) for v in stats0.values())
    ck = torch.load(run / "weights" / "last.pt", weights_only=True)
    saved = {k: v for k, v in ck["model"].items() if k in stats0}
    assert all(torch.equal(saved[k], stats0[k]) for k in stats0)  # rank 0 saved what every rank holds
    model = model_from_checkpoint(run / "weights" / "last.pt")  # loads into a plain BN model
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape[-1] == 7
    # without --sync-bn each rank normalises its own half of the batch, so the statistics drift apart
    p0, p1, _ = _spawn(tmp_path, "plain", [])
    assert any(not torch.equal(p0["stats"][k], p1["stats"][k]) for k in p0["stats"])


def test_set_mosaic_zero_gives_the_whole_image(tmp_path: Path) -> None:
    """After ``set_mosaic(0)`` (the close-mosaic epochs) a train item is the image itself with its own boxes."""
    from data.dataset import DetectionDataset
    from data.loader import build_loader, load_data_config

    data = load_data_config(make_dataset(tmp_path / "data", n=6))
    zero = {k: 0.0 for k in ("hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "fliplr",
                             "flipud")}
    ds = DetectionDataset(data, "train", 64, augment=True, hyp={**zero, "mosaic": 1.0})
    ref = DetectionDataset(data, "train", 64, augment=False)
    mixed = sum(not torch.equal(ds[i][0], ref[i][0]) for i in range(len(ds)))
    assert mixed >= len(ds) - 1  # mosaic: tiles of other images, boxes moved
    ds.set_mosaic(0.0)
    assert ds.hyp["mosaic"] == 0.0
    for i in range(len(ds)):
        img, lab, _, _ = ds[i]
        img0, lab0, _, _ = ref[i]
        assert torch.equal(img, img0)
        assert torch.allclose(lab, lab0, atol=1e-5)
    batch = next(iter(build_loader(ds, 3, shuffle=False)))
    assert batch[0].shape == (3, 3, 64, 64) and torch.equal(batch[0][0], ref[0][0].float() / 255)
    with pytest.raises(ValueError, match="does not augment"):
        ref.set_mosaic(0.0)


def test_hyp_file_close_mosaic_is_optional_and_checked(tmp_path: Path) -> None:
    from utils.hyp import load_hyp
    from utils.general import ConfigError

    base = yaml.safe_load((ROOT / "cfg" / "hyp" / "scratch.yaml").read_text())
    base.pop("close_mosaic", None)
    f = tmp_path / "hyp.yaml"
    f.write_text(yaml.safe_dump(base))
    assert load_hyp(f)["close_mosaic"] == 0  # optional: older hyp files keep working
    assert load_hyp(ROOT / "cfg" / "hyp" / "synthetic.yaml")["close_mosaic"] >= 1
    for bad in (-1, 2.5):
        f.write_text(yaml.safe_dump({**base, "close_mosaic": bad}))
        with pytest.raises(ConfigError, match="close_mosaic"):
            load_hyp(f)


@pytest.mark.parametrize("norm", ["bn", "gn:C/16"])
def test_validation_model_is_a_fused_copy_in_the_same_memory_format(norm: str) -> None:
    from engine.fit import validation_model
    from models.yolo import Model

    torch.manual_seed(0)
    model = Model(ROOT / "cfg/models/yolo-n-bn.yaml", nc=3, norm=norm)
    for m in model.modules():  # trained-looking running statistics, so that folding has something to fold
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    model.to(memory_format=torch.channels_last).train()
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    v = validation_model(model)
    assert model.training and sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == n_bn
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in v.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in v.modules()) == \
        sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    assert v.model[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    model.eval()
    with torch.no_grad():
        ref, out = model(x), v(x)
    assert (n_bn > 0) == (norm == "bn")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)  # boxes in pixels, scores 0..1


def test_validation_loads_in_process_from_a_ram_cache_on_cpu() -> None:
    from engine.fit import val_loader_workers

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert val_loader_workers(3, True, cpu) == 0  # cached: letterboxing only, a worker would compete with the model
    assert val_loader_workers(3, False, cpu) == 3  # decoding from disk: the workers overlap with the model
    assert val_loader_workers(3, True, cuda) == 3
