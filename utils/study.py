"""The norm × batch-size × seed study behind compare.py: the cell grid, presets, running cells and resuming.

Tables, figure and CSV I/O live in utils/study_report.py.

A study folder (``runs/compare/<name>``) holds:

- ``study.yaml``: the settings the study was started with (``--resume`` reuses them: a resumed study is the same one);
- ``study.csv``: one row per finished run, rewritten atomically after every run (temporary file + ``os.replace``),
  so a kill at any moment leaves either the old or the new file, never half a row;
- ``study.md`` / ``study.png``: the table and the figure, refreshed after every run (partial studies are readable);
- ``runs/<norm>-b<batch>-s<seed>/``: each run's own train.py folder.
"""
from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from models.norm import parse_norm_spec
from utils.general import LOGGER, ConfigError, increment_path, load_yaml
# Every run accumulates gradients up to NOMINAL_BATCH images per optimizer step, so the effective batch is the same
# in every cell and only the number of images each normalisation layer sees per forward pass changes.
from utils.optim import NOMINAL_BATCH
from utils.study_report import append_row, read_rows, write_reports, write_text_atomic

# Ready-made studies. gn-paper: the Group Normalization paper's question (BN vs GN with 16 channels per group as the
# per-step batch shrinks) on the built-in data. Sized for 16 runs in <= 60 min on 2 CPU cores: 768 images x 6 epochs
# = 4,608 training images per run at 256 px, nominal batch 16 (288 optimizer steps; docs/compare.md has the
# arithmetic and the timings it is based on). Both norms get the same settings; none was chosen by looking at results.
PRESETS: dict[str, dict[str, Any]] = {
    "gn-paper": {
        "norms": ["bn", "gn:C/16"], "batch_sizes": [16, 8, 4, 2], "seeds": [0, 1], "epochs": 6, "img": 256,
        "nbs": 16,
        "train_images": 768, "val_images": 500,  # the first train images and the whole val split of the built-in set
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
    workers: int = 2
    train_args: list[str] = field(default_factory=list)  # extra train.py flags, passed verbatim to every run
    infer_batch: int = 8  # images per forward when timing inference (a few batches after training)
    nbs: int = NOMINAL_BATCH  # nominal batch (images per optimizer step), the same in every cell

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
        # accumulation rounds nbs / batch: only divisors keep the effective batch at exactly nbs in every cell
        bad = [b for b in self.batch_sizes if b < 1 or b > self.nbs or self.nbs % b]
        if bad:
            divisors = ", ".join(str(d) for d in range(self.nbs, 0, -1) if self.nbs % d == 0)
            raise ConfigError(f"--batch-sizes: {bad[0]} does not divide the nominal batch {self.nbs}, so the "
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


# --------------------------------------------------------------------------------------------------- running
def find_weights(run_dir: Path) -> Path | None:
    """best.pt (else last.pt) anywhere under a train.py run folder."""
    for name in ("best.pt", "last.pt"):
        hits = sorted(Path(run_dir).rglob(name))
        if hits:
            return hits[0]
    return None


def time_inference(weights: Path | None, img: int, device: str, batch: int = 8, reps: int = 5) -> float:
    """ms per image of the trained model's forward at the study size, loaded as val.py and detect.py load it
    (val.load_model: EMA weights, BN folded, channels_last on CPU); the fastest of `reps` batches.

    Random pixels are enough: a conv net's forward time does not depend on the content. NMS is not included. The
    minimum, not the mean, because on a shared machine other processes only ever add time.
    """
    if weights is None:
        return math.nan
    import val
    from utils.general import select_device

    dev = select_device(device)
    model = val.load_model(weights, dev)
    x = torch.rand(batch, 3, img, img, device=dev)
    if dev.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)  # as val.py feeds it: no per-layer conversion
    times = []
    with torch.inference_mode():
        model(x)  # warm-up: allocator, kernels
        for _ in range(reps):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            model(x)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
    return 1000 * min(times) / batch


def train_argv(config: StudyConfig, cell: Cell, runs_dir: Path) -> list[str]:
    """The train.py command line of one cell (the same code path as running train.py by hand)."""
    argv = [
        "--data", config.data, "--cfg", config.cfg, "--norm", cell.norm,
        "--epochs", str(config.epochs), "--batch-size", str(cell.batch_size), "--img", str(config.img),
        "--device", config.device, "--workers", str(config.workers), "--seed", str(cell.seed),
        "--project", str(runs_dir), "--name", cell.run_name, "--exist-ok",
        # every cell trains exactly the planned epochs (no early stop) and is scored once, on its final EMA
        # weights: picking the best epoch on the val split would favour the noisier arm
        "--noval", "--patience", "0", "--nbs", str(config.nbs),
    ]
    if config.hyp:
        argv += ["--hyp", config.hyp]
    return argv + list(config.train_args)


def run_cell(config: StudyConfig, cell: Cell, runs_dir: Path) -> dict[str, Any]:
    """Train + validate one cell through train.main, time the fused model, and return its study.csv row.

    A run that diverges (train.py's TrainingDiverged) is a result too, not a crash of the study: its row has
    status 'diverged' and no metrics, and the tables count it.
    """
    import train  # imported here: train.py is a script module with heavy imports, needed only when running
    from utils.engine import TrainingDiverged

    t0 = time.time()
    opt = train.parse_opt(train_argv(config, cell, runs_dir))
    base = {"norm": cell.norm, "batch_size": cell.batch_size, "seed": cell.seed, "img_size": config.img}
    try:
        res = train.main(opt)
    except TrainingDiverged as e:
        LOGGER.warning(f"study: {cell.run_name} diverged ({e}); recorded as 'diverged'")
        return {**base, "status": "diverged", "epochs": config.epochs, "mAP50": math.nan, "mAP50-95": math.nan,
                "precision": math.nan, "recall": math.nan, "train_img_per_s": math.nan,
                "infer_ms_per_img": math.nan, "params": 0, "wall_time_s": time.time() - t0,
                "run_dir": str(getattr(opt, "save_dir", runs_dir / cell.run_name))}
    if not _is_main_rank():  # under torchrun only rank 0 validates and records
        return {}
    run_dir = Path(res.get("save_dir", runs_dir / cell.run_name))
    infer_ms = time_inference(find_weights(run_dir), config.img, config.device, config.infer_batch)
    return {
        **base, "status": "ok", "epochs": int(res.get("epochs", config.epochs)),
        "mAP50": float(res["mAP50"]), "mAP50-95": float(res["mAP50_95"]),
        "precision": float(res["precision"]), "recall": float(res["recall"]),
        "train_img_per_s": float(res.get("train_images_per_s", math.nan)), "infer_ms_per_img": infer_ms,
        "params": int(res.get("params", 0)), "wall_time_s": time.time() - t0,  # the whole cell, timing included
        "run_dir": str(run_dir),
    }


CellRunner = Callable[[StudyConfig, Cell, Path], dict[str, Any]]


def _is_main_rank() -> bool:
    """Under torchrun every rank runs the same cells (DDP inside train.main); only rank 0 writes study files."""
    return int(os.environ.get("RANK", 0)) == 0


# train.py flags that compare.py sets for every cell (train_argv); --train-args may not repeat them
_CELL_FLAGS = {"--data", "--cfg", "--norm", "--hyp", "--epochs", "--batch-size", "--img", "--img-size", "--imgsz",
               "--device", "--workers", "--seed", "--project", "--name", "--exist-ok", "--resume", "--noval",
               "--patience", "--nbs"}


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
    owned = next((a for a in extra if a.split("=")[0] in _CELL_FLAGS), None)
    if owned:  # these are the study's own settings: a silent override would make cells differ unseen
        raise ConfigError(f"--train-args: {owned.split('=')[0]} is set by compare.py itself; use its own flag")
    config = StudyConfig(data=str(pick["data"]), cfg=str(pick["cfg"]), norms=[str(n) for n in pick["norms"]],
                         batch_sizes=[int(b) for b in pick["batch_sizes"]], seeds=[int(s) for s in pick["seeds"]],
                         epochs=int(pick["epochs"]), img=int(pick["img"]), hyp=opt.hyp, device=str(opt.device),
                         workers=int(opt.workers), train_args=extra, nbs=int(pick.get("nbs", NOMINAL_BATCH)))
    config.validate()  # before any folder is created
    return config


def subset_coco_dataset(data: str, n_train: int, n_val: int, out_dir: Path) -> Path:
    """Write a dataset YAML (+ instances JSONs) holding the first n_train / n_val images of a COCO-format dataset.

    The built-in dataset draws every image from its own RNG, so its first N images are an unbiased sample; the
    subset points at the original image folders (nothing is copied). Returns the new YAML's path.
    """
    import json

    from data.loader import load_data_config  # generates the built-in dataset on first use

    d = load_data_config(data)
    if d["format"] != "coco":
        raise ConfigError(f"--preset: the dataset '{data}' must be in COCO format to take a subset")
    out_dir.mkdir(parents=True, exist_ok=True)
    entry: dict[str, Any] = {"path": str(out_dir.resolve()), "format": "coco", "names": list(d["names"])}
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
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not exist_ok:
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
        LOGGER.info(f"compare: resuming {save_dir} with its saved settings")
        return config, save_dir
    config = config_from_args(opt, defaults)
    save_dir = new_study_dir(opt.project, opt.name or opt.preset or "study", exist_ok=opt.exist_ok)
    if opt.preset:
        config = prepare_preset(config, opt.preset, save_dir)
    return config, save_dir


def run_study(config: StudyConfig, save_dir: Path, runner: CellRunner | None = None,
              progress: bool = True) -> list[dict[str, Any]]:
    """Run every cell of the grid not yet in study.csv, recording each row as soon as its run finishes.

    Returns all rows (earlier and new). An incomplete run folder left by an interrupted cell is discarded and the
    cell is trained again from scratch, so every row comes from one uninterrupted, seeded run.
    """
    from tqdm import tqdm

    runner = runner or run_cell  # looked up at call time, so tests can replace the module's run_cell
    save_dir = Path(save_dir)
    config.validate()
    main = _is_main_rank()
    csv_path, cfg_path = save_dir / "study.csv", save_dir / "study.yaml"
    if main:
        save_dir.mkdir(parents=True, exist_ok=True)
        config.save(cfg_path)
    rows = read_rows(csv_path)
    done = {(str(r["norm"]).lower(), int(r["batch_size"]), int(r["seed"])) for r in rows}
    cells = config.cells()
    todo = [c for c in cells if c.key not in done]
    skipped = [c for c in cells if c.key in done]
    if skipped:
        LOGGER.info(f"study: {len(skipped)} finished run(s) found in {csv_path}, skipped: "
                    + ", ".join(c.run_name for c in skipped))
    LOGGER.info(f"study: {len(todo)} run(s) to train in {save_dir}")
    runs_dir = save_dir / "runs"
    bar = tqdm(total=len(cells), initial=len(skipped), desc="study", unit="run", disable=not (progress and main),
               dynamic_ncols=True)
    try:
        for cell in todo:
            bar.set_postfix_str(cell.run_name)
            partial = runs_dir / cell.run_name
            if main and partial.exists():
                LOGGER.info(f"study: discarding the incomplete run folder {partial} (interrupted earlier)")
                shutil.rmtree(partial)
            row = runner(config, cell, runs_dir)
            if main:
                append_row(csv_path, row)
                write_reports(save_dir, config, read_rows(csv_path))
            bar.update(1)
    finally:
        bar.close()
    if main:
        rows = read_rows(csv_path)
        write_reports(save_dir, config, rows)
    return rows
