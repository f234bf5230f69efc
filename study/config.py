"""The norm × batch-size × seed study behind compare.py: the cell grid, presets, settings and study folders.

Running the cells is study/runner.py; tables, figure and CSV I/O are study/report.py.

A study folder (``runs/compare/<name>``) holds:

- ``study.yaml``: the settings the study was started with (``--resume`` reuses them: a resumed study is the same one);
- ``study.csv``: one row per finished run, rewritten atomically after every run (temporary file + ``os.replace``),
  so a kill at any moment leaves either the old or the new file, never half a row;
- ``study.md`` / ``study.png``: the table and the figure, refreshed after every run (partial studies are readable);
- ``runs/<norm>-b<batch>-s<seed>/``: each run's own train.py folder.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data.loader import load_data_config
from engine.config import DEFAULT_HYP, TrainConfig, add_train_arguments, given_flags
# Every run accumulates gradients up to NOMINAL_BATCH images per optimizer step, so the effective batch is the same
# in every cell and only the number of images each normalisation layer sees per forward pass changes.
from engine.optim import NOMINAL_BATCH
from models.norm import parse_norm_spec
from utils.dist import dist_env
from utils.general import LOGGER, ROOT, ConfigError, increment_path, load_yaml, selects_cpu, write_text_atomic

# Ready-made studies. gn-paper: the Group Normalization paper's question (BN vs GN with 16 channels per group as the
# per-step batch shrinks) on the study variant of the built-in data (cfg/data/synthetic-study.yaml: six shape
# classes, 192-256 px images, medium and large objects), sized for 18 runs in <= 60 min on 2 CPU cores: 2,000 images
# x 5 epochs per run at 192 px, nominal batch 16, two cells at a time with one thread each (jobs: an execution
# setting, not a cell setting). Every cell has the same settings apart from the norm and the per-step batch;
# docs/compare.md gives the arithmetic and how the length was chosen (on BN and GN at batch 16 with a seed outside
# the study, never on BN-vs-GN differences).
PRESETS: dict[str, dict[str, Any]] = {
    "gn-paper": {
        "data": str(ROOT / "cfg" / "data" / "synthetic-study.yaml"), "norms": ["bn", "gn:C/16"],
        "batch_sizes": [16, 4, 2],
        "seeds": [0, 1, 2], "epochs": 5, "img": 192, "nbs": 16, "jobs": 2,
    },
}


@dataclass(frozen=True)
class Cell:
    """One run of the study: a norm spec trained with one per-step batch size and one seed."""

    norm: str
    batch_size: int
    seed: int

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.norm.lower(), self.batch_size, self.seed)

    @property
    def run_name(self) -> str:
        """A folder-safe name: 'gn:C/16' -> 'gn-C16-b8-s0'."""
        slug = re.sub(r"[^A-Za-z0-9]+", "-", self.norm.replace("/", "")).strip("-")
        return f"{slug}-b{self.batch_size}-s{self.seed}"


@dataclass
class StudyConfig:
    """Everything that defines a study; saved to study.yaml so --resume continues exactly the same grid."""

    data: str
    cfg: str
    norms: list[str]
    batch_sizes: list[int]
    seeds: list[int]
    epochs: int
    img: int
    hyp: str | None = None
    device: str = ""
    workers: int = -1  # train.py's auto layout (engine.config.default_workers)
    train_args: list[str] = field(default_factory=list)  # extra train.py flags, passed verbatim to every run
    infer_batch: int = 8  # images per forward when timing inference (a few batches after training)
    nbs: int = NOMINAL_BATCH  # nominal batch (images per optimizer step), the same in every cell
    nproc: int = 1  # > 1: every cell is a torchrun job of nproc processes, each with the cell's batch
    jobs: int = 1  # cells trained side by side (each a train.py process with cores / jobs threads); not a setting
    # of any cell, so --resume may change it

    def validate(self) -> None:
        """Raise ConfigError (one line) for an empty or duplicated grid or impossible numbers."""
        for name, values in (("--norms", self.norms), ("--batch-sizes", self.batch_sizes), ("--seeds", self.seeds)):
            if not values:
                raise ConfigError(f"{name}: give at least one value")
            keys = [str(v).lower() for v in values]
            dup = next((v for v in keys if keys.count(v) > 1), None)
            if dup is not None:
                raise ConfigError(f"{name}: '{dup}' is listed twice")
        if self.nbs < 1:
            raise ConfigError(f"--nbs: expected a positive nominal batch, got {self.nbs}")
        if self.nproc < 1:
            raise ConfigError(f"--nproc: expected 1 or more processes, got {self.nproc}")
        if self.jobs < 1:
            raise ConfigError(f"--jobs: expected 1 or more cells at a time, got {self.jobs}")
        # accumulation rounds nbs / (nproc x batch): only divisors keep the effective batch at exactly nbs
        bad = [b for b in self.batch_sizes if b < 1 or b * self.nproc > self.nbs or self.nbs % (b * self.nproc)]
        if bad:
            divisors = ", ".join(str(d) for d in range(self.nbs // self.nproc, 0, -1)
                                 if self.nbs % (d * self.nproc) == 0)
            procs = f" x {self.nproc} processes" if self.nproc > 1 else ""
            raise ConfigError(f"--batch-sizes: {bad[0]}{procs} does not divide the nominal batch {self.nbs}, so the "
                              f"effective batch would differ between cells (use {divisors})")
        if self.epochs < 1:
            raise ConfigError(f"--epochs: expected >= 1, got {self.epochs}")
        if self.img < 32 or self.img % 32:
            raise ConfigError(f"--img: expected a multiple of 32 (the model's largest stride), got {self.img}")
        for spec in self.norms:  # up front: a typo must not surface after an hour of training
            parse_norm_spec(spec, where="--norms")

    def cells(self) -> list[Cell]:
        """Seed-major order: the first seed of every (norm, batch) finishes first, so an interrupted study
        already holds a complete grid for one seed."""
        return [Cell(n, b, s) for s in self.seeds for b in self.batch_sizes for n in self.norms]

    def save(self, path: Path) -> None:
        write_text_atomic(path, yaml.safe_dump(asdict(self), sort_keys=False))

    @classmethod
    def load(cls, path: Path) -> "StudyConfig":
        raw = load_yaml(path, "study file")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"study file '{path}': unknown key '{unknown[0]}'")
        try:
            return cls(**raw)
        except TypeError as e:
            raise ConfigError(f"study file '{path}': {e}") from None


def train_overrides(args: list[str]) -> dict[str, Any]:
    """``--train-args`` (train.py flags) -> the TrainConfig fields they set; ConfigError for a flag train.py lacks."""
    parser = add_train_arguments(argparse.ArgumentParser(prog="--train-args", add_help=False, exit_on_error=False))
    try:
        return given_flags(parser, args)
    except (argparse.ArgumentError, ConfigError) as e:
        raise ConfigError(f"--train-args: {e}") from None


def cell_settings(config: StudyConfig, cell: Cell, runs_dir: Path) -> dict[str, Any]:
    """The TrainConfig fields the study sets for a cell; ``--train-args`` may set none of these keys."""
    return {
        "data": config.data, "cfg": config.cfg, "norm": cell.norm, "hyp": config.hyp or DEFAULT_HYP,
        "epochs": config.epochs, "batch_size": cell.batch_size, "img": config.img, "device": config.device,
        "workers": config.workers, "seed": cell.seed, "project": str(runs_dir), "name": cell.run_name,
        # every cell trains exactly the planned epochs (no early stop) and is scored once, on its final EMA
        # weights: picking the best epoch on the val split would favour the noisier arm
        "exist_ok": True, "resume": False, "noval": True, "patience": 0, "nbs": config.nbs,
    }


def study_defaults(device: str) -> dict[str, Any]:
    """TrainConfig fields a study sets unless --train-args does. On CPU float32, pinned (``--amp off``, which is
    also what train.py's ``auto`` means there): bfloat16 (``--amp on``) perturbs BN's gradients far more than GN's
    at initialisation (engine/amp.py), so it would not be neutral between the arms, and a study's numbers would
    depend on the CPU model. On CUDA train.py's own ``auto`` (float16 with a GradScaler, as YOLOv5 trains)."""
    return {"amp": "off"} if selects_cpu(device) else {}


def cell_config(config: StudyConfig, cell: Cell, runs_dir: Path) -> TrainConfig:
    """The TrainConfig of one cell: the study's settings, the cell's norm / batch / seed, --train-args."""
    return TrainConfig(**{**study_defaults(config.device), **train_overrides(config.train_args),
                          **cell_settings(config, cell, runs_dir)})


def config_from_args(opt: Any, defaults: dict[str, Any]) -> StudyConfig:
    """compare.py's namespace -> StudyConfig; grid flags left out fall back to the preset's, then `defaults`."""
    base = dict(defaults)
    if getattr(opt, "preset", None):
        base.update({k: v for k, v in PRESETS[opt.preset].items() if k in base})
    pick = {k: (getattr(opt, k) if getattr(opt, k, None) is not None else v) for k, v in base.items()}
    overridden = [k for k in base if getattr(opt, k, None) is not None]
    if getattr(opt, "preset", None) and overridden:
        LOGGER.warning(f"compare: --preset {opt.preset} with {', '.join('--' + k for k in overridden)} "
                       "given explicitly: this is no longer the preset's study")
    try:
        extra = shlex.split(opt.train_args or "")
    except ValueError as e:
        raise ConfigError(f"--train-args: {e}") from None
    config = StudyConfig(data=str(pick["data"]), cfg=str(pick["cfg"]), norms=[str(n) for n in pick["norms"]],
                         batch_sizes=[int(b) for b in pick["batch_sizes"]], seeds=[int(s) for s in pick["seeds"]],
                         epochs=int(pick["epochs"]), img=int(pick["img"]), hyp=opt.hyp, device=str(opt.device),
                         workers=int(opt.workers), train_args=extra, nbs=int(pick.get("nbs", NOMINAL_BATCH)),
                         nproc=int(getattr(opt, "nproc", 1)),
                         jobs=int(getattr(opt, "jobs", None) or PRESETS.get(getattr(opt, "preset", None) or "", {})
                                  .get("jobs", 1)))
    owned = sorted(set(train_overrides(extra)) & set(cell_settings(config, Cell("bn", 1, 0), Path("."))))
    if owned:  # these are the study's own settings: a silent override would make cells differ unseen
        flag = "--" + owned[0].replace("_", "-")
        raise ConfigError(f"--train-args: {flag} is set by compare.py itself; use its own flag")
    config.validate()  # before any folder is created
    return config


def subset_coco_dataset(data: str, n_train: int, n_val: int, out_dir: Path) -> Path:
    """Write a dataset YAML (+ instances JSONs) holding the first n_train / n_val images of a COCO-format dataset.

    The built-in dataset draws every image from its own RNG, so its first N images are an unbiased sample; the
    subset points at the original image folders (nothing is copied). Returns the new YAML's path.
    """
    d = load_data_config(data)  # generates the built-in dataset on first use
    if d["format"] != "coco":
        raise ConfigError(f"--preset: the dataset '{data}' must be in COCO format to take a subset")
    out_dir.mkdir(parents=True, exist_ok=True)
    entry: dict[str, Any] = {"path": str(out_dir.resolve()), "format": "coco", "names": list(d["names"])}
    if d.get("cache"):
        entry["cache"] = d["cache"]  # the dataset's own RAM-cache default carries over to its subset
    for split, n in (("train", n_train), ("val", n_val)):
        with open(d[split], encoding="utf-8") as f:
            coco = json.load(f)
        if len(coco["images"]) < n:
            raise ConfigError(f"--preset: '{d[split]}' has {len(coco['images'])} images, the preset needs {n}")
        coco["images"] = coco["images"][:n]
        ids = {im["id"] for im in coco["images"]}
        coco["annotations"] = [a for a in coco.get("annotations", []) if a.get("image_id") in ids]
        write_text_atomic(out_dir / f"instances_{split}.json", json.dumps(coco, separators=(",", ":")))
        entry[split] = f"instances_{split}.json"
        entry[f"{split}_images"] = d[f"{split}_images"]  # absolute: the original folder
    dst = out_dir / "data.yaml"
    write_text_atomic(dst, f"# first {n_train} train / {n_val} val images of {data}\n"
                      + yaml.safe_dump(entry, sort_keys=False))
    return dst


def prepare_preset(config: StudyConfig, preset: str, save_dir: Path) -> StudyConfig:
    """Apply a preset's dataset subset (if any) by pointing config.data at a subset YAML inside the study folder."""
    spec = PRESETS[preset]
    if spec.get("train_images"):
        config.data = str(subset_coco_dataset(config.data, int(spec["train_images"]), int(spec["val_images"]),
                                              Path(save_dir) / "data"))
    return config


def new_study_dir(project: str | Path, name: str, exist_ok: bool = False) -> Path:
    """project/name, incremented (name2, name3, ...) unless exist_ok."""
    if dist_env().world_size > 1 and not exist_ok:
        # every torchrun process picks the folder on its own: incrementing could give each rank a different one
        raise ConfigError("under torchrun pass --name NAME --exist-ok (or --resume DIR) so all processes share "
                          "one study folder")
    return increment_path(Path(project) / name, exist_ok=exist_ok)


def latest_study_dir(project: str | Path) -> Path:
    """The most recently modified study folder (one with a study.yaml) under project."""
    found = sorted(Path(project).glob("*/study.yaml"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ConfigError(f"--resume: no study (a folder with study.yaml) under '{project}'")
    return found[-1].parent


def open_study(opt: Any, defaults: dict[str, Any]) -> tuple[StudyConfig, Path]:
    """compare.py's namespace -> (config, study folder): a new folder, or --resume's with its saved settings."""
    if opt.resume is not None:
        save_dir = Path(opt.resume) if opt.resume else latest_study_dir(opt.project)
        if not (save_dir / "study.yaml").is_file():
            raise ConfigError(f"--resume: '{save_dir}' is not a study folder (no study.yaml)")
        config = StudyConfig.load(save_dir / "study.yaml")
        if opt.device:  # the hardware may change between sessions; the grid and training settings may not
            config.device = opt.device
        if getattr(opt, "jobs", None):
            config.jobs = int(opt.jobs)
            config.validate()
        LOGGER.info(f"compare: resuming {save_dir} with its saved settings")
        return config, save_dir
    config = config_from_args(opt, defaults)
    save_dir = new_study_dir(opt.project, opt.name or opt.preset or "study", exist_ok=opt.exist_ok)
    if opt.preset:
        config = prepare_preset(config, opt.preset, save_dir)
    return config, save_dir


