"""torch.distributed helpers for DDP training launched by ``torchrun`` (gloo on CPU, nccl on CUDA)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["DistEnv", "dist_env", "init_distributed", "cleanup", "is_dist", "barrier", "all_reduce_flag",
           "average_gradients", "broadcast_object", "wrap_ddp", "zero_first", "de_parallel"]


def de_parallel(model: nn.Module) -> nn.Module:
    """The bare model inside a DataParallel / DistributedDataParallel wrapper (the one unwrapping in the project)."""
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: ``rank`` is -1 when not launched by torchrun."""

    rank: int = -1
    local_rank: int = -1
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """True on the process that writes files, prints bars and validates."""
        return self.rank in (-1, 0)


def dist_env() -> DistEnv:
    """Read RANK / LOCAL_RANK / WORLD_SIZE set by torchrun (defaults: single process)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return DistEnv()
    return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), world)


def init_distributed(device: torch.device, timeout_s: int = 1800) -> None:
    """Join the process group: nccl for CUDA devices, gloo for CPU. No-op when already initialised."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def cleanup() -> None:
    """Leave the process group if we are in one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_dist() -> bool:
    """True inside an initialised multi-process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_dist():
        dist.barrier()


def all_reduce_flag(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is True on any rank. Keeps per-step decisions (skip a non-finite step) identical
    everywhere, which DDP needs: a rank that skips a backward would leave the others waiting in all-reduce."""
    if not is_dist():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def average_gradients(model: nn.Module) -> None:
    """Mean of every parameter's gradient over the ranks (what DDP's backward does, for gradients that were
    accumulated under ``no_sync()`` when the batch that would have synchronised them was skipped)."""
    if not is_dist():
        return
    world = dist.get_world_size()
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from ``src`` to every rank (returns it unchanged in a single process)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """Wrap in DistributedDataParallel; the constructor broadcasts rank 0's weights and buffers (anchors too)."""
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)


@contextmanager
def zero_first(rank: int) -> Iterator[None]:
    """Let rank 0 run the body first (e.g. build a dataset cache) while the other ranks wait."""
    if rank > 0:
        barrier()
    yield
    if rank == 0:
        barrier()
