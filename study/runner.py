"""Running a study: every cell is ``engine.fit.fit`` with the cell's TrainConfig, then the trained model is timed;
each row lands in study.csv as soon as its run finishes, so an interrupted study resumes where it stopped."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from engine.checkpoint import load_model
from engine.config import TrainConfig, config_to_argv
from engine.fit import fit
from engine.loop import TrainingDiverged
from engine.tensorboard import tensorboard_available
from study.config import Cell, StudyConfig, cell_config
from study.report import append_row, read_rows, write_reports
from study.stats import row_key
from utils.dist import dist_env
from utils.general import LOGGER, ROOT, ConfigError, select_device
from utils.timing import repeat_times

CellRunner = Callable[[StudyConfig, Cell, Path], dict[str, Any]]


def find_weights(run_dir: Path) -> Path | None:
    """best.pt (else last.pt) anywhere under a training run folder."""
    for name in ("best.pt", "last.pt"):
        hits = sorted(Path(run_dir).rglob(name))
        if hits:
            return hits[0]
    return None


def time_inference(weights: Path | None, img: int, device: str, batch: int = 8, reps: int = 5) -> float:
    """ms per image of the trained model's forward at the study size, loaded as val.py and detect.py load it
    (engine.checkpoint.load_model: EMA weights, BN folded, channels_last on CPU); the fastest of `reps` batches.

    Random pixels are enough: a conv net's forward time does not depend on the content. NMS is not included. The
    minimum, not the mean, because on a shared machine other processes only ever add time.
    """
    if weights is None:
        return math.nan
    dev = select_device(device)
    model = load_model(weights, dev)
    x = torch.rand(batch, 3, img, img, device=dev)
    if dev.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)  # as val.py feeds it: no per-layer conversion
    with torch.inference_mode():
        times = repeat_times(lambda: model(x), dev, reps=reps, warmup=1)  # warm-up: allocator, kernels
    return 1000 * min(times) / batch


def run_cell(config: StudyConfig, cell: Cell, runs_dir: Path) -> dict[str, Any]:
    """Train + validate one cell through engine.fit, time the fused model, and return its study.csv row.

    A run that diverges (TrainingDiverged) is a result too, not a crash of the study: its row has status
    'diverged' and no metrics, and the tables count it.
    """
    t0 = time.time()
    cfg = cell_config(config, cell, runs_dir)
    base = {"norm": cell.norm, "batch_size": cell.batch_size, "seed": cell.seed, "img_size": config.img}
    try:
        if config.nproc == 1 and config.jobs == 1:
            res = fit(cfg)
        else:  # its own process(es), so that cells can run side by side with their share of the cores
            res = fit_subprocess(cfg, config.nproc, threads=cell_threads(config))
    except TrainingDiverged as e:
        LOGGER.warning(f"study: {cell.run_name} diverged ({e}); recorded as 'diverged'")
        return {**base, "status": "diverged", "epochs": config.epochs, "mAP50": math.nan, "mAP50-95": math.nan,
                "precision": math.nan, "recall": math.nan, "train_img_per_s": math.nan,
                "infer_ms_per_img": math.nan, "params": 0, "wall_time_s": time.time() - t0,
                "run_dir": str(Path(runs_dir) / cell.run_name)}
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


def cell_threads(config: StudyConfig) -> int:
    """Intra-op threads of each training process: the cores shared out over jobs x nproc processes."""
    return max(1, (os.cpu_count() or 1) // (config.jobs * config.nproc))


def fit_subprocess(cfg: TrainConfig, nproc: int = 1, threads: int = 1) -> dict[str, Any]:
    """Train one cell as a ``train.py`` process (``nproc`` > 1: a torchrun job, gloo on CPU) with ``threads``
    intra-op threads each. Under torchrun ``cfg.batch_size`` is per process, so BN normalises over that many images
    and SyncBN over nproc times as many. Returns fit()'s result, read from the run's summary.json."""
    save_dir = Path(cfg.project) / cfg.name
    total = replace(cfg, batch_size=cfg.batch_size * nproc)  # train.py's --batch-size is over all processes
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, str(ROOT / "train.py"), *config_to_argv(total)]
    save_dir.mkdir(parents=True, exist_ok=True)
    log = save_dir.parent / f"{cfg.name}.{'torchrun' if nproc > 1 else 'train'}.log"
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code == 1 and "diverged" in log.read_text(errors="replace"):
        raise TrainingDiverged(f"the run diverged (see {log})")
    if code:
        raise ConfigError(f"study: the training job of {cfg.name} failed with exit code {code}; its log: {log}")
    summary = save_dir / "summary.json"  # fit()'s result dict, written by rank 0 at the end of the run
    if not summary.is_file():
        raise ConfigError(f"study: the training job of {cfg.name} ended without writing {summary}; its log: {log}")
    return json.loads(summary.read_text())


def _run_side_by_side(config: StudyConfig, todo: list[Cell], runs_dir: Path, runner: CellRunner,
                      record: Callable[[dict[str, Any]], None]) -> None:
    """Train up to ``config.jobs`` cells at once (each its own train.py process with its share of the cores), in
    grid order, recording each row as it finishes. After a failure no new cell starts; the running ones finish and
    are recorded, then the first error is raised."""
    torch.set_num_threads(cell_threads(config))  # this process only times inference beside the running cells
    pending, running = list(todo), set()
    error: BaseException | None = None
    pool = ThreadPoolExecutor(config.jobs, thread_name_prefix="study-cell")
    try:
        while pending or running:
            failed = [f for f in running if f.done() and f.exception() is not None]
            error = error or (failed[0].exception() if failed else None)  # seen before starting another cell
            while pending and error is None and len(running) < config.jobs:
                running.add(pool.submit(runner, config, pending.pop(0), runs_dir))
            if not running:
                break
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                if fut.exception() is not None:
                    error = error or fut.exception()
                else:
                    record(fut.result())
    finally:
        pool.shutdown(wait=error is not None, cancel_futures=True)
    if error is not None:
        raise error


def _is_main_rank() -> bool:
    """Under torchrun every rank runs the same cells (DDP inside fit); only rank 0 writes study files."""
    return dist_env().is_main


def run_study(config: StudyConfig, save_dir: Path, runner: CellRunner | None = None,
              progress: bool = True) -> list[dict[str, Any]]:
    """Run every cell of the grid not yet in study.csv, recording each row as soon as its run finishes.

    Returns all rows (earlier and new). An incomplete run folder left by an interrupted cell is discarded and the
    cell is trained again from scratch, so every row comes from one uninterrupted, seeded run.
    """
    runner = runner or run_cell  # looked up at call time, so tests can replace the module's run_cell
    save_dir = Path(save_dir)
    config.validate()
    if config.jobs > 1 and dist_env().world_size > 1:  # every rank would start its own copies of the cells
        raise ConfigError("--jobs: cells side by side and compare.py under torchrun do not mix; use one of them "
                          "(--nproc N makes each cell a torchrun job)")
    main = _is_main_rank()
    csv_path, cfg_path = save_dir / "study.csv", save_dir / "study.yaml"
    if main:
        save_dir.mkdir(parents=True, exist_ok=True)
        config.save(cfg_path)
    rows = read_rows(csv_path)
    done = {row_key(r) for r in rows}
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
    if main:
        for cell in todo:
            partial = runs_dir / cell.run_name
            if partial.exists():
                LOGGER.info(f"study: discarding the incomplete run folder {partial} (interrupted earlier)")
                shutil.rmtree(partial)

    def record(row: dict[str, Any]) -> None:
        row = {**row, "finished_at": time.time()}  # with wall_time_s: the study's elapsed time under --jobs
        if main:
            append_row(csv_path, row)
            write_reports(save_dir, config, read_rows(csv_path))
        bar.update(1)

    try:
        if config.jobs == 1:
            for cell in todo:
                bar.set_postfix_str(cell.run_name)
                record(runner(config, cell, runs_dir))
        else:
            _run_side_by_side(config, todo, runs_dir, runner, record)
    finally:
        bar.close()
    if main:
        rows = read_rows(csv_path)
        write_reports(save_dir, config, rows)
        if tensorboard_available():  # every cell's run folder holds its event file: one logdir overlays them all
            LOGGER.info(f"study: curves of every cell: tensorboard --logdir {save_dir}")
    return rows
