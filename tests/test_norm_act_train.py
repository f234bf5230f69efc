"""models/norm_act_train.py: GN / LN / IN + activation as one CPU kernel in training, forward and backward (BN:
tests/test_bn_act_train.py)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models.bn_act_train as bat
import models.norm_act_cpu as nac
import models.norm_act_train as nat
from models.common import Conv
from models.norm import make_norm_builder
from models.norm_channels_last import set_group_norm_kernel

CL = torch.channels_last


@pytest.fixture(scope="module")
def kernel():
    k = nat.load_train_kernel()
    if k is None:
        pytest.skip("the fused CPU training kernel could not be built here (no C++ compiler)")
    return k


@pytest.fixture(params=[1, 3], ids=["1-thread", "3-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _reference(x, w, b, groups, eps, slope):
    """torch's ops in whatever dtype x has: leaky(group_norm(x))."""
    return F.leaky_relu(F.group_norm(x, groups, w, b, eps), slope)


def _grads(fn, x, w, b, dy):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b)
    return (y.detach(), *torch.autograd.grad(y, (x, w, b), dy))


@pytest.mark.parametrize("n,c,h,w,groups", [
    (16, 16, 20, 20, 4),   # GN, 16 channels: strips of 4 rows
    (4, 32, 13, 7, 8),     # GN, rows left over after the strips
    (1, 96, 5, 5, 6),      # GN, one image, rows longer than a strip
    (2, 8, 50, 50, 2),     # GN, images of more than one chunk (2,500 pixels)
    (3, 32, 9, 9, 2),      # GN, 16 channels per group
    (2, 24, 47, 47, 3),    # GN, 8 channels per group, more than one chunk per image
    (2, 16, 8, 8, 1),      # LN
    (5, 20, 7, 3, 20),     # IN
    (3, 12, 1, 1, 4),      # 1x1 maps
])
@pytest.mark.parametrize("slope", [0.1, 0.0, 1.0])
def test_forward_and_backward_match_float64_torch(kernel, threads, n, c, h, w, groups, slope):
    g = torch.Generator().manual_seed(n * 100 + c + groups)
    x = (torch.randn(n, c, h, w, generator=g) * 3 + 0.7).contiguous(memory_format=CL)
    wt, bs = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    dy = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=CL)
    ref = _grads(lambda *a: _reference(*a, groups, 1e-3, slope), x.double(), wt.double(), bs.double(), dy.double())
    got = _grads(lambda x_, w_, b_: nat._NormActTrain.apply(x_, w_, b_, groups, 1e-3, slope, kernel),
                 x, wt, bs, dy)
    assert got[0].is_contiguous(memory_format=CL) and got[1].is_contiguous(memory_format=CL)
    for name, a, r in zip(("y", "dx", "dweight", "dbias"), got, ref):
        assert a.dtype == torch.float32 and a.shape == r.shape
        err = float((a.double() - r).abs().max())
        assert err <= 2e-5 * max(1.0, float(r.abs().max())), (name, err)


def test_flat_maps_keep_their_digits(kernel):
    """Mean 50 standard deviations from zero (a nearly flat map): the shifted statistics stay within float32
    rounding of float64, forward and backward."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 16, 30, 30, generator=g) * 0.1 + 5.0).contiguous(memory_format=CL)
    wt, bs, dy = torch.ones(16), torch.zeros(16), torch.randn(4, 16, 30, 30, generator=g).contiguous(memory_format=CL)
    for groups in (1, 4):
        ref = _grads(lambda *a: _reference(*a, groups, 1e-5, 0.1), x.double(), wt.double(), bs.double(), dy.double())
        got = _grads(lambda x_, w_, b_: nat._NormActTrain.apply(x_, w_, b_, groups, 1e-5, 0.1, kernel),
                     x, wt, bs, dy)
        for a, r in zip(got, ref):
            assert float((a.double() - r).abs().max()) < 1e-4 * max(1.0, float(r.abs().max()))


def test_results_do_not_depend_on_the_thread_count(kernel):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 32, 60, 60, generator=g).contiguous(memory_format=CL)
    wt, bs, dy = torch.rand(32, generator=g), torch.randn(32, generator=g), torch.randn_like(x)
    before, outs = torch.get_num_threads(), []
    try:
        for t in (1, 4):
            torch.set_num_threads(t)
            outs.append(_grads(lambda x_, w_, b_: nat._NormActTrain.apply(x_, w_, b_, 2, 1e-3, 0.1, kernel),
                               x, wt, bs, dy))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def _conv(spec: str, c1: int = 8, c2: int = 32) -> Conv:
    torch.manual_seed(0)
    m = Conv(c1, c2, 3, 1, norm=make_norm_builder(spec)).train().to(memory_format=CL)
    with torch.no_grad():  # non-trivial affine parameters
        if getattr(m.norm, "weight", None) is not None:
            m.norm.weight.uniform_(0.5, 1.5)
            m.norm.bias.uniform_(-0.5, 0.5)
    return m


def _step(m: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    m.zero_grad()
    y = m(x)
    y.backward(dy)
    return y.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}


@pytest.mark.parametrize("spec", ["gn:C/16", "ln", "in"])
def test_conv_block_trains_as_with_torch_ops(kernel, monkeypatch, spec):
    """The Conv block takes the kernel in training (counted) and gives torch's outputs and parameter gradients
    (two steps)."""
    fused, plain = _conv(spec), _conv(spec)
    calls = []
    real = nat._NormActTrain.apply
    monkeypatch.setattr(nat._NormActTrain, "apply", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(2)
    for _ in range(2):
        x = torch.randn(4, 8, 24, 24, generator=g).contiguous(memory_format=CL)
        dy = torch.randn(4, 32, 24, 24, generator=g)
        y1, g1 = _step(fused, x, dy)
        monkeypatch.setitem(nac._state, "train_kernel", None)  # torch's ops for the reference
        y2, g2 = _step(plain, x, dy)
        monkeypatch.setitem(nac._state, "train_kernel", kernel)
        assert float((y1 - y2).abs().max()) < 1e-5
        for k in g2:
            assert float((g1[k] - g2[k]).abs().max()) <= 1e-4 * max(1.0, float(g2[k].abs().max())), k
    assert len(calls) == 2


@pytest.mark.parametrize("case", ["eval", "no-grad", "nchw", "bfloat16", "hook", "syncbn", "cl-kernel", "silu"])
def test_declines_where_it_does_not_apply(kernel, monkeypatch, case):
    """Neither training kernel (this one, nor models/bn_act_train.py's for BN) runs; torch's ops do."""
    calls = []
    for fn in (nat._NormActTrain, bat._BnActTrain):
        monkeypatch.setattr(fn, "apply", lambda *a, real=fn.apply: calls.append(1) or real(*a))
    spec = "syncbn" if case == "syncbn" else ("gn:C/16" if case == "cl-kernel" else "bn")
    m = _conv(spec)
    x = torch.randn(2, 8, 12, 12).contiguous(memory_format=CL)
    if case == "eval":
        m.eval()
    elif case == "nchw":
        m, x = m.to(memory_format=torch.contiguous_format), x.contiguous()
    elif case == "bfloat16":
        m = m.to(torch.bfloat16).to(memory_format=CL)
        x = x.to(torch.bfloat16)
    elif case == "hook":
        m.norm.register_forward_hook(lambda *a: None)
    elif case == "cl-kernel":
        set_group_norm_kernel("channels-last")
    elif case == "silu":
        m.act = nn.SiLU()
    try:
        with torch.set_grad_enabled(case != "no-grad"):
            m(x)
    finally:
        set_group_norm_kernel("torch")
    assert calls == []


def test_whole_model_step_matches_torch_ops(kernel, monkeypatch):
    """One training step of the n model (GN C/16) against float64: outputs to float32 rounding; parameter gradients
    to the percent level (a pre-activation within float32 rounding of zero can take the other side of the LeakyReLU
    in any float32 computation and move its channel's gradient; a wrong term would be off by O(1))."""
    from models.yolo import Model

    torch.manual_seed(0)
    m = Model("cfg/models/yolo-n-gn.yaml", nc=3).train().to(memory_format=CL)
    ref = copy.deepcopy(m).double()
    x = torch.rand(4, 3, 96, 96).contiguous(memory_format=CL)
    calls = []
    real = nat._NormActTrain.apply
    monkeypatch.setattr(nat._NormActTrain, "apply", lambda *a: calls.append(1) or real(*a))

    def step(model, inp):
        out = model(inp)
        sum((o.double() ** 2).mean() for o in out).backward()
        return [o.detach().double() for o in out]

    out, out_ref = step(m, x), step(ref, x.double())
    assert len(calls) == sum(isinstance(mod, Conv) for mod in m.modules())  # every Conv block took the kernel
    for a, b in zip(out, out_ref):
        assert float((a - b).abs().max()) < 1e-4 * max(1.0, float(b.abs().max()))
    for (k, a), (_, b) in zip(m.named_buffers(), ref.named_buffers()):
        assert float((a.double() - b).abs().max()) < 1e-5, k
    g = torch.cat([p.grad.double().flatten() for p in m.parameters()])
    g_ref = torch.cat([p.grad.flatten() for p in ref.parameters()])
    assert float((g - g_ref).norm() / g_ref.norm()) < 0.1


@pytest.mark.parametrize("c,groups", [(16, 1), (32, 2), (48, 3)])
def test_gradient_slices_of_a_concatenation_are_read_in_place(kernel, c, groups):
    """A channel slice of a wider channels-last gradient (what a concatenation's backward hands on) gives the same
    gradients as its contiguous copy."""
    g = torch.Generator().manual_seed(c)
    x = torch.randn(3, c, 11, 9, generator=g).contiguous(memory_format=CL)
    wt, bs = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    wide = torch.randn(3, c + 24, 11, 9, generator=g).contiguous(memory_format=CL)
    dy = wide[:, 8:8 + c]
    assert not dy.is_contiguous(memory_format=CL)
    fn = lambda x_, w_, b_: nat._NormActTrain.apply(x_, w_, b_, groups, 1e-3, 0.1, kernel)  # noqa: E731
    sliced, copied = _grads(fn, x, wt, bs, dy), _grads(fn, x, wt, bs, dy.contiguous(memory_format=CL))
    assert all(torch.equal(a, b) for a, b in zip(sliced, copied))
