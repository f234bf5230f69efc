"""NormYOLO vs YOLOv5 speed, side by side on this machine: training images/s and forward ms/image.

    python benchmarks/peer_speed.py --yolov5 /path/to/yolov5 --python /path/to/yolov5-venv/bin/python
    python benchmarks/peer_speed.py --yolov5 ... --python ... --rounds 3 --epochs 1 5 --normyolo-args="--amp off"

YOLOv5 runs from its own checkout and virtual environment (never a dependency of this project, nothing of it is
imported here). Training: coco128 (train = val), n model from scratch, 320 px, batch 16, ``--noval``, each program's
defaults otherwise; per-epoch time = (wall of an E2-epoch run - wall of an E1-epoch run) / (E2 - E1), whole
processes, so start-up, data scanning and the final validation cancel. The programs alternate, ``--rounds`` times;
the ratio is taken per round and the median printed. Forward: the fused n model (BN folded), eval mode, random
input at 320 px, batch 1 and 32, channels-last for both, each in its own process, alternating, median of 20 runs.
NormYOLO's forward process keeps freed memory as its val.py / detect.py do (utils/memory.py); YOLOv5's runs with
glibc's default malloc, as its own scripts do. ``--peer-retain-memory`` gives YOLOv5's forward process the same
policy (through glibc's MALLOC_* environment variables), for a like-for-like view of the model code alone.
Run it with nothing else on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
FORWARD = r"""
import json, sys, time, torch
sys.path.insert(0, ".")
batch, img, side = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if side == "normyolo":
    from models.yolo import Model
    from utils.memory import retain_freed_memory
    retain_freed_memory()  # as NormYOLO's val.py / detect.py do on CPU
    model = Model("cfg/models/yolo-n-bn.yaml", nc=80)
else:
    from models.yolo import Model
    model = Model("models/yolov5n.yaml", nc=80)
model = model.fuse().eval()
for m in model.modules():  # channels-last weights for both (YOLOv5's rank-3 anchor buffer cannot be converted)
    if isinstance(m, torch.nn.Conv2d):
        m.to(memory_format=torch.channels_last)
x = torch.rand(batch, 3, img, img).contiguous(memory_format=torch.channels_last)
times = []
with torch.inference_mode():
    for i in range(25):
        t = time.perf_counter(); model(x); times.append(time.perf_counter() - t)
times = sorted(times[5:])
print(json.dumps({"ms_per_image": 1000 * times[len(times) // 2] / batch, "threads": torch.get_num_threads()}))
"""


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--yolov5", required=True, help="a YOLOv5 checkout (ultralytics/yolov5)")
    p.add_argument("--python", required=True, help="the Python of YOLOv5's own virtual environment")
    p.add_argument("--coco128", default=str(ROOT.parent / "shared" / "coco128"))
    p.add_argument("--rounds", type=int, default=2, help="alternations (each program trains twice per round)")
    p.add_argument("--epochs", type=int, nargs=2, default=[1, 4], metavar=("E1", "E2"))
    p.add_argument("--img", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--normyolo-args", default="", help="extra train.py flags, e.g. '--amp off'")
    p.add_argument("--out", default=str(ROOT / "runs" / "peer_speed"))
    p.add_argument("--skip-train", action="store_true", help="only the forward timings (alternated --rounds times)")
    p.add_argument("--skip-forward", action="store_true")
    p.add_argument("--peer-retain-memory", action="store_true",
                   help="run YOLOv5's forward timing with NormYOLO's malloc policy too (utils/memory.py)")
    return p.parse_args(argv)


def yolov5_env(out: Path) -> dict[str, str]:
    """No network, no font download, settings inside ``out``."""
    cfg = out / "config"
    cfg.mkdir(parents=True, exist_ok=True)
    font = Path(__import__("matplotlib").__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    if not (cfg / "Arial.ttf").exists():
        shutil.copy(font, cfg / "Arial.ttf")
    return dict(os.environ, YOLO_OFFLINE="1", YOLO_AUTOINSTALL="false", YOLOv5_AUTOINSTALL="false",
                YOLOV5_CONFIG_DIR=str(cfg), YOLO_CONFIG_DIR=str(cfg))


def commands(opt: argparse.Namespace, out: Path, data_v5: Path, epochs: int, tag: str) -> dict[str, tuple]:
    """(argv, cwd, env) per program for one ``epochs``-epoch training run."""
    common = ["--img", str(opt.img), "--batch-size", str(opt.batch_size), "--epochs", str(epochs), "--noval",
              "--project", str(out), "--exist-ok"]
    ours = [sys.executable, "train.py", "--data", "cfg/data/coco128.yaml", "--hyp", "cfg/hyp/scratch.yaml",
            "--name", f"normyolo_{tag}", *common, *opt.normyolo_args.split()]
    theirs = [opt.python, "train.py", "--data", str(data_v5), "--cfg", "models/yolov5n.yaml", "--weights", "",
              "--hyp", "data/hyps/hyp.scratch-low.yaml", "--noplots", "--name", f"yolov5_{tag}", *common]
    return {"normyolo": (ours, ROOT, dict(os.environ)), "yolov5": (theirs, Path(opt.yolov5), yolov5_env(out))}


KERNELS = ("from models.norm_act_cpu import load_kernel; from models.norm_act_train import load_train_kernel; "
           "print(load_kernel() is not None, load_train_kernel() is not None)")


def build_kernels(out: Path) -> float:
    """Build (or load) NormYOLO's fused CPU kernels once before any timed run, and return the seconds it took: a
    first build (a few seconds each on 2 cores) inside the first timed run would add to that run's wall time only and
    spoil its round's per-epoch difference."""
    return timed([sys.executable, "-c", KERNELS], ROOT, dict(os.environ), out / "normyolo_kernels.log")


def timed(argv: list[str], cwd: Path, env: dict[str, str], log: Path) -> float:
    t = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run(argv, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"error: {' '.join(argv[:2])} in {cwd} failed (exit {r.returncode}); see {log}")
    return time.perf_counter() - t


def train_rounds(opt: argparse.Namespace, out: Path, data_v5: Path) -> dict[str, list[float]]:
    """Per-epoch seconds per program per round."""
    e1, e2 = opt.epochs
    per_epoch: dict[str, list[float]] = {"normyolo": [], "yolov5": []}
    for r in range(opt.rounds):
        order = ["normyolo", "yolov5"] if r % 2 == 0 else ["yolov5", "normyolo"]
        walls = {}
        for e in (e1, e2):
            cmds = commands(opt, out, data_v5, e, f"r{r}_e{e}")
            for side in order:
                walls[side, e] = timed(*cmds[side], out / f"{side}_r{r}_e{e}.log")
                print(f"round {r} {side:<8} {e} epoch(s): {walls[side, e]:.1f} s wall", flush=True)
        for side in order:
            per_epoch[side].append((walls[side, e2] - walls[side, e1]) / (e2 - e1))
    return per_epoch


def forward_rows(opt: argparse.Namespace, out: Path) -> list[tuple[int, list[float], list[float]]]:
    """(batch, NormYOLO ms/img per round, YOLOv5n ms/img per round): each timing in its own process, the two
    programs alternating (round 0 NormYOLO first, round 1 YOLOv5 first, ...)."""
    from utils.memory import GLIBC_ENV

    v5_env = yolov5_env(out)
    if opt.peer_retain_memory:  # the policy of utils.memory.retain_freed_memory, set before YOLOv5's process starts
        v5_env.update(GLIBC_ENV)
    sides = {"normyolo": (sys.executable, ROOT, dict(os.environ)), "yolov5": (opt.python, Path(opt.yolov5), v5_env)}
    rows = []
    for batch in (1, 32):
        ms: dict[str, list[float]] = {"normyolo": [], "yolov5": []}
        for r in range(opt.rounds):
            for side in (["normyolo", "yolov5"] if r % 2 == 0 else ["yolov5", "normyolo"]):
                py, cwd, env = sides[side]
                res = subprocess.run([py, "-c", FORWARD, str(batch), str(opt.img), side], cwd=cwd, env=env,
                                     capture_output=True, text=True)
                if res.returncode:
                    raise SystemExit(f"error: forward timing of {side} failed: "
                                     f"{res.stderr.strip().splitlines()[-1:]}")
                ms[side].append(json.loads(res.stdout.strip().splitlines()[-1])["ms_per_image"])
        rows.append((batch, ms["normyolo"], ms["yolov5"]))
    return rows


def print_forward(rows: list[tuple[int, list[float], list[float]]]) -> None:
    print("\n| forward, fused, 320 px | NormYOLO ms/img per round | YOLOv5n ms/img per round | ratio per round "
          "| median ratio |\n|---|---|---|---|---:|")
    for batch, a, b in rows:
        ratios = [x / y for x, y in zip(a, b)]
        print(f"| batch {batch} | {' / '.join(f'{x:.2f}' for x in a)} | {' / '.join(f'{y:.2f}' for y in b)} | "
              f"{' / '.join(f'{q:.2f}x' for q in ratios)} | {statistics.median(ratios):.2f}x |")


def print_training(opt: argparse.Namespace, out: Path, coco: Path) -> None:
    """Train both programs alternately on a copy of coco128 and print the per-round table and the median ratio."""
    data_v5 = out / "coco128_yolov5.yaml"  # YOLOv5 writes its label cache next to the labels: give it a copy
    copy = Path(tempfile.mkdtemp(prefix="coco128_", dir=out))
    shutil.copytree(coco, copy / "coco128")
    names = yaml.safe_load((ROOT / "cfg" / "data" / "coco128.yaml").read_text())["names"]
    yaml.safe_dump({"path": str(copy / "coco128"), "train": "images/train2017", "val": "images/train2017",
                    "nc": len(names), "names": dict(enumerate(names))}, data_v5.open("w"), sort_keys=False)
    print(f"NormYOLO's CPU kernels built or loaded, untimed: {build_kernels(out):.1f} s", flush=True)
    per_epoch = train_rounds(opt, out, data_v5)
    n = len(list((coco / "images" / "train2017").glob("*.jpg")))
    print(f"\npeer speed: coco128 ({n} images), {opt.img} px, batch {opt.batch_size}, epochs {opt.epochs[0]} vs "
          f"{opt.epochs[1]}, NormYOLO extra flags '{opt.normyolo_args}'")
    print("| round | NormYOLO s/epoch | img/s | YOLOv5 s/epoch | img/s | NormYOLO/YOLOv5 images/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    ratios = []
    for r, (a, b) in enumerate(zip(per_epoch["normyolo"], per_epoch["yolov5"])):
        ratios.append(b / a)
        print(f"| {r} | {a:.2f} | {n / a:.1f} | {b:.2f} | {n / b:.1f} | {b / a:.2f}x |")
    print(f"training images/s ratio NormYOLO/YOLOv5, median of {len(ratios)}: {statistics.median(ratios):.2f}x")
    shutil.rmtree(copy, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    opt = parse_opt(argv)
    coco = Path(opt.coco128)
    if not (Path(opt.yolov5) / "train.py").is_file() or not Path(opt.python).is_file():
        print("error: --yolov5 DIR (a YOLOv5 checkout) and --python PY (its venv's python) are needed", file=sys.stderr)
        return 2
    if not (coco / "images" / "train2017").is_dir():
        print(f"error: --coco128 {coco}: images/train2017 not found", file=sys.stderr)
        return 2
    out = Path(opt.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not opt.skip_train:
        print_training(opt, out, coco)
    if not opt.skip_forward:
        print_forward(forward_rows(opt, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
