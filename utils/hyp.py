"""Hyper-parameter files (cfg/hyp/*.yaml): the one reader, with the training contract.

Every key of cfg/hyp/scratch.yaml must be there with a number (``close_mosaic`` and ``perspective`` may be left
out); ``optimizer`` may name the optimizer the values were tuned for. ``data.augment.augment_params`` then picks
and range-checks the augmentation keys of the result.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from utils.general import ROOT, ConfigError, load_yaml

OPTIMIZERS = ("SGD", "AdamW")
SCRATCH = ROOT / "cfg" / "hyp" / "scratch.yaml"
OPTIONAL_HYP = {"close_mosaic": 0.0, "perspective": 0.0}  # keys a hyp file may leave out, with defaults


def load_hyp(path: str | Path) -> dict[str, Any]:
    """Read a hyp YAML and check it has every key of cfg/hyp/scratch.yaml with a numeric value; returns floats
    (``close_mosaic`` a whole number) plus ``optimizer`` when the file names one."""
    hyp = load_yaml(path, "hyp file")
    required = load_yaml(SCRATCH, "hyp file")
    missing = [k for k in required if k not in hyp and k not in OPTIONAL_HYP]
    if missing:
        raise ConfigError(f"hyp file '{path}': missing key '{missing[0]}' "
                          f"(every key of cfg/hyp/scratch.yaml is needed)")
    opt_name = hyp.pop("optimizer", None)  # optional: the optimizer these values were tuned for
    if opt_name is not None and opt_name not in OPTIMIZERS:
        raise ConfigError(f"hyp file '{path}': key 'optimizer' expected one of {', '.join(OPTIMIZERS)}, "
                          f"got {opt_name!r}")
    for k, v in hyp.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"hyp file '{path}': key '{k}' must be a number, got {v!r}")
    out: dict[str, Any] = {**OPTIONAL_HYP, **{k: float(v) for k, v in hyp.items()}}
    if out["close_mosaic"] < 0 or out["close_mosaic"] != int(out["close_mosaic"]):
        raise ConfigError(f"hyp file '{path}': key 'close_mosaic' expected a whole number of epochs >= 0, "
                          f"got {hyp['close_mosaic']!r}")
    if opt_name is not None:
        out["optimizer"] = opt_name
    return out
