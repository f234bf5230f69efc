"""models/bn_act_train.py: BatchNorm + activation in training as one CPU kernel, equal to torch's ops bit for bit."""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import models.bn_act_train as bat
import models.cpu_build as cb
import models.norm_act_cpu as nac
import models.norm_act_train as nat
from logcapture import call_logged
from models.common import Conv
from models.norm import make_norm_builder

CL = torch.channels_last
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kernel():
    """The kernel; a skip where it cannot be built, a failure where it builds but does not reproduce a torch build
    of a capability whose arithmetic it knows (baseline, AVX2, AVX-512): that is a regression, not a platform."""
    k = bat.load_bn_kernel()
    if k is None:
        if os.environ.get("NORMYOLO_CPU_KERNELS", "1") == "0" or shutil.which(cb.compiler().split()[0]) is None:
            pytest.skip("the CPU kernels are disabled or there is no C++ compiler here")
        if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2", "AVX512"):
            pytest.fail("the BN training kernel builds but does not reproduce torch's ops on this capability")
        pytest.skip(f"the BN training kernel does not reproduce torch on {torch.backends.cpu.get_cpu_capability()}")
    return k


@pytest.fixture(params=[1, 2, 3], ids=["1-thread", "2-threads", "3-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _pair(c: int, act: nn.Module, momentum: float | None = 0.03, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """Two identical BatchNorm2d + activation stacks with non-trivial parameters and running statistics."""
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(c, eps=1e-3, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(-1.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return nn.Sequential(bn, act), copy.deepcopy(nn.Sequential(bn, act))


def _fused(m: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    y = nat.norm_act_train(x, m[0], m[1])
    assert y is not None, "the kernel declined"
    return y


def _torch(m: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    return m[1](m[0](x))


def _step(fn, m, x, dy):
    x = x.detach().clone().requires_grad_()
    y = fn(m, x)
    y.backward(dy)
    return [y.detach(), x.grad, m[0].weight.grad, m[0].bias.grad, *m[0].buffers()]


@pytest.mark.parametrize("n,c,h,w", [
    (4, 16, 20, 20),   # one AVX-512 vector of channels
    (3, 24, 9, 7),     # a remainder after the vectors
    (2, 8, 50, 50),    # a short row, many pixels
    (1, 96, 5, 5),     # one image
    (16, 256, 2, 2),   # few pixels per channel
])
@pytest.mark.parametrize("act", [nn.LeakyReLU(0.1), nn.ReLU(), nn.Identity()], ids=["leaky", "relu", "identity"])
def test_equals_torch_ops_exactly(kernel, threads, n, c, h, w, act):
    """Output, input / weight / bias gradients, running mean / var and the batch count: torch.equal, two steps."""
    fused, plain = _pair(c, act, seed=n + c)
    g = torch.Generator().manual_seed(c)
    for _ in range(2):
        x = (torch.randn(n, c, h, w, generator=g) * 2 + 0.7).contiguous(memory_format=CL)
        dy = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=CL)
        got, ref = _step(_fused, fused, x, dy), _step(_torch, plain, x, dy)
        assert got[0].is_contiguous(memory_format=CL) and got[1].is_contiguous(memory_format=CL)
        for name, a, b in zip(("y", "dx", "dweight", "dbias", "running_mean", "running_var", "batches"), got, ref):
            assert a.dtype == b.dtype and torch.equal(a, b), (name, float((a.double() - b.double()).abs().max()))
        for m in (fused, plain):
            m.zero_grad()


def test_cumulative_momentum_and_no_running_stats(kernel):
    """momentum=None (cumulative average over the counted batches) and track_running_stats=False."""
    g = torch.Generator().manual_seed(5)
    for make in (lambda: _pair(32, nn.LeakyReLU(0.1), momentum=None),
                 lambda: tuple(nn.Sequential(nn.BatchNorm2d(32, track_running_stats=False), nn.LeakyReLU(0.1))
                               for _ in range(2))):
        fused, plain = make()
        for _ in range(3):
            x = torch.randn(4, 32, 12, 12, generator=g).contiguous(memory_format=CL)
            dy = torch.randn(4, 32, 12, 12, generator=g)
            assert all(torch.equal(a, b) for a, b in zip(_step(_fused, fused, x, dy), _step(_torch, plain, x, dy)))
            fused.zero_grad(), plain.zero_grad()


def test_gradient_slice_of_a_concatenation_is_read_in_place(kernel):
    """A channel slice of a wider channels-last gradient (what a concatenation's backward hands on)."""
    fused, plain = _pair(32, nn.LeakyReLU(0.1))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 32, 11, 9, generator=g).contiguous(memory_format=CL)
    dy = torch.randn(3, 56, 11, 9, generator=g).contiguous(memory_format=CL)[:, 8:40]
    assert not dy.is_contiguous(memory_format=CL)
    assert all(torch.equal(a, b) for a, b in zip(_step(_fused, fused, x, dy), _step(_torch, plain, x, dy)))


def test_declines_maps_with_no_more_pixels_than_threads(kernel):
    m, _ = _pair(8, nn.LeakyReLU(0.1))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert nat.norm_act_train(torch.randn(2, 8, 1, 1).requires_grad_(), m[0], m[1]) is None
        assert nat.norm_act_train(torch.randn(3, 8, 1, 1).requires_grad_(), m[0], m[1]) is not None
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("cfg", ["cfg/models/yolo-n-bn.yaml"])
def test_whole_model_steps_equal_torch_ops(kernel, monkeypatch, cfg):
    """Two training steps (forward, backward, SGD) of the n model with the kernel and with torch's ops: every output,
    gradient, weight and buffer equal; every Conv block took the kernel."""
    from models.yolo import Model

    torch.manual_seed(0)
    fused = Model(cfg, nc=3).train().to(memory_format=CL)
    plain = copy.deepcopy(fused)
    calls = []
    real = bat._BnActTrain.apply
    monkeypatch.setattr(bat._BnActTrain, "apply", lambda *a: calls.append(1) or real(*a))
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (fused, plain)]
    g = torch.Generator().manual_seed(1)
    try:
        for _ in range(2):
            x = torch.rand(4, 3, 128, 128, generator=g).contiguous(memory_format=CL)
            outs = []
            for m, opt, on in ((fused, opts[0], True), (plain, opts[1], False)):
                nat.set_train_kernel(on)
                opt.zero_grad()
                out = m(x)
                sum((o ** 2).mean() for o in out).backward()
                opt.step()
                outs.append(out)
            assert all(torch.equal(a, b) for a, b in zip(*outs))
    finally:
        nat.set_train_kernel(True)
    assert len(calls) == 2 * sum(isinstance(mod, Conv) for mod in fused.modules())
    for (k, a), (_, b) in zip(fused.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), k


def test_a_kernel_that_differs_from_torch_is_not_used(kernel, monkeypatch):
    """If the probe finds neither arithmetic variant equal to torch's, one warning and torch's ops for BN."""
    monkeypatch.setattr(bat, "matches_torch", lambda k: False)
    monkeypatch.delitem(nac._state, "bn_train_kernel", raising=False)
    k, lines = call_logged(bat.load_bn_kernel)
    assert k is None and any("does not reproduce torch" in ln for ln in lines)
    m, _ = _pair(16, nn.LeakyReLU(0.1))
    assert nat.norm_act_train(torch.randn(2, 16, 8, 8).contiguous(memory_format=CL).requires_grad_(),
                              m[0], m[1]) is None


@pytest.mark.parametrize("capability", ["default", "native"])
def test_probe_picks_the_variant_of_each_torch_build(kernel, capability):
    """torch's baseline build (ATEN_CPU_CAPABILITY=default) rounds every product before adding; its AVX2 / AVX-512
    builds fuse multiply-adds. The probe must pick the variant that equals the torch it runs with, and the other
    variant must fail the probe (it can tell them apart)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if capability == "default":
        env["ATEN_CPU_CAPABILITY"] = "default"
    else:
        env.pop("ATEN_CPU_CAPABILITY", None)
    code = ("import torch, models.bn_act_train as bat\n"
            "from models.cpu_build import load_library\n"
            "k = bat.load_bn_kernel()\n"
            "lib = load_library(bat.SOURCE)\n"
            "print(torch.backends.cpu.get_cpu_capability(), k.fused, "
            "bat.matches_torch(bat.BnActKernel(lib, 1 - k.fused)))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    cap, fused, other = out.stdout.split()[-3:]
    assert other == "False"
    if cap == "DEFAULT":
        assert fused == "0"
    elif cap in ("AVX2", "AVX512"):
        assert fused == "1"


def test_conv_block_with_bn_takes_the_kernel(kernel, monkeypatch):
    calls = []
    real = bat._BnActTrain.apply
    monkeypatch.setattr(bat._BnActTrain, "apply", lambda *a: calls.append(1) or real(*a))
    m = Conv(8, 16, 3, 1, norm=make_norm_builder("bn")).train().to(memory_format=CL)
    m(torch.randn(2, 8, 12, 12).contiguous(memory_format=CL)).sum().backward()
    assert calls == [1]
