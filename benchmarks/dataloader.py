"""Training-pipeline throughput (mosaic on): images/s by dataset, image size, workers and RAM cache.

    python benchmarks/dataloader.py [--data synthetic.yaml coco128.yaml] [--img 320 640] [--workers 0 2]
                                    [--images 512] [--batch 16]

Each row builds a fresh train loader (augment=True, cfg/hyp/scratch.yaml, so mosaic p=1), skips the first batch
(worker start-up, cache fill) and times the next ``--images`` images, cycling epochs when the split is small.
The built-in dataset is generated on first use. Run it on a quiet machine: the figures scale with free cores.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(cfg: dict, img: int, workers: int, cache: bool, n_images: int, batch: int) -> float:
    """Images per second of the train loader after its first batch."""
    from data.loader import create_dataloader

    loader, _ = create_dataloader(cfg, "train", img, batch, augment=True, workers=workers, cache=cache, seed=0)
    it, seen, t0 = iter(loader), 0, None
    while seen < n_images:
        try:
            imgs = next(it)[0]
        except StopIteration:
            it = iter(loader)
            continue
        if t0 is None:  # exclude worker start-up from the timing
            t0 = time.perf_counter()
            continue
        seen += len(imgs)
    dt = time.perf_counter() - t0
    del it, loader
    return seen / dt


def main(argv: list[str] | None = None) -> int:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from data.loader import load_data_config
    from utils.general import ConfigError, setup_logging

    ap = argparse.ArgumentParser(description="DataLoader throughput (train pipeline, mosaic on)")
    ap.add_argument("--data", nargs="+", default=["synthetic.yaml", "coco128.yaml"])
    ap.add_argument("--img", nargs="+", type=int, default=[320, 640])
    ap.add_argument("--workers", nargs="+", type=int, default=[0, 2])
    ap.add_argument("--images", type=int, default=512, help="images timed per row")
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args(argv)
    setup_logging(verbose=False)
    rows = []
    print(f"{'dataset':<16}{'img':>6}{'workers':>9}{'cache':>7}{'images/s':>11}")
    try:
        for data in a.data:
            cfg = load_data_config(data)
            for img in a.img:
                for w in a.workers:
                    for cache in (False, True):
                        ips = measure(cfg, img, w, cache, a.images, a.batch)
                        rows.append((Path(data).stem, img, w, cache, ips))
                        print(f"{Path(data).stem:<16}{img:>6}{w:>9}{('ram' if cache else 'no'):>7}{ips:>11.1f}",
                              flush=True)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
