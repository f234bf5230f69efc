"""Checkpoints: atomic writes of tensors + plain metadata, loadable with ``torch.load(..., weights_only=True)``."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from models.yolo import Model
from utils.dist import de_parallel
from utils.general import ConfigError, atomic_write

VERSION = "0.1.0"
REQUIRED_KEYS = ("model", "model_yaml")


def all_finite(state: dict[str, torch.Tensor] | None) -> bool:
    """True when every floating-point tensor of a state_dict is finite (one reduction over all of them)."""
    floats = [v.detach().reshape(-1).float() for v in (state or {}).values()
              if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return not floats or bool(torch.isfinite(torch.cat(floats)).all())  # one pass, not one check per tensor


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> Path:
    """Write ``ckpt`` to ``path`` atomically (temporary file in the same folder, fsync, rename).

    A crash or ``kill -9`` mid-write leaves the previous file intact. Refuses non-finite model / EMA weights.
    """
    path = Path(path)
    for key in ("model", "ema"):
        if not all_finite(ckpt.get(key)):
            raise ValueError(f"refusing to save {path}: non-finite values in '{key}' weights")
    ckpt = {**ckpt, "version": VERSION, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic_write(path, lambda f: torch.save(ckpt, f))
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a NormYOLO checkpoint safely (weights_only); ConfigError with a one-line reason if it can't."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint '{path}' not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors come in many types; all mean the same to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"checkpoint '{path}' cannot be read as a NormYOLO checkpoint ({first[:160]})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise ConfigError(f"checkpoint '{path}' is not a NormYOLO checkpoint (expected keys {list(REQUIRED_KEYS)})")
    return ckpt


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """fp32 CPU state_dict of a model, unwrapping DDP / EMA containers."""
    m = de_parallel(model)
    return {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
            for k, v in m.state_dict().items()}


def model_from_checkpoint(ckpt_or_path: dict[str, Any] | str | Path, device: str | torch.device = "cpu",
                          prefer_ema: bool = True) -> nn.Module:
    """Rebuild the Model from a checkpoint's ``model_yaml`` and load its (EMA) weights; eval mode, unfused."""
    ckpt = load_checkpoint(ckpt_or_path) if isinstance(ckpt_or_path, (str, Path)) else ckpt_or_path
    where = str(ckpt_or_path) if isinstance(ckpt_or_path, (str, Path)) else "checkpoint"
    model = Model(ckpt["model_yaml"])
    state = ckpt.get("ema") if prefer_ema and ckpt.get("ema") else ckpt["model"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"{where}: weights do not match its model_yaml ({str(e).splitlines()[0][:160]})") from None
    if ckpt.get("names"):
        model.names = list(ckpt["names"])
    return model.to(device).eval()


def load_model(weights: str | Path, device: torch.device, fuse: bool = True) -> nn.Module:
    """A checkpoint's model for inference (val.py, detect.py, the study's timing): EMA weights preferred, BN folded,
    channels_last on CPU (faster there, see benchmarks/inference.py), eval mode. An unreadable checkpoint is a
    ConfigError naming it."""
    model = model_from_checkpoint(weights, device=device, prefer_ema=True)
    model.eval()
    if fuse:
        model.fuse()
    if device.type == "cpu":
        model.to(memory_format=torch.channels_last)
    return model
