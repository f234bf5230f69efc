"""benchmarks/default_run_ab.py: the README command it times, the alternation order, what it reads from a run's
results.csv and the ratios it prints, with the runs themselves faked (a real run takes half an hour)."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from benchmarks import default_run_ab as script  # tests may import scripts; the library may not

ROOT = Path(__file__).resolve().parents[1]
HEADER = "epoch,metrics/mAP50,metrics/mAP50-95,epoch_time_s"


def test_default_command_is_the_readme_train_command() -> None:
    assert script.README_COMMAND in (ROOT / "README.md").read_text().splitlines()


def test_rounds_alternate_which_code_runs_first() -> None:
    assert script.run_order(1) == [(0, "after"), (0, "before")]
    assert script.run_order(3) == [(0, "after"), (0, "before"), (1, "before"), (1, "after"),
                                   (2, "after"), (2, "before")]


def _results(clone: Path, name: str, text: str) -> None:
    d = clone / "runs" / "train" / name
    d.mkdir(parents=True)
    (d / "results.csv").write_text(text)


def test_read_results_sums_epochs_and_marks_unlogged_validation(tmp_path) -> None:
    assert script.read_results(tmp_path)["train_s"] is None  # the run wrote nothing
    _results(tmp_path, "exp", f"{HEADER},val_time_s\n0,0.1,0.05,80.5,12.0\n1,0.3,0.1,70.0,9.5\n")
    got = script.read_results(tmp_path)
    assert got["train_s"] == pytest.approx(150.5) and got["val_s"] == pytest.approx(21.5)
    assert got["map50"] == [0.1, 0.3] and got["map50_95"] == [0.05, 0.1]
    old = tmp_path / "old"
    _results(old, "exp", f"{HEADER}\n0,0.2,0.07,90.0\n")  # the code of 6177323 logs no validation time
    got = script.read_results(old)
    assert got["train_s"] == pytest.approx(90.0) and got["val_s"] is None


def test_ratios_per_round_and_overall_and_curve_gaps(tmp_path, monkeypatch, capsys) -> None:
    wall = {0: 800.0, 1: 1000.0, 2: 1100.0, 3: 900.0}  # after, before, before, after: 0.8 and 0.818
    curves = {0: [0.1, 0.70], 1: [0.1, 0.75], 2: [0.12, 0.75], 3: [0.1, 0.70]}
    seen: list[tuple[str, str]] = []

    def fake_run(sha: str, label: str, index: int, opt: argparse.Namespace, out: Path) -> dict:
        seen.append((label, sha))
        return {"index": index, "label": label, "commit": sha[:7], "utc": "00:00-00:10", "rc": 0,
                "wall_s": wall[index], "train_s": wall[index] - 100, "val_s": None if label == "before" else 90.0,
                "map50": curves[index], "map50_95": [0.0, 0.4], "results": None}

    monkeypatch.setattr(script, "run_once", fake_run)
    assert script.main(["--before", "HEAD", "--after", "HEAD", "--rounds", "2", "--out", str(tmp_path)]) == 0
    head = script.resolve("HEAD")
    assert seen == [("after", head), ("before", head), ("before", head), ("after", head)]
    out = capsys.readouterr().out
    assert "| 1 | before | " + head[:7] + " | 00:00-00:10 | 1,000 s | 900 s | not logged | 0.750 / 0.400 | 0 |" in out
    assert "per round: 0.800, 0.818; over all runs 0.810 (1,700 s against 2,100 s)" in out
    assert "difference after vs before: 0.0500 (epoch 1)" in out
    assert "difference between after runs: 0.0000" in out and "between before runs: 0.0200 (epoch 0)" in out
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 4


def test_a_failed_run_fails_the_script_and_an_unknown_commit_is_one_line(tmp_path, monkeypatch) -> None:
    def fake_run(sha: str, label: str, index: int, opt: argparse.Namespace, out: Path) -> dict:
        return {"index": index, "label": label, "commit": sha[:7], "utc": "", "rc": 1 if label == "before" else 0,
                "wall_s": 5.0, "train_s": None, "val_s": None, "map50": [], "map50_95": [], "results": None}

    monkeypatch.setattr(script, "run_once", fake_run)
    assert script.main(["--before", "HEAD", "--out", str(tmp_path)]) == 1
    with pytest.raises(SystemExit, match="'no-such-rev' is not a commit of"):
        script.main(["--before", "no-such-rev", "--out", str(tmp_path)])
