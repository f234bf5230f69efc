"""Per-epoch validation cost: wall time of training's validation call on one checkpoint, round by round.

    python benchmarks/val_speed.py --weights runs/train/exp/weights/last.pt
    python benchmarks/val_speed.py --weights last.pt --rounds 3 --root ../old-checkout   # another checkout's code

Times what ``engine.fit.end_of_epoch`` runs after every epoch but the last: ``evaluate`` on the fused channels-last
copy of the model (``validation_model``), area range 'all' only, with the val split cached in RAM, as train.py does on
the built-in data. Prints each round's seconds, the detections scored and mAP50, then the median. ``--root`` imports
the library from another checkout (e.g. a git worktree of an older commit), so two codes can be timed alternately
on one machine with this one script.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True, help="a training checkpoint (.pt)")
    p.add_argument("--data", default=str(ROOT / "cfg/data/synthetic.yaml"), help="dataset YAML (its val split)")
    p.add_argument("--img", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=32, help="train.py validates at twice its batch of 16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--root", default=str(ROOT), help="checkout whose library is timed")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opt = parse_opt(argv)
    sys.path.insert(0, str(Path(opt.root).resolve()))
    import torch
    from data.loader import create_dataloader
    from engine.checkpoint import load_model
    from engine.evaluate import evaluate
    from engine.fit import validation_model
    from utils.memory import retain_freed_memory

    retain_freed_memory()  # as train.py on CPU
    loader, dataset = create_dataloader(opt.data, "val", opt.img, opt.batch_size, augment=False, cache="ram",
                                        shuffle=False)
    model = load_model(opt.weights, torch.device("cpu"), fuse=False).to(memory_format=torch.channels_last)
    times = []
    for r in range(opt.rounds):
        t0 = time.perf_counter()
        m = evaluate(validation_model(model), loader, dataset, log_summary=False, area_breakdown=False)
        times.append(time.perf_counter() - t0)
        print(f"round {r}: {times[-1]:.2f} s, {m['detections']} detections, mAP50 {m['mAP50']:.6f}", flush=True)
    print(f"median {statistics.median(times):.2f} s ({opt.root})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
