"""How far bfloat16 autocast moves the training gradient at initialisation, per norm (why --amp auto is float32 on CPU).

    python benchmarks/bf16_gradient.py                       # BN and GN C/16, 160 px, batch 8
    python benchmarks/bf16_gradient.py --norms bn --top 25   # also the 25 largest gradient tensors

Builds the n model from one seed, one loss on one random batch with three boxes, and compares the whole-model
gradient of three runs against float64 (cosine similarity): float32, bfloat16 autocast as ``--amp on`` trains
(channels-last, as on CPU), and bfloat16 autocast with every norm layer's input cast back to float32, so that the
norms and activations run in float32 on the bfloat16 conv outputs. ``--top N`` also prints, for the N tensors
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

MODES = ("fp32", "bf16", "bf16 + fp32 norms")


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cfg", default=str(ROOT / "cfg" / "models" / "yolo-n-bn.yaml"))
    p.add_argument("--hyp", default=str(ROOT / "cfg" / "hyp" / "scratch.yaml"))
    p.add_argument("--norms", nargs="+", default=["bn", "gn:C/16"])
    p.add_argument("--img", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--top", type=int, default=0, help="also list the N largest gradient tensors (0: none)")
    return p.parse_args(argv)


def gradients(opt: argparse.Namespace, norm: str, mode: str, x: torch.Tensor,
              targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """{parameter name: float64 flat gradient} of one loss; mode 'fp64' or one of MODES."""
    from models.loss import ComputeLoss
    from models.yolo import Model
    from utils.general import load_yaml

    torch.manual_seed(0)
    model = Model(opt.cfg, nc=4, norm=norm)
    if mode == "fp64":
        model, x, targets = model.double(), x.double(), targets.double()
    else:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    if mode == "bf16 + fp32 norms":
        for m in model.modules():
            if m.__class__.__name__ == "Conv" and not isinstance(m.norm, torch.nn.Identity):
                m.norm.register_forward_pre_hook(lambda _m, args: (args[0].float(),))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.startswith("bf16")):
        loss, _ = ComputeLoss(model, load_yaml(opt.hyp), opt.img)(model(x), targets)
    loss.backward()
    return {n: p.grad.double().flatten() for n, p in model.named_parameters()}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, 0))


def main(argv: list[str] | None = None) -> None:
    opt = parse_opt(argv)
    torch.manual_seed(1)
    x = torch.rand(opt.batch_size, 3, opt.img, opt.img)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.3], [2, 0, 0.3, 0.6, 0.2, 0.4], [3, 1, 0.4, 0.4, 0.2, 0.1]])
    print(f"gradient cosine vs float64 at initialisation: {Path(opt.cfg).name}, {opt.img} px, batch {opt.batch_size}")
    print("| norm | " + " | ".join(MODES) + " |\n|---|" + "---:|" * len(MODES))
    for norm in opt.norms:
        ref = gradients(opt, norm, "fp64", x, targets)
        runs = {mode: gradients(opt, norm, mode, x, targets) for mode in MODES}
        flat = {mode: torch.cat(list(g.values())) for mode, g in runs.items()}
        ref_flat = torch.cat(list(ref.values()))
        print(f"| {norm} | " + " | ".join(f"{cosine(ref_flat, flat[m]):.3f}" for m in MODES) + " |")
        if opt.top:
            total = float(ref_flat.square().sum())
            for name in sorted(ref, key=lambda n: -float(ref[n].norm()))[:opt.top]:
                print(f"    {norm} {name:34s} share {float(ref[name].square().sum()) / total:.3f}  "
                      f"bf16 cosine {cosine(ref[name], runs['bf16'][name]):.3f}")


if __name__ == "__main__":
    main()
