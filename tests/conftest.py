"""Shared fixtures: real scans from ../shared/data (see its README)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDIFFUSE_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real test scan {path} not available (set MEDIFFUSE_SHARED_DATA)")
    return path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """napari's ``make_napari_viewer`` teardown reads ``item.rep_call``, which
    does not exist when setup skipped (a real scan missing) or failed: give it
    the setup report then, so such tests skip or fail cleanly instead of
    erroring in teardown."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "setup" and not report.passed:
        item.rep_call = report


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


def chest_ct_centre_crop(shape, name="chest crop"):
    """A crop of ``shape`` (S, P, L) voxels about the centre of the real 1 mm
    chest CT (LIDC-0314, 0.78 mm pixels), HU, with its affine moved to the crop."""
    from napari_mediffuse import io

    ct, = io.read(shared("ct/chest_ct_lidc0314_1mm.nii.gz"))
    start = [n // 2 - m // 2 for n, m in zip(ct.data.shape, shape)]
    data = np.array(ct.data[tuple(slice(a, a + m) for a, m in zip(start, shape))], dtype=np.float32)
    affine = np.array(ct.affine)
    affine[:3, 3] = (affine @ np.array([*start, 1.0]))[:3]
    return io.Volume(data, affine, modality="CT", name=name)


#: Architecture of the tiny randomly initialised test checkpoints.
TINY_ARCHITECTURE = {
    "position_frequencies": 2,
    "stem_stride": 1,
    "backbone_config": {
        "block_out_channels": [8, 16],
        "down_block_types": ["DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D"],
        "norm_num_groups": 4,
    },
}


def save_tiny_checkpoint(folder, *, name="tiny-ct-prior", task="ct_prior", modality="CT",
                         condition_channels=0, seed=0, position_axes=None, **card):
    """A tiny randomly initialised checkpoint (API tests; not a useful model);
    ``position_axes=3``: a 2D prior that takes its slice's place in the volume."""
    import torch

    from napari_mediffuse.engine.checkpoint import make_card, save_checkpoint
    from napari_mediffuse.engine.networks import DiffusionNetwork

    torch.manual_seed(seed)
    arch = dict(TINY_ARCHITECTURE, condition_channels=condition_channels)
    if position_axes is not None:
        arch["position_axes"] = position_axes
    net = DiffusionNetwork(arch)
    save_checkpoint(folder, net, make_card(name=name, task=task, modality=modality, architecture=arch,
                                           pixel_spacing_mm=[3.0, 3.0], patch_size=[16, 16], **card))
    return Path(folder)


def translation_card(direction="ct2mr"):
    """Card fields of a tiny translation checkpoint (CT->MR or MR->CT)."""
    from napari_mediffuse.engine.intensity import DEFAULT_CT_NORMALIZATION, DEFAULT_MR_NORMALIZATION

    ct2mr = direction == "ct2mr"
    return dict(direction=direction, source_modality="CT" if ct2mr else "MR",
                target_modality="MR" if ct2mr else "CT",
                source_normalization=DEFAULT_CT_NORMALIZATION if ct2mr else DEFAULT_MR_NORMALIZATION,
                normalization=DEFAULT_MR_NORMALIZATION if ct2mr else DEFAULT_CT_NORMALIZATION,
                context_slices=1, slice_spacing_mm=3.0, output_range=[0.0, 1000.0] if ct2mr else None,
                condition_dropout=0.1, contrast="T1w", trained_on_simulated_pairs=True,
                schedule={"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"})


@pytest.fixture
def tiny_models(tmp_path, monkeypatch):
    """A models folder with a tiny CT prior, found through MEDIFFUSE_MODELS;
    the user and bundled folders are hidden so tests see only this one."""
    from napari_mediffuse.engine import registry

    folder = tmp_path / "models"
    save_tiny_checkpoint(folder / "tiny-ct-prior")
    monkeypatch.setenv(registry.ENV_VAR, str(folder))
    monkeypatch.setattr(registry, "user_models_dir", lambda: tmp_path / "no-user-models")
    monkeypatch.setattr(registry, "bundled_models_dir", lambda: tmp_path / "no-bundled-models")
    return folder


@pytest.fixture
def tiny_translation_models(tiny_models):
    """Adds tiny CT->MR and MR->CT checkpoints to the ``tiny_models`` folder."""
    for direction, modality in (("ct2mr", "CT"), ("mr2ct", "MR")):
        save_tiny_checkpoint(tiny_models / f"tiny-{direction}", name=f"tiny-{direction}", task="translation",
                             modality=modality, condition_channels=3, **translation_card(direction))
    return tiny_models
