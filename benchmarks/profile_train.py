"""Where a training step's time goes: data wait, forward, loss, backward, optimizer step + EMA (ms per batch), then
torch.profiler's top operators by self CPU time (self device time on CUDA).

    python benchmarks/profile_train.py                     # coco128 (or the built-in data), n model, BN, 320 px, b16
    python benchmarks/profile_train.py --norm gn:C/16 --batches 24 --top 15
    python benchmarks/profile_train.py --device 0 --img 640 --batch-size 64      # CUDA: phases timed with syncs

The phases are timed with the same loader, model, loss, optimizer and EMA as training (``engine.throughput``'s
pieces); the first ``--warmup`` batches are not counted. docs/speed.md quotes its output before and after the
speed work.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PHASES = ("data", "forward", "loss", "backward", "step+ema")


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    from engine.throughput import add_bench_arguments

    p = add_bench_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--norm", default="bn")
    p.add_argument("--batches", type=int, default=16, help="timed batches (after --warmup)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--top", type=int, default=12, help="operator rows of the profiler table (0: skip the profiler)")
    p.add_argument("--by-shape", action="store_true", help="one profiler row per operator and input shapes")
    p.add_argument("--cache", action="store_true", help="decode the images into RAM first (train.py --cache)")
    p.add_argument("--device", default="cpu", help="cpu or a CUDA index (CUDA phases are timed with syncs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opt = parse_opt(argv)
    from data.loader import create_dataloader, load_data_config
    from engine.accel import compile_model, set_cpu_threads, train_channels_last
    from engine.amp import autocast_dtype
    from engine.config import default_workers
    from engine.ema import ModelEMA
    from utils.memory import retain_freed_memory
    from engine.throughput import channels_last_flag, default_data
    from engine.optim import build_optimizer
    from models.loss import ComputeLoss
    from models.norm_channels_last import set_group_norm_kernel
    from models.yolo import Model
    from utils.general import select_device, setup_logging
    from utils.hyp import load_hyp

    setup_logging(verbose=False)
    device = select_device(opt.device)
    if device.type == "cpu":
        set_cpu_threads()
        retain_freed_memory()  # as train.py does on CPU (utils/memory.py)
    data_cfg, hyp = load_data_config(opt.data or default_data()), load_hyp(opt.hyp)
    workers = default_workers(device.type) if opt.workers < 0 else opt.workers
    loader, _ = create_dataloader(data_cfg, "train", opt.img, opt.batch_size, augment=True, hyp=hyp,
                                  workers=workers, seed=0, shuffle=True, cache=opt.cache)
    torch.manual_seed(0)
    model = Model(opt.cfg, nc=int(data_cfg["nc"]), norm=opt.norm).to(device).train()
    if train_channels_last(device, channels_last_flag(opt.channels_last)):  # as train.py
        model.to(memory_format=torch.channels_last)
    if opt.compile:
        compile_model(model, device)
    set_group_norm_kernel(opt.gn_kernel)
    optim, ema = build_optimizer(model, "SGD", hyp["lr0"], hyp["momentum"], 5e-4), ModelEMA(model)
    compute_loss = ComputeLoss(model, hyp, opt.img)
    total, dtype = dict.fromkeys(PHASES, 0.0), autocast_dtype(opt.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    n, it = 0, iter(_forever(loader))
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda"
                                                     else [])
    prof = torch.profiler.profile(activities=acts, record_shapes=opt.by_shape) if opt.top else None

    for i in range(opt.warmup + opt.batches):
        if i == opt.warmup and prof is not None:
            prof.__enter__()
        t = _timed_step(it, model, compute_loss, optim, scaler, ema, device, dtype)
        if i >= opt.warmup:
            n += 1
            for k, a, b in zip(PHASES, t, t[1:]):
                total[k] += b - a
    if prof is not None:
        prof.__exit__(None, None, None)
    setting = (f"{Path(data_cfg['yaml_file']).name}, {opt.img} px, batch {opt.batch_size}, norm {opt.norm}, "
               f"{workers} workers, cache {opt.cache}, {device}, {torch.get_num_threads()} threads, amp {dtype}, "
               f"channels_last {opt.channels_last}, compile {opt.compile}, GN/LN/IN kernel {opt.gn_kernel}")
    _report(setting, total, n, opt.batch_size, prof, opt.top, device.type == "cuda", opt.by_shape)
    return 0


def _timed_step(batches: Any, model: Any, compute_loss: Any, optim: Any, scaler: Any, ema: Any, device: torch.device,
                dtype: torch.dtype | None) -> list[float]:
    """One training step on the next of ``batches`` as train_one_epoch runs it; the clock at the start and after each
    phase (data wait + transfer, forward, loss, backward, step + EMA)."""
    from engine.loop import batch_to_device
    from utils.timing import sync

    def stamp() -> float:
        sync(device)  # CUDA runs asynchronously: a phase ends when its kernels have finished
        return time.perf_counter()

    t = [stamp()]
    imgs, targets = next(batches)[:2]
    imgs, targets = batch_to_device(imgs, targets, device)
    t.append(stamp())
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        preds = model(imgs)
        t.append(stamp())
        loss, _ = compute_loss(preds, targets)
    t.append(stamp())
    scaler.scale(loss).backward()
    t.append(stamp())
    scaler.step(optim)
    scaler.update()
    optim.zero_grad(set_to_none=True)
    ema.update(model)
    t.append(stamp())
    return t


def _report(setting: str, total: dict[str, float], n: int, batch: int, prof: Any, top: int, cuda: bool,
            by_shape: bool = False) -> None:
    """Print the per-phase table (ms per batch, share) and the profiler's top operators."""
    step = sum(total.values())
    print(f"\nprofile: {setting}, {n} batches: {1000 * step / n:.0f} ms/batch, {n * batch / step:.1f} images/s")
    print("| phase | ms/batch | share |\n|---|---:|---:|")
    for k in PHASES:
        print(f"| {k} | {1000 * total[k] / n:.1f} | {100 * total[k] / step:.1f} % |")
    if prof is not None:
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        table = prof.key_averages(group_by_input_shape=by_shape)
        print(table.table(sort_by=key, row_limit=top, max_name_column_width=40, max_shapes_column_width=60))


def _forever(loader):
    while True:
        yield from loader


if __name__ == "__main__":
    sys.exit(main())
