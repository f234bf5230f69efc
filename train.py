"""Train a NormYOLO detector.

    python train.py                                   # n model, built-in synthetic data, 320 px
    python train.py --data coco128.yaml --hyp scratch.yaml --cfg yolo-n-gn.yaml --epochs 100 --batch-size 16
    python train.py --resume                          # continue the latest run under runs/train
    torchrun --nproc_per_node 2 train.py --device cpu --sync-bn --batch-size 32

See docs/training.md for every option, the schedule, checkpoints, resume and DDP. The flags are defined in
``engine.config.add_train_arguments``; the training itself is ``engine.fit.fit``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from engine.config import TrainConfig, add_train_arguments
from utils.general import run_cli


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the Ultralytics-style command line (``argv=None`` reads ``sys.argv``)."""
    p = argparse.ArgumentParser(description="Train a NormYOLO detector",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    return add_train_arguments(p).parse_args(argv)


def main(opt: argparse.Namespace | TrainConfig) -> dict[str, Any]:
    """Train as configured by ``opt``; returns ``save_dir``, ``mAP50``, ``mAP50_95``, ``precision``, ``recall``,
    ``epochs``, ``train_images_per_s``, ``params``, ``wall_time_s`` (and ``best_epoch``)."""
    from engine.fit import fit

    return fit(opt if isinstance(opt, TrainConfig) else TrainConfig.from_namespace(opt))


def cli(argv: list[str] | None = None) -> int:
    """Command-line entry: ``error: ...`` and exit 2 for bad input, exit 1 when training diverged."""
    from engine.loop import TrainingDiverged

    return run_cli(main, parse_opt, argv, failures=(TrainingDiverged,))


if __name__ == "__main__":
    sys.exit(cli())
