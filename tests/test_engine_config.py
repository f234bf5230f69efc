"""engine/config.py: TrainConfig mirrors train.py's flags, given_flags, resume merging and the value checks."""
from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import train
from engine.config import TrainConfig, add_train_arguments, check_config, given_flags
from utils.general import ROOT, ConfigError


def test_fields_are_train_py_flags_in_order() -> None:
    ns = train.parse_opt([])
    names = [f.name for f in fields(TrainConfig)]
    assert list(vars(ns)) == names[:-1] and names[-1] == "save_dir"  # opt.yaml keeps its key order
    cfg = TrainConfig.from_namespace(ns)
    assert cfg == TrainConfig()  # the flag defaults are the config defaults
    assert (cfg.epochs, cfg.batch_size, cfg.nbs, cfg.img, cfg.patience) == (15, 16, 64, 320, 100)
    plain = cfg.plain()
    assert list(plain) == names and all(not isinstance(v, Path) for v in plain.values())


def test_given_flags_only_returns_what_was_named() -> None:
    p = add_train_arguments(argparse.ArgumentParser())
    assert given_flags(p, []) == {}
    got = given_flags(p, ["--cos-lr", "--imgsz", "64", "--patience", "100", "--cache"])
    assert got == {"cos_lr": True, "img": 64, "patience": 100, "cache": "ram"}  # a default value still counts
    with pytest.raises(ConfigError, match="'--bogus' is not a train.py flag"):
        given_flags(p, ["--bogus"])


@pytest.mark.parametrize("change, message", [
    ({"epochs": 0}, "--epochs 0"), ({"batch_size": 0}, "--batch-size 0"), ({"img": 100}, "--img 100"),
    ({"nbs": 0}, "--nbs 0"), ({"workers": -2}, "--workers -2"), ({"close_mosaic": -2}, "--close-mosaic -2"),
    ({"cache": "disk"}, "--cache disk: not implemented"), ({"cfg": "nope.yaml"}, "--cfg nope.yaml: file not found"),
])
def test_check_config_rejects_with_the_flag_name(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_config(TrainConfig(**change))


def test_check_config_resolves_bare_file_names() -> None:
    cfg = check_config(TrainConfig(cfg="yolo-n-gn.yaml", hyp="scratch.yaml"))
    assert cfg.cfg == str(ROOT / "cfg" / "models" / "yolo-n-gn.yaml")
    assert cfg.hyp == str(ROOT / "cfg" / "hyp" / "scratch.yaml")


def test_cache_disk_is_refused_by_train_py(capsys: pytest.CaptureFixture) -> None:
    assert train.cli(["--cache", "disk", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --cache disk: not implemented; use --cache ram (or no cache)"


def test_config_to_argv_round_trips_through_train_flags() -> None:
    """A study cell launched as a torchrun job gets train.py flags that rebuild exactly its TrainConfig."""
    import argparse

    from engine.config import TrainConfig, add_train_arguments, config_to_argv

    cfg = TrainConfig(epochs=3, norm="syncbn", noval=True, exist_ok=True, img=64, cache="ram", nbs=16,
                      tensorboard=False, amp="off", batch_size=4, seed=7, patience=0)
    argv = config_to_argv(cfg)
    assert "--no-tensorboard" in argv and "--exist-ok" in argv and "--data" not in argv  # defaults are left out
    parsed = add_train_arguments(argparse.ArgumentParser()).parse_args(argv)
    assert TrainConfig.from_namespace(parsed) == cfg


def test_selects_cpu_agrees_with_select_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from utils.general import select_device, selects_cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for spec in ("cpu", " CPU ", "", None):
        assert selects_cpu(spec) and select_device(spec).type == "cpu", spec
    assert not selects_cpu("0") and not selects_cpu("cuda:0")  # never raises, unlike select_device without CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not selects_cpu("") and selects_cpu("cpu")
