"""Training throughput (images/s) of the n model for BN and GN: the real training step, data loading included.

    python benchmarks/train_speed.py                       # 320 px, batch 16, mosaic on, ../shared/coco128
    python benchmarks/train_speed.py --norms bn gn:C/16 ln --epochs 3 --data cfg/data/synthetic.yaml
    python benchmarks/train_speed.py --norms bn gn:C/16 ln in --rounds 2   # ABBA order, median ratios
    python benchmarks/train_speed.py --norms bn gn:C/16 --cpu-kernels both --rounds 2   # fused kernel on vs off

Runs ``engine.throughput.train_throughput`` (``engine.loop.train_one_epoch``, the same code as train.py: AMP on
CUDA, nominal-batch accumulation, EMA, loaded batches with mosaic) for ``--epochs`` timed passes after one untimed
warm-up pass, and prints a table plus the GN/BN time ratio. With ``--rounds R`` the norms run R times, every
other round in reverse order (bn gn ln, ln gn bn, ...), so that a machine drifting in speed during the run does not
favour the norms measured first; each norm's time is compared with the first norm's of the same round, and the
median over rounds is printed. ``--cpu-kernels both`` measures every norm twice per round, with the fused CPU
training kernel (models/norm_act_train.py) and with torch's ops ("bn/torch"), and prints each norm's on / off time
ratio. coco128 is used when ``../shared/coco128`` exists, else the built-in synthetic data.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    from engine.throughput import add_bench_arguments

    p = add_bench_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--norms", nargs="+", default=["bn", "gn:C/16"])
    p.add_argument("--epochs", type=int, default=2, help="timed passes over the data (after one warm-up pass)")
    p.add_argument("--max-batches", type=int, default=0, help="cap batches per pass (0: whole split)")
    p.add_argument("--fixed-batch", action="store_true",
                   help="time the step alone: each pass repeats the first loaded batch --max-batches times (20)")
    p.add_argument("--device", default="")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="CUDA: let cuDNN time its algorithms per shape (torch.backends.cudnn.benchmark; "
                        "off in train.py)")
    p.add_argument("--rounds", type=int, default=1, help="repeat the norms, every other round in reverse order")
    p.add_argument("--cpu-kernels", default="on", choices=["on", "off", "both"],
                   help="the fused CPU norm + activation training kernel (models/norm_act_train.py): on (as train.py), "
                        "off (torch's ops), or both, each norm measured with and without it")
    p.add_argument("--json", default="", help="also append the rows (with the settings) to this JSON-lines file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opt = parse_opt(argv)
    from data.loader import load_data_config
    from engine.throughput import default_data
    from utils.general import ConfigError, select_device, setup_logging
    from utils.hyp import load_hyp

    setup_logging(verbose=False)
    try:
        device = select_device(opt.device)
        data_cfg = load_data_config(opt.data or default_data())
        hyp = load_hyp(opt.hyp)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from engine.config import default_workers  # the same thread / worker layout as training
    from engine.accel import set_cpu_threads
    from utils.memory import retain_freed_memory

    from models.norm_channels_last import set_group_norm_kernel

    if opt.workers < 0:
        opt.workers = default_workers(device.type)
    torch.backends.cudnn.benchmark = opt.cudnn_benchmark
    set_group_norm_kernel(opt.gn_kernel)
    if device.type == "cpu":
        set_cpu_threads()
        retain_freed_memory()  # as train.py does on CPU (utils/memory.py)
    # (norm, kernel on) per measured entry; "both" puts each norm's torch-ops entry right after it
    kernels = {"on": [True], "off": [False], "both": [True, False]}[opt.cpu_kernels]
    entries = [(n, k) for n in opt.norms for k in kernels]
    rounds = _measure_rounds(opt, entries, data_cfg, hyp, device)
    _print_setting(opt, data_cfg, hyp, device, rounds[0])
    if len(rounds) == 1:
        _print_table(rounds[0])
    else:
        _print_rounds(rounds)
    if opt.json:
        with open(opt.json, "a") as f:
            for r, rows in enumerate(rounds):
                for row in rows:
                    f.write(json.dumps({**row, "round": r, "device": str(device), "img": opt.img,
                                        "batch": opt.batch_size, "channels_last": opt.channels_last,
                                        "compile": opt.compile, "fixed_batch": opt.fixed_batch,
                                        "cudnn_benchmark": opt.cudnn_benchmark, "gn_kernel": opt.gn_kernel}) + "\n")
    _print_ratios(opt, entries, rounds)
    return 0


def _measure_rounds(opt: argparse.Namespace, entries: list[tuple[str, bool]], data_cfg: dict, hyp: dict,
                    device: torch.device) -> list[list[dict]]:
    """One row per (norm, kernel on) entry per round, in ``entries`` order; every other round runs them reversed."""
    from engine.throughput import channels_last_flag, train_throughput
    from models.norm_act_train import set_train_kernel

    rounds = []
    try:
        for r in range(max(1, opt.rounds)):
            order = range(len(entries)) if r % 2 == 0 else reversed(range(len(entries)))
            got = {}
            for i in order:
                norm, on = entries[i]
                set_train_kernel(on)
                row = train_throughput(norm, opt.cfg, data_cfg, hyp, device, img=opt.img, batch_size=opt.batch_size,
                                       epochs=opt.epochs, workers=opt.workers, max_batches=opt.max_batches,
                                       amp=opt.amp, channels_last=channels_last_flag(opt.channels_last),
                                       compile=opt.compile, fixed_batch=opt.fixed_batch)
                got[i] = {**row, "norm": norm if on or opt.cpu_kernels == "off" else f"{norm}/torch",
                          "cpu_kernels": on}
            rounds.append([got[i] for i in range(len(entries))])
    finally:
        set_train_kernel(True)
    return rounds


def _print_ratios(opt: argparse.Namespace, entries: list[tuple[str, bool]], rounds: list[list[dict]]) -> None:
    """Each norm's kernel on / off time ratio (``--cpu-kernels both``) and the GN/BN time ratio, medians over rounds."""
    median = " (median)" if len(rounds) > 1 else ""
    if opt.cpu_kernels == "both":
        for i in range(0, len(entries), 2):
            on_off = statistics.median(rows[i + 1]["images_per_s"] / rows[i]["images_per_s"] for rows in rounds)
            print(f"{entries[i][0]}: time with the fused CPU kernel / with torch's ops{median}: {on_off:.3f}")
    kind = [n.split(":")[0] for n, _ in entries]
    if "bn" in kind and "gn" in kind:
        ib, ig = kind.index("bn"), kind.index("gn")
        gn_bn = statistics.median(rows[ib]["images_per_s"] / rows[ig]["images_per_s"] for rows in rounds)
        print(f"GN/BN time ratio{median}: {gn_bn:.3f}")


def _print_setting(opt: argparse.Namespace, data_cfg: dict, hyp: dict, device: torch.device, rows: list[dict]) -> None:
    print(f"\ntrain speed: {Path(data_cfg['yaml_file']).name}, {opt.img} px, batch {opt.batch_size}, mosaic "
          f"{hyp.get('mosaic', 0)}, {opt.workers} workers, {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, amp {rows[0]['amp']}, channels_last {opt.channels_last}, "
          f"compile {'on' if opt.compile else 'off'}{', fixed batch (step only)' if opt.fixed_batch else ''}"
          f"{', cudnn.benchmark' if opt.cudnn_benchmark else ''}"
          f"{', GN/LN/IN kernel ' + opt.gn_kernel if opt.gn_kernel != 'torch' else ''}"
          f"{', fused CPU training kernel ' + opt.cpu_kernels if device.type == 'cpu' else ''}"
          f"{f', {opt.rounds} rounds' if opt.rounds > 1 else ''}")


def _print_table(rows: list[dict]) -> None:
    """One round: images/s, ms/image and time relative to the first norm."""
    print(f"| {'norm':<10} | {'images/s':>9} | {'ms/image':>9} | {'time vs ' + rows[0]['norm']:>12} "
          f"| {'warm-up s':>9} |")
    print(f"|{'-' * 12}|{'-' * 11}|{'-' * 11}|{'-' * 14}|{'-' * 11}|")
    for r in rows:
        ratio = rows[0]["images_per_s"] / r["images_per_s"]
        print(f"| {r['norm']:<10} | {r['images_per_s']:9.1f} | {1000 / r['images_per_s']:9.1f} | {ratio:12.3f} "
              f"| {r['warmup_s']:9.1f} |")


def _median_ratios(rounds: list[list[dict]]) -> dict[str, float]:
    """norm -> median over rounds of (its time per image / the first norm's in the same round)."""
    return {row["norm"]: statistics.median(rows[0]["images_per_s"] / rows[i]["images_per_s"] for rows in rounds)
            for i, row in enumerate(rounds[0])}


def _print_rounds(rounds: list[list[dict]]) -> None:
    """Several rounds: images/s and the time ratio per round, then the median ratio."""
    ref, med = rounds[0][0]["norm"], _median_ratios(rounds)
    print(f"| norm | images/s per round | time vs {ref} per round | median |\n|---|---|---|---:|")
    for i, row in enumerate(rounds[0]):
        ips = " / ".join(f"{rows[i]['images_per_s']:.1f}" for rows in rounds)
        rat = " / ".join(f"{rows[0]['images_per_s'] / rows[i]['images_per_s']:.3f}" for rows in rounds)
        print(f"| {row['norm']} | {ips} | {rat} | {med[row['norm']]:.3f} |")


if __name__ == "__main__":
    sys.exit(main())
