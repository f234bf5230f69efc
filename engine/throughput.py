"""Training throughput (images/s) of the real training step for one norm: ``train_one_epoch`` with data loading,
AMP on CUDA, nominal-batch accumulation and EMA, as train.py runs it (benchmarks/train_speed.py prints it)."""
from __future__ import annotations

import argparse
import time
from typing import Any, Iterator

import torch

from data.loader import create_dataloader
from engine.accel import compile_model, train_channels_last
from engine.amp import autocast_dtype
from engine.ema import ModelEMA
from engine.loop import train_one_epoch
from engine.optim import Schedule, build_optimizer, scaled_weight_decay
from models.loss import ComputeLoss
from models.yolo import Model
from utils.general import ROOT
from utils.timing import sync


def default_data() -> str:
    """The benchmarks' dataset: coco128 when ../shared/coco128 exists beside the repository, else the built-in data."""
    coco128 = ROOT.parent / "shared" / "coco128" / "images" / "train2017"
    return str(ROOT / "cfg" / "data" / ("coco128.yaml" if coco128.is_dir() else "synthetic.yaml"))


def add_bench_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags benchmarks/train_speed.py and profile_train.py share: data, model, size, batch, workers, amp, hyp,
    memory format, compile, GroupNorm kernel."""
    p.add_argument("--data", default="", help="dataset YAML (default: coco128 when present, else synthetic)")
    p.add_argument("--cfg", default=str(ROOT / "cfg" / "models" / "yolo-n-bn.yaml"))
    p.add_argument("--img", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=-1, help="default: as train.py (engine.config.default_workers)")
    p.add_argument("--amp", default="auto", choices=["auto", "on", "off"], help="as train.py's --amp")
    p.add_argument("--hyp", default=str(ROOT / "cfg" / "hyp" / "scratch.yaml"))
    p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                   help="the weights' memory format (auto: as train.py, engine/accel.py)")
    p.add_argument("--compile", action="store_true", help="as train.py's --compile")
    p.add_argument("--gn-kernel", default="torch", choices=["torch", "channels-last"],
                   help="GN / LN / IN on channels-last input: torch's op (as train.py) or the layout-keeping one of "
                        "models/norm_channels_last.py")
    return p


def channels_last_flag(value: str) -> bool | None:
    """``--channels-last`` of add_bench_arguments as train_throughput's ``channels_last``: None for auto."""
    return {"auto": None, "on": True, "off": False}[value]


class Capped:
    """The first ``n`` batches of a loader (len() included), so long splits can be sampled."""

    def __init__(self, loader: Any, n: int) -> None:
        self.loader, self.n, self.sampler = loader, n, getattr(loader, "sampler", None)

    def __len__(self) -> int:
        return min(self.n, len(self.loader))

    def __iter__(self) -> Iterator[Any]:
        for i, b in enumerate(self.loader):
            if i >= self.n:
                break
            yield b


class Repeated:
    """The loader's first batch, ``n`` times: the training step alone, without decoding or augmentation."""

    def __init__(self, loader: Any, n: int) -> None:
        self.batch, self.n, self.sampler = next(iter(loader)), n, None

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Any]:
        return (self.batch for _ in range(self.n))


def train_throughput(norm: str, cfg: str, data_cfg: dict[str, Any], hyp: dict[str, Any], device: torch.device, *,
                     img: int, batch_size: int, epochs: int, workers: int, max_batches: int = 0,
                     amp: str = "auto", channels_last: bool | None = None, compile: bool = False,
                     fixed_batch: bool = False) -> dict[str, Any]:
    """Images/s over ``epochs`` timed passes (after one untimed warm-up pass) of the model ``cfg`` with ``norm``.

    ``amp``: train.py's ``--amp`` mode; ``channels_last``: None as train.py, else forced; ``compile``: train.py's
    ``--compile``; ``fixed_batch``: every pass is the first loaded batch ``max_batches`` times (default 20), which
    times the step without the loader. Returns ``{'norm', 'images', 'seconds', 'images_per_s', 'warmup_s',
    'params', 'amp'}``.
    """
    torch.manual_seed(0)
    loader, _ = create_dataloader(data_cfg, "train", img, batch_size, augment=True, hyp=hyp, workers=workers, seed=0,
                                  shuffle=True)
    if fixed_batch:
        loader = Repeated(loader, max_batches or 20)
    elif max_batches:
        loader = Capped(loader, max_batches)
    model = Model(cfg, nc=int(data_cfg["nc"]), norm=norm).to(device)
    if train_channels_last(device, channels_last):
        model = model.to(memory_format=torch.channels_last)
    optim = build_optimizer(model, "SGD", hyp["lr0"], hyp["momentum"],
                            scaled_weight_decay(hyp["weight_decay"], batch_size))
    passes = epochs + 1
    schedule = Schedule(hyp, passes, len(loader), batch_size)
    ema, dtype = ModelEMA(model), autocast_dtype(amp, device)  # as train.py's --amp
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if compile:
        compile_model(model, device)
    loss = ComputeLoss(model, hyp, img)
    images, secs, warmup = 0, 0.0, 0.0
    for epoch in range(passes):
        t0 = time.perf_counter()
        res = train_one_epoch(model, loader, loss, optim, schedule, ema, scaler, device, epoch, passes,
                              img_size=img, amp=dtype is not None, amp_dtype=dtype, main=True)
        sync(device)
        if epoch > 0:  # the first pass warms up workers, allocator, oneDNN / cuDNN kernels and compiles
            images += res["images"]
            secs += time.perf_counter() - t0
        else:
            warmup = time.perf_counter() - t0
    return {"norm": norm, "images": images, "seconds": secs, "images_per_s": images / secs, "warmup_s": warmup,
            "params": sum(p.numel() for p in model.parameters()),
            "amp": str(dtype).replace("torch.", "") if dtype else "off"}
