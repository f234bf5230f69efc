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


@pytest.fixture(scope="session")
def coco128_dir() -> Path:
    """The read-only ../shared/coco128 folder; tests that modify data must copy it into tmp_path first."""
    if not (COCO128 / "images" / "train2017").is_dir():
        pytest.skip(f"coco128 not found at {COCO128} (set NORMYOLO_COCO128 to its folder)")
    return COCO128
