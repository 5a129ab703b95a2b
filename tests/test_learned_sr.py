"""Learned thick -> thin super-resolution: its training pairs, its warm start
from the CT prior, and the task's ``method='learned'`` on real CT slabs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mediffuse import io
from napari_mediffuse.engine.checkpoint import CheckpointError
from napari_mediffuse.engine.networks import DiffusionNetwork
from napari_mediffuse.tasks import superres
from napari_mediffuse.tasks.common import RunOptions
from napari_mediffuse.tasks.diffpir import SlabOperator

from conftest import TINY_ARCHITECTURE, chest_ct_centre_crop, save_tiny_checkpoint
from training.data import TrainingVolume
from training.degrade import simulate_thick_slices
from training.thick_thin import ThickThinPlanes, factors_for, thick_and_cubic
from training.trainer import draw_timesteps, init_weights

SR_CARD = dict(task="super_resolution", schedule={"beta_schedule": "squaredcos_cap_v2",
                                                  "prediction_type": "v_prediction"})


# -- training pairs ------------------------------------------------------------------

def test_thick_and_cubic_follow_the_slab_model():
    rng = np.random.default_rng(0)
    thin = rng.normal(size=(23, 4, 5)).astype(np.float32)
    covered, cubic = thick_and_cubic(thin, 5)
    assert covered.shape == cubic.shape == (20, 4, 5)  # 4 slabs of 5; 3 slices left over
    thick = covered.reshape(4, 5, 4, 5).mean(axis=1)
    # the cubic spline passes through each thick slice at its centre (the middle thin slice)
    np.testing.assert_allclose(cubic[2::5], thick, atol=1e-5)


def test_thin_slabs_of_a_linear_ramp_come_back_exactly():
    # HU rising 10 per slice: the slab average of a line is its centre value, and the
    # cubic spline reproduces a line, so the condition equals the truth away from the
    # edges (where the spline's mirrored boundary bends it; that decays 0.27x a slab)
    ramp = (np.arange(70, dtype=np.float32) * 10.0 / 1536.0)[:, None, None] * np.ones((1, 70, 70), np.float32)
    volume = TrainingVolume(data=ramp - 0.5, region=2, source="ramp", holdout_start=60, spacing_mm=(1.0, 0.8, 0.8))
    stream = ThickThinPlanes([volume], {"patch_size": 16, "factors": [3], "max_thick_mm": 6.0})
    covered, cubic = stream.pairs[0][2:]
    assert covered.shape[0] == 60  # the training part only: the superior 10 slices are held out
    np.testing.assert_allclose(cubic[18:-18], covered[18:-18], atol=1e-4)  # 0.15 HU
    assert np.abs(cubic - covered).max() > 1e-3  # (the edges do bend: the check above can fail)
    sample = stream.sample(np.random.default_rng(1))
    assert sample["image"].shape == sample["condition"].shape == (1, 16, 16)
    assert sample["coords"].shape == (2, 16, 16) and int(sample["region"]) == 2
    val = ThickThinPlanes([volume], {"patch_size": 16, "factors": [3], "max_thick_mm": 6.0}, part="val")
    held_out = val.pairs[0][2]
    assert held_out.shape[0] == 9 and float(held_out.min()) >= float(ramp[60].min()) - 0.5 - 1e-6


def test_factors_keep_the_slabs_within_the_thickest_allowed():
    assert factors_for(1.0, [2, 3, 4, 5], 6.0) == [2, 3, 4, 5]
    assert factors_for(1.5, [2, 3, 4, 5], 6.0) == [2, 3, 4]
    assert factors_for(2.5, [2, 3, 4, 5], 6.0) == [2]


def test_last_step_fraction_moves_part_of_the_batch_to_the_last_step():
    uniform = draw_timesteps(64, 1000, torch.Generator().manual_seed(0))
    assert torch.equal(uniform, torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(0)))
    mixed = draw_timesteps(4000, 1000, torch.Generator().manual_seed(0), last_step_fraction=0.3)
    share = float((mixed == 999).float().mean())
    assert 0.27 < share < 0.33


def test_a_conditioned_network_starts_as_the_prior_it_is_initialised_from(tmp_path):
    prior_dir = save_tiny_checkpoint(tmp_path / "prior", seed=3)
    arch = dict(TINY_ARCHITECTURE, condition_channels=1, condition_windows=[[-0.4, -0.2]])
    network = DiffusionNetwork(arch)
    init_weights(network, prior_dir, arch)
    from napari_mediffuse.engine.checkpoint import load_checkpoint

    prior = load_checkpoint(prior_dir).network
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 700])
    condition = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        np.testing.assert_allclose(network(x, t, condition=condition).numpy(), prior(x, t).numpy(), atol=1e-5)
    other = dict(TINY_ARCHITECTURE, backbone_config=dict(TINY_ARCHITECTURE["backbone_config"],
                                                         block_out_channels=[8, 24]))
    with pytest.raises(CheckpointError, match="architecture differs"):
        init_weights(DiffusionNetwork(other), prior_dir, other)


# -- the task ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chest_thin():
    """A 1 mm slab of the real chest CT (0.78 mm pixels), 40 slices of 48 x 64, HU."""
    return chest_ct_centre_crop((40, 48, 64), name="chest 1 mm")


@pytest.fixture
def sr_model(tmp_path):
    return save_tiny_checkpoint(tmp_path / "tiny-sr", name="tiny-sr", condition_channels=1, **SR_CARD)


def test_learned_sr_lands_on_the_thin_grid(chest_thin, sr_model):
    thick = simulate_thick_slices(chest_thin, 5)
    result = superres.super_resolve(thick, factor=5, method="learned", model=str(sr_model),
                                    options=RunOptions(batch_size=16, seed=0))
    cubic = superres.super_resolve(thick, factor=5, method="cubic")
    assert result.data.shape == chest_thin.data.shape
    np.testing.assert_allclose(result.affine, chest_thin.affine, atol=1e-6)  # the real thin slices' places
    np.testing.assert_allclose(result.spacing, chest_thin.spacing, atol=1e-6)
    assert result.data.min() >= thick.data.min() and result.data.max() <= thick.data.max()
    assert result.metadata["parameters"]["steps"] == 1 and "learned" in result.name
    assert result.metadata["model"] == "tiny-sr"
    assert np.abs(result.data - cubic.data).mean() > 1.0  # the model's estimate, not the interpolation


def test_learned_planes_fit_the_thick_slices_exactly(chest_thin, sr_model):
    from napari_mediffuse.tasks.common import load_prior

    thick = simulate_thick_slices(chest_thin, 5)
    data = np.asarray(thick.data, dtype=np.float32)
    op = superres.slab_operator(8, 5, 5.0, 5.0)
    initial = superres.cubic_along(data, 5, axis=0)
    checkpoint, predictor = load_prior(str(sr_model), RunOptions(), task="super_resolution")
    planes = np.moveaxis(data, 1, 0)
    for smooth in (True, False):
        out = superres.conditional_planes(planes, op, np.moveaxis(initial, 1, 0), predictor=predictor,
                                          checkpoint=checkpoint, smooth=smooth, batch_size=16)
        assert out.shape == (48, 40, 64)
        np.testing.assert_allclose(out.reshape(48, 8, 5, 64).mean(axis=2), planes, atol=0.01)  # HU


def test_learned_sr_ensemble_is_recorded_and_checked(chest_thin, sr_model):
    thick = simulate_thick_slices(chest_thin, 5)
    one, two = (superres.super_resolve(thick, factor=5, method="learned", model=str(sr_model), planes="coronal",
                                       ensemble=n, options=RunOptions(batch_size=16, seed=0)) for n in (1, 2))
    assert two.metadata["parameters"]["ensemble"] == 2
    assert np.abs(two.data - one.data).mean() > 0.1  # the second (mirrored) estimate changed the result (HU)
    with pytest.raises(superres.TaskInputError, match="learned model, not 'cubic'"):
        superres.super_resolve(thick, factor=5, method="cubic", ensemble=2)
    with pytest.raises(superres.TaskInputError, match="at least 1"):
        superres.super_resolve(thick, factor=5, method="learned", model=str(sr_model), ensemble=0)


def test_learned_sr_depends_on_the_seed_only(chest_thin, sr_model):
    thick = simulate_thick_slices(chest_thin, 4)
    runs = [superres.super_resolve(thick, factor=4, method="learned", model=str(sr_model), steps=2,
                                   planes="coronal", options=RunOptions(batch_size=b, seed=7)).data
            for b in (3, 16)]
    np.testing.assert_allclose(runs[0], runs[1], atol=0.05)


def test_learned_sr_runs_with_the_network_on_another_device(chest_thin, sr_model):
    thick = simulate_thick_slices(chest_thin, 4)
    out = superres.super_resolve(thick, factor=4, method="learned", model=str(sr_model), planes="sagittal",
                                 options=RunOptions(device=torch.device("meta"), batch_size=8))
    assert out.data.shape == (40, 48, 64)


def test_learned_sr_refuses_a_prior_and_diffusion_refuses_an_sr_model(chest_thin, sr_model, tmp_path):
    thick = simulate_thick_slices(chest_thin, 4)
    prior = save_tiny_checkpoint(tmp_path / "tiny-prior")
    with pytest.raises(CheckpointError, match="'ct_prior' model; this needs a 'super_resolution' model"):
        superres.super_resolve(thick, factor=4, method="learned", model=str(prior))
    with pytest.raises(CheckpointError, match="'super_resolution' model; this needs a 'ct_prior' model"):
        superres.super_resolve(thick, factor=4, method="diffusion", model=str(sr_model))


def test_mediffuse_sr_learned_from_the_command_line(chest_thin, sr_model, tmp_path, capsys):
    from napari_mediffuse.cli import main

    thick = simulate_thick_slices(chest_thin, 5)
    src, out = tmp_path / "thick.nii.gz", tmp_path / "thin.nii.gz"
    io.write_nifti(thick, src)
    assert main(["sr", str(src), "-o", str(out), "--factor", "5", "--method", "learned",
                 "--model", str(sr_model), "--planes", "coronal"]) == 0
    written, = io.read(out)
    assert written.data.shape == chest_thin.data.shape
    np.testing.assert_allclose(written.spacing, chest_thin.spacing, atol=1e-4)
    assert "learned" in capsys.readouterr().out


def test_sr_slab_operator_is_the_training_slab_average():
    # the task's slab model (thick centres, thickness k d) is the average the training pairs use
    op = superres.slab_operator(4, 5, 5.0, 5.0)
    np.testing.assert_allclose(op.weights, SlabOperator.slab_average(4, 5).weights, atol=1e-12)


def test_learned_sr_warns_for_slabs_outside_the_thicknesses_it_saw(chest_thin, tmp_path):
    """The card's slice_spacing_mm (the thick slices trained on) is checked for the learned method."""
    model = save_tiny_checkpoint(tmp_path / "sr-domain", name="tiny-sr", condition_channels=1,
                                 domain={"pixel_spacing_mm": [0.78, 0.96], "slice_spacing_mm": [2.0, 6.0]},
                                 **SR_CARD)

    def slice_warnings(volume, factor, method="learned"):
        out = superres.super_resolve(volume, factor=factor, method=method, model=str(model), planes="coronal",
                                     options=RunOptions(batch_size=16, seed=0))
        return [w for w in out.metadata["warnings"] if "slices" in w and "outside what the model saw" in w]

    assert slice_warnings(simulate_thick_slices(chest_thin, 5), 5) == []  # 5 mm slabs: inside 2-6 mm
    # the 1 mm scan itself, made 0.5 mm: thinner slices than any slab the model saw
    (warning,) = slice_warnings(chest_thin, 2)
    assert warning == ("tiny-sr was trained on 2-6 mm slices; this scan's are 1 mm apart "
                       "(outside what the model saw)")
    assert slice_warnings(chest_thin, 2, method="cubic") == []  # interpolation has no model
