"""GroupNorm / LayerNorm / InstanceNorm + leaky ReLU (or ReLU, identity) as one CPU kernel for inference.

BatchNorm folds into the convolution for inference; GroupNorm, LayerNorm and InstanceNorm cannot, and torch runs
each of them as two ops: the norm (a statistics pass and a scale-and-shift pass) and then the activation (one more
read and write of the map). ``csrc/norm_act_cpu.cpp`` does norm + activation in one kernel, one image at a time
while it is in cache (``benchmarks/inference.py`` measures the gain). It serves ``models.common.Conv`` when nothing
needs gradients and the map is a channels-last float32 CPU tensor outside tracing and compiling; every other case
(training, bfloat16, CUDA, export, SiLU, modules with forward hooks) runs torch's ops as before.

The kernel is compiled with torch.utils.cpp_extension the first time an eligible layer runs (9-12 s on a 2-core Xeon
by benchmarks/kernel_build.py; a C++ compiler and ninja are needed) and cached under torch's extension directory
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), keyed by its source's text and path, torch's
version and the CPU's instruction-set flags (``build_name``). If the build fails, one warning says why and the
process keeps torch's ops. ``NORMYOLO_CPU_KERNELS=0`` turns it off (read at the first eligible call).

Statistics take one pass: each channel is summed shifted by its value at the image's first pixel and the channels
combine into their group in double, so a nearly flat map (mean far from zero against its spread) keeps its digits,
where torch's channels-last GroupNorm (E[x^2] - mean^2 in float32) loses them. Outputs match torch's ops to float32
rounding (tests/test_norm_act_cpu.py).
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

import torch
import torch.nn as nn
from torch.nn.modules import module as _nn_module

from models.norm_channels_last import is_channels_last_eager
from utils.general import LOGGER

SOURCE = Path(__file__).resolve().parent / "csrc" / "norm_act_cpu.cpp"
# -fno-trapping-math (as torch's own build): GCC otherwise keeps a float compare-and-select a branch, unvectorised
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math"]
_state: dict[str, ModuleType | None] = {}  # "kernel": the built module, or None once disabled / failed


def _cpu_flags() -> str:
    """The CPU's instruction-set flags (the build uses -march=native, so a cached build must match the CPU):
    /proc/cpuinfo's 'flags' (x86) or 'Features' (ARM) line, else the platform's processor name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def build_name(source: Path = SOURCE) -> str:
    """Extension name of ``source``: one per (source text and path, torch and Python version, CPU flags), so no
    stale or foreign build is loaded (with TORCH_EXTENSIONS_DIR set, torch keeps no per-Python subfolder). The path
    counts because torch's build file names the source by path: two checkouts sharing one build folder would each
    rebuild it (9-12 s) whenever the other had built last."""
    setting = f"{source.resolve()}|{torch.__version__}|{sys.version}|{_cpu_flags()}|{CFLAGS}"
    key = source.read_bytes() + setting.encode()
    h = hashlib.sha256(key).hexdigest()
    return f"normyolo_{source.stem}_{h[:16]}"


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


def _reason(e: Exception) -> str:
    """One line of a build error: the compiler's first 'error:' line if there is one, else the last line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    return (errors or lines or [repr(e)])[0 if errors else -1]


def load_source(source: Path, key: str, what: str) -> ModuleType | None:
    """The extension built from ``source`` (cached in ``_state[key]``), building it on the first call; None if
    disabled (NORMYOLO_CPU_KERNELS=0) or the build failed (one warning naming ``what``)."""
    if key in _state:
        return _state[key]
    kernel = None
    if os.environ.get("NORMYOLO_CPU_KERNELS", "1") != "0":
        try:
            load = _import_cpp_extension_load()
            LOGGER.info(f"{source.stem}: loading the {what} (its first build on a machine takes 10-30 s)")
            kernel = load(build_name(source), [str(source)], extra_cflags=CFLAGS, verbose=False)
        except Exception as e:  # no compiler / ninja, or a platform the flags do not suit: torch's ops instead
            LOGGER.warning(f"{source.stem}: kernel build failed, using torch's ops ({type(e).__name__}: "
                           f"{_reason(e)})")
    _state[key] = kernel
    return kernel


def load_kernel() -> ModuleType | None:
    """The compiled inference kernel module, building it on the first call; None if disabled or the build failed."""
    return load_source(SOURCE, "kernel", "fused CPU norm + activation kernel")


def _slope(act: nn.Module) -> float | None:
    """The kernel's negative slope for ``act``: LeakyReLU's, 0 for ReLU, 1 for identity; None if unsupported."""
    if isinstance(act, nn.LeakyReLU):
        return float(act.negative_slope)
    if isinstance(act, nn.ReLU):
        return 0.0
    if isinstance(act, nn.Identity):
        return 1.0
    return None


def _groups(norm: nn.Module, channels: int) -> int | None:
    """The group count for the norms the kernel covers (GroupNorm and LayerNorm: theirs, InstanceNorm without
    running statistics: one per channel), else None."""
    if isinstance(norm, nn.GroupNorm):
        return norm.num_groups
    if isinstance(norm, nn.InstanceNorm2d) and not norm.track_running_stats:
        return channels
    return None


def _hooked(m: nn.Module) -> bool:
    """Whether ``m`` has forward hooks or pre-hooks of its own, or any module-wide ones are registered."""
    return bool(m._forward_hooks or m._forward_pre_hooks or _global_hooks())


def _global_hooks() -> bool:
    """Whether module-wide forward hooks or pre-hooks are registered (register_module_forward_hook)."""
    return bool(_nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks)


def norm_act(x: torch.Tensor, norm: nn.Module, act: nn.Module, inplace: bool = False) -> torch.Tensor | None:
    """act(norm(x)) of a conv output x (N, C, H, W) by the fused kernel, or None where it does not apply (the caller
    then runs torch's ops). ``inplace``: write into x (a temporary nobody else holds), which also spares a fresh
    output buffer's cache misses."""
    if not x.is_cpu or x.dtype != torch.float32 or not is_channels_last_eager(x):
        return None
    groups, slope = _groups(norm, x.shape[1]), _slope(act)
    if groups is None or slope is None:
        return None
    if _hooked(norm) or _hooked(act):  # hooks expect the modules to run
        return None
    weight, bias = norm.weight, norm.bias
    if torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in (weight, bias))):
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
    return kernel.group_norm_leaky(x, weight, bias, groups, norm.eps, slope, inplace)
