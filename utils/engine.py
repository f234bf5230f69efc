"""The training engine: ``train_one_epoch`` and the driver ``fit`` (model, data, optimizer, EMA, checkpoints)."""
from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml
from tqdm import tqdm

from models.loss import ComputeLoss
from models.norm import convert_sync_batchnorm
from models.yolo import Model
from utils import dist as du
from utils.autoanchor import check_anchors
from utils.checkpoint import all_finite, load_checkpoint, model_state, save_checkpoint
from utils.ema import ModelEMA, de_parallel
from utils.general import LOGGER, ROOT, ConfigError, init_seeds, load_yaml, select_device
from utils.logger import BAR_FORMAT, ResultsLog, bar_description, bar_header, plot_results
from utils.optim import NOMINAL_BATCH, OPTIMIZERS, Schedule, build_optimizer, scaled_weight_decay
from utils.plots import plot_batch, targets_per_image

GRAD_CLIP = 10.0  # max gradient norm (as YOLOv5); also the place where non-finite gradients are caught


class TrainingDiverged(RuntimeError):
    """Raised after too many consecutive non-finite steps, or when the weights themselves became non-finite."""


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


def train_one_epoch(model: nn.Module, loader: Any, compute_loss: ComputeLoss, optimizer: torch.optim.Optimizer,
                    schedule: Schedule, ema: ModelEMA | None, scaler: torch.amp.GradScaler, device: torch.device,
                    epoch: int, epochs: int, *, img_size: int, amp: bool, main: bool, world_size: int = 1,
                    nonfinite_limit: int = 10, accum: dict[str, int] | None = None,
                    flush: bool = True, plot_path: Path | None = None, names: list[str] | None = None
                    ) -> dict[str, Any]:
    """Train ``model`` for one pass over ``loader``.

    Gradients are accumulated over ``schedule.accumulate`` batches (nominal batch 64). The count runs across
    epochs, as in YOLOv5: pass the same ``accum`` dict (``last_step``: global iteration of the last optimizer step,
    ``pending``: batches accumulated since) to every epoch, and gradients left at an epoch's end carry into the next
    one instead of making a step of their own. ``flush=True`` (the final epoch) steps on whatever is pending at the
    end. A batch whose loss is non-finite on any rank is skipped everywhere; ``nonfinite_limit`` in a row raise
    :class:`TrainingDiverged`. ``plot_path``: save the first batch with its labels there (what augmentation made).

    Returns ``{'loss': [box, obj, cls] means, 'images', 'time_s', 'nonfinite', 'lr': [per group], 'steps'}``.
    """
    model.train()
    nb = len(loader)
    if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)  # a different shuffle per epoch, identical on every rank
    if main:
        LOGGER.info(bar_header())
    bar = tqdm(loader, total=nb, bar_format=BAR_FORMAT, disable=not main)
    mloss = torch.zeros(3, device=device)
    n_ok = n_images = nonfinite = in_a_row = 0
    accum = {"last_step": -1, "pending": 0} if accum is None else accum
    last_step, pending, steps = int(accum["last_step"]), int(accum["pending"]), 0
    if not pending:  # otherwise the gradients of the previous epoch's last batches are still to be applied
        optimizer.zero_grad(set_to_none=True)
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    t0 = time.perf_counter()
    for i, (imgs, targets, _paths, _metas) in enumerate(bar):
        ni = i + nb * epoch
        schedule.step(optimizer, epoch, ni)
        imgs = imgs.to(device, non_blocking=True)
        if imgs.dtype == torch.uint8:  # a loader may hand over bytes to save copies; scale here
            imgs = imgs.float().div_(255)
        targets = targets.to(device)
        if plot_path is not None and i == 0:
            plot_batch(imgs, targets_per_image(targets, len(imgs), imgs.shape[2], imgs.shape[3]),
                       names or [], plot_path, _paths)
        step_now = ni - last_step >= schedule.accumulate or (flush and i == nb - 1)
        with torch.autocast(device_type=device.type, enabled=amp):
            preds = model(imgs)
            loss, items = compute_loss(preds, targets)
        bad = du.all_reduce_flag(not bool(torch.isfinite(loss).all()), device)
        if bad:
            nonfinite += 1
            in_a_row += 1
            LOGGER.warning(f"epoch {epoch} batch {i}: non-finite loss {items.tolist()}, step skipped "
                           f"({in_a_row} in a row)")
            if in_a_row >= nonfinite_limit:
                raise TrainingDiverged(f"{in_a_row} non-finite losses in a row at epoch {epoch}: training diverged "
                                       f"(lower lr0 in --hyp, or check the labels); last.pt keeps the last good epoch")
        else:
            in_a_row = 0
            # DDP averages gradients over ranks; scale so the update matches one process with the total batch
            loss = loss * world_size
            # skip the gradient all-reduce on batches that only accumulate (every rank makes the same choice)
            with model.no_sync() if ddp and not step_now else nullcontext():
                scaler.scale(loss).backward()
            mloss = (mloss * n_ok + items) / (n_ok + 1)
            n_ok += 1
            pending += 1
        n_images += imgs.shape[0]
        if step_now:
            if pending:  # nothing to apply when every batch since the last step was skipped
                if ddp and bad:  # the accumulated gradients came from no_sync() passes: reduce them here
                    du.average_gradients(model)
                scaler.unscale_(optimizer)
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=GRAD_CLIP)
                finite = bool(torch.isfinite(norm))  # identical on every rank (gradients were all-reduced)
                if finite or amp:  # under AMP the scaler skips the step itself and lowers its scale
                    scaler.step(optimizer)
                    steps += 1
                if finite and ema is not None:
                    ema.update(model)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            last_step, pending = ni, 0
        if main:
            mem = torch.cuda.memory_reserved(device) / 1e9 if device.type == "cuda" else 0.0
            bar.set_description(bar_description(epoch, epochs, mem, mloss.tolist(), int(targets.shape[0]),
                                                int(imgs.shape[-1])))
    bar.close()
    accum.update(last_step=last_step, pending=pending)
    return {"loss": mloss.tolist(), "images": n_images * world_size, "time_s": time.perf_counter() - t0,
            "nonfinite": nonfinite, "lr": [float(g["lr"]) for g in optimizer.param_groups], "steps": steps}


def _build_model(opt: argparse.Namespace, nc: int, names: list[str], ckpt: dict | None) -> Model:
    """Model from --cfg/--norm, or from the resumed checkpoint's YAML; --weights transfers matching tensors."""
    if ckpt is not None:  # resume: the checkpoint's own config (norm included) is the truth
        model = Model(ckpt["model_yaml"], nc=nc)
        model.load_state_dict(ckpt["model"])
    else:
        model = Model(opt.cfg, nc=nc, norm=opt.norm or None)
        if opt.weights:
            src = load_checkpoint(opt.weights)
            sd = src.get("ema") or src["model"]
            own = model.state_dict()
            keep = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
            model.load_state_dict(keep, strict=False)
            LOGGER.info(f"Transferred {len(keep)}/{len(own)} tensors from {opt.weights}")
    model.names = list(names)
    return model


def _checkpoint(model: nn.Module, ema: ModelEMA, optimizer: torch.optim.Optimizer | None,
                scaler: torch.amp.GradScaler, epoch: int, best_fitness: float, hyp: dict, opt: argparse.Namespace,
                names: list[str]) -> dict:
    return {"model": model_state(model), "ema": model_state(ema.ema),
            "updates": int(ema.updates),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "epoch": int(epoch), "best_fitness": float(best_fitness), "model_yaml": de_parallel(model).yaml,
            "names": list(names), "hyp": dict(hyp), "opt": plain_opt(opt)}  # save_checkpoint adds version and date


def plain_opt(opt: argparse.Namespace) -> dict:
    """The options as plain YAML / weights_only-safe values (paths become strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opt).items()}


OPTIONAL_HYP = {"close_mosaic": 0.0, "perspective": 0.0}  # keys a hyp file may leave out, with defaults


def load_hyp(path: str | Path) -> dict[str, Any]:
    """Read a hyp YAML and check it has every key of cfg/hyp/scratch.yaml with a numeric value."""
    hyp = load_yaml(path, "hyp file")
    required = load_yaml(ROOT / "cfg" / "hyp" / "scratch.yaml", "hyp file")
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


def fit(opt: argparse.Namespace) -> dict[str, Any]:
    """Run a whole training as configured by ``opt`` (see ``train.parse_opt``); returns the summary dict."""
    from data.loader import build_loader, create_dataloader, load_data_config  # the data package is only needed here
    import val

    t_start = time.time()
    env = du.dist_env()
    device = select_device(opt.device)
    if env.world_size > 1:
        if opt.batch_size % env.world_size:
            raise ConfigError(f"--batch-size {opt.batch_size}: must be a multiple of the {env.world_size} processes")
        du.init_distributed(device)
    main = env.is_main
    save_dir = Path(opt.save_dir)
    wdir = save_dir / "weights"
    init_seeds(opt.seed + 1 + max(env.rank, 0), deterministic=opt.deterministic)
    ckpt = load_checkpoint(opt.resume) if opt.resume else None
    hyp = dict(ckpt["hyp"]) if ckpt else load_hyp(opt.hyp)  # a resumed run keeps its own hyper-parameters
    if getattr(opt, "close_mosaic", None) is not None and not ckpt:  # the flag wins; a resume keeps its hyp
        hyp["close_mosaic"] = float(opt.close_mosaic)
    data_cfg = load_data_config(opt.data)
    names, nc = list(data_cfg["names"]), int(data_cfg["nc"])
    start_epoch = ckpt["epoch"] + 1 if ckpt else 0
    if ckpt is not None and (ckpt["epoch"] < 0 or start_epoch >= opt.epochs):
        raise ConfigError(f"--resume {opt.resume}: this run already finished its {opt.epochs} epochs")
    # --optimizer wins; else the hyp file's 'optimizer' (the one its lr0 was tuned for); else SGD
    opt.optimizer = opt.optimizer or hyp.get("optimizer", "SGD")
    if main:
        wdir.mkdir(parents=True, exist_ok=True)
        (save_dir / "hyp.yaml").write_text(yaml.safe_dump(hyp, sort_keys=False))
        (save_dir / "opt.yaml").write_text(yaml.safe_dump(plain_opt(opt), sort_keys=False))

    model = _build_model(opt, nc, names, ckpt)
    bs = opt.batch_size // env.world_size
    amp = device.type == "cuda"
    # the final close_mosaic epochs train on whole images, as validation sees them (YOLOv8's close_mosaic)
    close_at = opt.epochs - int(hyp.get("close_mosaic", 0)) if hyp["mosaic"] > 0 else opt.epochs
    with du.zero_first(env.rank):  # rank 0 builds any dataset cache first
        train_loader, train_set = create_dataloader(
            data_cfg, "train", opt.img, bs, augment=True, hyp=hyp, workers=opt.workers, seed=opt.seed,
            rank=env.rank, world_size=env.world_size, cache=opt.cache or False, shuffle=True)
    val_loader = val_set = None
    if main:
        val_loader, val_set = create_dataloader(data_cfg, "val", opt.img, bs * 2, augment=False, hyp=hyp,
                                                workers=opt.workers, seed=opt.seed, cache=opt.cache or False,
                                                shuffle=False)
    if ckpt is None and not opt.noautoanchor and main:
        check_anchors(model, train_set, thr=hyp["anchor_t"], img_size=opt.img, seed=opt.seed)
    model.to(device)
    if device.type == "cpu":  # oneDNN's NHWC convolutions are ~15% faster for BN and GN alike on CPU
        model.to(memory_format=torch.channels_last)
    if opt.sync_bn and env.world_size > 1:
        model = convert_sync_batchnorm(model)
        if main:
            LOGGER.info("Using SyncBatchNorm")
    nbs = int(getattr(opt, "nbs", NOMINAL_BATCH))
    optimizer = build_optimizer(model, opt.optimizer, hyp["lr0"], hyp["momentum"],
                                scaled_weight_decay(hyp["weight_decay"], opt.batch_size, nbs))
    ema = ModelEMA(model)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    best_fitness, best_epoch = 0.0, -1
    if ckpt is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as e:  # parameter groups changed between versions (e.g. norm biases moved groups)
            raise ConfigError(f"--resume {opt.resume}: its optimizer state does not fit this version's parameter "
                              f"groups ({e}); start a new run with --weights {opt.resume} instead") from None
        ema.ema.load_state_dict(ckpt["ema"])
        ema.updates = int(ckpt["updates"])
        if ckpt.get("scaler") and amp:
            scaler.load_state_dict(ckpt["scaler"])
        best_fitness = float(ckpt["best_fitness"])
        LOGGER.info(f"Resuming {opt.resume} at epoch {start_epoch} of {opt.epochs}")
    ema.update_attr(model)
    if env.world_size > 1:
        model = du.wrap_ddp(model, device)  # broadcasts rank 0's weights and anchors
    compute_loss = ComputeLoss(model, hyp, opt.img)
    schedule = Schedule(hyp, opt.epochs, len(train_loader), opt.batch_size, cos_lr=opt.cos_lr, nominal=nbs)
    log = ResultsLog(save_dir, start_epoch - 1 if ckpt else None) if main else None
    params = sum(p.numel() for p in de_parallel(model).parameters())
    if main:
        LOGGER.info(f"{params:,} parameters; {len(train_set)} train images, batch {opt.batch_size} "
                    f"(accumulate {schedule.max_accumulate} to nominal {nbs}), {opt.img} px, {device}, {opt.epochs} epochs "
                    f"-> {save_dir}")
    # optimizer steps are counted across epochs; a resume restarts the count at its epoch (the gradients pending
    # at the checkpoint, at most accumulate - 1 batches, are not saved)
    accum = {"last_step": start_epoch * len(train_loader) - 1, "pending": 0}
    images = 0
    train_time = 0.0
    last_metrics: dict[str, float] = {}
    stop = False
    epoch = start_epoch - 1
    try:
        for epoch in range(start_epoch, opt.epochs):
            if epoch >= close_at and train_set.hyp["mosaic"] > 0:  # at close_at, or when a resume starts past it
                if main:
                    LOGGER.info(f"Closing mosaic: the last {opt.epochs - close_at} epochs train on whole images")
                del train_loader  # shuts its persistent workers down before new ones start
                train_set.set_mosaic(0.0)
                train_loader = build_loader(train_set, bs, workers=opt.workers, seed=opt.seed + epoch,
                                            rank=env.rank, world_size=env.world_size, shuffle=True)
            res = train_one_epoch(model, train_loader, compute_loss, optimizer, schedule, ema, scaler, device,
                                  epoch, opt.epochs, img_size=opt.img, amp=amp, main=main,
                                  world_size=env.world_size, nonfinite_limit=opt.nonfinite_limit, accum=accum,
                                  flush=epoch == opt.epochs - 1, names=names,
                                  plot_path=save_dir / "train_batch0.jpg" if main and epoch == 0 else None)
            images += res["images"]
            train_time += res["time_s"]
            final = epoch == opt.epochs - 1
            if main:
                if not all_finite(ema.ema.state_dict()) or not all_finite(de_parallel(model).state_dict()):
                    raise TrainingDiverged(f"weights became non-finite in epoch {epoch}; not saving them "
                                           f"(last.pt keeps epoch {epoch - 1})")
                if not opt.noval or final:
                    last_metrics = val.run(ema.ema, val_loader, val_set, half=amp, log_summary=final,
                                           save_dir=save_dir if final else None, plots=final)
                    LOGGER.info(f"{'val':>22}: P {last_metrics['precision']:.3f}  R {last_metrics['recall']:.3f}  "
                                f"mAP50 {last_metrics['mAP50']:.4f}  mAP50-95 {last_metrics['mAP50_95']:.4f}")
                fi = fitness(last_metrics) if last_metrics else 0.0
                if fi > best_fitness or not (wdir / "best.pt").exists():
                    best_fitness, best_epoch = max(fi, best_fitness), epoch
                row = {"epoch": epoch, **dict(zip(("train/box_loss", "train/obj_loss", "train/cls_loss"),
                                                  res["loss"])),
                       "metrics/precision": last_metrics.get("precision", ""),
                       "metrics/recall": last_metrics.get("recall", ""),
                       "metrics/mAP50": last_metrics.get("mAP50", ""),
                       "metrics/mAP50-95": last_metrics.get("mAP50_95", ""),
                       **{f"x/lr{j}": lr for j, lr in enumerate(res["lr"])},
                       "nonfinite_steps": res["nonfinite"], "epoch_time_s": res["time_s"]}
                log.append(row)
                plot_results(log.path)
                ck = _checkpoint(model, ema, optimizer, scaler, epoch, best_fitness, hyp, opt, names)
                save_checkpoint(ck, wdir / "last.pt")
                if best_epoch == epoch:
                    save_checkpoint(ck, wdir / "best.pt")
                if opt.save_period > 0 and (epoch + 1) % opt.save_period == 0:
                    save_checkpoint(ck, wdir / f"epoch{epoch}.pt")
                stop = opt.patience > 0 and epoch - max(best_epoch, start_epoch) >= opt.patience and not final
                if stop:
                    LOGGER.info(f"Stopping early: no improvement in {opt.patience} epochs (best epoch {best_epoch})")
            stop = bool(du.broadcast_object(stop))
            if stop:
                break
    finally:
        if env.world_size > 1:
            du.cleanup()
    result: dict[str, Any] = {"save_dir": str(save_dir), "epochs": epoch + 1, "params": params,
                              "train_images_per_s": images / train_time if train_time > 0 else 0.0,
                              "wall_time_s": time.time() - t_start}
    if main:
        if (wdir / "best.pt").exists():
            best = load_checkpoint(wdir / "best.pt")
            best["optimizer"] = None  # the final best.pt is for inference / fine-tuning, not resuming
            save_checkpoint(best, wdir / "best.pt")
        result.update(best_row(log.read()))
        LOGGER.info(f"{result['epochs'] - start_epoch} epochs in {result['wall_time_s'] / 3600:.3f} h; "
                    f"best epoch {result['best_epoch']}: mAP50 {result['mAP50']:.4f}, "
                    f"mAP50-95 {result['mAP50_95']:.4f}; results saved to {save_dir}")
    return result
