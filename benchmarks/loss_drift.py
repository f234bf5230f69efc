"""Loss drift: how far a change moves the training trajectory, against float32's own summation-order noise.

    python benchmarks/loss_drift.py                          # BN, 60 steps
    python benchmarks/loss_drift.py --norm gn:C/16 --steps 100

Trains the n model from the same initial weights on the same sequence of real batches (the built-in data with the
default run's hyp and optimizer at a constant ``--lr`` without warm-up, gradients clipped to engine.loop's GRAD_CLIP
as in training, 320 px, batch 16, loaded once, one optimizer step per batch) three times on CPU:
torch's ops on 2 threads (the reference), the fused CPU training kernel on 2 threads (models/norm_act_train.py, as
train.py runs), and torch's ops on 1 thread, which changes only how float sums are split. Prints the loss of each
run at a few steps, the relative differences to the reference and their root mean square over all steps. Training
is chaotic, so any float change grows; a change whose drift is no larger than the 1-thread run's is float noise in
training terms. docs/speed.md quotes its output.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = (("torch ops, 2 threads", False, 2), ("fused kernel, 2 threads", True, 2), ("torch ops, 1 thread", False, 1))


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "cfg" / "data" / "synthetic.yaml"))
    p.add_argument("--hyp", default=str(ROOT / "cfg" / "hyp" / "synthetic.yaml"))
    p.add_argument("--cfg", default=str(ROOT / "cfg" / "models" / "yolo-n-bn.yaml"))
    p.add_argument("--norm", default="bn")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=0.001, help="constant learning rate (no warm-up here: keep it low)")
    p.add_argument("--img", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=16)
    return p.parse_args(argv)


def trajectory(opt: argparse.Namespace, batches: list, hyp: dict, nc: int, kernel: bool, threads: int) -> list[float]:
    """Losses of ``len(batches)`` training steps from seed-0 weights, with the kernel on / off and ``threads``."""
    from engine.loop import GRAD_CLIP
    from engine.optim import build_optimizer
    from models.loss import ComputeLoss
    from models.norm_act_train import set_train_kernel
    from models.yolo import Model

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    set_train_kernel(kernel)
    try:
        torch.manual_seed(0)
        model = Model(opt.cfg, nc=nc, norm=opt.norm).train().to(memory_format=torch.channels_last)
        name = str(hyp.get("optimizer", "SGD"))
        optimizer = build_optimizer(model, name, opt.lr, hyp["momentum"], hyp["weight_decay"])
        compute_loss, losses = ComputeLoss(model, hyp, opt.img), []
        for imgs, targets in batches:
            loss, _ = compute_loss(model(imgs.contiguous(memory_format=torch.channels_last)), targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=GRAD_CLIP)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        return losses
    finally:
        torch.set_num_threads(before)
        set_train_kernel(True)


def main(argv: list[str] | None = None) -> int:
    opt = parse_opt(argv)
    from data.loader import create_dataloader, load_data_config
    from engine.loop import batch_to_device
    from utils.general import setup_logging
    from utils.hyp import load_hyp
    from utils.memory import retain_freed_memory

    setup_logging(verbose=False)
    retain_freed_memory()
    data_cfg, hyp = load_data_config(opt.data), load_hyp(opt.hyp)
    loader, _ = create_dataloader(data_cfg, "train", opt.img, opt.batch_size, augment=True, hyp=hyp, workers=0,
                                  seed=0, shuffle=True)
    batches, cpu = [], torch.device("cpu")
    for batch in loader:
        batches.append(batch_to_device(batch[0], batch[1], cpu))
        if len(batches) == opt.steps:
            break
    runs = {name: trajectory(opt, batches, hyp, int(data_cfg["nc"]), k, t) for name, k, t in VARIANTS}
    ref_name = VARIANTS[0][0]
    ref = runs[ref_name]
    print(f"\nloss drift: {Path(opt.cfg).name} --norm {opt.norm}, {len(ref)} steps of batch {opt.batch_size} at "
          f"{opt.img} px, {hyp.get('optimizer', 'SGD')} lr {opt.lr}, torch {torch.__version__}")
    shown = sorted(i for i in {0, 1, 2, 5, len(ref) - 1} | set(range(10, len(ref), 10)) if i < len(ref))
    print("| run | " + " | ".join(f"step {i}" for i in shown) + " | RMS relative difference |")
    print("|---|" + "---:|" * (len(shown) + 1))
    for name, losses in runs.items():
        rel = [(a - b) / b for a, b in zip(losses, ref)]
        rms = math.sqrt(sum(r * r for r in rel) / len(rel))
        cells = " | ".join(f"{losses[i]:.4f}" if name == ref_name else f"{rel[i]:+.1e}" for i in shown)
        print(f"| {name} | {cells} | {'(reference)' if name == ref_name else f'{rms:.2e}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
