"""``TrainConfig``: every training setting as one typed value, built once (from the command line or by the study).

``add_train_arguments`` defines train.py's flags; ``TrainConfig.from_namespace`` turns parsed flags into a config;
``resolve_resume`` and ``check_config`` finish it (``engine.fit.setup`` calls them). The engine only ever reads a ``TrainConfig``.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from engine.accel import cores_per_process
from engine.amp import AMP_MODES
from engine.checkpoint import load_checkpoint
from engine.optim import NOMINAL_BATCH
from utils.general import ROOT, ConfigError

DEFAULT_DATA = str(ROOT / "cfg" / "data" / "synthetic.yaml")
DEFAULT_CFG = str(ROOT / "cfg" / "models" / "yolo-n-bn.yaml")
DEFAULT_HYP = str(ROOT / "cfg" / "hyp" / "synthetic.yaml")


def default_workers(device_type: str = "cpu") -> int:
    """Loader worker processes for ``--workers -1`` (auto). CPU training with at most 2 cores per process: none,
    the batches are built in the training process (``data.loader.InProcessLoader``: the same batches as one
    worker). A worker there takes time slices from the 2 training threads, which then wait for each other: on
    a 2-core AVX2 CPU in-process loading gave 9-15 % more training images/s from the RAM cache and 2-11 % more
    decoding coco128's JPEGs (docs/speed.md). Otherwise (a GPU, or more cores): half the cores, 1 to 8, so
    loading overlaps the step."""
    if device_type == "cpu" and cores_per_process() <= 2:
        return 0
    return min(8, max(1, (os.cpu_count() or 1) // 2))


def resolve_cache(flag: str | None, data_cfg: dict[str, Any]) -> bool:
    """Whether to cache decoded images in RAM: ``--cache ram`` / ``--cache off`` win; no flag: the data YAML's
    ``cache`` key (the built-in data sets ``ram``); else no cache."""
    return (data_cfg.get("cache") == "ram") if flag is None else flag == "ram"


@dataclass
class TrainConfig:
    """One training run. Field order is train.py's flag order: it is the key order of opt.yaml and of the
    checkpoint's ``opt`` (``save_dir`` last, filled in by ``engine.fit.setup``)."""

    data: str = DEFAULT_DATA
    cfg: str = DEFAULT_CFG
    norm: str = ""
    hyp: str = DEFAULT_HYP
    weights: str = ""
    epochs: int = 15
    batch_size: int = 16
    nbs: int = NOMINAL_BATCH
    img: int = 320
    device: str = ""
    workers: int = -1
    project: str = "runs/train"
    name: str = "exp"
    exist_ok: bool = False
    resume: bool | str = False
    seed: int = 0
    deterministic: bool = False
    patience: int = 100
    cos_lr: bool = False
    optimizer: str | None = None
    sync_bn: bool = False
    cache: str | None = None
    noval: bool = False
    save_period: int = -1
    close_mosaic: int | None = None
    noautoanchor: bool = False
    nonfinite_limit: int = 10
    tensorboard: bool = True
    amp: str = "auto"
    compile: bool = False
    save_dir: str = ""

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace | dict[str, Any]) -> "TrainConfig":
        """Keep the keys that are fields (a checkpoint's saved ``opt`` may hold more, or fewer)."""
        raw = vars(ns) if isinstance(ns, argparse.Namespace) else dict(ns)
        names = {f.name for f in fields(cls)}
        return cls(**{k: (str(v) if isinstance(v, Path) else v) for k, v in raw.items() if k in names})

    def plain(self) -> dict[str, Any]:
        """Plain YAML / weights_only-safe values (what opt.yaml and the checkpoint's ``opt`` hold)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """train.py's flags (Ultralytics-style); ``dest`` names are the :class:`TrainConfig` fields."""
    d = TrainConfig()
    p.add_argument("--data", default=d.data, help="dataset YAML")
    p.add_argument("--cfg", default=d.cfg, help="model YAML")
    p.add_argument("--norm", default="", help="norm spec overriding the model YAML's, e.g. bn, gn:C/16, gn:32, ln, in")
    p.add_argument("--hyp", default=d.hyp, help="hyper-parameter YAML (keys of cfg/hyp/scratch.yaml)")
    p.add_argument("--weights", default="", help="initial weights (a NormYOLO .pt); matching tensors are transferred")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="total batch over all DDP processes")
    p.add_argument("--nbs", type=int, default=d.nbs,
                   help="nominal batch: gradients are accumulated up to this many images per optimizer step")
    p.add_argument("--img", "--img-size", "--imgsz", dest="img", type=int, default=d.img, help="train / val size (px)")
    p.add_argument("--device", default="", help="cpu, 0 or 0,1 (default: GPU 0 when present, else cpu)")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="dataloader workers per process (-1: auto, see engine.config.default_workers)")
    p.add_argument("--project", default=d.project, help="runs go to project/name")
    p.add_argument("--name", default=d.name)
    p.add_argument("--exist-ok", action="store_true", help="reuse project/name instead of making exp2, exp3, ...")
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="continue the latest run under --project, or the given last.pt / run folder")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--deterministic", action="store_true", help="ask torch for deterministic kernels (slower)")
    p.add_argument("--patience", type=int, default=d.patience,
                   help="stop after this many epochs without improvement (0: off)")
    p.add_argument("--cos-lr", action="store_true", help="cosine LR decay instead of linear")
    p.add_argument("--optimizer", default=None, choices=["SGD", "AdamW"],
                   help="default: the hyp file's 'optimizer' key, else SGD")
    p.add_argument("--sync-bn", action="store_true", help="DDP: convert BatchNorm to SyncBatchNorm")
    p.add_argument("--cache", nargs="?", const="ram", default=None, choices=["ram", "off", "disk"],
                   help="cache decoded images in RAM; default: the data YAML's 'cache' key, else off "
                        "('disk' is refused: not implemented)")
    p.add_argument("--noval", action="store_true", help="validate only after the final epoch")
    p.add_argument("--save-period", type=int, default=d.save_period, help="also save weights/epochN.pt every N epochs")
    p.add_argument("--close-mosaic", type=int, default=None,
                   help="train the final N epochs without mosaic (default: the hyp file's close_mosaic, else 0)")
    p.add_argument("--noautoanchor", action="store_true", help="keep the model's anchors as they are")
    p.add_argument("--nonfinite-limit", type=int, default=d.nonfinite_limit,
                   help="stop after this many non-finite losses in a row")
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false",
                   help="write no TensorBoard event files (written to the run folder when tensorboard is installed)")
    p.add_argument("--amp", default=d.amp, choices=AMP_MODES,
                   help="mixed precision. auto: float16 + GradScaler on CUDA, float32 on CPU; on: float16 on CUDA, "
                        "bfloat16 autocast on CPU (about 1.3x faster with AMX / AVX512-BF16, costs BN models "
                        "accuracy: docs/training.md); off: float32")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model being trained (first steps take a while to compile; "
                        "see docs/speed.md for where it is faster)")
    return p


def config_to_argv(cfg: TrainConfig) -> list[str]:
    """train.py flags that rebuild ``cfg`` (fields left at their defaults are omitted; ``save_dir`` is derived).
    Used to launch a config as a separate process, e.g. one torchrun job per study cell."""
    base, argv = TrainConfig(), []
    for f in fields(TrainConfig):
        v = getattr(cfg, f.name)
        if f.name == "save_dir" or v == getattr(base, f.name) or v is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, bool):  # store_true flags, and --no-NAME for the one that defaults to True
            argv += [flag] if v else ["--no-" + f.name.replace("_", "-")]
        else:
            argv += [flag, str(v)]
    return argv


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, Any]:
    """Only the settings ``argv`` names (as field name -> value), parsed by ``parser`` (e.g. the study's
    ``--train-args``). argparse leaves attributes that the namespace already has alone, so a sentinel in every
    field marks the flags not given; a flag given with its default value still shows up."""
    unset = object()
    ns, unknown = parser.parse_known_args(argv, argparse.Namespace(**{f.name: unset for f in fields(TrainConfig)}))
    if unknown:
        raise ConfigError(f"'{unknown[0]}' is not a train.py flag")
    return {k: v for k, v in vars(ns).items() if v is not unset}


def latest_checkpoint(project: str | Path) -> Path:
    """The most recently written ``*/weights/last.pt`` under ``project``."""
    found = sorted(Path(project).glob("*/weights/last.pt"), key=lambda f: f.stat().st_mtime)
    if not found:
        raise ConfigError(f"--resume: no run with weights/last.pt under '{project}'")
    return found[-1]


def resolve_resume(cfg: TrainConfig) -> TrainConfig:
    """The configuration saved in the checkpoint being resumed (the run's exact settings), pointing at it."""
    last = latest_checkpoint(cfg.project) if cfg.resume is True else Path(cfg.resume)
    if last.is_dir():
        last = last / "weights" / "last.pt"
    saved = load_checkpoint(last).get("opt") or {}
    merged = TrainConfig.from_namespace({**TrainConfig().plain(), **saved})
    return replace(merged, resume=str(last), save_dir=str(last.resolve().parent.parent))


def check_config(cfg: TrainConfig) -> TrainConfig:
    """Reject impossible values with a one-line ConfigError naming the flag; bare cfg / hyp file names resolve
    against cfg/models/ and cfg/hyp/. Returns the config with those paths filled in."""
    if cfg.epochs < 1:
        raise ConfigError(f"--epochs {cfg.epochs}: expected a positive number of epochs")
    if cfg.batch_size < 1:
        raise ConfigError(f"--batch-size {cfg.batch_size}: expected a positive batch size")
    if cfg.img < 32 or cfg.img % 32:
        raise ConfigError(f"--img {cfg.img}: expected a multiple of 32 (the largest stride), e.g. 320 or 640")
    if cfg.nbs < 1:
        raise ConfigError(f"--nbs {cfg.nbs}: expected a positive nominal batch (64 by default)")
    if cfg.workers < -1:
        raise ConfigError(f"--workers {cfg.workers}: expected 0 or more (or -1 for auto)")
    if cfg.close_mosaic is not None and cfg.close_mosaic < 0:
        raise ConfigError(f"--close-mosaic {cfg.close_mosaic}: expected 0 or more epochs")
    if cfg.cache not in (None, False, "ram", "off"):  # no disk cache: refused rather than silently cached in RAM
        raise ConfigError(f"--cache {cfg.cache}: not implemented; use --cache ram (or no cache)")
    paths = {}
    for flag, folder in (() if cfg.resume else (("cfg", "models"), ("hyp", "hyp"))):  # resume: from the ckpt
        p = Path(getattr(cfg, flag))
        if not p.is_file() and not p.is_absolute() and (ROOT / "cfg" / folder / p).is_file():
            paths[flag] = str(ROOT / "cfg" / folder / p)  # bare names: yolo-n-gn.yaml, scratch.yaml
        elif not p.is_file():
            raise ConfigError(f"--{flag} {p}: file not found (a path, or a file name from cfg/{folder}/)")
    if cfg.weights and not cfg.resume and not Path(cfg.weights).is_file():
        raise ConfigError(f"--weights {cfg.weights}: file not found")
    return replace(cfg, **paths)

