"""models/norm_act_cpu.py: the fused GroupNorm / LayerNorm / InstanceNorm + activation CPU kernel for inference."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models.norm_act_cpu as nac
from logcapture import call_logged
from models.common import Conv
from models.norm import make_norm_builder

CL = torch.channels_last


@pytest.fixture(scope="module")
def kernel():
    k = nac.load_kernel()
    if k is None:
        pytest.skip("the fused CPU kernel could not be built here (no C++ compiler / ninja); torch's ops serve")
    return k


def _reference(x: torch.Tensor, groups: int, w: torch.Tensor, b: torch.Tensor, eps: float, slope: float):
    """float64 torch: leaky(group_norm(x))."""
    return F.leaky_relu(F.group_norm(x.double(), groups, w.double(), b.double(), eps), slope)


@pytest.mark.parametrize("n,c,h,w,groups,two_pass", [
    (1, 32, 40, 24, 2, False),   # one image: rows split over the threads
    (3, 32, 17, 9, 2, False),    # whole images per thread
    (4, 24, 6, 5, 3, False),     # 8 channels per group, odd map
    (2, 16, 8, 8, 1, False),     # LayerNorm (one group)
    (5, 20, 7, 3, 20, True),     # InstanceNorm (one channel per group), two-pass
    (1, 5, 300, 2, 5, True),     # IN, one image, more rows than a block
    (3, 12, 1, 1, 4, False),     # 1x1 maps
])
@pytest.mark.parametrize("slope", [0.1, 0.0, 1.0])
def test_matches_float64_torch(kernel, n, c, h, w, groups, two_pass, slope):
    g = torch.Generator().manual_seed(n * 100 + c)
    x = (torch.randn(n, c, h, w, generator=g) * 3 + 0.7).contiguous(memory_format=CL)
    wt, bs = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    ref = _reference(x, groups, wt, bs, 1e-5, slope)
    y = kernel.group_norm_leaky(x, wt, bs, groups, 1e-5, slope, two_pass, False)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=CL) and y.shape == x.shape
    err = float((y.double() - ref).abs().max())
    assert err < 2e-5 * max(1.0, float(ref.abs().max())), err
    x_in = x.clone()
    y_in = kernel.group_norm_leaky(x_in, wt, bs, groups, 1e-5, slope, two_pass, True)
    assert y_in.data_ptr() == x_in.data_ptr() and torch.equal(y_in, y)  # in place: same values, x's memory


def test_instance_norm_two_pass_keeps_flat_maps_precise(kernel):
    """A map whose mean is 50 standard deviations: the two-pass statistics stay at float32 rounding."""
    g = torch.Generator().manual_seed(0)
    x = (50.0 + torch.randn(2, 8, 40, 40, generator=g)).contiguous(memory_format=CL)
    wt, bs = torch.ones(8), torch.zeros(8)
    ref = _reference(x, 8, wt, bs, 1e-5, 0.1)
    err2 = float((kernel.group_norm_leaky(x, wt, bs, 8, 1e-5, 0.1, True, False).double() - ref).abs().max())
    assert err2 < 1e-4, err2


def test_rejects_wrong_input(kernel):
    x = torch.randn(2, 8, 4, 4)  # NCHW
    with pytest.raises(RuntimeError, match="channels-last float32"):
        kernel.group_norm_leaky(x, torch.ones(8), torch.zeros(8), 2, 1e-5, 0.1, False, False)
    with pytest.raises(RuntimeError, match="not divisible"):
        kernel.group_norm_leaky(x.contiguous(memory_format=CL), torch.ones(8), torch.zeros(8), 3, 1e-5, 0.1, False,
                                False)


def _conv(norm: str, act: str = "leakyrelu") -> Conv:
    torch.manual_seed(0)
    m = Conv(8, 32, 3, norm=make_norm_builder(norm), act=act).to(memory_format=CL)
    for p in m.norm.parameters():
        nn.init.uniform_(p, 0.5, 1.5)
    return m


@pytest.mark.parametrize("norm", ["gn:C/16", "ln", "in"])
def test_conv_block_uses_kernel_in_inference_only(kernel, monkeypatch, norm):
    calls = []

    class Counting:
        def group_norm_leaky(self, *a):
            calls.append(a[3:])  # groups, eps, slope, two_pass, inplace
            return kernel.group_norm_leaky(*a)

    monkeypatch.setitem(nac._state, "kernel", Counting())
    m = _conv(norm)
    x = torch.randn(2, 8, 20, 20).contiguous(memory_format=CL)
    with torch.no_grad():
        fused = m(x)
        torch_ops = m.act(m.norm(m.conv(x)))
    assert len(calls) == 1 and calls[0][-2] == (norm == "in")  # IN takes the two-pass statistics
    assert calls[0][-1] is True  # the conv output is written over
    assert fused.is_contiguous(memory_format=CL)
    torch.testing.assert_close(fused, torch_ops, rtol=1e-5, atol=2e-5)
    y = m(x)  # training: gradients needed, torch's ops
    assert len(calls) == 1
    y.sum().backward()
    assert m.norm.weight.grad is not None and torch.isfinite(m.norm.weight.grad).all()


def test_kernel_not_used_where_it_does_not_apply(kernel):
    m = _conv("gn:C/16")
    x = torch.randn(2, 32, 6, 6)
    with torch.no_grad():
        assert nac.norm_act(x, m.norm, m.act) is None  # NCHW
        assert nac.norm_act(x.contiguous(memory_format=CL).bfloat16(), m.norm, m.act) is None
        assert nac.norm_act(x.contiguous(memory_format=CL), m.norm, nn.SiLU()) is None
        assert nac.norm_act(x.contiguous(memory_format=CL), nn.BatchNorm2d(32).eval(), m.act) is None
        assert nac.norm_act(x.contiguous(memory_format=CL), m.norm, m.act) is not None


def test_torch_ops_when_kernel_unavailable(monkeypatch):
    """A failed build (kernel None) leaves every layer on torch's ops, with the same outputs."""
    monkeypatch.setitem(nac._state, "kernel", None)
    m = _conv("gn:C/16").eval()
    x = torch.randn(2, 8, 12, 12).contiguous(memory_format=CL)
    with torch.no_grad():
        assert nac.norm_act(m.conv(x), m.norm, m.act) is None
        torch.testing.assert_close(m(x), m.act(m.norm(m.conv(x))), rtol=0, atol=0)


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    import torch.utils.cpp_extension as ext

    def broken(*a, **k):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(ext, "load", broken)  # what load_kernel imports
    monkeypatch.delitem(nac._state, "kernel", raising=False)
    (first, second), lines = call_logged(lambda: (nac.load_kernel(), nac.load_kernel()))
    assert first is None and second is None
    failed = [ln for ln in lines if "kernel build failed" in ln]
    assert len(failed) == 1 and "Ninja is required" in failed[0]
    monkeypatch.delitem(nac._state, "kernel", raising=False)  # let other tests build or load the real one


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("NORMYOLO_CPU_KERNELS", "0")
    monkeypatch.delitem(nac._state, "kernel", raising=False)
    assert nac.load_kernel() is None
    monkeypatch.delitem(nac._state, "kernel", raising=False)
