"""Mixed precision for training: which autocast dtype ``--amp auto|on|off`` means on a device.

CUDA: float16 autocast with a ``GradScaler`` (YOLOv5's AMP); ``auto`` turns it on. CPU: ``auto`` trains in float32,
as YOLOv5, detectron2 and mmdetection do there; ``on`` asks for bfloat16 autocast (no loss scaling needed: bfloat16
has float32's exponent range), which runs the convolutions on oneDNN's bfloat16 kernels.

Why float32 is the CPU default (docs/training.md#precision-on-cpu): bfloat16 costs BatchNorm models accuracy. At
initialisation the BN model's whole-model gradient has cosine 0.23-0.24 with the float64 gradient under bfloat16
(GN C/16: 0.93-0.94; tests/test_engine_amp.py, benchmarks/bf16_gradient.py), in the conv weights in front of every
BN layer, and computing the norms in float32 does not repair it (the gradient reaching them is already rounded).
On the default run it ended at mAP50 0.698 on one AMX machine (float32 there: 0.710) and 0.750-0.755 on another
(float32: 0.771). Where a CPU computes bfloat16 in hardware (AMX or AVX512-BF16; ``cpu_has_native_bf16``) ``on``
trains about 1.3x faster; on other CPUs bfloat16 is emulated and slower. Weights, optimizer state, EMA, the loss and
validation stay float32 either way.
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
    return torch.bfloat16 if mode == "on" else None


def amp_note(mode: str, device: torch.device) -> str | None:
    """A one-line hint for the training log where ``--amp`` is likely not what the user wants, else None."""
    if device.type == "cpu" and mode == "on" and not cpu_has_native_bf16():
        return "--amp on: this CPU has no bfloat16 hardware (AMX / AVX512-BF16); bfloat16 is emulated and slower"
    return None
