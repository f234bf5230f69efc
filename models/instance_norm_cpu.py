"""InstanceNorm of channels-last CPU tensors from torch's own kernels, keeping the layout where that is faster.

torch's ``instance_norm`` copies channels-last input to NCHW and returns NCHW, which the next channels-last
convolution copies back (31 % of the n model's CPU training step: ``benchmarks/profile_train.py --norm in``).
InstanceNorm is also BatchNorm of one image at a time (one image's batch statistics are its instance statistics)
and GroupNorm with one channel per group. Per-layer timings of the n model's shapes
(``benchmarks/instance_norm_kernels.py``: batch 16, bfloat16 and float32, 2 threads) pick, for forward and backward:

- images of at least ``PER_IMAGE_MIN_SIZE`` values (C x H x W): BatchNorm's kernels one image at a time, written
  into one output (the backward uses the forward's per-image mean and 1/std);
- smaller images, where each call's fixed cost dominates: GroupNorm through NCHW and back (the backward reuses the
  forward's NCHW copy of the input).

torch's channels-last GroupNorm is the fastest forward on maps of ``CL_MIN_HW`` pixels and more, but it computes
the variance as E[x^2] - mean^2 in float32. Where an image's mean is large against its spread (a nearly flat image
after the stem convolution) that loses digits: at a mean of 50 standard deviations its float32 output is 1e-2 off,
BatchNorm's channels-last kernel 1e-4 (tests/test_instance_norm_cpu.py). So it serves bfloat16 input only, whose
own rounding is larger, and only while no channel's mean exceeds ``CL_MAX_MEAN_OVER_STD`` standard deviations;
otherwise the forward is recomputed per image. Its backward is 10-20x slower than the others in bfloat16: unused.

Outputs and gradients keep the input's dtype and layout; mean and 1/std have the weight's dtype (float32 weights
give float32 statistics, also for bfloat16 input).
"""
from __future__ import annotations

import torch

PER_IMAGE_MIN_SIZE = 32768
# bfloat16 forward on maps of CL_MIN_HW pixels and more: torch's channels-last GroupNorm, kept only while no image's
# channel has a mean beyond CL_MAX_MEAN_OVER_STD standard deviations (else recomputed per image)
CL_MIN_HW = 1024
CL_MAX_MEAN_OVER_STD = 8.0
_CL = torch.channels_last
_BN_BACKWARD_OUT = torch.ops.aten.native_batch_norm_backward.out
_ALL = [True, True, True]


def kernel_path(c: int, h: int, w: int) -> str:
    """Which kernels a (N, c, h, w) input takes, forward and backward: 'per-image' or 'nchw'."""
    return "per-image" if c * h * w >= PER_IMAGE_MIN_SIZE else "nchw"


def forward_per_image(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchNorm one image at a time, into one output: (N, C, H, W) channels-last -> (y like x, mean, rstd (N, C))."""
    n, c = x.shape[:2]
    y = torch.empty_like(x)
    mean, rstd = torch.empty(n, c, dtype=weight.dtype), torch.empty(n, c, dtype=weight.dtype)
    for xi, yi, mi, ri in zip(x.split(1), y.split(1), mean.unbind(0), rstd.unbind(0)):
        torch.native_batch_norm(xi, weight, bias, None, None, True, 0.0, eps, out=(yi, mi, ri))
    return y, mean, rstd


def forward_nchw(xc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupNorm, one channel per group, of the NCHW copy xc -> (y channels-last, mean, rstd (N, C))."""
    n, c, h, w = xc.shape
    y, mean, rstd = torch.native_group_norm(xc, weight, bias, n, c, h * w, c, eps)
    return y.contiguous(memory_format=_CL), mean, rstd


def forward_channels_last(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch's channels-last GroupNorm, one channel per group (float32 E[x^2] - mean^2 variance: see above)."""
    n, c, h, w = x.shape
    return torch.native_group_norm(x, weight, bias, n, c, h * w, c, eps)


def backward_per_image(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                       rstd: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchNorm's backward one image at a time from the per-image mean / rstd (N, C): (dx like x, dweight,
    dbias (C,))."""
    n, c = x.shape[:2]
    dy = dy.contiguous(memory_format=_CL)
    dx = torch.empty_like(x)
    dw, db = torch.empty(n, c, dtype=weight.dtype), torch.empty(n, c, dtype=weight.dtype)
    per_image = zip(dy.split(1), x.split(1), mean.unbind(0), rstd.unbind(0), dx.split(1), dw.unbind(0), db.unbind(0))
    for dyi, xi, mi, ri, dxi, dwi, dbi in per_image:  # out= fills all three outputs (a masked one would be resized)
        _BN_BACKWARD_OUT(dyi, xi, weight, None, None, mi, ri, True, eps, _ALL, out0=dxi, out1=dwi, out2=dbi)
    return dx, dw.sum(0), db.sum(0)


def backward_nchw(dy: torch.Tensor, xc: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                  mask: list[bool]) -> tuple[torch.Tensor | None, ...]:
    """GroupNorm's NCHW backward from the input's NCHW copy xc: (dx channels-last, dweight, dbias), None where
    ``mask`` is False."""
    n, c, h, w = xc.shape
    dx, dw, db = torch.ops.aten.native_group_norm_backward(dy.contiguous(), xc.contiguous(), mean, rstd, weight,
                                                           n, c, h * w, c, mask)
    return (dx.contiguous(memory_format=_CL) if dx is not None else None), dw, db


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
             eps: float) -> tuple[torch.Tensor, ...]:
    """(N, C, H, W) channels-last -> (output like x, mean (N, C), rstd (N, C), x as the backward wants it: the NCHW
    copy on the NCHW path, whose backward is also NCHW, so that it is not made twice)."""
    c, h, w = x.shape[1:]
    if x.dtype == torch.bfloat16 and h * w >= CL_MIN_HW:
        y, mean, rstd = forward_channels_last(x, weight, bias, eps)
        if float((mean * rstd).abs().max()) <= CL_MAX_MEAN_OVER_STD:
            return y, mean, rstd, x
    if kernel_path(c, h, w) == "per-image":
        return (*forward_per_image(x, weight, bias, eps), x)
    xc = x.contiguous()
    return (*forward_nchw(xc, weight, bias, eps), xc)


def _backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
              eps: float, mask: list[bool]) -> tuple[torch.Tensor | None, ...]:
    """Gradients of x (N, C, H, W), weight (C,) and bias (C,) for the outputs ``mask`` asks for; x is the forward's
    channels-last input, or its NCHW copy where the backward path is NCHW."""
    if kernel_path(*x.shape[1:]) == "nchw":
        return backward_nchw(dy, x, weight, mean, rstd, mask)
    dx, dw, db = backward_per_image(dy, x, weight, mean, rstd, eps)
    return (dx if mask[0] else None), (dw if mask[1] else None), (db if mask[2] else None)


class _InstanceNormCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):  # noqa: D401
        y, mean, rstd, x_saved = _forward(x, weight, bias, eps)
        ctx.save_for_backward(x_saved, weight, mean, rstd)
        ctx.eps = eps
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # out= kernels: no double backward (torch's own op has one)
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        dx, dw, db = _backward(dy, x, weight, mean, rstd, ctx.eps, mask)
        return dx, dw, db, None


def instance_norm_cpu(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                      eps: float = 1e-5) -> torch.Tensor:
    """F.instance_norm (no running statistics) of a channels-last CPU (N, C, H, W) tensor; output keeps x's dtype
    and channels-last layout. weight / bias: (C,) or None."""
    if weight is None or bias is None:  # ones / zeros in float32 (float64 for float64 x), as the statistics' dtype
        acc = torch.promote_types(x.dtype, torch.float32)
        weight = weight if weight is not None else torch.ones(x.shape[1], dtype=acc)
        bias = bias if bias is not None else torch.zeros(x.shape[1], dtype=acc)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return _InstanceNormCPU.apply(x, weight, bias, eps)
    return _forward(x, weight, bias, eps)[0]
