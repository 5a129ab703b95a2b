"""Every diffusion task through the shared slice runner: the network's device,
batch-size invariance and preview (slab) invariance, with the bundled models.

The device tests put the network on PyTorch's ``meta`` device: a tensor that
meets it from another device raises ("Tensor on device meta is not on the
expected device cpu!"), so a task that completes on ``meta`` placed every
tensor the network meets on the network's device. ``SliceRunner.numpy`` turns
meta results into zeros, so only placement is checked there; the values are
checked by the invariance tests on the CPU.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mediffuse import io
from napari_mediffuse.plugin import sample_ct_path
from napari_mediffuse.tasks import anomaly, denoise, inpaint, sample_images, superres, synthesize, translate
from napari_mediffuse.tasks.common import RunOptions

META = torch.device("meta")


@pytest.fixture(scope="module")
def ct_crop():
    """5 axial slices of 64 x 64 pixels (3 mm) through the sample CT's body, HU."""
    ct, = io.read(sample_ct_path())
    s, p, l = (n // 2 for n in ct.data.shape)
    return ct.slab(s - 2, s + 3).with_data(np.array(ct.data[s - 2:s + 3, p - 32:p + 32, l - 32:l + 32]),
                                           affine=_crop_affine(ct, s - 2, p - 32, l - 32))


def _crop_affine(volume, *start):
    affine = np.array(volume.affine)
    affine[:3, 3] = (affine @ np.array([*start, 1.0]))[:3]
    return affine


def lesion_mask(volume):
    mask = np.zeros(volume.data.shape, dtype=bool)
    mask[1:4, 26:38, 26:38] = True
    return mask


def assert_same_up_to_float_rounding(a, b):
    """Equal to float tolerance: convolutions may sum in another order for
    another batch size; an integer result (HU of an integer scan) may then
    round a value near .5 the other way, by 1, in a few voxels."""
    if np.issubdtype(a.dtype, np.integer):
        diff = np.abs(a.astype(np.int64) - b.astype(np.int64))
        assert diff.max() <= 1 and np.count_nonzero(diff) <= 1e-3 * diff.size
    else:
        np.testing.assert_allclose(a, b, atol=0.05, rtol=0)


#: name -> (function of (volume, options), cheap settings)
TASKS = {
    "denoise": lambda v, o: denoise.denoise(v, options=o).data,
    # one plane direction (both are covered by tests/test_clinical_grids.py)
    "sr": lambda v, o: superres.super_resolve(v, factor=2, method="diffusion", steps=2, planes="coronal",
                                              options=o).data,
    "anomaly": lambda v, o: anomaly.detect_anomalies(v, roi=np.ones(v.data.shape, bool), t=150, ensemble=2,
                                                     steps=2, patch_mm=None, options=o).reconstruction.data,
    "inpaint": lambda v, o: inpaint.inpaint(v, lesion_mask(v), steps=4, resample=1, options=o).data,
    "translate": lambda v, o: translate.translate(v, direction="ct2mr", steps=2, options=o).data,
}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_runs_with_the_network_on_another_device(task, ct_crop):
    out = TASKS[task](ct_crop, RunOptions(device=META, batch_size=2))
    assert out.shape[1:] == ct_crop.data.shape[1:]


def test_synthesis_and_image_samples_run_with_the_network_on_another_device():
    volume = synthesize.synthesize((64, 64, 64), steps=2, coarse_model="none", options=RunOptions(device=META))
    assert volume.data.shape == (64, 64, 64)
    images = sample_images.sample_images(count=3, steps=2, options=RunOptions(device=META, batch_size=2))
    assert images.shape[0] == 3


@pytest.mark.parametrize("task", sorted(TASKS))
def test_same_seed_same_result_at_any_batch_size(task, ct_crop):
    # 3 then 8 slices a batch: other groupings of the slices (and, for SR, of the 64 planes)
    three = TASKS[task](ct_crop, RunOptions(device="cpu", batch_size=3, seed=3))
    eight = TASKS[task](ct_crop, RunOptions(device="cpu", batch_size=8, seed=3))
    assert np.isfinite(three).all()
    assert_same_up_to_float_rounding(three, eight)
    if task in ("denoise", "inpaint"):  # cheap ones: the seed is what the result depends on
        other_seed = TASKS[task](ct_crop, RunOptions(device="cpu", batch_size=8, seed=4))
        assert np.abs(other_seed - eight).max() > 0.5, "the seed must matter"


@pytest.mark.parametrize("task", ["denoise", "inpaint", "anomaly"])
def test_preview_slab_equals_the_slice_of_the_whole_run(task, ct_crop):
    whole = TASKS[task](ct_crop, RunOptions(device="cpu", batch_size=4, seed=5))
    slab = TASKS[task](ct_crop.slab(1, 4), RunOptions(device="cpu", batch_size=1, seed=5))
    assert_same_up_to_float_rounding(slab[1], whole[2])


def test_translation_preview_slab_equals_the_slice_of_the_whole_run(ct_crop):
    whole = TASKS["translate"](ct_crop, RunOptions(device="cpu", batch_size=4, seed=5))
    slab = TASKS["translate"](ct_crop.slab(1, 4), RunOptions(device="cpu", batch_size=1, seed=5))
    # the middle slice of the slab has the same context slices as in the whole run
    np.testing.assert_allclose(slab[1], whole[2], atol=0.05, rtol=0)


def test_image_samples_do_not_depend_on_the_batch_size():
    a = sample_images.sample_images(count=3, steps=2, options=RunOptions(device="cpu", batch_size=1, seed=2))
    b = sample_images.sample_images(count=3, steps=2, options=RunOptions(device="cpu", batch_size=3, seed=2))
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert np.abs(a[0] - a[1]).max() > 0.05  # each image has its own noise


# -- the command line: device, precision and domain refusals before anything is written -----------

def _cli(args, capsys):
    from napari_mediffuse.cli import main

    rc = main(args)
    return rc, capsys.readouterr().err


def test_cli_names_the_devices_present_for_a_missing_gpu(tmp_path, capsys):
    out = tmp_path / "out.nii.gz"
    rc, err = _cli(["denoise", str(sample_ct_path()), "-o", str(out), "--device", "cuda:1"], capsys)
    assert rc != 0 and not out.exists()
    assert "CUDA is not available" in err and "devices here: cpu" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_precision_option(tmp_path, capsys):
    out = tmp_path / "out.nii.gz"
    rc, err = _cli(["denoise", str(sample_ct_path()), "-o", str(out), "--method", "nlm", "--precision", "fp32",
                    "--device", "cpu"], capsys)
    assert rc == 0 and out.exists(), err
    with pytest.raises(SystemExit):  # argparse: usage and the reason
        _cli(["denoise", str(sample_ct_path()), "-o", str(tmp_path / "b.nii.gz"), "--precision", "int8"], capsys)
    assert "invalid choice: 'int8'" in capsys.readouterr().err and not (tmp_path / "b.nii.gz").exists()


def test_abdominal_translation_model_refuses_a_head_mr_unless_forced(tmp_path, capsys):
    """An mr2ct model that saw abdominal (simulated) MR only: a brain MR is refused, with the reason."""
    import nibabel as nib

    from conftest import save_tiny_checkpoint, shared, translation_card

    model = save_tiny_checkpoint(tmp_path / "abdomen-mr2ct", name="abdomen-mr2ct", task="translation",
                                 modality="MR", condition_channels=3,
                                 domain={"modality": "MR", "regions": ["abdomen"]}, **translation_card("mr2ct"))
    head = shared("mr/stroke_T1.nii.gz")
    img = nib.load(str(head))
    data = np.asarray(img.dataobj)
    k = data.shape[2] // 2  # 3 axial slices through the middle of the head, whole field of view
    small = tmp_path / "head_t1.nii.gz"
    affine = img.affine.copy()
    affine[:3, 3] = (img.affine @ np.array([0, 0, k - 1, 1]))[:3]
    nib.save(nib.Nifti1Image(data[:, :, k - 1:k + 2].astype(np.float32), affine), str(small))
    out = tmp_path / "ct_like.nii.gz"
    common = ["translate", str(small), "-o", str(out), "--direction", "mr2ct", "--input-modality", "MR",
              "--model", str(model)]
    rc, err = _cli(common, capsys)
    assert rc != 0 and not out.exists()
    assert "saw abdomen only" in err and "head-neck" in err and "--force" in err, err
    rc, err = _cli(common + ["--force", "--steps", "1", "--ensemble", "1"], capsys)
    assert rc == 0 and out.exists(), err
    assert "warning:" in err and "saw abdomen only" in err
    assert "OUT-OF-DOMAIN" in nib.load(str(out)).header["descrip"].tobytes().decode()


def test_synthesis_does_not_depend_on_the_batch_size():
    a = synthesize.synthesize((64, 64, 64), steps=2, coarse_model="none",
                              options=RunOptions(device="cpu", batch_size=6, seed=4)).data
    b = synthesize.synthesize((64, 64, 64), steps=2, coarse_model="none",
                              options=RunOptions(device="cpu", batch_size=16, seed=4)).data
    assert np.isfinite(a).all() and a.std() > 10  # an image, not a constant
    # from pure noise, x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) multiplies the network's float
    # rounding (which depends on the batch) by 1 / sqrt(abar_T): a handful of voxels move by a
    # few HU, the rest agree to float precision
    diff = np.abs(a - b)
    assert np.mean(diff > 0.05) < 1e-3 and diff.mean() < 0.01, (diff.max(), np.mean(diff > 0.05), diff.mean())
