"""models/norm_channels_last.py: the layout-keeping GroupNorm equals torch's, forward and backward, and the norm
layers use it only when switched on (never while tracing)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.norm import make_norm_builder
from models.norm_channels_last import group_norm_channels_last, group_norm_kernel, set_group_norm_kernel

CL = torch.channels_last


@pytest.fixture
def cl_kernel():
    before = group_norm_kernel()
    set_group_norm_kernel("channels-last")
    yield
    set_group_norm_kernel(before)


def _data(dtype=torch.float64, n=3, c=8, h=5, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 2 + 1.5).contiguous(memory_format=CL)
    weight = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(c, generator=g, dtype=torch.float64)
    grad = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    return x.to(dtype), weight, bias, grad


def _run(fn, x, weight, bias, grad):
    """Output and the gradients of x, weight, bias for sum(fn(...) * grad)."""
    x = x.clone().requires_grad_(True)
    params = [p.clone().requires_grad_(True) if p is not None else None for p in (weight, bias)]
    y = fn(x, *params)
    (y.double() * grad).sum().backward()
    return [y] + [t.grad for t in [x, *params] if t is not None]


@pytest.mark.parametrize("groups", [1, 2, 8])
@pytest.mark.parametrize("affine", [True, False])
def test_equals_torch_group_norm_float64(groups, affine):
    x, w, b, g = _data()
    w, b = (w, b) if affine else (None, None)
    got = _run(lambda x, *p: group_norm_channels_last(x, groups, *p, eps=1e-5), x, w, b, g)
    want = _run(lambda x, *p: F.group_norm(x, groups, *p, eps=1e-5), x, w, b, g)
    assert len(got) == (4 if affine else 2)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10)
    assert got[0].is_contiguous(memory_format=CL) and not got[0].is_contiguous()  # torch's keeps CL on CPU too
    assert got[1].is_contiguous(memory_format=CL)  # dx


def test_gradcheck():
    x, w, b, _ = _data(n=2, c=4, h=3, w=3)
    inputs = (x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True))
    assert torch.autograd.gradcheck(lambda x, w, b: group_norm_channels_last(x, 2, w, b), inputs)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_low_precision_input_keeps_dtype(dtype, tol):
    """Half / bfloat16 input (as under autocast): statistics in float32, output and dx in the input's dtype, close
    to torch's GroupNorm run in float32 on the same rounded input."""
    x, w, b, g = _data(dtype)
    w, b = w.float(), b.float()
    got = _run(lambda x, *p: group_norm_channels_last(x, 2, *p), x, w, b, g)
    want = _run(lambda x, *p: F.group_norm(x.float(), 2, *p), x, w, b, g)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == torch.float32
    for a, e in zip(got, want):
        scale = e.abs().max().item()
        assert (a.double() - e.double()).abs().max().item() <= tol * max(1.0, scale)


def test_autocast_does_not_upcast():
    """Under autocast torch's group_norm is a float32 op (a full-size copy on CUDA); this path keeps bfloat16."""
    x, w, b, _ = _data(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = group_norm_channels_last(x, 2, w.float(), b.float())
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("spec", ["gn:C/2", "ln", "in"])
def test_layers_switch_to_it_and_match(spec, cl_kernel):
    """With the kernel switched on, GN / LN / IN layers take this path (its autograd node) and give the same
    outputs and gradients as with torch's ops; channels-first input and tracing stay on torch's op."""
    x, _, _, g = _data(torch.float32)
    layer = make_norm_builder(spec)(8).train()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    def run() -> list[torch.Tensor]:
        layer.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        y = layer(xg)
        (y.double() * g).sum().backward()
        return [y, xg.grad, layer.weight.grad, layer.bias.grad]

    y_cl = run()
    assert "ChannelsLast" in y_cl[0].grad_fn.name()
    assert "ChannelsLast" not in layer(x.contiguous()).grad_fn.name()
    set_group_norm_kernel("torch")
    y_torch = run()
    assert "ChannelsLast" not in y_torch[0].grad_fn.name()
    for a, e in zip(y_cl, y_torch):
        torch.testing.assert_close(a, e, atol=2e-5, rtol=1e-5)
    set_group_norm_kernel("channels-last")
    graph = str(torch.jit.trace(layer.eval(), x).graph)
    assert "PythonOp" not in graph and ("group_norm" in graph or "instance_norm" in graph)


def test_bad_kernel_name_and_groups():
    with pytest.raises(ValueError, match="group norm kernel must be one of"):
        set_group_norm_kernel("fast")
    with pytest.raises(ValueError, match="do not split into 3 groups"):
        group_norm_channels_last(torch.zeros(1, 8, 2, 2), 3)
