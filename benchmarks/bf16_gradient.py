"""How far bfloat16 moves the training gradient at initialisation, per norm (why --amp auto is float32 on CPU).

    python benchmarks/bf16_gradient.py                       # BN and GN C/16, 160 px, batch 8
    python benchmarks/bf16_gradient.py --norms bn --top 25   # also the 25 largest gradient tensors

Builds the n model from one seed, one loss on one random batch with three boxes, and compares the whole-model
gradient of five runs against float64 (cosine similarity): float32 as train.py runs it on CPU (channels-last, norm +
activation in the fused training kernel of models/norm_act_train.py), float32 with torch's norm and activation ops
instead (``NORMYOLO_CPU_KERNELS=0``), float32 tensors with oneDNN's convolutions multiplying in bfloat16
(``torch.backends.mkldnn.conv.fp32_precision = "bf16"``, the CPU counterpart of TF32: inputs rounded to bfloat16,
sums and outputs in float32; on a CPU without bfloat16 hardware oneDNN keeps float32 and the column repeats the
first), bfloat16 autocast as ``--amp on`` trains, and bfloat16 autocast with every norm layer's input cast back to
float32, so that the norms and activations run in float32 on the bfloat16 conv outputs. The three float32 columns
also print the relative error ||g - g64|| / ||g64||. ``--top N`` also prints, for the N tensors
with the largest float64 gradients, their share of the squared gradient norm and their cosine under bfloat16.
docs/training.md#precision-on-cpu quotes its output.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODES = ("fp32", "fp32 torch ops", "fp32 bf16 conv math", "bf16", "bf16 + fp32 norms")


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cfg", default=str(ROOT / "cfg" / "models" / "yolo-n-bn.yaml"))
    p.add_argument("--hyp", default=str(ROOT / "cfg" / "hyp" / "scratch.yaml"))
    p.add_argument("--norms", nargs="+", default=["bn", "gn:C/16"])
    p.add_argument("--img", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--top", type=int, default=0, help="also list the N largest gradient tensors (0: none)")
    return p.parse_args(argv)


def gradients(opt: argparse.Namespace, hyp: dict, norm: str, mode: str, x: torch.Tensor,
              targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """{parameter name: float64 flat gradient} of one loss; mode 'fp64' or one of MODES."""
    from models.common import Conv
    from models.loss import ComputeLoss
    from models.norm_act_train import set_train_kernel
    from models.yolo import Model

    torch.manual_seed(0)
    model = Model(opt.cfg, nc=4, norm=norm)
    if mode == "fp64":
        model, x, targets = model.double(), x.double(), targets.double()
    else:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    if mode == "bf16 + fp32 norms":
        for m in model.modules():
            if isinstance(m, Conv) and not isinstance(m.norm, torch.nn.Identity):
                m.norm.register_forward_pre_hook(lambda _m, args: (args[0].float(),))
    set_train_kernel(mode != "fp32 torch ops")
    conv_math = torch.backends.mkldnn.conv.fp32_precision
    if mode == "fp32 bf16 conv math":
        torch.backends.mkldnn.conv.fp32_precision = "bf16"
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.startswith("bf16")):
            loss, _ = ComputeLoss(model, hyp, opt.img)(model(x), targets)
        loss.backward()
    finally:
        set_train_kernel(True)
        torch.backends.mkldnn.conv.fp32_precision = conv_math
    return {n: p.grad.double().flatten() for n, p in model.named_parameters()}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, 0))


def rel_error(ref: torch.Tensor, g: torch.Tensor) -> float:
    """||g - ref|| / ||ref||."""
    return float((g - ref).norm() / ref.norm())


def main(argv: list[str] | None = None) -> None:
    from utils.hyp import load_hyp

    opt = parse_opt(argv)
    hyp = load_hyp(opt.hyp)
    torch.manual_seed(1)
    x = torch.rand(opt.batch_size, 3, opt.img, opt.img)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.3], [2, 0, 0.3, 0.6, 0.2, 0.4], [3, 1, 0.4, 0.4, 0.2, 0.1]])
    print(f"gradient cosine vs float64 at initialisation: {Path(opt.cfg).name}, {opt.img} px, batch {opt.batch_size}")
    fp32 = [m for m in MODES if m.startswith("fp32")]
    cols = list(MODES) + [f"{m} rel. error" for m in fp32]
    print("| norm | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols))
    for norm in opt.norms:
        ref = gradients(opt, hyp, norm, "fp64", x, targets)
        runs = {mode: gradients(opt, hyp, norm, mode, x, targets) for mode in MODES}
        flat = {mode: torch.cat(list(g.values())) for mode, g in runs.items()}
        ref_flat = torch.cat(list(ref.values()))
        cells = ([f"{cosine(ref_flat, flat[m]):.4f}" for m in MODES]
                 + [f"{rel_error(ref_flat, flat[m]):.2e}" for m in fp32])
        print(f"| {norm} | " + " | ".join(cells) + " |")
        if opt.top:
            total = float(ref_flat.square().sum())
            for name in sorted(ref, key=lambda n: -float(ref[n].norm()))[:opt.top]:
                print(f"    {norm} {name:34s} share {float(ref[name].square().sum()) / total:.3f}  "
                      f"bf16 cosine {cosine(ref[name], runs['bf16'][name]):.3f}")


if __name__ == "__main__":
    main()
