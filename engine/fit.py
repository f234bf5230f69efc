"""``fit(cfg)``: a whole training run. First the named build steps (settings, model, data, optimizer + EMA,
writers), then a flat loop of ``train_one_epoch`` and ``end_of_epoch`` (validate, record, checkpoint, stop early)."""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml

from data.loader import build_loader, create_dataloader, load_data_config
from engine.accel import check_compile, compile_model, set_cpu_threads, train_channels_last
from engine.amp import amp_note, autocast_dtype
from engine.autoanchor import check_anchors
from engine.backends import feeds_channels_last
from engine.checkpoint import all_finite, load_checkpoint, model_state, save_checkpoint
from engine.config import TrainConfig, check_config, default_workers, resolve_cache, resolve_resume
from engine.ema import ModelEMA
from engine.evaluate import evaluate
from engine.loop import TrainingDiverged, train_one_epoch
from engine.optim import Schedule, build_optimizer, scaled_weight_decay
from engine.results import ResultsLog, plot_results
from engine.tensorboard import open_tensorboard
from models.loss import ComputeLoss
from models.norm import convert_sync_batchnorm
from models.yolo import Model
from utils import dist as du
from utils.dist import DistEnv, de_parallel
from utils.general import (LOGGER, ConfigError, increment_path, init_seeds, select_device, setup_logging,
                           write_text_atomic)
from utils.hyp import load_hyp
from utils.memory import retain_freed_memory


def fitness(metrics: dict[str, float]) -> float:
    """Model selection score: 0.1 * mAP50 + 0.9 * mAP50-95."""
    return 0.1 * float(metrics.get("mAP50", 0.0)) + 0.9 * float(metrics.get("mAP50_95", 0.0))


def best_row(rows: list[dict[str, str]]) -> dict[str, float]:
    """Metrics of the best validated epoch in results.csv rows (the whole run, resumed parts included)."""
    out = {"mAP50": 0.0, "mAP50_95": 0.0, "precision": 0.0, "recall": 0.0, "best_epoch": -1}
    best = -1.0
    for r in rows:
        if r.get("metrics/mAP50", "") == "":
            continue
        m = {"mAP50": float(r["metrics/mAP50"]), "mAP50_95": float(r["metrics/mAP50-95"]),
             "precision": float(r["metrics/precision"]), "recall": float(r["metrics/recall"])}
        if fitness(m) > best:
            best = fitness(m)
            out = {**m, "best_epoch": int(float(r["epoch"]))}
    return out


PLOT_EVERY_S = 30.0  # results.png is redrawn at most this often, and always after the final epoch


@dataclass
class Run:
    """Everything a training run builds, in the order it is built; the loop only reads and steps it."""

    cfg: TrainConfig
    env: DistEnv
    device: torch.device
    hyp: dict[str, Any]
    names: list[str]
    ckpt: dict[str, Any] | None
    start_epoch: int
    model: nn.Module | None = None
    train_loader: Any = None
    train_set: Any = None
    val_loader: Any = None
    val_set: Any = None
    optimizer: torch.optim.Optimizer | None = None
    ema: ModelEMA | None = None
    scaler: torch.amp.GradScaler | None = None
    compute_loss: ComputeLoss | None = None
    schedule: Schedule | None = None
    log: ResultsLog | None = None
    tb: Any = None  # engine.tensorboard.TensorBoardLog on rank 0 unless --no-tensorboard
    best_fitness: float = 0.0
    best_epoch: int = -1
    last_plot: float = -math.inf  # time.monotonic() of the last results.png

    @property
    def main(self) -> bool:
        return self.env.is_main

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The training autocast dtype (engine.amp): float16 on CUDA, bfloat16 on CPU with --amp on, None = float32."""
        return autocast_dtype(self.cfg.amp, self.device)

    @property
    def amp(self) -> bool:
        return self.amp_dtype is not None

    @property
    def wdir(self) -> Path:
        return Path(self.cfg.save_dir) / "weights"

    @property
    def per_rank_batch(self) -> int:
        return self.cfg.batch_size // self.env.world_size


def setup(cfg: TrainConfig) -> tuple[TrainConfig, DistEnv, torch.device]:
    """The process set-up, once: logging, --resume, checks, device, CPU threads, process group, run folder."""
    env = du.dist_env()
    setup_logging(rank=env.rank)
    if cfg.resume:
        cfg = resolve_resume(cfg)
    cfg = check_config(cfg)
    device = select_device(cfg.device)
    if cfg.compile:
        check_compile(device)
    if device.type == "cpu":
        set_cpu_threads()
        retain_freed_memory()  # large activations are reused instead of page-faulted in again every step
    if cfg.workers < 0:
        cfg = replace(cfg, workers=default_workers(device.type))
    if env.world_size > 1:
        if cfg.batch_size % env.world_size:
            raise ConfigError(f"--batch-size {cfg.batch_size}: must be a multiple of the {env.world_size} processes")
        du.init_distributed(device)
    if not cfg.resume:
        save_dir = str(increment_path(Path(cfg.project) / cfg.name, exist_ok=cfg.exist_ok)) if env.is_main else None
        cfg = replace(cfg, save_dir=du.broadcast_object(save_dir))  # every rank must agree on one folder
    return cfg, env, device


def build_settings(cfg: TrainConfig, env: DistEnv, device: torch.device) -> Run:
    """Seeds, the resumed checkpoint, hyper-parameters and class names; writes hyp.yaml and opt.yaml."""
    init_seeds(cfg.seed + 1 + max(env.rank, 0), deterministic=cfg.deterministic)
    ckpt = load_checkpoint(cfg.resume) if cfg.resume else None
    hyp = dict(ckpt["hyp"]) if ckpt else load_hyp(cfg.hyp)  # a resumed run keeps its own hyper-parameters
    if cfg.close_mosaic is not None and not ckpt:  # the flag wins; a resume keeps its hyp
        hyp["close_mosaic"] = float(cfg.close_mosaic)
    data_cfg = load_data_config(cfg.data)
    start_epoch = ckpt["epoch"] + 1 if ckpt else 0
    if ckpt is not None and start_epoch >= cfg.epochs:
        raise ConfigError(f"--resume {cfg.resume}: this run already finished its {cfg.epochs} epochs")
    # --optimizer wins; else the hyp file's 'optimizer' (the one its lr0 was tuned for); else SGD
    cfg = replace(cfg, optimizer=cfg.optimizer or hyp.get("optimizer", "SGD"))
    save_dir = Path(cfg.save_dir)
    if env.is_main:
        (save_dir / "weights").mkdir(parents=True, exist_ok=True)
        (save_dir / "hyp.yaml").write_text(yaml.safe_dump(hyp, sort_keys=False))
        (save_dir / "opt.yaml").write_text(yaml.safe_dump(cfg.plain(), sort_keys=False))
    run = Run(cfg, env, device, hyp, list(data_cfg["names"]), ckpt, start_epoch)
    run.model = build_model(cfg, int(data_cfg["nc"]), run.names, ckpt)
    build_data(run, data_cfg)
    return run


def build_model(cfg: TrainConfig, nc: int, names: list[str], ckpt: dict | None) -> Model:
    """Model from --cfg/--norm, or from the resumed checkpoint's YAML; --weights transfers matching tensors."""
    if ckpt is not None:  # resume: the checkpoint's own config (norm included) is the truth
        model = Model(ckpt["model_yaml"], nc=nc)
        model.load_state_dict(ckpt["model"])
    else:
        model = Model(cfg.cfg, nc=nc, norm=cfg.norm or None)
        if cfg.weights:
            src = load_checkpoint(cfg.weights)
            sd = src.get("ema") or src["model"]
            own = model.state_dict()
            keep = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
            model.load_state_dict(keep, strict=False)
            LOGGER.info(f"Transferred {len(keep)}/{len(own)} tensors from {cfg.weights}")
    model.names = list(names)
    return model


def val_loader_workers(workers: int, cache: bool, device: torch.device) -> int:
    """Loader processes for validation. From a RAM cache a val batch is only letterboxed, so on CPU a loader
    process would just take cycles from the model; on CUDA, or when images are decoded from disk, the workers
    overlap with the model."""
    return 0 if cache and device.type == "cpu" else workers


def build_data(run: Run, data_cfg: dict[str, Any]) -> None:
    """Train loader on every rank (rank 0 builds any cache first), val loader on rank 0, AutoAnchor."""
    cfg, env = run.cfg, run.env
    cache = resolve_cache(cfg.cache, data_cfg)
    with du.zero_first(env.rank):
        run.train_loader, run.train_set = create_dataloader(
            data_cfg, "train", cfg.img, run.per_rank_batch, augment=True, hyp=run.hyp, workers=cfg.workers,
            seed=cfg.seed, rank=env.rank, world_size=env.world_size, cache=cache, shuffle=True)
    if run.main:
        val_workers = val_loader_workers(cfg.workers, cache, run.device)
        run.val_loader, run.val_set = create_dataloader(
            data_cfg, "val", cfg.img, run.per_rank_batch * 2, augment=False, hyp=run.hyp, workers=val_workers,
            seed=cfg.seed, cache=cache, shuffle=False)
    if run.ckpt is None and not cfg.noautoanchor and run.main:
        check_anchors(run.model, run.train_set, thr=run.hyp["anchor_t"], img_size=cfg.img, seed=cfg.seed)


def build_optimization(run: Run) -> None:
    """Device placement, SyncBN, optimizer, EMA, AMP scaler (restored on --resume), DDP, loss and schedule."""
    cfg, model = run.cfg, run.model
    model.to(run.device)
    if train_channels_last(run.device):  # engine/accel.py says where NHWC is faster
        model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and run.env.world_size > 1:
        model = convert_sync_batchnorm(model)
        if run.main:
            LOGGER.info("Using SyncBatchNorm")
    run.optimizer = build_optimizer(model, cfg.optimizer, run.hyp["lr0"], run.hyp["momentum"],
                                    scaled_weight_decay(run.hyp["weight_decay"], cfg.batch_size, cfg.nbs))
    run.ema = ModelEMA(model)
    run.scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp_dtype == torch.float16)
    if run.ckpt is not None:
        restore(run, run.ckpt)
    run.ema.update_attr(model)
    if cfg.compile:  # after the EMA's deep copy, which stays eager (validation's shapes vary)
        compile_model(model, run.device)
    if run.env.world_size > 1:
        model = du.wrap_ddp(model, run.device)  # broadcasts rank 0's weights and anchors
    run.model = model
    run.compute_loss = ComputeLoss(model, run.hyp, cfg.img)
    run.schedule = Schedule(run.hyp, cfg.epochs, len(run.train_loader), cfg.batch_size, cos_lr=cfg.cos_lr,
                            nominal=cfg.nbs)


def restore(run: Run, ckpt: dict[str, Any]) -> None:
    """Optimizer, EMA, scaler and best fitness from the checkpoint being resumed."""
    try:
        run.optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError as e:  # parameter groups changed between versions (e.g. norm biases moved groups)
        raise ConfigError(f"--resume {run.cfg.resume}: its optimizer state does not fit this version's parameter "
                          f"groups ({e}); start a new run with --weights {run.cfg.resume} instead") from None
    run.ema.ema.load_state_dict(ckpt["ema"])
    run.ema.updates = int(ckpt["updates"])
    if ckpt.get("scaler") and run.scaler.is_enabled():
        run.scaler.load_state_dict(ckpt["scaler"])
    run.best_fitness = float(ckpt["best_fitness"])
    LOGGER.info(f"Resuming {run.cfg.resume} at epoch {run.start_epoch} of {run.cfg.epochs}")


def build_writers(run: Run) -> int:
    """results.csv (truncated to the checkpoint's epoch on resume) and the start line; returns the parameters."""
    cfg = run.cfg
    run.log = ResultsLog(cfg.save_dir, run.start_epoch - 1 if run.ckpt else None) if run.main else None
    run.tb = open_tensorboard(cfg.save_dir, run.names, cfg.tensorboard) if run.main else None
    params = sum(p.numel() for p in de_parallel(run.model).parameters())
    if run.main:
        amp = str(run.amp_dtype).replace("torch.", "") if run.amp else "off (float32)"
        LOGGER.info(f"{params:,} parameters; {len(run.train_set)} train images, batch {cfg.batch_size} "
                    f"(accumulate {run.schedule.max_accumulate} to nominal {cfg.nbs}), {cfg.img} px, {run.device} x "
                    f"{run.env.world_size} process(es), amp {amp}, "
                    f"{cfg.workers} loader workers, {cfg.epochs} epochs -> {cfg.save_dir}")
        if note := amp_note(cfg.amp, run.device):
            LOGGER.warning(note)
    return params


def close_mosaic(run: Run, epoch: int, close_at: int) -> None:
    """From ``close_at`` on, train on whole images, as validation sees them (YOLOv8's close_mosaic)."""
    cfg = run.cfg
    if run.main:
        LOGGER.info(f"Closing mosaic: the last {cfg.epochs - close_at} epochs train on whole images")
    run.train_loader = None  # shuts its persistent workers down before new ones start
    run.train_set.set_mosaic(0.0)
    run.train_loader = build_loader(run.train_set, run.per_rank_batch, workers=cfg.workers, seed=cfg.seed + epoch,
                                    rank=run.env.rank, world_size=run.env.world_size, shuffle=True)


def checkpoint_dict(run: Run, epoch: int) -> dict[str, Any]:
    """The checkpoint of the state after ``epoch`` (save_checkpoint adds version and date)."""
    return {"model": model_state(run.model), "ema": model_state(run.ema.ema), "updates": int(run.ema.updates),
            "optimizer": run.optimizer.state_dict() if run.optimizer is not None else None,
            "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
            "epoch": int(epoch), "best_fitness": float(run.best_fitness),
            "model_yaml": de_parallel(run.model).yaml, "names": list(run.names), "hyp": dict(run.hyp),
            "opt": run.cfg.plain()}


def validation_model(model: nn.Module) -> nn.Module:
    """A copy of the (EMA) model for validation with BN folded into the convs (GN / LN / IN stay) and the conv weights
    in the model's memory format. Outputs change by float rounding only and the validation forward is faster (folding
    removes the BN kernels). The model being trained is not touched."""
    channels_last = feeds_channels_last(model)
    m = copy.deepcopy(model).eval().fuse()
    if channels_last:
        m.to(memory_format=torch.channels_last)  # folding builds new, contiguous weights
    return m


def end_of_epoch(run: Run, epoch: int, res: dict[str, Any], metrics: dict[str, float]) -> tuple[dict, bool]:
    """Rank 0: validate (every epoch, or the final one with --noval), write the results row and results.png,
    save last.pt / best.pt / epochN.pt. Returns the latest metrics and whether to stop early."""
    cfg, final = run.cfg, epoch == run.cfg.epochs - 1
    save_dir = Path(cfg.save_dir)
    if not all_finite(run.ema.ema.state_dict()) or not all_finite(de_parallel(run.model).state_dict()):
        raise TrainingDiverged(f"weights became non-finite in epoch {epoch}; not saving them "
                               f"(last.pt keeps epoch {epoch - 1})")
    validate, t_val = not cfg.noval or final, time.perf_counter()
    if validate:
        metrics = evaluate(validation_model(run.ema.ema), run.val_loader, run.val_set, half=run.amp,
                           log_summary=final, save_dir=save_dir if final else None, plots=final,
                           area_breakdown=final, on_batch0=run.tb.batch0_hook(epoch) if run.tb else None)
        LOGGER.info(f"{'val':>22}: P {metrics['precision']:.3f}  R {metrics['recall']:.3f}  "
                    f"mAP50 {metrics['mAP50']:.4f}  mAP50-95 {metrics['mAP50_95']:.4f}")
    fi = fitness(metrics) if metrics else 0.0
    if fi > run.best_fitness or not (run.wdir / "best.pt").exists():
        run.best_fitness, run.best_epoch = max(fi, run.best_fitness), epoch
    run.log.append({"epoch": epoch, **dict(zip(("train/box_loss", "train/obj_loss", "train/cls_loss"), res["loss"])),
                    "metrics/precision": metrics.get("precision", ""), "metrics/recall": metrics.get("recall", ""),
                    "metrics/mAP50": metrics.get("mAP50", ""), "metrics/mAP50-95": metrics.get("mAP50_95", ""),
                    **{f"x/lr{j}": lr for j, lr in enumerate(res["lr"])},
                    "nonfinite_steps": res["nonfinite"], "epoch_time_s": res["time_s"],
                    "val_time_s": time.perf_counter() - t_val if validate else ""})
    if run.tb:
        run.tb.add_row(run.log.read()[-1])
    ck = checkpoint_dict(run, epoch)
    save_checkpoint(ck, run.wdir / "last.pt")
    if run.best_epoch == epoch:
        save_checkpoint(ck, run.wdir / "best.pt")
    if cfg.save_period > 0 and (epoch + 1) % cfg.save_period == 0:
        save_checkpoint(ck, run.wdir / f"epoch{epoch}.pt")
    stop = cfg.patience > 0 and epoch - max(run.best_epoch, run.start_epoch) >= cfg.patience and not final
    if stop:
        LOGGER.info(f"Stopping early: no improvement in {cfg.patience} epochs (best epoch {run.best_epoch})")
    if final or stop or time.monotonic() - run.last_plot >= PLOT_EVERY_S:  # a plot costs ~0.5 s: not every epoch
        plot_results(run.log.path)
        run.last_plot = time.monotonic()
    return metrics, stop


def train_epochs(run: Run) -> dict[str, Any]:
    """The loop: one ``train_one_epoch`` and one ``end_of_epoch`` per epoch. Returns epochs done, images, time."""
    cfg = run.cfg
    close_at = cfg.epochs - int(run.hyp.get("close_mosaic", 0)) if run.hyp["mosaic"] > 0 else cfg.epochs
    # optimizer steps are counted across epochs; a resume restarts the count at its epoch (the gradients pending
    # at the checkpoint, at most accumulate - 1 batches, are not saved)
    accum = {"last_step": run.start_epoch * len(run.train_loader) - 1, "pending": 0}
    images, train_time, metrics, epoch = 0, 0.0, {}, run.start_epoch - 1
    for epoch in range(run.start_epoch, cfg.epochs):
        if epoch >= close_at and run.train_set.hyp["mosaic"] > 0:  # at close_at, or when a resume starts past it
            close_mosaic(run, epoch, close_at)
        res = train_one_epoch(run.model, run.train_loader, run.compute_loss, run.optimizer, run.schedule, run.ema,
                              run.scaler, run.device, epoch, cfg.epochs, img_size=cfg.img, amp=run.amp,
                              amp_dtype=run.amp_dtype,
                              main=run.main, world_size=run.env.world_size, nonfinite_limit=cfg.nonfinite_limit,
                              accum=accum, flush=epoch == cfg.epochs - 1, names=run.names,
                              plot_path=Path(cfg.save_dir) / "train_batch0.jpg" if run.main and epoch == 0 else None)
        images += res["images"]
        train_time += res["time_s"]
        stop = False
        if run.main:
            metrics, stop = end_of_epoch(run, epoch, res, metrics)
        if du.broadcast_object(stop):
            break
    return {"epochs": epoch + 1, "images": images, "train_time": train_time}


def summarize(run: Run, done: dict[str, Any], params: int, t_start: float) -> dict[str, Any]:
    """The result dict; on rank 0 best.pt loses its optimizer state (it is for inference / fine-tuning)."""
    result: dict[str, Any] = {"save_dir": str(Path(run.cfg.save_dir)), "epochs": done["epochs"], "params": params,
                              "train_images_per_s": done["images"] / done["train_time"] if done["train_time"] > 0
                              else 0.0, "wall_time_s": time.time() - t_start}
    if run.main:
        if run.tb:
            run.tb.close()
        if (run.wdir / "best.pt").exists():
            best = load_checkpoint(run.wdir / "best.pt")
            best["optimizer"] = None
            save_checkpoint(best, run.wdir / "best.pt")
        result.update(best_row(run.log.read()))
        # the same dict for whoever launched train.py as a process (compare.py --jobs / --nproc)
        write_text_atomic(Path(run.cfg.save_dir) / "summary.json", json.dumps(result, indent=2))
        LOGGER.info(f"{result['epochs'] - run.start_epoch} epochs in {result['wall_time_s'] / 3600:.3f} h; "
                    f"best epoch {result['best_epoch']}: mAP50 {result['mAP50']:.4f}, "
                    f"mAP50-95 {result['mAP50_95']:.4f}; results saved to {run.cfg.save_dir}")
    return result


def fit(cfg: TrainConfig) -> dict[str, Any]:
    """Train as configured; returns ``save_dir``, ``mAP50``, ``mAP50_95``, ``precision``, ``recall``, ``epochs``,
    ``train_images_per_s``, ``params``, ``wall_time_s`` and ``best_epoch`` (metrics only on rank 0)."""
    t_start = time.time()
    cfg, env, device = setup(cfg)
    try:
        run = build_settings(cfg, env, device)
        build_optimization(run)
        params = build_writers(run)
        done = train_epochs(run)
    finally:
        if env.world_size > 1:
            du.cleanup()
    return summarize(run, done, params, t_start)
