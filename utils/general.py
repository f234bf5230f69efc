"""Small helpers shared by every script: logging, YAML loading, run folders, devices and seeds."""
from __future__ import annotations

import importlib
import logging
import os
import random
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np
import torch
import yaml

LOGGER = logging.getLogger("normyolo")
ROOT = Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """Bad user input (config file, key, CLI value). Scripts print its one-line message and exit 2."""


def setup_logging(verbose: bool = True, rank: int = -1) -> None:
    """Configure the 'normyolo' logger once, from a script's main() (never at import time)."""
    level = logging.INFO if verbose and rank in (-1, 0) else logging.WARNING
    if not LOGGER.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOGGER.addHandler(handler)
    LOGGER.setLevel(level)
    LOGGER.propagate = False


def import_optional(module: str, purpose: str) -> Any:
    """Import an optional dependency (onnx, onnxruntime, tensorboard) when a feature first needs it; a missing one is
    a ConfigError saying what to install, so the core install stays lean."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{purpose} needs the '{module.split('.')[0]}' package: "
                          "pip install -r requirements-export.txt") from None


@contextmanager
def scoped_env(**values: str) -> Iterator[None]:
    """Set environment variables for the body only; the caller's environment is restored afterwards, so importing
    a module that uses this leaves os.environ as it found it."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_yaml(path: str | Path, what: str = "YAML file") -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load``; raise ConfigError with a one-line message on any problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} '{p}' not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{what} '{p}'{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} '{p}': expected a mapping at top level, got {type(data).__name__}")
    return data


def increment_path(path: str | Path, exist_ok: bool = False, mkdir: bool = True) -> Path:
    """runs/train/exp -> runs/train/exp2, exp3, ... unless exist_ok; creates the folder when mkdir."""
    path = Path(path)
    if path.exists() and not exist_ok:
        n = 2
        while (path.parent / f"{path.name}{n}").exists():
            n += 1
        path = path.parent / f"{path.name}{n}"
    if mkdir:
        path.mkdir(parents=True, exist_ok=True)
    return path


def _device_spec(device: str | int | None) -> str:
    return str(device).strip().lower().replace("cuda:", "") if device is not None else ""


def selects_cpu(device: str | int | None = "") -> bool:
    """Whether ``select_device(device)`` gives the CPU ('cpu', or '' on a machine without CUDA); never raises."""
    spec = _device_spec(device)
    return spec == "cpu" or (spec == "" and not torch.cuda.is_available())


def select_device(device: str | int | None = "") -> torch.device:
    """'' -> cuda:0 when available else cpu; 'cpu'; '0' or 0 -> cuda:0; '0,1' -> cuda:<LOCAL_RANK or 0>."""
    spec = _device_spec(device)
    if selects_cpu(device):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    ids = [s for s in spec.split(",") if s != ""] or ["0"]
    if not all(s.isdigit() for s in ids):
        raise ConfigError(f"--device {device}: expected 'cpu', a GPU index like 0, or a list like 0,1")
    n = torch.cuda.device_count()
    bad = [s for s in ids if int(s) >= n]
    if bad:
        raise ConfigError(f"--device {device}: GPU {bad[0]} requested but only {n} visible")
    local_rank = int(os.environ.get("LOCAL_RANK", -1))
    idx = int(ids[local_rank]) if 0 <= local_rank < len(ids) else int(ids[0])
    return torch.device(f"cuda:{idx}")


def init_seeds(seed: int = 0, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def run_cli(main: Callable[[Any], Any], parse_opt: Callable[[list[str] | None], Any],
            argv: list[str] | None = None, failures: tuple[type[Exception], ...] = ()) -> int:
    """Script entry point: ``main(parse_opt(argv))``; a ConfigError becomes 'error: ...' on stderr and exit code 2,
    one of ``failures`` (the run itself failed, e.g. training diverged) 'error: ...' and exit code 1."""
    try:
        main(parse_opt(argv))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except failures as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file via a temporary file in the same folder, fsync and os.replace: readers and crashes never see a
    partial file. ``write`` receives the open binary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """UTF-8 text through :func:`atomic_write`: readers never see a partial file."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))
