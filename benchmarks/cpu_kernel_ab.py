"""The fused CPU training kernel on vs off, step by step: forward + loss + backward time of one model, alternating.

    python benchmarks/cpu_kernel_ab.py                        # BN, GN C/16, LN, IN; 20 pairs each
    python benchmarks/cpu_kernel_ab.py --norms bn --pairs 40

For each norm: one n model (channels-last, float32) and one real batch (the built-in data's first training batch,
320 px, batch 16); then ``--pairs`` pairs of training steps, one with models/norm_act_train.py's kernel and one with
torch's ops, the order inside a pair alternating. A step is forward, loss and backward (no optimizer step, so every
step sees the same weights). Pairs sit seconds apart, so a machine whose speed drifts over minutes (as the 2-core
machines here do, by 10-20 %) moves both sides of a pair alike; benchmarks/train_speed.py's whole-pass rounds cannot
resolve a few percent there. Prints the median step time of each side and the median and quartiles of the per-pair
time ratios (kernel / torch).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--norms", nargs="+", default=["bn", "gn:C/16", "ln", "in"])
    p.add_argument("--pairs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2, help="untimed pairs first")
    p.add_argument("--data", default=str(ROOT / "cfg" / "data" / "synthetic.yaml"))
    p.add_argument("--cfg", default=str(ROOT / "cfg" / "models" / "yolo-n-bn.yaml"))
    p.add_argument("--img", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=16)
    return p.parse_args(argv)


def ab(step, pairs: int, warmup: int) -> tuple[list[float], list[float]]:
    """Seconds per call of ``step()`` with the kernel on and with it off, over ``pairs`` pairs after ``warmup``
    untimed ones; the order inside a pair alternates (on-off, off-on, ...)."""
    from models.norm_act_train import set_train_kernel

    on, off = [], []
    try:
        for i in range(warmup + pairs):
            for kernel in ((True, False) if i % 2 == 0 else (False, True)):
                set_train_kernel(kernel)
                t = time.perf_counter()
                step()
                if i >= warmup:
                    (on if kernel else off).append(time.perf_counter() - t)
    finally:
        set_train_kernel(True)
    return on, off


def quartiles(x: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(x, n=4, method="inclusive") if len(x) > 1 else [x[0]] * 3
    return q[0], statistics.median(x), q[2]


def main(argv: list[str] | None = None) -> int:
    opt = parse_opt(argv)
    from data.loader import create_dataloader, load_data_config
    from engine.accel import set_cpu_threads
    from engine.loop import batch_to_device
    from models.loss import ComputeLoss
    from models.norm_act_train import load_train_kernel
    from models.yolo import Model
    from utils.general import setup_logging
    from utils.hyp import load_hyp
    from utils.memory import retain_freed_memory

    setup_logging(verbose=False)
    set_cpu_threads()
    retain_freed_memory()  # as train.py does on CPU
    if load_train_kernel() is None:
        print("error: the fused CPU training kernel is not available here (disabled or no compiler)", file=sys.stderr)
        return 2
    data_cfg, hyp = load_data_config(opt.data), load_hyp(ROOT / "cfg" / "hyp" / "synthetic.yaml")
    loader, _ = create_dataloader(data_cfg, "train", opt.img, opt.batch_size, augment=True, hyp=hyp, workers=0,
                                  seed=0, shuffle=True)
    batch = next(iter(loader))
    imgs, targets = batch_to_device(batch[0], batch[1], torch.device("cpu"))
    imgs = imgs.contiguous(memory_format=torch.channels_last)
    print(f"\nfused CPU training kernel vs torch's ops: {Path(opt.cfg).name}, {opt.img} px, batch {opt.batch_size}, "
          f"{torch.get_num_threads()} threads, {opt.pairs} pairs, torch {torch.__version__}")
    print("| norm | kernel ms/step | torch ms/step | time ratio per pair: median (quartiles) |\n|---|---:|---:|---|")
    for norm in opt.norms:
        torch.manual_seed(0)
        model = Model(opt.cfg, nc=int(data_cfg["nc"]), norm=norm).train().to(memory_format=torch.channels_last)
        compute_loss = ComputeLoss(model, hyp, opt.img)

        def step() -> None:
            loss, _ = compute_loss(model(imgs), targets)
            loss.backward()
            model.zero_grad(set_to_none=True)

        on, off = ab(step, opt.pairs, opt.warmup)
        lo, med, hi = quartiles([a / b for a, b in zip(on, off)])
        print(f"| {norm} | {1000 * statistics.median(on):.0f} | {1000 * statistics.median(off):.0f} | "
              f"{med:.3f} ({lo:.3f}-{hi:.3f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
