"""The 3D position of the 2D CT prior (MedDiff-FM): each slice's place along
its volume's third axis, from the training samples through the network and
the noise predictor to the tasks."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_mediffuse.engine.checkpoint import load_checkpoint
from napari_mediffuse.engine.inference import NoisePredictor
from napari_mediffuse.engine.networks import DiffusionNetwork
from napari_mediffuse.engine.position import body_extent, coordinate_grid, slice_coordinates
from napari_mediffuse.tasks.common import RunOptions, takes_slice_position
from napari_mediffuse.tasks.synthesize import alternating_plane_predictor, synthesize, volume_slice_positions

from conftest import TINY_ARCHITECTURE, save_tiny_checkpoint
from training.data import MultiLevelSlices, TrainingVolume, load_volumes
from training.trainer import _input_layout, init_weights

ARCH_3D = dict(TINY_ARCHITECTURE, position_axes=3)


def test_slice_coordinates_are_measured_in_the_body():
    # body (and table) in slices 10..29 of 40: with the 4-slice margin the box is 6..33
    vol = np.full((40, 8, 8), -1000.0, np.float32)
    vol[10:30, 2:6, 2:6] = 40.0
    assert body_extent(vol, 0, -700.0) == (6, 34)
    assert body_extent(vol, 1, -700.0) == (0, 8)  # margin clipped at the volume's edge
    coords = slice_coordinates(np.arange(40), 6, 34)
    assert coords[6] == -1.0 and coords[33] == 1.0
    assert coords[20] == pytest.approx((20 - 6) * 2 / 27 - 1, abs=1e-6)
    assert coords[0] == -1.0 and coords[39] == 1.0  # air slices beyond the body: clipped to its ends
    assert body_extent(np.full((5, 4, 4), -1000.0), 0, -700.0) == (0, 5)  # no body: the whole axis


def test_an_unknown_slice_position_encodes_as_zeros():
    torch.manual_seed(0)
    net = DiffusionNetwork(ARCH_3D).eval()
    assert net.uses_slice_position and not DiffusionNetwork(TINY_ARCHITECTURE).uses_slice_position
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 600])
    grid = coordinate_grid([(0, 16), (0, 16)], (16, 16))[None].expand(2, 2, 16, 16)
    nan = torch.full((2, 1, 16, 16), float("nan"))
    with torch.no_grad():
        omitted = net(x, t, coords=grid)
        unknown = net(x, t, coords=torch.cat([grid, nan], 1))
        given = net(x, t, coords=torch.cat([grid, torch.full((2, 1, 16, 16), 0.5)], 1))
    assert torch.isfinite(unknown).all()
    torch.testing.assert_close(omitted, unknown)
    assert (given - unknown).abs().max() > 1e-4  # the third coordinate reaches the network
    with pytest.raises(ValueError, match="3 coordinate axes, got 4"):
        net(x, t, coords=torch.cat([grid, nan, nan], 1))


@pytest.mark.parametrize("stem_stride", [1, 2])
@pytest.mark.parametrize("condition_channels", [0, 1])
def test_warm_start_from_a_2d_prior_gives_the_new_axis_zero_weights(tmp_path, stem_stride, condition_channels):
    # the bundled prior has a space-to-depth stem (stride 2): each input channel is 4 after it;
    # a conditioned network (a learned restoration model) may gain the axis as well
    source_arch = dict(TINY_ARCHITECTURE, stem_stride=stem_stride, condition_channels=condition_channels)
    torch.manual_seed(4)
    from napari_mediffuse.engine.checkpoint import make_card, save_checkpoint

    save_checkpoint(tmp_path / "prior", DiffusionNetwork(source_arch),
                    make_card(name="prior", task="ct_prior", modality="CT", architecture=source_arch))
    prior = load_checkpoint(tmp_path / "prior").network.eval()
    arch = dict(source_arch, position_axes=3)
    net = DiffusionNetwork(arch)
    init_weights(net, tmp_path / "prior", arch)
    net.eval()
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([5, 300, 900])
    condition = torch.randn(3, 1, 16, 16) if condition_channels else None
    grid = coordinate_grid([(0, 16), (0, 16)], (16, 16))[None].expand(3, 2, 16, 16)
    third = torch.tensor([-0.9, 0.1, 0.7]).view(3, 1, 1, 1).expand(3, 1, 16, 16)
    with torch.no_grad():
        np.testing.assert_allclose(net(x, t, coords=torch.cat([grid, third], 1), condition=condition).numpy(),
                                   prior(x, t, coords=grid, condition=condition).numpy(), atol=1e-5)
    start, stop = _input_layout(net)["positions"]
    weight = net.backbone.conv_in.weight
    old = 2 * net.position_frequencies * 2  # the in-plane axes' channels come first
    assert torch.count_nonzero(weight[:, (start + old) * stem_stride ** 2:stop * stem_stride ** 2]) == 0
    assert torch.count_nonzero(weight[:, start * stem_stride ** 2:(start + old) * stem_stride ** 2]) > 0
    # a config stating the default number of axes is the same network as a card without the key
    same = dict(source_arch, position_axes=2)
    init_weights(DiffusionNetwork(same), tmp_path / "prior", same)


def test_only_a_2d_network_takes_one_more_position_axis():
    with pytest.raises(ValueError, match="position_axes 4 for a 2D network; allowed: 2, 3"):
        DiffusionNetwork(dict(TINY_ARCHITECTURE, position_axes=4))


class _RecordingNetwork(DiffusionNetwork):
    """Records the coordinates it is given."""

    def forward(self, sample, timesteps, *, coords=None, condition=None, region=None):
        self.seen = coords.detach().clone()
        return super().forward(sample, timesteps, coords=coords, condition=condition, region=region)


def test_noise_predictor_gives_each_slice_its_position():
    torch.manual_seed(0)
    predictor = NoisePredictor(_RecordingNetwork(ARCH_3D), "cpu", "fp32")
    x = torch.randn(3, 1, 24, 24)
    positions = torch.tensor([-0.5, 0.0, 0.75])
    predictor(x, 10, slice_position=positions)
    seen = predictor.network.seen
    assert seen.shape[1] == 3
    for b in range(3):
        assert torch.all(seen[b, 2] == positions[b])
    torch.testing.assert_close(seen[:, :2], coordinate_grid([(0, 24), (0, 24)], (24, 24))[None].expand(3, 2, 24, 24))
    assert takes_slice_position(predictor)
    predictor(x, 10)  # not given: the network gets 'not known'
    assert predictor.network.seen.shape[1] == 2
    with pytest.raises(ValueError, match="2 slice positions for 3 slices"):
        predictor(x, 10, slice_position=positions[:2])
    # a 2D prior without the axis ignores positions
    flat = NoisePredictor(_RecordingNetwork(TINY_ARCHITECTURE), "cpu", "fp32")
    flat(x, 10, slice_position=positions)
    assert flat.network.seen.shape[1] == 2 and not takes_slice_position(flat)


def test_sliding_windows_keep_each_slice_position():
    torch.manual_seed(0)
    predictor = NoisePredictor(_RecordingNetwork(ARCH_3D), "cpu", "fp32", window=16, overlap=0.25, window_batch=1)
    calls = []
    original = predictor.network.forward

    def forward(sample, timesteps, **kw):
        calls.append(float(kw["coords"][0, 2, 0, 0]))
        return original(sample, timesteps, **kw)

    predictor.network.forward = forward
    predictor(torch.randn(2, 1, 24, 24), 10, slice_position=torch.tensor([-0.5, 0.75]))
    half = len(calls) // 2  # MONAI runs the windows of one image after the other's
    assert calls[:half] == [-0.5] * half and calls[half:] == [0.75] * half


# -- training samples -----------------------------------------------------------------------

def test_axial_coordinate_of_a_block_is_its_place_in_the_whole_scan(tmp_path):
    # 40 slices of body; a tumour in slices 18-21 with a 4 mm margin at 2 mm slices: blocks
    # 0..15 and 24..39 are drawn, each a part of the same scan, not a scan of its own
    ct = np.full((12, 12, 40), 40, np.int16)  # NIfTI (x, y, z): 40 axial slices
    mask = np.zeros_like(ct, dtype=np.uint8)
    mask[4:8, 4:8, 18:22] = 1
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(ct, affine), str(tmp_path / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(mask, affine), str(tmp_path / "mask.nii.gz"))
    data = {"train": [{"path": str(tmp_path / "ct.nii.gz"), "region": "chest",
                       "exclude_mask": str(tmp_path / "mask.nii.gz"), "exclude_margin_mm": 4}],
            "crop_to_body_hu": -700}
    volumes = load_volumes(data, {"type": "hu_window", "low": -1024.0, "high": 2048.0})
    assert len(volumes) == 2
    spans = sorted(v.axial_span for v in volumes)
    blocks = sorted((v.axial_span, v.data.shape[0]) for v in volumes)
    # the first block starts at one end of the scan, the second ends at the other, a gap between
    assert spans[0][0] == -1.0 and spans[1][1] == 1.0
    assert spans[0][1] < spans[1][0]
    for (first, last), n in blocks:
        assert last - first == pytest.approx((n - 1) * 2 / 39, abs=1e-6)
    low = min(volumes, key=lambda v: v.axial_span[0])
    assert low.slice_coordinate("axial", 0) == -1.0
    assert low.slice_coordinate("axial", low.data.shape[0] - 1) == pytest.approx(low.axial_span[1])
    assert low.slice_coordinate("coronal", 0) == -1.0 and low.slice_coordinate("sagittal", 11) == 1.0


def test_samples_carry_the_coordinate_of_the_slice_they_were_cut_from():
    # each axial slice holds its own index as HU, so a sample tells which slice it came from
    n = 30
    hu = np.repeat(np.arange(n, dtype=np.float32)[:, None, None] * 20.0, 24, axis=1).repeat(24, axis=2)
    volume = TrainingVolume(data=(hu - 512.0) / 1536.0, region=2, source="ramp", holdout_start=n,
                            axial_span=(-0.5, 1.0))
    config = {"patch_size": 16, "image_level_probability": 0.0, "orientations": {"axial": 1.0},
              "slice_position": True, "slice_position_dropout": 0.25}
    stream = MultiLevelSlices([volume], config, seed=0)
    rng = np.random.default_rng(0)
    samples = [stream.sample(rng) for _ in range(200)]
    third = np.array([float(s["coords"][2, 0, 0]) for s in samples])
    index = np.array([round(float(s["image"][0, 0, 0]) * 1536.0 + 512.0) / 20.0 for s in samples])
    known = ~np.isnan(third)
    assert 0.15 < 1 - known.mean() < 0.35  # a quarter are 'not known'
    np.testing.assert_allclose(third[known], -0.5 + 1.5 * index[known] / (n - 1), atol=1e-5)
    assert all(torch.all(s["coords"][2] == s["coords"][2, 0, 0]) for s in samples if not np.isnan(s["coords"][2, 0, 0]))
    # validation (a patient held out whole) never drops it, and draws the same slices as a stream without it
    held_out = TrainingVolume(data=volume.data, region=2, source="ramp", holdout_start=0)
    val = MultiLevelSlices([held_out], config, seed=0, part="validation")
    plain = MultiLevelSlices([held_out], {k: v for k, v in config.items() if not k.startswith("slice")},
                             seed=0, part="validation")
    with_it, without = val.fixed_batch(16), plain.fixed_batch(16)
    assert not torch.isnan(with_it["coords"]).any()
    torch.testing.assert_close(with_it["image"], without["image"])
    torch.testing.assert_close(with_it["coords"][:, :2], without["coords"])


# -- synthesis ----------------------------------------------------------------------------------

def test_synthesis_gives_each_plane_its_slice_positions_in_the_layout_body():
    layout = np.full((10, 12, 14), -1000.0, np.float32)
    layout[2:8, 1:11, 5:9] = 30.0  # the body box: S 0..9 (margin clipped), P 0..11, L 1..12
    positions = volume_slice_positions(layout, layout.shape)
    np.testing.assert_allclose(positions["axial"], slice_coordinates(np.arange(10), 0, 10))
    np.testing.assert_allclose(positions["sagittal"], slice_coordinates(np.arange(14), 1, 13))
    seen = {}

    def fake(chunk, t, region=None, slice_position=None):
        seen.setdefault(chunk.shape[2:], []).extend(np.asarray(slice_position).tolist())
        return chunk * 0

    predict = alternating_plane_predictor(fake, batch_size=4, slice_positions=positions)
    x = torch.zeros(1, 1, 10, 12, 14)
    for t in (3, 2, 1):
        predict(x, t)
    np.testing.assert_allclose(seen[(12, 14)], positions["axial"])
    np.testing.assert_allclose(seen[(10, 14)], positions["coronal"])
    np.testing.assert_allclose(seen[(10, 12)], positions["sagittal"])
    no_layout = volume_slice_positions(None, (4, 5, 6))
    assert no_layout["axial"].tolist() == pytest.approx([-1, -1 / 3, 1 / 3, 1])


def test_synthesis_with_a_3d_position_prior(tmp_path, monkeypatch):
    from napari_mediffuse.engine import registry

    folder = tmp_path / "models"
    save_tiny_checkpoint(folder / "tiny-3d", name="tiny-3d", position_axes=3)
    monkeypatch.setenv(registry.ENV_VAR, str(folder))
    monkeypatch.setattr(registry, "user_models_dir", lambda: tmp_path / "none")
    monkeypatch.setattr(registry, "bundled_models_dir", lambda: tmp_path / "none")
    opts = RunOptions(device="cpu", seed=1, batch_size=5)
    vol = synthesize((16, 16, 16), model="tiny-3d", steps=2, coarse_model=None, options=opts)
    assert vol.metadata["parameters"]["slice_positions"] is True
    assert np.isfinite(vol.data).all()
    # batching does not change which position a slice gets
    again = synthesize((16, 16, 16), model="tiny-3d", steps=2, coarse_model=None,
                       options=RunOptions(device="cpu", seed=1, batch_size=3))
    np.testing.assert_allclose(again.data, vol.data, atol=1e-2)
    # and the positions reach the network: never given them, the same prior draws another volume
    import napari_mediffuse.tasks.synthesize as synthesis

    monkeypatch.setattr(synthesis, "takes_slice_position", lambda predictor: False)
    unplaced = synthesize((16, 16, 16), model="tiny-3d", steps=2, coarse_model=None, options=opts)
    assert unplaced.metadata["parameters"]["slice_positions"] is False
    assert np.abs(unplaced.data - vol.data).max() > 1.0  # HU


# -- evaluation ------------------------------------------------------------------------------------

def test_held_out_slices_know_their_place_and_the_evaluation_gives_it_or_not(tmp_path):
    from training.evaluate.prior import rows_of
    from training.evaluate_prior import heldout_slices, one_step_denoising

    ct = np.full((20, 16, 10), 40, np.int16)  # NIfTI (x, y, z): 10 axial slices of 2 mm, all body
    ct[:, :, 0] = -1000  # the lowest slice is air: the body box is slices 0..9 (4-slice margin)
    nib.save(nib.Nifti1Image(ct, np.diag([1.0, 1.0, 2.0, 1.0])), str(tmp_path / "chest.nii.gz"))
    config = {"data": {"train": [], "validation": [{"path": str(tmp_path / "chest.nii.gz"), "region": "chest"}],
                       "crop_to_body_hu": -700},
              "normalization": {"type": "hu_window", "low": -1024.0, "high": 2048.0}}
    picks = heldout_slices(config, config["normalization"], max_slices=3)
    # the central 60 % (slices 2..7), evenly: 2, 4 (2.5 rounds to even: the pool's third), 7;
    # placed in the 10-slice body box
    assert [p.position for p in picks] == pytest.approx([-5 / 9, -1 / 9, 5 / 9], abs=1e-6)
    torch.manual_seed(0)
    network = DiffusionNetwork(ARCH_3D)
    with torch.no_grad():  # make the output depend on the third coordinate
        start, stop = _input_layout(network)["positions"]
        network.backbone.conv_in.weight[:, stop - 4:stop].fill_(0.3)
    given = one_step_denoising(network, config, noise_hu=(50.0,), picks=picks)["noise_50HU"]
    unknown = one_step_denoising(network, config, noise_hu=(50.0,), picks=picks, slice_position=False)["noise_50HU"]
    assert given["psnr_noisy_soft"] == unknown["psnr_noisy_soft"]  # the same noise
    assert given["psnr_denoised_soft"] != pytest.approx(unknown["psnr_denoised_soft"], abs=1e-3)
    labels = [row[0] for row in rows_of({"flat": DiffusionNetwork(TINY_ARCHITECTURE), "3d": network})]
    assert labels == ["flat", "3d, position given", "3d, position not known"]


def test_prior_evaluation_writes_a_picture_without_anatomy_channels(tmp_path, monkeypatch):
    from skimage import io as skio

    from training.evaluate.__main__ import main as evaluate_main

    ct = np.zeros((40, 40, 10), np.int16)  # 10 axial slices of 40 x 40 at 0 HU
    nib.save(nib.Nifti1Image(ct, np.diag([1.0, 1.0, 2.0, 1.0])), str(tmp_path / "chest.nii.gz"))
    import yaml

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"train": [], "validation": [{"path": str(tmp_path / "chest.nii.gz"), "region": "chest"}]},
        "normalization": {"type": "hu_window", "low": -1024.0, "high": 2048.0}}))
    save_tiny_checkpoint(tmp_path / "flat")
    save_tiny_checkpoint(tmp_path / "3d", position_axes=3, seed=2)
    out = tmp_path / "out"
    argv = ["prior", "--config", str(config), "--model", f"flat={tmp_path / 'flat'}", f"3d={tmp_path / '3d'}",
            "--max-slices", "2", "--noise-hu", "50", "--out", str(out)]
    monkeypatch.setattr("sys.argv", ["training.evaluate"] + argv)
    assert evaluate_main(argv) == 0
    import json

    results = json.loads((out / "prior.json").read_text())["results"]
    assert list(results) == ["flat", "3d, position given", "3d, position not known"]
    # clean, noisy and three estimates, 40 px wide plus 4-px gaps; no structures tile
    assert skio.imread(str(out / "prior.png")).shape == (40, 5 * 44)
    assert "structures" not in (out / "prior.txt").read_text()


def test_training_refuses_a_bad_architecture_in_one_line_before_loading(tmp_path, capsys):
    import yaml

    from training.__main__ import main as training_main

    ct = np.zeros((16, 16, 8), np.int16)
    nib.save(nib.Nifti1Image(ct, np.eye(4)), str(tmp_path / "ct.nii.gz"))
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({
        "name": "bad", "task": "ct_prior", "data": {"train": [str(tmp_path / "ct.nii.gz")], "patch_size": 16},
        "architecture": dict(TINY_ARCHITECTURE, position_axes=4),
        "train": {"batch_size": 2, "learning_rate": 1e-4, "max_steps": 1}}))
    assert training_main(["train", "--config", str(config), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {config}: architecture: position_axes 4 for a 2D network; allowed: 2, 3"
    assert not (tmp_path / "run").exists()
