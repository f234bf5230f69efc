"""Train a NormYOLO detector.

    python train.py                                   # n model, built-in synthetic data, 320 px
    python train.py --data coco128.yaml --hyp scratch.yaml --cfg yolo-n-gn.yaml --epochs 100 --batch-size 16
    python train.py --resume                          # continue the latest run under runs/train
    torchrun --nproc_per_node 2 train.py --device cpu --sync-bn --batch-size 32

See docs/training.md for every option, the schedule, checkpoints, resume and DDP.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

from utils.general import ROOT, ConfigError, increment_path, run_cli, select_device, setup_logging
from utils.optim import NOMINAL_BATCH

DEFAULTS = {"data": ROOT / "cfg" / "data" / "synthetic.yaml", "cfg": ROOT / "cfg" / "models" / "yolo-n-bn.yaml",
            "hyp": ROOT / "cfg" / "hyp" / "synthetic.yaml"}


def default_workers() -> int:
    """Half the cores, 1 to 8. Loading is ~1/5 of a step's CPU time, so on 2 cores one worker keeps up, and a
    second one mostly preempts the intra-op threads (measured: 2 threads + 1 worker was the fastest layout)."""
    return min(8, max(1, (os.cpu_count() or 1) // 2))


def set_cpu_threads() -> None:
    """One intra-op thread per core this process owns, unless OMP_NUM_THREADS says otherwise (torchrun sets it
    to 1 for several processes; raise it so that processes x threads = cores)."""
    if "OMP_NUM_THREADS" not in os.environ:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the Ultralytics-style command line (``argv=None`` reads ``sys.argv``)."""
    p = argparse.ArgumentParser(description="Train a NormYOLO detector",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=str(DEFAULTS["data"]), help="dataset YAML")
    p.add_argument("--cfg", default=str(DEFAULTS["cfg"]), help="model YAML")
    p.add_argument("--norm", default="", help="norm spec overriding the model YAML's, e.g. bn, gn:C/16, gn:32, ln, in")
    p.add_argument("--hyp", default=str(DEFAULTS["hyp"]), help="hyper-parameter YAML (keys of cfg/hyp/scratch.yaml)")
    p.add_argument("--weights", default="", help="initial weights (a NormYOLO .pt); matching tensors are transferred")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=16, help="total batch over all DDP processes")
    p.add_argument("--nbs", type=int, default=NOMINAL_BATCH,
                   help="nominal batch: gradients are accumulated up to this many images per optimizer step")
    p.add_argument("--img", "--img-size", "--imgsz", dest="img", type=int, default=320, help="train / val size (px)")
    p.add_argument("--device", default="", help="cpu, 0 or 0,1 (default: GPU 0 when present, else cpu)")
    p.add_argument("--workers", type=int, default=default_workers(), help="dataloader workers per process")
    p.add_argument("--project", default="runs/train", help="runs go to project/name")
    p.add_argument("--name", default="exp")
    p.add_argument("--exist-ok", action="store_true", help="reuse project/name instead of making exp2, exp3, ...")
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="continue the latest run under --project, or the given last.pt / run folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true", help="ask torch for deterministic kernels (slower)")
    p.add_argument("--patience", type=int, default=100, help="stop after this many epochs without improvement (0: off)")
    p.add_argument("--cos-lr", action="store_true", help="cosine LR decay instead of linear")
    p.add_argument("--optimizer", default=None, choices=["SGD", "AdamW"],
                   help="default: the hyp file's 'optimizer' key, else SGD")
    p.add_argument("--sync-bn", action="store_true", help="DDP: convert BatchNorm to SyncBatchNorm")
    p.add_argument("--cache", nargs="?", const="ram", default=None, choices=["ram", "disk"], help="cache images")
    p.add_argument("--noval", action="store_true", help="validate only after the final epoch")
    p.add_argument("--save-period", type=int, default=-1, help="also save weights/epochN.pt every N epochs")
    p.add_argument("--close-mosaic", type=int, default=None,
                   help="train the final N epochs without mosaic (default: the hyp file's close_mosaic, else 0)")
    p.add_argument("--noautoanchor", action="store_true", help="keep the model's anchors as they are")
    p.add_argument("--nonfinite-limit", type=int, default=10, help="stop after this many non-finite losses in a row")
    return p.parse_args(argv)


def latest_checkpoint(project: str | Path) -> Path:
    """The most recently written ``*/weights/last.pt`` under ``project``."""
    found = sorted(Path(project).glob("*/weights/last.pt"), key=lambda f: f.stat().st_mtime)
    if not found:
        raise ConfigError(f"--resume: no run with weights/last.pt under '{project}'")
    return found[-1]


def resolve_resume(opt: argparse.Namespace) -> argparse.Namespace:
    """Replace ``opt`` by the options saved in the checkpoint being resumed (the run's exact configuration)."""
    from utils.checkpoint import load_checkpoint

    last = latest_checkpoint(opt.project) if opt.resume is True else Path(opt.resume)
    if last.is_dir():
        last = last / "weights" / "last.pt"
    saved = load_checkpoint(last).get("opt") or {}
    merged = {**vars(parse_opt([])), **saved}
    merged.update(resume=str(last), save_dir=str(last.resolve().parent.parent))
    return argparse.Namespace(**merged)


def check_opt(opt: argparse.Namespace) -> None:
    """Reject impossible values with a one-line ConfigError naming the flag."""
    if opt.epochs < 1:
        raise ConfigError(f"--epochs {opt.epochs}: expected a positive number of epochs")
    if opt.batch_size < 1:
        raise ConfigError(f"--batch-size {opt.batch_size}: expected a positive batch size")
    if opt.img < 32 or opt.img % 32:
        raise ConfigError(f"--img {opt.img}: expected a multiple of 32 (the largest stride), e.g. 320 or 640")
    if opt.nbs < 1:
        raise ConfigError(f"--nbs {opt.nbs}: expected a positive nominal batch (64 by default)")
    if opt.workers < 0:
        raise ConfigError(f"--workers {opt.workers}: expected 0 or more")
    if opt.close_mosaic is not None and opt.close_mosaic < 0:
        raise ConfigError(f"--close-mosaic {opt.close_mosaic}: expected 0 or more epochs")
    for flag, folder in (() if opt.resume else (("cfg", "models"), ("hyp", "hyp"))):  # resume: from the ckpt
        p = Path(getattr(opt, flag))
        if not p.is_file() and not p.is_absolute() and (ROOT / "cfg" / folder / p).is_file():
            setattr(opt, flag, str(ROOT / "cfg" / folder / p))  # bare names: yolo-n-gn.yaml, scratch.yaml
        elif not p.is_file():
            raise ConfigError(f"--{flag} {p}: file not found (a path, or a file name from cfg/{folder}/)")
    if opt.weights and not opt.resume and not Path(opt.weights).is_file():
        raise ConfigError(f"--weights {opt.weights}: file not found")


def main(opt: argparse.Namespace) -> dict[str, Any]:
    """Train as configured by ``opt``; returns ``save_dir``, ``mAP50``, ``mAP50_95``, ``precision``, ``recall``,
    ``epochs``, ``train_images_per_s``, ``params``, ``wall_time_s`` (and ``best_epoch``)."""
    from utils import dist as du
    from utils.engine import fit

    env = du.dist_env()
    setup_logging(rank=env.rank)
    if opt.resume:
        opt = resolve_resume(opt)
    check_opt(opt)
    device = select_device(opt.device)
    if device.type == "cpu":
        set_cpu_threads()
    if env.world_size > 1:
        du.init_distributed(device)
    if not opt.resume:
        save_dir = str(increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok)) if env.is_main else None
        opt.save_dir = du.broadcast_object(save_dir)  # every rank must agree on one folder
    return fit(opt)


def cli(argv: list[str] | None = None) -> int:
    """Command-line entry: ``error: ...`` and exit 2 for bad input, exit 1 when training diverged."""
    from utils.engine import TrainingDiverged

    try:
        return run_cli(main, parse_opt, argv)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli())
