"""NIfTI reading/writing and the geometry conventions, on real scans."""
from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from napari_mediffuse import io
from napari_mediffuse.io.volume import (
    RAS_TO_WORLD,
    affine_from_world,
    reorient,
    world_scale_translate,
)


def _ras_of(affine, index):
    return (affine @ np.append(np.asarray(index, float), 1.0))[:3]


def test_ct_reads_in_display_orientation_with_voxels_at_same_ras(ct_small_path):
    img = nib.load(str(ct_small_path))
    raw = np.asanyarray(img.dataobj)
    vol = io.read_nifti(ct_small_path)

    assert vol.modality == "CT"
    assert io.volume.axcodes(vol.affine) == ("S", "P", "L")
    assert vol.data.shape == (raw.shape[2], raw.shape[1], raw.shape[0])
    assert vol.spacing == pytest.approx((3.0, 3.0, 3.0), abs=1e-4)
    # Each voxel keeps its value and RAS position (check a few, incl. corners).
    rng = np.random.default_rng(0)
    for _ in range(50):
        k, j, i = (int(rng.integers(n)) for n in vol.data.shape)
        ras = _ras_of(vol.affine, (k, j, i))
        src_index = np.linalg.solve(img.affine, np.append(ras, 1.0))[:3]
        src_index = np.round(src_index).astype(int)
        assert vol.data[k, j, i] == raw[tuple(src_index)]
    # Real HU: air about -1000, soft tissue around 0-100.
    assert vol.data.min() <= -1000 + 30
    assert 0 < np.median(vol.data[vol.data > -200]) < 200


def test_lps_mr_is_reoriented_and_matches_ras(mr_lps_path):
    img = nib.load(str(mr_lps_path))
    assert nib.aff2axcodes(img.affine)[:2] == ("L", "P")
    vol = io.read_nifti(mr_lps_path)
    assert vol.modality == "MR"
    assert io.volume.axcodes(vol.affine) == ("S", "P", "L")
    raw = np.asanyarray(img.dataobj)
    # voxel (0, 0, 0) of the file must be found at the same RAS position
    ras0 = img.affine[:3, 3]
    idx = np.round(np.linalg.solve(vol.affine, np.append(ras0, 1))[:3]).astype(int)
    assert vol.data[tuple(idx)] == raw[0, 0, 0]


def test_napari_scale_translate_round_trip(ct_small_path):
    vol = io.read_nifti(ct_small_path)
    scale, translate = world_scale_translate(vol.affine)
    assert scale == pytest.approx((3.0, 3.0, 3.0), abs=1e-4)
    # translate is voxel (0,0,0) in world (S, P, L) = (z, -y, -x) RAS mm
    np.testing.assert_allclose(translate, RAS_TO_WORLD @ vol.affine[:3, 3])
    np.testing.assert_allclose(affine_from_world(scale, translate), vol.affine, atol=1e-5)


def test_write_read_round_trip_keeps_affine_exactly(tmp_path, mr_lps_path):
    vol = io.read_nifti(mr_lps_path)
    out = io.write_nifti(vol, tmp_path / "mr.nii.gz")
    back = io.read_nifti(out)
    np.testing.assert_array_equal(back.data, vol.data)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-6)
    assert back.modality == "MR"


def test_writer_refuses_to_overwrite(tmp_path, ct_small_path):
    vol = io.read_nifti(ct_small_path)
    target = tmp_path / "ct.nii.gz"
    io.write_nifti(vol, target)
    before = target.read_bytes()
    with pytest.raises(io.WriteError, match="exists"):
        io.write_nifti(vol.with_data(vol.data * 0), target)
    assert target.read_bytes() == before


def test_4d_nifti_time_axis_first(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.normal(size=(6, 5, 4, 3)).astype(np.float32)  # x, y, z, t
    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "f.nii"))
    vol = io.read_nifti(tmp_path / "f.nii")
    assert vol.data.shape == (3, 4, 5, 6)  # t, S, P, L
    assert vol.spacing == pytest.approx((4.0, 2.0, 2.0))
    # RAS y axis flipped to P: data[t, k, j, i] == raw[5-i?]: check by position
    ras = _ras_of(vol.affine, (1, 2, 3))
    src = np.round(np.linalg.solve(affine, np.append(ras, 1))[:3]).astype(int)
    assert vol.data[2, 1, 2, 3] == data[src[0], src[1], src[2], 2]
    kwargs = vol.napari_kwargs()
    assert kwargs["scale"] == pytest.approx((1.0, 4.0, 2.0, 2.0))


def test_sheared_affine_survives_reorient():
    affine = np.array([[-0.8, 0, 0, 10], [0, 0.8, 0.3, -20], [0, 0, 2.5, 5], [0, 0, 0, 1]])
    data = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    out, new_affine = reorient(data, affine)
    for index in [(0, 0, 0), (3, 4, 5), (1, 2, 3)]:
        ras = _ras_of(affine, index)
        new_index = np.linalg.solve(new_affine, np.append(ras, 1))[:3]
        np.testing.assert_allclose(new_index, np.round(new_index), atol=1e-9)
        assert out[tuple(np.round(new_index).astype(int))] == data[index]


@pytest.mark.parametrize("content, reason", [
    (b"", "cannot read"),
    (b"this is not an image at all" * 10, "cannot read"),
])
def test_corrupt_nifti_gets_clear_error(tmp_path, content, reason):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(content)
    with pytest.raises(io.ReadError, match="broken.nii.gz"):
        io.read(bad)


def test_truncated_nifti_names_file(tmp_path, ct_small_path):
    raw = gzip.decompress(ct_small_path.read_bytes())
    bad = tmp_path / "truncated.nii"
    bad.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(io.ReadError, match="truncated.nii"):
        io.read(bad)


def test_not_medical_file_is_refused(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(io.ReadError, match="notes.txt.*not a NIfTI"):
        io.read(text)
    with pytest.raises(io.ReadError, match="no such file"):
        io.read(tmp_path / "missing.nii.gz")


def test_layout_is_three_axis_codes_and_in_layout_is_lossless():
    from napari_mediffuse.io.volume import Volume

    data = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    with pytest.raises(ValueError, match="three axis codes"):
        Volume(data, np.eye(4), layout=("L", "R", "S"))
    plain = Volume(data, np.eye(4))
    assert plain.in_layout()[0] is data  # no layout: written as it is
    affine = np.diag([-0.8, 0.9, 3.0, 1.0])  # LAS
    display, display_affine = reorient(data, affine)
    back, back_affine = Volume(display, display_affine, layout=("L", "A", "S")).in_layout()
    np.testing.assert_array_equal(back, data)
    np.testing.assert_allclose(back_affine, affine)
