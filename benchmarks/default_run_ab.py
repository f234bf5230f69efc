"""Issue 14's default-run measurement: the README's train command in fresh clones of two commits, alternated.

    python benchmarks/default_run_ab.py --before 6177323                     # one round: after (HEAD), then before
    python benchmarks/default_run_ab.py --before 6177323 --rounds 2          # after, before, before, after
    python benchmarks/default_run_ab.py --before HEAD~1 --command "python train.py --epochs 1"   # a quick check

Each run clones this repository's committed history into a fresh folder, checks the commit out and runs
``--command`` there under bash (default: the README's train command, ``pip install`` included) with an empty
``TORCH_EXTENSIONS_DIR``, so that a first-use build of the CPU kernels is part of the time. Rounds alternate the
order (after / before, then before / after), so that a machine whose speed drifts during the hours this takes does
not favour one code; nothing else should run meanwhile. Per run it prints the wall time, the training passes and
the validations from the run's results.csv (``epoch_time_s``; ``val_time_s`` where the code logs it) and the final
mAP50 / mAP50-95, then after / before per round and over all runs (issue 14: 16 → 13 minutes, 0.8125), and the
largest per-epoch mAP50 difference between the two codes and between runs of the same code.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
README_COMMAND = "pip install -r requirements.txt && python train.py"  # tests check that the README still says so
TARGET_RATIO = 13 / 16


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="the commit to compare against (e.g. the one an issue was filed on)")
    p.add_argument("--after", default="HEAD", help="the commit measured (default: HEAD)")
    p.add_argument("--rounds", type=int, default=1, help="alternations; each round runs both codes once")
    p.add_argument("--command", default=README_COMMAND, help="what each fresh clone runs (bash)")
    p.add_argument("--out", default=str(ROOT / "runs" / "default_run_ab"), help="clones, logs and the JSON rows")
    p.add_argument("--keep", action="store_true",
                   help="keep each clone (else only the run's log and results.csv, in --out)")
    return p.parse_args(argv)


def resolve(rev: str) -> str:
    """Full hash of ``rev`` in this repository; a one-line error if git does not know it."""
    r = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"default_run_ab: '{rev}' is not a commit of {ROOT}")
    return r.stdout.strip()


def run_order(rounds: int) -> list[tuple[int, str]]:
    """(round, 'after' | 'before') in run order: after first in even rounds, before first in odd ones."""
    pair = ("after", "before")
    return [(r, label) for r in range(rounds) for label in (pair if r % 2 == 0 else pair[::-1])]


def read_results(clone: Path) -> dict[str, Any]:
    """Training passes, validations (None where not logged) and the mAP50 / mAP50-95 per epoch of the newest
    runs/train/exp*/results.csv in ``clone`` (its path as ``results``); empty lists when the run wrote none."""
    from engine.results import read_results as read_csv

    found = sorted(clone.glob("runs/train/exp*/results.csv"), key=lambda f: f.stat().st_mtime)
    if not found:
        return {"train_s": None, "val_s": None, "map50": [], "map50_95": [], "results": None}
    rows = read_csv(found[-1])

    def total(key: str) -> float | None:
        vals = [r.get(key) for r in rows]
        return sum(float(v) for v in vals if v) if rows and all(v is not None for v in vals) else None

    return {"train_s": total("epoch_time_s"), "val_s": total("val_time_s"), "results": str(found[-1]),
            "map50": [float(r["metrics/mAP50"]) for r in rows],
            "map50_95": [float(r["metrics/mAP50-95"]) for r in rows]}


def run_once(sha: str, label: str, index: int, opt: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Clone at ``sha``, run ``opt.command`` with an empty kernel cache, time it and read its results."""
    clone = out / f"{index}-{label}"
    shutil.rmtree(clone, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", sha], cwd=clone, check=True)
    ext = Path(tempfile.mkdtemp(prefix="ext-", dir=out))
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext)}
    log = out / f"{index}-{label}.log"
    start_utc, t0 = time.strftime("%H:%M", time.gmtime()), time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(["bash", "-c", opt.command], cwd=clone, env=env, stdout=f,
                            stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    end_utc = time.strftime("%H:%M", time.gmtime())
    row = {"index": index, "label": label, "commit": sha[:7], "utc": f"{start_utc}-{end_utc}", "rc": rc,
           "wall_s": wall, **read_results(clone)}
    if row["results"] is not None:
        shutil.copy(row["results"], out / f"{index}-{label}-results.csv")
    shutil.rmtree(ext, ignore_errors=True)
    if not opt.keep:
        shutil.rmtree(clone, ignore_errors=True)
    return row


def _s(v: float | None) -> str:
    return "not logged" if v is None else f"{v:,.0f} s"


def max_curve_gap(a: list[list[float]], b: list[list[float]]) -> tuple[float, int] | None:
    """Largest |mAP50 difference| at one epoch between any curve of ``a`` and any of ``b`` (and its epoch)."""
    gaps = [(abs(x - y), e) for ca in a for cb in b if ca is not cb for e, (x, y) in enumerate(zip(ca, cb))]
    return max(gaps) if gaps else None


def report(rows: list[dict[str, Any]]) -> None:
    print("| run | code | commit | UTC | wall | training passes | validations | final mAP50 / mAP50-95 | rc |")
    print("|---|---|---|---|---:|---:|---:|---|---|")
    for r in rows:
        final = f"{r['map50'][-1]:.3f} / {r['map50_95'][-1]:.3f}" if r["map50"] else "none"
        print(f"| {r['index']} | {r['label']} | {r['commit']} | {r['utc']} | {r['wall_s']:,.0f} s | "
              f"{_s(r['train_s'])} | {_s(r['val_s'])} | {final} | {r['rc']} |")
    by_round: dict[int, dict[str, float]] = {}
    for r in rows:
        by_round.setdefault(r["round"], {})[r["label"]] = r["wall_s"]
    ratios = [w["after"] / w["before"] for w in by_round.values() if {"after", "before"} <= w.keys()]
    if ratios:
        wall = {k: sum(r["wall_s"] for r in rows if r["label"] == k) for k in ("after", "before")}
        print(f"after / before per round: {', '.join(f'{x:.3f}' for x in ratios)}; over all runs "
              f"{wall['after'] / wall['before']:.3f} ({wall['after']:,.0f} s against {wall['before']:,.0f} s); "
              f"target 16 -> 13 min = {TARGET_RATIO:.4f}")
    curves = {k: [r["map50"] for r in rows if r["label"] == k and r["map50"]] for k in ("after", "before")}
    for what, a, b in (("after vs before", curves["after"], curves["before"]),
                       ("between after runs", curves["after"], curves["after"]),
                       ("between before runs", curves["before"], curves["before"])):
        gap = max_curve_gap(a, b)
        if gap is not None:
            print(f"largest per-epoch mAP50 difference {what}: {gap[0]:.4f} (epoch {gap[1]})")


def main(argv: list[str] | None = None) -> int:
    opt = parse_opt(argv)
    if opt.rounds < 1:
        raise SystemExit(f"default_run_ab: --rounds {opt.rounds}: expected at least 1")
    shas = {"after": resolve(opt.after), "before": resolve(opt.before)}
    out = Path(opt.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"after {shas['after'][:7]}, before {shas['before'][:7]}, {opt.rounds} round(s) of: {opt.command}",
          flush=True)
    rows = []
    for i, (rnd, label) in enumerate(run_order(opt.rounds)):
        row = run_once(shas[label], label, i, opt, out) | {"round": rnd}
        print(f"run {i} ({label}, {row['commit']}): {row['wall_s']:,.0f} s, rc {row['rc']}", flush=True)
        with open(out / "runs.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
    report(rows)
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
