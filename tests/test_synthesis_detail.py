"""The detail stage of synthesis (task ct_prior_detail): its training pairs, its
sampler and how synthesis picks and runs it."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_mediffuse.engine.checkpoint import load_checkpoint
from napari_mediffuse.engine.sampling import AxisCorrelatedNoise, make_generator
from napari_mediffuse.tasks.common import RunOptions, TaskInputError, predictor_for
from napari_mediffuse.tasks.synthesize import (
    DEFAULT_SLICE_CORRELATION,
    DETAIL_REFINE_FROM,
    alternating_plane_predictor,
    draw_detail,
    place_box,
    placed_layout,
    synthesize,
)
from tests.conftest import TINY_ARCHITECTURE, save_tiny_checkpoint
from tests.test_synthesis import _phantom_ct

DETAIL_CONFIG = Path(__file__).resolve().parents[1] / "training" / "configs" / "ct_prior_detail_multi.yaml"
WATER = (40 + 1024) / 1536 - 1  # 40 HU in the [-1024, 2048] window
BONE = (700 + 1024) / 1536 - 1


def _bone_box():
    """A 96 mm box of 8 mm voxels (HU): soft tissue with a bone column along S, air around."""
    box = np.full((12, 12, 12), -1000.0, np.float32)
    box[:, 2:10, 2:10] = 40.0
    box[:, 5:7, 5:7] = 700.0
    return box


def test_coarse_view_is_the_volume_at_the_coarse_voxel_in_place():
    from training.layout_detail import coarse_view

    # 3 mm voxels: a water ellipse (36 x 45 mm half-axes) with a bone rod of 6 mm radius,
    # centred 18 mm posterior of the centre (rows 19-22, row 20.5 at its centre)
    volume = np.asarray(_phantom_volume(), dtype=np.float32)
    view = coarse_view(volume, (3.0, 3.0, 3.0), 8.0)
    assert view.shape == volume.shape
    # inside the body far from its edge and the rod: water; outside: air
    assert view[20, 15, 22] == pytest.approx(WATER, abs=0.01)
    assert view[20, 0, 0] == pytest.approx(-1.0, abs=1e-3)
    # the rod is blurred at 8 mm: its peak drops well below bone but stays above water, in place
    rod = view[20, :, 18]
    assert WATER + 0.05 < rod.max() < BONE - 0.1
    assert abs(int(np.argmax(rod)) - 20.5) <= 1.5
    # nothing moves: the body's centre of mass along each axis stays within half a fine voxel
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        weight_in, weight_out = (volume + 1).sum(axis=other), (view + 1).sum(axis=other)
        idx = np.arange(volume.shape[axis])
        assert abs((idx * weight_in).sum() / weight_in.sum() - (idx * weight_out).sum() / weight_out.sum()) < 0.5


def _phantom_volume(shape=(40, 30, 36)):
    s, p, l = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    hu = np.full(shape, -1024.0, dtype=np.float32)
    hu[(p / 12) ** 2 + (l / 15) ** 2 <= 1] = 40.0
    hu[(p - 6) ** 2 + l ** 2 <= 4] = 700.0
    return (hu + 1024) / 1536 - 1


@pytest.fixture
def tiny_detail_config(tmp_path):
    from training.trainer import load_config

    config = load_config(DETAIL_CONFIG)
    data = config["data"]
    data["train"] = [{"path": str(_phantom_ct(tmp_path / "phantom.nii.gz")), "region": "head-neck"}]
    data["validation"] = [{"path": str(_phantom_ct(tmp_path / "held_out.nii.gz", shape=(20, 30, 36))),
                           "region": "head-neck"}]
    data.pop("evaluation_only")
    data.update(patch_size=32, augment=False, condition_blur_mm=0.0)
    config["architecture"] = dict(TINY_ARCHITECTURE, condition_channels=1,
                                  condition_windows=config["architecture"]["condition_windows"],
                                  position_frequencies=0)
    config["train"].update(batch_size=2, max_steps=2, validation_samples=2, log_every=1, validate_every=2)
    return config


def test_detail_pairs_are_fine_slices_over_their_coarse_view(tiny_detail_config):
    from training.layout_detail import coarse_view
    from training.trainer import make_datasets

    train_set, val_set = make_datasets(tiny_detail_config)
    scale = tiny_detail_config["data"]["residual_scale"]
    volume = val_set.volumes[0]
    # 20 x 30 x 36 voxels of 3 mm (the body fills them) resampled to 4 mm
    n, h, w = volume.data.shape
    assert volume.spacing_mm == (4.0, 4.0, 4.0) and n == 15 and abs(h - 22.5) <= 0.5 and w == 27
    view = coarse_view(volume.data, volume.spacing_mm, 8.0)

    def pairs(stream, count):
        """(target, condition, index of the slice the target is) of ``count`` samples."""
        for sample in itertools.islice(iter(stream), count):
            image, condition = sample["image"][0].numpy(), sample["condition"][0].numpy()
            assert image.shape == condition.shape == (32, 32) and sample["coords"].shape == (2, 32, 32)
            assert int(sample["region"]) == 1  # head-neck
            # slices smaller than the patch: the crop starts at the corner, air pads the rest
            target = condition + image / scale
            assert np.all(target[h:] == -1.0) and np.all(condition[:, w:] == -1.0)
            index = int(np.argmin([np.abs(volume.data[k] - target[:h, :w]).max() for k in range(n)]))
            np.testing.assert_allclose(target[:h, :w], volume.data[index], atol=1e-5)
            yield target[:h, :w], condition[:h, :w], index

    for _, condition, index in pairs(val_set, 6):
        np.testing.assert_allclose(condition, view[index], atol=1e-6)
    # training conditions are blurred further at random (condition_blur_mm), never sharpened
    tiny_detail_config["data"]["condition_blur_mm"] = 8.0
    tiny_detail_config["data"]["train"] = tiny_detail_config["data"]["validation"]
    blurred, _ = make_datasets(tiny_detail_config)
    differ = 0
    for _, condition, index in pairs(blurred, 6):
        assert np.abs(np.diff(condition, axis=1)).max() <= np.abs(np.diff(view[index], axis=1)).max() + 1e-6
        differ += not np.allclose(condition, view[index], atol=1e-3)
    assert differ >= 4
    tiny_detail_config["data"]["coarse_mm"] = 4.0
    with pytest.raises(ValueError, match="coarse_mm .* must be coarser than spacing_mm"):
        make_datasets(tiny_detail_config)


def test_a_detail_model_trains_and_records_its_layout_voxel(tiny_detail_config, tmp_path):
    from training.trainer import train

    folder = train(tiny_detail_config, tmp_path / "detail-run", device="cpu", command="pytest")
    ckpt = load_checkpoint(folder, task="ct_prior_detail", modality="CT")
    card = ckpt.card
    assert card["coarse_voxel_mm"] == 8.0 and card["residual_scale"] == 4.0
    assert card["pixel_spacing_mm"] == [4.0, 4.0] and ckpt.network.condition_channels == 1
    assert "layout_blur_mm" not in card  # trained on unblurred layouts only (condition_blur_mm 0)
    # a model trained on layouts blurred further records how far (tasks.synthesize.fits_layout reads it)
    from training.trainer import export_ema

    tiny_detail_config["data"]["condition_blur_mm"] = 16.0
    (tmp_path / "blurred").mkdir()
    blurred = export_ema(tiny_detail_config, ckpt.network, tmp_path / "blurred" / "ema", step=1, seconds=0.0)
    assert load_checkpoint(blurred, task="ct_prior_detail", modality="CT").card["layout_blur_mm"] == 16.0


def test_a_detail_model_trained_on_blurred_layouts_details_coarser_boxes():
    from napari_mediffuse.tasks.synthesize import coarsest_layout_mm, fits_layout

    sharp = {"coarse_voxel_mm": 8.0}
    assert fits_layout(sharp, 8.0) and not fits_layout(sharp, 16.0) and not fits_layout(sharp, 4.0)
    assert coarsest_layout_mm(sharp) == 8.0 and not fits_layout({}, 8.0)
    # layouts of 8 mm blurred by a Gaussian of sigma up to 16 mm: as blurred as boxes of up to
    # sqrt(8^2 + (16 / 0.4)^2) = 40.8 mm voxels (a box's own low-pass is 0.4 voxel)
    blurred = {"coarse_voxel_mm": 8.0, "layout_blur_mm": 16.0}
    assert coarsest_layout_mm(blurred) == pytest.approx(40.79, abs=0.01)
    assert fits_layout(blurred, 16.0) and fits_layout(blurred, 8.0)
    assert not fits_layout(blurred, 48.0) and not fits_layout(blurred, 4.0)


def test_a_covering_grid_keeps_every_edge_voxel_when_resampled():
    from napari_mediffuse.tasks.synthesize import covering_shape
    from training.layout_detail import coarse_view

    # a detail stage's 4 mm draw of body to its edges, placed on a 20 x 16 x 18 output grid of 3 mm:
    # no edge voxel of the output becomes air (a rounded grid, 15 x 12 x 14, lost the outermost ones)
    shape = covering_shape((20, 16, 18), 3.0, 4.0)
    assert shape == (16, 13, 14) and covering_shape((20, 16, 18), 4.0, 4.0) == (20, 16, 18)
    placed = place_box(np.full(shape, 40.0, np.float32), (4.0,) * 3, (20, 16, 18), (3.0,) * 3, fill=-1024.0)
    np.testing.assert_allclose(placed, 40.0, atol=1e-4)
    rounded = place_box(np.full((15, 12, 14), 40.0, np.float32), (4.0,) * 3, (20, 16, 18), (3.0,) * 3,
                        fill=-1024.0)
    assert rounded[0].mean() < 0  # what the covering grid avoids
    # the training condition of a volume that is body to its edges is body to its edges (shapes whose
    # rounding put the outermost voxels outside the coarse box lost them before)
    for shape in ((34, 20, 21), (35, 20, 21)):
        view = coarse_view(np.full(shape, WATER, np.float32), (4.0,) * 3, 8.0)
        np.testing.assert_allclose(view, WATER, atol=1e-4)


def test_plane_predictor_gives_each_slice_its_condition():
    seen = []

    def fake(chunk, t, region=None, condition=None):
        seen.append(condition.shape)
        return condition[:, :1] * 2 + t

    condition = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(1, 1, 4, 5, 6)
    predict = alternating_plane_predictor(fake, ("axial",), batch_size=3, condition=condition)
    out = predict(torch.zeros(1, 1, 4, 5, 6), 7)
    torch.testing.assert_close(out, condition * 2 + 7)
    assert seen == [(3, 1, 5, 6), (1, 1, 5, 6)]


class _ZeroCorrection:
    """A detail network whose every x0 estimate is a zero correction (residual
    models: the layout itself), recording the conditions it is given."""

    device = torch.device("cpu")

    def __init__(self, schedule):
        from napari_mediffuse.engine.schedulers import alphas_cumprod

        self.abar = alphas_cumprod(schedule)
        self.conditions = []

    def __call__(self, x, t, region=None, condition=None):
        self.conditions.append(condition)
        return x / float(1 - self.abar[t]) ** 0.5  # eps of x0 = 0


@pytest.fixture
def tiny_detail_model(tiny_models):
    save_tiny_checkpoint(tiny_models / "tiny-detail", name="tiny-detail", task="ct_prior_detail",
                         condition_channels=1, residual_scale=4.0, coarse_voxel_mm=8.0,
                         regions=["unknown", "head-neck", "chest", "abdomen"],
                         schedule={"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"})
    return load_checkpoint(tiny_models / "tiny-detail", task="ct_prior_detail", modality="CT")


def test_draw_detail_adds_the_models_correction_to_the_layout(tiny_detail_model):
    layout = placed_layout(_bone_box(), 8.0, (20, 16, 18), 3.0, tiny_detail_model)
    net = _ZeroCorrection(tiny_detail_model.schedule)
    out = draw_detail(tiny_detail_model, net, layout, region=1, steps=3,
                      noise=AxisCorrelatedNoise(make_generator(0), 0.97), batch_size=8)
    # a zero correction gives the layout back, in HU (bone column 700 HU, soft tissue 40, air -1024)
    np.testing.assert_allclose(out, layout, atol=0.05)
    assert out[10, 7:9, 8:10].mean() > 500
    # every step saw every axial slice's layout, normalised
    normalised = (layout + 1024) / 1536 - 1
    seen = torch.cat(net.conditions[:3])[:, 0].numpy()  # first step: 20 slices in batches of 8
    np.testing.assert_allclose(seen, normalised, atol=1e-5)


def test_synthesis_runs_the_detail_stage_on_its_grid(tiny_detail_model, tiny_models):
    box = _bone_box()
    opts = RunOptions(device="cpu", seed=3, batch_size=8)
    vol = synthesize((20, 16, 18), model="tiny-ct-prior", steps=3, layout=(box, 8.0), options=opts)
    params = vol.metadata["parameters"]
    # an installed detail model for the layout's 8 mm is picked; on its own 3 mm grid its draw is the result
    assert params["detail_model"] == "tiny-detail" and params["refine_from"] is None
    assert params["refine_steps"] is None and params["slice_correlation"] == DEFAULT_SLICE_CORRELATION
    layout = placed_layout(box, 8.0, (20, 16, 18), 3.0, tiny_detail_model)
    expected = draw_detail(tiny_detail_model, predictor_for(tiny_detail_model, opts), layout, region=3, steps=3,
                           noise=AxisCorrelatedNoise(make_generator(3), DEFAULT_SLICE_CORRELATION), batch_size=8)
    np.testing.assert_allclose(vol.data, expected, atol=0.05)
    plain = synthesize((20, 16, 18), model="tiny-ct-prior", steps=3, layout=(box, 8.0), detail_model="none",
                       options=opts)
    assert plain.metadata["parameters"]["detail_model"] is None
    np.testing.assert_array_equal(plain.affine, vol.affine)
    # a detail model of 4 mm voxels off the prior's 3 mm grid: the 2D prior refines its draw from
    # DETAIL_REFINE_FROM on the output grid
    import json
    import shutil

    folder = shutil.copytree(tiny_models / "tiny-detail", tiny_models.parent / "tiny-detail-4mm")
    card = json.loads((folder / "mediffuse.json").read_text())
    card.update(name="tiny-detail-4mm", pixel_spacing_mm=[4.0, 4.0])
    (folder / "mediffuse.json").write_text(json.dumps(card))
    reports = []
    refined = synthesize((20, 16, 18), model="tiny-ct-prior", steps=10, layout=(box, 8.0),
                         detail_model=str(folder),
                         options=RunOptions(device="cpu", seed=3, batch_size=8,
                                            progress=lambda done, total, message="": reports.append((done, total))))
    # one total over both stages (10 detail steps, then 4 of the prior), never going back
    assert {total for _, total in reports} == {14} and reports[-1] == (14, 14)
    assert [done for done, _ in reports] == sorted(done for done, _ in reports)
    params = refined.metadata["parameters"]
    assert params["detail_model"] == "tiny-detail-4mm" and params["refine_from"] == DETAIL_REFINE_FROM
    assert params["refine_steps"] == 4 and refined.data.shape == (20, 16, 18)
    np.testing.assert_array_equal(refined.affine, vol.affine)
    # a layout of another voxel size is not detailed by 'auto'; naming the model uses it
    assert synthesize((20, 16, 18), model="tiny-ct-prior", steps=2, layout=(box, 12.0),
                      options=opts).metadata["parameters"]["detail_model"] is None
    named = synthesize((20, 16, 18), model="tiny-ct-prior", steps=2, layout=(box, 12.0), detail_model="tiny-detail",
                       options=opts)
    assert named.metadata["parameters"]["detail_model"] == "tiny-detail"
    assert named.metadata["warnings"] == ["detail stage tiny-detail learnt layouts of 8 mm voxels, not 12 mm"]
    # on its own grid the detail draw is the result: a refine_from is not used, and says so; eta is used
    told = synthesize((20, 16, 18), model="tiny-ct-prior", steps=3, layout=(box, 8.0), refine_from=500, options=opts)
    np.testing.assert_array_equal(told.data, vol.data)
    assert told.metadata["warnings"] == ["refine_from 500 not used: the detail stage's 3 mm draw is the result on "
                                         "this grid"]
    assert vol.metadata["warnings"] == [] and vol.metadata["parameters"]["planes"] is None
    ancestral = synthesize((20, 16, 18), model="tiny-ct-prior", steps=3, layout=(box, 8.0), eta=1.0, options=opts)
    assert np.abs(ancestral.data - vol.data).mean() > 1.0  # HU
    with pytest.raises(TaskInputError, match="detail stage: no checkpoint named 'nope'"):
        synthesize((20, 16, 18), model="tiny-ct-prior", layout=(box, 8.0), detail_model="nope", options=opts)
    # without a layout there is nothing to detail
    alone = synthesize((16, 16, 16), model="tiny-ct-prior", steps=1, coarse_model="none", options=opts)
    assert alone.metadata["parameters"]["detail_model"] is None


def test_the_panel_asks_for_the_detail_stage_unless_unticked(monkeypatch, tiny_detail_model):
    import napari_mediffuse.tasks.synthesize as synthesis
    from napari_mediffuse.gui.specs import synthesis_spec

    spec = synthesis_spec()
    values = {param.name: param.default for param in spec.params}
    assert values["detail_stage"] is True
    values.update(slices=16, rows=16, columns=16, steps=1, model="tiny-ct-prior", seed=0)
    asked = []
    run = synthesis.synthesize
    monkeypatch.setattr(synthesis, "synthesize", lambda *args, **kwargs: asked.append(kwargs) or run(*args, **kwargs))
    for ticked in (True, False):
        values["detail_stage"] = ticked
        (data, kwargs, kind), = spec.run(None, values, RunOptions(device="cpu", seed=0, batch_size=8))
        assert kind == "image" and data.shape == (16, 16, 16)
    assert [kwargs["detail_model"] for kwargs in asked] == ["auto", None]
