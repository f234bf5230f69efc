"""YOLO detector built from a YOLOv5-format YAML graph with a pluggable norm.

Usage: python -m models.yolo --cfg cfg/models/yolo-n-bn.yaml [--norm gn:C/16] [--img 640] [--nc 80]
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from models.common import C3, SPPF, Bottleneck, BottleneckCSP, Concat, Conv, Upsample, make_act
from models.norm import NormBuilder, make_norm_builder
from utils.general import ConfigError, load_yaml


class Detect(nn.Module):
    """YOLO head: a 1x1 conv per level predicting, per anchor, (x, y, w, h, obj, cls...).

    Train mode returns ``nl`` raw maps (N, ny, nx, na, no): views of the conv outputs in channels-last order, so a
    channels-last model neither copies them nor their gradients (YOLOv5's (N, na, ny, nx, no) needs a copy each
    way). Eval mode returns decoded boxes (N, na*sum(ny*nx), no) with cx, cy, w, h in input pixels and sigmoid
    objectness / class scores.
    """

    def __init__(self, nc: int = 80, anchors: list[list[float]] | tuple = (), ch: list[int] | tuple = ()) -> None:
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        # anchors are stored in grid units (pixels / stride) once Model knows the strides
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2))
        self.register_buffer("stride", torch.zeros(self.nl))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)
        self._grids: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor] | torch.Tensor:
        raw = [conv(x) for conv, x in zip(self.m, xs)]
        if self.training:
            return [r.permute(0, 2, 3, 1).unflatten(3, (self.na, self.no)) for r in raw]
        if torch.is_grad_enabled():  # autograd cannot record the in-place decode below
            return self._decode(raw)
        # decode straight into one preallocated output: no per-level contiguous copies or concatenation. The
        # maps are copied in first and the sigmoid runs once over the dense result: on CPU a sigmoid that reads the
        # permuted channels-last maps directly is slower than the copy and the dense sigmoid together
        bs = raw[0].shape[0]
        total = sum(self.na * r.shape[2] * r.shape[3] for r in raw)
        out = torch.empty(bs, total, self.no, device=raw[0].device, dtype=raw[0].dtype)
        levels, start = [], 0
        for r in raw:
            ny, nx = r.shape[2:]
            dst = out[:, start:start + self.na * ny * nx].view(bs, self.na, ny, nx, self.no)
            dst.copy_(r.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2))
            levels.append(dst)
            start += self.na * ny * nx
        out.sigmoid_()
        for i, dst in enumerate(levels):
            grid, anchor_px = self._grid(i, dst.shape[2], dst.shape[3], dst.device, dst.dtype)
            s = self.stride[i].to(dst.dtype)
            dst[..., :2].mul_(2 * s).add_((grid - 0.5) * s)  # xy = (2 sigma - 0.5 + grid) * stride
            dst[..., 2:4].pow_(2).mul_(4 * anchor_px)  # wh = (2 sigma)^2 * anchor
        return out

    def _decode(self, raw: list[torch.Tensor]) -> torch.Tensor:
        """The same decoding, out of place (differentiable)."""
        out = []
        for i, r in enumerate(raw):
            bs, _, ny, nx = r.shape
            y = r.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).sigmoid()
            grid, anchor_px = self._grid(i, ny, nx, r.device, r.dtype)
            xy = (y[..., :2] * 2 - 0.5 + grid) * self.stride[i]
            wh = (y[..., 2:4] * 2) ** 2 * anchor_px
            out.append(torch.cat((xy, wh, y[..., 4:]), -1).view(bs, -1, self.no))
        return torch.cat(out, 1)

    def _grid(self, i: int, ny: int, nx: int, device: torch.device, dtype: torch.dtype):
        # anchors can change (AutoAnchor, checkpoint load), so the anchor values are part of the cache key
        key = (i, ny, nx, device, dtype, self.anchors._version, self.anchors.data_ptr())
        if key not in self._grids:
            with torch.inference_mode(False):  # a grid first built under inference_mode must serve autograd later
                self._grids = {k: v for k, v in self._grids.items() if k[0] != i}
                self._grids[key] = self._make_grid(i, ny, nx, device, dtype)
        return self._grids[key]

    def _make_grid(self, i: int, ny: int, nx: int, device: torch.device, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, 1, ny, nx, 2) cell offsets and (1, na, 1, 1, 2) anchor sizes in pixels of level i."""
        yv, xv = torch.meshgrid(torch.arange(ny, device=device, dtype=dtype),
                                torch.arange(nx, device=device, dtype=dtype), indexing="ij")
        grid = torch.stack((xv, yv), 2).view(1, 1, ny, nx, 2)
        anchor_px = (self.anchors[i] * self.stride[i]).to(dtype).view(1, self.na, 1, 1, 2)
        return grid, anchor_px


# The explicit table of modules a model YAML may name (no eval of config text).
MODULES: dict[str, type[nn.Module]] = {
    "Conv": Conv, "Bottleneck": Bottleneck, "C3": C3, "BottleneckCSP": BottleneckCSP, "SPPF": SPPF,
    "Concat": Concat, "Upsample": Upsample, "nn.Upsample": Upsample, "Detect": Detect,
}
_CHANNEL_MODULES = (Conv, Bottleneck, C3, BottleneckCSP, SPPF)
_REPEAT_MODULES = (C3, BottleneckCSP)
_NORMED_MODULES = (Conv, Bottleneck, C3, BottleneckCSP, SPPF)
_NAMES = ("nc", "anchors")


def make_divisible(x: float, divisor: int = 8) -> int:
    """Smallest multiple of divisor >= x."""
    return int(math.ceil(x / divisor) * divisor)


def _resolve_arg(a: Any, d: dict, where: str) -> Any:
    if isinstance(a, str):
        if a in _NAMES:
            return d[a]
        if a == "None":
            return None
        if a in ("nearest", "bilinear"):
            return a
        raise ConfigError(f"{where}: argument '{a}' is not a number or one of {', '.join(_NAMES)}")
    return a


def _valid_from(j: Any, i: int) -> bool:
    return isinstance(j, int) and not isinstance(j, bool) and (j == -1 or 0 <= j < i or (j < -1 and i + j >= 0))


def _check_header(d: dict, cfg_name: str) -> None:
    """The keys every model dict needs: nc (a positive int), anchors (one [w1,h1, w2,h2, ...] list per level)."""
    for key in ("nc", "anchors", "backbone", "head"):
        if key not in d:
            raise ConfigError(f"{cfg_name}: missing key '{key}'")
    nc, anchors = d["nc"], d["anchors"]
    if not isinstance(nc, int) or nc < 1:
        raise ConfigError(f"{cfg_name}: 'nc' must be a positive integer, got {nc!r}")
    if not (isinstance(anchors, list) and anchors and all(isinstance(a, list) and len(a) % 2 == 0 and a
                                                        for a in anchors)):
        raise ConfigError(f"{cfg_name}: 'anchors' must be a list of [w1,h1, w2,h2, ...] lists, one per level")


def parse_model(d: dict, ch: list[int], cfg_name: str = "model") -> tuple[nn.Sequential, list[int], list[tuple]]:
    """Build the layer list from a YOLOv5-format dict; returns (layers, saved indices, summary rows)."""
    _check_header(d, cfg_name)
    nc, anchors, gd, gw = d["nc"], d["anchors"], d.get("depth_multiple", 1.0), d.get("width_multiple", 1.0)
    act = d.get("act", "leakyrelu")
    make_act(act)  # validate early: one-line error instead of a failure inside a block
    base = d.get("norm", "bn")
    builders: dict[str, NormBuilder] = {
        part: make_norm_builder(d.get(f"{part}_norm", base), f"{cfg_name}: {part}_norm" if f"{part}_norm" in d
                                else f"{cfg_name}: norm") for part in ("backbone", "head")}
    no = len(anchors[0]) // 2 * (nc + 5)
    nb = len(d["backbone"]) if isinstance(d["backbone"], list) else 0
    layers, save, rows = [], [], []
    c2 = ch[-1]
    for i, row in enumerate((d["backbone"] or []) + (d["head"] or [])):
        where = f"{cfg_name}: layer {i}"
        if not (isinstance(row, list) and len(row) == 4):
            raise ConfigError(f"{where}: expected [from, number, module, args], got {row!r}")
        f, n, m_name, args = row
        m = MODULES.get(str(m_name))
        if m is None:
            raise ConfigError(f"{where}: unknown module '{m_name}'; valid: {', '.join(sorted(MODULES))}")
        froms = f if isinstance(f, list) else [f]
        if not all(_valid_from(j, i) for j in froms):
            raise ConfigError(f"{where}: 'from' {f!r} must name earlier layers (-1 = previous)")
        args = [_resolve_arg(a, d, where) for a in (args or [])]
        n = max(round(n * gd), 1) if n > 1 else n
        kwargs: dict[str, Any] = {}
        if m in _CHANNEL_MODULES:
            c1, c2 = ch[f], args[0]
            if c2 != no:
                c2 = make_divisible(c2 * gw, 8)
            args = [c1, c2, *args[1:]]
            if m in _REPEAT_MODULES:
                args.insert(2, n)
                n = 1
        elif m is Concat:
            c2 = sum(ch[x] for x in froms)
        elif m is Detect:
            args.append([ch[x] for x in froms])
        else:
            c2 = ch[f]
        if m in _NORMED_MODULES:
            kwargs = {"norm": builders["backbone" if i < nb else "head"], "act": act}
        try:
            module = nn.Sequential(*(m(*args, **kwargs) for _ in range(n))) if n > 1 else m(*args, **kwargs)
        except ConfigError as e:
            raise ConfigError(f"{where} ({m_name}, {c2} channels): {e}") from None
        except (TypeError, ValueError, IndexError) as e:
            raise ConfigError(f"{where} ({m_name}): bad args {args[1:] if m in _CHANNEL_MODULES else args}: {e}") \
                from None
        module.i, module.f = i, f
        layers.append(module)
        save.extend(x % i for x in froms if x != -1)
        rows.append((i, f, n, sum(p.numel() for p in module.parameters()), m_name, args))
        if i == 0:
            ch = []
        ch.append(c2)
    return nn.Sequential(*layers), sorted(save), rows


class Model(nn.Module):
    """The YOLO detector.  Input (N, ch, H, W) with H, W multiples of 32; see Detect for outputs."""

    def __init__(self, cfg: str | Path | dict = "cfg/models/yolo-n-bn.yaml", ch: int = 3, nc: int | None = None,
                 norm: str | dict | None = None, act: str | None = None) -> None:
        super().__init__()
        if isinstance(cfg, dict):
            d, name = copy.deepcopy(cfg), "model"
        else:
            d, name = load_yaml(cfg, "model config"), str(cfg)
        if nc is not None:
            d["nc"] = nc
        if norm is not None:  # an explicit norm replaces the YAML's norm and any per-part override
            d["norm"] = norm
            d.pop("backbone_norm", None)
            d.pop("head_norm", None)
        if act is not None:
            d["act"] = act
        self.yaml = d
        self.model, self.save, self.rows = parse_model(d, [ch], name)
        self.names = [str(i) for i in range(d["nc"])]
        det = self.model[-1]
        if not isinstance(det, Detect):
            raise ConfigError(f"{name}: the last layer must be Detect")
        s = 256
        was_training = self.training
        self.eval()  # probe strides without touching BN running statistics
        with torch.no_grad():
            feats = self._forward_once(torch.zeros(1, ch, s, s), features=True)
        self.train(was_training)
        det.stride.copy_(torch.tensor([s / f.shape[-2] for f in feats]))
        det.anchors /= det.stride.view(-1, 1, 1)
        self._check_anchor_order()
        self._initialize_biases()

    @property
    def stride(self) -> torch.Tensor:
        return self.model[-1].stride

    def forward(self, x: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        return self._forward_once(x)

    def _forward_once(self, x: torch.Tensor, features: bool = False):
        y: list[torch.Tensor | None] = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            if features and isinstance(m, Detect):
                return x
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x

    def _check_anchor_order(self) -> None:
        det = self.model[-1]
        area = det.anchors.prod(-1).mean(-1).view(-1) * det.stride ** 2
        if (area[-1] - area[0]).sign() != (det.stride[-1] - det.stride[0]).sign():
            det.anchors[:] = det.anchors.flip(0)

    def _initialize_biases(self) -> None:
        # priors from YOLOv5: ~8 objects per 640 px image, class probability ~0.6 / nc
        det = self.model[-1]
        for conv, s in zip(det.m, det.stride):
            b = conv.bias.view(det.na, -1)
            with torch.no_grad():
                b[:, 4] += math.log(8 / (640 / float(s)) ** 2)
                b[:, 5:5 + det.nc] += math.log(0.6 / (det.nc - 0.99)) if det.nc > 1 else 0.0

    def fuse(self) -> "Model":
        """Fold BN / SyncBN / FrozenBN into the preceding conv, in place; GN, LN and IN are left as they are."""
        for m in self.modules():
            if isinstance(m, Conv):
                m.fuse()
        return self

    def info(self, img_size: int = 640, verbose: bool = True) -> str:
        """Per-layer table (when verbose) and a summary line with layers, parameters and GFLOPs at img_size."""
        lines = []
        if verbose:
            lines.append(f"{'':>3}{'from':>18}{'n':>3}{'params':>10}  {'module':<16}{'arguments'}")
            for i, f, n, np_, m, args in self.rows:
                lines.append(f"{i:>3}{str(f):>18}{n:>3}{np_:10,}  {m:<16}{str(args)}")
        n_p = sum(p.numel() for p in self.parameters())
        n_l = len(list(self.modules()))
        lines.append(f"NormYOLO summary: {n_l} layers, {n_p:,} parameters, {self.gflops(img_size):.1f} GFLOPs at "
                     f"{img_size}x{img_size} (norm {describe_norm(self.yaml)})")
        return "\n".join(lines)

    def gflops(self, img_size: int = 640) -> float:
        """Floating-point operations (2 x multiply-adds) of one forward pass on a 1 x 3 x img x img input, in 1e9."""
        from torch.utils.flop_counter import FlopCounterMode

        p = next(self.parameters())
        was_training = self.training
        self.eval()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            self(torch.zeros(1, 3, img_size, img_size, device=p.device, dtype=p.dtype))
        self.train(was_training)
        return counter.get_total_flops() / 1e9


def describe_norm(d: dict) -> str:
    """Human-readable norm setting of a model config, e.g. 'gn:C/16' or 'backbone bn, head gn:32'."""
    from models.norm import parse_norm_spec

    base = d.get("norm", "bn")
    parts = {p: str(parse_norm_spec(d.get(f"{p}_norm", base))) for p in ("backbone", "head")}
    return parts["backbone"] if parts["backbone"] == parts["head"] else \
        f"backbone {parts['backbone']}, head {parts['head']}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build a NormYOLO model from YAML and print its summary.")
    ap.add_argument("--cfg", default="cfg/models/yolo-n-bn.yaml", help="model YAML")
    ap.add_argument("--norm", default=None, help="override the YAML norm, e.g. bn, gn:C/16, gn:32, ln, in, none")
    ap.add_argument("--img", type=int, default=640, help="image size for the GFLOPs figure")
    ap.add_argument("--nc", type=int, default=None, help="override the number of classes")
    opt = ap.parse_args(argv)
    try:
        if opt.img < 32 or opt.img % 32:
            raise ConfigError(f"--img {opt.img}: expected a positive multiple of 32")
        model = Model(opt.cfg, nc=opt.nc, norm=opt.norm)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(model.info(opt.img))
    return 0


if __name__ == "__main__":
    sys.exit(main())
