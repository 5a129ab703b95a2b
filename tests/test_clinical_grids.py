"""Every task on clinical grids built from a real thin-slice chest CT
(../shared/data/ct/chest_ct_lidc0314_1mm.nii.gz, 0.78 x 0.78 x 1 mm, LPS):
its native pixels, resampled to 0.4 mm pixels, and 5 mm slabs. Small crops
for speed; the bundled default models (the CT prior ct-prior-multi saw 0.6-4 mm
pixels, so 0.78 mm is inside and 0.4 mm outside). The tasks must run, keep the
input's grid (mm), stay finite, say when the grid is outside what the model
saw, and do what they are for (measured against the real CT).
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_mediffuse import io
from napari_mediffuse.io.volume import Volume
from napari_mediffuse.tasks import anomaly, denoise, inpaint, superres, translate
from napari_mediffuse.tasks.common import GRID_LIMITS, RunOptions, TaskInputError, check_grid

from conftest import shared

FAST = RunOptions(device="cpu", batch_size=16, seed=0)  # few network calls on small crops


def crop(volume: Volume, start, size) -> Volume:
    """A box of ``size`` voxels from voxel ``start``, at the same world position (mm)."""
    index = tuple(slice(a, a + n) for a, n in zip(start, size))
    affine = np.array(volume.affine)
    affine[:3, 3] = (affine @ np.array([*start, 1.0]))[:3]
    return volume.with_data(np.array(volume.data[index]), affine=affine)


@pytest.fixture(scope="module")
def chest():
    ct, = io.read(shared("ct/chest_ct_lidc0314_1mm.nii.gz"))
    return ct


@pytest.fixture(scope="module")
def native(chest):
    """6 axial slices of 96 x 96 pixels (0.78 mm) through the mediastinum and a lung."""
    s, p, l = (n // 2 for n in chest.data.shape)
    return crop(chest, (s, p - 48, l - 20), (6, 96, 96))


@pytest.fixture(scope="module")
def fine(native):
    """The native crop's central 48 x 48 pixels resampled to 0.4 mm (cubic)."""
    small = crop(native, (0, 24, 24), (6, 48, 48))
    data = ndimage.zoom(small.data.astype(np.float32), (1.0, 0.78125 / 0.4, 0.78125 / 0.4), order=3,
                        grid_mode=True, mode="nearest")
    zoom = np.array(data.shape[1:]) / np.array(small.data.shape[1:])  # as ndimage rounded it
    affine = np.array(small.affine)
    # grid_mode: new pixel j is centred at old pixel coordinate (j + 0.5) / zoom - 0.5
    affine[:3, 3] += affine[:3, 1:3] @ (0.5 / zoom - 0.5)
    affine[:3, 1:3] /= zoom
    return small.with_data(np.round(data).astype(np.int16), affine=affine)


@pytest.fixture(scope="module")
def thick_and_truth(chest):
    """5 mm slabs (mean of 5 thin slices) of a 25-slice, 96 x 96 crop, and the 1 mm truth."""
    s, p, l = (n // 2 for n in chest.data.shape)
    thin = crop(chest, (s - 12, p - 48, l - 20), (25, 96, 96))
    slabs = thin.data.astype(np.float32).reshape(5, 5, 96, 96).mean(axis=1)
    affine = np.array(thin.affine)
    affine[:3, 3] = (affine @ np.array([2.0, 0, 0, 1]))[:3]  # slab centre = its middle thin slice
    affine[:3, 0] *= 5
    return thin.with_data(slabs, affine=affine), thin


def test_chest_grids_are_what_the_fixtures_say(native, fine, thick_and_truth):
    np.testing.assert_allclose(native.spacing, (1.0, 0.78125, 0.78125), atol=1e-3)
    np.testing.assert_allclose(fine.spacing, (1.0, 0.4, 0.4), atol=2e-3)
    thick, thin = thick_and_truth
    np.testing.assert_allclose(thick.spacing, (5.0, 0.78125, 0.78125), atol=1e-3)
    # the fine grid keeps the native crop's world extent: its centre is the same point (mm)
    centre = lambda v: v.affine @ np.array([*(np.array(v.data.shape) - 1) / 2.0, 1.0])  # noqa: E731
    np.testing.assert_allclose(centre(fine)[1:3], centre(crop(native, (0, 24, 24), (6, 48, 48)))[1:3],
                               atol=0.05)


def assert_same_grid(result: Volume, source: Volume):
    assert result.data.shape == source.data.shape
    np.testing.assert_allclose(result.affine, source.affine, atol=1e-4)
    assert np.isfinite(result.data).all()


def pixel_warning(result: Volume) -> bool:
    return any("pixels" in w and "outside what the model saw" in w for w in result.metadata["warnings"])


def soft_tissue_rmse(a, b, reference):
    mask = (reference > -160) & (reference < 240)
    return float(np.sqrt(np.mean((np.asarray(a, float)[mask] - np.asarray(b, float)[mask]) ** 2)))


@pytest.mark.parametrize("grid", ["native", "fine"])
def test_denoise_on_clinical_pixels_removes_noise(grid, request):
    clean = request.getfixturevalue(grid)
    rng = np.random.default_rng(0)
    noisy = clean.with_data((clean.data + rng.normal(0, 40, clean.data.shape)).astype(np.float32))
    result = denoise.denoise(noisy, method="diffusion", options=FAST)
    assert_same_grid(result, noisy)
    assert result.metadata["model"] == "ct-prior-multi"
    assert pixel_warning(result) == bool(result.metadata.get("out_of_domain")) == (grid == "fine")
    before = soft_tissue_rmse(noisy.data, clean.data, clean.data)
    after = soft_tissue_rmse(result.data, clean.data, clean.data)
    assert after < 0.8 * before, (before, after)


def test_super_resolution_of_5mm_slabs_on_0p78mm_pixels(thick_and_truth):
    thick, thin = thick_and_truth
    result = superres.super_resolve(thick, factor=5, method="diffusion", steps=2, options=FAST)
    assert result.data.shape == thin.data.shape
    # the slab model puts the thin slices exactly where the real 1 mm slices are
    np.testing.assert_allclose(result.affine, thin.affine, atol=1e-3)
    assert result.metadata["model"] == "ct-prior-multi" and not pixel_warning(result)  # 0.78 mm: inside
    # consistent with the measured slabs wherever the final clip to the input's HU range left it alone
    lo, hi = thick.data.min(), thick.data.max()
    clipped = ((result.data <= lo + 1e-3) | (result.data >= hi - 1e-3)).reshape(5, 5, 96, 96).any(axis=1)
    assert clipped.mean() < 0.1
    slabs = result.data.reshape(5, 5, 96, 96).mean(axis=1)
    np.testing.assert_allclose(slabs[~clipped], thick.data[~clipped], atol=0.01)
    cubic = superres.super_resolve(thick, factor=5, method="cubic")
    err = lambda v: float(np.sqrt(np.mean((v.data - thin.data.astype(np.float32)) ** 2)))  # noqa: E731
    assert err(result) < 1.1 * err(cubic), (err(result), err(cubic))


def test_super_resolution_by_default_takes_the_learned_model_for_5mm_slabs(thick_and_truth):
    thick, thin = thick_and_truth
    result = superres.super_resolve(thick, factor=5, options=FAST)
    np.testing.assert_allclose(result.affine, thin.affine, atol=1e-3)
    assert (result.metadata["model"], result.metadata["parameters"]["method"]) == ("ct-sr-multi", "learned")
    assert not result.metadata.get("out_of_domain")
    cubic = superres.super_resolve(thick, factor=5, method="cubic")
    err = lambda v: float(np.sqrt(np.mean((v.data - thin.data.astype(np.float32)) ** 2)))  # noqa: E731
    # measured 80.6 against 83.4 HU RMSE on this 96 x 96 crop (the whole held-out block: +2 dB, clinical.md)
    assert err(result) < 0.98 * err(cubic), (err(result), err(cubic))
    # 1.5 mm slices are thinner than any slab the learned model saw: DiffPIR with the prior instead
    thin_slices = thick.with_data(thick.data, affine=thick.affine @ np.diag([0.3, 1.0, 1.0, 1.0]))
    chosen = superres.super_resolve(thin_slices, factor=2, steps=1, planes="coronal", options=FAST)
    assert chosen.metadata["parameters"]["method"] == "diffusion"
    assert "1.5 mm apart" in chosen.metadata["parameters"]["method_auto"]


def test_learned_super_resolution_named_explicitly_warns_about_the_thin_spacing(thick_and_truth):
    thick, _ = thick_and_truth
    # 5 mm slabs x 2 = 2.5 mm slices: the model restores 1-1.5 mm ones; it runs, and says so
    result = superres.super_resolve(thick, factor=2, method="learned", planes="coronal", options=FAST)
    assert result.metadata["parameters"]["method"] == "learned"
    assert np.isclose(result.metadata["parameters"]["thin_spacing_mm"], 2.5)
    assert result.metadata["out_of_domain"] and "[outside the model's domain]" in result.name
    assert any("restores 1-1.5 mm slices" in w and "2.5 mm" in w for w in result.metadata["warnings"])
    # x5 (1 mm) is inside: no warning
    inside = superres.super_resolve(thick, factor=5, method="learned", planes="coronal", options=FAST)
    assert not inside.metadata.get("out_of_domain"), inside.metadata.get("warnings")


@pytest.mark.parametrize("grid", ["native", "fine"])
def test_inpainting_on_clinical_pixels_keeps_everything_outside_the_mask(grid, request):
    volume = request.getfixturevalue(grid)
    mask = np.zeros(volume.data.shape, bool)
    n = volume.data.shape[1]
    mask[2:4, n // 3:n // 2, n // 3:n // 2] = True
    result = inpaint.inpaint(volume, mask, steps=4, resample=0, options=FAST)
    assert_same_grid(result, volume)
    np.testing.assert_array_equal(result.data[~mask], volume.data[~mask])
    inside = result.data[mask]
    assert -1024 <= inside.min() and inside.max() <= 3071
    assert result.metadata["model"] == "ct-prior-multi"
    assert pixel_warning(result) == (grid == "fine")


def test_anomaly_on_clinical_pixels_keeps_the_grid_and_scores_the_roi_only(native):
    roi = np.zeros(native.data.shape, bool)
    roi[1:5, 20:76, 20:76] = True
    result = anomaly.detect_anomalies(native, roi=roi, t=150, ensemble=2, steps=3, patch_mm=None, options=FAST)
    for layer in (result.heatmap, result.mask, result.reconstruction):
        assert_same_grid(layer, native)
    assert not result.mask.data[~roi].any()
    np.testing.assert_array_equal(result.reconstruction.data[~roi], native.data[~roi])
    assert result.heatmap.metadata["model"] == "ct-prior-multi" and not pixel_warning(result.heatmap)
    # the 3 mm demo, named, still says the grid is outside what it saw
    demo = anomaly.detect_anomalies(native, roi=roi, t=150, ensemble=1, steps=1, model="ct-prior-demo",
                                    options=FAST)
    assert demo.heatmap.metadata["model"] == "ct-prior-demo" and pixel_warning(demo.heatmap)


def test_partial_diffusion_keeps_the_detail_finer_than_the_prior(native):
    """A 3 mm prior that reconstructs this scan perfectly on its own pixels (an oracle) gives back
    the 0.78 mm scan itself: the detail the prior cannot see is kept, not blurred away into
    false anomalies at every edge."""
    import torch

    from napari_mediffuse.engine.intensity import DEFAULT_CT_NORMALIZATION, normalize
    from napari_mediffuse.engine.schedulers import DEFAULT_SCHEDULE, alphas_cumprod
    from napari_mediffuse.tasks.anomaly import healthy_reconstruction
    from napari_mediffuse.tasks.inpaint import Prior, SliceGrid

    grid = SliceGrid(native.spacing[1:], (3.0, 3.0), native.data.shape[1:])
    assert grid.size == (25, 25)
    target = grid.to_model(torch.from_numpy(normalize(native.data, DEFAULT_CT_NORMALIZATION))[:, None].float())
    abar = alphas_cumprod(DEFAULT_SCHEDULE)

    def oracle(x, t):
        a = float(abar[t])
        return (x - a ** 0.5 * target.to(x.dtype)) / (1.0 - a) ** 0.5

    prior = Prior(oracle, DEFAULT_SCHEDULE, DEFAULT_CT_NORMALIZATION, modality="CT", pixel_spacing_mm=(3.0, 3.0))
    roi = np.ones(native.data.shape, bool)
    rec = healthy_reconstruction(native, roi, prior, t=200, ensemble=1, steps=3,
                                 options=RunOptions(batch_size=len(native.data)))
    np.testing.assert_allclose(rec, native.data, atol=1.0)


@pytest.mark.parametrize("grid", ["native", "fine"])
def test_translation_on_clinical_pixels_keeps_the_grid_and_says_it_resampled(grid, request):
    volume = request.getfixturevalue(grid)
    result = translate.translate(volume, direction="ct2mr", steps=2, ensemble=1, options=FAST)
    assert_same_grid(result, volume)
    assert result.modality == "MR" and result.metadata["synthetic"]
    assert 0.0 <= result.data.min() and result.data.max() <= 1000.0
    assert any("resampled" in w for w in result.metadata["warnings"])
    # the bundled CT -> MR model saw 0.5-5.5 mm pixels: 0.78 mm is inside, 0.4 mm is not
    assert result.metadata["model"] == "ct2mr-multi"
    assert pixel_warning(result) == (grid == "fine")


def test_a_grid_outside_the_supported_range_names_the_limit(native):
    too_fine = native.with_data(native.data, affine=np.diag([1.0, 0.1, 0.1, 1.0]))
    with pytest.raises(TaskInputError, match=r"pixels of 0.1 x 0.1 mm \(supported: 0.2-6 mm\)"):
        check_grid(too_fine, task="denoise")
    with pytest.raises(TaskInputError, match=r"slices 20 mm apart \(supported: 0.3-12 mm\)"):
        denoise.denoise(native.with_data(native.data, affine=np.diag([20.0, 0.8, 0.8, 1.0])), options=FAST)
    big = Volume(data=np.zeros((2, 1100, 8), np.int16), affine=np.eye(4), modality="CT", name="big")
    with pytest.raises(TaskInputError, match=f"at most {GRID_LIMITS['side']}"):
        check_grid(big, task="denoise")
    # one slice: its spacing along the slice axis does not matter
    check_grid(native.slab(0, 1).with_data(native.data[:1], affine=np.diag([50.0, 0.8, 0.8, 1.0])), task="x")
