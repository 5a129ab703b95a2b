"""A corpus of awkward inputs and outputs (issue 19), built in tmp_path.

Every input goes through the npe2 reader, ``mediffuse info`` and one task,
``mediffuse denoise`` on 16 x 16 x 2 volumes: BM3D for the inputs whose
values matter to it (non-finite voxels, the valid NIfTI and DICOM series;
BM3D takes about 1 s per slice even this small), non-local means (ms) for
the others, which exercise the same reading, checking and writing. The
outcome is either a one-line message that names the file (no traceback,
nothing written) or a correct, finite result. Output cases check that no
file the user did not name changes (hashes of the folder before and after).
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from napari_mediffuse import cli, io, plugin
from napari_mediffuse.io import validate

SHAPE = (16, 16, 2)  # NIfTI (x, y, z): bm3d takes ~0.8 s per slice
RAS_2MM = np.diag([2.0, 2.0, 3.0, 1.0])


# ---------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------


def ct_values(shape=SHAPE, seed=0) -> np.ndarray:
    """A tiny CT in HU: air (-1000) around a soft-tissue block (40 HU) with noise."""
    rng = np.random.default_rng(seed)
    data = np.full(shape, -1000.0)
    data[3:13, 3:13] = 40.0
    return data + rng.normal(0, 15, shape)


def save_nifti(path: Path, data, affine=RAS_2MM, *, version=1, edit=None, dtype=None) -> Path:
    """Write ``data`` as NIfTI, then apply ``edit(header)`` to the raw header
    bytes (so faults nibabel would refuse to write still reach the file)."""
    data = np.asarray(data)
    if dtype is not None:
        data = data.astype(dtype)
    klass = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    img = klass(data, affine, dtype=data.dtype if data.dtype.kind in "iuf" else None)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    offset = 352 if version == 1 else 544
    img.header["vox_offset"] = offset
    body = bytearray(img.header.binaryblock.ljust(offset, b"\0")) + data.tobytes(order="F")
    if edit is not None:
        hdr_class = nib.Nifti1Header if version == 1 else nib.Nifti2Header
        size = 348 if version == 1 else 540
        header = hdr_class(bytes(body[:size]), check=False)
        edit(header)
        body[:size] = header.binaryblock
    content = bytes(body)
    if path.name.endswith(".gz"):
        content = gzip.compress(content)
    path.write_bytes(content)
    return path


def set_fields(**fields):
    def edit(header):
        for key, value in fields.items():
            header[key] = value
    return edit


def ct_slice(path: Path, k: int, *, series_uid: str, rows=16, cols=16, pixels=True,
             description="ct", seed=0) -> Path:
    """A tiny single-frame CT slice (HU = stored - 1024) at z = 3 k mm."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientID, ds.StudyID, ds.StudyDate, ds.StudyTime = "anon-19", "1", "20260101", "120000"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = "1.2.3.5"
    ds.SeriesDescription = description
    ds.SeriesNumber = 1
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [0.0, 0.0, 3.0 * k]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [2.0, 2.0]
    ds.SliceThickness = 3.0
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    if pixels:
        hu = ct_values((rows, cols, 1), seed=seed + k)[..., 0]
        ds.PixelData = (np.round(hu) + 1024).astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def ct_series(folder: Path, n=2, **kwargs) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    return [ct_slice(folder / f"slice{k}.dcm", k, series_uid=uid, **kwargs) for k in range(n)]


def non_image(path: Path, sop_class: str, modality: str) -> Path:
    """A DICOM object without pixels (structured report, RT structure set)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(path, enforce_file_format=True)
    return path


# ---------------------------------------------------------------------------
# The corpus: name -> (builder(tmp) -> path, expected outcome)
#   ("refused", reason)  every channel: a one-line message with the file name
#   ("ok", None)          reader and info succeed, denoise gives a finite result
#   ("ok", reason)        reader and info succeed; the task refuses with reason
# ---------------------------------------------------------------------------

CORPUS = {}


def case(name, outcome, reason=None):
    def register(builder):
        CORPUS[name] = (builder, outcome, reason)
        return builder
    return register


def nifti_case(name, outcome, reason=None, **kwargs):
    data = kwargs.pop("data", None)
    filename = kwargs.pop("filename", f"{name}.nii")
    case(name, outcome, reason)(
        lambda tmp: save_nifti(tmp / filename, ct_values() if data is None else data, **kwargs))


# Valid and odd-but-fine NIfTI
nifti_case("valid_ct", "ok")
nifti_case("valid_ct_gz", "ok", filename="valid ct.nii.gz")
nifti_case("int64", "ok", dtype=np.int64)
nifti_case("int8", "ok", "needs a CT", data=np.clip(ct_values() / 10, -100, 100), dtype=np.int8)
nifti_case("float64", "ok", dtype=np.float64)
nifti_case("uint16_offset", "ok", data=np.clip(ct_values() + 1024, 0, None), dtype=np.uint16,
           edit=set_fields(scl_slope=1.0, scl_inter=-1024.0))
nifti_case("trailing_unit_axis", "ok", data=ct_values()[..., None])
nifti_case("two_d", "ok", "2D image", data=ct_values()[:, :, 0])
nifti_case("four_d", "ok", "3D volume", data=np.stack([ct_values(), ct_values(seed=1)], axis=-1))
nifti_case("five_d_vector", "ok", "3D volume",
           data=np.stack([ct_values(), ct_values(seed=1)], axis=-1)[:, :, :, None, :])
nifti_case("mask_uint8", "ok", "needs a CT", data=(ct_values() > 0), dtype=np.uint8)
nifti_case("nan_voxels", "ok", data=np.where(np.arange(512).reshape(SHAPE) % 97 == 5, np.nan, ct_values()),
           dtype=np.float32)
nifti_case("inf_voxel", "ok", data=np.where(np.arange(512).reshape(SHAPE) == 200, np.inf, ct_values()),
           dtype=np.float32)
nifti_case("minus_inf_voxels", "ok",
           data=np.where(np.arange(512).reshape(SHAPE) % 50 == 1, -np.inf, ct_values()), dtype=np.float32)
nifti_case("nifti2", "ok", version=2)
nifti_case("slope_nan_means_unscaled", "ok", edit=set_fields(scl_slope=np.nan, scl_inter=5.0))

# Refused NIfTI
nifti_case("slope_overflows_float32", "refused", "beyond what tasks compute with",
           data=np.clip(ct_values() + 1024, 0, None), dtype=np.int16, edit=set_fields(scl_slope=1e36, scl_inter=0.0))
nifti_case("float64_beyond_float32", "refused", "beyond what tasks compute with",
           data=np.where(np.arange(512).reshape(SHAPE) == 7, 1e300, ct_values()))
nifti_case("all_nan", "refused", "no finite voxel", data=np.full(SHAPE, np.nan, np.float32))
nifti_case("scl_inter_nan", "refused", "scl_inter", edit=set_fields(scl_slope=2.0, scl_inter=np.nan))
nifti_case("scl_slope_inf", "refused", "scl_slope", edit=set_fields(scl_slope=np.inf))
nifti_case("sform_nan", "refused", "not finite", edit=set_fields(srow_x=[np.nan, 0, 0, 0]))
nifti_case("sform_inf", "refused", "not finite", edit=set_fields(srow_z=[0, 0, np.inf, 0]))
nifti_case("sform_singular", "refused", "singular", edit=set_fields(srow_y=[0, 0, 0, 0]))
nifti_case("sform_parallel_axes", "refused", "singular",
           edit=set_fields(srow_x=[2, 2, 0, 0], srow_y=[0, 0, 0, 0], srow_z=[0, 0, 3, 0]))
nifti_case("qform_nan_pixdim", "refused", "qform",
           edit=set_fields(sform_code=0, pixdim=[1, np.nan, 2, 3, 1, 1, 1, 1]))
nifti_case("pixdim_zero", "refused", "singular",
           edit=set_fields(sform_code=0, qform_code=0, pixdim=[1, 2, 0, 3, 1, 1, 1, 1]))
nifti_case("empty_axis", "refused", "empty axis", edit=set_fields(dim=[3, 64, 64, 0, 1, 1, 1, 1]))
nifti_case("zero_d", "refused", "0-D", edit=set_fields(dim=[0, 16, 16, 3, 1, 1, 1, 1]))
nifti_case("one_d", "refused", "1-D", data=np.arange(16, dtype=np.int16))
nifti_case("five_d", "refused", "5-D", data=np.zeros((4, 4, 3, 2, 2), np.int16))
nifti_case("negative_dim", "refused", "invalid dimensions", edit=set_fields(dim=[3, 16, -16, 3, 1, 1, 1, 1]))
nifti_case("complex64", "refused", "complex", data=ct_values().astype(np.complex64))
nifti_case("rgb", "refused", "RGB", edit=set_fields(datatype=128, bitpix=24))
nifti_case("unknown_datatype", "refused", "unknown NIfTI voxel type", edit=set_fields(datatype=9999))
nifti_case("dims_beyond_file", "refused", "truncated or impossible",
           edit=set_fields(dim=[3, 16, 16, 300, 1, 1, 1, 1]))
nifti_case("vox_offset_beyond_file", "refused", "truncated", edit=set_fields(vox_offset=100000))
nifti_case("vox_offset_in_header", "refused", "vox_offset", edit=set_fields(vox_offset=0))
nifti_case("bad_magic", "refused", "magic", edit=set_fields(magic=b"xyz"))
nifti_case("two_file_magic", "refused", "separate .img", edit=set_fields(magic=b"ni1"))


@case("nifti2_huge_claim", "refused", "impossible dimensions")
def _(tmp):
    # 2.5 KB claiming 100000 x 100000 x 1 float32 voxels (40 GB): refused without allocating
    return save_nifti(tmp / "huge.nii", np.zeros((16, 16, 2), np.float32), version=2,
                      edit=set_fields(dim=[3, 100000, 100000, 1, 1, 1, 1, 1]))


@case("gz_huge_claim", "refused", "impossible dimensions")
def _(tmp):
    return save_nifti(tmp / "huge.nii.gz", ct_values(), edit=set_fields(dim=[3, 30000, 30000, 10, 1, 1, 1, 1]))


@case("truncated_nii", "refused", "truncated")
def _(tmp):
    path = save_nifti(tmp / "cut.nii", ct_values())
    path.write_bytes(path.read_bytes()[:1000])
    return path


@case("truncated_gz", "refused", "cut.nii.gz")
def _(tmp):
    path = save_nifti(tmp / "cut.nii.gz", ct_values())
    path.write_bytes(path.read_bytes()[:300])
    return path


@case("header_only", "refused", "truncated")
def _(tmp):
    path = save_nifti(tmp / "hdr.nii", ct_values())
    path.write_bytes(path.read_bytes()[:200])
    return path


@case("gz_not_gzip", "refused", "not gzip")
def _(tmp):
    path = save_nifti(tmp / "plain.nii", ct_values())
    return path.rename(tmp / "plain.nii.gz")


@case("gzip_named_nii", "refused", "rename it to .nii.gz")
def _(tmp):
    path = save_nifti(tmp / "packed.nii.gz", ct_values())
    return path.rename(tmp / "packed.nii")


@case("text_named_nii", "refused", "not a NIfTI")
def _(tmp):
    path = tmp / "notes.nii"
    path.write_text("patient notes, not an image\n" * 30)
    return path


@case("empty_file", "refused", "empty")
def _(tmp):
    path = tmp / "empty.nii"
    path.write_bytes(b"")
    return path


@case("folder_named_nii", "refused", "empty")
def _(tmp):
    path = tmp / "folder.nii"
    path.mkdir()
    return path


# DICOM
@case("dicom_series", "ok")
def _(tmp):
    ct_series(tmp / "series")
    return tmp / "series"


@case("dicom_one_file", "ok", "2D image")
def _(tmp):
    return ct_series(tmp / "one", n=1)[0]


@case("dicom_without_pixels", "refused", "pixel")
def _(tmp):
    return ct_slice(tmp / "nopix.dcm", 0, series_uid=generate_uid(), pixels=False)


@case("dicom_sr", "refused", "sr.dcm")
def _(tmp):
    return non_image(tmp / "sr.dcm", "1.2.840.10008.5.1.4.1.1.88.22", "SR")  # Enhanced SR


@case("dicom_rtstruct", "refused", "rtstruct.dcm")
def _(tmp):
    return non_image(tmp / "rtstruct.dcm", "1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT")


@case("dicom_truncated_pixels", "refused", "cut.dcm")
def _(tmp):
    path = ct_slice(tmp / "cut.dcm", 0, series_uid=generate_uid())
    path.write_bytes(path.read_bytes()[:-200])
    return path


@case("dicom_huge_rows", "refused", "rows.dcm")
def _(tmp):
    # Rows x Columns far beyond the pixel data really stored
    path = ct_slice(tmp / "rows.dcm", 0, series_uid=generate_uid())
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 60000, 60000
    ds.save_as(path)
    return path


@case("dicom_zero_orientation", "refused", "zero.dcm")
def _(tmp):
    path = ct_slice(tmp / "zero.dcm", 0, series_uid=generate_uid())
    ds = pydicom.dcmread(path)
    ds.ImageOrientationPatient = [0, 0, 0, 0, 0, 0]
    ds.save_as(path)
    return path


@case("dicom_series_zero_spacing", "refused", "flat")
def _(tmp):
    for path in ct_series(tmp / "flat"):
        ds = pydicom.dcmread(path)
        ds.PixelSpacing = [0, 0]
        ds.save_as(path)
    return tmp / "flat"


@case("dicom_wrong_magic", "refused", "junk.dcm")
def _(tmp):
    path = tmp / "junk.dcm"
    path.write_bytes(b"\0" * 128 + b"DICX" + os.urandom(400))
    return path


@case("folder_series_plus_junk", "ok")
def _(tmp):
    folder = tmp / "mixed"
    ct_series(folder)
    non_image(folder / "report.dcm", "1.2.840.10008.5.1.4.1.1.88.22", "SR")
    (folder / "junk.dcm").write_bytes(b"\0" * 132 + b"garbage")
    return folder


@case("folder_two_series", "ok", "holds 2 series")
def _(tmp):
    ct_series(tmp / "two" / "a", description="first")
    ct_series(tmp / "two" / "b", description="second")
    return tmp / "two"


@case("folder_damaged_series", "ok")
def _(tmp):
    files = ct_series(tmp / "damaged", n=3)
    files[1].write_bytes(files[1].read_bytes()[:400])  # one slice truncated
    return tmp / "damaged"


@case("folder_only_damaged", "refused", "onlybad")
def _(tmp):
    files = ct_series(tmp / "onlybad", n=2)
    for f in files:
        f.write_bytes(f.read_bytes()[:300])
    return tmp / "onlybad"


@case("empty_folder", "refused", "empty")
def _(tmp):
    (tmp / "nothing").mkdir()
    return tmp / "nothing"


@case("folder_with_link_loop", "ok")
def _(tmp):
    folder = tmp / "looped"
    ct_series(folder)
    os.symlink(folder, folder / "loop")  # a folder link back to itself
    os.symlink("self.dcm", folder / "self.dcm")  # a file link to itself
    return folder


@case("folder_with_fifo", "ok")
def _(tmp):
    ct_series(tmp / "piped")
    os.mkfifo(tmp / "piped" / "pipe")  # skipped, never opened (it would block)
    return tmp / "piped"


@case("only_link_loops", "refused", "loops")
def _(tmp):
    folder = tmp / "loops"
    folder.mkdir()
    os.symlink("a.dcm", folder / "b.dcm")
    os.symlink("b.dcm", folder / "a.dcm")
    return folder


@case("link_loop_file", "refused", "symbolic link loop")
def _(tmp):
    os.symlink("me.nii", tmp / "me.nii")
    return tmp / "me.nii"


@case("broken_link", "refused", "broken symbolic link")
def _(tmp):
    os.symlink("gone.nii.gz", tmp / "link.nii.gz")
    return tmp / "link.nii.gz"


@case("fifo", "refused", "not a regular file")
def _(tmp):
    os.mkfifo(tmp / "pipe.nii")  # reading it would block forever
    return tmp / "pipe.nii"


@case("missing", "refused", "no such file")
def _(tmp):
    return tmp / "absent.nii.gz"


# Odd paths
@case("unicode_and_spaces", "ok")
def _(tmp):
    folder = tmp / "Ärzte Daten" / "日本 scan"
    folder.mkdir(parents=True)
    return save_nifti(folder / "Bauch CT é.nii.gz", ct_values())


@case("long_name", "refused", "too long")
def _(tmp):
    return tmp / ("x" * 300 + ".nii.gz")


@case("deep_path", "ok")
def _(tmp):
    folder = tmp
    for _ in range(12):
        folder = folder / ("d" * 60)
    folder.mkdir(parents=True)
    return save_nifti(folder / "deep.nii", ct_values())


#: Corpus inputs denoised with BM3D (its NaN/inf behaviour is what issue 19 found).
BM3D_CASES = {"valid_ct", "nan_voxels", "inf_voxel", "minus_inf_voxels", "dicom_series", "unicode_and_spaces"}


def folder_hashes(folder: Path) -> dict:
    """Content hash of every file (and link target) under ``folder``."""
    out = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if path.is_symlink():
                out[str(path)] = "link:" + os.readlink(path)
            elif path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def message_ok(text: str, name: str) -> None:
    assert "Traceback" not in text and 'File "' not in text, text
    assert name in text, f"{name!r} not named in: {text}"


@pytest.fixture
def notifications(monkeypatch):
    """Messages the reader shows in napari (through the real _notify_error)."""
    shown = []
    monkeypatch.setattr(plugin, "_notify_error", shown.append)
    return shown


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_reader_info_and_task(name, tmp_path, capsys, notifications, recwarn):
    builder, outcome, reason = CORPUS[name]
    inputs = tmp_path / "in"
    inputs.mkdir()
    path = builder(inputs)
    before = folder_hashes(inputs)
    label = path.name
    output = tmp_path / "out" / "denoised.nii.gz"
    output.parent.mkdir()

    # 1. npe2 reader: never raises; a message naming the file, or finite layers
    reader = plugin.get_reader(str(path))
    if outcome == "refused":
        layers = plugin.read_layers(str(path))  # called as napari would, offered or not
        assert len(layers) == 1 and len(layers[0]) == 1 and layers[0][0] is None
        assert len(notifications) == 1
        message_ok(notifications[0], label)
        assert reason in notifications[0] or reason in label
        assert "\n" not in notifications[0]
    else:
        assert reader is not None, f"{label} not offered to the plugin"
        layers = reader(str(path))
        assert notifications == [] and layers and layers[0][0] is not None
        for data, kwargs, layer_type in layers:
            assert layer_type in ("image", "labels")  # a 0/1 mask may open as labels
            assert np.all(np.isfinite(np.asarray(data, dtype=float)))
            assert np.all(np.isfinite(kwargs["scale"])) and np.all(np.isfinite(kwargs["translate"]))

    # 2. mediffuse info
    code, out, err = run_cli(capsys, "info", str(path))
    if outcome == "refused":
        assert code == 2 and out == ""
        message_ok(err, label)
        assert err.startswith("mediffuse: error: ") and err.count("\n") == 1
    else:
        assert code == 0, err
        values_lines = [line for line in out.splitlines() if line.strip().startswith("values")]
        assert values_lines and not any(w in " ".join(values_lines).lower() for w in ("nan", "inf"))
        message_ok(out + err + label, label)

    # 3. one task
    method = "bm3d" if name in BM3D_CASES else "nlm"
    code, out, err = run_cli(capsys, "denoise", str(path), "-o", str(output), "--method", method)
    if outcome == "ok" and reason is None:
        assert code == 0, err
        result = io.read(output)[0]
        values = result.data
        assert np.all(np.isfinite(values))
        source = io.read(path)[0]
        assert values.shape == source.data.shape
        np.testing.assert_allclose(result.affine, source.affine, atol=1e-4)  # geometry kept
        # a denoised CT stays in the input's HU range (air and tissue kept)
        assert values.min() > -1300 and values.max() < 400
    else:
        assert code == 2, (out, err)
        message_ok(err, label)
        if reason:
            assert reason in err or reason in label
        assert err.rstrip().endswith("nothing was written)") and err.count("\n") == 1
        assert not output.exists() and os.listdir(output.parent) == []
    assert "Traceback" not in out + err
    assert folder_hashes(inputs) == before  # the input is never touched


def test_huge_header_refused_without_allocating(tmp_path):
    path = CORPUS["nifti2_huge_claim"][0](tmp_path)
    assert path.stat().st_size < 3000
    import tracemalloc

    tracemalloc.start()  # numpy reports its buffers to tracemalloc
    try:
        with pytest.raises(io.ReadError, match=r"huge\.nii: truncated or impossible dimensions: the header says "
                                               r"100000 x 100000 x 1 float32 voxels \(40\.0 GB"):
            io.read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50e6, f"{peak / 1e6:.0f} MB allocated to refuse a 2.6 KB file"


def test_non_finite_rule_replaces_by_extremes_with_warning(tmp_path):
    data = ct_values().astype(np.float32)
    data[2, 3, 1] = np.nan
    data[5, 5, 1] = np.inf
    data[6, 6, 0] = -np.inf
    finite = data[np.isfinite(data)]
    path = save_nifti(tmp_path / "holes.nii", data)
    with pytest.warns(io.InputWarning, match=r"holes\.nii: 3 non-finite voxels \(1 NaN, 1 \+inf, 1 -inf"):
        volume = io.read(path)[0]
    assert volume.modality == "CT"  # the modality guess ignores them
    out = volume.data
    assert np.all(np.isfinite(out))
    assert np.count_nonzero(out == finite.min()) == 3  # the original minimum, NaN and -inf
    assert np.count_nonzero(out == finite.max()) == 2  # the original maximum and +inf
    assert volume.metadata["warnings"][-1].startswith(f"{path}: 3 non-finite voxels")


def test_guess_modality_ignores_non_finite():
    from napari_mediffuse.io.nifti import guess_modality

    ct = ct_values()
    ct[0, 0, 0] = np.nan
    assert guess_modality(ct) == "CT"
    assert guess_modality(np.full((4, 4, 4), np.nan)) == "OT"


def test_bm3d_on_volume_with_inf_voxel_is_finite_and_close_to_clean(tmp_path, capsys):
    """One +inf voxel used to turn 86 % of bm3d's slice into NaN."""
    clean = ct_values()
    holed = clean.astype(np.float32)
    holed[8, 8, 1] = np.inf
    save_nifti(tmp_path / "inf.nii.gz", holed)
    save_nifti(tmp_path / "ref.nii.gz", clean.astype(np.float32))
    for name in ("inf", "ref"):
        code, _, err = run_cli(capsys, "denoise", str(tmp_path / f"{name}.nii.gz"), "-o",
                               str(tmp_path / f"{name}_out.nii.gz"), "--method", "bm3d", "--noise-hu", "15")
        assert code == 0, err
    holed_out = nib.load(tmp_path / "inf_out.nii.gz").get_fdata()
    ref_out = nib.load(tmp_path / "ref_out.nii.gz").get_fdata()
    assert np.all(np.isfinite(holed_out))
    far = np.ones(SHAPE, bool)
    far[4:13, 4:13, 1] = False  # away from the replaced voxel the results agree
    assert np.max(np.abs(holed_out - ref_out)[far]) < 30


def test_translate_of_volume_with_nan_and_inf_is_finite(tmp_path, capsys, monkeypatch):
    """translate used to return whole slices of NaN for an input with NaN voxels."""
    from conftest import save_tiny_checkpoint, translation_card
    from napari_mediffuse.engine import registry

    save_tiny_checkpoint(tmp_path / "models" / "tiny-ct2mr", name="tiny-ct2mr", task="translation",
                         modality="CT", condition_channels=3, **translation_card("ct2mr"))
    monkeypatch.setenv(registry.ENV_VAR, str(tmp_path / "models"))
    data = ct_values((16, 16, 2)).astype(np.float32)
    data[4:6, 4:6, 0] = np.nan
    data[9, 9, 1] = np.inf
    src = save_nifti(tmp_path / "holes.nii.gz", data, affine=np.diag([3.0, 3.0, 3.0, 1.0]))
    out = tmp_path / "mr.nii.gz"
    code, _, err = run_cli(capsys, "translate", str(src), "-o", str(out), "--direction", "ct2mr",
                           "--model", "tiny-ct2mr", "--steps", "2", "--ensemble", "1", "--device", "cpu",
                           "--force")
    assert code == 0, err
    assert "warning: " + str(src) + ": 5 non-finite voxels (4 NaN, 1 +inf" in err
    result = io.read(out)[0]
    assert result.data.shape == (2, 16, 16) and np.all(np.isfinite(result.data))


def test_cli_warnings_are_one_line_without_source_paths(tmp_path, capsys):
    data = ct_values().astype(np.float32)
    data[1, 1, 1] = np.nan
    path = save_nifti(tmp_path / "nan.nii", data)
    code, out, err = run_cli(capsys, "denoise", str(path), "-o", str(tmp_path / "o.nii"), "--method", "nlm")
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("warning")]
    assert lines and lines[0].startswith(f"warning: {path}: 1 non-finite voxel (1 NaN")
    assert "napari_mediffuse" not in err and ".py" not in err and "warnings.warn" not in err


def test_nibabel_log_lines_become_warnings_of_the_file(tmp_path, capfd, caplog):
    # Header fields nibabel fixes while loading are logged by nibabel, through
    # its own handler, at "Level 35" (negative pixdim) or INFO (qfac): we show
    # them as our one-line warnings naming the file, and nothing else.
    path = save_nifti(tmp_path / "fixed.nii", ct_values(),
                      edit=set_fields(sform_code=0, pixdim=[0.5, -2, 2, 3, 1, 1, 1, 1]))
    with caplog.at_level(logging.DEBUG):
        code = cli.main(["info", str(path)])
    out, err = capfd.readouterr()
    assert code == 0, err
    assert "Level 35" not in out + err + caplog.text and "nibabel" not in out + err
    assert "warning      fixed.nii: pixdim[1,2,3] should be positive; setting to abs of pixdim values" in out
    assert "warning      fixed.nii: pixdim[0] (qfac) should be 1 (default) or -1; setting qfac to 1" in out
    assert err == ""
    with pytest.warns(io.InputWarning, match=r"fixed\.nii: pixdim\[1,2,3\] should be positive"):
        volume = io.read(path)[0]  # in napari: a warning notification naming the file
    assert volume.spacing == pytest.approx((3.0, 2.0, 2.0))


def test_npe2_offers_plugin_for_dicomdir_whatever_the_case(tmp_path):
    from npe2 import PluginManager, PluginManifest

    manifest = PluginManifest.from_file(Path(plugin.__file__).with_name("napari.yaml"))
    pm = PluginManager()
    pm.register(manifest)
    for name in ("DICOMDIR", "dicomdir", "DicomDir"):
        path = tmp_path / name
        path.write_bytes(b"\0")
        readers = [r.command for r in pm.iter_compatible_readers([str(path)])]
        assert "napari-mediffuse.get_reader" in readers, name
        path.unlink()
    assert plugin.get_reader(str(tmp_path / "DICOMDIR")) is plugin.read_layers
    other = tmp_path / "README12"  # offered by the pattern, declined by get_reader
    other.write_text("text")
    assert plugin.get_reader(str(other)) is None


def test_dicomdir_dropped_on_napari_opens_with_the_plugin(make_napari_viewer, tmp_path, notifications):
    """What a drop does: napari picks the reader itself (plugin=None)."""
    from pydicom.fileset import FileSet

    fileset = FileSet()
    for path in ct_series(tmp_path / "src"):
        fileset.add(path)
    fileset.write(tmp_path / "media")  # DICOMDIR + PT000000/ST000000/SE000000/IM00000x
    viewer = make_napari_viewer()
    viewer.open(str(tmp_path / "media" / "DICOMDIR"), plugin=None)
    assert [layer.name for layer in viewer.layers] == ["ct (CT)"] and notifications == []
    layer = viewer.layers[0]
    assert layer.data.shape == (2, 16, 16) and layer.metadata["modality"] == "CT"
    np.testing.assert_allclose(layer.scale, (3.0, 2.0, 2.0))
    # a damaged file then dropped: one notification, the loaded layer stays
    bad = save_nifti(tmp_path / "bad.nii", ct_values(), edit=set_fields(scl_slope=2.0, scl_inter=np.nan))
    viewer.open(str(bad), plugin="napari-mediffuse")  # napari asks which reader for .nii
    assert len(viewer.layers) == 1 and len(notifications) == 1 and "bad.nii: invalid scl_inter" in notifications[0]


def test_cli_unexpected_error_is_one_line_naming_the_input(monkeypatch, capsys, tmp_path):
    path = save_nifti(tmp_path / "ok.nii", ct_values())

    def explode(_path):
        raise np.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(io, "read", explode)
    code, out, err = run_cli(capsys, "info", str(path))
    assert code == 1 and out == ""
    assert err == (f"mediffuse: error: {path}: LinAlgError: SVD did not converge "
                   "(nothing was written; run with -v for details)\n")


def test_reader_never_raises_even_on_unexpected_errors(monkeypatch, notifications, tmp_path):
    path = save_nifti(tmp_path / "ok.nii", ct_values())

    def explode(_path, **_options):  # the reader passes the loaded series (loaded=...)
        raise np.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(io, "read", explode)
    assert plugin.read_layers(str(path)) == [(None,)]
    assert notifications == [f"{path}: cannot read (LinAlgError: SVD did not converge)"]


# ---------------------------------------------------------------------------
# Output paths
# ---------------------------------------------------------------------------


def _setup_output_case(tmp_path):
    (tmp_path / "in").mkdir()
    src = save_nifti(tmp_path / "in" / "ct.nii.gz", ct_values())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("user file")
    (out_dir / ".partial-result.nii.gz").write_text("a user's file with the old temporary name")
    return src, out_dir


OUTPUT_CASES = {
    # name: (make the output path, refused?, words expected in the message)
    "existing_file": (lambda d: _touch(d / "result.nii.gz"), True, "file exists"),
    "dangling_symlink": (lambda d: _link(d / "result.nii.gz", "nowhere.nii.gz"), True, "broken symbolic link"),
    "symlink_to_user_file": (lambda d: _link(d / "result.nii.gz", "keep.txt"), True, "symbolic link exists"),
    "missing_folder": (lambda d: d / "no" / "result.nii.gz", True, "does not exist"),
    "folder_is_a_file": (lambda d: d / "keep.txt" / "result.nii.gz", True, "not a folder"),
    "output_is_a_folder": (lambda d: _mkdir(d / "result.nii.gz"), True, "is a folder"),
    "name_too_long": (lambda d: d / ("r" * 300 + ".nii.gz"), True, "too long"),
    "not_nifti_name": (lambda d: d / "result.png", True, "must be a .nii"),
    "free_name": (lambda d: d / "result.nii.gz", False, ""),
    "unicode_name": (lambda d: d / "Ergebnis ü 結果.nii.gz", False, ""),
}


def _touch(path):
    path.write_text("old result the user keeps")
    return path


def _link(path, target):
    os.symlink(target, path)
    return path


def _mkdir(path):
    path.mkdir()
    return path


@pytest.mark.parametrize("name", sorted(OUTPUT_CASES))
def test_output_paths_checked_before_computing(name, tmp_path, capsys, monkeypatch):
    make, refused, words = OUTPUT_CASES[name]
    src, out_dir = _setup_output_case(tmp_path)
    output = make(out_dir)
    before = folder_hashes(tmp_path)
    computed = []
    from napari_mediffuse.tasks import denoise as denoise_module
    real = denoise_module.denoise
    monkeypatch.setattr(denoise_module, "denoise", lambda *a, **k: computed.append(1) or real(*a, **k))
    code, out, err = run_cli(capsys, "denoise", str(src), "-o", str(output), "--method", "nlm")
    after = folder_hashes(tmp_path)
    if refused:
        assert code == 2 and computed == [], err  # refused before any computing
        message_ok(err, output.name[:40])
        assert words in err and "nothing was written" in err
        assert after == before
    else:
        assert code == 0, err
        assert set(after) - set(before) == {str(output)}
        assert {k: v for k, v in after.items() if k != str(output)} == before
        assert np.all(np.isfinite(nib.load(output).get_fdata()))


def test_output_equal_to_input_needs_overwrite(tmp_path, capsys):
    src = save_nifti(tmp_path / "ct.nii.gz", ct_values())
    before = folder_hashes(tmp_path)
    code, _, err = run_cli(capsys, "denoise", str(src), "-o", str(src), "--method", "nlm")
    assert code == 2 and "is the input file" in err and folder_hashes(tmp_path) == before
    code, _, err = run_cli(capsys, "denoise", str(src), "-o", str(src), "--method", "nlm", "--overwrite")
    assert code == 0, err
    assert folder_hashes(tmp_path).keys() == before.keys()  # replaced in place, no temporary left
    assert folder_hashes(tmp_path) != before


def test_overwrite_replaces_a_symlink_not_its_target(tmp_path, capsys):
    src = save_nifti(tmp_path / "ct.nii.gz", ct_values())
    target = tmp_path / "precious.nii.gz"
    target.write_bytes(b"keep me")
    os.symlink(target.name, tmp_path / "out.nii.gz")
    code, _, err = run_cli(capsys, "denoise", str(src), "-o", str(tmp_path / "out.nii.gz"),
                           "--method", "nlm", "--overwrite")
    assert code == 0, err
    assert target.read_bytes() == b"keep me" and not (tmp_path / "out.nii.gz").is_symlink()


@pytest.mark.parametrize("fault", [KeyboardInterrupt, OSError(28, "No space left on device"), ValueError("bad")])
def test_failed_or_interrupted_write_leaves_nothing(tmp_path, monkeypatch, fault):
    volume = io.read(save_nifti(tmp_path / "ct.nii", ct_values()))[0]
    before = folder_hashes(tmp_path)
    target = tmp_path / "result.nii.gz"

    def half_write(img, name):
        Path(name).write_bytes(b"half a file")
        raise fault

    monkeypatch.setattr(nib, "save", half_write)
    expected = io.WriteCancelled if fault is KeyboardInterrupt else io.WriteError
    with pytest.raises(expected, match=r"result\.nii\.gz: .*nothing was written"):
        io.write_nifti(volume, target)
    assert folder_hashes(tmp_path) == before  # no temporary, no partial file
    assert sorted(os.listdir(tmp_path)) == ["ct.nii"]


def test_interrupted_write_message_in_cli(tmp_path, monkeypatch, capsys):
    src = save_nifti(tmp_path / "ct.nii", ct_values())

    def interrupted(img, name):
        raise KeyboardInterrupt

    monkeypatch.setattr(nib, "save", interrupted)
    code, _, err = run_cli(capsys, "denoise", str(src), "-o", str(tmp_path / "r.nii"), "--method", "nlm")
    assert code == 130
    assert err.strip().endswith("r.nii: cancelled while writing; nothing was written")
    assert sorted(os.listdir(tmp_path)) == ["ct.nii"]


def test_interrupt_after_the_write_says_the_file_is_complete(tmp_path, monkeypatch, capsys):
    src = save_nifti(tmp_path / "ct.nii", ct_values())
    real = io.write_nifti

    def write_then_interrupt(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt  # e.g. Ctrl-C while the summary is printed

    monkeypatch.setattr(io, "write_nifti", write_then_interrupt)
    code, _, err = run_cli(capsys, "denoise", str(src), "-o", str(tmp_path / "r.nii"), "--method", "nlm")
    assert code == 130
    assert err.strip().endswith(f"cancelled; complete output written before: {tmp_path / 'r.nii'}")
    assert np.all(np.isfinite(io.read(tmp_path / "r.nii")[0].data))


def test_file_appearing_during_compute_is_not_replaced(tmp_path):
    volume = io.read(save_nifti(tmp_path / "ct.nii", ct_values()))[0]
    target = tmp_path / "r.nii"
    with pytest.raises(io.WriteError, match="appeared while computing"):
        with validate.atomic_output(target) as tmp:
            tmp.write_bytes(b"new")
            target.write_bytes(b"someone else's")
    assert target.read_bytes() == b"someone else's"
    assert sorted(os.listdir(tmp_path)) == ["ct.nii", "r.nii"]
    del volume


def test_temporary_names_are_unique_and_user_files_survive(tmp_path):
    volume = io.read(save_nifti(tmp_path / "ct.nii", ct_values()))[0]
    (tmp_path / ".partial-r.nii").write_text("mine")
    io.write_nifti(volume, tmp_path / "r.nii")
    assert (tmp_path / ".partial-r.nii").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == [".partial-r.nii", "ct.nii", "r.nii"]
    mode = os.stat(tmp_path / "r.nii").st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # not mkstemp's private 0600


def test_convert_checks_output_before_reading(tmp_path, capsys):
    src = save_nifti(tmp_path / "ct.nii.gz", ct_values())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "other.dcm").write_bytes(b"x")
    before = folder_hashes(tmp_path)
    code, _, err = run_cli(capsys, "convert", str(src), "-o", str(tmp_path / "full"))
    assert code == 2 and "full: folder is not empty" in err and folder_hashes(tmp_path) == before
    code, _, err = run_cli(capsys, "convert", str(src), "-o", str(tmp_path / ("s" * 300)))
    assert code == 2 and "too long" in err and folder_hashes(tmp_path) == before
    code, out, err = run_cli(capsys, "convert", str(src), "-o", str(tmp_path / "series"))
    assert code == 0, err
    assert len(os.listdir(tmp_path / "series")) == 2


def test_dicom_series_write_interrupted_leaves_nothing(tmp_path, monkeypatch):
    volume = io.read(save_nifti(tmp_path / "ct.nii", ct_values()))[0]
    calls = []
    real_save = pydicom.dataset.Dataset.save_as

    def save_then_interrupt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", save_then_interrupt)
    with pytest.raises(io.WriteCancelled, match="series: cancelled while writing; nothing was kept"):
        io.write_dicom_series(volume, tmp_path / "series", series_description="x")
    assert sorted(os.listdir(tmp_path)) == ["ct.nii"]


def test_panel_check_converts_float16_and_replaces_non_finite():
    """What the panel runs on a layer from any reader before a task starts."""
    from napari_mediffuse.io.volume import Volume

    data = ct_values((2, 16, 16)).astype(np.float16)
    data[1, 2, 3] = np.nan
    volume = Volume(data=data, affine=RAS_2MM, modality="CT", name="from tif")
    with pytest.warns(io.InputWarning, match=r"layer 'from tif': 1 non-finite voxel \(1 NaN; first at index \[1, 2, 3\]\)"):
        checked = validate.check_volume(volume, where="layer 'from tif'")
    assert checked.data.dtype == np.float32 and np.all(np.isfinite(checked.data))
    assert checked.data[1, 2, 3] == np.float32(np.nanmin(data))
    assert np.isnan(volume.data[1, 2, 3])  # the layer's own data is not modified
    bad_affine = Volume(data=np.zeros((2, 4, 4), np.float32), affine=np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(io.ReadError, match="layer 'x': the voxel -> mm affine is singular"):
        validate.check_volume(bad_affine, where="layer 'x'")


def test_task_api_refuses_non_finite_volume():
    """A volume built in Python (not through io.read) with NaN never reaches bm3d."""
    from napari_mediffuse.io.volume import Volume
    from napari_mediffuse.tasks.common import TaskInputError
    from napari_mediffuse.tasks.denoise import denoise

    data = ct_values((2, 16, 16)).astype(np.float32)
    data[0, 5, 5] = np.inf
    volume = Volume(data=data, affine=RAS_2MM, modality="CT", name="api", source="api.nii")
    with pytest.raises(TaskInputError, match=r"'api' \(api\.nii\) has NaN or infinite voxels"):
        denoise(volume, method="bm3d")
