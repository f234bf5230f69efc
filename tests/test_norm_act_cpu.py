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


@pytest.fixture(params=[1, 4], ids=["1-thread", "4-threads"])
def threads(request):
    """Thread counts that send one image (N < threads) and several images per thread down the kernel's two paths."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def kernel():
    k = nac.load_kernel()
    if k is None:
        pytest.skip("the fused CPU kernel could not be built here (no C++ compiler); torch's ops serve")
    return k


def _reference(x: torch.Tensor, groups: int, w: torch.Tensor, b: torch.Tensor, eps: float, slope: float):
    """float64 torch: leaky(group_norm(x))."""
    return F.leaky_relu(F.group_norm(x.double(), groups, w.double(), b.double(), eps), slope)


@pytest.mark.parametrize("n,c,h,w,groups", [
    (1, 32, 40, 24, 2),   # one image: rows split over the threads (with 4 threads)
    (3, 32, 17, 9, 2),    # three images: split rows one image after another (4 threads), whole images (1 thread)
    (4, 24, 5, 5, 3),     # 8 channels per group, strips of 2 rows and a row left over
    (2, 16, 8, 8, 1),     # LayerNorm (one group)
    (5, 20, 7, 3, 20),    # InstanceNorm (one channel per group)
    (1, 5, 300, 2, 5),    # IN, one image, more rows than a block
    (3, 96, 5, 7, 6),     # rows longer than a strip
    (3, 12, 1, 1, 4),     # 1x1 maps
])
@pytest.mark.parametrize("slope", [0.1, 0.0, 1.0])
def test_matches_float64_torch(kernel, threads, n, c, h, w, groups, slope):
    g = torch.Generator().manual_seed(n * 100 + c)
    x = (torch.randn(n, c, h, w, generator=g) * 3 + 0.7).contiguous(memory_format=CL)
    wt, bs = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    ref = _reference(x, groups, wt, bs, 1e-5, slope)
    y = kernel.group_norm_leaky(x, wt, bs, groups, 1e-5, slope, False)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=CL) and y.shape == x.shape
    err = float((y.double() - ref).abs().max())
    assert err < 2e-5 * max(1.0, float(ref.abs().max())), err
    x_in = x.clone()
    y_in = kernel.group_norm_leaky(x_in, wt, bs, groups, 1e-5, slope, True)
    assert y_in.data_ptr() == x_in.data_ptr() and torch.equal(y_in, y)  # in place: same values, x's memory


@pytest.mark.parametrize("n,groups", [(2, 8), (2, 2), (1, 1), (1, 8)])
def test_flat_maps_stay_precise(kernel, threads, n, groups):
    """Maps whose mean is 50 standard deviations from zero: the shifted one-pass statistics stay at float32 rounding
    (torch's own channels-last GroupNorm, E[x^2] - mean^2 in float32, is about 1e-2 off here)."""
    g = torch.Generator().manual_seed(groups)
    x = (50.0 + torch.randn(n, 8, 40, 40, generator=g)).contiguous(memory_format=CL)
    wt, bs = torch.ones(8), torch.zeros(8)
    ref = _reference(x, groups, wt, bs, 1e-5, 0.1)
    err = float((kernel.group_norm_leaky(x, wt, bs, groups, 1e-5, 0.1, False).double() - ref).abs().max())
    assert err < 1e-4, err


def test_rejects_wrong_input(kernel):
    x = torch.randn(2, 8, 4, 4)  # NCHW
    with pytest.raises(RuntimeError, match="channels-last float32"):
        kernel.group_norm_leaky(x, torch.ones(8), torch.zeros(8), 2, 1e-5, 0.1, False)
    with pytest.raises(RuntimeError, match="not divisible"):
        kernel.group_norm_leaky(x.contiguous(memory_format=CL), torch.ones(8), torch.zeros(8), 3, 1e-5, 0.1, False)


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
            calls.append(a[3:])  # groups, eps, slope, inplace
            return kernel.group_norm_leaky(*a)

    monkeypatch.setitem(nac._state, "kernel", Counting())
    m = _conv(norm)
    x = torch.randn(2, 8, 20, 20).contiguous(memory_format=CL)
    with torch.no_grad():
        fused = m(x)
        torch_ops = m.act(m.norm(m.conv(x)))
    assert len(calls) == 1 and calls[0][0] == {"gn:C/16": 2, "ln": 1, "in": 32}[norm]
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
    """A failed build (kernel None) leaves every layer on torch's ops: the block equals the functional ops bit for
    bit."""
    monkeypatch.setitem(nac._state, "kernel", None)
    m = _conv("gn:C/16").eval()
    x = torch.randn(2, 8, 12, 12).contiguous(memory_format=CL)
    with torch.no_grad():
        assert nac.norm_act(m.conv(x), m.norm, m.act) is None
        ref = F.leaky_relu(F.group_norm(m.conv(x), 2, m.norm.weight, m.norm.bias, m.norm.eps), 0.1)
        torch.testing.assert_close(m(x), ref, rtol=0, atol=0)


def test_hooks_keep_torch_ops_and_the_conv_output(kernel):
    """A hook on the norm sees it run (torch's ops); a hook that keeps the conv output gets it unchanged."""
    m = _conv("gn:C/16").eval()
    x = torch.randn(2, 8, 12, 12).contiguous(memory_format=CL)
    seen, kept = [], []
    h = m.norm.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    with torch.no_grad():
        m(x)
    h.remove()
    assert len(seen) == 1
    h = m.conv.register_forward_hook(lambda mod, inp, out: kept.append(out))
    with torch.no_grad():
        y = m(x)
        conv_out = m.conv.__class__.forward(m.conv, x)
    h.remove()
    torch.testing.assert_close(kept[0], conv_out, rtol=0, atol=0)  # not overwritten by the in-place kernel
    assert y.data_ptr() != kept[0].data_ptr()


def test_trainable_bias_alone_keeps_autograd(kernel):
    """Frozen conv and weight, trainable bias (partial freezing): torch's ops run and the bias gets its gradient."""
    m = _conv("gn:C/16")
    for p in (*m.conv.parameters(), m.norm.weight):
        p.requires_grad_(False)
    m(torch.randn(2, 8, 12, 12).contiguous(memory_format=CL)).sum().backward()
    assert m.norm.bias.grad is not None and m.norm.bias.grad.abs().sum() > 0


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("NORMYOLO_CPU_KERNELS", "0")
    monkeypatch.setattr(nac, "_state", {})  # this process's loaded kernels, restored for the other tests
    assert nac.load_kernel() is None and nac._state == {"kernel": None}
