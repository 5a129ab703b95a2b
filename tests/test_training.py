"""training/: data sampling, tiny train -> export -> load -> sample, 2-process DDP."""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from napari_mediffuse.engine.checkpoint import CheckpointError, load_checkpoint
from napari_mediffuse.engine.inference import NoisePredictor
from napari_mediffuse.engine.sampling import ddim_sample, make_generator
from training.data import MultiLevelSlices, image_level, load_volumes, patch_level
from training.trainer import load_config, read_log, train

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "training" / "configs" / "ct_prior_tiny.yaml"


@pytest.fixture
def tiny_config(ct_small_path):
    config = load_config(TINY_CONFIG)
    config["data"]["train"] = [{"path": str(ct_small_path), "region": "abdomen"}]
    return config


def test_volumes_are_normalised_resampled_and_split(tiny_config):
    (vol,) = load_volumes(tiny_config["data"], tiny_config["normalization"])
    # 122 x 101 x 30 voxels at 3 mm resampled to 6 mm: (S, P, L) = (15, 50/51, 61)
    assert vol.data.shape[0] == 15 and vol.data.shape[2] == 61
    assert vol.data.min() >= -1 and vol.data.max() <= 1
    # air (-1024 HU) maps to -1 in the [-1024, 2048] window
    assert np.percentile(vol.data, 1) == pytest.approx(-1.0, abs=0.02)
    assert vol.holdout_start == 12  # top 20 % of 15 axial slices held out
    assert vol.region == 3  # abdomen


def test_patch_coordinates_locate_the_patch_in_the_slice():
    slice_2d = np.arange(40 * 50, dtype=np.float32).reshape(40, 50)
    crop, coords = patch_level(slice_2d, 16, np.random.default_rng(0))
    r0 = int(round((coords[0, 0, 0] + 1) * 39 / 2))
    c0 = int(round((coords[1, 0, 0] + 1) * 49 / 2))
    np.testing.assert_array_equal(crop, slice_2d[r0:r0 + 16, c0:c0 + 16])
    image, grid = image_level(slice_2d, 16)
    assert image.shape == (16, 16) and grid[0, 0, 0] == -1 and grid[1, -1, -1] == 1


def test_samples_are_reproducible_and_differ_between_ranks(tiny_config):
    volumes = load_volumes(tiny_config["data"], tiny_config["normalization"])
    a = next(iter(MultiLevelSlices(volumes, tiny_config["data"], seed=0, rank=0)))
    b = next(iter(MultiLevelSlices(volumes, tiny_config["data"], seed=0, rank=0)))
    c = next(iter(MultiLevelSlices(volumes, tiny_config["data"], seed=0, rank=1)))
    torch.testing.assert_close(a["image"], b["image"])
    assert not torch.equal(a["image"], c["image"])
    assert a["image"].shape == (1, 16, 16) and a["coords"].shape == (2, 16, 16)


def test_tiny_train_export_load_sample(tmp_path, tiny_config):
    folder = train(tiny_config, tmp_path / "run", device="cpu", command="pytest")
    records = read_log(tmp_path / "run")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert any("val_loss" in r for r in records)

    ckpt = load_checkpoint(folder, task="ct_prior", modality="CT")
    assert ckpt.card["training"]["steps"] == 6
    assert ckpt.card["patch_size"] == [16, 16] and ckpt.card["pixel_spacing_mm"] == [6.0, 6.0]
    assert ckpt.card["metrics"]["validation_loss"] is not None
    predictor = NoisePredictor(ckpt.network, device="cpu")
    gen = make_generator(0)
    out = ddim_sample(lambda x, t: predictor(x, t, region=3), torch.randn((2, 1, 24, 20), generator=gen),
                      ckpt.schedule, steps=3)
    assert out.shape == (2, 1, 24, 20) and out.abs().max() <= 1

    from PIL import Image

    from training.report import loss_curve

    png = loss_curve(tmp_path / "run", tmp_path / "loss.png", width=300, height=200)
    assert Image.open(png).size == (300, 200)

    # export states the regions its evaluation found it good for; an unknown region is refused
    from training.__main__ import main

    assert main(["export", str(tmp_path / "run"), "--output", str(tmp_path / "export"), "--regions", "abdomen",
                 "abdomen", "--skip-evaluation"]) == 0
    assert load_checkpoint(tmp_path / "export").card["domain"]["regions"] == ["abdomen"]
    for wrong in ("chest", "thorax", "unknown"):  # not trained on, not a region, no region (turns checks off)
        assert main(["export", str(tmp_path / "run"), "--output", str(tmp_path / "bad"), "--regions", wrong]) == 2
    assert not (tmp_path / "bad").exists()

    # resume continues the step count rather than starting again
    tiny_config["train"]["max_steps"] = 8
    train(tiny_config, tmp_path / "run", resume=True, device="cpu")
    steps = [r["step"] for r in read_log(tmp_path / "run") if "loss" in r]
    assert steps[-2:] == [7, 8]

    # warm start: another run (other prediction type) starts from these weights
    warm = copy.deepcopy(tiny_config)
    warm["schedule"]["prediction_type"] = "sample"
    warm["train"].update(init_from=str(folder), max_steps=1, learning_rate=0.0, warmup_steps=0)
    warm_folder = train(warm, tmp_path / "warm", device="cpu")
    start, again = load_checkpoint(folder).network.state_dict(), load_checkpoint(warm_folder).network.state_dict()
    for key in start:  # learning rate 0: the weights are the initial ones
        torch.testing.assert_close(again[key], start[key])
    assert load_checkpoint(warm_folder).schedule["prediction_type"] == "sample"
    provenance = load_checkpoint(warm_folder).card["training"]["init_from"]
    assert provenance["path"] == str(folder) and provenance["steps"] == 8  # the resumed run's card

    # a checkpoint of another network is refused with its path in the message
    other = copy.deepcopy(warm)
    other["architecture"]["backbone_config"]["block_out_channels"] = [16, 16]
    with pytest.raises(CheckpointError, match="init_from .*architecture differs"):
        train(other, tmp_path / "other", device="cpu")


def test_config_base_is_merged_key_by_key(tmp_path):
    (tmp_path / "parent.yaml").write_text(
        "name: parent\nschedule: {prediction_type: v_prediction, num_train_timesteps: 1000}\n"
        "data: {orientations: {axial: 0.5, coronal: 0.5}, spacing_mm: 3.0}\ntrain: {max_steps: 100}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text(
        "base: ../parent.yaml\nschedule: {prediction_type: sample}\ndata: {orientations: {coronal: 0.0}}\n"
        "train: {init_from: somewhere}\n")
    config = load_config(tmp_path / "sub" / "child.yaml")
    assert config["name"] == "parent" and "base" not in config
    assert config["schedule"] == {"prediction_type": "sample", "num_train_timesteps": 1000}
    assert config["data"] == {"orientations": {"axial": 0.5, "coronal": 0.0}, "spacing_mm": 3.0}
    assert config["train"] == {"max_steps": 100, "init_from": "somewhere"}
    # the demo fine-tune config states only what it changes
    clean = load_config(REPO / "training" / "configs" / "translate_ct2mr_clean.yaml")
    stage1 = load_config(REPO / "training" / "configs" / "translate_ct2mr.yaml")
    assert clean["architecture"] == stage1["architecture"] and clean["data"]["mr_target"] == "clean"
    assert clean["data"]["pairs"] == stage1["data"]["pairs"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_training_on_cpu(tmp_path, ct_small_path):
    config = TINY_CONFIG.read_text().replace("../shared/data/ct/abdomen_ct_3mm_small.nii.gz", str(ct_small_path))
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(config)
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
         "-m", "training", "train", "--config", str(config_path), "--output", str(tmp_path / "ddp"),
         "--device", "cpu", "--max-steps", "3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "ddp" / "ema")
    assert ckpt.card["training"]["processes"] == 2
    assert ckpt.card["training"]["steps"] == 3
    state = torch.load(tmp_path / "ddp" / "state.pt", weights_only=True)
    assert state["step"] == 3
    records = [json.loads(x) for x in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 3  # only rank 0 logs: no duplicate lines
    assert len([r for r in records if "loss" in r]) == 3
    # train() itself refuses the run's folder without resume, before any process group exists (no rank
    # waits for another): the job stops at once and the run is untouched
    weights = (tmp_path / "ddp" / "ema" / "model.safetensors").read_bytes()
    script = tmp_path / "train_again.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
                      "from training.trainer import load_config, train\n"
                      f"train(load_config({str(config_path)!r}), {str(tmp_path / 'ddp')!r}, device='cpu')\n")
    again = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), str(script)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=120)
    # (torchrun stops the other rank once one fails, so one refusal may be all that is printed)
    assert again.returncode != 0 and "training.trainer.RunExistsError:" in again.stderr, again.stderr[-3000:]
    assert (tmp_path / "ddp" / "ema" / "model.safetensors").read_bytes() == weights
    assert torch.load(tmp_path / "ddp" / "state.pt", weights_only=True)["step"] == 3


def _write_ct(path: Path, shape=(12, 10, 8), spacing=(2.0, 1.0, 1.0), value=40) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.full(shape, value, dtype=np.int16)
    nib.save(nib.Nifti1Image(data, np.diag(list(spacing) + [1.0])), str(path))
    return path


def test_config_with_missing_file_or_patient_in_both_splits_is_refused(tmp_path, capsys):
    from training.__main__ import main
    from training.data import ConfigError, check_data_config

    for n in (1, 2):
        _write_ct(tmp_path / "train" / f"pt_{n}" / "ct.nii.gz")
        _write_ct(tmp_path / "train" / f"pt_{n}" / "structures.nii.gz")
    _write_ct(tmp_path / "validation" / "pt_3" / "ct.nii.gz")
    data = {"train": [{"path": str(tmp_path / "train"), "glob": "*/ct.nii.gz", "region": "head-neck"}],
            "validation": [{"path": str(tmp_path / "validation"), "glob": "*/ct.nii.gz"}]}
    # the glob keeps the structures out; patients are named by their folders
    assert check_data_config(data) == {"train": ["pt_1", "pt_2"], "validation": ["pt_3"], "evaluation_only": []}

    # the same patient (folder pt_2) in the validation split is refused, naming both files
    _write_ct(tmp_path / "validation" / "pt_2" / "ct.nii.gz")
    with pytest.raises(ConfigError, match=r"patient 'pt_2' is in data.train \(.*train/pt_2/ct.nii.gz\) "
                                          r"and in data.validation"):
        check_data_config(data)
    # the same file named in training and as evaluation-only
    single = {"train": [str(tmp_path / "train" / "pt_1" / "ct.nii.gz")],
              "evaluation_only": [str(tmp_path / "train" / "pt_1" / "ct.nii.gz")]}
    with pytest.raises(ConfigError, match="evaluation_only"):
        check_data_config(single)

    # a missing file stops `python -m training train` with one line naming it, before any output is written
    config = tmp_path / "bad.yaml"
    config.write_text(f"name: bad\ntask: ct_prior\nmodality: CT\ndata:\n  train:\n"
                      f"    - path: {tmp_path / 'nowhere.nii.gz'}\n  patch_size: 16\n")
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nowhere.nii.gz not found" in err and str(config) in err
    assert not (tmp_path / "run").exists()
    # and the trainer itself refuses before creating its output folder
    with pytest.raises(ConfigError, match="pt_2"):
        train({"name": "x", "task": "ct_prior", "modality": "CT", "data": data, "train": {}}, tmp_path / "run2")
    assert not (tmp_path / "run2").exists()


def test_multi_resolution_slices_and_region_weights(tmp_path):
    from training.data import (draw_pixel_size, excluded_blocks, plane_spacing, resample_plane,
                               volume_probabilities)

    # a coronal slice of a 0.9 x 0.9 x 2.5 mm chest CT is never drawn finer than 2.5 mm
    rng = np.random.default_rng(0)
    spacing = plane_spacing((2.5, 0.9, 0.9), "coronal")
    assert spacing == (2.5, 0.9)
    drawn = [draw_pixel_size(rng, spacing, (0.6, 4.0)) for _ in range(200)]
    assert min(drawn) >= 2.5 and max(drawn) <= 4.0
    axial = [draw_pixel_size(rng, (0.9, 0.9), (0.6, 4.0)) for _ in range(400)]
    assert min(axial) >= 0.9 and np.median(axial) == pytest.approx(np.sqrt(0.9 * 4.0), rel=0.15)  # log-uniform
    assert draw_pixel_size(rng, (4.7, 3.0), (0.6, 4.0)) == pytest.approx(4.7)  # a 4.7 mm neck box stays native

    # resampling keeps the extent in mm: 100 x 50 pixels of 1 x 2 mm -> 50 x 50 pixels of 2 mm
    plane = np.zeros((100, 50), np.float32)
    plane[:, 25:] = 1.0
    out = resample_plane(plane, (1.0, 2.0), 2.0)
    assert out.shape == (50, 50) and out[:, :24].max() == 0 and out[:, 26:].min() == 1

    # a lung tumour on axial slices 32-34 of 5 mm slices with a 15 mm margin: slices 29-37 are never drawn
    mask = np.zeros((48, 4, 4), bool)
    mask[32:35, 1, 1] = True
    assert excluded_blocks(mask, 5.0, 15.0, 4) == [slice(0, 29), slice(38, 48)]

    # orientation fixes: a marker at the right edge of an axial slice comes to its top row, spacings follow
    from training.data import ConfigError, fix_orientation

    box = np.zeros((3, 4, 6), np.float32)
    box[0, 1, 5] = 1.0  # slice 0, row 1, last column
    turned, spacing = fix_orientation(box, (2.5, 4.0, 3.0), ["rot90_PL", "flip_S"])
    assert turned.shape == (3, 6, 4) and spacing == (2.5, 3.0, 4.0)
    assert turned[2, 0, 1] == 1.0 and turned.sum() == 1.0
    with pytest.raises(ConfigError, match="unknown orientation_fix 'mirror'"):
        fix_orientation(box, (1, 1, 1), ["mirror"])

    # region weights: 3 neck boxes share 0.5, one abdomen gets 0.5, whatever their sizes
    p = volume_probabilities([10, 10, 20, 5], [1, 1, 1, 3], {"head-neck": 0.5, "abdomen": 0.5, "chest": 0.3})
    np.testing.assert_allclose(p, [0.125, 0.125, 0.25, 0.5])

    # the stream: anisotropic volumes, one region each, 16-px samples with coordinates
    from training.data import TrainingVolume

    noise = np.random.default_rng(1)
    volumes = [TrainingVolume(data=noise.uniform(-1, 1, (20, 40, 40)).astype(np.float32), region=1, source="a",
                              holdout_start=20, spacing_mm=(2.5, 0.9, 0.9)),
               TrainingVolume(data=noise.uniform(-1, 1, (30, 20, 20)).astype(np.float32), region=3, source="b",
                              holdout_start=30, spacing_mm=(3.0, 3.0, 3.0))]
    cfg = {"patch_size": 16, "pixel_sizes_mm": [0.6, 4.0], "augment": True, "image_level_probability": 0.5,
           "orientations": {"axial": 0.5, "coronal": 0.5}, "region_weights": {"head-neck": 0.5, "abdomen": 0.5}}
    stream = MultiLevelSlices(volumes, cfg, seed=0)
    batch = stream.fixed_batch(40)
    assert batch["image"].shape == (40, 1, 16, 16) and batch["coords"].shape == (40, 2, 16, 16)
    assert 8 < int((batch["region"] == 3).sum()) < 32
    # the exported card states the pixel-size range as its domain (no single pixel spacing)
    from napari_mediffuse.engine.networks import DiffusionNetwork
    from napari_mediffuse.tasks.domain import model_domain
    from training.trainer import export_ema

    from conftest import TINY_ARCHITECTURE

    config = {"name": "multi", "task": "ct_prior", "modality": "CT", "normalization": {"type": "hu_window"},
              "data": dict(cfg, train=[{"path": "x.nii.gz", "region": "head-neck"}]), "train": {"batch_size": 2},
              "architecture": TINY_ARCHITECTURE}
    card = load_checkpoint(export_ema(config, DiffusionNetwork(TINY_ARCHITECTURE), tmp_path / "run" / "ema",
                                      step=1, seconds=1.0)).card
    assert card["pixel_spacing_mm"] is None
    assert model_domain(card)["pixel_spacing_mm"] == [0.6, 4.0] and model_domain(card)["regions"] == ["head-neck"]

    # a resumed run draws a new stream, not the first run's samples again
    first = next(iter(stream))["image"]
    stream.start_step = 1000
    assert not torch.equal(first, next(iter(stream))["image"])


def test_noise_power_spectrum_of_white_smoothed_and_simulated_noise():
    from scipy import ndimage

    from training.degrade import low_dose_noise
    from training.noise_power import nps_2d, nps_summary, radial_nps, uniform_roi_corners

    rng = np.random.default_rng(0)
    # white noise of 20 HU on 0.5 mm pixels: flat NPS at sigma^2 dx^2 = 100 HU^2 mm^2, integral = variance
    white = rng.normal(0.0, 20.0, (64, 32, 32))
    nps, freqs = nps_2d(white, 0.5)
    assert freqs.max() == pytest.approx(1.0 - 1 / 16.0) and freqs.min() == pytest.approx(-1.0)  # Nyquist 1/mm
    f, radial = radial_nps(nps, freqs)
    assert np.median(radial) == pytest.approx(100.0, rel=0.1)
    summary = nps_summary(nps, freqs)
    assert summary["std_hu"] == pytest.approx(20.0, rel=0.1)  # the quadratic trend takes 6 of 1024 dof
    # smoothing moves the power to low frequencies
    smooth = np.stack([ndimage.gaussian_filter(r, 1.0) for r in white])
    assert nps_summary(*nps_2d(smooth, 0.5))["mean_frequency_per_mm"] < 0.6 * summary["mean_frequency_per_mm"]

    # ROIs only where the local mean is soft tissue: a 100 HU square in air
    slice_hu = np.full((40, 40), -1000.0)
    slice_hu[8:32, 8:32] = 100.0
    corners = uniform_roi_corners(slice_hu, 8)
    assert corners and all(8 <= r and r + 8 <= 32 and 8 <= c and c + 8 <= 32 for r, c in corners)

    # simulated dose noise in a 288 mm water disc: its NPS integral scales as sqrt(1/dose - 1)
    # (the extra noise of a dose reduction), sqrt(3) = 1.73 between a quarter and half dose
    yy, xx = np.mgrid[:96, :96]
    disc = np.where(np.hypot(yy - 47.5, xx - 47.5) < 48, 0.0, -1000.0).astype(np.float32)

    def noise_nps(dose, filter_name="ramp"):
        gen = np.random.default_rng(5)
        rois = np.concatenate([np.stack([n[r:r + 16, c:c + 16] for r in (24, 40, 56) for c in (24, 40, 56)])
                               for n in [low_dose_noise(disc, 3.0, dose, rng=gen, filter_name=filter_name)
                                         for _ in range(3)]])
        return nps_summary(*nps_2d(rois, 3.0))

    quarter, half = noise_nps(0.25), noise_nps(0.5)
    assert 10.0 < quarter["std_hu"] < 60.0  # tens of HU, the design of DEFAULT_PHOTONS
    assert quarter["std_hu"] / half["std_hu"] == pytest.approx(np.sqrt(3.0), rel=0.15)
    # an apodised reconstruction filter (Shepp-Logan) gives less and coarser-grained noise than the ramp
    apodised = noise_nps(0.25, "shepp-logan")
    assert apodised["std_hu"] < 0.9 * quarter["std_hu"]
    assert apodised["mean_frequency_per_mm"] < quarter["mean_frequency_per_mm"]


def test_one_step_denoising_on_held_out_patients_of_two_sizes_and_regions(tmp_path):
    from napari_mediffuse.engine.networks import DiffusionNetwork
    from training.evaluate_prior import one_step_denoising

    from conftest import TINY_ARCHITECTURE

    _write_ct(tmp_path / "neck" / "pt_9" / "ct.nii.gz", shape=(10, 24, 20), spacing=(3.0, 4.5, 4.5))
    _write_ct(tmp_path / "chest.nii.gz", shape=(10, 40, 36), spacing=(1.0, 0.8, 0.8))
    config = {"data": {"train": [str(tmp_path / "chest.nii.gz")],
                       "validation": [{"path": str(tmp_path / "neck"), "glob": "*/ct.nii.gz", "region": "head-neck"},
                                      {"path": str(tmp_path / "chest.nii.gz"), "region": "chest"}]},
              "normalization": {"type": "hu_window", "low": -1024.0, "high": 2048.0}}
    torch.manual_seed(0)
    results = one_step_denoising(DiffusionNetwork(TINY_ARCHITECTURE), config, noise_hu=(50.0,), max_slices=3)
    entry = results["noise_50HU"]
    assert entry["slices"] == 6 and set(results["by_region"]) == {"head-neck", "chest"}
    assert results["by_region"]["chest"]["noise_50HU"]["slices"] == 3
    # 50 HU of Gaussian noise on a uniform 40 HU scan: 20 log10(400 / 50) = 18.1 dB in [-160, 240] HU
    assert entry["psnr_noisy_soft"] == pytest.approx(18.06, abs=0.3)


def test_sigterm_saves_the_state_and_resume_continues(tmp_path, ct_small_path):
    import signal
    import time

    config = TINY_CONFIG.read_text().replace("../shared/data/ct/abdomen_ct_3mm_small.nii.gz", str(ct_small_path))
    config = config.replace("max_steps: 6", "max_steps: 100000").replace("checkpoint_every: 3",
                                                                         "checkpoint_every: 100000")
    (tmp_path / "tiny.yaml").write_text(config)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "training", "train", "--config", str(tmp_path / "tiny.yaml"),
               "--output", str(run), "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (
                (run / "log.jsonl").exists() and len(read_log(run)) >= 4):
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
    finally:
        process.kill()
    state = torch.load(run / "state.pt", weights_only=True)
    logged = max(r["step"] for r in read_log(run) if "loss" in r)
    assert state["step"] >= logged >= 3  # the step in progress finished and was saved, not lost
    # without --resume the run is not started over on top of it: one line, rc 2, nothing touched
    weights = (run / "ema" / "model.safetensors").read_bytes()
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"error: {run}: holds a run already (state.pt); pass --resume to continue it, or give another --output"]
    assert (run / "ema" / "model.safetensors").read_bytes() == weights
    assert torch.load(run / "state.pt", weights_only=True)["step"] == state["step"]
    # --resume continues from it with a 'resumed' record
    subprocess.run(command + ["--resume", "--max-steps", str(state["step"] + 2)], cwd=REPO, env=env,
                   check=True, capture_output=True, timeout=240)
    records = read_log(run)
    assert {"step": state["step"], "resumed": True}.items() <= next(r for r in records if r.get("resumed")).items()
    assert max(r["step"] for r in records if "loss" in r) == state["step"] + 2


def _write_labels(path: Path, labels: np.ndarray, spacing=(2.0, 1.0, 1.0)) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), np.diag(list(spacing) + [1.0])), str(path))
    return path


def test_anatomy_channels_travel_with_the_image_and_are_unknown_without_structures(tmp_path, capsys):
    import nibabel as nib

    from training.__main__ import main
    from training.data import ConfigError, check_data_config

    # two neck patients: a 'mandible' (label 7) of bone at 1000 HU in soft tissue at 40 HU; the
    # cord (label 2) at 40 HU; and a chest scan without structures
    shape, spacing = (12, 40, 36), (2.0, 1.0, 1.0)
    for n in (1, 2):
        ct = np.full(shape, 40, np.int16)
        labels = np.zeros(shape, np.uint8)
        ct[:, 5:15, 8:30] = 1000
        labels[:, 5:15, 8:30] = 7
        labels[:, 25:30, 15:20] = 2
        folder = tmp_path / "neck" / f"pt_{n}"
        folder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(ct, np.diag(list(spacing) + [1.0])), str(folder / "ct.nii.gz"))
        _write_labels(folder / "structures.nii.gz", labels, spacing)
    _write_ct(tmp_path / "chest.nii.gz", shape=(10, 30, 30), spacing=(2.0, 1.0, 1.0), value=-300)
    data = {"train": [{"path": str(tmp_path / "neck"), "glob": "*/ct.nii.gz", "structures": "structures.nii.gz",
                       "region": "head-neck"},
                      {"path": str(tmp_path / "chest.nii.gz"), "region": "chest"}],
            "anatomy_channels": {"mandible": [7], "cns": [1, 2]}, "anatomy_dropout": 0.3,
            "patch_size": 16, "pixel_sizes_mm": [1.0, 3.0], "image_level_probability": 0.25, "augment": True,
            "orientations": {"axial": 0.5, "coronal": 0.25, "sagittal": 0.25}}
    normalization = {"type": "hu_window", "low": -1024.0, "high": 2048.0}
    assert check_data_config(data)["train"] == ["chest", "pt_1", "pt_2"]
    volumes = load_volumes(data, normalization)
    assert [v.structures is not None for v in volumes] == [True, True, False]

    stream = MultiLevelSlices(volumes, data, seed=0)
    rng, augment = np.random.default_rng(0), stream.augmentation(0)
    items = [stream.sample(rng, augment) for _ in range(300)]
    hu = torch.stack([it["image"] for it in items])[:, 0].numpy() * 1536.0 + 512.0
    condition = torch.stack([it["condition"] for it in items]).numpy()
    region = np.array([int(it["region"]) for it in items])
    assert condition.shape == (300, 2, 16, 16)
    known = np.abs(condition).reshape(300, -1).max(axis=1) > 0
    # chest samples never carry structures; about 30 % of the neck samples are dropped to 'unknown'
    assert not known[region == 2].any()
    assert 0.15 < 1 - known[region == 1].mean() < 0.45
    # the planes are cropped, resampled and warped with the image: bone under the mandible plane,
    # soft tissue under the cord plane and outside the mandible
    mandible = condition[:, 0] > 0.5
    cord = condition[:, 1] > 0.5
    outside = (condition[:, 0] < -0.5) & (hu > -500)
    assert mandible.sum() > 500 and cord.sum() > 100
    assert hu[mandible].mean() > 900 and abs(hu[cord].mean() - 40) < 60 and abs(hu[outside].mean() - 40) < 60
    # validation keeps every scan's structures and draws the same slices as a stream without them
    val = MultiLevelSlices(volumes, data, part="train", seed=0)
    val.anatomy_dropout = 0.0
    plain = MultiLevelSlices(volumes, dict(data, anatomy_channels={}), seed=0)
    np.testing.assert_array_equal(val.fixed_batch(8)["image"], plain.fixed_batch(8)["image"])
    assert "condition" not in plain.fixed_batch(2)

    # bad input, before any training: a missing label map, a label map on another grid
    (tmp_path / "neck" / "pt_2" / "structures.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"structures .*pt_2/structures.nii.gz of .*pt_2/ct.nii.gz not found"):
        check_data_config(data)
    config = tmp_path / "anatomy.yaml"
    import yaml

    config.write_text(yaml.safe_dump({"name": "a", "task": "ct_prior", "modality": "CT", "data": data}))
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pt_2/structures.nii.gz" in err and not (tmp_path / "run").exists()
    _write_labels(tmp_path / "neck" / "pt_2" / "structures.nii.gz", np.zeros((12, 40, 30)), spacing)
    with pytest.raises(ConfigError, match=r"structures .*pt_2/structures.nii.gz have shape \(30, 40, 12\), "
                                          r"their scan \(36, 40, 12\)"):
        load_volumes(data, normalization)


def test_one_step_denoising_gives_a_prior_its_structures_or_unknown(tmp_path):
    from napari_mediffuse.engine.networks import DiffusionNetwork
    from training.evaluate_prior import heldout_slices, one_step_denoising

    from conftest import TINY_ARCHITECTURE

    shape, spacing = (10, 24, 20), (3.0, 2.0, 2.0)
    labels = np.zeros(shape, np.uint8)
    labels[:, 4:10, :] = 7  # every axial slice: 10 x 6 voxels
    _write_ct(tmp_path / "neck" / "pt_9" / "ct.nii.gz", shape=shape, spacing=spacing)
    _write_labels(tmp_path / "neck" / "pt_9" / "structures.nii.gz", labels, spacing)
    config = {"data": {"train": [str(tmp_path / "neck" / "pt_9" / "ct.nii.gz")],
                       "validation": [{"path": str(tmp_path / "neck"), "glob": "*/ct.nii.gz",
                                       "structures": "structures.nii.gz", "region": "head-neck"}],
                       "anatomy_channels": {"mandible": [7]}},
              "normalization": {"type": "hu_window", "low": -1024.0, "high": 2048.0}}
    picks = heldout_slices(config, config["normalization"], max_slices=2)
    assert len(picks) == 2 and all(p[2] is not None and (p[2] == 7).sum() == 60 for p in picks)

    torch.manual_seed(0)
    network = DiffusionNetwork(dict(TINY_ARCHITECTURE, condition_channels=1))
    with torch.no_grad():  # make the network's output depend on its condition
        network.backbone.conv_in.weight[:, 1].fill_(0.5)
    given = one_step_denoising(network, config, noise_hu=(50.0,), max_slices=2)["noise_50HU"]
    unknown = one_step_denoising(network, config, noise_hu=(50.0,), max_slices=2, structures=False)["noise_50HU"]
    # the same noise either way: only the denoised PSNR changes
    assert given["psnr_noisy_soft"] == unknown["psnr_noisy_soft"]
    assert given["psnr_denoised_soft"] != pytest.approx(unknown["psnr_denoised_soft"], abs=1e-3)


def test_prior_evaluation_compares_models_with_and_without_structures(tmp_path, monkeypatch):
    from training.evaluate.__main__ import main as evaluate_main

    from conftest import save_tiny_checkpoint

    shape, spacing = (10, 24, 20), (3.0, 2.0, 2.0)
    labels = np.zeros(shape, np.uint8)
    labels[:, 4:10, :] = 7
    _write_ct(tmp_path / "neck" / "pt_9" / "ct.nii.gz", shape=shape, spacing=spacing)
    _write_labels(tmp_path / "neck" / "pt_9" / "structures.nii.gz", labels, spacing)
    _write_ct(tmp_path / "chest.nii.gz", shape=(40, 40, 10), spacing=(1.0, 1.0, 2.0), value=0)  # 40 x 40 axial
    import yaml

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"train": [str(tmp_path / "chest.nii.gz")],
                 "validation": [{"path": str(tmp_path / "neck"), "glob": "*/ct.nii.gz",
                                 "structures": "structures.nii.gz", "region": "head-neck"},
                                {"path": str(tmp_path / "chest.nii.gz"), "region": "chest"}],
                 "anatomy_channels": {"mandible": [7]}},
        "normalization": {"type": "hu_window", "low": -1024.0, "high": 2048.0}}))
    save_tiny_checkpoint(tmp_path / "plain")
    save_tiny_checkpoint(tmp_path / "anatomy", condition_channels=1, seed=1)
    out = tmp_path / "out"
    argv = ["prior", "--config", str(config), "--model", f"plain={tmp_path / 'plain'}",
            f"anatomy={tmp_path / 'anatomy'}", "--max-slices", "2", "--noise-hu", "50", "--out", str(out)]
    monkeypatch.setattr("sys.argv", ["training.evaluate"] + argv)  # what the table's header records
    assert evaluate_main(argv) == 0
    assert torch.is_grad_enabled()  # the evaluation leaves autograd as it found it
    report = json.loads((out / "prior.json").read_text())
    assert list(report["results"]) == ["plain", "anatomy, structures given", "anatomy, structures unknown"]
    chest = [r["by_region"]["chest"]["noise_50HU"] for r in report["results"].values()]
    # the same slices and noise for every row: the noisy PSNR is one value (50 HU on a uniform
    # 0 HU scan: 20 log10(400 / 50) = 18.1 dB in [-160, 240] HU)
    assert len({c["psnr_noisy_soft"] for c in chest}) == 1 and chest[0]["slices"] == 2
    assert chest[0]["psnr_noisy_soft"] == pytest.approx(18.06, abs=0.3)
    # the chest has no structures: 'given' and 'unknown' are the same input there
    assert chest[1]["psnr_denoised_soft"] == chest[2]["psnr_denoised_soft"]
    table = (out / "prior_table.md").read_text().splitlines()
    assert table[0].startswith("<!-- python -m training.evaluate prior --config")
    assert any(line.startswith("| anatomy, structures given |") for line in table)
    from skimage import io as skio

    picture = skio.imread(str(out / "prior.png"))
    # one axial neck slice (24 x 10 pixels in display orientation), 6 tiles with 4-pixel gaps:
    # clean, noisy, the three rows' estimates, the structures
    assert picture.shape == (24, 6 * 14) and "structures" in (out / "prior.txt").read_text()


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(),
                    reason="needs a machine whose only device is the CPU")
def test_train_cli_refuses_a_gpu_the_machine_lacks_in_one_line(tmp_path):
    from napari_mediffuse.plugin import sample_ct_path

    config = TINY_CONFIG.read_text().replace("../shared/data/ct/abdomen_ct_3mm_small.nii.gz", str(sample_ct_path()))
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(config)
    result = subprocess.run([sys.executable, "-m", "training", "train", "--config", str(config_path),
                             "--output", str(tmp_path / "run"), "--device", "cuda"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: --device: device 'cuda' requested but CUDA is not available on this machine; devices here: cpu"]
    assert not (tmp_path / "run").exists()


def test_train_cli_refuses_a_segmentation_objective_on_other_data_in_one_line(tmp_path, tiny_config, capsys):
    from training.__main__ import main

    tiny_config["train"]["objective"] = "segmentation"  # a CT prior's data: no lesion masks to learn
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in tiny_config.items() if k != "config_path"}))
    assert main(["train", "--config", str(path), "--output", str(tmp_path / "run"), "--check"]) == 2
    err = capsys.readouterr().err
    assert "train.objective: segmentation goes with" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
