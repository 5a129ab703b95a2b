"""The anomaly task's learned method (a lesion segmenter or a lesion-healing model) and its training data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import napari_mediffuse
from napari_mediffuse import io
from napari_mediffuse.tasks import anomaly
from napari_mediffuse.tasks.common import RunOptions, TaskInputError
from training.data import TrainingVolume
from training.healing import LesionHealingPairs, body_mask, corrupt

from conftest import TINY_ARCHITECTURE

SAMPLE = Path(napari_mediffuse.__file__).parent / "data" / "sample" / "abdomen_ct_3mm.nii.gz"
NORMALIZATION = {"type": "hu_window", "low": -1024.0, "high": 2048.0}
HEALING_CARD = dict(task="lesion_healing", schedule={"beta_schedule": "squaredcos_cap_v2",
                                                     "prediction_type": "v_prediction"})


@pytest.fixture(scope="module")
def sample_ct():
    """Axial slices 50-55 of the packaged 3 mm abdominal CT (HU)."""
    ct, = io.read(SAMPLE)
    data = np.array(ct.data[50:56], dtype=np.float32)
    affine = np.array(ct.affine)
    affine[:3, 3] = (affine @ np.array([50, 0, 0, 1.0]))[:3]
    return io.Volume(data, affine, modality="CT", name="sample slab")


def save_zero_healer(folder):
    """A residual lesion-healing model with all weights zero: its correction is 0,
    so its healthy version is the scan itself."""
    from napari_mediffuse.engine.checkpoint import make_card, save_checkpoint
    from napari_mediffuse.engine.networks import DiffusionNetwork

    arch = dict(TINY_ARCHITECTURE, condition_channels=1)
    network = DiffusionNetwork(arch)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.zero_()
    return save_checkpoint(folder, network, make_card(
        name="zero-healer", modality="CT", architecture=arch, patch_size=[16, 16], residual_scale=4.0,
        pixel_spacing_mm=[3.0, 3.0], **HEALING_CARD))


@pytest.fixture
def zero_healer(tmp_path):
    return save_zero_healer(tmp_path / "zero-healer")


# -- training data ------------------------------------------------------------------

def test_corrupt_changes_the_slice_only_under_its_lesions_and_inside_the_body(sample_ct):
    slice_hu = sample_ct.data[2]
    body = body_mask(slice_hu)
    # the body is the patient (about 60 % of this abdominal field of view), not the air around
    assert 0.3 < body.mean() < 0.9 and not body[0, 0]
    for seed in range(5):
        out, weight = corrupt(slice_hu, (3.0, 3.0), np.random.default_rng(seed), body=body)
        change = np.abs(out - slice_hu)
        assert change[weight < 1e-6].max() < 0.01  # HU: nothing moves away from the lesions
        core = weight > 0.9
        assert core.any() and body[core].mean() > 0.5  # the lesions sit in the body
        # at a lesion's core the tissue is changed by at least its smallest contrast (10 HU)
        # less its texture's dip, for most of the core's pixels
        assert np.median(change[core]) > 5.0


def test_healing_pairs_are_a_crop_and_the_same_crop_with_lesions(sample_ct):
    volume = _sample_volume(sample_ct)
    config = {"patch_size": 48, "residual_scale": 4, "clean_probability": 0.0,
              "lesions": {"contrast_hu": [100.0, 200.0], "replace_probability": 0.0, "texture_hu": [0.0, 0.0]}}
    stream = LesionHealingPairs([volume], config, NORMALIZATION, seed=0)
    rng = np.random.default_rng(0)
    for _ in range(4):
        sample = stream.sample(rng)
        correction_hu = sample["image"].numpy()[0] / 4.0 * 1536.0  # healthy - with lesions, HU
        assert sample["condition"].shape == (1, 48, 48) and int(sample["region"]) == 3
        # additive lesions of 100-200 HU and no texture: the correction reaches at least 100 HU
        assert 95.0 < np.abs(correction_hu).max() < 200.5
    clean = LesionHealingPairs([volume], dict(config, clean_probability=1.0), NORMALIZATION, seed=0)
    assert float(clean.sample(rng)["image"].abs().max()) == 0.0


def test_healing_pairs_weigh_the_lesion_pixels(sample_ct):
    volume = _sample_volume(sample_ct)
    config = {"patch_size": 48, "residual_scale": 8, "clean_probability": 0.0, "lesion_loss_weight": 9.0,
              "lesions": {"max_lesions": 1, "contrast_hu": [100.0, 200.0], "replace_probability": 0.0,
                          "texture_hu": [0.0, 0.0]}}
    sample = LesionHealingPairs([volume], config, NORMALIZATION, seed=0).sample(np.random.default_rng(1))
    weight, correction = sample["weight_map"].numpy(), np.abs(sample["image"].numpy())
    assert weight.shape == correction.shape and weight.min() == pytest.approx(1.0) and weight.max() > 9.0
    # one lesion without texture: the correction is its soft mask times its contrast, and the weight
    # 1 + 9 x that mask (10 at its core, 1 where nothing changed)
    np.testing.assert_allclose((weight - 1.0) / 9.0, correction / correction.max(), atol=0.01)


def test_a_weight_map_weighs_each_pixels_squared_error():
    from training.trainer import diffusion_loss

    class Constant(torch.nn.Module):  # predicts 0: the squared error is the target's square
        def forward(self, x_t, t, coords=None, condition=None, region=None):
            return torch.zeros_like(x_t)

    image = torch.full((1, 1, 4, 4), 2.0)
    weight_map = torch.zeros((1, 1, 4, 4))
    weight_map[..., :2, :] = 3.0  # half the pixels count 3 times, half not at all
    batch = {"image": image, "coords": torch.zeros(1, 3, 4, 4), "region": torch.zeros(1, dtype=torch.long),
             "weight_map": weight_map}
    loss = diffusion_loss(Constant(), batch, torch.linspace(0.999, 0.001, 10), torch.Generator().manual_seed(0),
                          torch.device("cpu"), timesteps=torch.tensor([9]), prediction_type="sample")
    assert float(loss) == pytest.approx(0.5 * 3.0 * 4.0)


def test_healing_config_rejects_unknown_lesion_keys():
    with pytest.raises(ValueError, match="unknown keys"):
        LesionHealingPairs([], {"patch_size": 32, "lesions": {"diameters": [1, 2]}}, NORMALIZATION)


# -- the task ----------------------------------------------------------------------

def test_learned_method_with_a_healer_that_changes_nothing_flags_nothing(sample_ct, zero_healer):
    result = anomaly.detect_anomalies(sample_ct, method="learned", model=str(zero_healer),
                                      options=RunOptions(seed=0))
    np.testing.assert_allclose(result.reconstruction.data, sample_ct.data, atol=0.1)  # HU
    assert int(result.mask.data.sum()) == 0
    params = result.heatmap.metadata["parameters"]
    assert params["method"] == "learned" and params["score"] == "residual" and "t" not in params
    assert result.heatmap.metadata["model"] == "zero-healer" and "learned" in result.heatmap.name
    np.testing.assert_allclose(result.heatmap.affine, sample_ct.affine)


def test_learned_method_maps_where_the_scan_departs_from_the_healed_version(sample_ct, monkeypatch):
    # a stand-in for a perfect healer: it returns the slices without the lesion
    healthy = sample_ct.data.copy()
    scan = sample_ct.with_data(healthy.copy())
    lesion = np.zeros(healthy.shape, dtype=bool)
    lesion[3, 40:46, 60:66] = True  # 18 x 18 mm, in the liver / abdomen of this slab
    assert body_mask(healthy[3])[lesion[3]].all()
    scan.data[lesion] -= 60.0
    roi = np.zeros(healthy.shape, dtype=bool)
    roi[2:5] = body_mask(healthy[3])[None]
    seen = {}

    def healer(volume, data, *, indices, **kwargs):
        seen["indices"] = list(indices)
        checkpoint = type("Checkpoint", (), {"name": "perfect"})()
        return healthy[list(indices)] + 0.0, checkpoint, []

    monkeypatch.setattr(anomaly, "learned_slices", healer)
    monkeypatch.setattr(anomaly, "learned_model", lambda model: (model, False))  # the stand-in heals
    result = anomaly.detect_anomalies(scan, roi=roi, method="learned", smooth_mm=1.0, options=RunOptions(seed=0))
    assert seen["indices"] == [2, 3, 4]  # only the ROI's slices are healed
    flagged = result.mask.data.astype(bool)
    assert flagged[lesion].mean() > 0.5 and not flagged[~roi].any()
    assert result.heatmap.data[lesion].min() > result.heatmap.data[roi & ~lesion].max() * 0.5
    np.testing.assert_array_equal(result.reconstruction.data[~roi], scan.data[~roi])
    np.testing.assert_allclose(result.reconstruction.data[lesion], healthy[lesion])


@pytest.mark.parametrize("bad, message", [
    (dict(plane="coronal"), "axial slices"),
    (dict(patch_mm=20.0), "patch_mm applies to the diffusion method"),
    (dict(pixel_mm=2.0), "pixel_mm applies to the diffusion method"),
    (dict(score="spread"), "scores the residual"),
    (dict(method="healing"), "unknown anomaly method"),
])
def test_learned_method_refuses_settings_of_the_diffusion_method(sample_ct, zero_healer, bad, message):
    kwargs = {"method": "learned", "model": str(zero_healer), **bad}
    with pytest.raises(TaskInputError, match=message):
        anomaly.detect_anomalies(sample_ct, **kwargs)


def test_learned_method_needs_a_lesion_healing_model(sample_ct, tmp_path):
    from conftest import save_tiny_checkpoint
    from napari_mediffuse.engine.checkpoint import CheckpointError

    prior = save_tiny_checkpoint(tmp_path / "tiny-prior")
    with pytest.raises(CheckpointError, match="this needs a 'lesion_segmentation' model or a 'lesion_healing' model"):
        anomaly.detect_anomalies(sample_ct, method="learned", model=str(prior))


def test_cli_learned_anomaly_writes_maps_on_the_input_grid(sample_ct, zero_healer, tmp_path, capsys):
    from napari_mediffuse.cli import main

    path = tmp_path / "slab.nii.gz"
    io.write_nifti(sample_ct, path)
    heat, mask = tmp_path / "heat.nii.gz", tmp_path / "mask.nii.gz"
    code = main(["anomaly", str(path), "-o", str(heat), "--mask-out", str(mask), "--method", "learned",
                 "--model", str(zero_healer), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    for out in (heat, mask):
        got = io.read(out)[0]
        assert got.data.shape == sample_ct.data.shape
        np.testing.assert_allclose(got.affine, sample_ct.affine, atol=1e-4)
    assert int(io.read(mask)[0].data.sum()) == 0 and "0 voxels flagged" in capsys.readouterr().out


def test_share_weights_give_the_lesions_their_share_of_the_loss():
    from training.healing import MAX_LESION_WEIGHT, share_weight_map

    mask = np.zeros((1, 48, 48), np.float32)
    mask[0, 10:20, 10:20] = 1.0  # 100 of 2304 pixels
    weight = share_weight_map(mask, 0.5)
    lesion, rest = float(weight[mask > 0].sum()), float(weight[mask == 0].sum())
    assert lesion / (lesion + rest) == pytest.approx(0.5, rel=1e-4)
    assert weight[mask == 0].min() == 1.0 and weight.max() == pytest.approx(1 + (1152 - 100) / 50)
    np.testing.assert_array_equal(share_weight_map(np.zeros_like(mask), 0.5), np.ones_like(mask))
    one_pixel = np.zeros_like(mask)
    one_pixel[0, 5, 5] = 1.0
    assert share_weight_map(one_pixel, 0.5).max() == 1.0 + MAX_LESION_WEIGHT  # capped


def test_healing_pairs_refuse_both_lesion_weightings():
    volume = TrainingVolume(data=np.zeros((4, 32, 32), np.float32), region=3, source="x", holdout_start=4)
    with pytest.raises(ValueError, match="give one of them"):
        LesionHealingPairs([volume], {"patch_size": 32, "lesion_loss_weight": 9.0, "lesion_loss_share": 0.5},
                           NORMALIZATION)


# -- the lesion segmenter ---------------------------------------------------------------

def _sample_volume(sample_ct):
    normalised = (sample_ct.data - NORMALIZATION["low"]) / 3072.0 * 2 - 1
    return TrainingVolume(data=normalised.astype(np.float32), region=3, source="sample", holdout_start=6,
                          spacing_mm=tuple(sample_ct.spacing))


def test_segmenter_pairs_mark_the_pixels_a_lesion_changed_by_half_its_contrast(sample_ct):
    volume = _sample_volume(sample_ct)
    lesions = {"max_lesions": 1, "contrast_hu": [100.0, 200.0], "replace_probability": 0.0,
               "texture_hu": [0.0, 0.0]}
    healing = LesionHealingPairs([volume], {"patch_size": 48, "clean_probability": 0.0, "lesions": lesions},
                                 NORMALIZATION, seed=0)
    segmenting = LesionHealingPairs([volume], {"patch_size": 48, "clean_probability": 0.0, "lesions": lesions,
                                               "target": "lesion_mask"}, NORMALIZATION, seed=0)
    for seed in range(3):  # the same draws: the healthy crop from one stream, the mask from the other
        pair = healing.sample(np.random.default_rng(seed))
        marked = segmenting.sample(np.random.default_rng(seed))
        np.testing.assert_array_equal(marked["condition"], pair["condition"])
        mask = marked["image"].numpy()[0]
        assert set(np.unique(mask)) == {0.0, 1.0}
        change_hu = np.abs(pair["condition"] - pair["image"]).numpy()[0] * 1536.0
        contrast = change_hu.max()
        assert 95.0 < contrast < 200.5
        # one lesion, no texture: the change is its soft weight times its contrast, and the mask
        # is where that weight is at least one half
        assert change_hu[mask == 1].min() >= 0.5 * contrast - 1.0
        assert change_hu[mask == 0].max() <= 0.5 * contrast + 1.0


def low_frequency_share(noise, pixel_mm, cycles_per_mm=0.05):
    """Share of ``noise``'s power at wavelengths over 1 / ``cycles_per_mm`` (20 mm)."""
    power = np.abs(np.fft.fft2(noise)) ** 2
    fy, fx = (np.fft.fftfreq(n, pixel_mm) for n in noise.shape)
    return float(power[np.hypot(*np.meshgrid(fy, fx, indexing="ij")) < cycles_per_mm].sum() / power.sum())


def test_ct_like_noise_has_its_std_and_little_power_at_lesion_scale_at_any_pixel_size():
    from training.healing import ct_like_noise

    for pixel_mm in (0.78, 1.5, 4.0):
        noise = ct_like_noise((256, 256), 30.0, np.random.default_rng(1), spacing_mm=(pixel_mm, pixel_mm))
        assert float(noise.std()) == pytest.approx(30.0, rel=1e-3)
        # band-limited in mm: under 2 % of its power at wavelengths over 20 mm (lesion and organ
        # scale), where white noise at 4 mm pixels has 13 %
        assert low_frequency_share(noise, pixel_mm) < 0.02
    white = np.random.default_rng(1).standard_normal((256, 256))
    assert low_frequency_share(white, 4.0) > 0.1
    # grain: at 0.78 mm pixels neighbours are correlated, as in a reconstructed CT (white: 0)
    fine = ct_like_noise((256, 256), 30.0, np.random.default_rng(2), spacing_mm=(0.78, 0.78))
    assert np.corrcoef(fine[:, :-1].ravel(), fine[:, 1:].ravel())[0, 1] > 0.5


def test_segmenter_pairs_add_noise_to_the_input_only(sample_ct):
    volume = _sample_volume(sample_ct)
    base = {"patch_size": 48, "clean_probability": 0.0, "target": "lesion_mask",
            "lesions": {"max_lesions": 1, "contrast_hu": [100.0, 200.0], "replace_probability": 0.0}}
    quiet = LesionHealingPairs([volume], base, NORMALIZATION, seed=0)
    noisy = LesionHealingPairs([volume], dict(base, noise_hu=[20.0, 20.0], noise_probability=1.0),
                               NORMALIZATION, seed=0)
    a, b = quiet.sample(np.random.default_rng(5)), noisy.sample(np.random.default_rng(5))
    np.testing.assert_array_equal(a["image"], b["image"])  # the same lesions: the mask is unchanged
    added_hu = ((b["condition"] - a["condition"]).numpy()[0] * 1536.0)
    body = a["condition"].numpy()[0] > -0.6  # tissue, away from the clipped air
    assert 15.0 < float(added_hu[body].std()) < 25.0
    # validation crops stay as they are, and a healing model refuses the noise
    val = LesionHealingPairs([volume], dict(base, noise_hu=[20.0, 20.0]), NORMALIZATION, part="val")
    assert val.noise_hu == (0.0, 0.0)
    with pytest.raises(ValueError, match="noise_hu belongs to the lesion_mask target"):
        LesionHealingPairs([volume], {"patch_size": 48, "noise_hu": [0.0, 10.0]}, NORMALIZATION)
    for bad in (20.0, [30.0, 10.0], [-5.0, 10.0]):
        with pytest.raises(ValueError, match="noise_hu must be"):
            LesionHealingPairs([volume], dict(base, noise_hu=bad), NORMALIZATION)
    with pytest.raises(ValueError, match="noise_probability must be in"):
        LesionHealingPairs([volume], dict(base, noise_hu=[0.0, 10.0], noise_probability=1.5), NORMALIZATION)


def test_segmenter_config_takes_no_healing_settings_and_needs_the_segmentation_objective():
    from training.trainer import training_objective

    volume = TrainingVolume(data=np.zeros((4, 32, 32), np.float32), region=3, source="x", holdout_start=4)
    with pytest.raises(ValueError, match="belong to the healing target"):
        LesionHealingPairs([volume], {"patch_size": 32, "target": "lesion_mask", "residual_scale": 4},
                           NORMALIZATION)
    with pytest.raises(ValueError, match="data.target must be one of"):
        LesionHealingPairs([volume], {"patch_size": 32, "target": "mask"}, NORMALIZATION)
    segmenter = {"task": "lesion_segmentation", "data": {"kind": "lesion_healing", "target": "lesion_mask"},
                 "train": {"objective": "segmentation"}}
    assert training_objective(segmenter) == "segmentation"
    for config in ({**segmenter, "train": {}},                                    # the healing objective
                   {**segmenter, "task": "lesion_healing"},                        # a card another task
                   {**segmenter, "data": {"target": "lesion_mask"}},               # CT slices as masks
                   {"task": "ct_prior", "data": {}, "train": {"objective": "segmentation"}}):
        with pytest.raises(ValueError, match="segmentation goes with"):
            training_objective(config)
    with pytest.raises(ValueError, match="unknown 'dice'"):
        training_objective({"data": {}, "train": {"objective": "dice"}})


def test_lesion_balance_map_gives_each_lesion_at_least_a_reference_lesions_weight():
    from training.healing import lesion_balance_map

    yy, xx = np.mgrid[:64, :64]
    small = (yy - 16) ** 2 + (xx - 16) ** 2 <= 2 ** 2   # 13 pixels of 1 x 2 mm: 26 mm^2
    large = (yy - 40) ** 2 + (xx - 40) ** 2 <= 12 ** 2  # 441 pixels: 882 mm^2
    weight = lesion_balance_map(small | large, (1.0, 2.0), reference_mm=20.0)
    reference = np.pi * 10.0 ** 2  # mm^2 of a 20 mm lesion
    # the small lesion weighs as much as the reference lesion, pixel by pixel the same
    assert float(weight[small].sum()) * 2.0 == pytest.approx(reference, rel=1e-5)
    assert np.ptp(weight[small]) == 0.0
    # a lesion larger than the reference and the background keep weight 1
    assert float(weight[large].max()) == 1.0 and float(weight[~(small | large)].max()) == 1.0
    np.testing.assert_array_equal(lesion_balance_map(np.zeros((8, 8), bool), (1.0, 1.0), 20.0), np.ones((8, 8)))


def test_lesion_balance_belongs_to_the_segmenter_target(sample_ct):
    volume = _sample_volume(sample_ct)
    with pytest.raises(ValueError, match="lesion_balance_mm"):
        LesionHealingPairs([volume], {"patch_size": 48, "lesion_balance_mm": 20.0}, NORMALIZATION, seed=0)
    config = {"patch_size": 48, "target": "lesion_mask", "clean_probability": 0.0, "lesion_balance_mm": 40.0,
              "lesions": {"diameter_mm": [6.0, 12.0]}}
    sample = next(s for s in (LesionHealingPairs([volume], config, NORMALIZATION, seed=0).sample(
        np.random.default_rng(k)) for k in range(20)) if s["image"].any())
    weight, lesion = sample["weight_map"].numpy()[0], sample["image"].numpy()[0] > 0.5
    # 6-12 mm lesions at 3 mm pixels are far under a 40 mm lesion: their pixels weigh more than 1
    assert float(weight[lesion].min()) > 1.0 and float(weight[~lesion].max()) == 1.0


def test_a_weight_map_makes_the_segmenters_cross_entropy_a_weighted_mean():
    from training.trainer import segmentation_loss

    class Confident(torch.nn.Module):  # logit 2 everywhere
        def forward(self, x, t, coords=None, condition=None, region=None):
            return torch.full_like(x, 2.0)

    target = torch.zeros((1, 1, 8, 8))
    target[0, 0, :2, :2] = 1.0
    weight_map = torch.ones_like(target)
    weight_map[target > 0] = 10.0
    batch = {"image": target, "condition": torch.randn(1, 1, 8, 8), "coords": torch.zeros(1, 2, 8, 8),
             "region": torch.zeros(1, dtype=torch.long)}
    plain = float(segmentation_loss(Confident(), batch, torch.device("cpu"), num_steps=1000))
    weighted = float(segmentation_loss(Confident(), {**batch, "weight_map": weight_map}, torch.device("cpu"),
                                       num_steps=1000))
    on_lesion, on_background = np.log1p(np.exp(-2.0)), np.log1p(np.exp(2.0))
    # the Dice term is the same in both: the difference is the cross-entropy's
    expected = (40 * on_lesion + 60 * on_background) / 100 - (4 * on_lesion + 60 * on_background) / 64
    assert weighted - plain == pytest.approx(expected, rel=1e-5)


def test_segmentation_loss_is_cross_entropy_plus_dice_at_the_last_step_with_no_noisy_input():
    from training.trainer import segmentation_loss

    seen = {}

    class Undecided(torch.nn.Module):  # logit 0 everywhere: probability one half
        def forward(self, x, t, coords=None, condition=None, region=None):
            seen.update(x=x.clone(), t=t.clone())
            return torch.zeros_like(x)

    target = torch.zeros((2, 1, 8, 8))
    target[0, 0, :2, :2] = 1.0  # 4 lesion pixels of 128
    batch = {"image": target, "condition": torch.randn(2, 1, 8, 8), "coords": torch.zeros(2, 2, 8, 8),
             "region": torch.zeros(2, dtype=torch.long)}
    loss = segmentation_loss(Undecided(), batch, torch.device("cpu"), num_steps=1000)
    assert float(seen["x"].abs().max()) == 0.0 and seen["t"].tolist() == [999, 999]
    bce = np.log(2.0)
    dice = 1.0 - (2 * 0.5 * 4 + 1e-5) / (4 + 0.5 * 128 + 1e-5)  # MONAI's soft Dice, batch-wide
    assert float(loss) == pytest.approx(bce + dice, rel=1e-5)


def save_segmenter(folder, network, name="segmenter"):
    """``network`` (the tiny architecture with one condition channel) saved as a lesion segmenter."""
    from napari_mediffuse.engine.checkpoint import make_card, save_checkpoint

    return save_checkpoint(folder, network, make_card(
        name=name, modality="CT", architecture=network.config, patch_size=[16, 16], objective="segmentation",
        pixel_spacing_mm=[3.0, 3.0], task="lesion_segmentation",
        schedule={"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}))


def tiny_segmenter_network(seed: int = 0):
    from napari_mediffuse.engine.networks import DiffusionNetwork

    torch.manual_seed(seed)
    return DiffusionNetwork(dict(TINY_ARCHITECTURE, condition_channels=1))


def save_constant_segmenter(folder, logit: float):
    """A lesion segmenter whose every weight is zero and whose output bias is
    ``logit``: the same lesion probability, sigmoid(logit), at every pixel."""
    network = tiny_segmenter_network()
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.zero_()
        output = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        output.bias.fill_(logit)
    return save_segmenter(folder, network, name="constant-segmenter")


@pytest.mark.parametrize("logit", [2.0, -2.0])
def test_segmenter_heatmap_is_its_probability_inside_the_roi(sample_ct, tmp_path, logit):
    model = save_constant_segmenter(tmp_path / "segmenter", logit)
    roi = np.zeros(sample_ct.data.shape, dtype=bool)
    roi[1:4, 20:80, 30:90] = True
    result = anomaly.detect_anomalies(sample_ct, roi=roi, method="learned", model=str(model), ensemble=2,
                                      options=RunOptions(seed=0, device="cpu"))
    probability = 1.0 / (1.0 + np.exp(-logit))  # 0.881 / 0.119: the raw logit, not a noise estimate of it
    np.testing.assert_allclose(result.heatmap.data[roi], probability, atol=1e-4)
    assert float(np.abs(result.heatmap.data[~roi]).max()) == 0.0
    np.testing.assert_array_equal(result.mask.data.astype(bool), roi if logit > 0 else np.zeros_like(roi))
    assert result.reconstruction is None and result.threshold == 0.5
    params = result.heatmap.metadata["parameters"]
    assert params["score"] == "lesion probability"
    assert params["threshold_rule"] == "probability 0.5"
    assert result.heatmap.metadata["units"] == "lesion probability (0-1)"
    assert "learned, 2 views" in result.heatmap.name
    np.testing.assert_allclose(result.heatmap.affine, sample_ct.affine)
    layers = anomaly.anomaly_layers(result, reconstruction=True)  # no reconstruction to show
    assert [kind for _, _, kind in layers] == ["image", "labels"]


def test_segmenter_refuses_the_healthy_version_settings(sample_ct, tmp_path, capsys):
    from napari_mediffuse.cli import main

    model = save_constant_segmenter(tmp_path / "segmenter", 2.0)
    with pytest.raises(TaskInputError, match="no healthy version"):
        anomaly.detect_anomalies(sample_ct, method="learned", model=str(model), polarity="darker")
    path = tmp_path / "slab.nii.gz"
    io.write_nifti(sample_ct, path)
    heat, rec = tmp_path / "heat.nii.gz", tmp_path / "rec.nii.gz"
    code = main(["anomaly", str(path), "-o", str(heat), "--reconstruction-out", str(rec), "--method", "learned",
                 "--model", str(model), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code != 0 and "lesion segmenter" in err and "Traceback" not in err
    assert not heat.exists() and not rec.exists()


def test_level_shift_moves_soft_tissue_only_and_at_organ_scale_in_mm(sample_ct):
    from training.healing import shift_soft_tissue

    slice_hu = sample_ct.data[2]
    shifted = shift_soft_tissue(slice_hu, 40.0, np.random.default_rng(3), spacing_mm=(3.0, 3.0))
    change = shifted - slice_hu
    soft = (slice_hu > -200) & (slice_hu < 300)
    assert float(np.abs(change[~soft]).max()) == 0.0  # air, lungs and bone keep their HU
    assert 5.0 < float(np.abs(change[soft]).mean()) < 120.0
    # organ scale in mm at any pixel size: under 2.5 HU per mm between neighbours (a 10-30 mm
    # lesion of 30 HU is a step the field never makes), at 0.78 mm pixels as at 4 mm
    flat = np.full((96, 96), 50.0, dtype=np.float32)
    for pixel_mm in (0.78, 4.0):
        for seed in range(5):
            field = shift_soft_tissue(flat, 40.0, np.random.default_rng(seed), spacing_mm=(pixel_mm, pixel_mm)) - 50
            assert float(np.abs(np.diff(field, axis=1)).max()) / pixel_mm < 2.5


def test_organ_lesions_darken_one_organ_only_by_their_contrast(sample_ct):
    from scipy import ndimage

    from training.healing import organ_lesions, parenchyma_mask

    slice_hu = sample_ct.data[2]
    tissue = parenchyma_mask(slice_hu, (3.0, 3.0))
    # parenchyma: soft tissue (0-200 HU smoothed), not fat, air or bone
    assert tissue.any() and 0.0 < float(np.median(slice_hu[tissue])) < 200.0
    labels, _ = ndimage.label(tissue)
    for seed in range(6):
        out, weight = organ_lesions(slice_hu, (3.0, 3.0), np.random.default_rng(seed),
                                    contrast_hu=(40.0, 40.0), texture_hu=(0.0, 0.0))
        change = out - slice_hu
        assert float(np.abs(change[weight < 1e-6]).max()) < 0.01  # nothing moves outside the lesions
        core = weight > 0.9
        assert core.any()
        # hypodense by the cluster's level (40 HU, each lesion within 30 %: 28-52 HU, 25 at a
        # weight of 0.9), not twice as dark where two touch
        assert -52.5 < float(change[core].min()) and float(change[core].max()) < -25.0
        # one organ: every lesion pixel lies in the same parenchyma piece (or within 1 mm of its border)
        inside = labels[core & tissue]
        assert len(np.unique(inside)) == 1
    # no parenchyma, no lesion: the slice comes back unchanged with an empty mask
    air = np.full((32, 32), -1000.0, dtype=np.float32)
    out, weight = organ_lesions(air, (1.0, 1.0), np.random.default_rng(0))
    assert not weight.any() and np.array_equal(out, air)


def test_corrupt_with_organ_probability_one_puts_every_cluster_in_body_parenchyma(sample_ct):
    slice_hu = sample_ct.data[2]
    body = body_mask(slice_hu)
    outside = ~parenchyma_or_border(slice_hu)
    for seed in range(4):
        # always a cluster: every lesion pixel lies in parenchyma (or its 1 mm border)
        _, weight = corrupt(slice_hu, (3.0, 3.0), np.random.default_rng(seed), organ_probability=1.0)
        assert weight.max() > 0.9 and float(weight[outside].max()) < 0.5
    # only the body's parenchyma: with the left half of the body left out, no lesion goes there
    half = body.copy()
    half[:, : half.shape[1] // 2] = False
    for seed in range(4):
        _, weight = corrupt(slice_hu, (3.0, 3.0), np.random.default_rng(seed), body=half, organ_probability=1.0)
        assert float(weight[:, : half.shape[1] // 2 - 2].max()) < 0.5


def test_corrupt_with_tissue_probability_one_centres_every_blob_in_soft_tissue(sample_ct):
    from scipy import ndimage

    from training.healing import LESION_TISSUE_HU, parenchyma_mask
    slice_hu = sample_ct.data[2]
    body = body_mask(slice_hu)
    tissue = parenchyma_mask(slice_hu, (3.0, 3.0), hu_range=LESION_TISSUE_HU, margin_mm=2.0) & body
    assert 0.05 < tissue.sum() / body.sum() < 0.9  # soft tissue is a part of this abdomen, not all of it
    in_tissue, anywhere = [], []
    for seed in range(6):
        for probability, found in ((1.0, in_tissue), (0.0, anywhere)):
            _, weight = corrupt(slice_hu, (3.0, 3.0), np.random.default_rng(seed), body=body, max_lesions=1,
                                diameter_mm=(6.0, 9.0), tissue_probability=probability)
            # the blob's centre: its weight's peak (a 6-9 mm blob peaks within a pixel of its centre)
            centre = np.unravel_index(np.argmax(weight), weight.shape)
            found.append(bool(ndimage.binary_dilation(tissue, iterations=1)[centre]))
    assert all(in_tissue)
    assert not all(anywhere)  # without it, blobs also go to fat, bone and gas


def parenchyma_or_border(slice_hu):
    from scipy import ndimage

    from training.healing import parenchyma_mask
    return ndimage.binary_dilation(parenchyma_mask(slice_hu, (3.0, 3.0)), iterations=2)


def save_random_segmenter(folder, seed: int = 0):
    """A tiny randomly initialised lesion segmenter (placement and invariance tests, not a useful model)."""
    return save_segmenter(folder, tiny_segmenter_network(seed), name="random-segmenter")


def test_segmenter_runs_with_the_network_on_another_device_and_at_any_batch_size(sample_ct, tmp_path):
    # on 'meta' a tensor left on the CPU meets the network and raises (tests/test_task_runs.py)
    model = str(save_random_segmenter(tmp_path / "segmenter"))
    meta = anomaly.detect_anomalies(sample_ct, method="learned", model=model, ensemble=2,
                                    options=RunOptions(device=torch.device("meta"), batch_size=2))
    assert meta.heatmap.data.shape == sample_ct.data.shape
    one, four = (anomaly.detect_anomalies(sample_ct, method="learned", model=model, ensemble=4, smooth_mm=0.0,
                                          options=RunOptions(device="cpu", batch_size=b)).heatmap.data
                 for b in (1, 4))
    roi = anomaly.resolve_roi(sample_ct, None)
    assert 0.0 < float(one[roi].min()) and float(one[roi].max()) < 1.0  # probabilities, not clipped
    np.testing.assert_allclose(one, four, atol=1e-5)


def test_segmentation_logits_feed_a_zero_image_at_the_last_step_and_return_the_raw_output():
    from napari_mediffuse.engine.inference import NoisePredictor, segmentation_logits

    network = tiny_segmenter_network()
    seen = {}
    forward = network.forward

    def spy(x, t, **kwargs):
        seen.update(x=x.clone(), t=torch.as_tensor(t).clone())
        out = forward(x, t, **kwargs)
        seen["out"] = out.clone()
        return out

    network.forward = spy
    condition = torch.randn(2, 1, 16, 16)
    logits = segmentation_logits(NoisePredictor(network, device="cpu"), condition, num_train_timesteps=1000,
                                 region=torch.zeros(2, dtype=torch.long))
    assert float(seen["x"].abs().max()) == 0.0 and set(seen["t"].reshape(-1).tolist()) == {999}
    torch.testing.assert_close(logits, seen["out"])  # as the network gave it: no conversion to noise
    with pytest.raises(ValueError, match="without a schedule"):
        segmentation_logits(NoisePredictor(network, device="cpu", schedule={"prediction_type": "epsilon"}),
                            condition, num_train_timesteps=1000)


def test_segmenter_views_are_mirrored_back_onto_the_scan(sample_ct, monkeypatch, tmp_path):
    # a stand-in segmenter that flags bright pixels: whatever view it sees, the probability must
    # come back where the bright pixels are in the scan
    import napari_mediffuse.engine.inference as inference

    monkeypatch.setattr(inference, "segmentation_logits",
                        lambda predictor, condition, **kw: 200.0 * (condition - 0.0))  # > 0 above 512 HU
    scan = sample_ct.with_data(np.full(sample_ct.data.shape, 40.0, dtype=np.float32))
    scan.data[2, 10:14, 70:80] = 1500.0  # a bright bar off every axis of symmetry
    roi = np.ones(scan.data.shape, dtype=bool)
    model = str(save_constant_segmenter(tmp_path / "segmenter", 0.0))  # its network is replaced above
    for ensemble in (1, 2, 4):  # as is, mirrored left-right, upside down, both
        result = anomaly.detect_anomalies(scan, roi=roi, method="learned", model=model, ensemble=ensemble,
                                          smooth_mm=0.0, options=RunOptions(device="cpu"))
        np.testing.assert_array_equal(result.mask.data.astype(bool), scan.data > 1000.0)


def test_a_segmenter_threshold_is_a_probability(sample_ct, tmp_path):
    model = str(save_constant_segmenter(tmp_path / "segmenter", 2.0))
    for threshold in (0.0, 1.0, 3.5):
        with pytest.raises(TaskInputError, match="probability in"):
            anomaly.detect_anomalies(sample_ct, method="learned", model=model, threshold=threshold)


def test_the_default_learned_model_is_a_segmenter_before_a_healer(tmp_path, monkeypatch):
    from napari_mediffuse.engine import registry

    save_zero_healer(tmp_path / "a-healer")  # sorts before the segmenter by name
    save_constant_segmenter(tmp_path / "b-segmenter", 1.0)
    monkeypatch.setenv(registry.ENV_VAR, str(tmp_path))
    monkeypatch.setattr(registry, "bundled_models_dir", lambda: tmp_path / "none")
    monkeypatch.setattr(registry, "user_models_dir", lambda: tmp_path / "none")
    folder, segmenter = anomaly.learned_model(None)
    assert segmenter and Path(folder).name == "b-segmenter"


def test_a_card_whose_task_and_objective_disagree_is_refused(tmp_path):
    import json

    from napari_mediffuse.engine.checkpoint import CARD_FILE, CheckpointError, read_card

    folder = save_constant_segmenter(tmp_path / "segmenter", 1.0)
    card = json.loads((folder / CARD_FILE).read_text())
    for change in ({"objective": None}, {"objective": "regression"}, {"task": "lesion_healing"}):
        broken = {k: v for k, v in {**card, **change}.items() if v is not None}
        (folder / CARD_FILE).write_text(json.dumps(broken))
        with pytest.raises(CheckpointError, match="objective"):
            read_card(folder)
