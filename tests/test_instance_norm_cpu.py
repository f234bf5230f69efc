"""models/instance_norm_cpu.py: every kernel combination equals torch's instance_norm and keeps channels-last."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.instance_norm_cpu import instance_norm_cpu, kernel_path

# (N, C, H, W): both kernels, small and large maps (the NCHW path also above 1,024 px, the per-image one below)
SHAPES = [(3, 5, 7, 9), (2, 160, 15, 14), (2, 3, 33, 32), (2, 32, 33, 32)]


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def test_shapes_cover_both_kernels() -> None:
    assert [kernel_path(*s[1:]) for s in SHAPES] == ["nchw", "per-image", "nchw", "per-image"]


@pytest.mark.parametrize("shape", [(2, 16, 40, 40), (2, 32, 40, 40), (1, 16, 160, 160)])
def test_float32_keeps_torch_accuracy_when_the_mean_dwarfs_the_spread(shape: tuple[int, ...]) -> None:
    """A nearly flat map (mean 50x its standard deviation, as after the stem of a flat image). torch's channels-last
    GroupNorm, whose float32 variance is E[x^2] - mean^2, is 1.2e-2 to 2.5e-2 off here; this path stays within
    1e-3 (BatchNorm's channels-last kernel, which the per-image path and every BN model use, is ~1e-4 off, torch's
    NCHW instance_norm ~3e-6), outputs and input gradients."""
    torch.manual_seed(3)
    x = _channels_last(torch.randn(*shape) + 50).requires_grad_()
    y = instance_norm_cpu(x)
    x64 = x.detach().double().requires_grad_()
    ref = F.instance_norm(x64, eps=1e-5)
    assert float((y.double() - ref).abs().max()) < 1e-3
    g = torch.randn(*shape)
    (gx,) = torch.autograd.grad(y, x, g)
    (gr,) = torch.autograd.grad(ref, x64, g.double())
    assert float((gx.double() - gr).abs().max() / gr.abs().max()) < 1e-4


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_float64_equals_torch_with_gradients(shape: tuple[int, ...], affine: bool) -> None:
    torch.manual_seed(0)
    x = _channels_last(torch.randn(*shape, dtype=torch.float64) * 3 + 1).requires_grad_()
    params = [torch.rand(shape[1], dtype=torch.float64) + 0.5, torch.randn(shape[1], dtype=torch.float64)]
    params = [p.requires_grad_() for p in params] if affine else [None, None]
    y = instance_norm_cpu(x, *params)
    ref = F.instance_norm(x, weight=params[0], bias=params[1], eps=1e-5)
    assert y.dtype == torch.float64 and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)
    g = torch.randn(*shape, dtype=torch.float64)
    inputs = [x] + [p for p in params if p is not None]
    got = torch.autograd.grad((y * g).sum(), inputs)
    want = torch.autograd.grad((ref * g).sum(), inputs)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    assert torch.autograd.gradcheck(lambda *t: instance_norm_cpu(*t), tuple(inputs), fast_mode=True)


@pytest.mark.parametrize("shape", SHAPES)
def test_bfloat16_keeps_dtype_and_matches_float32(shape: tuple[int, ...]) -> None:
    """bfloat16 input (as under CPU autocast) with float32 weights: output and gradient stay bfloat16 and
    channels-last, within bfloat16 rounding of the float32 result for the same (rounded) input."""
    torch.manual_seed(1)
    x = _channels_last(torch.randn(*shape) * 3 + 1).to(torch.bfloat16)
    weight = (torch.rand(shape[1]) + 0.5).requires_grad_()
    bias = torch.randn(shape[1]).requires_grad_()
    xa = x.clone().requires_grad_()
    y = instance_norm_cpu(xa, weight, bias)
    g = torch.randn(*shape)
    (y.float() * g).sum().backward()
    xr = x.float().requires_grad_()
    w2, b2 = weight.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    ref = F.instance_norm(xr, weight=w2, bias=b2, eps=1e-5)
    (ref * g).sum().backward()
    assert y.dtype == xa.grad.dtype == torch.bfloat16
    assert y.is_contiguous(memory_format=torch.channels_last) and xa.grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.float(), ref, atol=0.04, rtol=0.01)  # outputs up to ~4: bfloat16 ulp 0.016-0.03
    torch.testing.assert_close(xa.grad.float(), xr.grad, atol=0.05, rtol=0.02)
    torch.testing.assert_close(weight.grad, w2.grad, atol=0.02 * float(w2.grad.abs().max()), rtol=0)
    torch.testing.assert_close(bias.grad, b2.grad, atol=0.02 * float(b2.grad.abs().max()), rtol=0)


def test_no_grad_path_equals_autograd_path() -> None:
    torch.manual_seed(2)
    for shape in SHAPES:
        x = _channels_last(torch.randn(*shape))
        weight, bias = torch.rand(shape[1]).requires_grad_(), torch.randn(shape[1]).requires_grad_()
        with torch.no_grad():
            fast = instance_norm_cpu(x, weight, bias)
        assert torch.equal(fast, instance_norm_cpu(x, weight, bias).detach())


@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_bfloat16_large_maps_fall_back_when_the_mean_dwarfs_the_spread(offset: float) -> None:
    """bfloat16 maps of 1,024 pixels and more start with torch's channels-last GroupNorm; at a mean of 50 standard
    deviations its float32 E[x^2] - mean^2 variance is 0.12 off (8x bfloat16's rounding of these outputs), so the
    layer recomputes per image and stays at bfloat16's rounding, as at offset 0."""
    torch.manual_seed(4)
    x = _channels_last(torch.randn(1, 16, 160, 160) + offset).to(torch.bfloat16)
    ref = F.instance_norm(x.double(), eps=1e-5)
    assert float((instance_norm_cpu(x).double() - ref).abs().max()) < 0.03  # outputs up to ~4: ulp 0.016
