"""Mixed precision for training: which autocast dtype ``--amp auto|on|off`` means on a device.

CUDA: float16 autocast with a ``GradScaler`` (YOLOv5's AMP); ``auto`` turns it on. CPU: bfloat16 autocast, which
needs no loss scaling (bfloat16 has float32's exponent range) and runs the convolutions on oneDNN's bfloat16 kernels.
``auto`` turns it on where the CPU computes bfloat16 in hardware (AMX or AVX512-BF16), where it trains about 1.5x
faster; elsewhere bfloat16 is emulated and slower, so ``auto`` keeps float32 there (``on`` forces bfloat16).

Why that is an acceptable default (docs/training.md#precision-on-cpu): on the default run, the per-epoch mAP moved
by bfloat16 stays inside what float32 itself moves when only the thread count (summation order) changes, and the
final mAP50-95 was the same (0.492 / 0.488 vs 0.489 / 0.491; mAP50 0.750 / 0.748 vs 0.771 / 0.760). It is not
neutral between norms at initialisation (the BN model's gradient has cosine 0.24 with the float64 gradient, GN's
0.93: tests/test_engine_amp.py), so the BN-vs-GN study pins float32 on CPU (study/config.py). Weights, optimizer
state, EMA, the loss and validation stay float32 either way.
"""
from __future__ import annotations

import torch

from utils.general import ConfigError

AMP_MODES = ("auto", "on", "off")


def cpu_has_native_bf16() -> bool:
    """True where this CPU has bfloat16 matrix hardware: Intel AMX tiles or AVX512-BF16 (torch's own probes)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        return any(bool(p()) for p in probes if callable(p))
    except RuntimeError:  # a torch build without the probes' backend
        return False


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The training autocast dtype for ``--amp mode`` on ``device``; None = plain float32."""
    if mode not in AMP_MODES:
        raise ConfigError(f"--amp {mode}: expected one of {', '.join(AMP_MODES)}")
    if mode == "off" or device.type not in ("cuda", "cpu"):
        return None
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if mode == "on" or cpu_has_native_bf16() else None
