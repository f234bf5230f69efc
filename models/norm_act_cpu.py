"""GroupNorm / LayerNorm / InstanceNorm + leaky ReLU (or ReLU, identity) as one CPU kernel for inference.

BatchNorm folds into the convolution for inference; GroupNorm, LayerNorm and InstanceNorm cannot, and torch runs
each of them as two ops: the norm (a statistics pass and a scale-and-shift pass) and then the activation (one more
read and write of the map). ``csrc/norm_act_cpu.cpp`` does norm + activation in one kernel, one image at a time
while it is in cache (``benchmarks/inference.py`` measures the gain). It serves ``models.common.Conv`` when nothing
needs gradients and the map is a channels-last float32 CPU tensor outside tracing and compiling; every other case
(training, bfloat16, CUDA, export, SiLU, modules with forward hooks) runs torch's ops as before.

The kernel is compiled the first time an eligible layer runs (about 2 s; a C++ compiler with OpenMP is needed) and
cached, keyed by its source's text, the compiler, the flags and the CPU's instruction-set flags
(``models/cpu_build.py``). If the build fails, one warning says why and the process keeps torch's ops.
``NORMYOLO_CPU_KERNELS=0`` turns it off (read at the first eligible call).

Statistics take one pass: each channel is summed shifted by its value at the image's central pixel and the channels
combine into their group in double, so a nearly flat map (mean far from zero against its spread) keeps its digits,
where torch's channels-last GroupNorm (E[x^2] - mean^2 in float32) loses them. Outputs match torch's ops to float32
rounding (tests/test_norm_act_cpu.py).
"""
from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.modules import module as _nn_module

from models.cpu_build import F64, I64, PTR, bind, call, load_library
from models.norm_channels_last import is_channels_last_eager
from utils.general import LOGGER

SOURCE = Path(__file__).resolve().parent / "csrc" / "norm_act_cpu.cpp"
_state: dict[str, Any] = {}  # "kernel": the loaded kernel, or None once disabled / failed


def check_map(x: torch.Tensor, what: str) -> tuple[int, int, int]:
    """(N, C, H*W) of a channels-last float32 CPU (N, C, H, W) tensor; RuntimeError naming ``what`` otherwise."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last)):
        raise RuntimeError(f"{what}: expected a channels-last float32 CPU (N, C, H, W) tensor")
    return x.shape[0], x.shape[1], x.shape[2] * x.shape[3]


def gradient_rows(g: torch.Tensor, x: torch.Tensor, what: str) -> tuple[torch.Tensor, int]:
    """The gradient g of a kernel's channels-last output shaped like x, as (g, row stride in floats): g itself when
    its pixels are rows of C floats at a common stride (channels-last, or a channel slice of a wider channels-last
    tensor, as a concatenation's backward hands on), else a channels-last copy. RuntimeError naming ``what`` if g
    does not match x."""
    if g.shape != x.shape or g.dtype != torch.float32 or g.device != x.device:
        raise RuntimeError(f"{what}: gradient mismatch")
    c, gs = x.shape[1], g.stride(3)
    if not (g.stride(1) == 1 and gs >= c and g.stride(2) == x.shape[3] * gs
            and g.stride(0) == x.shape[2] * x.shape[3] * gs):
        return g.contiguous(memory_format=torch.channels_last), c
    return g, gs


def check_params(weight: torch.Tensor, bias: torch.Tensor, c: int, what: str) -> None:
    """RuntimeError unless weight and bias are contiguous float32 tensors of ``c`` values."""
    if not (weight.numel() == c and bias.numel() == c and weight.is_contiguous() and bias.is_contiguous()
            and weight.dtype == torch.float32 and bias.dtype == torch.float32):
        raise RuntimeError(f"{what}: expected contiguous float32 weight and bias of {c} values")


class InferenceKernel:
    """csrc/norm_act_cpu.cpp's entry point over ctypes."""

    def __init__(self, lib: ctypes.CDLL):
        self._fn = bind(lib.normyolo_group_norm_leaky, PTR, PTR, PTR, PTR, I64, I64, I64, I64, F64, F64, I64)

    def group_norm_leaky(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                         slope: float, inplace: bool) -> torch.Tensor:
        """leaky(group_norm(x)) of a channels-last float32 (N, C, H, W) x, channels-last; written into x if
        ``inplace`` (an image's statistics are complete before any of its values is overwritten)."""
        n, c, hw = check_map(x, "group_norm_leaky")
        if groups <= 0 or c % groups:
            raise RuntimeError(f"group_norm_leaky: channels {c} not divisible by groups {groups}")
        check_params(weight, bias, c, "group_norm_leaky")
        y = x if inplace else torch.empty_like(x, memory_format=torch.channels_last)
        if x.numel():
            call(self._fn, x.data_ptr(), y.data_ptr(), weight.data_ptr(), bias.data_ptr(), n, c, hw, groups, eps,
                 slope, torch.get_num_threads())
        return y


def _reason(e: Exception) -> str:
    """One line of a build error: the compiler's first 'error:' line if there is one, else the last line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    return (errors or lines or [repr(e)])[0 if errors else -1]


def load_source(source: Path, key: str, what: str, wrap: Callable[[ctypes.CDLL], Any]) -> Any:
    """``wrap`` of the library built from ``source`` (cached in ``_state[key]``), building it on the first call;
    None if disabled (NORMYOLO_CPU_KERNELS=0) or the build failed (one warning naming ``what``)."""
    if key in _state:
        return _state[key]
    kernel = None
    if os.environ.get("NORMYOLO_CPU_KERNELS", "1") != "0":
        try:
            kernel = wrap(load_library(source, what))
        except Exception as e:  # no compiler, or a platform the flags do not suit: torch's ops instead
            LOGGER.warning(f"{source.stem}: kernel build failed, using torch's ops ({type(e).__name__}: "
                           f"{_reason(e)})")
    _state[key] = kernel
    return kernel


def load_kernel() -> InferenceKernel | None:
    """The inference kernel, building it on the first call; None if disabled or the build failed."""
    return load_source(SOURCE, "kernel", "fused CPU norm + activation kernel", InferenceKernel)


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
