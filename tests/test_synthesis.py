"""Volume synthesis: plane handling, geometry, seeds, bad input, CLI."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_mediffuse import io
from napari_mediffuse.cli import main as cli_main
from napari_mediffuse.engine.checkpoint import load_checkpoint
from napari_mediffuse.engine.registry import resolve_checkpoint
from napari_mediffuse.engine.sampling import make_generator
from napari_mediffuse.tasks.common import RunOptions, TaskInputError, predictor_for
from napari_mediffuse.tasks.synthesize import (
    DEFAULT_REFINE_FROM,
    DEFAULT_SLICE_CORRELATION,
    alternating_plane_predictor,
    draw_coarse_layout,
    place_box,
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
    with pytest.raises(TaskInputError, match="unknown body region 'knee'; choose one of"):
        synthesize((16, 16, 16), region="knee", model="tiny-ct-prior", options=RunOptions(device="cpu"))
    # a region the checkpoint's training data did not have
    from tests.conftest import save_tiny_checkpoint

    save_tiny_checkpoint(tiny_models / "abdomen-only", name="abdomen-only",
                         training={"data": [{"path": "ct.nii.gz", "region": "abdomen"}]})
    with pytest.raises(TaskInputError, match="trained on abdomen only.*'chest'"):
        synthesize((16, 16, 16), region="chest", model="abdomen-only", options=RunOptions(device="cpu"))
    vol = synthesize((16, 16, 16), region="abdomen", model="abdomen-only", steps=1,
                     options=RunOptions(device="cpu"))
    assert vol.metadata["parameters"]["region"] == "abdomen"


def test_synthesize_cli(tiny_models, tmp_path, capsys):
    out = tmp_path / "synth.nii.gz"
    assert cli_main(["synthesize", "-o", str(out), "--shape", "16", "16", "20", "--steps", "1",
                     "--seed", "1", "--device", "cpu", "--model", "tiny-ct-prior"]) == 0
    vol = io.read_nifti(out)
    assert vol.data.shape == (16, 16, 20) and vol.modality == "CT"
    assert cli_main(["synthesize", "-o", str(out), "--shape", "16", "16", "20"]) == 2  # exists
    assert "exists" in capsys.readouterr().err
    # --eta, --planes, --slice-correlation reach the sampler: same arguments, only eta differs
    runs = {}
    for eta in ("0", "1"):
        runs[eta] = tmp_path / f"eta{eta}.nii.gz"
        assert cli_main(["synthesize", "-o", str(runs[eta]), "--shape", "16", "16", "20", "--steps", "3",
                         "--seed", "1", "--eta", eta, "--planes", "axial", "--slice-correlation", "0.9",
                         "--device", "cpu", "--model", "tiny-ct-prior"]) == 0
    assert not np.array_equal(io.read_nifti(runs["0"]).data, io.read_nifti(runs["1"]).data)
    ancestral = runs["1"]
    assert cli_main(["synthesize", "-o", str(ancestral) + "x.nii.gz", "--shape", "16", "16", "20",
                     "--slice-correlation", "1", "--device", "cpu", "--model", "tiny-ct-prior"]) == 2
    assert "slice_correlation must be in [0, 1)" in capsys.readouterr().err
    assert not Path(str(ancestral) + "x.nii.gz").exists()
    bad = tmp_path / "small.nii.gz"
    assert cli_main(["synthesize", "-o", str(bad), "--shape", "4", "16", "16", "--model", "tiny-ct-prior",
                     "--device", "cpu"]) == 2
    assert not bad.exists()
    # sliding windows: 16 x 16 windows over 16 x 40 / 40 x 20 planes, blended, same grid
    windowed = tmp_path / "windowed.nii.gz"
    assert cli_main(["synthesize", "-o", str(windowed), "--shape", "16", "40", "20", "--steps", "2",
                     "--window", "16", "--device", "cpu", "--model", "tiny-ct-prior"]) == 0
    vol = io.read_nifti(windowed)
    assert vol.data.shape == (16, 40, 20) and np.isfinite(vol.data).all()
    assert vol.data.min() >= -1024 and vol.data.max() <= 2048
    assert cli_main(["synthesize", "-o", str(bad), "--shape", "16", "16", "16", "--window", "4",
                     "--device", "cpu", "--model", "tiny-ct-prior"]) == 2
    assert "--window" in capsys.readouterr().err and not bad.exists()


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
    # a block of the real CT is found in it; an upside-down copy is not
    from training.evaluate.synthesis import correlation_to_real

    assert correlation_to_real(real[4:24], real) == pytest.approx(1.0, abs=1e-3)  # edges filtered apart
    assert correlation_to_real(real[4:24, ::-1], real) < 0.9


def test_real_patients_histogram_spread(ct_small_path):
    """Item 5's histogram target is read against how far real patients are from each other."""
    from training.evaluate.synthesis import real_histogram_spread

    real = io.read_nifti(ct_small_path).data.astype(np.float32)
    body = real > -500
    brighter, darker = real + 40.0 * body, real - 20.0 * body
    # leave one out: 'brighter' against (real, darker) pooled, whose mean body level is 10 HU below real
    loo = real_histogram_spread([real, brighter, darker])
    assert len(loo) == 3
    assert loo[1] == pytest.approx(50.0, abs=2.0)
    assert loo[0] < loo[1] and loo[2] > loo[0]
    # a CT not in the pool is scored against all of it; one patient alone has no leave-one-out
    assert real_histogram_spread([real], [brighter]) == [pytest.approx(40.0, abs=1.0)]
    assert real_histogram_spread([real]) == []


def test_pooled_groups_of_real_patients(ct_small_path):
    """Pooled samples are read against real patients pooled as many at a time."""
    from training.evaluate.synthesis import pooled_group_spread, voxel_distance

    real = io.read_nifti(ct_small_path).data.astype(np.float32)
    body = real > -500
    shifts = [0.0, 10.0, 20.0, 30.0, 60.0]
    reals = [real + d * body for d in shifts]
    # groups of 2: (0, 10) against (20, 30, 60), whose body levels sit 30 HU higher on average;
    # (20, 30) against (0, 10, 60): 3.3 HU lower; the fifth patient is left out
    groups = pooled_group_spread(reals, 2)["hu_wasserstein_real_groups_to_pool"]
    assert len(groups) == 2
    assert groups[0] == pytest.approx(30.0, abs=2.0)
    assert groups[1] < groups[0]
    # too few patients for two groups: the references pooled against them
    assert pooled_group_spread(reals[:3], 2, [real + 100.0 * body]) == {
        "hu_wasserstein_references_pooled": pytest.approx(90.0, abs=2.0)}
    assert pooled_group_spread(reals[:3], 2) == {}
    a = np.arange(1000.0)
    assert voxel_distance(a, a + 25.0) == pytest.approx(25.0)


# -- coarse-to-fine synthesis (coarse whole-body prior, then the 2D prior) -----------

COARSE_CONFIG = Path(__file__).resolve().parents[1] / "training" / "configs" / "ct_prior_coarse.yaml"


def _phantom_ct(path, shape=(40, 30, 36), spacing=3.0):
    """A NIfTI 'body': a water ellipsoid with a bone cylinder in air, display orientation."""
    s, p, l = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[(p / 12) ** 2 + (l / 15) ** 2 <= 1] = 40.0
    hu[(p - 6) ** 2 + l ** 2 <= 4] = 700.0
    vol = io.Volume(data=hu, affine=io.volume.affine_from_world((spacing,) * 3, (0.0, 0.0, 0.0)),
                    modality="CT", name="phantom")
    io.write_nifti(vol, path)
    return path


@pytest.fixture
def tiny_coarse_config(tmp_path):
    from tests.conftest import TINY_ARCHITECTURE
    from training.trainer import load_config

    config = load_config(COARSE_CONFIG)
    config["data"]["train"] = [{"path": str(_phantom_ct(tmp_path / "phantom.nii.gz")), "region": "abdomen"}]
    config["data"]["spacing_mm"] = 12.0
    config["data"]["volume_shape"] = [12, 12, 12]  # 144 mm a side
    config["architecture"] = dict(TINY_ARCHITECTURE, image_channels=12)
    config["train"].update(batch_size=2, max_steps=2, validation_samples=2, log_every=1, validate_every=2)
    return config


def test_coarse_volumes_are_whole_bodies_in_an_air_box(tiny_coarse_config):
    from training.trainer import make_datasets

    train_set, val_set = make_datasets(tiny_coarse_config)
    sample = next(iter(val_set))
    box = sample["image"].numpy()
    assert box.shape == (12, 12, 12) and sample["coords"].shape == (2, 12, 12)
    assert int(sample["region"]) == 3
    # 40 x 30 x 36 voxels of 3 mm -> 10 x 7.5 x 9 voxels of 12 mm, centred in the 12^3 box
    inside = box > -0.9
    rows = np.flatnonzero(inside.any(axis=(0, 2)))
    assert rows[0] >= 2 and rows[-1] <= 9  # the 25 mm half-axis body in P: +-2 voxels of 12 mm around centre
    assert np.all(box[:, 0, 0] == -1.0)  # corners are air
    water = (40 + 1024) / 1536 - 1  # 40 HU in the [-1024, 2048] window
    assert np.max(box) < water + 0.3  # the bone cylinder is partial-volumed at 12 mm
    assert box[6, 6, 6] == pytest.approx(water, abs=0.05)
    augmented = next(iter(train_set))["image"].numpy()
    assert augmented.shape == box.shape and augmented.min() == pytest.approx(-1.0, abs=1e-4)


def test_coarse_volumes_weigh_regions_and_validate_on_held_out_patients(tiny_coarse_config, tmp_path):
    import itertools

    from training.trainer import make_datasets

    neck = [str(_phantom_ct(tmp_path / f"neck{i}.nii.gz")) for i in range(3)]
    abdomen = str(_phantom_ct(tmp_path / "abdomen.nii.gz"))
    held_out = str(_phantom_ct(tmp_path / "held_out.nii.gz", shape=(20, 30, 36)))  # half as tall: 5 slices of 12 mm
    data = tiny_coarse_config["data"]
    data["train"] = [{"path": path, "region": "head-neck"} for path in neck] + [{"path": abdomen, "region": "abdomen"}]
    data["validation"] = [{"path": held_out, "region": "head-neck"}]
    data["region_weights"] = {"head-neck": 0.5, "abdomen": 0.5}
    data["augment"] = False
    train_set, val_set = make_datasets(tiny_coarse_config)
    regions = [int(s["region"]) for s in itertools.islice(iter(train_set), 400)]
    # by box count the one abdomen would be drawn a quarter of the time; by region weight half of it
    assert abs(regions.count(3) / 400 - 0.5) < 0.08
    # validation draws only the held-out patient: 20 slices of 3 mm are 5 slices of 12 mm in the 12-slice box
    val = val_set.fixed_batch(4)["image"].numpy()
    body_slices = (val > -0.9).any(axis=(2, 3)).sum(axis=1)
    assert np.all((body_slices >= 5) & (body_slices <= 6))
    train_box = next(iter(train_set))["image"].numpy()
    assert (train_box > -0.9).any(axis=(1, 2)).sum() >= 9  # the training bodies are 10 slices tall


def test_coarse_boxes_can_be_augmented_at_a_finer_grid(tiny_coarse_config):
    from training.data import ConfigError, block_mean
    from training.trainer import make_datasets

    # a 12 mm box augmented at 6 mm (data.augment_spacing_mm) and averaged down: rotating a
    # box at its own voxel smears bone a few voxels wide (the real necks: 5.5 % -> 2.7 % of the
    # body above 300 HU at 16 mm; augmented at 8 mm: 6.4 %, config ct_prior_coarse_3d_v_aug8.yaml)
    tiny_coarse_config["data"]["augment_spacing_mm"] = 6.0
    train_set, val_set = make_datasets(tiny_coarse_config)
    assert val_set.boxes[0].shape == (24, 24, 24)  # the 144 mm box at 6 mm
    box = next(iter(val_set))["image"].numpy()
    assert box.shape == (12, 12, 12)
    np.testing.assert_allclose(box, block_mean(val_set.boxes[0], 2), atol=1e-6)
    hu = (box + 1) * 1536 - 1024
    assert hu[6, 5, 5] == pytest.approx(40.0, abs=5.0)  # water, away from the bone
    assert hu.max() > 150.0 and hu[0, 0, 0] == pytest.approx(-1024.0)  # the 700 HU column, partial-volumed; air
    # augmented boxes are averaged down too, with their air still air
    augmented = next(iter(train_set))["image"].numpy()
    assert augmented.shape == (12, 12, 12) and augmented.min() == pytest.approx(-1.0, abs=1e-4)
    samples = iter(train_set)
    body_voxels = [(next(samples)["image"].numpy() > -0.6).sum() for _ in range(5)]
    assert len(set(body_voxels)) > 1  # each one augmented differently
    assert all(abs(n - (box > -0.6).sum()) < 0.4 * (box > -0.6).sum() for n in body_voxels)
    tiny_coarse_config["data"]["augment_spacing_mm"] = 5.0
    with pytest.raises(ConfigError, match="augment_spacing_mm .* must divide data.spacing_mm"):
        make_datasets(tiny_coarse_config)


def test_a_pack_of_coarse_boxes_augmented_finer_holds_the_finer_volumes(tiny_coarse_config, tmp_path):
    import copy

    from training.data import ConfigError, CoarseVolumes, load_volumes
    from training.pack import check_pack, read_pack, write_pack
    from training.trainer import make_datasets

    plain = copy.deepcopy(tiny_coarse_config)
    write_pack(plain, tmp_path / "plain.npz")
    tiny_coarse_config["data"]["augment_spacing_mm"] = 6.0
    write_pack(tiny_coarse_config, tmp_path / "fine.npz")
    (packed,) = read_pack(tmp_path / "fine.npz", "train")
    assert packed.spacing_mm == pytest.approx((6.0, 6.0, 6.0))  # the 3 mm phantom at the augmenting voxel
    tiny_coarse_config["data"]["packed"] = str(tmp_path / "fine.npz")
    check_pack(tiny_coarse_config["data"], tiny_coarse_config["normalization"])
    train_set, _ = make_datasets(tiny_coarse_config)
    assert train_set.boxes[0].shape == (24, 24, 24) and next(iter(train_set))["image"].shape == (12, 12, 12)
    # a pack of 12 mm volumes is not taken for 6 mm ones
    tiny_coarse_config["data"]["packed"] = str(tmp_path / "plain.npz")
    with pytest.raises(ConfigError, match="augment_spacing_mm"):
        check_pack(tiny_coarse_config["data"], tiny_coarse_config["normalization"])
    coarse_volumes = load_volumes(plain["data"], plain["normalization"])
    with pytest.raises(ConfigError, match=r"phantom.nii.gz: volume at \(12.0, 12.0, 12.0\) mm, the boxes need 6 mm"):
        CoarseVolumes(coarse_volumes, {k: v for k, v in tiny_coarse_config["data"].items() if k != "packed"})


def test_place_box_keeps_world_positions_in_mm():
    # a box of 9^3 voxels of 8 mm whose values are the superior coordinate in mm
    z = (np.arange(9) - 4) * 8.0
    box = np.broadcast_to(z[:, None, None], (9, 9, 9)).astype(np.float32)
    out = place_box(box, (8.0, 8.0, 8.0), (41, 5, 6), (2.0, 3.0, 3.0), fill=-999.0)
    world = (np.arange(41) - 20) * 2.0  # output slices' superior coordinate
    inside = np.abs(world) <= 32
    np.testing.assert_allclose(out[inside, 2, 2], world[inside], atol=1e-4)
    assert np.all(out[np.abs(world) > 32.5, 2, 2] == -999.0)  # outside the 72 mm box: fill


def test_synthesis_refines_a_given_layout(tiny_models):
    # a 96 mm box of 8 mm voxels: soft tissue (40 HU) with a bone column (700 HU) along S, air around
    box = np.full((12, 12, 12), -1000.0, np.float32)
    box[:, 2:10, 2:10] = 40.0
    box[:, 5:7, 5:7] = 700.0
    opts = RunOptions(device="cpu", seed=1, batch_size=8)
    # refine_from=1: almost no noise is added, so the result is the layout placed on the 3 mm grid
    vol = synthesize((20, 16, 18), model="tiny-ct-prior", steps=4, refine_from=1, layout=(box, 8.0),
                     coarse_model="no-such-coarse-model", options=opts)  # not used with a layout
    params = vol.metadata["parameters"]
    assert params["coarse_model"] == "given layout" and params["planes"] == ["axial"]
    expected = place_box(box, 8.0, (20, 16, 18), (3.0,) * 3, fill=-1024.0)
    assert np.median(np.abs(vol.data - expected)) < 20  # HU
    # the bone column sits at the box's centre (the origin), 3 mm voxels 8-9 of 16 rows / 18 columns
    assert vol.data[:, 7:9, 8:10].mean() > 500 and vol.data[:, 2:4, 2:4].mean() < 100
    for bad, message in (((box[0], 8.0), "3D box"), ((box, 0.0), "positive voxel size"),
                         ((box * np.nan, 8.0), "finite HU"), (box, "box in HU, voxel size")):
        with pytest.raises(TaskInputError, match=message):
            synthesize((16, 16, 16), model="tiny-ct-prior", steps=1, layout=bad, options=opts)


def test_two_stage_synthesis_starts_from_the_coarse_layout(tmp_path, tiny_models, tiny_coarse_config):
    from training.trainer import train

    folder = train(tiny_coarse_config, tmp_path / "coarse-run", device="cpu", command="pytest")
    ckpt = load_checkpoint(folder, task="ct_prior_coarse", modality="CT")
    assert ckpt.card["volume_shape"] == [12, 12, 12] and ckpt.card["voxel_spacing_mm"] == [12.0] * 3
    import shutil
    shutil.copytree(folder, tiny_models / "tiny-coarse")

    opts = RunOptions(device="cpu", seed=5, batch_size=8)
    # refine_from=1: almost no noise is added, so the result is the coarse layout
    vol = synthesize((20, 16, 18), model="tiny-ct-prior", steps=4, refine_from=1, options=opts)
    params = vol.metadata["parameters"]
    assert params["coarse_model"] == "ct-prior-coarse-demo" and params["refine_from"] == 1
    gen = make_generator(5)
    box = draw_coarse_layout(ckpt, predictor_for(ckpt, opts), region=3, steps=4, generator=gen)
    expected = place_box(box, (12.0,) * 3, (20, 16, 18), (3.0,) * 3, fill=-1024.0)
    assert np.median(np.abs(vol.data - np.clip(expected, -1024, 2048))) < 20  # HU
    again = synthesize((20, 16, 18), model="tiny-ct-prior", steps=4, refine_from=1, options=opts)
    np.testing.assert_array_equal(vol.data, again.data)
    # the default refinement step redraws the detail: far from the layout, same geometry
    default = synthesize((20, 16, 18), model="tiny-ct-prior", steps=4, options=opts)
    assert default.metadata["parameters"]["refine_from"] == DEFAULT_REFINE_FROM
    assert default.metadata["parameters"]["refine_steps"] == 3  # 4 steps x 750 / 1000
    np.testing.assert_array_equal(default.affine, vol.affine)
    # refining in axial slices with noise correlated along S (the default: 0.97) keeps neighbouring
    # slices closer than independent noise does, from the same layout and seed
    assert default.metadata["parameters"]["planes"] == ["axial"]
    assert default.metadata["parameters"]["slice_correlation"] == DEFAULT_SLICE_CORRELATION == 0.97

    def slice_jump(volume):
        return float(np.mean(np.abs(np.diff(volume.data, axis=0))))

    jumps = {rho: slice_jump(synthesize((20, 16, 18), model="tiny-ct-prior", steps=8, refine_from=800,
                                        slice_correlation=rho, options=opts)) for rho in (0.0, 0.95)}
    assert jumps[0.95] < 0.7 * jumps[0.0]
    for bad, message in ((dict(slice_correlation=1.0), r"slice_correlation must be in \[0, 1\), got 1.0"),
                         (dict(slice_correlation=-0.1), r"slice_correlation must be in \[0, 1\), got -0.1"),
                         (dict(planes=("axial", "oblique")), r"planes must be .*'oblique'"),
                         (dict(planes=()), r"planes must be a non-empty sequence"),
                         (dict(eta=1.5), r"eta must be in \[0, 1\], got 1.5")):
        with pytest.raises(TaskInputError, match=message):
            synthesize((16, 16, 16), model="tiny-ct-prior", steps=2, options=opts, **bad)
    # checked before any model is loaded; a plane given as one string is one plane
    with pytest.raises(TaskInputError, match="eta must be"):
        synthesize((64, 64, 64), model="no-such-model", eta=-1, options=opts)
    one = synthesize((20, 16, 18), model="tiny-ct-prior", steps=2, planes="axial", eta=0.5, options=opts)
    assert one.metadata["parameters"]["planes"] == ["axial"] and one.metadata["parameters"]["eta"] == 0.5
    # no coarse stage when asked, or with an unknown region; a missing coarse model is an error
    plain = synthesize((16, 16, 16), model="tiny-ct-prior", steps=1, coarse_model="none", options=opts)
    assert plain.metadata["parameters"]["coarse_model"] is None
    with pytest.raises(TaskInputError, match="no checkpoint named 'nope'"):
        synthesize((16, 16, 16), model="tiny-ct-prior", coarse_model="nope", options=opts)
    with pytest.raises(TaskInputError, match="refine_from"):
        synthesize((16, 16, 16), model="tiny-ct-prior", refine_from=1000, options=opts)
    # the installed coarse prior knows the abdomen only: 'auto' draws a chest without it, naming it is an error
    chest = synthesize((16, 16, 16), model="tiny-ct-prior", region="chest", steps=1, options=opts)
    assert chest.metadata["parameters"]["coarse_model"] is None
    with pytest.raises(TaskInputError, match="coarse prior: .*trained on abdomen only"):
        synthesize((16, 16, 16), model="tiny-ct-prior", region="chest", coarse_model="ct-prior-coarse-demo",
                   options=opts)


def test_a_3d_coarse_prior_trains_on_whole_boxes_and_lays_out_synthesis(tmp_path, tiny_models, tiny_coarse_config):
    from training.data import ConfigError
    from training.trainer import make_datasets, train

    config = tiny_coarse_config
    config["name"] = "tiny-coarse-3d"
    config["data"]["box_as"] = "volume"
    config["architecture"] = {"backbone": "monai.DiffusionModelUNet", "spatial_dims": 3, "stem_stride": 1,
                              "image_channels": 1, "position_frequencies": 2,
                              "backbone_config": {"channels": [8, 16], "attention_levels": [False, False],
                                                  "num_res_blocks": 1, "norm_num_groups": 4}}
    _, val_set = make_datasets(config)
    sample = next(iter(val_set))
    # one 3D image of the whole 144 mm box and the x, y, z coordinates of each voxel
    assert sample["image"].shape == (1, 12, 12, 12) and sample["coords"].shape == (3, 12, 12, 12)
    water = (40 + 1024) / 1536 - 1
    assert float(sample["image"][0, 6, 6, 6]) == pytest.approx(water, abs=0.05)
    folder = train(config, tmp_path / "coarse-3d", device="cpu", command="pytest")
    ckpt = load_checkpoint(folder, task="ct_prior_coarse", modality="CT")
    assert ckpt.network.spatial_dims == 3 and ckpt.card["volume_shape"] == [12, 12, 12]
    opts = RunOptions(device="cpu", seed=2, batch_size=8)
    box = draw_coarse_layout(ckpt, predictor_for(ckpt, opts), region=3, steps=2, generator=make_generator(2))
    assert box.shape == (12, 12, 12) and np.isfinite(box).all() and -1024 <= box.min() and box.max() <= 2048
    # synthesis refines the 3D network's draw as it does a 2D one's (refine_from=1: the layout itself)
    vol = synthesize((20, 16, 18), model="tiny-ct-prior", steps=2, refine_from=1, coarse_model=str(folder),
                     options=opts)
    assert vol.metadata["parameters"]["coarse_model"] == "tiny-coarse-3d"
    expected = place_box(box, (12.0,) * 3, (20, 16, 18), (3.0,) * 3, fill=-1024.0)
    assert np.median(np.abs(vol.data - expected)) < 20  # HU
    config["data"]["box_as"] = "slices"
    with pytest.raises(ConfigError, match="box_as must be 'channels'.*or 'volume'"):
        make_datasets(config)


def test_synthesis_without_a_coarse_prior_installed(tiny_models):
    vol = synthesize((16, 16, 16), model="tiny-ct-prior", steps=1, options=RunOptions(device="cpu"))
    assert vol.metadata["parameters"]["coarse_model"] is None
    assert vol.metadata["parameters"]["refine_from"] is None
    # from noise: all three planes alternate, slices draw independent noise
    assert vol.metadata["parameters"]["planes"] == ["axial", "coronal", "sagittal"]
    assert vol.metadata["parameters"]["slice_correlation"] == 0.0


@pytest.mark.parametrize("name, region, shape, body_fraction, body_median_hu", [
    # the demo's one training CT in its 32^3 box at 12 mm: 38.7 % of voxels above -500 HU, body median -33 HU
    ("ct-prior-coarse-demo", 3, (32, 32, 32), (0.29, 0.48), (-100, 50)),
    # the 33 held-out OpenKBP patients in the 40 x 40 x 64 box at 8 mm: 3-30 % (mean 13 %), median -26..49 HU
    ("ct-prior-coarse-multi", 1, (40, 40, 64), (0.03, 0.35), (-100, 100)),
])
def test_bundled_coarse_priors_draw_a_body_in_air(name, region, shape, body_fraction, body_median_hu):
    """A shipped coarse prior draws a body of its training patients' size in an
    air box (not noise or an empty box), with the HU of fat and soft tissue."""
    ckpt = load_checkpoint(resolve_checkpoint(name).path, task="ct_prior_coarse")
    predictor = predictor_for(ckpt, RunOptions(device="cpu"))
    for seed in (0, 1):
        box = draw_coarse_layout(ckpt, predictor, region=region, steps=50, generator=make_generator(seed))
        assert box.shape == shape
        body = box > -500
        assert body_fraction[0] < body.mean() < body_fraction[1]
        corners = np.concatenate([box[:, :4, :4].ravel(), box[:, -4:, -4:].ravel()])
        assert np.median(corners) < -950  # air around the body
        assert body_median_hu[0] < np.median(box[body]) < body_median_hu[1]


def test_a_multi_resolution_prior_generates_at_the_requested_spacing_within_its_range():
    from napari_mediffuse.tasks.synthesize import generation_spacing

    multi = {"pixel_spacing_mm": None, "domain": {"pixel_spacing_mm": [0.6, 4.0]}}
    assert generation_spacing(multi, (3.0, 4.0, 4.0)) == 3.0   # a neck box at its own voxel size
    assert generation_spacing(multi, (8.0, 8.0, 8.0)) == 4.0   # coarser than it saw: its coarsest
    # none asked for: 3 mm, so a default-sized volume holds a body (the default prior is this kind)
    assert generation_spacing(multi, None) == 3.0
    assert generation_spacing({"domain": {"pixel_spacing_mm": [0.5, 1.0]}}, None) == 1.0  # within its range
    assert generation_spacing({"pixel_spacing_mm": [3.0, 3.0]}, (1.0, 1.0, 1.0)) == 3.0  # a 3 mm prior


def test_real_ct_is_scored_on_the_samples_voxel_size(tmp_path):
    """A real CT at 2 mm slices is resampled to the samples' 4 mm before its
    adjacent-slice difference is taken: 10 HU per 2 mm slice is 20 HU per 4 mm."""
    from training.evaluate.synthesis import adjacent_slice_difference, real_volumes

    ramp = (np.arange(32)[:, None, None] * 10.0 + np.zeros((32, 16, 16))).astype(np.float32)
    path = tmp_path / "ramp.nii.gz"
    io.write_nifti(io.Volume(data=ramp, affine=io.volume.affine_from_world((2.0, 4.0, 4.0), (0.0, 0.0, 0.0)),
                             modality="CT", name="ramp"), path)
    (resampled,) = real_volumes([str(path)], 4.0)
    assert resampled.shape == (16, 16, 16)
    # the resampling keeps the end slices' centres: 31 gaps of 2 mm become 15 of 4.13 mm
    assert adjacent_slice_difference(resampled[2:-2]) == pytest.approx(10.0 * 31 / 15, abs=0.2)


def test_synthesis_table_is_headed_by_its_command(monkeypatch):
    """Issue 18 item 7: every evaluation table starts with the command that wrote it (shell-quoted)."""
    from training.evaluate import command_line
    from training.evaluate.synthesis import markdown

    monkeypatch.setattr("sys.argv", ["training.evaluate", "synthesis", "--real", "../data/pt_1/ct.nii.gz",
                                     "--orientation-fix", "rot90_PL", "flip_S", "--out", "a dir/x"])
    command = command_line()
    assert command == ("python -m training.evaluate synthesis --real ../data/pt_1/ct.nii.gz "
                       "--orientation-fix rot90_PL flip_S --out 'a dir/x'")
    scores = {"adjacent_slice_mad_hu": 80.0, "hu_wasserstein_to_real": 66.0, "correlation_to_real": 0.5,
              "seconds": 20.0}
    results = {"command": command, "samples": [{"seed": 0, **scores}], "axial_only_baseline": scores,
               "settings": {"shape": [64, 64, 64], "steps": 20, "region": "head-neck", "model": "ct-prior-multi",
                            "device": "cpu", "torch_threads": 1, "coarse_model": None},
               "real": {"paths": ["a", "b"], "voxel_mm": 4.0, "adjacent_slice_mad_hu": 116.0},
               "continuity_ratio_to_real": 80.0 / 116.0}
    lines = markdown(results).splitlines()
    assert lines[0] == f"<!-- {command} -->"
    assert "| sample seed 0 (alternating planes) | 80.0 | 66.0 | 0.50 | 20 |" in lines
    assert "Continuity ratio (samples / real): 0.69 (target <= 1.5)." in lines
    assert "HU histogram distance of the samples: mean 66.0 HU, range 66.0-66.0 (target <= 20)." in lines
    # a refined coarse layout names its plane(s) and noise
    results["settings"].update(coarse_model="ct-prior-coarse-multi", refine_from=750, planes=["axial"],
                               slice_correlation=0.95)
    results["samples"].append({"seed": 1, **scores, "hu_wasserstein_to_real": 30.0})
    lines = markdown(results).splitlines()
    assert lines[2].endswith("coarse layout: ct-prior-coarse-multi, refined from step 750 in plane(s) axial, "
                             "slice noise correlation 0.95.")
    assert "| sample seed 1 (coarse layout + axial slices, slice-correlated noise) | 80.0 | 30.0 | 0.50 | 20 |" in lines
    assert "HU histogram distance of the samples: mean 48.0 HU, range 30.0-66.0 (target <= 20)." in lines
    # the real patients' own spread is reported beside it
    results["real"]["hu_wasserstein_real_to_pool"] = [12.0, 30.0, 45.0]
    results["real"]["references"] = ["c"]
    assert ("Real patients, for comparison (each of the 2 patients against the other 1 and 1 other real CT(s) "
            "of the region against them): mean 29.0 HU, range 12.0-45.0; 1 of 3 within 20 HU.") in markdown(results)
    # one real patient: no leave-one-out, the references are scored against it
    results["real"].update(paths=["a"], hu_wasserstein_real_to_pool=[31.9, 31.0], references=["c", "d"])
    assert ("Real patients, for comparison (2 other real CT(s) of the region against the real CT): mean 31.4 HU, "
            "range 31.0-31.9; 0 of 2 within 20 HU.") in markdown(results)
    # the samples pooled, beside the references pooled (one real patient) ...
    results.update(samples_pooled_hu_wasserstein=41.5)
    results["real"]["hu_wasserstein_references_pooled"] = 27.25
    assert ("All 2 samples pooled against the real patients pooled: 41.5 HU; the other real CT(s) pooled "
            "against them: 27.2 HU.") in markdown(results)
    # the bone share of the samples beside the real patients'
    results["samples"][0]["bone_share_percent"], results["samples"][1]["bone_share_percent"] = 0.5, 2.5
    results["real"]["bone_share_percent"] = [4.0, 6.0, 8.0]
    assert ("Body above 300 HU (bone): samples 0.5-2.5 % (mean 1.5); real patients 4.4-7.6 % (10th-90th "
            "percentile, mean 6.0).") in markdown(results)
    # ... or beside real patients pooled as many at a time (enough patients)
    del results["real"]["hu_wasserstein_references_pooled"]
    results["real"].update(paths=list("abcdef"), hu_wasserstein_real_groups_to_pool=[10.0, 20.0, 15.0])
    assert ("All 2 samples pooled against the real patients pooled: 41.5 HU; real patients pooled 2 at a time "
            "against the others: mean 15.0 HU, range 10.0-20.0 (3 groups).") in markdown(results)


def test_bone_share_counts_body_voxels_above_300_hu():
    from training.evaluate.synthesis import bone_share

    volume = np.full((4, 10, 10), -1000.0)
    volume[:, 2:8, 2:8] = 40.0  # 144 body voxels of soft tissue
    volume[:, 4:6, 4:6] = 700.0  # 16 of them bone
    volume[0, 0, 0] = 250.0  # dense but under the threshold
    assert bone_share(volume) == pytest.approx(16 / 145 * 100)
    assert np.isnan(bone_share(np.full((2, 2, 2), -1000.0)))


def test_synthesis_picture_shows_soft_tissue_and_bone_windows(tmp_path):
    from skimage import io as skio

    from training.evaluate.synthesis import picture

    vol = np.full((32, 32, 32), 40.0, dtype=np.float32)  # soft tissue
    vol[:, 12:20, 12:20] = 1000.0                          # a bony column through every axial slice
    picture([vol, vol], ["a", "b"], tmp_path / "p.png")
    image = skio.imread(tmp_path / "p.png")
    assert image.shape == (2 * (128 + 4), 6 * 128)          # 2 rows; 3 planes x 2 windows, 128 px tiles
    axial_soft, axial_bone = image[:128, :128], image[:128, 3 * 128:4 * 128]
    assert axial_soft[64, 64] == 255 and axial_bone[64, 64] < 255  # bone saturates only in the soft window
    assert axial_soft[5, 5] == 127 and axial_bone[5, 5] == 76        # 40 HU: mid-grey; 0.3 of the bone window
    assert "W400 L40 then W1800 L400" in (tmp_path / "p.txt").read_text()


def test_real_ct_in_the_samples_field_of_view_is_its_body_centred():
    from training.evaluate.synthesis import in_sample_field

    # a 100-slice scan whose body (40 HU, a 20 x 30 x 24 block with a 700 HU core) sits off centre
    scan = np.full((100, 80, 90), -1024.0, np.float32)
    scan[10:30, 5:35, 50:74] = 40.0
    scan[18:22, 18:22, 60:64] = 700.0
    field = in_sample_field(scan, (16, 40, 40))
    assert field.shape == (16, 40, 40)
    body = field > -500
    # the body's (plus 4-voxel margin) box is centred: 20 slices cropped to the middle 16, 30 x 24 padded
    for axis, extent in ((1, 30), (2, 24)):
        idx = np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != axis)))
        assert len(idx) == extent and abs((idx[0] + idx[-1]) / 2 - 19.5) <= 0.5
    assert body.all(axis=(1, 2)).sum() == 0 and body.any(axis=(1, 2)).all()  # every slice holds body
    # HU kept: the core and the tissue, air around
    assert field.max() == 700.0 and np.median(field[body]) == 40.0 and field[0, 0, 0] == -1024.0
