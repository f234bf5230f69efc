"""What the training pipeline shows the model: padding fraction, boxes per sample, boxes dropped per sample.

    python benchmarks/augment_stats.py [--data coco128.yaml synthetic.yaml] [--img 320] [--n 1000]
                                       [--hyp cfg/hyp/scratch.yaml] [--seed 0]

For each dataset YAML, ``--n`` training samples (the train split, augment on, the hyp's mosaic probability) are
drawn exactly as the loader draws them. Padding is measured through a mask that rides through the same geometry as
the image (1 = a pixel of some image, 0 = fill), so colour jitter cannot disturb it. "dropped" counts the boxes of
the sample's tiles that did not come out: cut off by the crop or removed by the box filter (>= 2 px, >= 10 % of
the area, aspect <= 100). Deterministic for a given seed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def stats(data: str, img: int, n: int, hyp: str | None, seed: int) -> dict[str, float]:
    """Means over ``n`` samples: padding fraction, boxes out, boxes in, boxes dropped; also the share of mosaics."""
    from data.augment import build_train_transform
    from data.dataset import DetectionDataset
    from data.loader import load_data_config

    ds = DetectionDataset(load_data_config(data), "train", img, augment=True, hyp=hyp, seed=seed)
    ds.transform = build_train_transform(img, ds.hyp, with_mask=True)
    ds.reseed(seed)
    pad, out, inp = [], [], []
    for k in range(n):
        s = ds.train_sample(k % len(ds))
        if s is None:
            continue
        pad.append(1.0 - float(s["mask"].mean()))
        out.append(len(s["bboxes"]))
        inp.append(s["boxes_in"])
    o, i = np.array(out, float), np.array(inp, float)
    return {"samples": len(pad), "padding": float(np.mean(pad)), "boxes": float(o.mean()),
            "boxes_in": float(i.mean()), "dropped": float((i - o).mean())}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", nargs="+", default=["coco128.yaml", "synthetic.yaml"])
    ap.add_argument("--img", type=int, default=320)
    ap.add_argument("--n", type=int, default=1000, help="samples per dataset")
    ap.add_argument("--hyp", default=None, help="hyp YAML (default cfg/hyp/scratch.yaml)")
    ap.add_argument("--seed", type=int, default=0)
    opt = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    print(f"{'data':<18} {'img':>4} {'samples':>7} {'padding %':>9} {'boxes/sample':>12} {'tile boxes':>10} "
          f"{'dropped':>8}")
    for d in opt.data:
        r = stats(d, opt.img, opt.n, opt.hyp, opt.seed)
        print(f"{Path(d).name:<18} {opt.img:>4} {r['samples']:>7} {100 * r['padding']:>9.1f} {r['boxes']:>12.2f} "
              f"{r['boxes_in']:>10.2f} {r['dropped']:>8.2f}")


if __name__ == "__main__":
    main()
