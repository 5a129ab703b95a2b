"""CT <-> MR translation: simulator, paired data, guidance, task, CLI, training,
evaluation, and Stable Diffusion (InstructPix2Pix / ControlNet) pipelines."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_mediffuse import io
from napari_mediffuse.engine.checkpoint import CheckpointError
from napari_mediffuse.io.volume import Volume
from napari_mediffuse.tasks.common import RunOptions, TaskInputError
from napari_mediffuse.tasks.translate import cfg_combine, guided_predictor, translate
from training import mr_simulator, paired

from conftest import TINY_ARCHITECTURE, save_tiny_checkpoint, translation_card


# -- fixtures ---------------------------------------------------------------------------

@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny networks run fastest on one thread (and a busy 2-core machine
    makes 2-thread OpenMP barriers very slow)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ct_and_labels():
    from conftest import shared

    ct = io.read(shared("ct/abdomen_ct_3mm_small.nii.gz"))[0]
    seg = io.read_nifti(shared("ct/abdomen_ct_3mm_small_seg.nii.gz"), modality="OT")
    return ct, np.asarray(seg.data).astype(np.int16)


@pytest.fixture
def ct_crop(ct_and_labels):
    """8 axial slices, 64 x 80 pixels of the real CT (its own affine)."""
    ct, _ = ct_and_labels
    data = np.asarray(ct.data[10:18, 20:84, 20:100], dtype=np.float32)
    affine = ct.affine.copy()
    affine[:3, 3] = (ct.affine @ np.array([10, 20, 20, 1.0]))[:3]
    return Volume(data=data, affine=affine, modality="CT", name="ct crop")


@pytest.fixture
def ct2mr_model(tmp_path, monkeypatch):
    from napari_mediffuse.engine import registry

    folder = tmp_path / "models"
    save_tiny_checkpoint(folder / "tiny-ct2mr", name="tiny-ct2mr", task="translation", modality="CT",
                         condition_channels=3, **translation_card("ct2mr"))
    save_tiny_checkpoint(folder / "tiny-mr2ct", name="tiny-mr2ct", task="translation", modality="MR",
                         condition_channels=3, **translation_card("mr2ct"))
    monkeypatch.setenv(registry.ENV_VAR, str(folder))
    monkeypatch.setattr(registry, "user_models_dir", lambda: tmp_path / "no-user-models")
    monkeypatch.setattr(registry, "bundled_models_dir", lambda: tmp_path / "no-bundled-models")
    return folder / "tiny-ct2mr"


# -- simulator ---------------------------------------------------------------------------

def test_simulated_mr_contrasts_on_real_ct(ct_and_labels):
    ct, labels = ct_and_labels
    hu = np.asarray(ct.data, dtype=np.float32)
    t1 = mr_simulator.simulate_mr(hu, labels, contrast="T1", seed=3)
    t2 = mr_simulator.simulate_mr(hu, labels, contrast="T2", seed=3)

    def median(image, sel):
        assert sel.sum() > 50
        return float(np.median(image[sel]))

    fat = (hu > -150) & (hu < -60) & (labels == 0)
    liver, gallbladder, muscle = labels == 5, labels == 4, np.isin(labels, [86, 87])
    vertebrae, cortex = np.isin(labels, range(25, 51)), hu > 700
    # fat bright on T1w, fluid (bile) dark on T1w and bright on T2w, cortex dark
    assert median(t1.mr, fat) > 1.3 * median(t1.mr, liver)
    assert median(t1.mr, fat) > 1.5 * median(t1.mr, muscle)
    assert median(t1.mr, gallbladder) < 0.7 * median(t1.mr, liver)
    assert median(t2.mr, gallbladder) > 2.0 * median(t2.mr, liver)
    assert median(t2.mr, gallbladder) > 2.0 * median(t2.mr, fat)
    assert median(t1.mr, cortex) < 0.8 * median(t1.mr, muscle)
    assert median(t1.mr, cortex) < 0.6 * median(t1.mr, vertebrae)
    # the body mask holds the body; outside it only noise
    assert t1.mask[hu > -300].mean() > 0.99
    assert median(t1.mr, ~t1.mask) < 0.1 * median(t1.mr, fat)
    assert t1.mr.shape == hu.shape and np.isfinite(t1.mr).all() and t1.mr.min() >= 0
    # deterministic given the seed; the seed changes bias and noise only
    again = mr_simulator.simulate_mr(hu, labels, contrast="T1", seed=3)
    other = mr_simulator.simulate_mr(hu, labels, contrast="T1", seed=4)
    np.testing.assert_array_equal(t1.mr, again.mr)
    assert not np.allclose(t1.mr, other.mr)
    np.testing.assert_allclose(t1.clean, other.clean)
    # without labels: HU-only classes, still fat bright and cortex dark
    hu_only = mr_simulator.simulate_mr(hu, None, contrast="T1", seed=3)
    soft = (hu > 30) & (hu < 70)
    assert median(hu_only.mr, fat) > 1.5 * median(hu_only.mr, soft)
    assert median(hu_only.mr, cortex) < median(hu_only.mr, soft)


def test_spin_echo_equation():
    t = mr_simulator.Tissue(t1=500.0, t2=50.0, pd=0.8)
    assert mr_simulator.spin_echo(t, 500.0, 15.0) == pytest.approx(0.8 * (1 - np.exp(-1)) * np.exp(-0.3))
    s1, s2 = mr_simulator.tissue_signals("T1"), mr_simulator.tissue_signals("T2")
    assert s1["fat"] > s1["liver"] > s1["fluid"] and s2["fluid"] > s2["fat"] > s2["liver"]
    assert s1["cortical_bone"] < 1e-6
    with pytest.raises(ValueError, match="contrast"):
        mr_simulator.tissue_signals("PD")


def test_label_crop_placed_by_offset(tmp_path, ct_and_labels):
    """The config's labels_offset puts the 30-slice segmentation on the right
    slices of the 112-slice CT (bile in the gallbladder label comes out dark)."""
    from conftest import shared

    spec = {"ct": str(shared("ct/abdomen_ct_3mm.nii.gz")),
            "labels": str(shared("ct/abdomen_ct_3mm_small_seg.nii.gz")),
            "labels_offset": [82, 0, 0], "contrast": "T2", "variants": 2, "seed": 5}
    pairs = paired.simulated_pairs(spec, region="abdomen")
    assert len(pairs) == 2 and pairs[0].ct.shape == (112, 101, 122)
    _, labels = ct_and_labels
    gall = np.zeros(pairs[0].ct.shape, bool)
    gall[82:] = labels == 4
    liver = np.zeros_like(gall)
    liver[82:] = labels == 5
    assert np.median(pairs[0].mr[gall]) > 2 * np.median(pairs[0].mr[liver])  # fluid bright on T2w
    assert not np.allclose(pairs[0].mr, pairs[1].mr)  # variants: other noise and bias
    with pytest.raises(ValueError, match="grid"):
        paired.simulated_pairs({**spec, "labels_offset": None})


# -- paired datasets ---------------------------------------------------------------------

def _write(path, data, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine),
             str(path))


def _case(rng, shape=(16, 20, 10)):
    ct = rng.normal(40, 30, shape).astype(np.int16)
    ct[:3] = -1000
    mr = rng.uniform(0, 800, shape).astype(np.float32)
    mask = (ct > -500).astype(np.uint8)
    return ct, mr, mask


def test_synthrad_and_folder_layouts(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "Task1"
    for region, case in (("brain", "1BA001"), ("brain", "1BA002"), ("pelvis", "1PA001")):
        ct, mr, mask = _case(rng)
        _write(root / region / case / "ct.nii.gz", ct)
        _write(root / region / case / "mr.nii.gz", mr)
        _write(root / region / case / "mask.nii.gz", mask)
    (root / "brain" / "overview").mkdir()  # SynthRAD ships non-case folders: skipped
    cases = paired.synthrad_pairs(root)
    assert [c.case for c in cases] == ["brain/1BA001", "brain/1BA002", "pelvis/1PA001"]
    assert [c.region for c in cases] == ["head-neck", "head-neck", "abdomen"]
    assert [c.case for c in paired.synthrad_pairs(root, regions=["pelvis"])] == ["pelvis/1PA001"]
    assert len(paired.synthrad_pairs(root / "brain")) == 2  # a region folder as root
    pair = paired.read_pair(cases[0])
    assert pair.ct.shape == pair.mr.shape == pair.mask.shape
    assert pair.region == 1 and pair.mask.dtype == bool
    # display orientation: same reorientation as io.read
    np.testing.assert_array_equal(pair.ct, io.read(cases[0].ct)[0].data)

    # an MR on another grid is refused
    ct, mr, mask = _case(rng)
    _write(root / "pelvis" / "1PA002" / "ct.nii.gz", ct)
    _write(root / "pelvis" / "1PA002" / "mr.nii.gz", mr[:, :, :8])
    with pytest.raises(ValueError, match="grid"):
        paired.read_pair(paired.synthrad_pairs(root, regions=["pelvis"])[1])

    # generic layout: ct/, mr/, mask/ matched by case name
    generic = tmp_path / "pairs"
    for name in ("a", "b"):
        ct, mr, mask = _case(rng)
        _write(generic / "ct" / f"{name}.nii.gz", ct)
        _write(generic / "mr" / f"{name}.nii.gz", mr)
    _write(generic / "mask" / "a.nii.gz", mask)
    _write(generic / "ct" / "lonely.nii.gz", ct)
    cases = paired.folder_pairs(generic)
    assert [c.case for c in cases] == ["a", "b"]
    assert cases[0].mask is not None and cases[1].mask is None
    assert paired.read_pair(cases[1]).mask.any()  # body mask from the CT


def test_paired_slices_condition_and_dropout(tmp_path):
    rng = np.random.default_rng(1)
    ct, mr, mask = _case(rng, (24, 24, 12))  # NIfTI (R, A, S): display (S, P, L) = (12, 24, 24)
    _write(tmp_path / "ct" / "c.nii.gz", ct)
    _write(tmp_path / "mr" / "c.nii.gz", mr)
    base = {"direction": "ct2mr", "data": {"pairs": [{"folder": {"root": str(tmp_path)}, "region": "abdomen"}],
                                           "holdout_fraction": 0.25, "patch_size": 24, "context_slices": 1,
                                           "image_level_probability": 0.0, "min_body_fraction": 0.0}}
    volumes = paired.prepare_volumes(base)
    v = volumes[0]
    assert (v.holdout.start, v.holdout.stop) == (9, 12)  # superior block
    assert v.source.min() >= -1 and v.source.max() <= 1 and v.target.min() >= -1

    train = paired.PairedSlices(volumes, {**base["data"], "condition_dropout": 0.0})
    item = train.sample(np.random.default_rng(0))
    assert item["image"].shape == (1, 24, 24) and item["condition"].shape == (3, 24, 24)
    assert item["coords"].shape == (2, 24, 24) and int(item["region"]) == 3
    # the condition is the source slice and its neighbours; the image the target slice
    matches = [i for i in range(9) if np.allclose(item["image"][0].numpy(), v.target[i])]
    assert len(matches) == 1
    i = matches[0]
    for c, j in enumerate((max(i - 1, 0), i, min(i + 1, 8))):
        np.testing.assert_allclose(item["condition"][c].numpy(), v.source[j])

    dropped = paired.PairedSlices(volumes, {**base["data"], "condition_dropout": 1.0})
    assert float(dropped.sample(np.random.default_rng(0))["condition"].abs().max()) == 0.0
    val = paired.PairedSlices(volumes, {**base["data"], "condition_dropout": 1.0}, part="val")
    assert float(val.sample(np.random.default_rng(0))["condition"].abs().max()) > 0  # no dropout there
    # mr2ct swaps source and target
    swapped = paired.prepare_volumes({**base, "direction": "mr2ct"})[0]
    np.testing.assert_allclose(swapped.source, v.target)


# -- guidance --------------------------------------------------------------------------------

def test_cfg_formula_and_guided_predictor():
    u, c = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])
    torch.testing.assert_close(cfg_combine(u, c, 1.0), c)
    torch.testing.assert_close(cfg_combine(u, c, 0.0), u)
    torch.testing.assert_close(cfg_combine(u, c, 2.5), torch.tensor([6.0, 3.0]))

    calls = []

    def fake(x, t, *, condition, region=None):
        calls.append(x.shape[0])
        return x + condition.mean(dim=1, keepdim=True)  # "conditional" = shifted by the condition

    x, cond = torch.zeros(2, 1, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    torch.testing.assert_close(guided_predictor(fake, cond, 1.0)(x, 10), x + 0.5)
    assert calls == [2]
    torch.testing.assert_close(guided_predictor(fake, cond, 3.0)(x, 10), x + 1.5)  # 0 + 3 (0.5 - 0)
    assert calls == [2, 4]  # one batched call: conditional and unconditional
    torch.testing.assert_close(guided_predictor(fake, cond, 0.0)(x, 10), x)


def test_v_prediction_loss_and_conversion():
    """Translation models predict v; the trainer's target and the predictor's
    conversion back to eps agree, exactly where abar is tiny (t = T - 1)."""
    from napari_mediffuse.engine.inference import NoisePredictor
    from napari_mediffuse.engine.schedulers import alphas_cumprod
    from training.trainer import diffusion_loss

    schedule = {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}
    abar = alphas_cumprod(schedule)
    x0 = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 2 - 1
    noise = torch.randn(3, 1, 8, 8, dtype=torch.float64)

    class Returns(torch.nn.Module):  # a network that outputs a fixed tensor
        size_multiple = 1

        def __init__(self, value):
            super().__init__()
            self.value = value
            self.dummy = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

        def forward(self, x_t, t, *, coords=None, condition=None, region=None):
            return self.value

    for t in (0, 500, 999):
        a = float(abar[t])
        x_t = a ** 0.5 * x0 + (1 - a) ** 0.5 * noise
        v = a ** 0.5 * noise - (1 - a) ** 0.5 * x0
        eps = NoisePredictor(Returns(v), device="cpu", schedule=schedule)(x_t, t)
        assert eps.dtype == torch.float64  # float64 in, float64 out: x0 from eps at t = T needs it
        torch.testing.assert_close(eps, noise)
    sample = {**schedule, "prediction_type": "sample"}
    eps = NoisePredictor(Returns(x0), device="cpu", schedule=sample)(x_t, 999)
    torch.testing.assert_close(eps, noise)

    class Oracle(torch.nn.Module):  # returns the exact v of the batch built by the loss
        def forward(self, x_t, t, *, coords=None, condition=None, region=None):
            a = abar_f[t].view(-1, 1, 1, 1)
            return (x_t - a.sqrt() * batch["image"]) / (1 - a).sqrt() * a.sqrt() - (1 - a).sqrt() * batch["image"]

    abar_f = abar.float()
    batch = {"image": x0.float(), "coords": torch.zeros(3, 2, 8, 8), "region": torch.zeros(3, dtype=torch.long)}
    t = torch.tensor([10, 400, 800])
    loss = diffusion_loss(Oracle(), batch, abar_f, torch.Generator().manual_seed(0), torch.device("cpu"),
                          timesteps=t, prediction_type="v_prediction")
    assert float(loss) < 1e-8
    wrong = diffusion_loss(Oracle(), batch, abar_f, torch.Generator().manual_seed(0), torch.device("cpu"),
                           timesteps=t, prediction_type="epsilon")
    assert float(wrong) > 0.01
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion_loss(Oracle(), batch, abar_f, torch.Generator(), torch.device("cpu"), prediction_type="x")


# -- the task ------------------------------------------------------------------------------

def test_translate_ct_to_mr_on_input_grid(ct_crop, ct2mr_model):
    options = RunOptions(device="cpu", seed=7, batch_size=3)
    result = translate(ct_crop, direction="ct2mr", steps=2, options=options)
    assert result.data.shape == ct_crop.data.shape
    np.testing.assert_array_equal(result.affine, ct_crop.affine)
    assert result.modality == "MR" and result.metadata["synthetic"] is True
    assert "synthetic" in result.name and "tiny-ct2mr" in result.name
    assert any("not for diagnosis" in w for w in result.metadata["warnings"])
    assert result.data.min() >= 0 and result.data.max() <= 1000 and result.data.std() > 0
    assert result.metadata["parameters"]["context_slices"] == 1
    # napari: same scale and translate as the input, metadata marks it synthetic
    from napari_mediffuse.layers import image_layer_data

    _, kwargs, kind = image_layer_data(result)
    _, in_kwargs, _ = image_layer_data(ct_crop)
    assert kind == "image" and kwargs["metadata"]["synthetic"] is True and kwargs["metadata"]["modality"] == "MR"
    np.testing.assert_allclose(kwargs["scale"], in_kwargs["scale"])
    np.testing.assert_allclose(kwargs["translate"], in_kwargs["translate"])
    # same seed, other batch size: same result (one shared start noise)
    again = translate(ct_crop, direction="ct2mr", steps=2, options=RunOptions(device="cpu", seed=7, batch_size=8))
    np.testing.assert_allclose(again.data, result.data, atol=1e-3)
    other = translate(ct_crop, direction="ct2mr", steps=2, options=RunOptions(device="cpu", seed=8))
    assert not np.allclose(other.data, result.data)
    # guidance, DPM-Solver and fewer context slices run and change the result
    guided = translate(ct_crop, direction="ct2mr", steps=2, guidance=2.0, sampler="dpm", context_slices=0,
                       options=options)
    assert guided.data.shape == ct_crop.data.shape and not np.allclose(guided.data, result.data)
    # 2 steps x 2 (guidance: conditional and unconditional) x 2 samples (the default ensemble)
    assert guided.metadata["parameters"]["evaluations_per_slice"] == 8


def test_ensemble_averages_antithetic_samples(ct_crop, ct2mr_model, monkeypatch):
    """ensemble=2 is the mean of the samples drawn from noise z and -z, where
    z is the single-sample run's noise (same seed)."""
    from napari_mediffuse.tasks import translate as translate_module

    generator = torch.Generator().manual_seed(0)
    members = translate_module.ensemble_noise((1, 1, 4, 4), 3, generator)
    torch.testing.assert_close(members[1], -members[0])
    assert not torch.allclose(members[2].abs(), members[0].abs())
    first = translate_module.ensemble_noise((1, 1, 4, 4), 1, torch.Generator().manual_seed(0))
    torch.testing.assert_close(first[0], members[0])

    options = RunOptions(device="cpu", seed=5)
    one = translate(ct_crop, direction="ct2mr", steps=2, ensemble=1, options=options)
    both = translate(ct_crop, direction="ct2mr", steps=2, ensemble=2, options=options)
    original = translate_module.ensemble_noise
    monkeypatch.setattr(translate_module, "ensemble_noise",
                        lambda shape, n, gen: [-z for z in original(shape, n, gen)])
    mirrored = translate(ct_crop, direction="ct2mr", steps=2, ensemble=1, options=options)
    np.testing.assert_allclose(both.data, (one.data + mirrored.data) / 2, atol=0.05)  # MR units 0-1000
    assert not np.allclose(one.data, mirrored.data, atol=1.0)
    p = both.metadata["parameters"]
    assert p["ensemble"] == 2 and p["evaluations_per_slice"] == 4 and p["spacing"] == "quadratic"
    with pytest.raises(TaskInputError, match="ensemble"):
        translate(ct_crop, direction="ct2mr", ensemble=0, options=options)


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_translate_with_an_oracle_v_model_returns_its_target(ct_crop, ct2mr_model, monkeypatch, sampler):
    """A network that predicts the exact v of a known target image must give
    that image back, in HU, with both samplers: guards the v -> eps
    conversion (it happens once, in the predictor)."""
    from napari_mediffuse.engine.schedulers import alphas_cumprod
    from napari_mediffuse.tasks import translate as translate_module

    target_hu = 40.0  # soft tissue
    target = (target_hu + 1024.0) / 3072.0 * 2 - 1  # the card's HU window [-1024, 2048] -> [-1, 1]
    original = translate_module.load_translation_model

    def load_oracle(model, direction, options):
        checkpoint, predictor = original(model, direction, options)
        abar = alphas_cumprod(checkpoint.schedule).float()

        def oracle_v(x_t, t, *, coords=None, condition=None, region=None):
            a = abar[t].view(-1, 1, 1, 1).to(x_t.dtype)
            eps = (x_t - a.sqrt() * target) / (1 - a).sqrt()
            return a.sqrt() * eps - (1 - a).sqrt() * target

        checkpoint.network.forward = oracle_v
        return checkpoint, predictor

    monkeypatch.setattr(translate_module, "load_translation_model", load_oracle)
    mr = Volume(data=np.clip(ct_crop.data + 1000.0, 0, None), affine=ct_crop.affine, modality="MR", name="mr")
    result = translate(mr, direction="mr2ct", steps=4, guidance=1.0, sampler=sampler,
                       options=RunOptions(device="cpu", seed=3))
    assert result.modality == "CT"
    np.testing.assert_allclose(result.data, target_hu, atol=2.0)


def test_translate_mr_to_ct_and_bad_inputs(ct_crop, ct2mr_model):
    mr = ct_crop.with_data(np.clip(ct_crop.data + 1000, 0, None) / 2, modality="MR")
    synthetic_ct = translate(mr, direction="mr2ct", steps=1, options=RunOptions(device="cpu"))
    assert synthetic_ct.modality == "CT" and synthetic_ct.metadata["synthetic"]
    assert synthetic_ct.data.min() >= -1024 and synthetic_ct.data.max() <= 2048
    with pytest.raises(TaskInputError, match="needs a CT scan.*is MR"):
        translate(mr, direction="ct2mr")
    with pytest.raises(TaskInputError, match="needs a MR scan.*is CT"):
        translate(ct_crop, direction="mr2ct")
    with pytest.raises(TaskInputError, match="direction"):
        translate(ct_crop, direction="ct2pet")
    with pytest.raises(TaskInputError, match="context_slices"):
        translate(ct_crop, direction="ct2mr", context_slices=3, options=RunOptions(device="cpu"))
    with pytest.raises(CheckpointError, match="trained on CT"):  # a ct2mr model for an MR input
        translate(mr, direction="mr2ct", model=str(ct2mr_model))


def test_cli_translate_end_to_end(tmp_path, ct_crop, ct2mr_model, capsys):
    from napari_mediffuse.cli import main

    src = tmp_path / "ct.nii.gz"
    io.write_nifti(ct_crop, src)
    out = tmp_path / "synthetic_mr.nii.gz"
    rc = main(["translate", str(src), "-o", str(out), "--direction", "ct2mr", "--model", "tiny-ct2mr",
               "--steps", "2", "--guidance", "1.5", "--seed", "3", "--device", "cpu"])
    assert rc == 0 and out.exists()
    written, original = nib.load(str(out)), nib.load(str(src))
    np.testing.assert_allclose(written.affine, original.affine, atol=1e-4)
    assert written.shape == original.shape
    assert io.read(out)[0].modality == "MR"
    assert "wrote" in capsys.readouterr().out

    bad = tmp_path / "bad.nii.gz"
    with pytest.raises(SystemExit) as exc:  # argparse: invalid choice
        main(["translate", str(src), "-o", str(bad), "--direction", "sideways"])
    assert exc.value.code == 2 and not bad.exists()
    rc = main(["translate", str(src), "-o", str(bad), "--direction", "mr2ct", "--device", "cpu"])
    assert rc == 2 and not bad.exists()
    assert "needs a MR scan" in capsys.readouterr().err
    rc = main(["translate", str(src), "-o", str(out), "--direction", "ct2mr"])  # exists: refused
    assert rc == 2


def test_cli_mr_to_ct_on_real_lps_mr(tmp_path, mr_lps_path, ct2mr_model):
    """A real MR stored in LPS: the synthetic CT lies on the same voxel grid
    in scanner space (arrays are written in display orientation)."""
    from napari_mediffuse.cli import main

    out = tmp_path / "synthetic_ct.nii.gz"
    assert main(["translate", str(mr_lps_path), "-o", str(out), "--direction", "mr2ct", "--steps", "1",
                 "--device", "cpu"]) == 0
    src, res = nib.as_closest_canonical(nib.load(str(mr_lps_path))), nib.as_closest_canonical(nib.load(str(out)))
    assert src.shape == res.shape
    np.testing.assert_allclose(res.affine, src.affine, atol=1e-3)
    assert io.read(out)[0].modality == "CT"


# -- training and evaluation -----------------------------------------------------------------

def test_train_translation_then_translate_and_evaluate(tmp_path, ct_and_labels, monkeypatch):
    """The shared trainer trains a (tiny) translation model on simulated pairs;
    the exported checkpoint runs in translate() and in the evaluation."""
    from training.evaluate.translation import evaluate_translation, write_report
    from training.trainer import load_config, train

    from conftest import shared

    config = load_config("training/configs/translate_ct2mr.yaml")
    config["data"]["pairs"] = [{"simulate": {"ct": str(shared("ct/abdomen_ct_3mm_small.nii.gz")),
                                             "labels": str(shared("ct/abdomen_ct_3mm_small_seg.nii.gz")),
                                             "contrast": "T1", "variants": 1}, "region": "abdomen"}]
    config["data"]["patch_size"] = 32
    # the demo config's soft-tissue view of the CT goes through training, export and inference
    windows = config["architecture"]["condition_windows"]
    assert windows and all(-1 < low < high < 1 for low, high in windows)
    config["architecture"] = dict(TINY_ARCHITECTURE, condition_channels=3, condition_windows=windows)
    config["train"].update(batch_size=2, warmup_steps=1, log_every=1, validate_every=2, checkpoint_every=2,
                           validation_samples=4)
    folder = train(config, tmp_path / "run", max_steps=2, device="cpu")
    card = json.loads((folder / "mediffuse.json").read_text())
    assert card["architecture"]["condition_windows"] == windows
    assert card["task"] == "translation" and card["modality"] == "CT" and card["direction"] == "ct2mr"
    assert card["source_normalization"]["type"] == "hu_window"
    assert card["normalization"]["type"] == "robust_percentile" and card["trained_on_simulated_pairs"]
    assert card["training"]["data"][0]["region"] == "abdomen"

    report = evaluate_translation(folder, config, steps=1, max_slices=3, speed_size=32)
    o = report["overall"]
    assert o["slices"] == 3 and np.isfinite(o["psnr_db"]) and -1 <= o["ssim"] <= 1 and o["mae"] > 0
    assert report["speed"]["seconds_per_slice"] > 0
    assert np.isfinite(report["baseline_lookup"]["psnr_db"])
    paths = write_report(report, tmp_path / "eval")
    assert [p.suffix for p in paths] == [".json", ".md", ".png"]
    assert "PSNR" in paths[1].read_text() and json.loads(paths[0].read_text())["direction"] == "ct2mr"


def test_clean_mr_target_uses_the_acquired_mr_units():
    """data.mr_target 'clean': the target is the simulator's bias- and
    noise-free MR, normalised with the acquired MR's robust range (so the
    model's units are the reference's); pairs without it are refused."""
    from napari_mediffuse.engine.intensity import intensity_range, normalize
    from training.paired import PairedVolume, normalize_pair

    rng = np.random.default_rng(0)
    ct = rng.normal(40, 30, (4, 16, 16)).astype(np.float32)
    clean = np.full(ct.shape, 500.0, np.float32)
    clean[:, :8] = 900.0
    acquired = clean * 1.1 + rng.normal(0, 20, ct.shape).astype(np.float32)
    pair = PairedVolume(ct=ct, mr=acquired, mask=np.ones(ct.shape, bool), spacing=(3.0, 3.0, 3.0), region=3,
                        source="sim", mr_clean=clean)
    rule = {"type": "robust_percentile", "low_pct": 0.5, "high_pct": 99.5}
    config = {"direction": "ct2mr", "normalization": rule, "data": {"mr_target": "clean"}}
    _, target = normalize_pair(pair, config)
    low, high = intensity_range(acquired, rule)
    assert high > 1000  # the acquired range, not the clean one (500-900)
    np.testing.assert_allclose(target, normalize(clean, rule, (low, high)), atol=1e-6)
    _, acquired_target = normalize_pair(pair, dict(config, data={}))
    np.testing.assert_allclose(acquired_target, normalize(acquired, rule, (low, high)), atol=1e-6)
    with pytest.raises(ValueError, match="needs simulated pairs"):
        normalize_pair(PairedVolume(ct=ct, mr=acquired, mask=pair.mask, spacing=pair.spacing, region=3,
                                    source="real pair"), config)
    with pytest.raises(ValueError, match="mr_target"):
        normalize_pair(pair, dict(config, data={"mr_target": "denoised"}))


def test_lookup_baseline_recovers_a_voxelwise_mapping_from_training_slices_only():
    """The baseline fits source level -> target on the training slices and is
    scored on the held-out block: exact for a voxelwise map, blind to a
    held-out-only change."""
    from training.evaluate.translation import lookup_baseline
    from training.paired import PairedVolume

    rng = np.random.default_rng(0)
    ct = rng.uniform(-1000, 1000, (20, 24, 24)).astype(np.float32)
    mr = np.where(ct < -100, 0.0, np.where(ct < 200, 800.0 + ct, 100.0)).astype(np.float32)
    pair = PairedVolume(ct=ct, mr=mr, mask=np.ones(ct.shape, bool), spacing=(3.0, 3.0, 3.0), region=3,
                        source="synthetic", affine=np.eye(4))
    data = {"holdout_fraction": 0.25}
    rules = ({"type": "hu_window", "low": -1024.0, "high": 2048.0},
             {"type": "robust_percentile", "low_pct": 0.0, "high_pct": 100.0})
    exact = lookup_baseline([pair], data, "ct2mr", *rules, bins=4096, smooth_voxels=0)
    assert exact["psnr_db"] > 30 and exact["ssim"] > 0.95
    # brighter MR in the held-out block only: the table never saw it
    shifted = mr.copy()
    shifted[15:] = np.where(shifted[15:] > 0, shifted[15:] * 0.5, 0)
    pair_shifted = PairedVolume(ct=ct, mr=shifted, mask=pair.mask, spacing=pair.spacing, region=3,
                                source="synthetic", affine=np.eye(4))
    assert lookup_baseline([pair_shifted], data, "ct2mr", *rules, bins=4096, smooth_voxels=0)["psnr_db"] < 15


def test_masked_metrics():
    from training.evaluate.translation import masked_mae, masked_psnr, masked_ssim

    rng = np.random.default_rng(0)
    ref = rng.uniform(0, 1, (2, 32, 32))
    mask = np.zeros(ref.shape, bool)
    mask[:, 8:24, 8:24] = True
    pred = ref.copy()
    pred[:, :4] += 5.0  # errors outside the mask (and its SSIM windows) do not count
    assert masked_mae(pred, ref, mask) == 0 and masked_psnr(pred, ref, mask, 1.0) == float("inf")
    assert masked_ssim(pred, ref, mask, 1.0) == pytest.approx(1.0)
    assert masked_ssim(pred, ref, np.ones_like(mask), 1.0) < 0.9
    pred[mask] += 0.1
    assert masked_mae(pred, ref, mask) == pytest.approx(0.1)
    assert masked_psnr(pred, ref, mask, 1.0) == pytest.approx(20.0)


# -- Stable Diffusion pipelines (Mediffuse checkpoints) ----------------------------------------

def _tiny_sd_components(tmp_path, *, unet_in_channels):
    pytest.importorskip("transformers")
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_attention_heads=2,
        num_hidden_layers=1, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        projection_dim=16))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=unet_in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=2,
        norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def test_instruct_pix2pix_pipeline_slicewise(tmp_path, ct_crop):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    folder = tmp_path / "ip2p"
    StableDiffusionInstructPix2PixPipeline(**_tiny_sd_components(tmp_path, unet_in_channels=8)).save_pretrained(folder)
    volume = ct_crop.with_data(ct_crop.data[:3], affine=ct_crop.affine)
    done = []
    result = translate(volume, direction="ct2mr", model=str(folder), steps=2, guidance=3.0, image_guidance=1.2,
                       prompt="translate", resolution=16,
                       options=RunOptions(device="cpu", seed=1, batch_size=2,
                                          progress=lambda d, t, m: done.append((d, t))))
    assert result.data.shape == volume.data.shape
    np.testing.assert_array_equal(result.affine, volume.affine)
    assert result.modality == "MR" and result.metadata["synthetic"]
    assert result.metadata["parameters"]["pipeline"] == "instruct-pix2pix"
    assert result.metadata["parameters"]["image_guidance"] == 1.2
    assert 0 <= result.data.min() and result.data.max() <= 1000 and result.data.std() > 0
    assert done[-1] == (6, 6)  # 3 slices x 2 steps
    again = translate(volume, direction="ct2mr", model=str(folder), steps=2, guidance=3.0, image_guidance=1.2,
                      prompt="translate", resolution=16, options=RunOptions(device="cpu", seed=1, batch_size=3))
    np.testing.assert_allclose(again.data, result.data, atol=0.5)  # seeded per slice


def test_controlnet_pipeline_on_canny_edges(tmp_path, ct_crop):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from napari_mediffuse.tasks.sd_pipelines import canny_edges, to_unit

    components = _tiny_sd_components(tmp_path, unet_in_channels=4)
    torch.manual_seed(0)
    controlnet = ControlNetModel(
        in_channels=4, block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        layers_per_block=1, cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
        conditioning_embedding_out_channels=(4, 8))
    folder = tmp_path / "controlnet"
    StableDiffusionControlNetPipeline(controlnet=controlnet, **components).save_pretrained(folder)
    volume = ct_crop.with_data(ct_crop.data[:2], affine=ct_crop.affine)
    result = translate(volume, direction="ct2mr", model=str(folder), steps=2, resolution=16,
                       options=RunOptions(device="cpu", seed=0))
    assert result.data.shape == volume.data.shape and result.modality == "MR"
    np.testing.assert_array_equal(result.affine, volume.affine)
    assert result.metadata["parameters"]["pipeline"] == "controlnet"
    # Canny edges of the CT: the body outline is an edge, a flat image has none
    edges = canny_edges(to_unit(volume.data[0], "CT"))
    assert edges.sum() > 20 and not canny_edges(np.full((32, 32), 0.5)).any()


def test_not_a_translation_pipeline(tmp_path, ct_crop):
    from napari_mediffuse.cli import main

    folder = tmp_path / "sd"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(TaskInputError, match="StableDiffusionPipeline pipeline.*InstructPix2Pix"):
        translate(ct_crop, direction="ct2mr", model=str(folder))
    src, out = tmp_path / "ct.nii.gz", tmp_path / "out.nii.gz"
    io.write_nifti(ct_crop, src)
    assert main(["translate", str(src), "-o", str(out), "--direction", "ct2mr", "--model", str(folder)]) == 2
    assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="not a mediffuse checkpoint"):
        translate(ct_crop, direction="ct2mr", model=str(empty))


def test_dock_tab_spec_runs_translation(ct_crop, ct2mr_model):
    """The panel tab's run function (worker-thread side, no viewer needed)."""
    pytest.importorskip("qtpy")
    from napari_mediffuse.layers import image_layer_data
    from napari_mediffuse.gui.specs import translate_spec

    spec = translate_spec()
    assert spec.modalities == ("CT", "MR") and spec.model_task == "translation"
    values = {p.name: p.default for p in spec.params}
    assert {"direction", "steps", "guidance", "seed", "batch_size"} <= set(values)
    values.update(model=str(ct2mr_model), steps=1)
    values.pop("seed"), values.pop("batch_size")  # the tab moves these into the options
    [(data, kwargs, kind)] = spec.run(ct_crop, values, RunOptions(device="cpu"))
    assert kind == "image" and data.shape == ct_crop.data.shape
    assert "synthetic" in kwargs["name"] and kwargs["metadata"]["synthetic"] is True
    _, in_kwargs, _ = image_layer_data(ct_crop)
    np.testing.assert_allclose(kwargs["scale"], in_kwargs["scale"])
    np.testing.assert_allclose(kwargs["translate"], in_kwargs["translate"])


# -- multi-region simulated pairs (OpenKBP structures, split by patient, per-region evaluation) --

def _blocks_volume():
    """An 8 x 24 x 24 HU volume of homogeneous 8 x 8 x 8 blocks: HU and OpenKBP labels."""
    hu = np.full((8, 24, 24), 40.0, np.float32)
    labels = np.zeros(hu.shape, np.int16)
    blocks = {  # (row, column) of the block: (HU, label)
        (0, 0): (40.0, 0),      # unlabelled soft tissue
        (0, 1): (35.0, 2),      # spinal cord
        (0, 2): (100.0, 7),     # mandible marrow (100 HU: below the HU rules' bone threshold)
        (1, 0): (40.0, 8),      # PTV56: a target margin, so the HU rules
        (1, 1): (10.0, 3),      # right parotid
        (1, 2): (1000.0, 0),    # unlabelled bone (the skull, the vertebrae: not OpenKBP structures)
        (2, 0): (-100.0, 0),    # fat
        (2, 1): (30.0, 1),      # brainstem
        (2, 2): (40.0, 5),      # oesophagus wall
    }
    for (r, c), (value, label) in blocks.items():
        hu[:, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = value
        labels[:, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = label
    return hu, labels


def test_openkbp_structures_set_the_tissue_signal():
    """label_scheme 'openkbp': spinal cord, brainstem, parotid, oesophagus and
    mandible get their tissue's T1w spin-echo signal; PTV and unlabelled
    voxels the HU rules; unlabelled bone stays bone (only the mandible is drawn)."""
    hu, labels = _blocks_volume()
    kw = dict(contrast="T1", bias=0.0, noise=0.0, blur=0.0, smooth_ct=0.0)
    sim = mr_simulator.simulate_mr(hu, labels, label_scheme="openkbp", **kw).clean
    hu_only = mr_simulator.simulate_mr(hu, None, **kw).clean
    s = mr_simulator.tissue_signals("T1")

    def at(image, r, c):
        return float(image[4, 8 * r + 4, 8 * c + 4])

    soft = at(sim, 0, 0)
    assert at(hu_only, 0, 0) == pytest.approx(soft, rel=1e-5)
    # ratios to the HU rules' soft tissue (the 1000-scaling cancels)
    assert at(sim, 0, 1) / soft == pytest.approx(s["spinal_cord"] / s["soft_tissue"], rel=1e-4)
    assert at(sim, 2, 1) / soft == pytest.approx(s["white_matter"] / s["soft_tissue"], rel=1e-4)
    assert at(sim, 2, 2) / soft == pytest.approx(s["bowel"] / s["soft_tissue"], rel=1e-4)
    assert at(sim, 0, 2) / soft == pytest.approx(s["marrow"] / s["soft_tissue"], rel=1e-4)
    assert at(hu_only, 0, 2) == pytest.approx(soft, rel=1e-5)  # 100 HU without the label: soft tissue
    # parotid at 10 HU (its nominal HU): fatty gland, between fat and muscle on T1w
    assert at(sim, 1, 1) / soft == pytest.approx(s["parotid"] / s["soft_tissue"], rel=1e-4)
    assert s["fat"] > s["parotid"] > s["muscle"]
    assert at(sim, 1, 0) == pytest.approx(soft, rel=1e-5)  # PTV: HU rules
    assert at(sim, 1, 2) < 0.05 * soft  # 1000 HU unlabelled: cortical bone, dark
    assert at(sim, 2, 0) / soft == pytest.approx(s["fat"] / s["soft_tissue"], rel=1e-4)
    # the default TotalSegmentator legend reads the same numbers as other organs (2: a kidney)
    ts = mr_simulator.simulate_mr(hu, labels, **kw).clean
    assert at(ts, 0, 1) / soft == pytest.approx(s["kidney"] / s["soft_tissue"], rel=1e-4)
    with pytest.raises(ValueError, match="label_scheme"):
        mr_simulator.simulate_mr(hu, labels, label_scheme="brats", **kw)


def test_openkbp_patient_simulated_with_its_structures():
    """A real OpenKBP patient read from its folder as the CT prior reads it
    (glob, orientation_fix): the structures on the same grid, the spinal
    cord brighter than the HU rules make it on T1w, the PTV no different."""
    from conftest import shared

    root = shared("ct/openkbp/train")
    spec = {"ct": str(root), "glob": "*/ct.nii.gz", "patients": ["pt_1"], "labels": "structures.nii.gz",
            "label_scheme": "openkbp", "orientation_fix": ["rot90_PL", "flip_S"], "contrast": "T1", "seed": 2}
    (pair,) = paired.simulated_pairs(spec, region="head-neck")
    assert pair.patient == "pt_1" and pair.ct.shape == (128, 128, 128) and pair.affine is None
    assert pair.spacing == pytest.approx((2.5, 3.906, 3.906), abs=1e-3)
    hu_only = paired.simulated_pairs({**spec, "labels": None}, region="head-neck")[0]
    from scipy import ndimage

    from training.data import fix_orientation

    labels = np.asarray(io.read_nifti(root / "pt_1" / "structures.nii.gz", modality="OT").data)
    labels, _ = fix_orientation(labels, (1, 1, 1), spec["orientation_fix"])
    # the cord is 2-3 voxels wide at 3.9 mm: partial volume brings its median below the pure ratio
    cord = (labels == 2) & (pair.ct > 0) & (pair.ct < 80)
    assert cord.sum() > 200
    ratio = np.median(pair.mr_clean[cord]) / np.median(hu_only.mr_clean[cord])
    s = mr_simulator.tissue_signals("T1")
    assert 1.06 < ratio < 1.2 and s["spinal_cord"] / s["soft_tissue"] == pytest.approx(1.18, abs=0.01)
    mandible = (labels == 7) & (pair.ct > 200)
    assert mandible.sum() > 500 and np.median(pair.mr_clean[mandible]) < 0.5 * np.median(pair.mr_clean[cord])
    ptv = ndimage.binary_erosion(labels >= 8, iterations=2)
    assert ptv.sum() > 100
    assert np.median(pair.mr_clean[ptv]) == pytest.approx(np.median(hu_only.mr_clean[ptv]), rel=0.03)
    with pytest.raises(FileNotFoundError, match="pt_999"):
        paired.simulated_pairs({**spec, "patients": ["pt_999"]})
    # a thin-slice CT may be simulated on a coarser grid (the memory of a 1 mm chest CT)
    small = {"ct": str(shared("ct/abdomen_ct_3mm_small.nii.gz")), "resample_mm": 6.0}
    (coarse,) = paired.simulated_pairs(small, region="abdomen")
    assert coarse.spacing == (6.0, 6.0, 6.0) and coarse.ct.shape == (15, 50, 61) and coarse.mr.shape == coarse.ct.shape
    with pytest.raises(ValueError, match="resample_mm"):
        paired.simulated_pairs({**spec, "resample_mm": 2.0})


def test_pair_split_refuses_a_patient_in_both_lists_and_missing_files(tmp_path):
    from training.data import ConfigError
    from training.trainer import load_config

    rng = np.random.default_rng(0)
    for pt in ("pt_1", "pt_2", "pt_3"):
        _write(tmp_path / "kbp" / pt / "ct.nii.gz", rng.normal(40, 30, (8, 10, 12)).astype(np.int16))
    train = {"simulate": {"ct": str(tmp_path / "kbp"), "glob": "*/ct.nii.gz", "patients": ["pt_1", "pt_2"]},
             "region": "head-neck"}
    held = {"simulate": {"ct": str(tmp_path / "kbp"), "patients": ["pt_3"]}, "region": "head-neck"}
    assert paired.check_pair_split({"pairs": [train], "heldout_pairs": [held]}) == \
        {"pairs": ["pt_1", "pt_2"], "heldout_pairs": ["pt_3"]}
    shared_patient = {"simulate": {"ct": str(tmp_path / "kbp" / "pt_2" / "ct.nii.gz")}, "region": "head-neck"}
    with pytest.raises(ConfigError, match="'pt_2' is in data.pairs .* and in data.heldout_pairs"):
        paired.check_pair_split({"pairs": [train], "heldout_pairs": [held, shared_patient]})
    with pytest.raises(FileNotFoundError, match="no_such.nii.gz"):
        paired.check_pair_split({"pairs": [train], "heldout_pairs": [{"simulate": {"ct": str(tmp_path / "no_such.nii.gz")}}]})
    with pytest.raises(FileNotFoundError, match="structures.nii.gz"):
        paired.check_pair_split({"pairs": [{"simulate": {**train["simulate"], "labels": "structures.nii.gz"}}]})
    # before anything is loaded or trained
    with pytest.raises(ConfigError, match="split by patient"):
        paired.prepare_volumes({"direction": "ct2mr", "data": {"pairs": [train], "heldout_pairs": [shared_patient]}})
    # the shipped multi-region configs: OpenKBP validation patients and the LIDC chest held out
    for direction in ("ct2mr", "mr2ct"):
        config = load_config(f"training/configs/translate_{direction}_multi.yaml")
        if not paired.resolve_path(config["data"]["pairs"][0]["simulate"]["ct"]).exists():
            pytest.skip("shared data not available")
        split = paired.check_pair_split(config["data"])
        assert not set(split["pairs"]) & set(split["heldout_pairs"])
        assert "chest_ct_lidc0314_1mm" in split["heldout_pairs"] and "pt_201" in split["heldout_pairs"]
        assert len([p for p in split["pairs"] if p.startswith("pt_")]) >= 20
        assert config["data"]["spacing_mm"] <= 1.5


def test_per_region_evaluation_with_lookup_beside_the_model(tmp_path):
    """A tiny model trained 2 steps on an OpenKBP patient and the abdominal
    crop; the evaluation reports head-neck (a held-out validation patient)
    and abdomen (its held-out block) separately, with the lookup table."""
    from training.evaluate.translation import evaluate_translation, markdown, write_report
    from training.trainer import load_config, train

    from conftest import shared

    kbp = {"glob": "*/ct.nii.gz", "labels": "structures.nii.gz", "label_scheme": "openkbp",
           "orientation_fix": ["rot90_PL", "flip_S"], "contrast": "T1"}
    config = load_config("training/configs/translate_ct2mr_multi.yaml")
    config["data"].update(
        pairs=[{"simulate": {**kbp, "ct": str(shared("ct/openkbp/train")), "patients": ["pt_1"]}, "region": "head-neck"},
               {"simulate": {"ct": str(shared("ct/abdomen_ct_3mm_small.nii.gz"))}, "region": "abdomen",
                "holdout_fraction": 0.2}],
        heldout_pairs=[{"simulate": {**kbp, "ct": str(shared("ct/openkbp/validation")), "patients": ["pt_201"]},
                        "region": "head-neck"}],
        spacing_mm=6.0, patch_size=32)
    windows = config["architecture"]["condition_windows"]
    config["architecture"] = dict(TINY_ARCHITECTURE, condition_channels=3, condition_windows=windows)
    config["train"].update(batch_size=2, warmup_steps=1, log_every=1, validate_every=2, checkpoint_every=2,
                           validation_samples=4)
    folder = train(config, tmp_path / "run", max_steps=2, device="cpu")
    card = json.loads((folder / "mediffuse.json").read_text())
    assert card["slice_spacing_mm"] == 6.0
    assert {e["region"] for e in card["training"]["data"]} == {"head-neck", "abdomen"}

    report = evaluate_translation(folder, config, steps=1, ensemble=1, max_slices=2, speed_size=None,
                                  command="python -m training.evaluate translation run --config multi.yaml")
    assert set(report["regions"]) == {"head-neck", "abdomen"}
    hn, ab = report["regions"]["head-neck"], report["regions"]["abdomen"]
    assert hn["patients"] == ["pt_201"] and ab["patients"] == ["abdomen_ct_3mm_small"]
    for r in (hn, ab):
        assert r["model"]["slices"] == 2
        for m in (r["model"], r["baseline_lookup"]):
            assert np.isfinite(m["psnr_db"]) and -1 <= m["ssim"] <= 1 and 0 < m["mae"] < 1
        assert r["model_beats_lookup_psnr"] == (r["model"]["psnr_db"] > r["baseline_lookup"]["psnr_db"])
    assert hn["baseline_lookup"]["fitted_on"] == "training slices of this region"
    assert [p["held_out_patient"] for p in report["pairs"]] == [False, True]  # pt_1 has no held-out block
    text = markdown(report)
    assert "python -m training.evaluate translation run" in text and "| head-neck | 2 | 1 |" in text
    paths = write_report(report, tmp_path / "eval")
    assert sorted(p.name for p in paths if p.suffix == ".png") == [
        "translation_ct2mr.png", "translation_ct2mr_abdomen.png", "translation_ct2mr_head-neck.png"]


def test_a_multi_region_model_conditions_on_the_scans_own_region_when_none_is_given():
    """A model trained on several regions never saw class 0 ('unknown'): with no
    --region, the class is the scan's own (judged from its width and lung)."""
    from napari_mediffuse.engine.networks import REGIONS
    from napari_mediffuse.io.volume import Volume
    from napari_mediffuse.tasks.translate import _region

    card = {"training": {"data": [{"region": "head-neck"}, {"region": "chest"}, {"region": "abdomen"}]}}
    yy, xx = np.mgrid[:128, :128]

    def body(width_mm: float, pixel_mm: float, lung: bool) -> Volume:
        half = width_mm / pixel_mm / 2
        inside = ((xx - 64) / half) ** 2 + ((yy - 64) / (0.7 * half)) ** 2 < 1
        ct = np.where(inside, 40.0, -1000.0)
        if lung:  # two lungs, about a third of the body's area
            for cx in (64 - half / 2, 64 + half / 2):
                ct[((xx - cx) / (0.35 * half)) ** 2 + ((yy - 64) / (0.45 * half)) ** 2 < 1] = -850.0
        return Volume(np.repeat(ct[None], 8, axis=0).astype(np.float32),
                      np.diag([2.0, pixel_mm, pixel_mm, 1.0]), modality="CT")

    assert _region(card, None, body(150.0, 1.5, lung=False)) == REGIONS.index("head-neck")
    assert _region(card, None, body(340.0, 3.0, lung=True)) == REGIONS.index("chest")
    assert _region(card, None, body(340.0, 3.0, lung=False)) == REGIONS.index("abdomen")
    assert _region(card, "chest", body(150.0, 1.5, lung=False)) == REGIONS.index("chest")  # the user's word wins
    one = {"training": {"data": [{"region": "abdomen"}]}}
    assert _region(one, None, body(150.0, 1.5, lung=False)) == REGIONS.index("abdomen")  # the demo's only region
