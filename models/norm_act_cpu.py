"""GroupNorm / LayerNorm / InstanceNorm + leaky ReLU (or ReLU, identity) as one CPU kernel for inference.

BatchNorm folds into the convolution for inference; GroupNorm, LayerNorm and InstanceNorm cannot, and torch runs
each of them as two ops: the norm (a statistics pass and a scale-and-shift pass) and then the activation (one more
read and write of the map). ``csrc/norm_act_cpu.cpp`` does norm + activation in one kernel, one image at a time
while it is in cache (``benchmarks/inference.py`` measures the gain). It serves ``models.common.Conv`` when nothing
needs gradients and the map is a channels-last float32 CPU tensor outside tracing and compiling; every other case
(training, bfloat16, CUDA, export, SiLU) runs torch's ops as before.

The kernel is compiled with torch.utils.cpp_extension the first time an eligible layer runs (about 25 s on 2 cores;
a C++ compiler and ninja are needed) and cached under torch's extension directory (``TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``), keyed by its source, torch's version and the CPU's instruction-set flags.
If the build fails, one warning says why and the process keeps torch's ops. ``NORMYOLO_CPU_KERNELS=0`` turns it
off (read at the first eligible call).

Statistics: GroupNorm and LayerNorm take E[x^2] - mean^2 as torch's channels-last GroupNorm does (with double
totals); InstanceNorm sums squared deviations from the mean, as torch's InstanceNorm does, since one channel's map
can be nearly flat. Outputs match torch's ops to float32 rounding (tests/test_norm_act_cpu.py).
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from types import ModuleType

import torch
import torch.nn as nn

from utils.general import LOGGER

SOURCE = Path(__file__).resolve().parent / "csrc" / "norm_act_cpu.cpp"
_state: dict[str, ModuleType | None] = {}  # "kernel": the built module, or None once disabled / failed


def _cpu_flags() -> str:
    """The CPU's instruction-set flags (the build uses -march=native, so a cached build must match the CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def build_name() -> str:
    """Extension name: one per (source, torch version, CPU flags), so no stale or foreign build is loaded."""
    h = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + _cpu_flags().encode()).hexdigest()
    return f"normyolo_norm_act_cpu_{h[:16]}"


def _import_cpp_extension_load():
    """torch.utils.cpp_extension.load, without the CUDA_HOME warning its import logs on machines without CUDA."""
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
    finally:
        quiet.setLevel(level)
    return load


def load_kernel() -> ModuleType | None:
    """The compiled kernel module, building it on the first call; None if disabled or the build failed."""
    if "kernel" in _state:
        return _state["kernel"]
    kernel = None
    if os.environ.get("NORMYOLO_CPU_KERNELS", "1") != "0":
        try:
            load = _import_cpp_extension_load()
            LOGGER.info("norm_act_cpu: loading the fused CPU GroupNorm + activation kernel (built once per machine, "
                        "about 30 s)")
            kernel = load(build_name(), [str(SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                          verbose=False)
        except Exception as e:  # no compiler / ninja, or a platform the flags do not suit: torch's ops instead
            LOGGER.warning(f"norm_act_cpu: kernel build failed, using torch's ops ({type(e).__name__}: "
                           f"{str(e).strip().splitlines()[-1] if str(e).strip() else e})")
    _state["kernel"] = kernel
    return kernel


def _slope(act: nn.Module) -> float | None:
    """The kernel's negative slope for ``act``: LeakyReLU's, 0 for ReLU, 1 for identity; None if unsupported."""
    if isinstance(act, nn.LeakyReLU):
        return float(act.negative_slope)
    if isinstance(act, nn.ReLU):
        return 0.0
    if isinstance(act, nn.Identity):
        return 1.0
    return None


def _groups(norm: nn.Module, channels: int) -> tuple[int, bool] | None:
    """(groups, two_pass) for the norms the kernel covers, else None."""
    if isinstance(norm, nn.GroupNorm):
        return norm.num_groups, False
    if isinstance(norm, nn.InstanceNorm2d) and not norm.track_running_stats:
        return channels, True
    return None


def norm_act(x: torch.Tensor, norm: nn.Module, act: nn.Module, inplace: bool = False) -> torch.Tensor | None:
    """act(norm(x)) of a conv output x (N, C, H, W) by the fused kernel, or None where it does not apply (the caller
    then runs torch's ops). ``inplace``: write into x (a temporary nobody else holds), which also spares a fresh
    output buffer's cache misses."""
    if (not x.is_cpu or x.dtype != torch.float32 or x.dim() != 4
            or not x.is_contiguous(memory_format=torch.channels_last) or torch.jit.is_tracing()
            or torch.compiler.is_compiling()):
        return None
    spec, slope = _groups(norm, x.shape[1]), _slope(act)
    if spec is None or slope is None:
        return None
    weight, bias = norm.weight, norm.bias
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)):
        return None
    kernel = load_kernel()
    if kernel is None:
        return None
    c = x.shape[1]  # the kernel reads the parameters' memory only (it records no autograd graph)
    weight = weight if weight is not None else torch.ones(c)
    bias = bias if bias is not None else torch.zeros(c)
    if (weight.dtype != torch.float32 or bias.dtype != torch.float32 or not weight.is_contiguous()
            or not bias.is_contiguous()):
        return None
    return kernel.group_norm_leaky(x, weight, bias, spec[0], norm.eps, slope, spec[1], inplace)
