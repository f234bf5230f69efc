"""Device-dependent training speed switches: CPU threads, the weights' memory format and ``torch.compile``.

Memory format: channels_last (NHWC) weights on CPU and CUDA. On CPU oneDNN's NHWC convolutions are ~15 % faster for
BN and GN alike. On CUDA (an H200, float16 autocast, 640 px, batch 64, the step alone:
``benchmarks/cuda_check.sh``, docs/cuda.md) NHWC trained BN 2.6x and GN 1.5x faster than NCHW
(932 vs 362 and 648 vs 441 images/s).

``--compile``: ``torch.compile`` of the model being trained, in place (``nn.Module.compile``), so state_dict keys,
the EMA copy, checkpoints and DDP wrapping stay as they are; the loss is not compiled (its target count changes every
batch). Opt-in everywhere, because it measured no faster: on CPU eager and compiled steps took the same time, and on
the H200 the compiled BN step was slower (806 vs 932 images/s) while the GN model had not finished compiling after
115 s (docs/cuda.md).
"""
from __future__ import annotations

import os
import shutil

import torch
import torch.nn as nn

from utils.general import ConfigError

CHANNELS_LAST_DEVICES = ("cpu", "cuda")  # where NHWC training was measured faster (above)


def cores_per_process() -> int:
    """The cores this process owns: all of them, shared evenly between torchrun's LOCAL_WORLD_SIZE processes."""
    return max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def set_cpu_threads() -> None:
    """One intra-op thread per core this process owns, unless OMP_NUM_THREADS says otherwise (torchrun sets it
    to 1 for several processes; raise it so that processes x threads = cores)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cores_per_process())


def train_channels_last(device: torch.device, override: bool | None = None) -> bool:
    """Whether the model trains with channels_last weights on ``device`` (``override``: force on / off)."""
    return device.type in CHANNELS_LAST_DEVICES if override is None else override


def check_compile(device: torch.device) -> None:
    """Raise a one-line ConfigError when ``--compile`` cannot work here (before any data is loaded)."""
    if not hasattr(nn.Module, "compile"):
        raise ConfigError(f"--compile: torch {torch.__version__} has no nn.Module.compile (torch >= 2.2 needed)")
    if device.type == "cuda":
        from torch.utils._triton import has_triton
        if not has_triton():
            raise ConfigError("--compile on CUDA needs Triton (pip install triton), which is not importable here")
    elif device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        raise ConfigError("--compile on CPU needs a C++ compiler (g++ / clang++) on PATH; none was found")


def compile_model(model: nn.Module, device: torch.device) -> None:
    """Compile ``model``'s forward in place. Static shapes: a last, smaller batch gets its own graph (one recompile)
    instead of a slower dynamic-shape graph for every batch."""
    check_compile(device)
    model.compile(dynamic=False)
