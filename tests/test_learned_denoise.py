"""Learned low-dose denoiser: its simulated training pairs and the task's
``method='learned'`` on a real clinical CT crop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mediffuse.engine.checkpoint import CheckpointError
from napari_mediffuse.tasks import denoise
from napari_mediffuse.tasks.common import RunOptions

from conftest import chest_ct_centre_crop, save_tiny_checkpoint
from training.data import TrainingVolume
from training.low_dose import LowDosePairs, load_bank, save_bank, simulate_bank

NORMALIZATION = {"type": "hu_window", "low": -1024.0, "high": 2048.0}
DENOISE_CARD = dict(task="denoising", schedule={"beta_schedule": "squaredcos_cap_v2",
                                                "prediction_type": "v_prediction"})


@pytest.fixture(scope="module")
def chest_crop():
    """6 axial slices of 64 x 64 (0.78 mm) from the real 1 mm chest CT, HU."""
    return chest_ct_centre_crop((6, 64, 64))


def _training_volume(chest_crop):
    hu = chest_crop.data
    normalised = (hu - NORMALIZATION["low"]) / (NORMALIZATION["high"] - NORMALIZATION["low"]) * 2 - 1
    return TrainingVolume(data=normalised.astype(np.float32), region=2, source="chest", holdout_start=6,
                          spacing_mm=tuple(chest_crop.spacing))


def test_noise_bank_simulates_reduced_dose_noise_and_round_trips(chest_crop, tmp_path):
    config = {"slices_per_volume": 2, "dose_range": [0.2, 0.3], "filters": ["shepp-logan"], "photons": [4e5]}
    bank = simulate_bank([_training_volume(chest_crop)], [chest_crop.data], config, seed=0)
    assert len(bank) == 2 and {b["filter"] for b in bank} == {"shepp-logan"}
    for entry in bank:
        assert 0.2 <= entry["dose"] <= 0.3 and entry["noise"].shape == (64, 64)
        assert 10.0 < float(entry["noise"].std()) < 200.0  # HU: a quarter dose adds tens of HU
        assert abs(float(entry["noise"].mean())) < 0.3 * float(entry["noise"].std())
    save_bank(tmp_path / "bank.npz", bank)
    again = load_bank(tmp_path / "bank.npz")
    assert [(b["volume"], b["slice"], b["filter"]) for b in again] == [(b["volume"], b["slice"], b["filter"]) for b in bank]
    np.testing.assert_array_equal(again[1]["noise"], bank[1]["noise"])


def _water_phantom_with_noise(photons: float, seed: int) -> np.ndarray:
    """A 1 mm, 128 x 128 water cylinder (0 HU) with a 40 HU insert, carrying the
    simulator's own full-dose noise at ``photons``: a scan whose dose is known."""
    from training.degrade import low_dose_noise

    yy, xx = np.mgrid[:128, :128]
    phantom = np.where((yy - 64) ** 2 + (xx - 64) ** 2 < 55 ** 2, 0.0, -1000.0)
    phantom[(yy - 64) ** 2 + (xx - 80) ** 2 < 12 ** 2] = 40.0
    # a dose of 1/2 adds exactly the full dose's noise
    return phantom + low_dose_noise(phantom, 1.0, 0.5, photons=photons, rng=np.random.default_rng(seed))


def test_matched_photons_recovers_the_dose_a_scan_was_made_with():
    from training.degrade import matched_photons

    for true_photons in (2e4, 5e5):  # a noisy neck box and a clean chest scan: 25x apart
        scan = _water_phantom_with_noise(true_photons, seed=1)
        found = matched_photons(scan, 1.0, seed=2)
        assert 0.75 * true_photons < found < 1.33 * true_photons


def test_a_matched_quarter_dose_adds_twice_the_scans_own_noise_variance_thrice():
    from napari_mediffuse.tasks.denoise import estimate_noise_hu
    from training.degrade import low_dose_noise, matched_photons

    scan = _water_phantom_with_noise(3e4, seed=3)
    own = float(estimate_noise_hu(scan)[0])
    photons = matched_photons(scan, 1.0, seed=4)
    quarter = scan + low_dose_noise(scan, 1.0, 0.25, photons=photons, rng=np.random.default_rng(5))
    # total noise of a quarter dose = 2 x the full dose's (variance 1/(dose I0))
    assert 1.75 < float(estimate_noise_hu(quarter)[0]) / own < 2.25


def test_noise_bank_with_matched_photons_records_each_slices_own_dose(chest_crop):
    config = {"slices_per_volume": 2, "dose_range": [0.25, 0.25], "filters": ["ramp"], "photons": "auto"}
    bank = simulate_bank([_training_volume(chest_crop)], [chest_crop.data], config, seed=0)
    from napari_mediffuse.tasks.denoise import estimate_noise_hu

    assert len(bank) == 2
    for entry in bank:  # a quarter of each slice's own dose: twice its own noise
        clean = chest_crop.data[entry["slice"]]
        ratio = estimate_noise_hu(clean + entry["noise"])[0] / estimate_noise_hu(clean)[0]
        assert 1.6 < ratio < 2.4 and entry["photons"] > 0


def test_low_dose_pairs_are_the_clean_slice_and_it_plus_the_bank_noise(chest_crop):
    volume = _training_volume(chest_crop)
    noise = np.full((64, 64), 30.0, dtype=np.float32)  # +30 HU everywhere: easy to check
    bank = [{"volume": 0, "slice": 2, "noise": noise, "dose": 0.25, "filter": "ramp", "photons": 8e5}]
    pairs = LowDosePairs([volume], bank, {"patch_size": 32}, NORMALIZATION, part="val")  # noise scale 1
    sample = pairs.sample(np.random.default_rng(0))
    difference_hu = (sample["condition"] - sample["image"]).numpy() * 3072.0 / 2.0
    np.testing.assert_allclose(difference_hu, 30.0, atol=1e-3)
    assert sample["image"].shape == (1, 32, 32) and int(sample["region"]) == 2


@pytest.fixture
def denoise_model(tmp_path):
    return save_tiny_checkpoint(tmp_path / "tiny-denoiser", name="tiny-denoiser", condition_channels=1,
                                **DENOISE_CARD)


def test_learned_denoising_keeps_the_grid_and_strength_scales_its_correction(chest_crop, denoise_model):
    full = denoise.denoise(chest_crop, method="learned", model=str(denoise_model), options=RunOptions(seed=1))
    half = denoise.denoise(chest_crop, method="learned", model=str(denoise_model), strength=0.5,
                           options=RunOptions(seed=1))
    assert full.data.shape == chest_crop.data.shape
    np.testing.assert_allclose(full.affine, chest_crop.affine)
    assert np.abs(full.data - chest_crop.data).mean() > 1.0  # the model changed the slices (HU)
    np.testing.assert_allclose(half.data, 0.5 * (chest_crop.data + full.data), atol=0.05)
    assert full.metadata["parameters"]["steps"] == 1 and full.metadata["model"] == "tiny-denoiser"
    assert "learned" in full.name


def test_learned_denoising_depends_on_the_seed_only(chest_crop, denoise_model):
    runs = [denoise.denoise(chest_crop, method="learned", model=str(denoise_model), steps=2,
                            options=RunOptions(batch_size=b, seed=4)).data for b in (1, 4)]
    np.testing.assert_allclose(runs[0], runs[1], atol=0.05)


def test_learned_denoising_runs_with_the_network_on_another_device(chest_crop, denoise_model):
    out = denoise.denoise(chest_crop, method="learned", model=str(denoise_model),
                          options=RunOptions(device=torch.device("meta"), batch_size=4))
    assert out.data.shape == chest_crop.data.shape


def test_learned_denoising_needs_a_denoising_model(chest_crop, tmp_path):
    prior = save_tiny_checkpoint(tmp_path / "tiny-prior")
    with pytest.raises(CheckpointError, match="'ct_prior' model; this needs a 'denoising' model"):
        denoise.denoise(chest_crop, method="learned", model=str(prior))


def test_a_residual_model_that_adds_no_correction_returns_its_condition(chest_crop, tmp_path):
    # a residual denoiser (card residual_scale) generates s (clean - low dose); with all
    # weights zero its estimate at the last step is 0, so the result is the input itself
    from conftest import TINY_ARCHITECTURE
    from napari_mediffuse.engine.checkpoint import make_card, save_checkpoint
    from napari_mediffuse.engine.networks import DiffusionNetwork

    arch = dict(TINY_ARCHITECTURE, condition_channels=1)
    network = DiffusionNetwork(arch)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.zero_()
    folder = save_checkpoint(tmp_path / "zero-residual", network, make_card(
        name="zero-residual", modality="CT", architecture=arch, patch_size=[16, 16], residual_scale=8.0,
        **DENOISE_CARD))
    out = denoise.denoise(chest_crop, method="learned", model=str(folder), options=RunOptions(seed=0))
    # (x0 = sqrt(abar_T) x_T: about 5e-5 of the start noise, under 0.1 HU after the 1/s scale)
    np.testing.assert_allclose(out.data, chest_crop.data, atol=0.1)  # HU
    # the same network read as a plain (non-residual) model would return about 0 (-512 HU)
    card = dict(DENOISE_CARD)
    plain = save_checkpoint(tmp_path / "zero-plain", network, make_card(
        name="zero-plain", modality="CT", architecture=arch, patch_size=[16, 16], **card))
    far = denoise.denoise(chest_crop, method="learned", model=str(plain), options=RunOptions(seed=0))
    assert np.abs(far.data - chest_crop.data).mean() > 100.0


def test_noise_texture_mix_swaps_the_bank_noise_for_blurred_white_noise_of_its_std(chest_crop):
    volume = _training_volume(chest_crop)
    # bank noise: 20 HU that is constant along rows (a texture nothing like white noise)
    noise = np.repeat(np.random.default_rng(0).normal(0, 20.0, (64, 1)), 64, axis=1).astype(np.float32)
    bank = [{"volume": 0, "slice": 2, "noise": noise, "dose": 0.25, "filter": "ramp", "photons": 8e5}]
    config = {"patch_size": 48, "noise_scale_range": [1.0, 1.0]}

    def added(texture):
        pairs = LowDosePairs([volume], bank, {**config, "noise_texture": texture}, NORMALIZATION)
        sample = pairs.sample(np.random.default_rng(3))
        hu = (sample["condition"] - sample["image"]).numpy()[0] * 3072.0 / 2.0
        row_spread = float(np.std(hu, axis=1).mean())  # 0 for the bank's row-constant noise
        neighbours = float(np.corrcoef(hu[:, :-1].ravel(), hu[:, 1:].ravel())[0, 1])
        return float(np.std(hu)), row_spread, neighbours

    std, spread, _ = added({"probability": 0.0})
    assert spread < 1e-3 and 15 < std < 25
    std, spread, neighbours = added({"probability": 1.0, "blur_px": [0.0, 0.0]})  # white
    assert abs(std - np.std(noise)) < 2.0 and spread > 15 and abs(neighbours) < 0.1
    _, _, blurred = added({"probability": 1.0, "blur_px": [1.5, 1.5]})
    assert blurred > 0.6  # neighbouring pixels share the blurred noise
    for bad in ({"probability": 2.0}, {"probability": 0.5, "blur_px": 1.0}, {"probability": 0.5, "blur_px": [2, 1]}):
        with pytest.raises(ValueError, match="noise_texture"):
            LowDosePairs([volume], bank, {**config, "noise_texture": bad}, NORMALIZATION)
    # validation pairs keep the simulator's noise
    val = LowDosePairs([volume], bank, {**config, "noise_texture": {"probability": 1.0}}, NORMALIZATION,
                       part="val")
    hu = (val.sample(np.random.default_rng(3))["condition"] - val.sample(np.random.default_rng(3))["image"])
    assert float(np.std(hu.numpy()[0] * 1536.0, axis=1).mean()) < 1e-3


def test_inverse_noise_weighting_weighs_a_sample_by_its_added_noise(chest_crop):
    volume = _training_volume(chest_crop)
    rng = np.random.default_rng(0)
    weighting = {"type": "inverse_noise", "reference_noise_hu": 10.0, "bounds": [0.05, 20.0]}
    for noise_hu, expected in ((30.0, (10 / 30) ** 2), (5.0, 4.0)):
        noise = rng.normal(0.0, noise_hu, (64, 64)).astype(np.float32)
        bank = [{"volume": 0, "slice": 2, "noise": noise, "dose": 0.25, "filter": "ramp", "photons": 8e5}]
        pairs = LowDosePairs([volume], bank, {"patch_size": 48, "loss_weighting": weighting}, NORMALIZATION,
                             part="val")
        weight = float(pairs.sample(np.random.default_rng(1))["weight"])
        assert abs(weight - expected) < 0.15 * expected
    with pytest.raises(ValueError, match="inverse_noise"):
        LowDosePairs([volume], bank, {"patch_size": 48, "loss_weighting": {"type": "snr"}}, NORMALIZATION)


def test_a_weighted_diffusion_loss_ignores_a_sample_of_weight_zero():
    from training.trainer import diffusion_loss

    class Constant(torch.nn.Module):  # predicts 0 everywhere: the loss is the target's mean square
        def forward(self, x_t, t, coords=None, condition=None, region=None):
            return torch.zeros_like(x_t)

    abar = torch.linspace(0.999, 0.001, 10)
    image = torch.stack([torch.full((1, 8, 8), 0.5), torch.full((1, 8, 8), 3.0)])
    batch = {"image": image, "coords": torch.zeros(2, 3, 8, 8), "region": torch.zeros(2, dtype=torch.long)}
    steps = torch.tensor([9, 9])  # abar 0.001: v ~ -x0, the target is about the image itself
    one = diffusion_loss(Constant(), {k: v[:1] for k, v in batch.items()}, abar, torch.Generator().manual_seed(0),
                         torch.device("cpu"), timesteps=steps[:1], prediction_type="sample")
    weighted = diffusion_loss(Constant(), dict(batch, weight=torch.tensor([1.0, 0.0])), abar,
                              torch.Generator().manual_seed(0), torch.device("cpu"), timesteps=steps,
                              prediction_type="sample")
    assert float(one) == pytest.approx(0.25) and float(weighted) == pytest.approx(0.25)


def test_ensemble_averages_noise_draws_and_mirrored_views():
    """A model with a fixed left-right and up-down bias and a share of its
    start noise in its estimate: 2 estimates cancel the left-right bias, 4
    both, and averaging divides the noise's share by the count."""
    from types import SimpleNamespace

    from napari_mediffuse.engine.runner import SliceRunner
    from napari_mediffuse.engine.schedulers import DEFAULT_SCHEDULE, alphas_cumprod
    from napari_mediffuse.tasks.common import FLIP_VIEWS, Normalizer, learned_estimate

    rows = torch.linspace(-0.01, 0.01, 16)[:, None]  # +-15 HU in the [-1024, 2048] window
    cols = torch.linspace(-0.02, 0.02, 24)[None, :]  # +-30 HU
    abar = alphas_cumprod(DEFAULT_SCHEDULE)

    def predictor(x, t, *, condition, region):  # the noise that leads to condition + bias + 0.005 x_T
        a = float(abar[int(t)])
        target = condition + rows + cols + 0.005 * x
        return (x - a ** 0.5 * target) / (1.0 - a) ** 0.5

    model = SimpleNamespace(card={}, schedule=DEFAULT_SCHEDULE)
    slices = np.random.default_rng(0).normal(40.0, 20.0, (3, 16, 24)).astype(np.float32)
    norm = Normalizer(NORMALIZATION, slices)
    runner = SliceRunner("cpu", seed=0, batch_size=3)

    def error(ensemble, flips=FLIP_VIEWS):
        return learned_estimate(predictor, model, slices, norm, runner, region_class=0, noise=runner.noise(range(3)),
                                ensemble=ensemble, flips=flips) - slices

    bias = {n: error(n) for n in (1, 2, 4, 64)}
    truth = 1536.0 * (rows + cols).numpy()[None].repeat(3, axis=0)  # the bias in HU
    # one estimate: the bias plus 7.7 HU of noise (0.005 x 1536 HU)
    assert abs(float(np.std(bias[1] - truth)) - 7.7) < 0.8
    # two: the left-right part cancels (what is left varies along the rows only, plus noise / sqrt 2)
    np.testing.assert_allclose(bias[2].mean(axis=(0, 2)), 1536.0 * rows.numpy()[:, 0], atol=3.0)
    np.testing.assert_allclose(bias[2].mean(axis=(0, 1)), 0.0, atol=3.0)
    # 64: both parts cancel and the noise falls to 7.7 / 8 HU
    assert abs(float(np.std(bias[64])) - 7.7 / 8) < 0.25 and abs(float(bias[64].mean())) < 0.2
    # without the mirrored views the bias stays and the noise goes
    unmirrored = error(64, flips=FLIP_VIEWS[:1])
    assert abs(float(np.std(unmirrored - truth)) - 7.7 / 8) < 0.25
    np.testing.assert_allclose(unmirrored.mean(axis=(0, 1)), truth[0].mean(axis=0), atol=0.6)
    with pytest.raises(ValueError, match="at least 1"):
        error(0)


def test_denoise_ensemble_is_recorded_and_checked(chest_crop, denoise_model):
    out = denoise.denoise(chest_crop, method="learned", model=str(denoise_model), ensemble=2,
                          options=RunOptions(seed=1))
    assert out.metadata["parameters"]["ensemble"] == 2
    with pytest.raises(denoise.TaskInputError, match="learned denoiser, not 'bm3d'"):
        denoise.denoise(chest_crop, method="bm3d", ensemble=2)
    with pytest.raises(denoise.TaskInputError, match="at least 1"):
        denoise.denoise(chest_crop, method="learned", model=str(denoise_model), ensemble=0)
