"""The 2D image-prior recipe: image folders, training, sampling, CLI."""
from __future__ import annotations

import numpy as np
import pytest
from skimage import io as skio

from napari_mediffuse.cli import main as cli_main
from napari_mediffuse.tasks.common import RunOptions, TaskInputError
from napari_mediffuse.tasks.sample_images import sample_images
from training.images import fit_square, load_images
from training.trainer import train


def test_image_folder_reads_pictures_and_volume_slices(tmp_path, mr_lps_path):
    picture = np.zeros((40, 60), dtype=np.uint8)
    picture[10:30, 20:40] = 255
    skio.imsave(str(tmp_path / "xray.png"), picture, check_contrast=False)
    images = load_images(tmp_path, 32)
    assert images.shape == (1, 32, 32)
    assert images.min() == pytest.approx(-1.0) and images.max() == pytest.approx(1.0)
    # aspect kept: a 40x60 picture is padded to 60x60, so the top rows are background
    assert np.all(images[0, :4] == -1.0)
    mr = load_images(mr_lps_path, 32)
    assert 5 <= len(mr) <= 20  # axial slices with enough foreground out of 20
    assert mr.min() >= -1 and mr.max() <= 1


def test_fit_square_keeps_content_centred():
    image = np.zeros((10, 20), dtype=np.float32)
    image[:, 9:11] = 1.0
    out = fit_square(image, 20)
    assert out.shape == (20, 20)
    assert out[10, 10] > 0.5 and out[2, 10] == 0.0


@pytest.fixture
def image_prior_dir(tmp_path, mr_lps_path, monkeypatch):
    from napari_mediffuse.engine import registry
    from conftest import TINY_ARCHITECTURE

    config = {
        "name": "tiny-image-prior", "task": "image_prior", "modality": "MR", "summary": "tiny", "seed": 0,
        "data": {"kind": "image_folder", "train": [{"path": str(mr_lps_path)}], "image_size": 16,
                 "holdout_fraction": 0.2},
        "normalization": {"type": "robust_percentile", "low_pct": 0.5, "high_pct": 99.5},
        "schedule": {"num_train_timesteps": 1000, "beta_schedule": "linear"},
        "architecture": dict(TINY_ARCHITECTURE, position_frequencies=0, num_regions=0),
        "train": {"batch_size": 4, "learning_rate": 1e-3, "warmup_steps": 1, "max_steps": 3, "log_every": 1,
                  "validate_every": 3, "checkpoint_every": 3, "validation_samples": 2},
    }
    folder = train(config, tmp_path / "run", device="cpu")
    monkeypatch.setenv(registry.ENV_VAR, str(tmp_path / "run"))
    monkeypatch.setattr(registry, "user_models_dir", lambda: tmp_path / "none")
    monkeypatch.setattr(registry, "bundled_models_dir", lambda: tmp_path / "none2")
    return folder


def test_train_and_sample_image_prior(image_prior_dir):
    images = sample_images(3, model=str(image_prior_dir), steps=2, options=RunOptions(device="cpu", seed=1,
                                                                                       batch_size=2))
    assert images.shape == (3, 16, 16) and images.min() >= 0 and images.max() <= 1
    again = sample_images(3, model=str(image_prior_dir), steps=2, options=RunOptions(device="cpu", seed=1,
                                                                                      batch_size=2))
    np.testing.assert_array_equal(images, again)
    with pytest.raises(TaskInputError):
        sample_images(0, model=str(image_prior_dir))


def test_sample_images_cli(image_prior_dir, tmp_path):
    out = tmp_path / "samples"
    assert cli_main(["sample-images", "-o", str(out), "--count", "2", "--steps", "2", "--device", "cpu",
                     "--model", str(image_prior_dir)]) == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == 2 and skio.imread(str(files[0])).shape == (16, 16)


def test_bundled_brain_mr_prior_draws_brain_slices():
    """The shipped demo prior draws skull-stripped brain slices: dark air around
    a bright, centred head, not noise (the failure of an under-trained prior)."""
    images = sample_images(4, model="brain-mr-128-demo", steps=20,
                           options=RunOptions(device="cpu", seed=0, batch_size=4))
    assert images.shape == (4, 128, 128)
    for image in images:
        corners = np.concatenate([image[:16, :16].ravel(), image[:16, -16:].ravel(),
                                  image[-16:, :16].ravel(), image[-16:, -16:].ravel()])
        centre = image[48:80, 48:80]
        assert np.median(corners) < 0.05, "air around the head should be black"
        assert np.mean(corners > 0.2) < 0.05, "no noise in the background"
        assert centre.mean() > 0.1, "tissue at the centre"  # every real training slice: > 0.12
