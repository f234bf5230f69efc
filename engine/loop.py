"""One pass over the training data: ``train_one_epoch`` (nominal-batch accumulation, non-finite skips, DDP)."""
from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from engine.ema import ModelEMA
from engine.optim import Schedule
from engine.results import BAR_FORMAT, bar_description, bar_header
from models.loss import ComputeLoss
from utils import dist as du
from utils.general import LOGGER
from utils.plots import plot_batch, targets_per_image

GRAD_CLIP = 10.0  # max gradient norm (as YOLOv5); also the place where non-finite gradients are caught


class TrainingDiverged(RuntimeError):
    """Raised after too many consecutive non-finite steps, or when the weights themselves became non-finite."""


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   ema: ModelEMA | None, *, reduce: bool = False) -> int:
    """Apply the accumulated gradients: clip to GRAD_CLIP, step (unless non-finite), update the EMA, zero them.
    ``reduce``: average the gradients over the ranks first (they came from ``no_sync()`` passes only).
    Returns 1 when the optimizer stepped, else 0."""
    if reduce:
        du.average_gradients(model)
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=GRAD_CLIP)
    finite = bool(torch.isfinite(norm))  # identical on every rank (gradients were all-reduced)
    stepped = 0
    if finite or scaler.is_enabled():  # a float16 scaler skips the step itself and lowers its scale
        scaler.step(optimizer)
        stepped = 1
    if finite and ema is not None:
        ema.update(model)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return stepped


def _skip_nonfinite(epoch: int, i: int, items: torch.Tensor, in_a_row: int, limit: int) -> None:
    """Log a skipped batch; raise TrainingDiverged at ``limit`` in a row."""
    LOGGER.warning(f"epoch {epoch} batch {i}: non-finite loss {items.tolist()}, step skipped ({in_a_row} in a row)")
    if in_a_row >= limit:
        raise TrainingDiverged(f"{in_a_row} non-finite losses in a row at epoch {epoch}: training diverged "
                               f"(lower lr0 in --hyp, or check the labels); last.pt keeps the last good epoch")


def _epoch_bar(loader: Any, epoch: int, main: bool) -> tqdm:
    """The epoch's progress bar over ``loader`` (the header line first); reshuffles a distributed sampler."""
    if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)  # a different shuffle per epoch, identical on every rank
    if main:
        LOGGER.info(bar_header())
    return tqdm(loader, total=len(loader), bar_format=BAR_FORMAT, disable=not main)


def batch_to_device(imgs: torch.Tensor, targets: torch.Tensor,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, H, W) images as float 0..1 and (M, 6) targets on ``device``."""
    imgs = imgs.to(device, non_blocking=True)
    if imgs.dtype == torch.uint8:  # a loader may hand over bytes to save copies; scale here
        imgs = imgs.float().div_(255)
    return imgs, targets.to(device)


def _backward(model: nn.Module, loss: torch.Tensor, scaler: torch.amp.GradScaler, world_size: int,
              sync: bool) -> None:
    """Accumulate the gradients of ``loss``; ``sync=False`` skips DDP's gradient all-reduce (batches that only
    accumulate: every rank makes the same choice)."""
    loss = loss * world_size  # DDP averages gradients over ranks: the update then matches one process's total batch
    with nullcontext() if sync else model.no_sync():
        scaler.scale(loss).backward()


def _memory_gb(device: torch.device) -> float:
    return torch.cuda.memory_reserved(device) / 1e9 if device.type == "cuda" else 0.0


def train_one_epoch(model: nn.Module, loader: Any, compute_loss: ComputeLoss, optimizer: torch.optim.Optimizer,
                    schedule: Schedule, ema: ModelEMA | None, scaler: torch.amp.GradScaler, device: torch.device,
                    epoch: int, epochs: int, *, img_size: int, amp: bool, main: bool, world_size: int = 1,
                    amp_dtype: torch.dtype | None = None, nonfinite_limit: int = 10,
                    accum: dict[str, int] | None = None, flush: bool = True, plot_path: Path | None = None,
                    names: list[str] | None = None) -> dict[str, Any]:
    """Train ``model`` for one pass over ``loader``.

    Gradients are accumulated over ``schedule.accumulate`` batches (nominal batch 64), counted across epochs as in
    YOLOv5: pass the same ``accum`` dict (``last_step``: global iteration of the last optimizer step, ``pending``:
    batches accumulated since) to every epoch; gradients left at an epoch's end carry into the next one.
    ``flush=True`` (the final epoch) steps on whatever is pending at the end. A batch whose loss is non-finite on any
    rank is skipped everywhere; ``nonfinite_limit`` in a row raise :class:`TrainingDiverged`. ``plot_path``: save
    the first batch with its labels there. ``amp``: autocast in ``amp_dtype`` (None: the device's, see engine.amp).

    Returns ``{'loss': [box, obj, cls] means, 'images', 'time_s', 'nonfinite', 'lr': [per group], 'steps'}``.
    """
    model.train()
    nb = len(loader)
    bar = _epoch_bar(loader, epoch, main)
    mloss = torch.zeros(3, device=device)
    n_ok = n_images = nonfinite = in_a_row = 0
    accum = accum if accum is not None else {"last_step": -1, "pending": 0}
    last_step, pending, steps = int(accum["last_step"]), int(accum["pending"]), 0
    if not pending:  # otherwise the gradients of the previous epoch's last batches are still to be applied
        optimizer.zero_grad(set_to_none=True)
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    t0 = time.perf_counter()
    for i, (imgs, targets, _paths, _metas) in enumerate(bar):
        ni = i + nb * epoch
        schedule.step(optimizer, epoch, ni)
        imgs, targets = batch_to_device(imgs, targets, device)
        if plot_path is not None and i == 0:
            plot_batch(imgs, targets_per_image(targets, len(imgs), imgs.shape[2], imgs.shape[3]),
                       names or [], plot_path, _paths)
        step_now = ni - last_step >= schedule.accumulate or (flush and i == nb - 1)
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp):
            preds = model(imgs)
            loss, items = compute_loss(preds, targets)
        bad = du.all_reduce_flag(not bool(torch.isfinite(loss).all()), device)
        if bad:
            nonfinite, in_a_row = nonfinite + 1, in_a_row + 1
            _skip_nonfinite(epoch, i, items, in_a_row, nonfinite_limit)
        else:
            in_a_row = 0
            _backward(model, loss, scaler, world_size, sync=not (ddp and not step_now))
            mloss = (mloss * n_ok + items) / (n_ok + 1)
            n_ok, pending = n_ok + 1, pending + 1
        n_images += imgs.shape[0]
        if step_now:
            if pending:  # nothing to apply when every batch since the last step was skipped
                steps += optimizer_step(model, optimizer, scaler, ema, reduce=ddp and bad)
            last_step, pending = ni, 0
        if main:
            bar.set_description(bar_description(epoch, epochs, _memory_gb(device), mloss.tolist(),
                                                int(targets.shape[0]), int(imgs.shape[-1])))
    bar.close()
    accum.update(last_step=last_step, pending=pending)
    return {"loss": mloss.tolist(), "images": n_images * world_size, "time_s": time.perf_counter() - t0,
            "nonfinite": nonfinite, "lr": [float(g["lr"]) for g in optimizer.param_groups], "steps": steps}
