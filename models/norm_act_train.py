"""BatchNorm / GroupNorm / LayerNorm / InstanceNorm + leaky ReLU (or ReLU, identity) as one CPU kernel for training.

torch trains a Conv -> Norm -> LeakyReLU block's norm and activation as separate ops, each a full pass or two over
the map, forward and backward. On a CPU those passes are bound by memory bandwidth, not arithmetic, and on a machine
with little of it they are a large part of the step (docs/speed.md). ``norm_act_train`` is the Conv block's entry
in training; it hands each norm to its kernel:

- ``nn.BatchNorm2d`` in training mode: models/bn_act_train.py, which reproduces torch's ops bit for bit (outputs,
  gradients, running statistics), so the kernel changes a BN run's speed and none of its numbers;
- the project's GroupNorm2d / LayerNorm2d / InstanceNorm2d (without running statistics) on torch's GroupNorm kernel
  setting: ``csrc/norm_act_train_cpu.cpp`` here, the norm and the activation in one forward (a statistics read, then
  one read and one write) and one backward (one read of the output gradient and the input for both reductions, the
  activation's mask recomputed from the input, then one read each and one write of the input gradient): 8 passes
  over the map instead of torch's 13. Statistics and reductions accumulate in double in a fixed order, so they do
  not depend on the thread count; outputs and gradients equal torch's to float32 rounding
  (tests/test_norm_act_train.py, float64 references).

Both serve when the conv output is a channels-last float32 CPU tensor outside tracing and compiling, the activation
is LeakyReLU, ReLU or identity, and neither module has forward hooks. Everything else (bfloat16 autocast, CUDA,
evaluation, SyncBN, export) runs torch's ops. The kernels are built on first use like models/norm_act_cpu.py's
(models/cpu_build.py: same cache, same ``NORMYOLO_CPU_KERNELS=0`` switch, torch's ops if the build fails).
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn as nn

from models.bn_act_train import bn_act_train
from models.cpu_build import F64, I64, PTR, bind, call
from models.norm import GroupNorm2d, InstanceNorm2d
from models.norm_act_cpu import _hooked, _slope, check_map, check_params, gradient_rows, load_source
from models.norm_channels_last import group_norm_kernel, is_channels_last_eager

SOURCE = Path(__file__).resolve().parent / "csrc" / "norm_act_train_cpu.cpp"
_enabled = [True]  # set_train_kernel's switch


def set_train_kernel(enabled: bool) -> None:
    """Use the training kernel where it applies (default) or torch's ops everywhere, for this process: the
    benchmarks' on / off comparison (``benchmarks/train_speed.py --cpu-kernels both``)."""
    _enabled[0] = bool(enabled)


class TrainKernel:
    """csrc/norm_act_train_cpu.cpp's forward and backward over ctypes."""

    def __init__(self, lib: ctypes.CDLL):
        self._fwd = bind(lib.normyolo_norm_act_forward, PTR, PTR, PTR, I64, I64, I64, I64, F64, F64, I64,
                         *(PTR,) * 5)
        self._bwd = bind(lib.normyolo_norm_act_backward, PTR, I64, *(PTR,) * 6, I64, I64, I64, I64, F64, I64,
                         *(PTR,) * 3)

    def norm_act_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                         slope: float) -> tuple[torch.Tensor, ...]:
        """x (N, C, H, W) channels-last float32; groups: GroupNorm's count (>= 1, dividing C). Returns (y, a, b, mu,
        rstd): y = leaky(x * a + b) channels-last; a, b, mu, rstd (N, C) per image and channel (scale, shift, the
        statistics' mean and 1 / std)."""
        n, c, hw = check_map(x, "norm_act_forward")
        if groups < 1 or c % groups:
            raise RuntimeError(f"norm_act_forward: bad group count {groups}")
        check_params(weight, bias, c, "norm_act_forward")
        if not (hw > 0 and n > 0):
            raise RuntimeError("norm_act_forward: empty map")
        y = torch.empty_like(x, memory_format=torch.channels_last)
        per = x.new_empty((4, n, c))  # a, b, mu, rstd (float32, CPU as x) in one allocation: ~60 calls a step
        p, q = per.data_ptr(), 4 * n * c
        call(self._fwd, x.data_ptr(), weight.data_ptr(), bias.data_ptr(), n, c, hw, groups, eps, slope,
             torch.get_num_threads(), y.data_ptr(), p, p + q, p + 2 * q, p + 3 * q)
        return (y, *per.unbind(0))

    def norm_act_backward(self, g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor,
                          b: torch.Tensor, mu: torch.Tensor, rstd: torch.Tensor, groups: int, slope: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Backward of norm_act_forward for the gradient g of y: (dx channels-last, dweight (C,), dbias (C,)). g is
        read in place when its pixels are rows of C floats at a common stride (channels-last, or a channel slice of
        a wider channels-last tensor, as a concatenation's backward hands on), else copied."""
        n, c, hw = check_map(x, "norm_act_backward")
        g, gs = gradient_rows(g, x, "norm_act_backward")
        dx = torch.empty_like(x, memory_format=torch.channels_last)
        dw, db = x.new_empty(c), x.new_empty(c)  # separate: they become the parameters' .grad
        call(self._bwd, g.data_ptr(), gs, x.data_ptr(), weight.data_ptr(), a.data_ptr(), b.data_ptr(),
             mu.data_ptr(), rstd.data_ptr(), n, c, hw, groups, slope, torch.get_num_threads(), dx.data_ptr(),
             dw.data_ptr(), db.data_ptr())
        return dx, dw, db


def load_train_kernel() -> TrainKernel | None:
    """The training kernel, building it on the first call; None if disabled or the build failed."""
    return load_source(SOURCE, "train_kernel", "fused CPU norm + activation training kernel", TrainKernel)


class _NormActTrain(torch.autograd.Function):
    """leaky(group_norm(x)) with the kernel's forward and backward; groups: GroupNorm's count."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, slope, kernel):  # noqa: D401
        y, a, b, mu, rstd = kernel.norm_act_forward(x, weight, bias, groups, eps, slope)
        ctx.save_for_backward(x, weight, a, b, mu, rstd)
        ctx.groups, ctx.slope, ctx.kernel = groups, slope, kernel
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, a, b, mu, rstd = ctx.saved_tensors
        dx, dw, db = ctx.kernel.norm_act_backward(dy, x, weight, a, b, mu, rstd, ctx.groups, ctx.slope)
        need = ctx.needs_input_grad
        return (dx if need[0] else None), (dw if need[1] else None), (db if need[2] else None), *(None,) * 4


def _groups(norm: nn.Module, channels: int) -> int | None:
    """The kernel's group count for ``norm`` in training (0: BatchNorm, models/bn_act_train.py's kernel), or None
    where none applies."""
    if type(norm) is nn.BatchNorm2d:  # exactly: SyncBatchNorm and other subclasses have their own forward
        return 0 if norm.training or norm.running_mean is None else None
    if group_norm_kernel() != "torch":  # models/norm_channels_last.py's kernel was asked for
        return None
    if isinstance(norm, GroupNorm2d):
        return norm.num_groups
    if isinstance(norm, InstanceNorm2d) and not norm.track_running_stats:
        return channels
    return None


def norm_act_train(x: torch.Tensor, norm: nn.Module, act: nn.Module) -> torch.Tensor | None:
    """act(norm(x)) of a conv output x (N, C, H, W) in training by the fused kernel, or None where it does not
    apply (the caller then runs torch's ops). Records the autograd graph; updates BatchNorm's running statistics."""
    if not (_enabled[0] and torch.is_grad_enabled() and x.is_cpu and x.dtype == torch.float32
            and is_channels_last_eager(x)):
        return None
    groups, slope = _groups(norm, x.shape[1]), _slope(act)
    if groups is None or slope is None or _hooked(norm) or _hooked(act):
        return None
    weight, bias = norm.weight, norm.bias
    if not (x.requires_grad or any(p is not None and p.requires_grad for p in (weight, bias))):
        return None  # nothing to differentiate: the inference paths serve
    c = x.shape[1]
    if weight is None or bias is None:
        weight, bias = torch.ones(c), torch.zeros(c)
    if weight.dtype != torch.float32 or bias.dtype != torch.float32:
        return None
    if groups == 0:  # BatchNorm: its own kernel, bit-equal to torch's ops
        return bn_act_train(x, norm, weight, bias, slope)
    kernel = load_train_kernel()
    if kernel is None:
        return None
    return _NormActTrain.apply(x, weight.contiguous(), bias.contiguous(), groups, float(norm.eps), slope, kernel)
