"""Mixed precision for training: which autocast dtype ``--amp auto|on|off`` means on a device.

CUDA: float16 autocast with a ``GradScaler`` (YOLOv5's AMP); ``auto`` turns it on. CPU: bfloat16 autocast, which
needs no loss scaling (bfloat16 has float32's exponent range) and runs the convolutions on oneDNN's bfloat16 kernels;
only with ``--amp on``, because it is not numerically neutral, least of all for BatchNorm: at initialisation the
BN model's gradient under bfloat16 has cosine 0.24 with the float64 gradient (GN C/16: 0.93; float32: 1.00 for both),
and the default run ended at mAP50 0.717 instead of 0.738 (docs/training.md#speed). Where the CPU has bfloat16
hardware (AMX or AVX512-BF16) it is fast: a training step of the n model at 320 px, batch 16 took 0.26 s instead of
0.45 s on the 2-core AMX machine; without it bfloat16 is emulated and slower. Weights, optimizer state, EMA and the
loss stay float32 either way.
"""
from __future__ import annotations

import torch

from utils.general import ConfigError

AMP_MODES = ("auto", "on", "off")


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The training autocast dtype for ``--amp mode`` on ``device``; None = plain float32."""
    if mode not in AMP_MODES:
        raise ConfigError(f"--amp {mode}: expected one of {', '.join(AMP_MODES)}")
    if mode == "off" or device.type not in ("cuda", "cpu"):
        return None
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if mode == "on" else None  # CPU: opt-in only (see the module docstring)
