"""Summarise a ``peer_coco128.sh`` output folder as Markdown: final and best mAP per run, both evaluators, curves.

    python benchmarks/peer_summary.py --out runs/peer_coco128 [--every 10]

Reads ``normyolo*/results.csv`` (this project's per-epoch pycocotools numbers), ``yolov5_s*/results.csv`` (YOLOv5's
own ``ap_per_class`` per epoch), and the pycocotools scores of the final weights that the shell script saved
(``*_pycocotools.json``). Prints two tables: the summary (with the mean over seeds of each program) and the
mAP50 / mAP50-95 curve every ``--every`` epochs. Nothing is trained or evaluated here.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

# column names in each program's results.csv (YOLOv5 pads its header with spaces)
COLUMNS = {"normyolo": ("metrics/mAP50", "metrics/mAP50-95"), "yolov5": ("metrics/mAP_0.5", "metrics/mAP_0.5:0.95")}


def read_curve(csv_path: Path, program: str) -> list[tuple[float, float]]:
    """Per-epoch (mAP50, mAP50-95) from one results.csv; epochs without validation are skipped."""
    c50, c5095 = COLUMNS[program]
    rows = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            if row.get(c50, "") != "":
                rows.append((float(row[c50]), float(row[c5095])))
    return rows


def collect(out: Path) -> list[dict]:
    """One dict per run folder: name, program, curve and the saved pycocotools scores of its final weights."""
    runs = []
    for d in sorted(p for p in out.iterdir() if (p / "results.csv").is_file()):
        program = "yolov5" if d.name.startswith("yolov5") else "normyolo"
        scores = {}
        for f in sorted(out.glob(f"{d.name}_*pycocotools.json")):
            s = json.loads(f.read_text(encoding="utf-8"))
            scores[f.stem[len(d.name) + 1:].replace("_pycocotools", "")] = (s["mAP50"], s["mAP50_95"])
        runs.append({"name": d.name, "program": program, "curve": read_curve(d / "results.csv", program),
                     "scores": scores})
    return runs


def summary_table(runs: list[dict]) -> list[str]:
    lines = ["| run | epochs | final mAP50 | final mAP50-95 | best epoch (by mAP50-95) | pycocotools on the final "
             "weights (official JSON): mAP50 / mAP50-95 |", "|---|---|---|---|---|---|"]
    groups: dict[str, list[tuple[float, float, int]]] = {}
    for r in runs:
        if not r["curve"]:
            continue
        f50, f5095 = r["curve"][-1]
        best = max(range(len(r["curve"])), key=lambda i: r["curve"][i][1])
        sc = "; ".join(f"{k}: {v[0]:.4f} / {v[1]:.4f}" for k, v in r["scores"].items())
        lines.append(f"| {r['name']} | {len(r['curve'])} | {f50:.4f} | {f5095:.4f} | {best}: "
                     f"{r['curve'][best][0]:.4f} / {r['curve'][best][1]:.4f} | {sc} |")
        key = r["name"].rsplit("_s", 1)[0]  # normyolo_s0, normyolo_s1 -> normyolo
        groups.setdefault(key, []).append((f50, f5095, len(r["curve"])))
    for key, vals in groups.items():
        if len(vals) > 1 and len({v[2] for v in vals}) == 1:  # a mean only over runs of the same length
            lines.append(f"| **{key}, mean of {len(vals)} seeds** | | **{statistics.mean(v[0] for v in vals):.4f}** | "
                         f"**{statistics.mean(v[1] for v in vals):.4f}** | | |")
    return lines


def curve_table(runs: list[dict], every: int) -> list[str]:
    n = max((len(r["curve"]) for r in runs), default=0)
    epochs = sorted(set(range(every - 1, n, every)) | {n - 1}) if n else []
    lines = ["| run | " + " | ".join(str(e) for e in epochs) + " |", "|---|" + "---|" * len(epochs)]
    for r in runs:
        cells = [f"{r['curve'][e][0]:.4f} / {r['curve'][e][1]:.4f}" if e < len(r["curve"]) else ""
                 for e in epochs]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/peer_coco128", help="the --out folder of peer_coco128.sh")
    ap.add_argument("--every", type=int, default=10, help="curve table: every N-th epoch (and the last)")
    ap.add_argument("--plot", default="", help="also draw every run's mAP50 and mAP50-95 curves into this PNG")
    opt = ap.parse_args(argv)
    out = Path(opt.out)
    if not out.is_dir():
        print(f"error: --out {out}: not a folder", file=sys.stderr)
        return 2
    runs = collect(out)
    if not runs:
        print(f"error: --out {out}: no run folder with a results.csv", file=sys.stderr)
        return 2
    print("\n".join(summary_table(runs)))
    print("\nmAP50 / mAP50-95 by epoch (0-based; NormYOLO: pycocotools, YOLOv5: its own evaluator)\n")
    print("\n".join(curve_table(runs, max(opt.every, 1))))
    if opt.plot:
        plot_curves(runs, Path(opt.plot))
    return 0


def plot_curves(runs: list[dict], path: Path) -> None:
    """Two panels (mAP50, mAP50-95 against epoch), one line per run; NormYOLO solid, YOLOv5 dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        style = "--" if r["program"] == "yolov5" else "-"
        for ax, col in zip(axes, (0, 1)):
            ax.plot([c[col] for c in r["curve"]], style, label=r["name"], linewidth=1.2)
    for ax, title in zip(axes, ("mAP50", "mAP50-95")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
