"""Training records: results.csv (one row per epoch), results.png (curves) and the tqdm bar text."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterable

from utils.general import atomic_write

LOSS_KEYS = ("train/box_loss", "train/obj_loss", "train/cls_loss")
METRIC_KEYS = ("metrics/precision", "metrics/recall", "metrics/mAP50", "metrics/mAP50-95")
LR_KEYS = ("x/lr0", "x/lr1", "x/lr2")  # param groups: bias, decay (conv weights), norm
COLUMNS = ("epoch",) + LOSS_KEYS + METRIC_KEYS + LR_KEYS + ("nonfinite_steps", "epoch_time_s", "val_time_s")
BAR_FORMAT = "{l_bar}{bar:10}{r_bar}"


def bar_header() -> str:
    """Column titles printed above each epoch's bar (aligned with :func:`bar_description`)."""
    return ("\n" + "%11s" * 7) % ("Epoch", "GPU_mem", "box_loss", "obj_loss", "cls_loss", "Instances", "Size")


def bar_description(epoch: int, epochs: int, mem_gb: float, losses: Iterable[float], instances: int,
                    size: int) -> str:
    """The left part of the bar: ``epoch/last  mem  box obj cls  instances  size`` (tqdm adds it/s and ETA)."""
    return ("%11s" * 2 + "%11.4g" * 5) % (f"{epoch}/{epochs - 1}", f"{mem_gb:.3g}G", *losses, instances, size)


def read_results(path: str | Path) -> list[dict[str, str]]:
    """Rows of a results.csv as dicts of strings (empty when there is no file)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [{k.strip(): (v or "").strip() for k, v in r.items() if k is not None} for r in csv.DictReader(f)]


class ResultsLog:
    """Append-only results.csv with resume support.

    On resume the file is truncated to the rows with ``epoch <= last_epoch`` (the checkpoint's), so a run killed
    after writing a row but before saving last.pt (or the reverse) never shows a duplicate or a missing epoch.
    """

    def __init__(self, save_dir: str | Path, resume_epoch: int | None = None) -> None:
        self.path = Path(save_dir) / "results.csv"
        if resume_epoch is not None and self.path.exists():
            rows = [r for r in self.read() if int(float(r["epoch"])) <= resume_epoch]
            self._rewrite(rows)
        elif resume_epoch is None and self.path.exists():
            self.path.unlink()

    def read(self) -> list[dict[str, str]]:
        """All rows as dicts of strings (empty when there is no file)."""
        return read_results(self.path)

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        # temporary file + rename: a kill -9 here leaves either the old or the new file, never half of one
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        atomic_write(self.path, lambda f: f.write(text.getvalue().encode("utf-8")))

    def append(self, row: dict[str, float]) -> None:
        """Write one epoch's row (keys from :data:`COLUMNS`; missing ones left blank)."""
        rows = [r for r in self.read() if int(float(r["epoch"])) < int(row["epoch"])]
        rows.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self._rewrite(rows)


def plot_results(csv_path: str | Path, out: str | Path | None = None) -> Path | None:
    """Draw loss, metric and learning-rate curves from results.csv into results.png; returns the PNG path."""
    from matplotlib.figure import Figure  # object API: no pyplot global state, no GUI backend

    csv_path = Path(csv_path)
    data = read_results(csv_path)
    if not data:
        return None
    out = Path(out) if out else csv_path.with_name("results.png")
    keys = LOSS_KEYS + METRIC_KEYS + ("x/lr0", "x/lr1")
    epochs = [int(float(r["epoch"])) for r in data]
    fig = Figure(figsize=(15, 6), tight_layout=True)
    axes = fig.subplots(2, 5).ravel()
    for ax, k in zip(axes, keys):
        ys = [float(r[k]) if r.get(k) not in (None, "") else float("nan") for r in data]
        ax.plot(epochs, ys, marker=".", linewidth=2, markersize=6)
        ax.set_title(k, fontsize=11)
        ax.set_xlabel("epoch")
    for ax in axes[len(keys):]:
        ax.axis("off")
    fig.savefig(out, dpi=120)
    return out
