"""Series assembly as dcm2niix does it, on DICOM series built from real CTs.

The series are written with pydicom from small crops of the real abdominal
CT in ../shared/data (HU int16), with the quirks of real exports: positions
rounded to 0.1 mm, duplicated files, localizers, missing slices, phases.
"""
from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from conftest import shared
from napari_mediffuse import io
from napari_mediffuse.io.dicom import DicomReadWarning, read_dicom

#: In-plane crop of the real CT used for every series (rows, columns).
CROP = (slice(30, 78), slice(25, 73))


@pytest.fixture(scope="module")
def ct_slices() -> np.ndarray:
    """60 axial slices (48 x 48) of the real abdominal CT, HU int16."""
    img = nib.load(shared("ct/abdomen_ct_3mm.nii.gz"))
    data = np.asanyarray(img.dataobj)  # RAS, (x, y, z)
    # DICOM rows run anterior -> posterior, columns right -> left.
    slices = np.transpose(data[:, :, 20:80], (2, 1, 0))[:, ::-1, ::-1]
    return np.ascontiguousarray(slices[:, CROP[0], CROP[1]]).astype(np.int16)


def ct_dataset(pixels_hu: np.ndarray, position, *, series_uid: str, study_uid: str,
               instance: int, spacing=(0.7, 0.7), iop=(1, 0, 0, 0, 1, 0),
               description="abdomen", **tags) -> Dataset:
    """A CT Image Storage dataset holding ``pixels_hu`` at ``position`` (LPS mm)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName, ds.PatientID = "Test^Series", "TS001"
    ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", ""
    ds.ReferringPhysicianName = ""
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid])
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 3, instance
    ds.SeriesDescription = description
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = list(iop)
    ds.PixelSpacing = list(spacing)
    ds.SliceThickness = 0.625
    ds.Rows, ds.Columns = pixels_hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = (pixels_hu.astype(np.int32) + 1024).astype("<i2").tobytes()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def write_ct_series(folder: Path, slices: np.ndarray, z_mm, *, rounding=None, **tags) -> list[Path]:
    """One file per slice at z = ``z_mm[k]`` (mm, LPS), positions rounded to
    ``rounding`` decimals as scanners write them. Returns files in slice order."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = tags.pop("series_uid", generate_uid())
    study_uid = tags.pop("study_uid", generate_uid())
    files = []
    for k, (pixels, z) in enumerate(zip(slices, z_mm)):
        position = np.array([-16.8, -120.4, z])
        if rounding is not None:
            position = np.round(position, rounding)
        ds = ct_dataset(pixels, position, series_uid=series_uid, study_uid=study_uid,
                        instance=k + 1, **tags)
        path = folder / f"slice{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def test_rounded_positions_give_60_integer_slices_at_0625mm(tmp_path, ct_slices):
    z = 100.0 + 0.625 * np.arange(60)
    files = write_ct_series(tmp_path / "s", ct_slices, z, rounding=1)
    gaps = np.diff([float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in files])
    assert set(np.round(gaps, 3)) == {0.6, 0.7}  # what the rounding did
    with warnings.catch_warnings():
        warnings.simplefilter("error", DicomReadWarning)  # nothing to report
        (vol,) = read_dicom(tmp_path / "s")
    assert vol.data.shape == (60, 48, 48) and vol.data.dtype == np.int16
    assert vol.spacing[0] == pytest.approx(0.625, abs=0.002)
    assert not vol.metadata["resampled"] and "missing_slices" not in vol.metadata
    np.testing.assert_array_equal(vol.data, ct_slices)  # (S, P, L) = acquisition order here
    # Slice k sits within half the rounding step (0.05 mm) of its true position.
    ras_z = vol.affine[2, 3] + vol.affine[2, 0] * np.arange(60)
    assert np.abs(ras_z - z).max() <= 0.05


def test_rounded_positions_agree_with_dcm2niix(tmp_path, ct_slices):
    if shutil.which("dcm2niix") is None:
        pytest.skip("dcm2niix not installed")
    write_ct_series(tmp_path / "s", ct_slices[:20], 50.0 + 0.625 * np.arange(20), rounding=1)
    (vol,) = read_dicom(tmp_path / "s")
    out = tmp_path / "nifti"
    out.mkdir()
    subprocess.run(["dcm2niix", "-z", "y", "-o", str(out), str(tmp_path / "s")],
                   check=True, capture_output=True, timeout=60)
    (nii,) = out.glob("*.nii.gz")
    img = nib.load(nii)
    assert img.shape == (48, 48, 20)
    # A landmark (voxel 10, 24, 24 and its neighbours) lies within half a voxel of
    # the same voxel of dcm2niix: their RAS points map to dcm2niix voxels with
    # the same values.
    theirs = np.asanyarray(img.dataobj)
    inverse = np.linalg.inv(img.affine)
    for index in ((10, 24, 24), (10, 5, 40), (9, 30, 12)):
        point = inverse @ vol.affine @ np.array([*index, 1.0])
        nearest = np.round(point[:3]).astype(int)
        assert np.abs(point[:3] - nearest).max() < 0.5
        assert theirs[tuple(nearest)] == vol.data[index]
    # dcm2niix takes the first gap (0.6 mm) as the spacing; ours is the mean
    # gap, closer to the true 0.625 mm.
    assert abs(vol.spacing[0] - 0.625) < abs(np.linalg.norm(img.affine[:3, 2]) - 0.625)


def test_missing_slices_reported_and_kept_at_true_positions(tmp_path, ct_slices):
    z = 100.0 + 0.625 * np.arange(60)
    files = write_ct_series(tmp_path / "s", ct_slices, z, rounding=1, description="gappy")
    for k in (20, 41, 42):
        files[k].unlink()
    with pytest.warns(DicomReadWarning) as record:
        (vol,) = read_dicom(tmp_path / "s")
    (message,) = [str(w.message) for w in record]
    assert "series 'gappy'" in message and "3 missing" in message
    assert "nothing is interpolated" in message
    assert vol.data.shape == (60, 48, 48) and vol.data.dtype == np.int16
    assert vol.metadata["missing_slices"] == {"axis": 0, "indices": [20, 41, 42]}
    kept = [k for k in range(60) if k not in (20, 41, 42)]
    np.testing.assert_array_equal(vol.data[kept], ct_slices[kept])  # never blended
    assert set(np.unique(vol.data[[20, 41, 42]])) == {int(ct_slices[kept].min())}
    # Interpolated only when asked (io.read passes resample on).
    with pytest.warns(DicomReadWarning, match="resampled by linear interpolation"):
        (resampled,) = io.read(tmp_path / "s", resample=True)
    assert resampled.data.dtype == np.float32 and resampled.metadata["resampled"]
    assert resampled.data.shape == (60, 48, 48)
    np.testing.assert_array_equal(resampled.data[[0, -1]], ct_slices[[0, -1]])  # the ends exact


def test_duplicated_instance_is_dropped_with_a_note(tmp_path, ct_slices):
    files = write_ct_series(tmp_path / "s" / "a", ct_slices[:10], 0.625 * np.arange(10))
    (tmp_path / "s" / "b").mkdir()
    shutil.copy(files[3], tmp_path / "s" / "b" / "copy.dcm")
    with pytest.warns(DicomReadWarning) as record:
        volumes = read_dicom(tmp_path / "s")
    assert len(volumes) == 1 and volumes[0].data.shape == (10, 48, 48)
    np.testing.assert_array_equal(volumes[0].data, ct_slices[:10])
    (message,) = [str(w.message) for w in record]
    assert "dropped 1 duplicated instance" in message and "copy.dcm" in message
    assert volumes[0].metadata["warnings"] == [message]
    # The CLI takes it as one series.
    from napari_mediffuse.tasks.cli import read_single_volume

    with pytest.warns(DicomReadWarning):
        assert read_single_volume(tmp_path / "s").data.shape == (10, 48, 48)


def test_duplicated_pydicom_file_in_two_folders_is_one_series(tmp_path):
    source = get_testdata_file("CT_small.dcm")
    if source is None:
        pytest.skip("pydicom test file CT_small.dcm not available")
    for name in ("export1", "export2"):
        (tmp_path / name).mkdir()
        shutil.copy(source, tmp_path / name / "CT_small.dcm")
    with pytest.warns(DicomReadWarning, match="dropped 1 duplicated instance"):
        volumes = read_dicom(tmp_path)
    assert len(volumes) == 1 and volumes[0].data.shape == (1, 128, 128)
    assert volumes[0].metadata["files"] == [str(tmp_path / "export1" / "CT_small.dcm")]


def test_four_phases_make_one_4d_volume_like_a_4d_nifti(tmp_path, ct_slices):
    series_uid, study_uid = generate_uid(), generate_uid()
    z = 10.0 + 2.5 * np.arange(6)
    for phase in range(4):  # arterial, portal... : +40 HU per phase
        write_ct_series(tmp_path / "s" / f"p{phase}", ct_slices[:6] + 40 * phase, z,
                        series_uid=series_uid, study_uid=study_uid,
                        TemporalPositionIdentifier=phase + 1, description="4 phase liver")
    (vol,) = read_dicom(tmp_path / "s")
    assert vol.name == "4 phase liver (CT)"
    assert vol.data.shape == (4, 6, 48, 48) and vol.data.dtype == np.int16
    assert vol.metadata["phase_labels"] == [f"time point {k}" for k in range(1, 5)]
    for phase in range(4):
        np.testing.assert_array_equal(vol.data[phase], ct_slices[:6] + 40 * phase)
    assert vol.spacing == pytest.approx((2.5, 0.7, 0.7))
    # Same layout as a 4D NIfTI read back: (time, S, P, L), same geometry.
    io.write_nifti(vol, tmp_path / "phases.nii.gz")
    back = io.read_nifti(tmp_path / "phases.nii.gz")
    assert back.data.shape == vol.data.shape
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)
    np.testing.assert_array_equal(back.data, vol.data)
    # napari gets one 4D layer: a phase slider, the spatial scale in mm.
    from napari_mediffuse.plugin import read_layers

    (layer,) = read_layers(str(tmp_path / "s"))
    assert layer[0].shape == (4, 6, 48, 48) and layer[2] == "image"
    assert tuple(layer[1]["scale"]) == pytest.approx((1.0, 2.5, 0.7, 0.7))


def test_localizer_in_the_series_is_listed_apart(tmp_path, ct_slices):
    series_uid, study_uid = generate_uid(), generate_uid()
    write_ct_series(tmp_path / "s", ct_slices[:8], 2.5 * np.arange(8),
                    series_uid=series_uid, study_uid=study_uid)
    scout = ct_dataset(ct_slices[0], (-16.8, 0.0, 40.0), series_uid=series_uid,
                       study_uid=study_uid, instance=99, iop=(1, 0, 0, 0, 0, -1),
                       ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    scout.save_as(tmp_path / "s" / "scout.dcm", enforce_file_format=True)
    with pytest.warns(DicomReadWarning, match="set apart as localizer"):
        volumes = read_dicom(tmp_path / "s")
    assert [v.name for v in volumes] == ["abdomen (CT)", "abdomen (CT) coronal [localizer]"]
    np.testing.assert_array_equal(volumes[0].data, ct_slices[:8])
    assert volumes[1].metadata["localizer"] and not volumes[0].metadata["localizer"]
    # In napari the localizer is listed after the scan, hidden.
    from napari_mediffuse.plugin import read_layers

    with pytest.warns(DicomReadWarning):
        layers = read_layers(str(tmp_path / "s"))
    assert [kwargs["name"] for _, kwargs, _ in layers] == [v.name for v in volumes]
    assert [kwargs.get("visible", True) for _, kwargs, _ in layers] == [True, False]


# ---------------------------------------------------------------------------
# CLI: --series and --modality on every task that reads a scan
# ---------------------------------------------------------------------------

TASKS_WITH_INPUT = ("denoise", "sr", "inpaint", "translate", "anomaly")


def test_every_task_with_an_input_takes_series_and_modality():
    from napari_mediffuse.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name in TASKS_WITH_INPUT:
        options = {o for a in subparsers[name]._actions for o in a.option_strings}
        assert {"--series", "--modality"} <= options, name
    for name in ("synthesize", "sample-images"):  # no INPUT: no --series
        if name in subparsers:
            options = {o for a in subparsers[name]._actions for o in a.option_strings}
            assert "--series" not in options, name


def test_series_chosen_by_index_uid_or_description(tmp_path, ct_slices):
    from napari_mediffuse.tasks.cli import read_single_volume

    uid = generate_uid()
    write_ct_series(tmp_path / "a", ct_slices[:4], 2.5 * np.arange(4), description="arterial",
                    series_uid=uid, SeriesNumber=1)
    write_ct_series(tmp_path / "b", ct_slices[4:10], 2.5 * np.arange(6), description="venous",
                    SeriesNumber=2)
    with pytest.raises(io.ReadError) as error:
        read_single_volume(tmp_path)
    message = str(error.value)
    assert message.startswith(f"{tmp_path}: holds 2 series (0: arterial (CT), 1: venous (CT))")
    assert "--series" in message and "\n" not in message
    assert read_single_volume(tmp_path, series="1").data.shape == (6, 48, 48)
    assert read_single_volume(tmp_path, series=uid).data.shape == (4, 48, 48)
    assert read_single_volume(tmp_path, series="VENOUS").metadata["series_description"] == "venous"
    for bad, reason in (("7", "there are only 2 series"), ("delayed", "matches no series"),
                        ("(CT)", "matches 2 series")):
        with pytest.raises(io.ReadError, match=reason):
            read_single_volume(tmp_path, series=bad)


def test_modality_override_lets_denoise_run_on_a_crop_guessed_mr(tmp_path, capsys):
    from napari_mediffuse.cli import main

    img = nib.load(shared("ct/abdomen_ct_3mm_small.nii.gz"))
    crop = np.asanyarray(img.dataobj)[50:74, 40:64, 10:16]  # liver/soft tissue: no air
    nib.save(nib.Nifti1Image(crop.astype(np.int16), img.affine), tmp_path / "crop.nii.gz")
    assert io.read(tmp_path / "crop.nii.gz")[0].modality == "MR"  # what the guess says

    out = tmp_path / "den.nii.gz"
    args = ["denoise", str(tmp_path / "crop.nii.gz"), "-o", str(out), "--method", "nlm"]
    assert main(args) == 2 and not out.exists()
    assert "MR" in capsys.readouterr().err
    assert main(args + ["--modality", "CT"]) == 0
    result = io.read(out)[0]
    assert result.data.shape == (6, 24, 24)
    assert abs(float(result.data.mean()) - float(crop.mean())) < 20  # HU kept


def test_convert_takes_the_same_series_choice(tmp_path, ct_slices, capsys):
    from napari_mediffuse.cli import main

    write_ct_series(tmp_path / "in" / "a", ct_slices[:4], 2.5 * np.arange(4), description="arterial")
    write_ct_series(tmp_path / "in" / "b", ct_slices[4:10], 2.5 * np.arange(6), description="venous")
    assert main(["convert", str(tmp_path / "in"), "-o", str(tmp_path / "x.nii.gz")]) == 2
    assert "holds 2 series (0: arterial (CT), 1: venous (CT))" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "in"), "-o", str(tmp_path / "v.nii.gz"),
                 "--series", "venous"]) == 0
    np.testing.assert_array_equal(io.read(tmp_path / "v.nii.gz")[0].data, ct_slices[4:10])
