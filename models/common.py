"""Building blocks of the CSPDarknet backbone and PAN neck.

Every block takes a ready norm builder (``models.norm.make_norm_builder``) and an activation name; no block names a
norm class, so a BatchNorm model and a GroupNorm model share every line of this file.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.norm import NormBuilder, fuse_conv_and_norm, is_fusible_norm, make_norm_builder
from models.norm_act_cpu import norm_act
from models.norm_act_train import norm_act_train
from utils.general import ConfigError

_ACTIVATIONS = {
    "leakyrelu": lambda: nn.LeakyReLU(0.1, inplace=True),
    "silu": lambda: nn.SiLU(inplace=True),
    "relu": lambda: nn.ReLU(inplace=True),
    "identity": nn.Identity,
}
VALID_ACTIVATIONS = tuple(_ACTIVATIONS)


def make_act(name: str) -> nn.Module:
    """Activation by name: leakyrelu (slope 0.1, the default), silu, relu, identity."""
    key = str(name).strip().lower().replace("_", "")
    if key not in _ACTIVATIONS:
        raise ConfigError(f"act: unknown activation '{name}'; valid choices: {', '.join(VALID_ACTIVATIONS)}")
    return _ACTIVATIONS[key]()


def autopad(k: int, p: int | None = None, d: int = 1) -> int:
    """'Same' padding for an odd kernel k with dilation d, unless p is given."""
    return (d * (k - 1)) // 2 if p is None else p


def _default_norm() -> NormBuilder:
    return make_norm_builder("bn")


# torch's elementwise kernels vectorise along the innermost contiguous run of memory. The gradient torch.cat hands
# each input is a channel slice of the output's gradient, whose channels-last runs are only C values long; below one
# 64-byte vector the bfloat16 LeakyReLU backward runs scalar (benchmarks/profile_train.py --by-shape, n model, batch
# 16: 1.60 ms per call on the (16, 16, 80, 80) slices, 0.59 ms once they are contiguous). CPU only: unmeasured on CUDA.
_MIN_RUN_BYTES = 64


class _CatChannels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *xs):  # noqa: D401
        ctx.sizes = [x.shape[1] for x in xs]
        return torch.cat(xs, 1)

    @staticmethod
    def backward(ctx, g):
        parts = g.split(ctx.sizes, 1)
        if g.device.type == "cpu" and g.dim() == 4 and g.is_contiguous(memory_format=torch.channels_last):
            parts = [p.contiguous(memory_format=torch.channels_last) if p.shape[1] * p.element_size() < _MIN_RUN_BYTES
                     else p for p in parts]
        return tuple(parts)


def cat_channels(xs: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    """torch.cat(xs, 1) of (N, C_i, H, W) tensors -> (N, sum C_i, H, W). In backward, an input's channels-last
    gradient slice narrower than one vector is handed on contiguous (see _MIN_RUN_BYTES); values are identical."""
    if (torch.is_grad_enabled() and any(x.requires_grad for x in xs) and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()):
        return _CatChannels.apply(*xs)
    return torch.cat(xs, 1)


class Conv(nn.Module):
    """Conv2d -> norm -> activation.  (N, c1, H, W) -> (N, c2, H/s, W/s)."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1, d: int = 1,
                 *, norm: NormBuilder | None = None, act: str = "leakyrelu") -> None:
        super().__init__()
        norm = norm or _default_norm()
        # without a norm the conv needs its own bias; with one, the norm's shift makes it redundant
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=not norm.has_norm)
        self.norm = norm(c2)
        self.act = make_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if not isinstance(self.norm, nn.Identity):  # on CPU, norm + activation as one kernel where one applies
            fused = norm_act_train(y, self.norm, self.act)  # training (norm_act_train)
            if fused is None:  # GN / LN / IN inference (norm_act_cpu); y is this call's own temporary unless a
                # hook on the conv kept it (module-wide hooks: norm_act declines)
                fused = norm_act(y, self.norm, self.act, inplace=not self.conv._forward_hooks)
            if fused is not None:
                return fused
        return self.act(self.norm(y))

    def fuse(self) -> bool:
        """Fold a BN-family norm into the conv; returns True when something was fused."""
        if not is_fusible_norm(self.norm):
            return False
        self.conv = fuse_conv_and_norm(self.conv, self.norm)
        self.norm = nn.Identity()
        return True


class Bottleneck(nn.Module):
    """1x1 conv -> 3x3 conv, with a residual when shapes allow.  (N, c1, H, W) -> (N, c2, H, W)."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, e: float = 0.5,
                 *, norm: NormBuilder | None = None, act: str = "leakyrelu") -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1, norm=norm, act=act)
        self.cv2 = Conv(c_, c2, 3, 1, g=g, norm=norm, act=act)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP bottleneck with three convs: two 1x1 branches, n bottlenecks on one, merged by a 1x1 conv."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5,
                 *, norm: NormBuilder | None = None, act: str = "leakyrelu") -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1, norm=norm, act=act)
        self.cv2 = Conv(c1, c_, 1, 1, norm=norm, act=act)
        self.cv3 = Conv(2 * c_, c2, 1, norm=norm, act=act)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0, norm=norm, act=act) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(cat_channels((self.m(self.cv1(x)), self.cv2(x))))


class BottleneckCSP(nn.Module):
    """The original CSP bottleneck (Wang et al.): its standalone norm after the concat also comes from the factory."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5,
                 *, norm: NormBuilder | None = None, act: str = "leakyrelu") -> None:
        super().__init__()
        norm = norm or _default_norm()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1, norm=norm, act=act)
        self.cv2 = nn.Conv2d(c1, c_, 1, 1, bias=not norm.has_norm)
        self.cv3 = nn.Conv2d(c_, c_, 1, 1, bias=not norm.has_norm)
        self.cv4 = Conv(2 * c_, c2, 1, 1, norm=norm, act=act)
        self.norm = norm(2 * c_)
        self.act = make_act(act)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0, norm=norm, act=act) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y1 = self.cv3(self.m(self.cv1(x)))
        y2 = self.cv2(x)
        return self.cv4(self.act(self.norm(cat_channels((y1, y2)))))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained k x k max-pools, concatenated.  (N, c1, H, W) -> (N, c2, H, W)."""

    def __init__(self, c1: int, c2: int, k: int = 5, *, norm: NormBuilder | None = None,
                 act: str = "leakyrelu") -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1, norm=norm, act=act)
        self.cv2 = Conv(c_ * 4, c2, 1, 1, norm=norm, act=act)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(cat_channels((x, y1, y2, self.m(y2))))


class Concat(nn.Module):
    """Concatenate a list of tensors along ``dimension`` (channels by default)."""

    def __init__(self, dimension: int = 1) -> None:
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return cat_channels(x) if self.d == 1 else torch.cat(x, self.d)


class Upsample(nn.Upsample):
    """nn.Upsample taking YOLOv5's YAML args ``[None, 2, 'nearest']``."""

    def __init__(self, size: int | None = None, scale_factor: float | None = 2, mode: str = "nearest") -> None:
        super().__init__(size=size, scale_factor=scale_factor, mode=mode)
