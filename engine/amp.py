"""Mixed precision for training: which autocast dtype ``--amp auto|on|off`` means on a device.

CUDA: float16 autocast with a ``GradScaler`` (YOLOv5's AMP). CPU: bfloat16 autocast, which needs no loss scaling
(bfloat16 has float32's exponent range); convolutions then run on oneDNN's bfloat16 kernels. ``auto`` turns it on
for CUDA, and on a CPU only where the hardware has bfloat16 dot-product instructions (AMX or AVX512-BF16): there a
training step of the n model at 320 px, batch 16 took 0.25 s instead of 0.44 s (2-core AMX machine, docs/training.md);
without them bfloat16 is emulated and slower, so ``auto`` keeps float32. Weights, optimizer state, EMA and the loss
stay float32 either way.
"""
from __future__ import annotations

import torch

from utils.general import ConfigError

AMP_MODES = ("auto", "on", "off")


def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bfloat16 in hardware (AMX tiles or AVX512-BF16)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu private probes; absent = no
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The training autocast dtype for ``--amp mode`` on ``device``; None = plain float32."""
    if mode not in AMP_MODES:
        raise ConfigError(f"--amp {mode}: expected one of {', '.join(AMP_MODES)}")
    if mode == "off" or device.type not in ("cuda", "cpu"):
        return None
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if mode == "on" or cpu_has_native_bf16() else None
