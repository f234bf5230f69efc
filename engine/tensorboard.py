"""TensorBoard event files for a training run: losses, metrics and learning rates per epoch (the results.csv
columns) and the first validation batch with its predictions. Written into the run folder, so
``tensorboard --logdir runs/train`` (or ``runs/compare/NAME``: every study cell is a run folder there) overlays runs.

``tensorboard`` is optional (requirements-export.txt): without it training logs one line and writes no events.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable

import torch

from utils.general import LOGGER
from utils.plots import batch_mosaic

SHOW_CONF = 0.25  # the first batch shows predictions above this confidence, as val_batch0_pred.jpg


def tensorboard_available() -> bool:
    """Whether the tensorboard package (needed by torch.utils.tensorboard) is installed."""
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardLog:
    """A SummaryWriter on ``save_dir`` whose steps are epochs; flushed after every epoch (a killed run keeps its
    curves), so a resumed run continues the same curves."""

    def __init__(self, save_dir: str | Path, names: list[str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(save_dir))
        self.names = [str(n) for n in names]

    def add_row(self, row: dict[str, Any]) -> None:
        """One results.csv row: every numeric column except 'epoch', at step ``row['epoch']``."""
        epoch = int(float(row["epoch"]))
        for key, value in row.items():
            if key != "epoch" and value not in ("", None):
                self.writer.add_scalar(key, float(value), epoch)
        self.writer.flush()

    def batch0_hook(self, epoch: int) -> Callable[[torch.Tensor, list[torch.Tensor], list[str]], None]:
        """An ``engine.evaluate`` ``on_batch0`` callback that logs the batch with its predictions at ``epoch``."""
        def hook(imgs: torch.Tensor, dets: list[torch.Tensor], paths: list[str]) -> None:
            shown = [d[d[:, 4] >= SHOW_CONF].cpu() for d in dets]
            mosaic = batch_mosaic(imgs, shown, self.names, paths)
            self.writer.add_image("val/batch0_pred", mosaic[:, :, ::-1].copy(), epoch, dataformats="HWC")
        return hook

    def close(self) -> None:
        self.writer.close()


def open_tensorboard(save_dir: str | Path, names: list[str], enabled: bool = True) -> TensorBoardLog | None:
    """The run's TensorBoardLog, or None when turned off (--no-tensorboard) or tensorboard is not installed."""
    if not enabled:
        return None
    if not tensorboard_available():
        LOGGER.info("TensorBoard: not installed, no event files (pip install -r requirements-export.txt)")
        return None
    LOGGER.info(f"TensorBoard: tensorboard --logdir {Path(save_dir).parent}")
    return TensorBoardLog(save_dir, names)
