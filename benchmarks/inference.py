"""Inference speed: ms/image for each norm, fused vs unfused, image size, batch size, memory format.

    python benchmarks/inference.py                      # the full table (BN, GN, LN, IN x 320/640 x batch 1/32)
    python benchmarks/inference.py --norms bn --sizes 320 --batches 32 --fused-only
    python benchmarks/inference.py --norms bn gn --sizes 320 --batches 1 32 --fused-only --threads 1   # + ORT
    python benchmarks/inference.py --norms bn gn:C/16 ln in --sizes 320 --batches 1 32 --fused-only --rounds 2

Models are built with random weights (speed does not depend on the values). An untimed setting runs first (the
first model timed in a process runs faster than the rest); ``--rounds R`` repeats the norms in ABBA order and prints
each norm's per-round ratio to the first norm and the median. Timing: ``--warmup`` untimed passes,
then repeated passes until at least ``--min-images`` images went through, under torch.inference_mode() with
``--threads`` intra-op threads; the median pass gives ms/image. Both memory formats are timed; the ``best`` column
says which one the scripts should use (val.py / detect.py use channels_last on CPU because it wins here).
GN / LN / IN layers run models/norm_act_cpu.py's fused kernel on CPU unless ``NORMYOLO_CPU_KERNELS=0`` (the
second line says which). With onnxruntime installed, each fused model is also exported to ONNX (static shape, as
export.py writes it) and run by ONNX Runtime with the same number of threads, through the backend val.py /
detect.py use: the ``ort`` column and its ratio to torch's best memory format. On CPU the process keeps freed
memory (utils/memory.py), as val.py and detect.py do; ``--no-retain-memory`` times glibc's default instead.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cfg", default=str(ROOT / "cfg/models/yolo-n-bn.yaml"), help="model YAML (norm overridden)")
    p.add_argument("--norms", nargs="+", default=["bn", "gn", "ln", "in"], help="norm specs for models.norm")
    p.add_argument("--sizes", nargs="+", type=int, default=[320, 640])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--warmup", type=int, default=2, help="untimed passes per setting")
    p.add_argument("--min-images", type=int, default=64, help="time at least this many images per setting")
    p.add_argument("--min-iters", type=int, default=3, help="and at least this many passes")
    p.add_argument("--fused-only", action="store_true", help="skip the unfused models")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-retain-memory", action="store_true",
                   help="leave glibc's malloc as it is (val.py / detect.py keep freed memory on CPU: utils/memory.py)")
    p.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime column")
    p.add_argument("--rounds", type=int, default=1,
                   help="time every norm R times, every other round in reverse order; prints each norm's ratio to "
                        "the first norm (fused, best memory format) per round and the median")
    return p.parse_args(argv)


def time_model(model: torch.nn.Module, x: torch.Tensor, warmup: int, iters: int) -> float:
    """Median milliseconds per image over ``iters`` passes of batch ``x`` (N, 3, H, W)."""
    from utils.timing import repeat_times

    with torch.inference_mode():
        times = repeat_times(lambda: model(x), x.device, reps=iters, warmup=warmup)
    return 1000 * statistics.median(times) / x.shape[0]


def time_ort(fused: torch.nn.Module, x: torch.Tensor, threads: int, warmup: int, iters: int) -> float:
    """Median ms/image of ONNX Runtime on ``fused`` exported at x's shape (N, 3, H, W), via engine.backends."""
    import tempfile

    from engine.backends import OnnxBackend
    from engine.exporter import export_onnx, metadata, prepare_for_export, simplify_onnx
    from utils.timing import repeat_times

    model = prepare_for_export(fused)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        meta = metadata(model, tuple(x.shape[2:]), x.shape[0], dynamic=False)
        export_onnx(model, x.cpu().contiguous(), path, meta)
        simplify_onnx(path, meta)
        backend = OnnxBackend(path, x.device, threads=threads)
        times = repeat_times(lambda: backend(x), x.device, reps=iters, warmup=warmup)
    return 1000 * statistics.median(times) / x.shape[0]


def max_fuse_error(model: torch.nn.Module, fused: torch.nn.Module, size: int = 320) -> tuple[float, float]:
    """For one random image: (max |diff| of obj / class probabilities, max |diff| of boxes / image size).

    Fusion should be exact to float rounding: both well under 1e-4.
    """
    x = torch.rand(1, 3, size, size, device=next(model.parameters()).device)
    with torch.inference_mode():
        a, b = model(x), fused(x)
    return float((a[..., 4:] - b[..., 4:]).abs().max()), float((a[..., :4] - b[..., :4]).abs().max() / size)


def time_norm(opt: argparse.Namespace, norm: str, device: torch.device, ort: bool) -> list[dict]:
    """Time one norm's model (fused, and unfused unless --fused-only) at every size / batch; prints its rows."""
    from models.yolo import Model

    rows = []
    base = Model(opt.cfg, norm=norm).to(device).eval()
    # a random BN model has running stats 0 / 1; perturb them so fusing actually changes the numbers
    for m in base.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    variants = [(True, copy.deepcopy(base).fuse())]
    if not opt.fused_only:
        variants.insert(0, (False, base))
    err = max_fuse_error(base, variants[-1][1])
    for fused, model in variants:
        for size in opt.sizes:
            for bs in opt.batches:
                x = torch.rand(bs, 3, size, size, device=device)
                iters = max(opt.min_iters, -(-opt.min_images // bs))
                ms_c = time_model(model, x, opt.warmup, iters)
                m_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
                ms_cl = time_model(m_cl, x.contiguous(memory_format=torch.channels_last), opt.warmup, iters)
                best = "channels_last" if ms_cl < ms_c else "contiguous"
                ms_ort = time_ort(model, x, opt.threads, opt.warmup, iters) if ort and fused else None
                rows.append({"norm": norm, "fused": fused, "img": size, "batch": bs, "contiguous_ms": ms_c,
                             "channels_last_ms": ms_cl, "best": best, "fuse_error": err, "ort_ms": ms_ort})
                line = f"{norm:<9}{str(fused):<7}{size:>5}{bs:>7}{ms_c:>12.2f}{ms_cl:>15.2f}{best:>15}"
                if ms_ort is not None:
                    line += f"{ms_ort:>9.2f}{ms_ort / min(ms_c, ms_cl):>11.2f}"
                print(line, flush=True)
    print(f"{norm:<9}fused vs unfused max |diff|: scores {err[0]:.1e}, boxes {err[1]:.1e} (fraction of image size)")
    return rows


def warm_up(opt: argparse.Namespace, device: torch.device) -> None:
    """One untimed setting of the first norm first: in one process (freed memory kept), the first of four identical
    fused BN settings measured 10.70 ms per image at batch 1 and the next three 11.80-12.20, which favoured
    whichever norm came first (BN in the default order)."""
    from models.yolo import Model

    model = Model(opt.cfg, norm=opt.norms[0]).to(device).eval().fuse().to(memory_format=torch.channels_last)
    x = torch.rand(opt.batches[0], 3, opt.sizes[0], opt.sizes[0], device=device)
    time_model(model, x.contiguous(memory_format=torch.channels_last), opt.warmup, opt.min_iters)


def round_ratios(rows: list[dict], norms: list[str]) -> dict[tuple[str, int, int], list[float]]:
    """Per (norm, size, batch): each round's fused best-format ms/image over the first norm's in the same round."""
    best = {(r["round"], r["norm"], r["img"], r["batch"]): min(r["contiguous_ms"], r["channels_last_ms"])
            for r in rows if r["fused"]}
    out: dict[tuple[str, int, int], list[float]] = {}
    for (rnd, norm, img, bs), ms in sorted(best.items()):
        out.setdefault((norm, img, bs), []).append(ms / best[(rnd, norms[0], img, bs)])
    return out


def print_round_ratios(rows: list[dict], norms: list[str]) -> None:
    print(f"fused, best memory format, ms/image vs {norms[0]} of the same round:")
    for (norm, img, bs), ratios in round_ratios(rows, norms).items():
        print(f"{norm:<9}{img:>5}{bs:>7}   {' / '.join(f'{v:.3f}' for v in ratios)}   median "
              f"{statistics.median(ratios):.3f}")


def main(opt: argparse.Namespace) -> list[dict]:
    from utils.general import select_device
    from utils.memory import retain_freed_memory

    torch.set_num_threads(opt.threads)
    device = select_device(opt.device)
    if device.type == "cpu" and not opt.no_retain_memory:
        retain_freed_memory()  # as val.py / detect.py do on CPU
    torch.manual_seed(0)
    rows = []
    print(f"torch {torch.__version__}, {opt.threads} threads, device {device}, cfg {Path(opt.cfg).name}")
    if device.type == "cpu" and any(not n.lower().startswith("bn") for n in opt.norms):
        from models.norm_act_cpu import load_kernel

        on = load_kernel() is not None  # built here, not inside the first timed setting
        print(f"fused CPU norm + activation kernel (models/norm_act_cpu.py): {'on' if on else 'off'}")
    ort = not opt.no_ort and importlib.util.find_spec("onnxruntime") is not None
    header = f"{'norm':<9}{'fused':<7}{'img':>5}{'batch':>7}{'contiguous':>12}{'channels_last':>15}{'best':>15}"
    header += f"{'ort':>9}{'ort/torch':>11}" if ort else ""
    print(header + "   (ms/image)")
    warm_up(opt, device)
    for r in range(opt.rounds):
        order = opt.norms if r % 2 == 0 else opt.norms[::-1]
        if opt.rounds > 1:
            print(f"round {r + 1} of {opt.rounds}: {' '.join(order)}")
        for norm in order:
            rows += [{**row, "round": r} for row in time_norm(opt, norm, device, ort)]
    if opt.rounds > 1:
        print_round_ratios(rows, opt.norms)
    return rows


if __name__ == "__main__":
    if str(ROOT) not in sys.path:  # run as a script from anywhere
        sys.path.insert(0, str(ROOT))
    main(parse_opt())
