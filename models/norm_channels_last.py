"""GroupNorm (and so LN, G = 1, and IN, G = C) that keeps a channels-last input channels-last, forward and backward.

Why: torch's ``native_group_norm`` makes every non-CPU input NCHW-contiguous (``aten/src/ATen/native/group_norm.cpp``
picks ``MemoryFormat::Contiguous`` unless the device is CPU), and its backward does the same with the saved input
and the incoming gradient. In a channels-last CUDA model that is a layout copy on the way in, NCHW output that the
next convolution converts back, and the same again in backward; under float16 autocast GroupNorm is also one of
autocast's float32 ops, so its input is first copied to float32. On an H200 (docs/cuda.md) the GN model
trained at 1.44x BN's step time with torch's kernel.

This path is made of ops that keep the input's layout and dtype: two float32-accumulating reductions over (H, W)
for the statistics, one fused multiply-add for the output (computed in float32, stored in the input's dtype), and a
hand-written backward of three reductions and two fused multiply-adds. The statistics are sum and sum of squares
in float32 (var = E[x^2] - mean^2, clamped at 0), as torch's own channels-last CPU GroupNorm computes them.

It is off by default (``set_group_norm_kernel``): its speed on a GPU has not been measured yet. The norm layers
of models/norm.py call ``use_channels_last_kernel`` to decide.
"""
from __future__ import annotations

import torch

GROUP_NORM_KERNELS = ("torch", "channels-last")
_kernel = "torch"


def set_group_norm_kernel(kind: str) -> None:
    """Choose how GN / LN / IN layers normalise channels-last 4-D input: torch's op or this module's."""
    global _kernel
    if kind not in GROUP_NORM_KERNELS:
        raise ValueError(f"group norm kernel must be one of {GROUP_NORM_KERNELS}, got {kind!r}")
    _kernel = kind


def group_norm_kernel() -> str:
    """The kernel chosen by ``set_group_norm_kernel`` ('torch' unless changed)."""
    return _kernel


def is_channels_last_eager(x: torch.Tensor) -> bool:
    """A channels-last (N, C, H, W) tensor outside tracing and compiling (export and inductor must see torch's ops)."""
    return (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling())


def use_channels_last_kernel(x: torch.Tensor) -> bool:
    """True when ``x`` should go through ``group_norm_channels_last``."""
    return _kernel == "channels-last" and is_channels_last_eager(x)


def _group_sum(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C) -> (N, G): sum over each group's channels."""
    return t.view(t.shape[0], groups, -1).sum(-1)


def _per_channel(t: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, G) -> (N, C, 1, 1): each group's value repeated for its channels, shaped to broadcast over (H, W)."""
    return t.repeat_interleave(channels // t.shape[1], dim=1)[:, :, None, None]


class _GroupNormChannelsLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps):  # noqa: D401
        with torch.autocast(x.device.type, enabled=False):
            n, c, h, w = x.shape
            count = h * w * (c // groups)
            acc = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 input
            s1 = _group_sum(x.sum((2, 3), dtype=acc), groups)
            s2 = _group_sum(torch.linalg.vector_norm(x, 2, dim=(2, 3), dtype=acc).square(), groups)
            mean = s1 / count
            rstd = torch.rsqrt((s2 / count - mean * mean).clamp_(min=0) + eps)
            scale = _per_channel(rstd, c)  # (N, C, 1, 1) in acc
            if weight is not None:
                scale = scale * weight.to(acc)[None, :, None, None]
            shift = -_per_channel(mean, c) * scale
            if bias is not None:
                shift = shift + bias.to(acc)[None, :, None, None]
            y = torch.empty_like(x)  # x's dtype and layout; the float32 result is rounded on store
            torch.addcmul(shift, x, scale, out=y)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.groups = groups
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        groups = ctx.groups
        with torch.autocast(x.device.type, enabled=False):
            n, c, h, w = x.shape
            count = h * w * (c // groups)
            acc = mean.dtype
            zero = torch.zeros(n, c, 1, 1, dtype=acc, device=x.device)
            sum_dy = dy.sum((2, 3), dtype=acc)  # (N, C)
            sum_dy_x = torch.addcmul(zero, dy, x).sum((2, 3))  # products in acc: half x half is exact in float32
            wf = weight.to(acc) if weight is not None else torch.ones(c, dtype=acc, device=x.device)
            ds = _group_sum(sum_dy_x * wf, groups)  # (N, G)
            db = _group_sum(sum_dy * wf, groups)
            c2 = (db * mean - ds) * rstd.pow(3) / count
            c3 = -c2 * mean - db * rstd / count
            rstd_c = _per_channel(rstd, c)  # (N, C, 1, 1)
            dx = None
            if ctx.needs_input_grad[0]:
                part = torch.addcmul(_per_channel(c3, c), x, _per_channel(c2, c))  # in acc
                dx = torch.empty_like(x)
                torch.addcmul(part, dy, rstd_c * wf[None, :, None, None], out=dx)
            dweight = dbias = None
            if weight is not None and ctx.needs_input_grad[1]:
                dweight = ((sum_dy_x - sum_dy * _per_channel(mean, c)[:, :, 0, 0])
                           * rstd_c[:, :, 0, 0]).sum(0).to(weight.dtype)
            if weight is not None and ctx.needs_input_grad[2]:
                dbias = sum_dy.sum(0).to(weight.dtype)
        return dx, dweight, dbias, None, None


def group_norm_channels_last(x: torch.Tensor, groups: int, weight: torch.Tensor | None = None,
                             bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """F.group_norm for (N, C, H, W) input, output in x's dtype and memory format; weight / bias: (C,) or None."""
    if x.shape[1] % groups:
        raise ValueError(f"group_norm_channels_last: {x.shape[1]} channels do not split into {groups} groups")
    return _GroupNormChannelsLast.apply(x, weight, bias, groups, eps)
