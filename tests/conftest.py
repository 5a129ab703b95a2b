"""Shared fixtures: real scans from ../shared/data (see its README)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDIFFUSE_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real test scan {path} not available (set MEDIFFUSE_SHARED_DATA)")
    return path


@pytest.fixture
def ct_small_path() -> Path:
    """Real abdominal CT crop, 122 x 101 x 30 at 3 mm, int16 HU."""
    return shared("ct/abdomen_ct_3mm_small.nii.gz")


@pytest.fixture
def ct_path() -> Path:
    """Real abdominal CT, 122 x 101 x 112 at 3 mm."""
    return shared("ct/abdomen_ct_3mm.nii.gz")


@pytest.fixture
def mr_lps_path() -> Path:
    """Real abdominal MR stored in LPS orientation, 117 x 91 x 20 at 3 mm."""
    return shared("mr/abdomen_mr_3mm_small.nii.gz")


@pytest.fixture
def ct_seg_path() -> Path:
    return shared("ct/abdomen_ct_3mm_small_seg.nii.gz")
