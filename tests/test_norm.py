"""The norm factory: spec grammar, group rule, textbook numbers, and SyncBN across 2 gloo processes."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops.misc import FrozenBatchNorm2d

from models.norm import (LayerNorm2d, NormSpecError, SyncBatchNorm, convert_sync_batchnorm, gn_num_groups,
                         is_fusible_norm, is_norm_layer, make_norm_builder, parse_norm_spec)


@pytest.mark.parametrize("spec,expected", [
    ("bn", "bn"), ("BN", "bn"), ("BatchNorm", "bn"), ("SyncBN", "syncbn"), ("GN", "gn:32"), ("gn:C/16", "gn:C/16"),
    ("gn:c/8", "gn:C/8"), ("gn:32", "gn:32"), ("LN", "ln"), ("IN", "in"), ("FrozenBN", "frozenbn"), ("none", "none"),
    ({"type": "GN", "groups": "C/16", "eps": 1e-5}, "gn:C/16"), ({"type": "gn", "groups": 8}, "gn:8"),
])
def test_spec_grammar(spec, expected):
    assert str(parse_norm_spec(spec)) == expected


@pytest.mark.parametrize("spec,fragment", [
    ("foo", "valid choices: bn, syncbn, gn:G, gn:C/k, ln, in, frozenbn, none"),
    ("gn:C/0", "must be >= 1"), ("gn:0", "must be >= 1"), ("gn:abc", "integer G or 'C/k'"),
    ("bn:4", "takes no ':' argument"), ({"groups": 4}, "needs a 'type'"), ({"type": "bn", "groups": 4}, "only applies"),
    ({"type": "gn", "eps": -1}, "'eps' must be a number"), ({"type": "bn", "colour": 1}, "unknown key"),
    (3, "expected a string or a mapping"),
])
def test_bad_specs_are_one_line_errors(spec, fragment):
    with pytest.raises(NormSpecError) as e:
        parse_norm_spec(spec)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_eps_and_momentum_defaults_and_overrides():
    bn = make_norm_builder("bn")(16)
    assert (bn.eps, bn.momentum) == (1e-3, 0.03)  # YOLOv5's BN settings
    gn = make_norm_builder("gn:C/16")(32)
    assert gn.eps == 1e-5
    bn2 = make_norm_builder({"type": "bn", "eps": 1e-5, "momentum": 0.1, "affine": False})(8)
    assert (bn2.eps, bn2.momentum, bn2.affine) == (1e-5, 0.1, False)


@pytest.mark.parametrize("channels,spec,groups", [
    (256, "gn:32", 32), (256, "gn:C/16", 16), (64, "gn:C/16", 4), (48, "gn:C/16", 3),  # divisible
    (16, "gn:32", 16), (8, "gn:32", 8),  # fewer channels than groups: one channel per group
    (8, "gn:C/16", 1), (16, "gn:C/16", 1),  # fewer channels than k: one group
    (24, "gn:32", 24), (48, "gn:32", 24), (40, "gn:C/16", 2), (24, "gn:C/16", 1), (96, "gn:C/16", 6),
])
def test_group_rule(channels, spec, groups):
    parsed = parse_norm_spec(spec)
    assert gn_num_groups(channels, parsed) == groups
    layer = make_norm_builder(spec)(channels)
    assert isinstance(layer, nn.GroupNorm) and layer.num_groups == groups
    if parsed.groups[0] == "C/k":  # groups never hold fewer than k channels unless the layer has fewer than k
        assert channels // groups >= min(parsed.groups[1], channels)


def test_strict_group_rule_errors_name_channels_and_spec():
    strict = parse_norm_spec({"type": "gn", "groups": 32, "strict": True})
    assert gn_num_groups(64, strict) == 32
    with pytest.raises(NormSpecError, match=r"gn:32.*strict.*16 channels"):
        gn_num_groups(16, strict)
    with pytest.raises(NormSpecError, match=r"8 channels into groups of 16"):
        gn_num_groups(8, parse_norm_spec({"type": "gn", "groups": "C/16", "strict": True}))


def test_batchnorm_textbook_numbers():
    bn = make_norm_builder({"type": "bn", "momentum": 0.1, "eps": 1e-5})(2)
    bn.running_mean.fill_(2.0)
    bn.running_var.fill_(1.0)
    torch.manual_seed(42)
    x = torch.randn(1, 2, 2, 2)
    y = bn.train()(x)
    expected = torch.tensor([[[[1.4150, -1.4102], [0.0257, -0.0305]], [[-0.9276, -0.1964], [1.6731, -0.5491]]]])
    torch.testing.assert_close(y.detach(), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(bn.running_mean, torch.tensor([1.8233, 1.8065]), atol=1e-4, rtol=0)
    torch.testing.assert_close(bn.running_var, torch.tensor([0.9007, 1.1187]), atol=1e-4, rtol=0)
    # batch statistics use the biased variance; running variance was updated with the unbiased one
    flat = x.transpose(0, 1).reshape(2, -1)
    torch.testing.assert_close(0.9 * 1.0 + 0.1 * flat.var(1, unbiased=True), bn.running_var)
    ye = bn.eval()(x)  # eval mode normalises with the running statistics
    torch.testing.assert_close(ye, (x - bn.running_mean.view(1, 2, 1, 1)) / (bn.running_var.view(1, 2, 1, 1)
                                                                             + 1e-5).sqrt())


def _gn_by_hand(x: torch.Tensor, g: int, eps: float) -> torch.Tensor:
    n, c, h, w = x.shape
    r = x.reshape(n, g, -1)
    mean = r.mean(-1, keepdim=True)
    var = ((r - mean) ** 2).mean(-1, keepdim=True)  # biased
    return ((r - mean) / (var + eps).sqrt()).reshape(n, c, h, w)


def test_groupnorm_matches_hand_computation_and_limits():
    torch.manual_seed(0)
    x = torch.randn(3, 32, 5, 7) * 3 + 1
    for spec, g in (("gn:8", 8), ("gn:C/16", 2), ("gn:32", 32), ("gn:1", 1)):
        layer = make_norm_builder(spec)(32)
        torch.testing.assert_close(layer(x), _gn_by_hand(x, g, 1e-5), atol=1e-5, rtol=0)
    gn_c = make_norm_builder("gn:32")(32)
    torch.testing.assert_close(gn_c(x), F.instance_norm(x, eps=1e-5), atol=1e-5, rtol=0)  # G = C is IN
    gn_1 = make_norm_builder("gn:1")(32)
    torch.testing.assert_close(gn_1(x), F.layer_norm(x, x.shape[1:], eps=1e-5), atol=1e-5, rtol=0)  # G = 1 is LN


def test_ln_and_in_layers():
    torch.manual_seed(1)
    x = torch.randn(2, 16, 6, 6)
    ln = make_norm_builder("ln")(16)
    assert isinstance(ln, LayerNorm2d)
    torch.testing.assert_close(ln(x), F.layer_norm(x, (16, 6, 6), eps=1e-5), atol=1e-5, rtol=0)
    inorm = make_norm_builder("in")(16)
    assert isinstance(inorm, nn.InstanceNorm2d) and inorm.affine and not inorm.track_running_stats
    with torch.no_grad():
        inorm.weight.uniform_(0.5, 2)
        inorm.bias.uniform_(-1, 1)
    expected = _gn_by_hand(x, 16, 1e-5) * inorm.weight.view(1, -1, 1, 1) + inorm.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(inorm.eval()(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_instance_norm_channels_last_paths_equal_torch(dtype: torch.dtype):
    """The layer's CPU path for channels-last input (models/instance_norm_cpu.py, tested per kernel in
    test_instance_norm_cpu.py) gives torch's instance_norm in training and eval: outputs, input / weight / bias
    gradients; it keeps channels-last (torch's returns NCHW). Tracing (export) records torch's instance_norm."""
    torch.manual_seed(2)
    layer = make_norm_builder("in")(6).train()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2)
        layer.bias.uniform_(-1, 1)
    x = (torch.randn(3, 6, 7, 5) * 3 + 1).contiguous(memory_format=torch.channels_last)
    g = torch.randn(3, 6, 7, 5)
    xa = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        y = layer(xa.to(dtype))
    (y.float() * g).sum().backward()
    grads = [xa.grad, layer.weight.grad.clone(), layer.bias.grad.clone()]
    layer.weight.grad = layer.bias.grad = None
    xb = x.contiguous().requires_grad_(True)
    ref = F.instance_norm(xb, weight=layer.weight, bias=layer.bias, eps=layer.eps)
    (ref * g).sum().backward()
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    torch.testing.assert_close(y.float(), ref, **tol)
    for got, want in zip(grads, [xb.grad, layer.weight.grad, layer.bias.grad]):
        torch.testing.assert_close(got.float(), want, **(tol if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)))
    layer.eval()
    with torch.no_grad():  # small maps (7 x 5) go through NCHW, large ones (32 x 33) stay channels-last
        for xe in (x, (torch.randn(2, 6, 32, 33) * 3 + 1).contiguous(memory_format=torch.channels_last)):
            y_eval = layer(xe)
            torch.testing.assert_close(y_eval, F.instance_norm(xe, weight=layer.weight, bias=layer.bias, eps=layer.eps))
            assert y_eval.is_contiguous(memory_format=torch.channels_last) and not y_eval.is_contiguous()
        graph = str(torch.jit.trace(layer, x).graph)  # what export sees: torch's own op
    assert "instance_norm" in graph and "group_norm" not in graph


def test_layer_kinds_norm_and_fusible():
    kinds = {s: make_norm_builder(s)(16) for s in ("bn", "syncbn", "gn:C/16", "ln", "in", "frozenbn", "none")}
    assert isinstance(kinds["frozenbn"], FrozenBatchNorm2d) and isinstance(kinds["none"], nn.Identity)
    assert {s for s, m in kinds.items() if is_norm_layer(m)} == {"bn", "syncbn", "gn:C/16", "ln", "in", "frozenbn"}
    assert {s for s, m in kinds.items() if is_fusible_norm(m)} == {"bn", "syncbn", "frozenbn"}
    assert not make_norm_builder("none").has_norm and make_norm_builder("bn").has_norm


def test_convert_sync_batchnorm_keeps_state():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Sequential(nn.BatchNorm2d(8)),
                        FrozenBatchNorm2d(8))
    net(torch.randn(4, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    before = net.eval()(x)
    convert_sync_batchnorm(net)
    assert isinstance(net[1], SyncBatchNorm) and isinstance(net[2][0], SyncBatchNorm)
    assert isinstance(net[3], FrozenBatchNorm2d)  # frozen statistics stay frozen
    torch.testing.assert_close(net(x), before)
    # without a process group SyncBN trains exactly like BN
    bn, sbn = nn.BatchNorm2d(8), convert_sync_batchnorm(nn.BatchNorm2d(8))
    z = torch.randn(4, 8, 5, 5)
    torch.testing.assert_close(sbn.train()(z), bn.train()(z))
    torch.testing.assert_close(sbn.running_var, bn.running_var)


def _syncbn_worker(rank: int, world: int, init_file: str, out_dir: str, device: str, channels_last: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    x_all = (torch.randn(4, 3, 5, 5) * 2 + 0.5).to(device)
    w_out = torch.randn(4, 3, 5, 5).to(device)
    layer = make_norm_builder({"type": "syncbn", "momentum": 0.1, "eps": 1e-5})(3).to(device)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, 0.5, -1.0]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    sl = slice(2 * rank, 2 * rank + 2)
    x = x_all[sl].clone()
    if channels_last:  # how training feeds it (engine/accel.py)
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = layer.train()(x)
    (y * w_out[sl]).sum().backward()
    gw, gb = layer.weight.grad.clone(), layer.bias.grad.clone()
    dist.all_reduce(gw)  # what DDP's gradient reduction does (up to its averaging)
    dist.all_reduce(gb)
    torch.save({"y": y.detach(), "gx": x.grad, "gw": gw, "gb": gb, "rm": layer.running_mean.clone(),
                "rv": layer.running_var.clone()}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: torch's CUDA SyncBatchNorm path is not run"))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_syncbn_two_gloo_processes_equal_bn_on_whole_batch(device: str, channels_last: bool):
    """CPU: the project's all-reduce SyncBN. CUDA: torch's SyncBatchNorm kernels (nn.SyncBatchNorm.forward), with
    both processes on GPU 0 (NCCL refuses two ranks on one GPU; gloo takes CUDA tensors), which is how a one-GPU
    machine can check them."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_syncbn_worker, args=(2, os.path.join(tmp, "init"), tmp, device, channels_last), nprocs=2, join=True)
        res = [torch.load(os.path.join(tmp, f"rank{r}.pt"), map_location="cpu") for r in range(2)]
    torch.manual_seed(0)
    x_all = torch.randn(4, 3, 5, 5) * 2 + 0.5
    w_out = torch.randn(4, 3, 5, 5)
    bn = nn.BatchNorm2d(3, eps=1e-5, momentum=0.1)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, 0.5, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x = x_all.clone().requires_grad_(True)
    y = bn(x)
    (y * w_out).sum().backward()
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r["y"] for r in res]), y.detach(), **tol)
    torch.testing.assert_close(torch.cat([r["gx"] for r in res]), x.grad, **tol)
    for r in res:
        torch.testing.assert_close(r["gw"], bn.weight.grad, **tol)
        torch.testing.assert_close(r["gb"], bn.bias.grad, **tol)
        torch.testing.assert_close(r["rm"], bn.running_mean, **tol)
        torch.testing.assert_close(r["rv"], bn.running_var, **tol)
