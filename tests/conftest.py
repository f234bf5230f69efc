"""Shared pytest fixtures: the real coco128 subset (read-only, skipped when absent) and repo paths."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COCO128 = Path(os.environ.get("NORMYOLO_COCO128", ROOT.parent / "shared" / "coco128"))


SYN_NAMES = ["circle", "square", "triangle", "star", "cross", "ring", "hexagon", "arrow", "crescent", "heart"]


@pytest.fixture(scope="module")
def syn_yaml(tmp_path_factory) -> Path:
    """A 12-image val split of the built-in synthetic dataset (generated once per test module into a temporary
    folder); its 10 classes are SYN_NAMES."""
    root = tmp_path_factory.mktemp("syn")
    y = root / "syn.yaml"
    y.write_text(f"path: {root / 'data'}\nformat: coco\ntrain: annotations/instances_train.json\n"
                 "train_images: images/train\nval: annotations/instances_val.json\nval_images: images/val\n"
                 f"synthetic: {{seed: 0, train: 2, val: 12}}\nnc: 10\nnames: {SYN_NAMES}\n")
    return y


@pytest.fixture(scope="session")
def coco128_dir() -> Path:
    """The read-only ../shared/coco128 folder; tests that modify data must copy it into tmp_path first."""
    if not (COCO128 / "images" / "train2017").is_dir():
        pytest.skip(f"coco128 not found at {COCO128} (set NORMYOLO_COCO128 to its folder)")
    return COCO128
