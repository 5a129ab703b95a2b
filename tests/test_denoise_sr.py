"""Low-dose denoising and thick -> thin super-resolution (issue 4).

DiffPIR data steps against hand computation, the slab operator and its
adjoint, DiffPIR with an oracle prior, geometry of the super-resolved
volume, the degradation simulators, the classical baselines on real CT, and
the ``mediffuse denoise`` / ``mediffuse sr`` commands end to end.
"""
from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_mediffuse import io
from napari_mediffuse.cli import main
from napari_mediffuse.engine.schedulers import alphas_cumprod
from napari_mediffuse.tasks.common import Normalizer, RunOptions, TaskInputError


def to_tensor(batch):
    """(B, H, W) array -> (B, 1, H, W) float32 CPU tensor."""
    return torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))[:, None]
from napari_mediffuse.tasks.denoise import denoise, diffpir_denoise, estimate_noise_hu
from napari_mediffuse.tasks.diffpir import SlabOperator, denoise_data_step, rho_t, sigma_t
from napari_mediffuse.tasks.superres import (
    check_factor,
    cubic_along,
    diffpir_planes,
    slab_operator,
    super_resolve,
)
from training.degrade import low_dose_noise, simulate_low_dose, simulate_thick_slices
from training.metrics import psnr_hu

SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}
CT_RULE = {"type": "hu_window", "low": -1024.0, "high": 2048.0}
SOFT = (-160.0, 240.0)


class _Card:
    """The parts of a Checkpoint that diffpir_planes reads."""

    card = {"pixel_spacing_mm": [3.0, 3.0], "training": {}}
    normalization = CT_RULE
    schedule = SCHEDULE


def oracle_predictor(clean: torch.Tensor, schedule=SCHEDULE):
    """The point-mass prior at ``clean``: eps = (x_t - sqrt(abar) x*) / sqrt(1 - abar)."""
    abar = alphas_cumprod(schedule)

    def predict(x, t, region=None):
        a = float(abar[t])
        return (x - a ** 0.5 * clean) / (1 - a) ** 0.5

    return predict


# -- DiffPIR data steps ----------------------------------------------------------------

def test_rho_and_denoise_data_step_match_hand_computation():
    # sigma_t^2 = (1 - 0.8) / 0.8 = 0.25; rho = 2 * 0.1^2 / 0.25 = 0.08
    assert sigma_t(0.8) == pytest.approx(0.5)
    assert rho_t(0.8, 0.1, 2.0) == pytest.approx(0.08)
    x0 = torch.tensor([0.0, 1.0, 2.0])
    y = torch.tensor([1.0, 1.0, 1.0])
    # (y + rho x0) / (1 + rho) with rho = 0.5
    np.testing.assert_allclose(denoise_data_step(x0, y, 0.5).numpy(), [2 / 3, 1.0, 4 / 3], rtol=1e-6)
    # rho -> 0 trusts the measurement, rho -> inf the prior
    np.testing.assert_allclose(denoise_data_step(x0, y, 0.0).numpy(), y.numpy())
    np.testing.assert_allclose(denoise_data_step(x0, y, 1e9).numpy(), x0.numpy(), atol=1e-6)


def test_sr_data_step_matches_hand_computation():
    op = SlabOperator.slab_average(2, 2)
    np.testing.assert_allclose(op.weights, [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    x0 = np.array([1.0, 2.0, 3.0, 4.0])
    y = np.array([2.0, 5.0])
    # H x0 = [1.5, 3.5], residual [0.5, 1.5], H H^T = I / 2
    # rho = 0.5: x0 + H^T (I/2 + I/2)^-1 r = x0 + [.25, .25, .75, .75]
    np.testing.assert_allclose(op.data_step(x0, y, 0.5), [1.25, 2.25, 3.75, 4.75])
    # rho = 0: exact fit, residual spread over each slab
    exact = op.data_step(x0, y, 0.0)
    np.testing.assert_allclose(exact, [1.5, 2.5, 4.5, 5.5])
    np.testing.assert_allclose(op.forward(exact), y)


def test_sr_data_step_is_meddiff_formula_for_orthonormal_rows_and_the_proximal_solution():
    rng = np.random.default_rng(0)
    # rows of sqrt(k) * slab average are orthonormal: H H^T = I
    k = 4
    ortho = SlabOperator(SlabOperator.slab_average(3, k).weights * math.sqrt(k))
    np.testing.assert_allclose(ortho.weights @ ortho.weights.T, np.eye(3), atol=1e-12)
    x0, y, rho = rng.normal(size=12), rng.normal(size=3), 0.7
    meddiff = x0 + ortho.adjoint(y - ortho.forward(x0)) / (1 + rho)  # section 3.5.1
    np.testing.assert_allclose(ortho.data_step(x0, y, rho), meddiff, atol=1e-12)
    # general overlapping slabs: the gradient of ||y - Hx||^2 + rho ||x - x0||^2 vanishes
    op = SlabOperator.from_geometry([0.0, 2.0, 4.0], 3.0, np.arange(-1.0, 6.0), 1.0)
    x0, y = rng.normal(size=7), rng.normal(size=3)
    x = op.data_step(x0, y, rho)
    gradient = op.adjoint(op.forward(x) - y) + rho * (x - x0)
    np.testing.assert_allclose(gradient, 0.0, atol=1e-12)
    # the smooth (oblique) variant also fits y exactly at rho = 0
    p = np.random.default_rng(1).random((7, 3))
    np.testing.assert_allclose(op.forward(op.data_step(x0, y, 0.0, right_inverse=p)), y, atol=1e-12)


def test_slab_operator_and_adjoint():
    rng = np.random.default_rng(0)
    # overlapping slabs (thickness 7 mm every 5 mm) over 1 mm pixels, clipped at the ends
    op = SlabOperator.from_geometry(np.arange(6) * 5.0, 7.0, np.arange(-2, 28) * 1.0, 1.0)
    np.testing.assert_allclose(op.weights.sum(axis=1), 1.0)
    assert op.weights[1, (np.arange(-2, 28) > 1.5) & (np.arange(-2, 28) < 8.5)].sum() == pytest.approx(1.0)
    x = rng.normal(size=(3, 30, 4))
    y = rng.normal(size=(3, 6, 4))
    lhs = np.sum(op.forward(x, axis=1) * y)
    rhs = np.sum(x * op.adjoint(y, axis=1))
    assert lhs == pytest.approx(rhs, rel=1e-12)
    # torch and numpy agree (the sampler works on tensors)
    xt = torch.from_numpy(x)
    np.testing.assert_allclose(op.forward(xt, axis=1).numpy(), op.forward(x, axis=1), atol=1e-12)
    np.testing.assert_allclose(op.adjoint(torch.from_numpy(y), axis=1).numpy(), op.adjoint(y, axis=1),
                               atol=1e-12)
    # a plain slab average: thick = mean of factor thin slices
    thin = rng.normal(size=(10, 2))
    np.testing.assert_allclose(SlabOperator.slab_average(2, 5).forward(thin), thin.reshape(2, 5, 2).mean(1))
    np.testing.assert_allclose(SlabOperator.slab_average(2, 5).pseudo_inverse(np.array([1.0, 3.0])),
                               [1.0] * 5 + [3.0] * 5)


def test_sampler_can_stop_at_t_end_and_return_the_estimate_there():
    from napari_mediffuse.engine.sampling import ddim_sample, timestep_sequence

    assert timestep_sequence(1000, 4, 30, t_end=12) == [30, 24, 18, 12]
    assert timestep_sequence(1000, 4, 30) == [30, 20, 10, 0]  # default unchanged
    assert timestep_sequence(1000, 50, 30, t_end=28) == [30, 29, 28]
    seen = []
    clean = torch.full((1, 1, 4, 4), 0.3)
    out = ddim_sample(oracle_predictor(clean), torch.zeros(1, 1, 4, 4), SCHEDULE, steps=3, t_start=40,
                      t_end=20, x0_hook=lambda x0, t: seen.append(t) or x0)
    assert seen == [40, 30, 20]
    torch.testing.assert_close(out, clean)


# -- DiffPIR with an oracle prior -----------------------------------------------------------

def test_diffpir_denoising_with_oracle_prior_recovers_the_clean_slice(ct_small_path):
    volume = io.read(ct_small_path)[0]
    clean_hu = np.asarray(volume.data[10:12], dtype=np.float32)
    noisy_hu = clean_hu + np.random.default_rng(0).normal(0, 40, clean_hu.shape).astype(np.float32)
    norm = Normalizer(CT_RULE, clean_hu)
    clean = to_tensor(norm.forward(clean_hu))
    y = to_tensor(norm.forward(noisy_hu))
    sigma_n = estimate_noise_hu(noisy_hu) / norm.units_per_step
    assert np.all(np.abs(sigma_n * norm.units_per_step - 40) < 8)  # the estimate is close to 40 HU
    out = diffpir_denoise(oracle_predictor(clean), y, sigma_n, SCHEDULE, steps=5, lam=1.0,
                          generator=torch.Generator().manual_seed(0))
    denoised = norm.inverse(out[:, 0].numpy())
    before = psnr_hu(noisy_hu, clean_hu, SOFT)
    after = psnr_hu(denoised, clean_hu, SOFT)
    assert after > before + 10, (before, after)


def test_diffpir_super_resolution_with_oracle_prior_beats_cubic(ct_small_path):
    volume = io.read(ct_small_path)[0]
    k = 3
    thick = simulate_thick_slices(volume, k)
    n = thick.data.shape[0] * k
    ref = np.moveaxis(np.asarray(volume.data[:n], dtype=np.float32), 1, 0)[[40, 60]]  # coronal planes
    thick_planes = np.moveaxis(np.asarray(thick.data, dtype=np.float32), 1, 0)[[40, 60]]
    initial = cubic_along(thick_planes, k, axis=1)
    op = slab_operator(thick.data.shape[0], k, 9.0, 9.0)
    norm = Normalizer(CT_RULE, ref)
    clean_flipped = to_tensor(norm.forward(ref[:, ::-1]))  # the prior sees rows superior-up
    out = diffpir_planes(thick_planes, op, initial, predictor=oracle_predictor(clean_flipped),
                         checkpoint=_Card(), plane_spacing_mm=(3.0, 3.0), steps=8, noise_hu=5.0)
    cubic_psnr = psnr_hu(initial, ref, SOFT)
    assert psnr_hu(out, ref, SOFT) > cubic_psnr + 10
    # and the result is consistent with the thick slices
    np.testing.assert_allclose(op.forward(out, axis=1), thick_planes, atol=0.05)


# -- geometry ---------------------------------------------------------------------------------

def test_sr_output_geometry_on_real_ct(ct_path):
    volume = io.read(ct_path)[0]
    volume = volume.with_data(volume.data[:20], affine=volume.affine)  # 20 slices at 3 mm
    result = super_resolve(volume, factor=3, method="cubic")
    assert result.data.shape == (60,) + volume.data.shape[1:]
    np.testing.assert_allclose(result.spacing, (1.0, 3.0, 3.0), atol=1e-9)
    # first thin slice centre one thin spacing below the first thick centre (slab model, k = 3)
    first_thick = volume.affine[:3, 3]
    first_thin = result.affine[:3, 3]
    np.testing.assert_allclose(first_thin, first_thick - volume.affine[:3, 0] / 3.0, atol=1e-9)
    # the thin centres of each slab average to its thick centre
    centres = [(result.affine @ [i, 0, 0, 1])[:3] for i in range(3)]
    np.testing.assert_allclose(np.mean(centres, axis=0), first_thick, atol=1e-9)
    assert result.metadata["parameters"]["thin_spacing_mm"] == pytest.approx(1.0)
    # thick slices simulated from thin ones super-resolve back onto the thin grid
    thick = simulate_thick_slices(volume, 4)
    assert thick.spacing[0] == pytest.approx(12.0)
    back = super_resolve(thick, factor=4, method="sinc")
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-9)
    assert back.data.shape == volume.data.shape


def test_factor_checks():
    volume = io.Volume(np.zeros((4, 40, 40), np.float32), np.diag([3.0, 3.0, 3.0, 1.0]), modality="CT")
    assert check_factor(volume, 5) == 5 and check_factor(volume, 3.0) == 3
    for bad in (1, 2.5, 0, -3, "x"):
        with pytest.raises(TaskInputError, match="whole number"):
            check_factor(volume, bad)
    with pytest.raises(TaskInputError, match="does not fit the slice spacing"):
        check_factor(volume, 12)  # 0.25 mm slices


# -- degradations ------------------------------------------------------------------------------

def test_low_dose_noise_grows_as_one_over_sqrt_dose_in_a_uniform_region():
    y, x = np.mgrid[:64, :64]
    phantom = np.where((y - 31.5) ** 2 + (x - 31.5) ** 2 < 28 ** 2, 40.0, -1000.0).astype(np.float32)
    inner = (y - 31.5) ** 2 + (x - 31.5) ** 2 < 15 ** 2
    stds = {}
    for dose in (0.5, 0.25, 0.125):
        noise = np.stack([low_dose_noise(phantom, 3.0, dose, rng=np.random.default_rng(s)) for s in range(3)])
        stds[dose] = float(noise[:, inner].std())
        assert abs(float(noise[:, inner].mean())) < 0.2 * stds[dose]  # no bias
    # the added noise brings the total variance from v to v / dose: std of the
    # added part ~ sqrt(1 / dose - 1), i.e. ~ 1 / sqrt(dose) for low doses
    for low, high in ((0.25, 0.5), (0.125, 0.25)):
        expected = math.sqrt((1 / low - 1) / (1 / high - 1))
        assert stds[low] / stds[high] == pytest.approx(expected, rel=0.15)
    assert stds[0.125] > stds[0.25] > stds[0.5] > 0
    np.testing.assert_array_equal(low_dose_noise(phantom, 3.0, 1.0), 0.0)
    with pytest.raises(ValueError):
        low_dose_noise(phantom, 3.0, 0.0)


def test_thick_slices_are_slab_means(ct_small_path):
    volume = io.read(ct_small_path)[0]
    thick = simulate_thick_slices(volume, 4)
    expected = np.asarray(volume.data[:28], np.float32).reshape(7, 4, *volume.data.shape[1:]).mean(1)
    np.testing.assert_allclose(thick.data, expected, atol=1e-3)
    # centred on its slab: thick centre 0 = mean of thin centres 0..3
    np.testing.assert_allclose(thick.affine[:3, 3], volume.affine[:3, 3] + 1.5 * volume.affine[:3, 0])
    assert thick.spacing[0] == pytest.approx(12.0) and thick.metadata["slice_thickness_mm"] == 12.0


# -- baselines on real CT ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["bm3d", "nlm"])
def test_classical_denoisers_improve_psnr_on_simulated_low_dose(ct_small_path, method):
    volume = io.read(ct_small_path)[0]
    clean = np.asarray(volume.data[14:16], dtype=np.float32)
    low = simulate_low_dose(clean, 3.0, 0.25, photons=4e5, seed=0)
    degraded = volume.with_data(low, name="low dose", affine=volume.affine)
    result = denoise(degraded, method=method, options=RunOptions(device="cpu"))
    before, after = psnr_hu(low, clean, SOFT), psnr_hu(result.data, clean, SOFT)
    assert after > before + 1.0, (before, after)
    np.testing.assert_array_equal(result.affine, degraded.affine)
    assert result.name.endswith(f"denoised ({method})")
    assert result.metadata["parameters"]["noise_estimated"] is True


# -- CLI end to end ------------------------------------------------------------------------------

def _crop(ct_small_path, tmp_path, shape=(4, 48, 48), name="crop.nii.gz"):
    volume = io.read(ct_small_path)[0]
    s, p, l = volume.data.shape
    start = (s // 2 - shape[0] // 2, p // 2 - shape[1] // 2, l // 2 - shape[2] // 2)
    data = volume.data[tuple(slice(a, a + n) for a, n in zip(start, shape))]
    affine = volume.affine.copy()
    affine[:3, 3] = (volume.affine @ [*start, 1])[:3]
    path = tmp_path / name
    io.write_nifti(volume.with_data(np.ascontiguousarray(data), affine=affine), path)
    return path


def test_cli_denoise_writes_nifti_on_the_input_grid(ct_small_path, tmp_path, tiny_models, capsys):
    src = _crop(ct_small_path, tmp_path)
    for method in ("diffusion", "bm3d", "nlm"):
        out = tmp_path / f"den_{method}.nii.gz"
        rc = main(["denoise", str(src), "-o", str(out), "--method", method, "--steps", "2", "--seed", "0",
                   "--device", "cpu", "--batch-size", "4"])
        assert rc == 0, capsys.readouterr().err
        assert out.exists()
        np.testing.assert_allclose(nib.load(str(out)).affine, nib.load(str(src)).affine, atol=1e-4)
        result = io.read(out)[0]
        assert result.data.shape == (4, 48, 48) and result.modality == "CT"
        assert np.all(np.isfinite(result.data))


def test_cli_sr_writes_the_new_spacing(ct_small_path, tmp_path, tiny_models, capsys):
    src = _crop(ct_small_path, tmp_path)
    source = io.read(src)[0]
    for method in ("diffusion", "cubic"):
        out = tmp_path / f"sr_{method}.nii.gz"
        rc = main(["sr", str(src), "-o", str(out), "--factor", "3", "--method", method, "--steps", "2",
                   "--seed", "0", "--device", "cpu", "--batch-size", "64"])
        assert rc == 0, capsys.readouterr().err
        result = io.read(out)[0]
        assert result.data.shape == (12, 48, 48)
        np.testing.assert_allclose(result.spacing, (1.0, 3.0, 3.0), atol=1e-4)
        # same RAS space: the first thin centre is 1 mm below the first thick centre
        np.testing.assert_allclose(result.affine[:3, 3], source.affine[:3, 3] - source.affine[:3, 0] / 3,
                                   atol=1e-3)


def test_cli_bad_inputs_give_a_clear_error_and_write_nothing(ct_small_path, mr_lps_path, tmp_path,
                                                             tiny_models, capsys):
    out = tmp_path / "out.nii.gz"
    # an MR volume
    assert main(["denoise", str(mr_lps_path), "-o", str(out)]) == 2
    assert "needs a CT scan" in capsys.readouterr().err and not out.exists()
    # a 2D image
    volume = io.read(ct_small_path)[0]
    flat = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(volume.data[10]).T.astype(np.int16), np.diag([3.0, 3.0, 3.0, 1.0])),
             str(flat))
    assert main(["denoise", str(flat), "-o", str(out)]) == 2
    assert "2D image" in capsys.readouterr().err and not out.exists()
    # a factor that does not fit the 3 mm spacing, or is not a whole number
    src = _crop(ct_small_path, tmp_path)
    assert main(["sr", str(src), "-o", str(out), "--factor", "20"]) == 2
    assert "does not fit the slice spacing" in capsys.readouterr().err and not out.exists()
    assert main(["sr", str(src), "-o", str(out), "--factor", "2.5"]) == 2
    assert "whole number" in capsys.readouterr().err and not out.exists()
    # a volume too small for the model
    small = _crop(ct_small_path, tmp_path, shape=(4, 16, 16), name="small.nii.gz")
    assert main(["denoise", str(small), "-o", str(out)]) == 2
    assert "too small for the model" in capsys.readouterr().err and not out.exists()
    assert main(["sr", str(small), "-o", str(out), "--factor", "2"]) == 2
    assert "too small for the model" in capsys.readouterr().err and not out.exists()


def test_denoise_evaluation_with_white_noise_scores_methods_against_the_reference(ct_small_path, tmp_path):
    """``--white-noise-hu`` replaces the low-dose simulation by white noise of that std."""
    from training.evaluate.restoration import evaluate_denoising, write_outputs

    report, images = evaluate_denoising(ct_small_path, methods=("nlm",), slices=2, holdout_fraction=0.5,
                                        white_noise_hu=30.0, seed=3)
    assert report["white_noise_hu"] == 30.0 and report["dose_fraction"] is None
    assert report["added_noise_std_hu"] == pytest.approx(30.0, abs=0.5)
    inp, nlm = report["results"]["input"], report["results"]["nlm"]
    # 30 HU of noise in the 400 HU window: 22.5 dB where the whole noise counts; clipping to
    # the window removes it outside (air, bone), so the PSNR is higher, but at most as if
    # only the pixels well inside the window (>= 2 sigma from its edges) carried noise
    reference = images["reference"]
    inside = np.mean((reference > -160 + 60) & (reference < 240 - 60))
    assert 22.5 < inp["psnr_soft"] < 22.5 - 10 * np.log10(inside)
    assert nlm["psnr_soft_gain"] > 1.0 and nlm["psnr_soft"] == pytest.approx(inp["psnr_soft"] + nlm["psnr_soft_gain"])
    report["command"] = "python -m training.evaluate denoise --white-noise-hu 30"
    write_outputs(report, images, tmp_path, "white")
    assert "input (+30 HU white noise)" in (tmp_path / "white.md").read_text()
