"""Anomaly detection, lesion inpainting, body masks, synthetic lesions and
anomaly metrics (issue 5), on the real CT."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mediffuse import io
from napari_mediffuse.engine.intensity import DEFAULT_CT_NORMALIZATION, normalize
from napari_mediffuse.engine.schedulers import DEFAULT_SCHEDULE, alphas_cumprod
from napari_mediffuse.tasks.anomaly import anomaly_layers, detect_anomalies, heatmap_layer_data, mask_layer_data
from napari_mediffuse.tasks.common import RunOptions, TaskInputError
from napari_mediffuse.tasks.inpaint import Prior, inpaint
from napari_mediffuse.tasks.masks import body_mask, check_same_grid, resolve_roi, shapes_to_mask
from training.evaluate.anomaly import auroc, best_dice, dice, local_zscore_map, pro_auc, slice_components
from training.lesions import equivalent_diameter_mm, insert_lesion

LIVER = 5  # TotalSegmentator v2 'liver'


def crop(volume: io.Volume, index) -> io.Volume:
    """Sub-volume with its affine shifted so every voxel keeps its position."""
    index = tuple(index)
    start = np.array([s.start or 0 for s in index], dtype=float)
    affine = volume.affine.copy()
    affine[:3, 3] = volume.affine[:3, :3] @ start + volume.affine[:3, 3]
    return io.Volume(np.ascontiguousarray(volume.data[index]), affine, modality=volume.modality,
                     name=volume.name, source=volume.source)


def oracle_prior(healthy_hu: np.ndarray, crops_of=None) -> Prior:
    """A point-mass prior at a known healthy image: eps = (x_t - sqrt(abar) x*) / sqrt(1 - abar).

    Every batch must be the whole stack of slices (batch size >= slices);
    like the real predictor it takes crops of them with their ``extent`` in
    the whole slice (its calls' crop shapes are kept in ``predictor.shapes``).
    Inpainting crops each slice to its own mask's box, so with ``crops_of``
    ``(mask, spacing)`` the oracle tells the slices apart by their boxes.
    """
    from napari_mediffuse.tasks.inpaint import CONTEXT_MM, context_box

    target = torch.from_numpy(normalize(healthy_hu, DEFAULT_CT_NORMALIZATION))[:, None]
    abar = alphas_cumprod(DEFAULT_SCHEDULE)
    slices_at = {}
    if crops_of is not None:
        mask, spacing = crops_of
        for k in np.flatnonzero(mask.any(axis=(1, 2))):
            box = context_box(mask[k:k + 1], spacing, CONTEXT_MM)
            slices_at.setdefault(None if box is None else (box[0][0], box[1][0]), []).append(int(k))

    def predictor(x, t, extent=None):
        here = target
        if extent is None and slices_at:  # the slices whose mask is too large to crop
            here = target[slices_at[None]]
        if extent is not None:
            (r0, rows), (c0, cols) = extent
            assert (rows, cols) == target.shape[2:], "the extent names the whole slice"
            stack = target[slices_at[(int(r0), int(c0))]] if slices_at else target
            here = stack[:, :, int(r0):int(r0) + x.shape[2], int(c0):int(c0) + x.shape[3]]
        assert x.shape == here.shape, "oracle needs the whole stack in one batch"
        predictor.shapes.append(tuple(x.shape[2:]))
        a = float(abar[t])
        return (x - a ** 0.5 * here) / (1.0 - a) ** 0.5

    predictor.shapes = []
    predictor.slices_at = slices_at

    return Prior(predictor, DEFAULT_SCHEDULE, DEFAULT_CT_NORMALIZATION, name="oracle", modality="CT")


@pytest.fixture
def small_ct(ct_small_path):
    return io.read(ct_small_path)[0]


@pytest.fixture
def liver_stack(small_ct, ct_seg_path):
    """4 real axial slices with liver, their liver mask and a 20 mm hypodense liver lesion per slice."""
    seg = io.read(ct_seg_path)[0].data
    index = (slice(18, 22), slice(None), slice(None))
    vol = crop(small_ct, index)
    liver = seg[index] == LIVER
    rng = np.random.default_rng(0)
    sick = vol.data.astype(np.float32).copy()
    truth = np.zeros(sick.shape, bool)
    for k in range(sick.shape[0]):
        sick[k], truth[k], _ = insert_lesion(sick[k], liver[k], vol.spacing[1:], diameter_mm=20.0,
                                             contrast_hu=-60.0 if k % 2 else 60.0, rng=rng)
    return vol, liver, sick, truth


# -- body mask -----------------------------------------------------------------

def test_body_mask_covers_body_and_excludes_air(ct_path):
    ct = io.read(ct_path)[0]
    hu = ct.data
    mask = body_mask(ct)
    assert mask.shape == hu.shape and mask.dtype == bool
    assert (mask[hu > -200]).mean() > 0.99           # soft tissue and bone are inside
    assert hu[~mask].mean() < -900                   # outside is air (and the table)
    assert (hu[~mask] > -500).mean() < 0.05
    assert 0.4 < mask.mean() < 0.85
    # holes filled: the lungs at the top of the scan are inside the body
    top = slice(hu.shape[0] - 5, None)
    assert (hu[top][mask[top]] < -700).mean() > 0.01
    # the air in front of the patient and the image corners are outside
    assert not mask[:, 0, :].any() and not mask[:, 0, 0].any() and not mask[:, -1, -1].any()


# -- anomaly detection with an oracle prior --------------------------------------------

def test_oracle_prior_finds_inserted_lesions(liver_stack):
    vol, _, sick, truth = liver_stack
    sick_vol = vol.with_data(sick)
    result = detect_anomalies(sick_vol, model=oracle_prior(vol.data), t=[200, 400], ensemble=2, steps=5,
                              options=RunOptions(batch_size=4, seed=0))
    heat, mask, roi = result.heatmap.data, result.mask.data.astype(bool), result.roi.data.astype(bool)
    for out in (result.heatmap, result.mask, result.reconstruction, result.roi):
        assert out.data.shape == vol.data.shape and np.array_equal(out.affine, vol.affine)
    assert roi[truth].all() and not heat[~roi].any()
    assert auroc(heat[roi], truth[roi]) > 0.99
    assert dice(mask, truth) > 0.6
    # the oracle reconstructs the healthy image: the lesions are gone
    assert np.abs(result.reconstruction.data - vol.data)[roi].max() <= 1.0
    assert result.heatmap.metadata["parameters"]["t"] == [200, 400]
    assert result.heatmap.metadata["parameters"]["score"] == "spread"  # the default with >= 2 runs
    assert result.reconstruction.metadata["synthetic"] is True


def test_oracle_anomaly_restricted_to_organ_roi(liver_stack):
    vol, liver, sick, truth = liver_stack
    sick_vol = vol.with_data(sick)
    result = detect_anomalies(sick_vol, roi=liver, model=oracle_prior(vol.data), t=300, ensemble=1, steps=4,
                              options=RunOptions(batch_size=4))
    assert not result.heatmap.data[~liver].any() and not result.mask.data[~liver].any()
    assert np.array_equal(result.reconstruction.data[~liver], sick[~liver])
    assert auroc(result.heatmap.data[liver], truth[liver]) > 0.99


def test_spread_score_and_parameter_checks(liver_stack):
    vol, _, sick, truth = liver_stack
    sick_vol = vol.with_data(sick)
    prior = oracle_prior(vol.data)
    result = detect_anomalies(sick_vol, model=prior, t=300, ensemble=2, steps=3, score="spread",
                              options=RunOptions(batch_size=4))
    roi = result.roi.data.astype(bool)
    assert auroc(result.heatmap.data[roi], truth[roi]) > 0.99 and dice(result.mask.data, truth) > 0.6
    with pytest.raises(TaskInputError, match="at least 2"):
        detect_anomalies(sick_vol, model=prior, t=300, ensemble=1, score="spread")
    with pytest.raises(TaskInputError, match="noise step"):
        detect_anomalies(sick_vol, model=prior, t=1000)


def test_polarity_and_level_matching_against_a_prior_with_another_organ_level(liver_stack):
    """A prior that paints the liver 50 HU brighter than this patient's (another contrast phase, as
    ct-prior-multi does with the LiTS liver): with both signs the +60 HU lesions (10 HU above the
    reconstruction) rank below normal liver (50 HU below it) until the level is matched; 'darker'
    then maps only the -60 HU lesions, 'brighter' only the +60 HU ones."""
    vol, liver, sick, truth = liver_stack
    odd = (np.arange(truth.shape[0]) % 2 == 1)[:, None, None]
    dark, bright = truth & odd, truth & ~odd  # the fixture alternates -60 / +60 HU lesions
    healthy = vol.data.astype(np.float32) + np.where(liver, 50.0, 0.0).astype(np.float32)
    kw = dict(roi=liver, model=oracle_prior(healthy), t=300, ensemble=1, steps=4,
              options=RunOptions(batch_size=4, seed=0))
    sick_vol = vol.with_data(sick)

    unmatched = detect_anomalies(sick_vol, **kw).heatmap.data
    not_dark = liver & ~dark
    assert auroc(unmatched[not_dark], bright[not_dark]) < 0.5
    matched = detect_anomalies(sick_vol, match_level=True, **kw)
    assert auroc(matched.heatmap.data[liver], truth[liver]) > 0.99
    assert matched.heatmap.metadata["parameters"]["match_level"] is True

    darker = detect_anomalies(sick_vol, polarity="darker", match_level=True, **kw)
    mask = darker.mask.data.astype(bool)
    not_bright = liver & ~bright
    assert auroc(darker.heatmap.data[not_bright], dark[not_bright]) > 0.99
    assert dice(mask, dark) > 0.6 and not mask[bright].any()
    assert darker.heatmap.metadata["parameters"]["polarity"] == "darker"
    brighter = detect_anomalies(sick_vol, polarity="brighter", match_level=True, **kw).mask.data.astype(bool)
    assert dice(brighter, bright) > 0.6 and not brighter[dark].any()

    def never(x, t):
        raise AssertionError("the prior ran before the polarity was checked")

    with pytest.raises(TaskInputError, match="unknown polarity 'hypo'; choose one of both, darker, brighter"):
        detect_anomalies(sick_vol, model=Prior(never, DEFAULT_SCHEDULE, DEFAULT_CT_NORMALIZATION, modality="CT"),
                         polarity="hypo")


def test_patched_reconstruction_covers_the_roi(liver_stack):
    from napari_mediffuse.tasks.anomaly import cell_phases

    vol, _, sick, truth = liver_stack
    phase = cell_phases(vol.data.shape, vol.spacing, cell_mm=30.0, phases=4)
    assert set(np.unique(phase)) == {0, 1, 2, 3} and (phase[0] == phase[1]).all()
    row = phase[0, 0]
    assert (np.diff(np.flatnonzero(np.diff(row) != 0)) == 10).all()  # 30 mm cells of 3 mm pixels
    result = detect_anomalies(vol.with_data(sick), model=oracle_prior(vol.data), t=400, ensemble=2, steps=3,
                              patch_mm=30.0, options=RunOptions(batch_size=4))
    roi = result.roi.data.astype(bool)
    assert np.abs(result.reconstruction.data - vol.data)[roi].max() <= 1.0  # every ROI voxel reconstructed
    assert auroc(result.heatmap.data[roi], truth[roi]) > 0.99 and dice(result.mask.data, truth) > 0.6
    assert result.heatmap.metadata["parameters"]["patch_mm"] == 30.0


def test_normal_scan_gives_empty_mask(liver_stack):
    vol, *_ = liver_stack
    result = detect_anomalies(vol, model=oracle_prior(vol.data), t=300, ensemble=1, steps=3,
                              options=RunOptions(batch_size=4))
    assert result.mask.data.sum() == 0  # the minimum threshold keeps a normal scan clean
    assert result.heatmap.metadata["parameters"]["score"] == "residual"  # one run: no spread


# -- inpainting -----------------------------------------------------------------------

@pytest.mark.parametrize("resample", [0, 1])
def test_inpainting_with_oracle_restores_healthy_tissue(liver_stack, resample):
    vol, _, sick, truth = liver_stack
    sick_vol = vol.with_data(np.round(sick).astype(vol.data.dtype))
    out = inpaint(sick_vol, truth, steps=8, resample=resample, model=oracle_prior(vol.data, (truth, vol.spacing[1:])),
                  options=RunOptions(batch_size=4))
    assert out.data.dtype == sick_vol.data.dtype and np.array_equal(out.affine, vol.affine)
    assert np.array_equal(out.data[~truth], sick_vol.data[~truth])  # untouched, bit for bit
    assert np.abs(out.data[truth].astype(float) - vol.data[truth]).max() <= 1.0
    assert np.abs(sick_vol.data[truth].astype(float) - vol.data[truth]).mean() > 30  # there was a lesion
    assert out.metadata["synthetic"] is True and out.metadata["parameters"]["inpainted_voxels"] == truth.sum()


def test_inpainting_runs_on_the_mask_and_its_context_only(liver_stack):
    from napari_mediffuse.tasks.inpaint import CONTEXT_MM

    vol, _, sick, truth = liver_stack
    one = np.zeros_like(truth)
    one[1] = truth[1]  # one 20 mm lesion: its box plus 32 mm each side is a small part of the slice
    prior = oracle_prior(vol.data[1:2])
    out = inpaint(vol.with_data(sick), one, steps=4, resample=0, model=prior, options=RunOptions(batch_size=4))
    rows, cols = np.flatnonzero(one[1].any(axis=1)), np.flatnonzero(one[1].any(axis=0))
    margin = [int(np.ceil(CONTEXT_MM / s)) for s in vol.spacing[1:]]
    expected = (min(vol.data.shape[1], rows[-1] + 1 + margin[0]) - max(0, rows[0] - margin[0]),
                min(vol.data.shape[2], cols[-1] + 1 + margin[1]) - max(0, cols[0] - margin[1]))
    assert set(prior.predictor.shapes) == {expected}
    assert expected[0] * expected[1] < 0.5 * vol.data[0].size
    # the crop's pixels are the whole slice's: the oracle restores the healthy tissue exactly there
    assert np.abs(out.data[one] - vol.data[one]).max() <= 1.0
    assert np.array_equal(out.data[~one], sick[~one])


def test_inpainting_crops_each_slice_to_its_own_mask(liver_stack):
    from napari_mediffuse.tasks.inpaint import CONTEXT_MM

    vol, _, sick, truth = liver_stack
    n_rows, n_cols = vol.data.shape[1:]
    mask = np.zeros_like(truth)
    mask[0, 10:14, 10:14] = True                      # a small mask in one corner
    mask[1, -14:-10, -14:-10] = True                  # another in the opposite corner
    mask[3, :, : int(0.8 * n_cols)] = True            # most of the slice: no crop; slice 2 has none
    prior = oracle_prior(vol.data, (mask, vol.spacing[1:]))
    out = inpaint(vol.with_data(sick), mask, steps=4, resample=0, model=prior, options=RunOptions(batch_size=4))
    margin = [int(np.ceil(CONTEXT_MM / s)) for s in vol.spacing[1:]]
    corner = (min(n_rows, 14 + margin[0]) - max(0, 10 - margin[0]), min(n_cols, 14 + margin[1]) - max(0, 10 - margin[1]))
    far = (n_rows - max(0, n_rows - 14 - margin[0]), n_cols - max(0, n_cols - 14 - margin[1]))
    # three groups: the two corner boxes (the same size here, at opposite corners) and one whole slice;
    # the oracle tells the boxes apart by where they start and fails on any other crop
    assert set(prior.predictor.shapes) == {corner, far, (n_rows, n_cols)}
    assert set(prior.predictor.slices_at) == {None, (0, 0), (n_rows - far[0], n_cols - far[1])}
    # each slice was given its own healthy tissue, in its own place; slice 2 was left alone
    # (slice 3's mask takes in air below -1024 HU, which the prior's window cannot hold)
    healthy = np.clip(vol.data, DEFAULT_CT_NORMALIZATION["low"], None)
    assert np.abs(out.data[mask] - healthy[mask]).max() <= 1.0
    assert np.array_equal(out.data[~mask], sick[~mask]) and np.array_equal(out.data[2], sick[2])


def test_inpainting_rejects_empty_and_foreign_masks(liver_stack):
    vol, *_ = liver_stack
    with pytest.raises(TaskInputError, match="empty"):
        inpaint(vol, np.zeros(vol.data.shape, bool), model=oracle_prior(vol.data))
    other = io.Volume(np.ones((4, 50, 60), np.uint8), vol.affine, name="mask")
    with pytest.raises(TaskInputError, match="another grid"):
        inpaint(vol, other, model=oracle_prior(vol.data))


# -- masks and grids ------------------------------------------------------------------

def test_mask_on_another_grid_names_both_grids(small_ct):
    shifted = small_ct.affine.copy()
    shifted[:3, 3] += [0.0, 6.0, 0.0]
    mask = io.Volume(np.ones(small_ct.data.shape, np.uint8), shifted, name="roi", source="roi.nii.gz")
    with pytest.raises(TaskInputError) as err:
        check_same_grid(mask, small_ct, what="ROI")
    text = str(err.value)
    assert "roi.nii.gz" in text and "another grid" in text and text.count("voxels") == 2
    with pytest.raises(TaskInputError, match="empty"):
        resolve_roi(small_ct, io.Volume(np.zeros(small_ct.data.shape, np.uint8), small_ct.affine))
    same = io.Volume(np.ones(small_ct.data.shape, np.uint8), small_ct.affine)
    assert resolve_roi(small_ct, same).all()


def test_shapes_are_rasterised_on_their_slice(small_ct):
    kw = small_ct.napari_kwargs()
    scale, translate = np.array(kw["scale"]), np.array(kw["translate"])
    rect_index = np.array([[3, 10, 20], [3, 10, 40], [3, 30, 40], [3, 30, 20]], float)
    rect_world = rect_index * scale + translate
    # a Shapes layer with unit scale: data in world coordinates
    mask = shapes_to_mask([rect_world], ["rectangle"], small_ct, scale=(1, 1, 1), translate=(0, 0, 0))
    assert mask[3].sum() == pytest.approx(20 * 20, rel=0.15) and mask.sum() == mask[3].sum()
    rows, cols = np.nonzero(mask[3])
    assert rows.min() >= 10 and rows.max() <= 30 and cols.min() >= 20 and cols.max() <= 40
    both = shapes_to_mask([rect_index], ["ellipse"], small_ct, extrude=True)
    assert both.any(axis=(1, 2)).all()


# -- synthetic lesions ------------------------------------------------------------------

@pytest.mark.parametrize("diameter", [5.0, 10.0, 20.0, 30.0])
@pytest.mark.parametrize("contrast", [-60.0, 80.0])
def test_inserted_lesions_have_requested_size_and_contrast(small_ct, ct_seg_path, diameter, contrast):
    seg = io.read(ct_seg_path)[0].data
    k = 22
    image, organ = small_ct.data[k].astype(np.float32), seg[k] == LIVER
    out, mask, lesion = insert_lesion(image, organ, (3.0, 3.0), diameter_mm=diameter, contrast_hu=contrast,
                                      rng=np.random.default_rng(int(diameter)), necrosis=False)
    measured = 2 * np.sqrt(mask.sum() * 9.0 / np.pi)
    assert measured == pytest.approx(diameter, rel=0.1, abs=1.0)
    assert lesion.measured_diameter_mm == pytest.approx(measured)
    assert (mask <= organ).all()
    change = (out - image)[mask]
    assert np.sign(np.median(change)) == np.sign(contrast)
    # at 3 mm a 5 mm lesion is partial-volume averaged; bigger ones reach the contrast
    assert abs(np.median(change)) == pytest.approx(abs(contrast), rel=0.35 if diameter < 10 else 0.2)
    far = ~np.zeros_like(mask)
    r, c = lesion.center
    far[max(r - 15, 0):r + 16, max(c - 15, 0):c + 16] = False
    assert np.array_equal(out[far], image[far])  # nothing changes away from the lesion


def test_lesion_in_3d_has_requested_volume(small_ct, ct_seg_path):
    seg = io.read(ct_seg_path)[0].data
    out, mask, lesion = insert_lesion(small_ct.data.astype(np.float32), seg == LIVER, small_ct.spacing,
                                      diameter_mm=20.0, contrast_hu=-50.0, rng=np.random.default_rng(3))
    assert equivalent_diameter_mm(int(mask.sum()), small_ct.spacing) == pytest.approx(20.0, rel=0.05)
    assert mask.any(axis=(1, 2)).sum() >= 5  # spans several 3 mm slices


# -- metrics ---------------------------------------------------------------------------------

def test_auroc_matches_hand_computed_values():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([1, 1], [0, 1]) == pytest.approx(0.5)
    assert auroc([0, 1, 2, 3], [0, 0, 1, 1]) == 1.0 and auroc([3, 2, 1, 0], [0, 0, 1, 1]) == 0.0
    assert np.isnan(auroc([1, 2], [1, 1]))


def test_dice_matches_hand_computed_values():
    assert dice([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.5)
    assert dice([0, 0], [0, 0]) == 1.0 and dice([1, 0], [0, 1]) == 0.0
    d, th = best_dice(np.array([0.1, 0.2, 0.9, 0.8]), np.array([0, 0, 1, 1]))
    assert d == 1.0 and 0.2 <= th < 0.8


def test_pro_matches_hand_computed_values():
    negatives = np.arange(100) / 100.0
    truth = np.r_[np.zeros(100, bool), np.ones(6, bool)]
    comps = np.r_[np.zeros(100, int), [1, 1, 1, 1], [2, 2]]
    # region 1 above every negative; region 2 above 90 of 100 negatives (found at FPR 0.10):
    # PRO = 0.5 on [0, 0.1), 1 on [0.1, 0.3] -> (0.1 * 0.5 + 0.2 * 1) / 0.3
    scores = np.r_[negatives, [2.0] * 4, [0.895] * 2]
    assert pro_auc(scores, truth, components=comps) == pytest.approx(0.25 / 0.3)
    assert pro_auc(np.r_[negatives, [2.0] * 6], truth, components=comps) == pytest.approx(1.0)
    # region 2 never found below FPR 0.3: half the regions -> 0.5
    assert pro_auc(np.r_[negatives, [2.0] * 4, [0.5] * 2], truth, components=comps) == pytest.approx(0.5)
    # regions per slice are never merged across slices
    stack = np.zeros((2, 4, 4), bool)
    stack[:, 1:3, 1:3] = True
    assert slice_components(stack).max() == 2


def test_local_zscore_baseline_sees_a_lesion(liver_stack):
    vol, _, sick, truth = liver_stack
    roi = body_mask(vol.with_data(sick))
    z = local_zscore_map(sick, roi, vol.spacing)
    assert auroc(z[roi], truth[roi]) > 0.7


# -- napari layers -------------------------------------------------------------------------

def test_layer_tuples_overlay_the_ct(liver_stack):
    vol, _, sick, _ = liver_stack
    result = detect_anomalies(vol.with_data(sick), model=oracle_prior(vol.data), t=200, ensemble=1, steps=3,
                              options=RunOptions(batch_size=4))
    data, kw, kind = heatmap_layer_data(result.heatmap)
    ct_kw = vol.napari_kwargs()
    assert kind == "image" and kw["blending"] == "additive" and kw["colormap"] == "inferno"
    assert kw["scale"] == ct_kw["scale"] and kw["translate"] == ct_kw["translate"]
    low, high = kw["contrast_limits"]
    assert low == pytest.approx(result.threshold / 2) and high > result.threshold and 0 < kw["opacity"] < 1
    data, kw, kind = mask_layer_data(result.mask)
    assert kind == "labels" and data.dtype == np.uint8 and kw["translate"] == ct_kw["translate"]
    layers = anomaly_layers(result, reconstruction=True, colormap="turbo")
    assert [layer[2] for layer in layers] == ["image", "image", "labels"] and layers[1][1]["colormap"] == "turbo"


# -- command line --------------------------------------------------------------------------

@pytest.fixture
def small_crop_path(small_ct, tmp_path):
    vol = crop(small_ct, (slice(12, 15), slice(20, 68), slice(30, 94)))
    path = tmp_path / "ct_crop.nii.gz"
    io.write_nifti(vol, path)
    return path, vol


def test_cli_anomaly_and_inpaint_end_to_end(tiny_models, small_crop_path, tmp_path, capsys):
    from napari_mediffuse.cli import main

    path, vol = small_crop_path
    heat, mask, rec = tmp_path / "heat.nii.gz", tmp_path / "mask.nii.gz", tmp_path / "rec.nii.gz"
    code = main(["anomaly", str(path), "-o", str(heat), "--mask-out", str(mask), "--reconstruction-out", str(rec),
                 "--t", "100", "300", "--ensemble", "2", "--steps", "2", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    for out in (heat, mask, rec):
        got = io.read(out)[0]
        assert got.data.shape == vol.data.shape and np.allclose(got.affine, vol.affine, atol=1e-4)
    assert io.read(mask)[0].data.max() <= 1 and io.read(heat)[0].data.min() >= 0

    lesion = np.zeros(vol.data.shape, np.uint8)
    lesion[1, 20:26, 30:36] = 1
    mask_path, out = tmp_path / "lesion.nii.gz", tmp_path / "inpainted.nii.gz"
    io.write_nifti(vol.with_data(lesion), mask_path)
    code = main(["inpaint", str(path), "--mask", str(mask_path), "-o", str(out), "--steps", "3", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    got = io.read(out)[0]
    assert np.array_equal(got.data[lesion == 0], vol.data[lesion == 0])
    assert np.allclose(got.affine, vol.affine, atol=1e-4)


def test_cli_bad_inputs_give_clear_errors_and_write_nothing(tiny_models, small_crop_path, mr_lps_path,
                                                            tmp_path, capsys):
    from napari_mediffuse.cli import main

    path, vol = small_crop_path
    out = tmp_path / "heat.nii.gz"
    # an MR given to the CT prior
    assert main(["anomaly", str(mr_lps_path), "-o", str(out), "--steps", "1", "--ensemble", "1"]) == 2
    err = capsys.readouterr().err
    assert "needs a CT scan" in err and "is MR" in err and not out.exists()
    # an empty ROI
    empty = tmp_path / "empty.nii.gz"
    io.write_nifti(vol.with_data(np.zeros(vol.data.shape, np.uint8)), empty)
    assert main(["anomaly", str(path), "-o", str(out), "--roi", str(empty)]) == 2
    assert "empty" in capsys.readouterr().err and not out.exists()
    # ROI labels that select nothing
    full = tmp_path / "full.nii.gz"
    io.write_nifti(vol.with_data(np.ones(vol.data.shape, np.uint8)), full)
    assert main(["anomaly", str(path), "-o", str(out), "--roi", str(full), "--roi-labels", "5"]) == 2
    assert "labels [5]" in capsys.readouterr().err and not out.exists()
    # a mask on another grid (shifted by 3 voxels)
    moved = crop(vol, (slice(None), slice(3, None), slice(None)))
    other = tmp_path / "other.nii.gz"
    io.write_nifti(moved.with_data(np.ones(moved.data.shape, np.uint8)), other)
    assert main(["anomaly", str(path), "-o", str(out), "--roi", str(other)]) == 2
    err = capsys.readouterr().err
    assert "another grid" in err and "45 x 64" in err and "48 x 64" in err and not out.exists()
    inpainted = tmp_path / "inpainted.nii.gz"
    assert main(["inpaint", str(path), "--mask", str(other), "-o", str(inpainted)]) == 2
    assert "another grid" in capsys.readouterr().err and not inpainted.exists()
    # --region reaches the prior: a region its training data did not have is refused before anything runs
    from conftest import save_tiny_checkpoint

    save_tiny_checkpoint(tiny_models / "neck-only", name="neck-only",
                         training={"data": [{"path": "ct.nii.gz", "region": "head-neck"}]})
    assert main(["anomaly", str(path), "-o", str(out), "--model", "neck-only", "--region", "chest"]) == 2
    assert "trained on head-neck only; it does not know the region 'chest'" in capsys.readouterr().err
    assert main(["inpaint", str(path), "--mask", str(full), "-o", str(inpainted), "--model", "neck-only",
                 "--region", "abdomen"]) == 2
    assert "does not know the region 'abdomen'" in capsys.readouterr().err
    assert not out.exists() and not inpainted.exists()


def test_thin_pixels_are_resampled_to_the_prior_spacing(small_ct):
    """A 1.5 mm scan runs through a 3 mm prior at 3 mm and comes back on its own grid."""
    from napari_mediffuse.tasks.inpaint import SliceGrid

    grid = SliceGrid((1.5, 1.5), (3.0, 3.0), (96, 128))
    assert grid.size == (48, 64)
    x = torch.rand(2, 1, 96, 128)
    assert grid.from_model(grid.to_model(x)).shape == x.shape
    assert SliceGrid((3.1, 2.9), (3.0, 3.0), (96, 128)).identity

    seen = []

    def predictor(x, t, extent=None):
        seen.append((tuple(x.shape[-2:]), extent))
        return torch.zeros_like(x)

    prior = Prior(predictor, DEFAULT_SCHEDULE, DEFAULT_CT_NORMALIZATION, modality="CT", pixel_spacing_mm=(3.0, 3.0))
    vol = crop(small_ct, (slice(10, 12), slice(20, 68), slice(30, 94)))
    thin = np.repeat(np.repeat(vol.data, 2, axis=1), 2, axis=2)
    affine = vol.affine.copy()
    affine[:3, 1:3] /= 2.0
    thin_vol = io.Volume(thin, affine, modality="CT", name="thin")
    mask = np.zeros(thin.shape, bool)
    mask[:, 40:60, 50:70] = True
    out = inpaint(thin_vol, mask, steps=2, resample=0, model=prior, options=RunOptions(batch_size=2))
    # the mask's box plus 32 mm (22 px) of context, rows 18-82 and columns 28-92 of the 96 x 128 slice,
    # at 3 mm: a 32 x 32 crop that starts at (9, 14) of the whole 48 x 64 slice
    assert set(seen) == {((32, 32), ((9.0, 48), (14.0, 64)))}
    assert out.data.shape == thin.shape and np.array_equal(out.data[~mask], thin[~mask])


def test_anomaly_reconstruction_at_a_coarser_pixel_size(small_ct):
    """pixel_mm runs a multi-resolution prior at that size; the heatmap stays on the scan's grid."""
    seen = []

    def predictor(x, t):
        seen.append(tuple(x.shape[-2:]))
        return torch.zeros_like(x)

    card = {"domain": {"pixel_spacing_mm": [0.6, 4.0]}}
    prior = Prior(predictor, DEFAULT_SCHEDULE, DEFAULT_CT_NORMALIZATION, modality="CT", card=card)
    vol = crop(small_ct, (slice(10, 12), slice(20, 68), slice(30, 94)))  # 48 x 64 pixels of 3 mm
    result = detect_anomalies(vol, t=50, ensemble=1, steps=2, model=prior, pixel_mm=4.0,
                              options=RunOptions(batch_size=2, seed=0))
    assert set(seen) == {(36, 48)}  # 144 x 192 mm at 4 mm
    assert result.heatmap.data.shape == vol.data.shape
    np.testing.assert_allclose(result.heatmap.affine, vol.affine)
    assert result.heatmap.metadata["parameters"]["pixel_mm"] == [4.0, 4.0]
    # outside what the prior was trained at, or a single-resolution prior at another size: refused
    with pytest.raises(TaskInputError, match=r"8 mm is outside .* \(0.6-4 mm\)"):
        detect_anomalies(vol, t=50, ensemble=1, steps=2, model=prior, pixel_mm=8.0)
    fixed = Prior(predictor, DEFAULT_SCHEDULE, DEFAULT_CT_NORMALIZATION, modality="CT", pixel_spacing_mm=(3.0, 3.0))
    assert fixed.at_pixel_size(3.1).pixel_spacing_mm == (3.1, 3.1)
    with pytest.raises(TaskInputError, match="3-3 mm"):
        fixed.at_pixel_size(1.0)
    with pytest.raises(TaskInputError, match="records no pixel sizes"):
        Prior(predictor, DEFAULT_SCHEDULE, DEFAULT_CT_NORMALIZATION).at_pixel_size(2.0)
