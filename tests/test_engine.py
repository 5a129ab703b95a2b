"""Diffusion engine: position encoding, blending, samplers, checkpoints, registry, devices."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import TINY_ARCHITECTURE
from napari_mediffuse.engine import checkpoint as ckpt
from napari_mediffuse.engine import registry
from napari_mediffuse.engine.devices import autocast_dtype, select_device
from napari_mediffuse.engine.inference import NoisePredictor
from napari_mediffuse.engine.networks import DiffusionNetwork
from napari_mediffuse.engine.position import coordinate_grid, encode_positions
from napari_mediffuse.engine.sampling import (
    ddim_sample,
    make_generator,
    sample_with_scheduler,
    timestep_sequence,
)
from napari_mediffuse.engine.schedulers import alphas_cumprod, timestep_for_noise_level

TINY = TINY_ARCHITECTURE
SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear"}


# -- position encoding -------------------------------------------------------

def test_coordinates_span_minus_one_to_one_over_the_whole_image():
    full = coordinate_grid([(0, 5), (0, 9)], (5, 9))
    assert full.shape == (2, 5, 9)
    assert full[0, 0, 0] == -1 and full[0, -1, 0] == 1
    assert full[1, 0, 0] == -1 and full[1, 0, -1] == 1
    assert full[1, 0, 4] == pytest.approx(0.0)
    # a window carries the coordinates of its pixels in the full image
    window = coordinate_grid([(1, 3), (4, 9)], (5, 9))
    torch.testing.assert_close(window, full[:, 1:3, 4:9])


def test_position_encoding_matches_eq_5_6():
    coords = torch.tensor([0.3, -0.7]).view(1, 2, 1, 1)
    enc = encode_positions(coords, num_frequencies=3)
    assert enc.shape == (1, 12, 1, 1)
    expected = []
    for p in (0.3, -0.7):
        for l in range(3):
            expected += [math.sin(2 ** l * math.pi * p), math.cos(2 ** l * math.pi * p)]
    np.testing.assert_allclose(enc.flatten().numpy(), expected, atol=1e-6)


# -- sliding-window blend ----------------------------------------------------

class _Identity(torch.nn.Module):
    """Network stub returning its input: exposes the blending alone."""

    spatial_dims = 2
    size_multiple = 1
    uses_regions = False

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, sample, timesteps, *, coords=None, condition=None, region=None):
        self.calls.append(coords.clone())
        return sample


def test_sliding_window_blend_returns_constant_image_unchanged():
    net = _Identity()
    predictor = NoisePredictor(net, device="cpu", window=32, overlap=0.5, window_batch=3)
    x = torch.full((2, 1, 100, 77), 0.37)
    out = predictor(x, 500)
    assert len(net.calls) > 1  # it really used windows
    torch.testing.assert_close(out, x)


def test_sliding_window_passes_true_coordinates_and_reassembles_any_image():
    net = _Identity()
    predictor = NoisePredictor(net, device="cpu", window=(24, 40), overlap=0.25)
    x = torch.randn(1, 1, 70, 95, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(predictor(x, 10), x)  # a non-constant image too
    full = coordinate_grid([(0, 70), (0, 95)], (70, 95))
    for coords in net.calls:
        for c in coords:
            # every window's coordinates occur at one place of the full grid
            r0 = int(round((c[0, 0, 0].item() + 1) * 69 / 2))
            c0 = int(round((c[1, 0, 0].item() + 1) * 94 / 2))
            torch.testing.assert_close(c, full[:, r0:r0 + c.shape[1], c0:c0 + c.shape[2]])


@pytest.mark.parametrize("window", [None, (16, 24)])
def test_a_crop_gets_its_place_in_the_whole_image(window):
    # MedDiff-FM's patch-level position: a crop starting at (10, 7.5) of a 70 x 95 image (fractional:
    # a crop resampled to the prior's pixels) gets the whole image's coordinates of its pixels
    net = _Identity()
    predictor = NoisePredictor(net, device="cpu", window=window, overlap=0.25)
    x = torch.randn(2, 1, 30, 40, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(predictor(x, 10, extent=((10, 70), (7.5, 95))), x)
    rows = torch.arange(10, 40, dtype=torch.float32) * 2 / 69 - 1
    cols = (7.5 + torch.arange(40, dtype=torch.float32)) * 2 / 94 - 1
    seen = torch.zeros(30, 40, dtype=torch.bool)
    for coords in net.calls:
        for c in coords:
            r0 = int(round((c[0, 0, 0].item() + 1) * 69 / 2)) - 10
            c0 = int(round((c[1, 0, 0].item() + 1) * 94 / 2 - 7.5))
            h, w = c.shape[1:]
            torch.testing.assert_close(c[0, :, 0], rows[r0:r0 + h])
            torch.testing.assert_close(c[1, 0, :], cols[c0:c0 + w])
            seen[r0:r0 + h, c0:c0 + w] = True
    assert seen.all() and (window is None) == (len(net.calls) == 1)


# -- samplers against known answers ----------------------------------------------

def _gaussian_oracle(mu: float, s: float, abar):
    """Exact E[eps | x_t] when the data is N(mu, s^2) per pixel."""
    def predict(x, t):
        a = float(abar[t])
        return (1 - a) ** 0.5 * (x - a ** 0.5 * mu) / (a * s * s + 1 - a)
    return predict


def test_ddim_with_exact_score_recovers_a_point_mass():
    abar = alphas_cumprod(SCHEDULE)
    target = torch.linspace(-0.8, 0.8, 64).view(1, 1, 8, 8)

    def oracle(x, t):
        a = float(abar[t])
        return (x - a ** 0.5 * target) / (1 - a) ** 0.5

    x_T = torch.randn(target.shape, generator=make_generator(1))
    out = ddim_sample(oracle, x_T, SCHEDULE, steps=10)
    torch.testing.assert_close(out, target, atol=1e-4, rtol=0)


def test_ddpm_ancestral_sampling_matches_gaussian_data_statistics():
    abar = alphas_cumprod(SCHEDULE)
    mu, s = 0.3, 0.2
    gen = make_generator(2)
    x_T = torch.randn((1, 1, 128, 128), generator=gen)
    out = ddim_sample(_gaussian_oracle(mu, s, abar), x_T, SCHEDULE, steps=1000, eta=1.0,
                      generator=gen, clip=None)
    assert out.mean().item() == pytest.approx(mu, abs=0.01)
    assert out.std().item() == pytest.approx(s, rel=0.05)


def test_dpm_solver_with_exact_score_matches_gaussian_statistics():
    cosine = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}
    abar = alphas_cumprod(cosine)
    mu, s = -0.2, 0.5
    stds = {}
    for kind in ("dpm", "ddim"):
        out = sample_with_scheduler(_gaussian_oracle(mu, s, abar), (1, 1, 96, 96), cosine,
                                    kind=kind, steps=20, generator=make_generator(3))
        assert out.mean().item() == pytest.approx(mu, abs=0.02)
        stds[kind] = out.std().item()
    # DPM-Solver++ reaches the data distribution in 20 steps; DDIM is coarser
    assert stds["dpm"] == pytest.approx(s, rel=0.03)
    assert abs(stds["dpm"] - s) < abs(stds["ddim"] - s)


def test_quadratic_timestep_spacing():
    # step i of n at t_end + (t_start - t_end) * ((n - i) / n)^2; t_end itself is not evaluated
    assert timestep_sequence(1000, 4, spacing="quadratic") == [999, 562, 250, 62]
    assert timestep_sequence(1000, 3, spacing="quadratic") == [999, 444, 111]
    assert timestep_sequence(1000, 4, 100, t_end=20, spacing="quadratic") == [100, 65, 40, 25]
    assert timestep_sequence(1000, 4) == [999, 666, 333, 0]  # linear keeps both ends
    with pytest.raises(ValueError, match="spacing"):
        timestep_sequence(1000, 4, spacing="cubic")


def test_timestep_sequence_and_noise_level_matching():
    seq = timestep_sequence(1000, 10)
    assert seq[0] == 999 and seq[-1] == 0 and len(seq) == 10
    assert seq == sorted(seq, reverse=True)
    assert timestep_sequence(1000, 50, t_start=20)[0] == 20
    with pytest.raises(ValueError):
        timestep_sequence(1000, 5, t_start=1000)
    abar = alphas_cumprod(SCHEDULE)
    t = timestep_for_noise_level(0.1, SCHEDULE)
    assert math.sqrt((1 - abar[t]) / abar[t]) == pytest.approx(0.1, rel=0.05)


def test_progress_and_cancel_in_sampler():
    from napari_mediffuse.engine.control import Cancelled

    calls = []
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    ddim_sample(zero, torch.zeros(1, 1, 4, 4), SCHEDULE, steps=5,
                progress=lambda done, total, msg: calls.append((done, total)))
    assert calls == [(i, 5) for i in range(1, 6)]
    state = {"n": 0}

    def cancel_after_two():
        state["n"] += 1
        return state["n"] > 2

    with pytest.raises(Cancelled):
        ddim_sample(zero, torch.zeros(1, 1, 4, 4), SCHEDULE, steps=5, cancel=cancel_after_two)


def test_seed_makes_sampling_reproducible():
    net = DiffusionNetwork(TINY)
    predictor = NoisePredictor(net, device="cpu")
    runs = []
    for _ in range(2):
        gen = make_generator(7)
        x = torch.randn((1, 1, 16, 16), generator=gen)
        runs.append(ddim_sample(predictor, x, SCHEDULE, steps=3, eta=1.0, generator=gen))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


# -- network -------------------------------------------------------------

def test_network_handles_any_size_with_padding_and_conditions():
    net = DiffusionNetwork({**TINY, "condition_channels": 2, "stem_stride": 2})
    predictor = NoisePredictor(net, device="cpu")
    x = torch.randn(3, 1, 37, 50)
    eps = predictor(x, 100, condition=torch.randn(3, 2, 37, 50), region=2)
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    with pytest.raises(ValueError, match="condition channels"):
        predictor(x, 100)


def test_condition_windows_stretch_soft_tissue_and_are_saved(tmp_path):
    from napari_mediffuse.engine.networks import window_channels

    # -250..350 HU of the wide CT window [-1024, 2048] HU (the demo config's values)
    soft = [(-250 + 1024) / 3072 * 2 - 1, (350 + 1024) / 3072 * 2 - 1]
    assert soft == pytest.approx([-0.49609375, -0.10546875])
    hu = torch.tensor([-1000.0, -250.0, 0.0, 50.0, 350.0, 1000.0])
    wide = (hu + 1024) / 3072 * 2 - 1
    stretched = window_channels(wide, *soft)
    # 0 and 50 HU: 0.033 apart in the wide window, 0.167 (= 50 / 300) in the soft one
    torch.testing.assert_close(stretched, torch.tensor([-1.0, -1.0, -1 / 6, 0.0, 1.0, 1.0]))
    arch = {**TINY, "condition_channels": 3, "condition_windows": [soft]}
    net = DiffusionNetwork(arch)
    # one soft-tissue view more for each of the 3 condition channels
    plain = DiffusionNetwork({**TINY, "condition_channels": 3})
    assert net.backbone.conv_in.in_channels - plain.backbone.conv_in.in_channels == 3 * net.stem_stride ** 2
    card = ckpt.make_card(name="w", task="translation", modality="CT", architecture=arch)
    ckpt.save_checkpoint(tmp_path / "w", net, card)
    loaded = ckpt.load_checkpoint(tmp_path / "w").network
    assert loaded.condition_windows == [tuple(soft)]
    x, cond = torch.randn(2, 1, 16, 16), torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, torch.tensor([5, 9]), condition=cond),
                                   net.eval()(x, torch.tensor([5, 9]), condition=cond))
    with pytest.raises(ValueError, match="low < high"):
        DiffusionNetwork({**arch, "condition_windows": [[0.5, 0.1]]})


# -- checkpoint ------------------------------------------------------------

def _save_tiny(folder, **card_changes):
    net = DiffusionNetwork(TINY)
    card = ckpt.make_card(name=card_changes.pop("name", "tiny"), task=card_changes.pop("task", "ct_prior"),
                          modality=card_changes.pop("modality", "CT"), architecture=TINY,
                          schedule=SCHEDULE, pixel_spacing_mm=[3, 3], patch_size=[16, 16], **card_changes)
    ckpt.save_checkpoint(folder, net, card)
    return net


def test_checkpoint_round_trip_without_pickle(tmp_path):
    net = _save_tiny(tmp_path / "tiny", summary="test prior")
    assert (tmp_path / "tiny" / "model.safetensors").is_file()
    card = json.loads((tmp_path / "tiny" / "mediffuse.json").read_text())
    assert card["architecture"]["backbone_config"]["block_out_channels"] == [8, 16]
    assert card["normalization"]["type"] == "hu_window"
    loaded = ckpt.load_checkpoint(tmp_path / "tiny", task="ct_prior", modality="CT")
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.network(x, torch.tensor([3])), net.eval()(x, torch.tensor([3])))
    with pytest.raises(ckpt.CheckpointError, match="exists"):
        _save_tiny(tmp_path / "tiny")


def test_fp16_checkpoint_is_half_the_size(tmp_path):
    net = DiffusionNetwork(TINY)
    card = ckpt.make_card(name="a", task="ct_prior", modality="CT", architecture=TINY)
    ckpt.save_checkpoint(tmp_path / "f32", net, card)
    ckpt.save_checkpoint(tmp_path / "f16", net, card, dtype=torch.float16)
    size = lambda p: (p / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "f16") < 0.6 * size(tmp_path / "f32")
    assert ckpt.load_checkpoint(tmp_path / "f16").network.backbone.conv_in.weight.dtype == torch.float32


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="not a mediffuse checkpoint"):
        ckpt.load_checkpoint(tmp_path)
    _save_tiny(tmp_path / "mr", modality="MR", task="translation")
    with pytest.raises(ckpt.CheckpointError, match="'translation' model; this needs a 'ct_prior'"):
        ckpt.load_checkpoint(tmp_path / "mr", task="ct_prior")
    with pytest.raises(ckpt.CheckpointError, match="trained on MR"):
        ckpt.load_checkpoint(tmp_path / "mr", modality="CT")
    # weights that do not fit the architecture
    card_path = tmp_path / "mr" / "mediffuse.json"
    card = json.loads(card_path.read_text())
    card["architecture"]["backbone_config"]["block_out_channels"] = [8, 32]
    card_path.write_text(json.dumps(card))
    with pytest.raises(ckpt.CheckpointError, match="do not match the architecture"):
        ckpt.load_checkpoint(tmp_path / "mr")
    (tmp_path / "mr" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match="cannot read weights"):
        ckpt.load_checkpoint(tmp_path / "mr")


# -- registry --------------------------------------------------------------

def test_registry_lookup_order_env_then_user_then_bundled(tmp_path, monkeypatch):
    env_dir, user_dir, bundled = tmp_path / "env", tmp_path / "user", tmp_path / "bundled"
    _save_tiny(bundled / "prior", name="prior", summary="bundled one")
    _save_tiny(bundled / "other", name="other")
    _save_tiny(user_dir / "prior", name="prior", summary="user one")
    monkeypatch.setattr(registry, "user_models_dir", lambda: user_dir)
    monkeypatch.setattr(registry, "bundled_models_dir", lambda: bundled)
    monkeypatch.delenv(registry.ENV_VAR, raising=False)

    assert registry.resolve_checkpoint("prior").origin == "user"
    assert registry.resolve_checkpoint("other").origin == "bundled"
    _save_tiny(env_dir / "prior", name="prior", summary="env one")
    monkeypatch.setenv(registry.ENV_VAR, str(env_dir))
    info = registry.resolve_checkpoint("prior")
    assert (info.origin, info.summary) == ("env", "env one")
    assert [i.name for i in registry.list_checkpoints()] == ["prior", "other"]
    # an explicit path wins over everything
    assert registry.resolve_checkpoint(bundled / "prior").origin == "path"
    # default for a task
    assert registry.resolve_checkpoint(task="ct_prior").name == "prior"


def test_a_card_marked_default_is_its_tasks_default_within_its_folder(tmp_path, monkeypatch):
    user_dir, bundled = tmp_path / "user", tmp_path / "bundled"
    _save_tiny(bundled / "a-demo", name="a-demo")
    _save_tiny(bundled / "b-multi", name="b-multi")
    card_path = bundled / "b-multi" / "mediffuse.json"
    card_path.write_text(json.dumps({**json.loads(card_path.read_text()), "default": True}))
    monkeypatch.setattr(registry, "user_models_dir", lambda: user_dir)
    monkeypatch.setattr(registry, "bundled_models_dir", lambda: bundled)
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    # alphabetically a-demo would come first; the card's flag puts b-multi first (lists too)
    assert registry.resolve_checkpoint(task="ct_prior").name == "b-multi"
    assert [i.name for i in registry.list_checkpoints(task="ct_prior")] == ["b-multi", "a-demo"]
    assert registry.resolve_checkpoint("a-demo").name == "a-demo"  # a named model is still found
    # a model the user installed still shadows the bundled default
    _save_tiny(user_dir / "mine", name="mine")
    assert registry.resolve_checkpoint(task="ct_prior").name == "mine"


def test_the_bundled_default_ct_prior_is_the_multi_patient_one(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "user_models_dir", lambda: tmp_path / "no-user-models")
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    assert registry.resolve_checkpoint(task="ct_prior", modality="CT").name == "ct-prior-multi"
    assert registry.resolve_checkpoint("ct-prior-demo", task="ct_prior").name == "ct-prior-demo"


def test_registry_errors_name_what_is_available(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "user_models_dir", lambda: tmp_path / "user")
    monkeypatch.setattr(registry, "bundled_models_dir", lambda: tmp_path / "bundled")
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    _save_tiny(tmp_path / "bundled" / "prior", name="prior")
    with pytest.raises(ckpt.CheckpointError, match=r"no checkpoint named 'nope'; available: prior \(bundled\)"):
        registry.resolve_checkpoint("nope")
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint folder"):
        registry.resolve_checkpoint(str(tmp_path / "missing" / "x"))
    with pytest.raises(ckpt.CheckpointError, match="no translation checkpoint"):
        registry.resolve_checkpoint(task="translation")
    with pytest.raises(ckpt.CheckpointError, match="'ct_prior' model; this needs a 'translation'"):
        registry.resolve_checkpoint("prior", task="translation")


# -- devices -----------------------------------------------------------------

def test_device_selection_logic():
    assert select_device("auto", cuda_available=True, mps_is_available=True).type == "cuda"
    assert select_device("auto", cuda_available=False, mps_is_available=True).type == "mps"
    assert select_device("auto", cuda_available=False, mps_is_available=False).type == "cpu"
    assert select_device("cuda:1", cuda_available=True).index == 1
    with pytest.raises(ValueError, match="CUDA is not available"):
        select_device("cuda", cuda_available=False)
    with pytest.raises(ValueError, match="MPS is not available"):
        select_device("mps", mps_is_available=False)
    with pytest.raises(ValueError, match="unknown device"):
        select_device("tpu")


def test_precision_selection():
    cuda, mps, cpu = torch.device("cuda"), torch.device("mps"), torch.device("cpu")
    assert autocast_dtype(cuda, "auto", bf16_supported=True) == torch.bfloat16
    assert autocast_dtype(cuda, "auto", bf16_supported=False) == torch.float16
    assert autocast_dtype(mps, "auto") == torch.float16
    assert autocast_dtype(cpu, "auto") is None
    assert autocast_dtype(cpu, "bf16") == torch.bfloat16
    with pytest.raises(ValueError):
        autocast_dtype(cpu, "int8")


def test_predictor_converts_v_prediction_to_epsilon():
    """A v-prediction checkpoint gives the samplers true noise estimates."""
    schedule = dict(SCHEDULE, prediction_type="v_prediction")
    abar = alphas_cumprod(schedule)

    class VOracle(torch.nn.Module):
        spatial_dims, size_multiple, uses_regions = 2, 1, False

        def forward(self, sample, timesteps, *, coords=None, condition=None, region=None):
            a = float(abar[int(timesteps[0])])
            x0 = torch.full_like(sample, 0.25)
            eps = (sample - a ** 0.5 * x0) / (1 - a) ** 0.5
            return a ** 0.5 * eps - (1 - a) ** 0.5 * x0  # v = sqrt(a) eps - sqrt(1-a) x0

    x0 = torch.full((1, 1, 8, 8), 0.25)
    noise = torch.randn(x0.shape, generator=make_generator(0))
    t = 700
    a = float(abar[t])
    x_t = a ** 0.5 * x0 + (1 - a) ** 0.5 * noise
    predictor = NoisePredictor(VOracle(), device="cpu", schedule=schedule)
    torch.testing.assert_close(predictor(x_t, t), noise, atol=1e-4, rtol=0)
    out = ddim_sample(predictor, torch.randn(x0.shape, generator=make_generator(1)), schedule, steps=10)
    torch.testing.assert_close(out, x0, atol=1e-3, rtol=0)


def test_3d_network_by_configuration():
    """MONAI's DiffusionModelUNet in 3D with x, y, z position channels."""
    config = {
        "backbone": "monai.DiffusionModelUNet", "spatial_dims": 3, "stem_stride": 1,
        "position_frequencies": 2,
        "backbone_config": {"channels": [8, 16], "attention_levels": [False, False],
                            "num_res_blocks": 1, "norm_num_groups": 4},
    }
    net = DiffusionNetwork(config)
    assert net.backbone.conv_in.conv.in_channels == 1 + 2 * 2 * 3  # image + sin/cos x L x 3 axes
    x = torch.randn(2, 1, 12, 16, 20)
    eps = NoisePredictor(net, device="cpu")(x, 10, region=3)
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    with pytest.raises(ValueError, match="2D"):
        DiffusionNetwork({**config, "backbone": "diffusers.UNet2DModel"})


def test_axis_correlated_noise_is_standard_normal_with_the_asked_neighbour_correlation():
    from napari_mediffuse.engine.sampling import AxisCorrelatedNoise, make_generator, randn

    noise = randn((1, 1, 40, 64, 64), AxisCorrelatedNoise(make_generator(0), 0.9), "cpu")
    assert noise.shape == (1, 1, 40, 64, 64)
    flat = noise[0, 0].reshape(40, -1)
    assert abs(float(flat.std()) - 1.0) < 0.02 and abs(float(flat.mean())) < 0.02
    assert abs(float(flat[0].std()) - 1.0) < 0.03 and abs(float(flat[-1].std()) - 1.0) < 0.03  # every slice N(0, 1)

    def corr(d):
        return float(np.mean([np.corrcoef(flat[k], flat[k + d])[0, 1] for k in range(40 - d)]))

    assert corr(1) == pytest.approx(0.9, abs=0.02) and corr(2) == pytest.approx(0.81, abs=0.03)
    # within a slice (and along the other axes) the noise stays white
    rows = noise[0, 0, :, :-1, :].reshape(-1).numpy(), noise[0, 0, :, 1:, :].reshape(-1).numpy()
    assert abs(np.corrcoef(*rows)[0, 1]) < 0.02
    # the same seed gives the same draw; rho = 0 is the generator's plain noise
    again = randn((1, 1, 40, 64, 64), AxisCorrelatedNoise(make_generator(0), 0.9), "cpu")
    assert torch.equal(noise, again)
    plain = AxisCorrelatedNoise(make_generator(3), 0.0).randn((2, 5, 6))
    assert torch.equal(plain, torch.randn((2, 5, 6), generator=make_generator(3)))
    # another axis
    along_last = AxisCorrelatedNoise(make_generator(1), 0.95, axis=-1).randn((200, 50))
    assert np.corrcoef(along_last[:, :-1].reshape(-1), along_last[:, 1:].reshape(-1))[0, 1] > 0.9
    for rho in (1.0, -0.5):
        with pytest.raises(ValueError, match="rho must be in"):
            AxisCorrelatedNoise(make_generator(0), rho)
