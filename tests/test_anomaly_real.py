"""Plumbing of the real-tumour anomaly evaluation (training/evaluate/anomaly_real.py):
metrics, ROIs and the baseline on tiny synthetic slices with known answers.
No model is run."""
import json

import numpy as np
import pytest
from scipy import ndimage

from napari_mediffuse.tasks.anomaly import level_matched
from training.evaluate.anomaly import baseline_heatmap, diffusion_configs, diffusion_heatmap
from training.evaluate.anomaly_real import (TARGETS, _crop_box, grow_in_plane, lung_fields, markdown_table,
                                            score_case, soft_tissue, spread_pick)

THR = dict(percentile=99.0, min_threshold=4.0)


def disc(shape, center, radius):
    yy, xx = np.ogrid[:shape[0], :shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius ** 2


@pytest.fixture
def case():
    """3 slices of 64 x 64 at 1 mm: an ROI disc of radius 28 px; a 'tumour'
    disc of radius 4 px (49 px) in slices 0 and 1, slice 2 tumour-free."""
    roi = np.stack([disc((64, 64), (32, 32), 28)] * 3)
    truth = np.zeros_like(roi)
    truth[0] = disc((64, 64), (20, 30), 4)
    truth[1] = disc((64, 64), (40, 36), 4)
    return roi, truth


def test_perfect_heatmap_scores_one(case):
    roi, truth = case
    heat = np.where(truth, 10.0, 0.0).astype(np.float32)
    heat[~roi] = 0.0
    m = score_case(heat, roi, truth, **THR)
    assert m["pixel_auroc"] == 1.0
    assert m["image_auroc"] == 1.0
    assert m["dice_best"] == 1.0
    assert m["pro"] == pytest.approx(1.0)
    # the automatic threshold is the 99th percentile over the ROI (10, as 98 of 7383 ROI pixels are tumour)
    # or 4 robust SDs; 10 > 10 is false, so the automatic mask is empty: Dice 0, nothing normal flagged
    assert m["threshold"] == 10.0
    assert m["dice"] == 0.0
    assert m["normal_flagged_fraction"] == 0.0
    assert m["tumour_pixels"] == 98 and m["roi_pixels"] == int(roi.sum()) == 3 * 2453
    assert m["slices"] == 3 and m["tumour_slices"] == 2


def test_graded_heatmap_auto_mask_hits_the_tumour(case):
    roi, truth = case
    # tumour 10, a ring of 1 px around it 5, the rest of the ROI 0..1 noise
    rng = np.random.default_rng(0)
    heat = rng.uniform(0.0, 1.0, roi.shape).astype(np.float32)
    heat[truth] = 10.0
    m = score_case(heat, roi, truth, percentile=50.0, min_threshold=4.0)
    # threshold 4 (the floor): exactly the tumour is flagged
    assert m["threshold"] == 4.0
    assert m["dice"] == 1.0
    assert m["pixel_auroc"] == 1.0
    assert m["normal_slices_flagged_fraction"] == 0.0


def test_inverted_heatmap_scores_zero_and_no_tumour_free_slice_gives_nan(case):
    roi, truth = case
    heat = np.where(truth, 0.0, 3.0).astype(np.float32)
    m = score_case(heat, roi, truth, **THR)
    assert m["pixel_auroc"] == 0.0
    # every evaluated slice has a tumour: image AUROC undefined
    m2 = score_case(heat[:2], roi[:2], truth[:2], **THR)
    assert np.isnan(m2["image_auroc"])
    assert np.isnan(m2["normal_slices_flagged_fraction"])


def test_baseline_flat_organ_with_a_dense_nodule(case):
    roi, truth = case
    # constant 40 HU organ: the baseline is 0 up to round-off everywhere, nothing flagged
    flat = np.full(roi.shape, 40.0, dtype=np.float32)
    heat = baseline_heatmap(flat, roi, (5.0, 1.0, 1.0), sigma_mm=10.0, smooth_mm=1.0)
    assert float(np.abs(heat).max()) < 1e-3
    assert score_case(heat, roi, np.zeros_like(roi), **THR)["normal_flagged_fraction"] == 0.0
    # a +100 HU nodule: found with AUROC 1 and a best Dice above 0.8
    image = flat.copy()
    image[truth] += 100.0
    heat = baseline_heatmap(image, roi, (5.0, 1.0, 1.0), sigma_mm=10.0, smooth_mm=1.0)
    m = score_case(heat, roi, truth, **THR)
    assert m["pixel_auroc"] == pytest.approx(1.0, abs=1e-3)
    assert m["dice_best"] > 0.8
    assert m["image_auroc"] == 1.0


def test_diffusion_heatmap_of_a_perfect_healthy_reconstruction(case):
    roi, truth = case
    healthy = np.full(roi.shape, 40.0, dtype=np.float32)
    image = healthy.copy()
    image[truth] -= 60.0  # hypodense
    spread = np.full(roi.shape, 5.0, dtype=np.float32)
    configs = diffusion_configs([100, 900], ["residual", "spread"], 2)
    assert list(configs) == ["diffusion t=100 residual", "diffusion t=100 spread", "diffusion t=900 residual",
                             "diffusion t=900 spread", "diffusion t=100+900 residual", "diffusion t=100+900 spread"]
    for ts, score in configs.values():
        heat, rec = diffusion_heatmap(image, [(healthy, spread)] * len(ts), roi, (5.0, 1.0, 1.0), score=score,
                                      smooth_mm=1.0, window_hu=(-160.0, 240.0))
        np.testing.assert_array_equal(rec, healthy)
        m = score_case(heat, roi, truth, **THR)
        assert m["pixel_auroc"] == pytest.approx(1.0, abs=1e-3)


def test_offset_correction_removes_a_global_intensity_error(case):
    roi, truth = case
    image = np.full(roi.shape, 120.0, dtype=np.float32)  # enhanced liver
    image[truth] = 70.0                                   # hypodense tumour
    rec = np.full(roi.shape, 60.0, dtype=np.float32)      # the prior paints unenhanced liver
    fixed = level_matched(image, rec, roi, window_hu=(-160.0, 240.0))
    np.testing.assert_allclose(fixed[roi], 120.0)  # median signed residual 60 HU added
    raw, _ = diffusion_heatmap(image, [(rec, None)], roi, (5.0, 1.0, 1.0), score="residual", smooth_mm=0.5)
    good, _ = diffusion_heatmap(image, [(fixed, None)], roi, (5.0, 1.0, 1.0), score="residual", smooth_mm=0.5)
    # |120-60| = 60 > |70-60| = 10: the uncorrected residual is lower in the tumour than in the liver
    # (the robust normalisation clips it to 0, a tie with the liver), so the tumour never ranks higher
    assert score_case(raw, roi, truth, **THR)["pixel_auroc"] < 0.5
    assert score_case(good, roi, truth, **THR)["pixel_auroc"] > 0.99


def test_lung_fields_include_a_nodule_and_exclude_the_chest_wall():
    # 1 slice, 1 mm pixels: a 100 mm body disc (40 HU) with two 30 mm lungs (-850 HU), a 10 mm nodule
    # (0 HU) in the left one
    shape = (1, 128, 128)
    body = disc(shape[1:], (64, 64), 50)[None]
    image = np.where(body, 40.0, -1000.0).astype(np.float32)
    left, right = disc(shape[1:], (64, 38), 15), disc(shape[1:], (64, 90), 15)
    image[0][left | right] = -850.0
    nodule = disc(shape[1:], (64, 38), 5)
    image[0][nodule] = 0.0
    lungs = lung_fields(image, body, (1.0, 1.0))
    assert lungs[0][nodule].all()
    assert lungs[0][left | right].all()
    assert not lungs[0][64, 64]          # mediastinum between the lungs (22 mm apart)
    assert not lungs[0][64, 120]         # chest wall
    assert abs(int(lungs.sum()) - int((left | right).sum())) < 0.05 * int((left | right).sum())
    tissue = soft_tissue(image, body, (1.0, 1.0))
    assert tissue[0][64, 64]                   # mediastinum (40 HU) is soft tissue
    assert not tissue[0][left & ~nodule].any()  # lung is not; the nodule (0 HU) inside it is
    assert tissue[0][64, 38]


def test_helpers_and_table():
    assert spread_pick(np.arange(10), 4).tolist() == [0, 3, 6, 9]
    assert spread_pick([3, 5], 12).tolist() == [3, 5]
    box = _crop_box(disc((100, 80), (90, 70), 3), 40)
    assert (box[0].start, box[0].stop, box[1].start, box[1].stop) == (60, 100, 40, 80)
    report = {"command": "python -m training.evaluate anomaly-real --cases lits", "model": "m",
              "cases": {"c": {"kind": "real tumour", "results": {"baseline local z-score": dict(
                  pixel_auroc=0.65, pro=0.5, dice=0.05, dice_best=0.4, image_auroc=float("nan"),
                  normal_flagged_fraction=0.0055, slices=15, tumour_slices=12)}}}}
    table = markdown_table(report)
    assert table.splitlines()[0] == "<!-- python -m training.evaluate anomaly-real --cases lits -->"
    assert "| c | real tumour | baseline local z-score | 0.650 | 0.500 | 0.050 | 0.400 | - | 0.55 % | 15 (12) |" in table
    assert json.loads(json.dumps(TARGETS))["pixel_auroc"] == 0.90


def test_reconstruction_margin_grows_the_roi_in_plane_only():
    mask = np.zeros((3, 21, 21), dtype=bool)
    mask[1, 10, 10] = True
    assert grow_in_plane(mask, (0.5, 0.5), 0.0) is mask
    grown = grow_in_plane(mask, (0.5, 0.5), 3.0)  # 3 mm = 6 pixels of 0.5 mm
    assert not grown[0].any() and not grown[2].any()
    assert grown[1, 10, 4] and grown[1, 10, 16] and not grown[1, 10, 3]
    assert grown[1].sum() == 113  # pixels of a disc of radius 6


def _write_neck(folder, spacing_mm, radius_mm, hu=30.0):
    """A 40^3 OpenKBP-like box: a cylinder of ``hu`` along the slice axis in air (-1000)."""
    import nibabel as nib

    folder.mkdir(parents=True)
    n = 40
    yy, xx = np.mgrid[:n, :n]
    inside = ((yy - n / 2) * spacing_mm[1]) ** 2 + ((xx - n / 2) * spacing_mm[2]) ** 2 <= radius_mm ** 2
    data = np.where(inside, hu, -1000.0)[None].repeat(n, axis=0).astype(np.int16)  # (S, P, L)
    affine = np.diag([spacing_mm[2], spacing_mm[1], spacing_mm[0], 1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), affine), str(folder / "ct.nii.gz"))


def test_openkbp_inserted_case_puts_patients_on_one_4mm_grid(tmp_path):
    from training.evaluate.anomaly_real import openkbp_inserted_case

    _write_neck(tmp_path / "pt_1", (2.5, 4.5, 4.5), radius_mm=60.0)
    _write_neck(tmp_path / "pt_2", (3.0, 5.0, 5.0), radius_mm=70.0)
    (tmp_path / "notes").mkdir()  # not a patient: skipped
    case = openkbp_inserted_case(tmp_path, patients=8, size=64, seed=3)
    assert case.image.shape == (4, 64, 64) and case.region == "head-neck"
    assert case.spacing == (4.0, 4.0, 4.0)
    # the body keeps its size in mm on the common grid: radius 60 / 70 mm = 15 / 17.5 pixels of 4 mm
    areas_mm2 = case.roi[:2].sum(axis=(1, 2)) * 16.0
    assert np.allclose(areas_mm2, [np.pi * 60.0 ** 2, np.pi * 70.0 ** 2], rtol=0.08)
    # first half clean, second half the same slices with one lesion each, inside the body, nothing else changed
    clean, lesioned = case.image[:2], case.image[2:]
    assert not case.truth[:2].any() and case.truth[2:].any(axis=(1, 2)).all()
    assert (case.truth[2:] <= case.roi[2:]).all()
    # outside the lesion only its soft (partial-volume) edge changes: within 2 pixels (8 mm) of the mask
    rim = np.stack([ndimage.binary_dilation(t, iterations=2) for t in case.truth[2:]])
    assert np.array_equal(clean[~rim], lesioned[~rim])
    for k, lesion in enumerate(case.extra["lesions"]):  # 30-90 HU drawn; the mask is where >= half of it
        change = float(np.median((lesioned[k] - clean[k])[case.truth[2 + k]]))
        assert 15.0 <= abs(change) <= 95.0 and np.sign(change) == (1 if lesion["kind"] == "hyper" else -1)
        assert np.all(clean[k][case.truth[2 + k]] == 30.0)  # placed in the soft tissue, not on the blurred rim
    assert [lesion["source"].split(":")[0] for lesion in case.extra["lesions"]] == ["pt_1", "pt_2"]
    with pytest.raises(FileNotFoundError, match="no OpenKBP patient"):
        openkbp_inserted_case(tmp_path / "notes")
    with pytest.raises(ValueError, match="pixel size 0 mm"):
        openkbp_inserted_case(tmp_path, pixel_mm=0)
    _write_neck(tmp_path / "thin" / "pt_3", (2.5, 4.5, 4.5), radius_mm=20.0)  # 1257 mm^2: no room for a lesion
    with pytest.raises(ValueError, match="3000 mm\\^2 of soft tissue"):
        openkbp_inserted_case(tmp_path / "thin")


def test_roi_level_baseline_ranks_a_darker_lesion_in_a_flat_organ(case):
    from training.evaluate.anomaly_real import roi_level_heatmap

    roi, truth = case
    rng = np.random.default_rng(0)
    image = np.where(roi, 120.0, -1000.0) + rng.normal(0.0, 10.0, roi.shape)  # enhanced liver, 10 HU noise
    image[truth] -= 50.0                                                       # hypodense lesions
    image[2][disc((64, 64), (32, 20), 4)] += 50.0                              # a bright vessel, not a lesion
    kw = dict(smooth_mm=2.0, window_hu=(-160.0, 240.0))
    darker = roi_level_heatmap(image, roi, (1.0, 1.0, 1.0), polarity="darker", **kw)
    both = roi_level_heatmap(image, roi, (1.0, 1.0, 1.0), polarity="both", **kw)
    assert score_case(darker, roi, truth, **THR)["pixel_auroc"] > 0.99
    assert score_case(both, roi, truth, **THR)["pixel_auroc"] > 0.95
    assert darker[2][32, 20] <= 0.0 < both[2][32, 20]  # 'darker' ignores the bright vessel, 'both' flags it
    assert not darker[~roi].any()


def test_smoothing_at_the_lesion_scale_lifts_a_noisy_residual_and_rows_pair_with_their_baseline():
    """A 10 mm lesion the reconstruction does not remove, under a reconstruction
    error of white 30 HU noise (lesion +20 HU): smoothing near the lesion's scale (a matched
    filter) ranks the lesion higher than 1 mm smoothing does."""
    from training.evaluate.anomaly import matching_baseline, smoothing_variants

    rng = np.random.default_rng(0)
    roi = np.stack([disc((96, 96), (48, 48), 44)] * 2)
    truth = np.zeros_like(roi)
    truth[1] = disc((96, 96), (40, 50), 5)  # 1 mm pixels: 10 mm across
    image = np.full(roi.shape, 50.0, dtype=np.float32)
    image[truth] += 20.0
    rec = (np.full(roi.shape, 50.0) + rng.normal(0.0, 30.0, roi.shape)).astype(np.float32)
    assert smoothing_variants([3.0]) == [("", 3.0)]
    variants = smoothing_variants([1.0, 4.0])
    assert variants == [(" smooth 1 mm", 1.0), (" smooth 4 mm", 4.0)]
    auc = {}
    for suffix, sigma in variants:
        heat, _ = diffusion_heatmap(image, [(rec, None)], roi, (1.0, 1.0, 1.0), score="residual", smooth_mm=sigma,
                                    window_hu=(-160.0, 240.0))
        auc[sigma] = score_case(heat, roi, truth, **THR)["pixel_auroc"]
    assert auc[1.0] < 0.80 and auc[4.0] > 0.90, auc  # measured 0.73 and 0.92
    keys = ["diffusion t=5 residual smooth 1 mm", "baseline local z-score smooth 1 mm",
            "baseline local z-score smooth 4 mm"]
    assert matching_baseline("diffusion t=5 residual smooth 4 mm", keys) == "baseline local z-score smooth 4 mm"
    assert matching_baseline("diffusion t=5 residual", ["baseline local z-score"]) == "baseline local z-score"
