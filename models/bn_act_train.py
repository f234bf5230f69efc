"""BatchNorm (training) + leaky ReLU (ReLU, identity) as one CPU kernel that reproduces torch's ops bit for bit.

torch runs a Conv -> BatchNorm -> LeakyReLU block's norm and activation in training as separate ops, and on a CPU
whose memory bandwidth is the limit their passes over the map are a sizeable part of the step (docs/speed.md).
``csrc/bn_act_train_cpu.cpp`` runs them as one forward (two statistics reads, one read and write) and one backward
(one read of the gradient and the input for both reductions, the activation's mask recomputed, one write), in
torch's own arithmetic: the same partial sums over the same split of the rows for the thread count, the same
roundings and fused multiply-adds. Outputs, gradients and running statistics therefore equal torch's
``native_batch_norm`` + ``leaky_relu_`` and their backward exactly, so switching the kernel on or off changes the
speed of a run and not one digit of its losses or mAP (tests/test_bn_act_train.py asserts torch.equal).

Whether torch's vectorised kernels fuse a multiply into the following add depends on how torch was built for the
CPU capability it runs (AVX2 / AVX-512 builds do, the baseline build does not). The first use in a process builds
the kernel (models/cpu_build.py; ``NORMYOLO_CPU_KERNELS=0`` turns it off) and compares both arithmetic variants with
torch on a small map; if neither reproduces torch exactly, one warning says so and BatchNorm keeps torch's ops.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn as nn

from models.cpu_build import F64, I64, PTR, bind, call
from models.norm_act_cpu import check_map, check_params, gradient_rows, load_source
from utils.general import LOGGER

SOURCE = Path(__file__).resolve().parent / "csrc" / "bn_act_train_cpu.cpp"


class BnActKernel:
    """csrc/bn_act_train_cpu.cpp's forward and backward over ctypes; ``fused``: the arithmetic variant (1: fused
    multiply-adds where torch's vectorised kernels have them) that the load-time probe found to equal torch."""

    def __init__(self, lib: ctypes.CDLL, fused: int = 1):
        self._fwd = bind(lib.normyolo_bn_act_forward, PTR, PTR, PTR, I64, I64, F64, F64, I64, PTR, PTR, F64, I64,
                         I64, *(PTR,) * 5)
        self._bwd = bind(lib.normyolo_bn_act_backward, PTR, I64, *(PTR,) * 6, I64, I64, F64, I64, I64, *(PTR,) * 3)
        self.fused = fused

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, slope: float,
                momentum: float | None = None, running_mean: torch.Tensor | None = None,
                running_var: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """x (N, C, H, W) channels-last float32 with N * H * W > the thread count. Returns (y, mean, invstd, a, b):
        y = act(x * a + b) channels-last; the batch mean and 1 / std (C,); the scale a and shift b (C,). With a
        momentum, running_mean / running_var (C,) move in place as torch's batch_norm moves them."""
        n, c, hw = check_map(x, "bn_act_forward")
        check_params(weight, bias, c, "bn_act_forward")
        if n * hw <= torch.get_num_threads():
            raise RuntimeError("bn_act_forward: needs more pixels than threads (torch sums such maps differently)")
        update = momentum is not None
        if update:
            check_params(running_mean, running_var, c, "bn_act_forward")
        y = torch.empty_like(x, memory_format=torch.channels_last)
        mean, invstd, a, b = x.new_empty((4, c)).unbind(0)
        call(self._fwd, x.data_ptr(), weight.data_ptr(), bias.data_ptr(), n * hw, c, eps,
             momentum if update else 0.0, int(update), running_mean.data_ptr() if update else None,
             running_var.data_ptr() if update else None, slope, self.fused, torch.get_num_threads(), y.data_ptr(),
             mean.data_ptr(), invstd.data_ptr(), a.data_ptr(), b.data_ptr())
        return y, mean, invstd, a, b

    def backward(self, g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                 invstd: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slope: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Backward of forward for the gradient g of y: (dx channels-last, dweight (C,), dbias (C,)). g is read in
        place when its pixels are rows of C floats at a common stride (channels-last, or a channel slice of a wider
        channels-last tensor, as a concatenation's backward hands on), else copied."""
        n, c, hw = check_map(x, "bn_act_backward")
        g, gs = gradient_rows(g, x, "bn_act_backward")
        dx = torch.empty_like(x, memory_format=torch.channels_last)
        dw, db = x.new_empty(c), x.new_empty(c)  # separate: they become the parameters' .grad
        call(self._bwd, g.data_ptr(), gs, x.data_ptr(), weight.data_ptr(), mean.data_ptr(), invstd.data_ptr(),
             a.data_ptr(), b.data_ptr(), n * hw, c, slope, self.fused, torch.get_num_threads(), dx.data_ptr(),
             dw.data_ptr(), db.data_ptr())
        return dx, dw, db


def _torch_step(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, rm: torch.Tensor, rv: torch.Tensor,
                g: torch.Tensor, slope: float) -> list[torch.Tensor]:
    """torch's ops on the probe: [y, running_mean, running_var, dx, dweight, dbias]."""
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    with torch.enable_grad():
        y = nn.functional.leaky_relu(nn.functional.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-3), slope)
        y.backward(g)
    return [y.detach(), rm, rv, x.grad, w.grad, b.grad]


def matches_torch(kernel: BnActKernel) -> bool:
    """True if the kernel equals torch's ops exactly on a probe map (16 and 24 channels: full vectors and a
    remainder; 1 and 2 threads; outputs, running statistics and all gradients)."""
    before = torch.get_num_threads()
    try:
        for threads, (n, c, h, w) in ((1, (2, 24, 9, 7)), (2, (3, 16, 11, 5)), (2, (2, 24, 9, 7))):
            torch.set_num_threads(threads)
            gen = torch.Generator().manual_seed(c * 7 + h)
            x = (torch.randn(n, c, h, w, generator=gen) * 2 + 0.5).contiguous(memory_format=torch.channels_last)
            wt, bs, rm, rv = (torch.randn(c, generator=gen), torch.randn(c, generator=gen),
                              torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5)
            g = torch.randn(n, c, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
            ref = _torch_step(x, wt, bs, rm.clone(), rv.clone(), g, 0.1)
            rm2, rv2 = rm.clone(), rv.clone()
            y, mean, invstd, a, b = kernel.forward(x, wt, bs, 1e-3, 0.1, 0.1, rm2, rv2)
            got = [y, rm2, rv2, *kernel.backward(g, x, wt, mean, invstd, a, b, 0.1)]
            if not all(torch.equal(p, q) for p, q in zip(got, ref)):
                return False
        return True
    finally:
        torch.set_num_threads(before)


def _load(lib: ctypes.CDLL) -> BnActKernel | None:
    """The kernel in the arithmetic variant that equals torch here, or None (warned) if neither does."""
    for fused in (1, 0):
        kernel = BnActKernel(lib, fused)
        if matches_torch(kernel):
            return kernel
    LOGGER.warning(f"{SOURCE.stem}: the kernel does not reproduce torch's BatchNorm rounding with this torch "
                   f"({torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}); BatchNorm "
                   "trains with torch's ops")
    return None


def load_bn_kernel() -> BnActKernel | None:
    """The kernel, built and checked against torch on the first call; None if disabled, not built or not exact."""
    return load_source(SOURCE, "bn_train_kernel", "fused CPU BatchNorm + activation training kernel", _load)


class _BnActTrain(torch.autograd.Function):
    """act(batch_norm(x)) in training with the kernel's forward and backward; running statistics moved in place."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, slope, momentum, running_mean, running_var, kernel):  # noqa: D401
        y, mean, invstd, a, b = kernel.forward(x, weight, bias, eps, slope, momentum, running_mean, running_var)
        ctx.save_for_backward(x, weight, mean, invstd, a, b)
        ctx.slope, ctx.kernel = slope, kernel
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, mean, invstd, a, b = ctx.saved_tensors
        dx, dw, db = ctx.kernel.backward(dy, x, weight, mean, invstd, a, b, ctx.slope)
        need = ctx.needs_input_grad
        return (dx if need[0] else None), (dw if need[1] else None), (db if need[2] else None), *(None,) * 6


def _momentum(norm: nn.BatchNorm2d) -> float | None:
    """Count the batch and return the running statistics' update factor, as ``_BatchNorm.forward`` does (None: no
    running statistics to update)."""
    if not (norm.training and norm.track_running_stats) or norm.running_mean is None:
        return None
    norm.num_batches_tracked.add_(1)
    return 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else float(norm.momentum)


def bn_act_train(x: torch.Tensor, norm: nn.BatchNorm2d, weight: torch.Tensor, bias: torch.Tensor,
                 slope: float) -> torch.Tensor | None:
    """act(norm(x)) of a channels-last float32 CPU conv output x (N, C, H, W) with ``norm`` in training mode and its
    float32 weight and bias (C,) (ones and zeros if it has none), by the kernel; None where it does not apply (the
    caller then runs torch's ops). Updates the running statistics and ``num_batches_tracked`` as torch does."""
    if x.numel() // x.shape[1] <= torch.get_num_threads():
        return None  # torch sums maps of no more pixels than threads per channel in double
    stats = (norm.running_mean, norm.running_var)
    if norm.track_running_stats and any(s is None or s.dtype != torch.float32 or not s.is_contiguous()
                                        for s in stats):
        return None
    kernel = load_bn_kernel()
    if kernel is None:
        return None
    momentum = _momentum(norm)
    return _BnActTrain.apply(x, weight.contiguous(), bias.contiguous(), float(norm.eps), slope, momentum,
                             *(stats if momentum is not None else (None, None)), kernel)
