"""Volume synthesis: plane handling, geometry, seeds, bad input, CLI."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mediffuse import io
from napari_mediffuse.cli import main as cli_main
from napari_mediffuse.tasks.common import RunOptions, TaskInputError
from napari_mediffuse.tasks.synthesize import (
    alternating_plane_predictor,
    plane_stack,
    synthesize,
    volume_from_stack,
)
from training.data import take_slice


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_plane_stacks_match_training_slices_and_invert(plane):
    vol = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    stack = plane_stack(torch.from_numpy(vol), plane)
    axis = {"axial": 0, "coronal": 1, "sagittal": 2}[plane]
    for index in range(vol.shape[axis]):
        np.testing.assert_array_equal(stack[index, 0].numpy(), take_slice(vol, plane, index))
    np.testing.assert_array_equal(volume_from_stack(stack, plane).numpy(), vol)


def test_alternating_predictor_cycles_planes_and_batches():
    seen = []

    def fake(chunk, t, region=None):
        seen.append((chunk.shape[0],) + tuple(chunk.shape[2:]))
        return chunk * 0 + t

    predict = alternating_plane_predictor(fake, batch_size=2)
    x = torch.zeros(1, 1, 4, 5, 6)
    for t in (1, 2, 3):
        out = predict(x, t)
        assert out.shape == x.shape and torch.all(out == t)
    # 4 axial (5x6) slices, then 5 coronal (4x6), then 6 sagittal (4x5), 2 per batch
    assert seen == [(2, 5, 6)] * 2 + [(2, 4, 6), (2, 4, 6), (1, 4, 6)] + [(2, 4, 5)] * 3


def test_synthesis_geometry_seed_and_hu(tiny_models):
    opts = RunOptions(device="cpu", seed=3, batch_size=8)
    vol = synthesize((16, 20, 18), model="tiny-ct-prior", steps=2, options=opts)
    assert vol.data.shape == (16, 20, 18) and vol.modality == "CT"
    assert vol.spacing == pytest.approx((3.0, 3.0, 3.0))
    assert io.volume.axcodes(vol.affine) == ("S", "P", "L")
    # centred on the RAS origin
    centre = vol.affine @ np.array([7.5, 9.5, 8.5, 1.0])
    np.testing.assert_allclose(centre[:3], 0, atol=1e-9)
    assert vol.metadata["synthetic"] is True
    assert -1024 <= vol.data.min() and vol.data.max() <= 2048  # inside the prior's HU window
    again = synthesize((16, 20, 18), model="tiny-ct-prior", steps=2, options=opts)
    np.testing.assert_array_equal(vol.data, again.data)
    other = synthesize((16, 20, 18), model="tiny-ct-prior", steps=2,
                       options=RunOptions(device="cpu", seed=4))
    assert not np.array_equal(vol.data, other.data)


def test_synthesis_resamples_to_requested_spacing(tiny_models):
    vol = synthesize((36, 16, 16), spacing=(1.5, 3.0, 3.0), model="tiny-ct-prior", steps=1,
                     options=RunOptions(device="cpu"))
    assert vol.data.shape == (36, 16, 16)
    assert vol.spacing == pytest.approx((1.5, 3.0, 3.0))
    assert vol.metadata["parameters"]["spacing_mm"] == [1.5, 3.0, 3.0]


def test_synthesis_bad_input(tiny_models):
    with pytest.raises(TaskInputError, match="at least the model's patch size"):
        synthesize((8, 32, 32), model="tiny-ct-prior", options=RunOptions(device="cpu"))
    with pytest.raises(TaskInputError, match="knows the regions"):
        synthesize((16, 16, 16), region="knee", model="tiny-ct-prior", options=RunOptions(device="cpu"))


def test_synthesize_cli(tiny_models, tmp_path, capsys):
    out = tmp_path / "synth.nii.gz"
    assert cli_main(["synthesize", "-o", str(out), "--shape", "16", "16", "20", "--steps", "1",
                     "--seed", "1", "--device", "cpu", "--model", "tiny-ct-prior"]) == 0
    vol = io.read_nifti(out)
    assert vol.data.shape == (16, 16, 20) and vol.modality == "CT"
    assert cli_main(["synthesize", "-o", str(out), "--shape", "16", "16", "20"]) == 2  # exists
    assert "exists" in capsys.readouterr().err
    bad = tmp_path / "small.nii.gz"
    assert cli_main(["synthesize", "-o", str(bad), "--shape", "4", "16", "16", "--model", "tiny-ct-prior",
                     "--device", "cpu"]) == 2
    assert not bad.exists()


def test_synthesis_metrics_on_known_volumes(ct_small_path):
    from training.evaluate.synthesis import adjacent_slice_difference, histogram_distance, ms_ssim_between

    real = io.read_nifti(ct_small_path).data.astype(np.float32)
    shifted = real + 50.0 * (real > -500)
    assert histogram_distance(shifted, real) == pytest.approx(50.0, abs=1.0)
    ramp = np.zeros((5, 8, 8), np.float32) + np.arange(5)[:, None, None] * 10.0
    assert adjacent_slice_difference(ramp) == pytest.approx(10.0)
    # real CT is continuous: shuffling its slices makes neighbours differ much more
    shuffled = real[np.random.default_rng(0).permutation(len(real))]
    assert adjacent_slice_difference(shuffled) > 2 * adjacent_slice_difference(real)
    assert ms_ssim_between(real, real) == pytest.approx(1.0, abs=1e-4)
    assert ms_ssim_between(real, shuffled) < 0.95
