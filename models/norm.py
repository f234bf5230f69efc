"""The norm factory: the one place that knows every normalization layer NormYOLO can build.

Spec grammar (YAML ``norm:`` key, ``--norm`` flag), names case-insensitive, mmdet aliases accepted:

    bn | batchnorm | BN                  BatchNorm2d
    syncbn | SyncBN                      multi-process BN (torch's on CUDA, our all-reduce on any other backend)
    gn:G        e.g. gn:32               GroupNorm with G groups
    gn:C/k      e.g. gn:C/16             GroupNorm with k channels per group (G = C / k)
    ln | LN                              LayerNorm over (C, H, W) of each sample = GroupNorm with one group
    in | IN                              InstanceNorm with affine parameters (= GroupNorm with G = C)
    frozenbn                             torchvision FrozenBatchNorm2d (fixed statistics and affine)
    none                                 identity (the conv then gets a bias)

or the mapping form ``{type: gn, groups: C/16, eps: 1.0e-5, momentum: 0.03, affine: true, strict: false}``.

GroupNorm group rule: the requested group count g* is G, or C/k. The layer gets the largest divisor of C that is
<= max(1, floor(g*)). So a 16-channel layer with ``gn:32`` gets 16 groups (one channel each), an 8-channel layer with
``gn:C/16`` gets 1 group of 8 channels, and 48 channels with ``gn:C/16`` get 3 groups of 16. Groups therefore never
hold fewer than k channels. With ``strict: true`` any adjustment is an error instead; the error names the layer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops.misc import FrozenBatchNorm2d

from models.instance_norm_cpu import instance_norm_cpu
from models.norm_channels_last import group_norm_channels_last, is_channels_last_eager, use_channels_last_kernel
from utils.general import ConfigError

# canonical type -> accepted lower-case names
_ALIASES: dict[str, tuple[str, ...]] = {
    "bn": ("bn", "batchnorm", "batchnorm2d", "bn2d"),
    "syncbn": ("syncbn", "syncbatchnorm", "sync_bn"),
    "gn": ("gn", "groupnorm"),
    "ln": ("ln", "layernorm"),
    "in": ("in", "instancenorm", "instancenorm2d", "in2d"),
    "frozenbn": ("frozenbn", "frozen_bn", "frozenbatchnorm", "frozenbatchnorm2d"),
    "none": ("none", "identity", "null"),
}
_NAME_TO_TYPE = {alias: t for t, names in _ALIASES.items() for alias in names}
_CHOICES = "bn, syncbn, gn:G, gn:C/k, ln, in, frozenbn, none"
_MAPPING_KEYS = {"type", "groups", "eps", "momentum", "affine", "strict"}
_GROUPS_RE = re.compile(r"^\s*(?:c\s*/\s*(\d+)|(\d+))\s*$", re.IGNORECASE)


class NormSpecError(ConfigError):
    """A malformed or impossible normalization spec."""


@dataclass(frozen=True)
class NormSpec:
    """A parsed normalization spec. ``groups`` is ('G', n) or ('C/k', k) for GroupNorm, else None."""

    type: str = "bn"
    groups: tuple[str, int] | None = None
    eps: float | None = None  # None: 1e-3 for the BN family (as YOLOv5), 1e-5 for GN/LN/IN (as the GN paper)
    momentum: float | None = 0.03  # BN family only; torch's default is 0.1, YOLOv5 uses 0.03
    affine: bool = True
    strict: bool = False

    @property
    def resolved_eps(self) -> float:
        if self.eps is not None:
            return self.eps
        return 1e-3 if self.type in ("bn", "syncbn", "frozenbn") else 1e-5

    def __str__(self) -> str:
        if self.type == "gn" and self.groups is not None:
            kind, n = self.groups
            return f"gn:{n}" if kind == "G" else f"gn:C/{n}"
        return self.type


def _parse_groups(value: Any, where: str) -> tuple[str, int]:
    if isinstance(value, bool):
        raise NormSpecError(f"{where}: GroupNorm groups must be an integer G or 'C/k', got {value!r}")
    if isinstance(value, int):
        n, kind = value, "G"
    else:
        m = _GROUPS_RE.match(str(value))
        if not m:
            raise NormSpecError(f"{where}: GroupNorm groups must be an integer G or 'C/k' (e.g. 32 or C/16), "
                                f"got {value!r}")
        kind, n = ("C/k", int(m.group(1))) if m.group(1) else ("G", int(m.group(2)))
    if n < 1:
        raise NormSpecError(f"{where}: GroupNorm {'channels per group' if kind == 'C/k' else 'groups'} must be "
                            f">= 1, got {value!r}")
    return kind, n


def parse_norm_spec(spec: str | dict | NormSpec | None, where: str = "norm") -> NormSpec:
    """Parse a spec string ('gn:C/16'), mapping ({type: gn, groups: 32}) or NormSpec; None means 'bn'."""
    if isinstance(spec, NormSpec):
        return spec
    if spec is None:
        return NormSpec()
    if isinstance(spec, str):
        name, _, arg = spec.strip().partition(":")
        t = _NAME_TO_TYPE.get(name.strip().lower())
        if t is None:
            raise NormSpecError(f"{where}: unknown norm '{spec}'; valid choices: {_CHOICES}")
        if t == "gn":
            return NormSpec(type="gn", groups=_parse_groups(arg if arg else 32, where))
        if arg:
            raise NormSpecError(f"{where}: norm '{name}' takes no ':' argument (got '{spec}'); valid choices: "
                                f"{_CHOICES}")
        return NormSpec(type=t)
    if isinstance(spec, dict):
        unknown = set(spec) - _MAPPING_KEYS
        if unknown:
            raise NormSpecError(f"{where}: unknown key(s) {sorted(unknown)}; expected {sorted(_MAPPING_KEYS)}")
        if "type" not in spec:
            raise NormSpecError(f"{where}: mapping needs a 'type' key; valid choices: {_CHOICES}")
        base = parse_norm_spec(str(spec["type"]), where)
        kw: dict[str, Any] = {}
        if "groups" in spec:
            if base.type != "gn":
                raise NormSpecError(f"{where}: 'groups' only applies to gn, not {base.type}")
            kw["groups"] = _parse_groups(spec["groups"], where)
        for key, typ in (("eps", float), ("momentum", float)):
            if key in spec:
                val = spec[key]
                if key == "momentum" and val is None:
                    kw[key] = None  # None = cumulative moving average, as in torch
                    continue
                if isinstance(val, bool) or not isinstance(val, (int, float)) or not 0 < float(val) < 1:
                    raise NormSpecError(f"{where}: '{key}' must be a number in (0, 1), got {val!r}")
                kw[key] = typ(val)
        for key in ("affine", "strict"):
            if key in spec:
                if not isinstance(spec[key], bool):
                    raise NormSpecError(f"{where}: '{key}' must be true or false, got {spec[key]!r}")
                kw[key] = spec[key]
        return replace(base, **kw)
    raise NormSpecError(f"{where}: expected a string or a mapping, got {type(spec).__name__}; valid choices: "
                        f"{_CHOICES}")


def gn_num_groups(channels: int, spec: NormSpec) -> int:
    """Groups a GroupNorm layer of ``channels`` channels gets under ``spec`` (see the module docstring)."""
    kind, n = spec.groups or ("G", 32)
    wanted = n if kind == "G" else channels // n
    if spec.strict:
        ok = channels % n == 0 if kind == "G" else (channels % n == 0 and channels >= n)
        if not ok or (kind == "G" and n > channels):
            raise NormSpecError(f"GroupNorm '{spec}' (strict) cannot split {channels} channels into "
                                f"{'groups of ' + str(n) if kind == 'C/k' else str(n) + ' equal groups'}")
        return wanted
    wanted = max(1, min(wanted, channels))
    return max(d for d in range(1, wanted + 1) if channels % d == 0)


class GroupNorm2d(nn.GroupNorm):
    """nn.GroupNorm for (N, C, H, W); channels-last input can take models/norm_channels_last.py's kernel (opt-in)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_channels_last_kernel(x):
            return group_norm_channels_last(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


class LayerNorm2d(GroupNorm2d):
    """LayerNorm over (C, H, W) of each sample of an (N, C, H, W) tensor, as the GN paper defines LN for convnets."""

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(1, num_channels, eps=eps, affine=affine)


class InstanceNorm2d(nn.InstanceNorm2d):
    """InstanceNorm of (N, C, H, W) with affine parameters (= GroupNorm with G = C): statistics per image and channel.

    torch's instance_norm copies a channels-last input to NCHW and returns NCHW, which the next channels-last conv
    copies back. On CPU, channels-last input outside tracing and compiling therefore goes through
    models/instance_norm_cpu.py, which keeps the layout with torch's GroupNorm and BatchNorm kernels, chosen per map
    size. Everything else (CUDA, NCHW, running statistics, tracing for export, torch.compile) is torch's
    instance_norm, unless models/norm_channels_last.py's kernel is switched on.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_channels_last_kernel(x):
            return group_norm_channels_last(x, x.shape[1], self.weight, self.bias, self.eps)
        if x.device.type == "cpu" and is_channels_last_eager(x) and not self.track_running_stats:
            return instance_norm_cpu(x, self.weight, self.bias, self.eps)
        return super().forward(x)


class _SyncBNFunction(torch.autograd.Function):
    """BatchNorm over the union of every rank's batch, via all_reduce; works on any backend (gloo on CPU)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):  # noqa: D401
        c = x.shape[1]
        xf = x.float()
        local_count = torch.tensor([x.numel() // c], dtype=torch.float32, device=x.device)
        stats = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), local_count])
        dist.all_reduce(stats, group=group)
        total = stats[-1]
        mean = stats[:c] / total
        var = (stats[c:2 * c] / total - mean * mean).clamp_(min=0)  # biased, used to normalize
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None:
            unbiased = var * total / (total - 1).clamp(min=1)
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        xhat = (xf - mean[None, :, None, None]) * invstd[None, :, None, None]
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.total, ctx.group = total, group
        y = xhat
        if weight is not None:
            y = y * weight.float()[None, :, None, None] + bias.float()[None, :, None, None]
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        xhat, weight, invstd = ctx.saved_tensors
        c = xhat.shape[1]
        dyf = dy.float()
        local = torch.cat([dyf.sum((0, 2, 3)), (dyf * xhat).sum((0, 2, 3))])
        sums = local.clone()
        dist.all_reduce(sums, group=ctx.group)
        sum_dy, sum_dy_xhat = sums[:c], sums[c:]
        scale = invstd if weight is None else invstd * weight.float()
        dx = (dyf - (sum_dy / ctx.total)[None, :, None, None]
              - xhat * (sum_dy_xhat / ctx.total)[None, :, None, None]) * scale[None, :, None, None]
        # affine gradients stay local: DDP reduces parameter gradients across ranks itself
        dw = local[c:].to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = local[:c].to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        return dx.to(dy.dtype), dw, db, None, None, None, None, None


class SyncBatchNorm(nn.BatchNorm2d):
    """Multi-process BatchNorm for any torch.distributed backend.

    CUDA tensors use torch's fused SyncBatchNorm kernel; other devices (gloo on CPU) use an all-reduce of per-channel
    sum, sum of squares and count with a matching backward. Without an initialised process group (or world size 1,
    or in eval mode) it is plain BatchNorm.  Input (N, C, H, W) -> output (N, C, H, W).

    It derives from BatchNorm2d, not nn.SyncBatchNorm, because DDP refuses any nn.SyncBatchNorm in a CPU module.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_non_zero_input_channels(self, x: torch.Tensor) -> None:  # used by torch's SyncBatchNorm.forward
        if x.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return nn.SyncBatchNorm.forward(self, x)  # torch's CUDA path (NCCL), plain BN when nothing to sync
        group = self.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        if not (self.training and group is not None and dist.get_world_size(group) > 1):
            return super().forward(x)
        if x.dim() != 4:
            raise ValueError(f"SyncBatchNorm expects (N, C, H, W) input, got shape {tuple(x.shape)}")
        momentum = self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average, as torch does
                momentum = 1.0 / float(self.num_batches_tracked.item())
        return _SyncBNFunction.apply(x, self.weight, self.bias,
                                     self.running_mean if self.track_running_stats else None,
                                     self.running_var if self.track_running_stats else None,
                                     self.eps, momentum, group)


def _build(spec: NormSpec, channels: int) -> nn.Module:
    momentum, eps = spec.momentum, spec.resolved_eps
    if spec.type == "bn":
        return nn.BatchNorm2d(channels, eps=eps, momentum=momentum, affine=spec.affine)
    if spec.type == "syncbn":
        return SyncBatchNorm(channels, eps=eps, momentum=momentum, affine=spec.affine)
    if spec.type == "gn":
        return GroupNorm2d(gn_num_groups(channels, spec), channels, eps=eps, affine=spec.affine)
    if spec.type == "ln":
        return LayerNorm2d(channels, eps=eps, affine=spec.affine)
    if spec.type == "in":
        return InstanceNorm2d(channels, eps=eps, affine=spec.affine, track_running_stats=False)
    if spec.type == "frozenbn":
        return FrozenBatchNorm2d(channels, eps=eps)
    return nn.Identity()


NormBuilder = Callable[[int], nn.Module]


def make_norm_builder(spec: str | dict | NormSpec | None, where: str = "norm") -> NormBuilder:
    """Return ``builder(channels) -> nn.Module`` for a spec; ``builder.spec`` is the parsed NormSpec."""
    parsed = parse_norm_spec(spec, where)

    def builder(channels: int) -> nn.Module:
        if channels < 1:
            raise NormSpecError(f"norm '{parsed}': channel count must be >= 1, got {channels}")
        return _build(parsed, channels)

    builder.spec = parsed  # type: ignore[attr-defined]
    builder.has_norm = parsed.type != "none"  # type: ignore[attr-defined]
    return builder


# Classes the factory builds; nn.modules.batchnorm._NormBase covers BatchNorm*, SyncBatchNorm and InstanceNorm*.
NORM_CLASSES: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, FrozenBatchNorm2d)
FUSIBLE_CLASSES: tuple[type, ...] = (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)  # SyncBatchNorm above is a BatchNorm2d


def is_norm_layer(m: nn.Module) -> bool:
    """True for every normalization layer (their weights and biases get no weight decay)."""
    return isinstance(m, NORM_CLASSES)


def is_fusible_norm(m: nn.Module) -> bool:
    """True for norms with fixed inference statistics that fold into the preceding conv (BN, SyncBN, FrozenBN)."""
    return isinstance(m, FUSIBLE_CLASSES)


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every BatchNorm2d (not FrozenBN) in ``module`` by the project's SyncBatchNorm, keeping its state."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm):
        new = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group)
        if module.affine:
            with torch.no_grad():
                new.weight.copy_(module.weight)
                new.bias.copy_(module.bias)
        if module.track_running_stats:
            new.running_mean.copy_(module.running_mean)
            new.running_var.copy_(module.running_var)
            new.num_batches_tracked.copy_(module.num_batches_tracked)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_sync_batchnorm(child, process_group)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def fuse_conv_and_norm(conv: nn.Conv2d, norm: nn.Module) -> nn.Conv2d:
    """Fold a BN-family norm's inference transform into ``conv``; returns a new conv with a bias."""
    if isinstance(norm, FrozenBatchNorm2d):
        w_n, b_n, mean, var, eps = norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.eps
    else:
        mean, var, eps = norm.running_mean, norm.running_var, norm.eps
        w_n = norm.weight if norm.affine else torch.ones_like(mean)
        b_n = norm.bias if norm.affine else torch.zeros_like(mean)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode).to(conv.weight.device)
    with torch.no_grad():
        scale = w_n / torch.sqrt(var + eps)
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(mean)
        fused.bias.copy_((conv_bias - mean) * scale + b_n)
    fused.weight.requires_grad_(False)
    fused.bias.requires_grad_(False)
    return fused
