"""The YAML-built model: every cfg x every norm, parameter counts, Detect decoding, fuse, CLI and config errors."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from models.common import Conv, cat_channels
from models.norm import SyncBatchNorm, is_norm_layer
from models.yolo import Detect, Model, main
from utils.general import ConfigError, load_yaml

ROOT = Path(__file__).resolve().parents[1]
CFGS = sorted((ROOT / "cfg" / "models").glob("*.yaml"))
NORMS = ["bn", "syncbn", "gn:C/16", "gn:8", "gn:32", "ln", "in", "frozenbn", "none"]


def test_configs_present():
    assert {c.name for c in CFGS} >= {"yolo-n-bn.yaml", "yolo-n-gn.yaml", "yolo-s-bn.yaml", "yolo-s-gn.yaml"}


@pytest.mark.parametrize("cfg,count", [("yolo-n-bn.yaml", 1_872_157), ("yolo-n-gn.yaml", 1_872_157),
                                       ("yolo-s-bn.yaml", 7_235_389), ("yolo-s-gn.yaml", 7_235_389)])
def test_parameter_counts_match_yolov5(cfg, count):
    model = Model(ROOT / "cfg" / "models" / cfg)
    assert sum(p.numel() for p in model.parameters()) == count


def test_bn_and_gn_configs_differ_by_the_norm_line_only():
    bn, gn = (load_yaml(ROOT / "cfg" / "models" / f"yolo-n-{n}.yaml") for n in ("bn", "gn"))
    assert bn.pop("norm") == "bn" and gn.pop("norm") == "gn:C/16"
    assert bn == gn


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("cfg", CFGS, ids=lambda p: p.stem)
def test_every_cfg_and_norm_trains_and_infers(cfg, norm):
    torch.manual_seed(0)
    model = Model(cfg, nc=4, norm=norm)
    x = torch.rand(2, 3, 64, 64)
    out = model.train()(x)
    assert [tuple(o.shape) for o in out] == [(2, 8, 8, 3, 9), (2, 4, 4, 3, 9), (2, 2, 2, 3, 9)]  # N, ny, nx, na, no
    loss = sum(o.float().pow(2).mean() for o in out)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        y = model.eval()(x)
    assert y.shape == (2, 3 * (64 + 16 + 4), 9) and torch.isfinite(y).all()
    assert ((y[..., 4:] >= 0) & (y[..., 4:] <= 1)).all()
    norms = [m for m in model.modules() if is_norm_layer(m)]
    assert (len(norms) == 0) == (norm == "none")


@pytest.mark.parametrize("norm", ["bn", "syncbn", "frozenbn", "gn:C/16", "ln", "in"])
def test_fuse_matches_unfused(norm):
    torch.manual_seed(0)
    model = Model(ROOT / "cfg/models/yolo-n-bn.yaml", nc=5, norm=norm)
    with torch.no_grad():
        for _ in range(3):  # give BN non-trivial running statistics
            model.train()(torch.rand(4, 3, 64, 64))
        for m in model.modules():  # and non-trivial affine parameters
            if is_norm_layer(m) and getattr(m, "weight", None) is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.eval()
    x = torch.rand(2, 3, 96, 64)
    with torch.no_grad():
        y = model(x)
        fused = copy.deepcopy(model).fuse()
        yf = fused(x)
    torch.testing.assert_close(yf, y, atol=1e-4, rtol=1e-4)
    remaining = [type(m).__name__ for m in fused.modules() if is_norm_layer(m)]
    if norm in ("bn", "syncbn", "frozenbn"):
        assert remaining == []  # every Conv's norm folded (n cfg uses C3 only: no standalone CSP norm)
    else:
        assert len(remaining) == len([m for m in model.modules() if is_norm_layer(m)])  # GN/LN/IN untouched


def test_detect_decoding_follows_yolov5_parameterisation():
    model = Model(ROOT / "cfg/models/yolo-n-bn.yaml", nc=2).eval()
    det = model.model[-1]
    assert isinstance(det, Detect) and det.stride.tolist() == [8.0, 16.0, 32.0]
    torch.testing.assert_close(det.anchors[0] * 8, torch.tensor([[10.0, 13.0], [16.0, 30.0], [33.0, 23.0]]))
    with torch.no_grad():
        for conv in det.m:
            conv.weight.zero_()
            conv.bias.zero_()  # every logit 0 -> sigmoid 0.5
        y = model(torch.rand(1, 3, 64, 64))
    # level 0 (8x8 grid, stride 8): anchor a, cell (gy, gx) -> xy = (2*0.5 - 0.5 + g) * 8, wh = (2*0.5)^2 * anchor
    y0 = y[0, : 3 * 64].view(3, 8, 8, 7)
    torch.testing.assert_close(y0[1, 2, 5, :2], torch.tensor([(0.5 + 5) * 8, (0.5 + 2) * 8]))
    torch.testing.assert_close(y0[1, 2, 5, 2:4], torch.tensor([16.0, 30.0]))
    torch.testing.assert_close(y0[..., 4:], torch.full((3, 8, 8, 3), 0.5))
    y2 = y[0, 3 * 64 + 3 * 16:].view(3, 2, 2, 7)  # level 2: stride 32, anchors 116x90 ...
    torch.testing.assert_close(y2[2, 1, 0, :4], torch.tensor([16.0, 48.0, 373.0, 326.0]))


def test_train_maps_are_channels_last_views_with_eval_scores():
    """Train mode returns (N, ny, nx, na, no) views of the head convs' outputs: for a channels-last model they are
    contiguous, i.e. no copy is made of them (or, in backward, of their gradients); their sigmoid objectness and
    class scores are eval mode's (a FrozenBN model normalises alike in both modes)."""
    torch.manual_seed(0)
    model = Model(ROOT / "cfg/models/yolo-n-bn.yaml", nc=3, norm="frozenbn").to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 64, 96).contiguous(memory_format=torch.channels_last)
    raw = model.train()(x)
    assert [tuple(r.shape) for r in raw] == [(2, 8, 12, 3, 8), (2, 4, 6, 3, 8), (2, 2, 3, 3, 8)]
    assert all(r.is_contiguous() and r._base is not None for r in raw)  # views, already dense
    with torch.no_grad():
        y = model.eval()(x)
    start = 0
    for r in raw:
        ny, nx = r.shape[1:3]
        level = y[:, start:start + 3 * ny * nx].view(2, 3, ny, nx, 8)  # eval order: anchor, row, column
        torch.testing.assert_close(level[..., 4:], r.detach().permute(0, 3, 1, 2, 4)[..., 4:].sigmoid())
        start += 3 * ny * nx
    assert start == y.shape[1]


def test_eval_decoding_with_autograd_equals_inference_path():
    torch.manual_seed(0)
    model = Model(ROOT / "cfg/models/yolo-n-bn.yaml", nc=3).eval()
    x = torch.rand(2, 3, 64, 96)
    y_grad = model(x)  # differentiable, out-of-place decode
    assert y_grad.requires_grad
    with torch.inference_mode():
        y_fast = model(x)  # in-place decode into one buffer
    torch.testing.assert_close(y_fast, y_grad.detach(), atol=1e-4, rtol=1e-6)
    model_cl = model.to(memory_format=torch.channels_last)  # as val.py / detect.py run on CPU: channels-last maps
    with torch.inference_mode():
        y_cl = model_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y_cl, y_grad.detach(), atol=1e-4, rtol=1e-5)


def test_grids_built_under_inference_mode_serve_autograd_later():
    """val.py-style inference first, then a differentiable eval forward (e.g. a gradient check on a trained
    model): the cached grids must not be inference tensors, which autograd refuses to save."""
    torch.manual_seed(0)
    model = Model(ROOT / "cfg/models/yolo-n-bn.yaml", nc=3).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        y_fast = model(x)
    y_grad = model(x)
    y_grad[..., 4].sum().backward()  # raised "Inference tensors cannot be saved for backward" before
    torch.testing.assert_close(y_fast, y_grad.detach(), atol=1e-4, rtol=1e-6)


def test_objectness_and_class_prior_biases():
    model = Model(ROOT / "cfg/models/yolo-n-bn.yaml", nc=80)
    det = model.model[-1]
    b = det.m[0].bias.view(3, -1)  # stride 8: 8 objects per 640 px image -> obj prior log(8 / 80^2) = -6.685
    assert b[:, 4].mean().item() == pytest.approx(-6.685, abs=0.15)  # conv init noise is within +-1/sqrt(64)
    assert b[:, 5:].mean().item() == pytest.approx(-4.880, abs=0.15)  # class prior log(0.6 / 79.01)
    b2 = det.m[2].bias.view(3, -1)  # stride 32 -> log(8 / 20^2) = -3.912
    assert b2[:, 4].mean().item() == pytest.approx(-3.912, abs=0.15)


def test_part_overrides_and_cli_norm_override():
    d = load_yaml(ROOT / "cfg/models/yolo-n-bn.yaml")
    d.update(backbone_norm="bn", head_norm={"type": "gn", "groups": "C/16"})
    model = Model(d)
    nb = len(d["backbone"])
    kinds = {("backbone" if m.i < nb else "head", type(n).__name__)
             for m in model.model for n in m.modules() if is_norm_layer(n)}
    assert kinds == {("backbone", "BatchNorm2d"), ("head", "GroupNorm2d")}
    over = Model(d, norm="ln")  # an explicit norm replaces the per-part ones
    assert {type(n).__name__ for n in over.modules() if is_norm_layer(n)} == {"LayerNorm2d"}
    assert isinstance(Model(d, norm="syncbn").model[0].norm, SyncBatchNorm)


def test_none_norm_gives_conv_bias_and_conv_attribute_names():
    model = Model(ROOT / "cfg/models/yolo-n-bn.yaml", norm="none")
    convs = [m for m in model.modules() if isinstance(m, Conv)]
    assert convs and all(c.conv.bias is not None and isinstance(c.norm, nn.Identity) for c in convs)
    assert not any(hasattr(c, "bn") for c in convs)


@pytest.mark.parametrize("mutate,fragment", [
    (lambda d: d.pop("head"), "missing key 'head'"),
    (lambda d: d["backbone"].__setitem__(2, [-1, 3, "__import__('os')", [128]]), "layer 2: unknown module"),
    (lambda d: d["backbone"].__setitem__(2, [-1, 3, "C3", ["os.system"]]), "layer 2: argument 'os.system'"),
    (lambda d: d["head"].__setitem__(2, [[-1, 30], 1, "Concat", [1]]), "'from' [-1, 30] must name earlier"),
    (lambda d: d.__setitem__("nc", 0), "'nc' must be a positive integer"),
    (lambda d: d.__setitem__("act", "gelu"), "unknown activation 'gelu'"),
    (lambda d: d.__setitem__("norm", {"type": "gn", "groups": 32, "strict": True}), "layer 0 (Conv, 16 channels)"),
])
def test_bad_model_configs_are_one_line_errors(mutate, fragment):
    d = copy.deepcopy(load_yaml(ROOT / "cfg/models/yolo-n-bn.yaml"))
    mutate(d)
    with pytest.raises(ConfigError) as e:
        Model(d)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_summary_cli(capsys):
    assert main(["--cfg", str(ROOT / "cfg/models/yolo-n-bn.yaml"), "--norm", "gn:C/16"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 27  # header + 25 layers + summary
    assert "1,872,157 parameters, 4.5 GFLOPs at 640x640 (norm gn:C/16)" in out[-1]
    assert main(["--cfg", str(ROOT / "cfg/models/yolo-s-bn.yaml"), "--img", "320"]) == 0
    assert "7,235,389 parameters, 4.1 GFLOPs at 320x320" in capsys.readouterr().out
    assert main(["--norm", "foo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "valid choices: bn, syncbn, gn:G, gn:C/k, ln, in, frozenbn, none" in err
    assert main(["--cfg", "missing.yaml"]) == 2
    assert "model config 'missing.yaml' not found" in capsys.readouterr().err


@pytest.mark.parametrize("dtype, copied", [(torch.bfloat16, [True, False]), (torch.float32, [False, False])])
def test_cat_channels_equals_torch_cat_and_hands_narrow_gradients_on_contiguous(dtype: torch.dtype,
                                                                               copied: list[bool]) -> None:
    """The model's channel concat: values and gradients identical to torch.cat; in backward a channels-last gradient
    slice narrower than 64 bytes per pixel (16 bfloat16 channels) is made contiguous, wider ones (40 channels, or 16
    float32 channels = 64 bytes) stay views of the output's gradient."""
    torch.manual_seed(0)
    cl = torch.channels_last
    a = torch.randn(2, 16, 5, 6, dtype=dtype).contiguous(memory_format=cl).requires_grad_()
    b = torch.randn(2, 40, 5, 6, dtype=dtype).contiguous(memory_format=cl).requires_grad_()
    y = cat_channels((a, b))
    assert torch.equal(y, torch.cat((a, b), 1)) and y.is_contiguous(memory_format=cl)
    g = torch.randn_like(y).contiguous(memory_format=cl)
    got = torch.autograd.grad(y, (a, b), g)
    want = torch.autograd.grad(torch.cat((a, b), 1), (a, b), g)
    assert all(torch.equal(u, v) for u, v in zip(got, want))
    assert [t.is_contiguous(memory_format=cl) for t in got] == copied
    with torch.no_grad():
        assert torch.equal(cat_channels([a, b]), y)
