"""compare.py / study/ (config, runner, report): aggregation numbers, resume bookkeeping, reports, CLI errors, one real tiny study."""
from __future__ import annotations

import importlib.util
import logging
import math
import re
import zlib
from pathlib import Path

import numpy as np
import pytest

import compare
from study import config as study, report, runner
from utils.general import ConfigError


def _config(**kw) -> study.StudyConfig:
    base = dict(data="d.yaml", cfg="cfg/models/yolo-n-bn.yaml", norms=["bn", "gn:C/16"], batch_sizes=[8, 2],
                seeds=[0, 1, 2], epochs=1, img=64)
    base.update(kw)
    return study.StudyConfig(**base)


def _fake_row(cell: study.Cell, runs_dir: Path) -> dict:
    """A deterministic fake result: a different number for every (norm, batch, seed)."""
    rng = np.random.default_rng(zlib.crc32(cell.run_name.encode()))
    m = float(rng.uniform(0.05, 0.6))
    return {"norm": cell.norm, "batch_size": cell.batch_size, "seed": cell.seed, "epochs": 1, "img_size": 64,
            "mAP50": m + 0.1, "mAP50-95": m, "precision": 0.5, "recall": 0.4, "train_img_per_s": 10.0 + cell.seed,
            "infer_ms_per_img": 3.0, "params": 1000, "wall_time_s": 1.0, "run_dir": str(runs_dir / cell.run_name)}


def _md_cells(md: str, label: str) -> list[str]:
    """Cells of the first markdown table row whose first column is `label`."""
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_markdown_numbers_equal_mean_and_sample_std_of_csv(tmp_path: Path) -> None:
    cfg = _config()
    rows = [_fake_row(c, tmp_path) for c in cfg.cells()]
    report.write_rows(tmp_path / "study.csv", rows)
    back = report.read_rows(tmp_path / "study.csv")
    report.write_reports(tmp_path, cfg, back)
    md = (tmp_path / "study.md").read_text()
    assert "ddof = 1" in md and "nominal batch of 64" in md
    # independent computation from the CSV file with numpy (sample std, ddof=1), ×100 as printed
    import csv
    with (tmp_path / "study.csv").open() as f:
        raw = list(csv.DictReader(f))
    assert len(raw) == 12
    means = {}
    for norm in cfg.norms:
        cells = _md_cells(md, norm)
        for b, text in zip(cfg.batch_sizes, cells):
            v = np.array([float(r["mAP50-95"]) for r in raw if r["norm"] == norm and int(r["batch_size"]) == b])
            assert len(v) == 3
            mean, std = (float(x) for x in re.fullmatch(r"([-\d.]+) ± ([\d.]+)", text).groups())
            assert mean == pytest.approx(100 * v.mean(), abs=0.005)
            assert std == pytest.approx(100 * v.std(ddof=1), abs=0.005)
            means[norm, b] = 100 * v.mean()
    for b in cfg.batch_sizes:  # paired mean difference = difference of the means when every seed finished
        row = next(ln for ln in md.splitlines() if ln.startswith(f"| gn:C/16 − bn | {b} |"))
        assert float(row.split("|")[3].split()[0]) == pytest.approx(means["gn:C/16", b] - means["bn", b], abs=0.006)
    # study.png written and a real PNG
    assert (tmp_path / "study.png").read_bytes()[:4] == b"\x89PNG"


def test_paired_statistics_match_a_hand_computation() -> None:
    """A made-up table, 3 seeds. Batch 16: GN − BN = 0.01, 0.02, 0.02 -> mean 0.016667, sd 0.0057735,
    half-width t(0.975, 2) * sd / sqrt(3) = 4.303 * 0.0033333 = 0.014343 -> [0.002324, 0.031010], excludes 0.
    Batch 2: 0.01, -0.02, 0.03 -> mean 0.006667, sd 0.025166, half-width 0.062521 -> includes 0.
    BN trend b2 - b16: -0.10, -0.07, -0.06 -> mean -0.076667, sd 0.020817, half-width 0.051717 -> excludes 0."""
    from study.stats import mean_interval, paired_differences, t975, verdict

    table = {("bn", 16): [0.30, 0.32, 0.28], ("gn:C/16", 16): [0.31, 0.34, 0.30],
             ("bn", 2): [0.20, 0.25, 0.22], ("gn:C/16", 2): [0.21, 0.23, 0.25]}
    rows = [{"norm": n, "batch_size": b, "seed": s, "mAP50-95": v, "train_img_per_s": 10.0, "infer_ms_per_img": 1.0}
            for (n, b), vals in table.items() for s, v in enumerate(vals)]
    assert t975(2) == 4.303 and t975(40) == pytest.approx(2.021, abs=1e-3)
    d16 = paired_differences(rows, ("gn:C/16", 16), ("bn", 16))
    assert d16 == pytest.approx({0: 0.01, 1: 0.02, 2: 0.02})
    iv = mean_interval(d16.values())
    assert (iv.n, iv.mean, iv.half_width) == (3, pytest.approx(0.0166667, abs=1e-6), pytest.approx(0.014343, abs=1e-5))
    assert iv.low == pytest.approx(0.002324, abs=1e-5) and verdict(iv, "gn:C/16", "bn") == "gn:C/16 better"
    iv2 = mean_interval(paired_differences(rows, ("gn:C/16", 2), ("bn", 2)).values())
    assert iv2.mean == pytest.approx(0.0066667, abs=1e-6) and iv2.half_width == pytest.approx(0.062521, abs=1e-5)
    assert verdict(iv2, "gn:C/16", "bn") == "no difference detected"
    trend = mean_interval(paired_differences(rows, ("bn", 2), ("bn", 16)).values())
    assert trend.mean == pytest.approx(-0.0766667, abs=1e-6) and trend.half_width == pytest.approx(0.051717, abs=1e-5)
    assert verdict(trend, "batch 2", "batch 16") == "batch 16 better"
    assert verdict(mean_interval([0.5]), "a", "b") == "no interval (fewer than 2 seeds)"
    # the report prints the same numbers (x100) and verdicts
    md = report.render_markdown(_config(batch_sizes=[16, 2], seeds=[0, 1, 2]), rows)
    assert "| gn:C/16 − bn | 16 | +1.67 [+0.23, +3.10] ±1.43 | gn:C/16 better |" in md
    assert "| gn:C/16 − bn | 2 | +0.67 [-5.59, +6.92] ±6.25 | no difference detected |" in md
    assert "| bn | -7.67 [-12.84, -2.50] ±5.17 | batch 16 better |" in md


def test_partial_cells_show_count_and_missing_cells_a_dash(tmp_path: Path) -> None:
    cfg = _config(seeds=[0, 1])
    rows = [_fake_row(study.Cell("bn", 8, 0), tmp_path)]
    md = report.render_markdown(cfg, rows)
    assert _md_cells(md, "bn") == [f"{100 * rows[0]['mAP50-95']:.2f} (n=1)", "—"]
    assert _md_cells(md, "gn:C/16") == ["—", "—"]
    assert "1 of 8 runs finished" in md


class Killed(Exception):
    """Stands for the process being killed in the middle of a run."""


def test_resume_trains_only_missing_cells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[study.Cell] = []
    kill_at = [3]  # kill once, when 3 runs have finished

    def fake_run_cell(config, cell, runs_dir):
        if len(calls) in kill_at:
            kill_at.clear()
            raise Killed  # the study is killed while the 4th run trains
        calls.append(cell)
        (runs_dir / cell.run_name).mkdir(parents=True, exist_ok=True)
        return _fake_row(cell, runs_dir)

    monkeypatch.setattr(runner, "run_cell", fake_run_cell)
    argv = ["--data", "d.yaml", "--norms", "bn", "gn:C/16", "--batch-sizes", "4", "2", "--seeds", "0", "1",
            "--epochs", "1", "--img", "64", "--project", str(tmp_path), "--name", "s"]
    with pytest.raises(Killed):
        compare.main(compare.parse_opt(argv))
    save_dir = tmp_path / "s"
    first = report.read_rows(save_dir / "study.csv")
    assert [(r["norm"], r["batch_size"], r["seed"]) for r in first] == [(c.norm, c.batch_size, c.seed) for c in calls]
    # the interrupted 4th cell left a run folder behind: it must be discarded, not counted
    interrupted = study.Cell("gn:C/16", 2, 0)
    (save_dir / "runs" / interrupted.run_name / "junk.txt").parent.mkdir(parents=True)
    (save_dir / "runs" / interrupted.run_name / "junk.txt").write_text("partial")

    done_before = list(calls)
    messages: list[str] = []  # the project logger does not propagate to pytest's caplog: listen to it directly
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    study.LOGGER.addHandler(handler)
    try:
        assert compare.cli(["--resume", str(save_dir)]) == 0
    finally:
        study.LOGGER.removeHandler(handler)
    resumed = calls[len(done_before):]
    assert len(done_before) == 3 and len(resumed) == 5
    assert not set(c.key for c in resumed) & set(c.key for c in done_before)
    assert resumed[0] == interrupted and not (save_dir / "runs" / interrupted.run_name / "junk.txt").exists()
    log = "\n".join(messages)
    assert "3 finished run(s)" in log and all(c.run_name in log for c in done_before)
    assert f"discarding the incomplete run folder {save_dir / 'runs' / interrupted.run_name}" in log
    rows = report.read_rows(save_dir / "study.csv")
    assert sorted((r["norm"], r["batch_size"], r["seed"]) for r in rows) == sorted(
        (c.norm, c.batch_size, c.seed) for c in study.StudyConfig.load(save_dir / "study.yaml").cells())
    # a third run has nothing left to do
    assert compare.cli(["--resume", str(save_dir)]) == 0
    assert len(calls) == 8


def test_update_doc_replaces_only_the_generated_block(tmp_path: Path) -> None:
    cfg = _config(seeds=[0, 1])
    report.write_reports(tmp_path, cfg, [_fake_row(c, tmp_path) for c in cfg.cells()])
    doc = tmp_path / "doc.md"
    doc.write_text(f"# Title\nintro\n{report.DOC_BEGIN}\nold table\n{report.DOC_END}\noutro\n")
    report.update_doc(doc, tmp_path)
    once = doc.read_text()
    assert once.startswith("# Title\nintro\n") and once.endswith(f"{report.DOC_END}\noutro\n")
    assert "old table" not in once and "| gn:C/16 − bn | 8 |" in once and "(doc_study.png)" in once
    assert (tmp_path / "doc_study.png").is_file()
    report.update_doc(doc, tmp_path)  # idempotent apart from the timestamp line
    strip = lambda t: re.sub(r"_Generated from .*_", "", t)  # noqa: E731
    assert strip(doc.read_text()) == strip(once)
    doc.write_text("no markers\n")
    with pytest.raises(ConfigError, match="block"):
        report.update_doc(doc, tmp_path)


@pytest.mark.parametrize("argv, message", [
    (["--norms", "bn", "foo"], "unknown norm 'foo'"),
    (["--batch-sizes", "8", "8"], "'8' is listed twice"),
    (["--batch-sizes", "128"], "does not divide the nominal batch 64"),
    (["--batch-sizes", "16", "24"], "24 does not divide"),
    (["--nbs", "16", "--batch-sizes", "32"], "32 does not divide the nominal batch 16"),
    (["--nbs", "0"], "--nbs: expected a positive nominal batch"),
    (["--img", "100"], "multiple of 32"),
    (["--train-args", "'unclosed"], "--train-args"),
    (["--train-args=--cos-lr --batch-size 4"], "--batch-size is set by compare.py"),
    (["--update-doc", "no-such-doc.md"], "'no-such-doc.md' not found"),
    (["--report-only"], "--report-only needs --resume"),
])
def test_bad_input_is_one_line_error_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str],
                                            message: str) -> None:
    assert compare.cli(argv + ["--project", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not any(tmp_path.iterdir())  # refused before any folder was made


def test_resume_of_a_folder_without_study_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert compare.cli(["--resume", str(tmp_path)]) == 2
    assert "not a study folder" in capsys.readouterr().err


def test_cell_config_holds_the_cell_and_fixed_settings(tmp_path: Path) -> None:
    from engine.config import DEFAULT_HYP, TrainConfig

    cfg = _config(hyp="h.yaml", train_args=["--cos-lr", "--cache"], device="cpu", workers=0)
    tc = study.cell_config(cfg, study.Cell("gn:C/16", 4, 1), tmp_path)
    assert isinstance(tc, TrainConfig)
    assert (tc.norm, tc.batch_size, tc.seed, tc.name, tc.hyp) == ("gn:C/16", 4, 1, "gn-C16-b4-s1", "h.yaml")
    assert tc.cos_lr is True and tc.cache == "ram"  # --train-args, parsed with train.py's own flags
    assert tc.exist_ok and tc.noval and tc.patience == 0 and tc.nbs == 64  # train.py's own default, explicit
    assert (tc.project, tc.workers, tc.device, tc.epochs, tc.img) == (str(tmp_path), 0, "cpu", 1, 64)
    tc16 = study.cell_config(_config(nbs=16), study.Cell("bn", 2, 0), tmp_path)
    assert tc16.nbs == 16 and tc16.hyp == DEFAULT_HYP and tc16.cos_lr is False
    # float32 on CPU unless asked, pinned: bfloat16 (--amp on) is not norm-neutral, whatever train.py's auto means
    assert tc.amp == "off" and TrainConfig().amp == "auto"
    cpu_amp = study.cell_config(_config(device="cpu", train_args=["--amp", "on"]), study.Cell("bn", 2, 0), tmp_path)
    assert cpu_amp.amp == "on"  # --train-args may change it
    assert study.cell_config(_config(device="0"), study.Cell("bn", 2, 0), tmp_path).amp == "auto"  # CUDA: float16
    with pytest.raises(ConfigError, match="--nbs is set by compare.py"):
        study.config_from_args(compare.parse_opt(["--train-args=--nbs 8"]), compare.DEFAULTS)
    with pytest.raises(ConfigError, match="--img is set by compare.py"):
        study.config_from_args(compare.parse_opt(["--train-args=--imgsz 64"]), compare.DEFAULTS)
    with pytest.raises(ConfigError, match="--train-args: '--no-such-flag' is not a train.py flag"):
        study.config_from_args(compare.parse_opt(["--train-args=--no-such-flag"]), compare.DEFAULTS)


def _train_available() -> str | None:
    """None when train.main can run a cell, else the reason it cannot (the skip message)."""
    try:
        import train
    except Exception as e:  # noqa: BLE001 - any import failure means "not ready", reported as the skip reason
        return f"train.py not importable ({type(e).__name__}: {e})"
    if not (hasattr(train, "parse_opt") and callable(getattr(train, "main", None))):
        return "train.py has no parse_opt/main yet (issue 4 not landed)"
    return None


def _tiny_synthetic(out: Path, n_train: int, n_val: int) -> Path:
    """A few images of the built-in generator (the same images as the first ones of cfg/data/synthetic.yaml)."""
    import yaml
    from data.synthetic import CLASSES, generate

    generate(out, seed=0, n_train=n_train, n_val=n_val, workers=1)
    cfg = {"path": str(out), "format": "coco", "names": CLASSES}
    for split in ("train", "val"):
        cfg.update({split: f"annotations/instances_{split}.json", f"{split}_images": f"images/{split}"})
    (out / "data.yaml").write_text(yaml.safe_dump(cfg))
    return out / "data.yaml"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("data.synthetic", reason="the built-in dataset generator (issue 3) is not importable")
    return _tiny_synthetic(tmp_path_factory.mktemp("tiny") / "data", n_train=8, n_val=4)


def test_subset_holds_the_first_images_of_each_split(tiny_data: Path, tmp_path: Path) -> None:
    import json

    from data.loader import load_data_config

    sub = load_data_config(study.subset_coco_dataset(str(tiny_data), 5, 3, tmp_path / "sub"))
    full = load_data_config(tiny_data)
    for split, n in (("train", 5), ("val", 3)):
        a, b = json.loads(Path(sub[split]).read_text()), json.loads(Path(full[split]).read_text())
        assert a["images"] == b["images"][:n] and sub[f"{split}_images"] == full[f"{split}_images"]
        ids = {im["id"] for im in a["images"]}
        assert a["annotations"] == [x for x in b["annotations"] if x["image_id"] in ids] and a["annotations"]
    with pytest.raises(ConfigError, match="needs 9"):
        study.subset_coco_dataset(str(tiny_data), 9, 1, tmp_path / "too-many")


def test_gn_paper_preset_is_the_18_run_grid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[study.StudyConfig, study.Cell]] = []
    monkeypatch.setattr(runner, "run_cell", lambda cfg, cell, runs: calls.append((cfg, cell)) or _fake_row(cell, runs))
    save_dir = compare.main(compare.parse_opt(["--preset", "gn-paper", "--project", str(tmp_path)]))
    assert save_dir == tmp_path / "gn-paper" and len(calls) == 18
    assert {(c.norm, c.batch_size, c.seed) for _, c in calls} == {
        (n, b, s) for n in ("bn", "gn:C/16") for b in (16, 4, 2) for s in (0, 1, 2)}
    config = calls[0][0]
    assert (config.epochs, config.img, config.nbs, Path(config.data).name) == (5, 192, 16, "synthetic-study.yaml")
    assert config.jobs == 2  # two cells side by side, one thread each (docs/compare.md: the time budget)
    assert "| gn:C/16 − bn |" in (save_dir / "study.md").read_text()


@pytest.mark.skipif(_train_available() is not None, reason=str(_train_available()))
@pytest.mark.parametrize("jobs", [1, 2])
def test_real_tiny_study_end_to_end(tiny_data: Path, tmp_path: Path, jobs: int) -> None:
    """2 norms × 1 batch × 1 seed, 1 epoch, on a tiny synthetic dataset: real engine.fit + validation per cell;
    jobs=2: both cells at once, each a train.py process."""
    data_yaml = tiny_data
    argv = ["--data", str(data_yaml), "--norms", "bn", "gn:C/16", "--batch-sizes", "4", "--seeds", "0",
            "--epochs", "1", "--img", "64", "--device", "cpu", "--workers", "0", "--project", str(tmp_path),
            "--name", "tiny", "--train-args=--noautoanchor", "--jobs", str(jobs)]
    save_dir = compare.main(compare.parse_opt(argv))
    rows = sorted(report.read_rows(save_dir / "study.csv"), key=lambda r: r["norm"])
    assert [(r["norm"], r["batch_size"], r["seed"]) for r in rows] == [("bn", 4, 0), ("gn:C/16", 4, 0)]
    logs = sorted(p.name for p in (save_dir / "runs").glob("*.train.log"))
    assert logs == ([] if jobs == 1 else ["bn-b4-s0.train.log", "gn-C16-b4-s0.train.log"])
    for r in rows:
        assert 0.0 <= r["mAP50-95"] <= r["mAP50"] <= 1.0
        assert r["params"] > 0 and r["train_img_per_s"] > 0 and r["infer_ms_per_img"] > 0
        assert Path(r["run_dir"]).is_dir() and not math.isnan(r["wall_time_s"])
    assert rows[0]["params"] == rows[1]["params"]  # the norm swap keeps the parameter count
    assert (save_dir / "study.png").is_file() and "| gn:C/16 |" in (save_dir / "study.md").read_text()
    if importlib.util.find_spec("tensorboard") is not None:  # each cell's curves in the study tree, for overlaying
        events = sorted(save_dir.rglob("events.out.tfevents.*"))
        assert sorted(e.parent for e in events) == sorted(Path(r["run_dir"]) for r in rows)
        assert all(e.is_relative_to(save_dir) for e in events)


@pytest.mark.skipif(_train_available() is not None, reason=str(_train_available()))
def test_syncbn_cells_run_as_torchrun_jobs(tiny_data: Path, tmp_path: Path) -> None:
    """--nproc 2: each cell is a 2-process torchrun job on CPU/gloo with batch 2 per process (syncbn normalises
    over 4 images); a real 1-epoch run at 64 px whose row holds the job's validation result."""
    argv = ["--data", str(tiny_data), "--norms", "syncbn", "--batch-sizes", "2", "--seeds", "0", "--nbs", "4",
            "--epochs", "1", "--img", "64", "--device", "cpu", "--workers", "0", "--nproc", "2",
            "--project", str(tmp_path), "--name", "sync", "--train-args=--noautoanchor --amp off"]
    save_dir = compare.main(compare.parse_opt(argv))
    rows = report.read_rows(save_dir / "study.csv")
    assert [(r["norm"], r["batch_size"], r["status"]) for r in rows] == [("syncbn", 2, "ok")]
    assert 0.0 <= rows[0]["mAP50-95"] <= rows[0]["mAP50"] <= 1.0 and rows[0]["infer_ms_per_img"] > 0
    log = (save_dir / "runs" / "syncbn-b2-s0.torchrun.log").read_text()
    assert "cpu x 2 process(es), amp off (float32)" in log, log[-2000:]
    opt = (save_dir / "runs" / "syncbn-b2-s0" / "opt.yaml").read_text()
    assert "batch_size: 4" in opt and "norm: syncbn" in opt  # 2 processes x 2 images


def test_jobs_train_cells_side_by_side_and_keep_finished_rows_after_a_failure(tmp_path: Path) -> None:
    """--jobs 2: two cells run at once, in grid order; when one fails, no new cell starts, the cell still running
    finishes and is recorded, then the error is raised."""
    import threading
    import time

    lock, running, peak, started, failed_at = threading.Lock(), [0], [0], [], []
    bad = study.Cell("bn", 2, 1)  # the 7th cell in seed-major order

    def fake(config, cell, runs_dir):
        with lock:
            started.append((cell, time.monotonic()))
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            time.sleep(0.0 if cell == bad else 0.1)
            if cell == bad:
                failed_at.append(time.monotonic())
                raise ConfigError("cell failed")
            return _fake_row(cell, runs_dir)
        finally:
            with lock:
                running[0] -= 1

    cfg = _config(jobs=2)
    with pytest.raises(ConfigError, match="cell failed"):
        runner.run_study(cfg, tmp_path, runner=fake, progress=False)
    cells = [c for c, _ in started]
    assert peak[0] == 2 and cells == cfg.cells()[:len(cells)] and cfg.cells().index(bad) == 6
    assert 7 <= len(cells) <= 8 and max(t for _, t in started) <= failed_at[0]  # nothing new after the failure
    recorded = {(r["norm"].lower(), r["batch_size"], r["seed"]) for r in report.read_rows(tmp_path / "study.csv")}
    assert recorded == {c.key for c in cells if c != bad}  # the cell running beside the failure was recorded


def test_time_line_gives_the_elapsed_time_of_cells_run_side_by_side(tmp_path: Path) -> None:
    """Cells A (1000-1100 s) and B (1000-1150 s) side by side, then C (1150-1250 s): summed 350 s = 5.8 min,
    elapsed 250 s = 4.2 min. Rows written by an older version (no finished_at) give the sum only."""
    cfg = _config(norms=["bn"], batch_sizes=[8], seeds=[0, 1, 2], jobs=2)
    rows = [{**_fake_row(c, tmp_path), "wall_time_s": w, "finished_at": e}
            for c, w, e in zip(cfg.cells(), (100.0, 150.0, 100.0), (1100.0, 1150.0, 1250.0))]
    report.write_rows(tmp_path / "study.csv", rows)
    md = report.render_markdown(cfg, report.read_rows(tmp_path / "study.csv"))
    assert "summed: 5.8 min; elapsed: 4.2 min with 2 cell(s) at a time." in md
    old = [{k: v for k, v in r.items() if k != "finished_at"} for r in rows]
    assert "summed: 5.8 min (2 cells at a time)." in report.render_markdown(cfg, old)
    seeds = _md_cells(md, "bn | 8")[1:]  # the per-run table: one column per seed
    assert seeds == [f"{100 * r['mAP50-95']:.2f}" for r in rows]


def test_jobs_split_the_cores_and_may_change_on_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 8)
    assert runner.cell_threads(_config(jobs=2)) == 4 and runner.cell_threads(_config(jobs=2, nproc=2, nbs=64)) == 2
    assert runner.cell_threads(_config(jobs=16)) == 1
    with pytest.raises(ConfigError, match="--jobs: expected 1 or more"):
        _config(jobs=0).validate()
    monkeypatch.setattr(runner, "run_cell", lambda cfg, cell, runs: _fake_row(cell, runs))
    save_dir = compare.main(compare.parse_opt(["--preset", "gn-paper", "--project", str(tmp_path), "--jobs", "1"]))
    assert study.StudyConfig.load(save_dir / "study.yaml").jobs == 1
    cfg, _ = study.open_study(compare.parse_opt(["--resume", str(save_dir), "--jobs", "3"]), compare.DEFAULTS)
    assert cfg.jobs == 3


def test_jobs_are_refused_under_torchrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from utils.dist import DistEnv

    monkeypatch.setattr(runner, "dist_env", lambda: DistEnv(rank=0, local_rank=0, world_size=2))
    with pytest.raises(ConfigError, match="--jobs: cells side by side and compare.py under torchrun do not mix"):
        runner.run_study(_config(jobs=2), tmp_path, runner=lambda c, cell, r: _fake_row(cell, r), progress=False)
    assert not (tmp_path / "study.csv").exists()


def test_nproc_must_divide_the_nominal_batch() -> None:
    with pytest.raises(ConfigError, match=r"--batch-sizes: 4 x 2 processes does not divide the nominal batch 4"):
        _config(batch_sizes=[4], nbs=4, nproc=2).validate()


def test_diverged_runs_are_counted_not_averaged(tmp_path: Path) -> None:
    cfg = _config(seeds=[0, 1, 2], batch_sizes=[2])
    rows = [_fake_row(c, tmp_path) for c in cfg.cells()]
    bad = next(r for r in rows if r["norm"] == "bn" and r["seed"] == 2)
    bad.update({"status": "diverged", "mAP50-95": math.nan, "mAP50": math.nan, "train_img_per_s": math.nan})
    report.write_rows(tmp_path / "study.csv", rows)
    back = report.read_rows(tmp_path / "study.csv")
    assert [r["status"] for r in back].count("diverged") == 1
    md = report.render_markdown(cfg, back)
    ok = [r["mAP50-95"] for r in rows if r["norm"] == "bn" and r["seed"] != 2]
    assert _md_cells(md, "bn") == [f"{100 * np.mean(ok):.2f} ± {100 * np.std(ok, ddof=1):.2f} (n=2) (1 diverged)"]
