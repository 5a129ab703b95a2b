"""DICOM reading and writing on real files (pydicom's test data).

Geometry is checked against a hand computation from ImagePositionPatient /
ImageOrientationPatient / PixelSpacing, voxel by voxel, and against dcm2niix.
Synthetic series are made from the real pixel data of ``CT_small.dcm`` with
chosen positions, orientations and header quirks.
"""
from __future__ import annotations

import copy
import glob
import shutil
import subprocess
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel import orientations as nio
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import generate_uid

from napari_mediffuse.io.dicom import DicomReadWarning, is_dicom_file, read_dicom
from napari_mediffuse.io.dicom_write import write_dicom_series
from napari_mediffuse.io.errors import ReadError, WriteError
from napari_mediffuse.io.volume import axcodes

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def data_file(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available")
    return Path(path)


@pytest.fixture(scope="module")
def dicomdir_root() -> Path:
    return data_file("DICOMDIR").parent


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def hu_of(ds) -> np.ndarray:
    """Rescaled pixel values of a single-frame dataset (float64)."""
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return ds.pixel_array.astype(np.float64) * slope + intercept


def dicom_voxel_ras(ds, rows, cols) -> np.ndarray:
    """RAS position (n, 3) of pixels (rows, cols) of a single-frame dataset."""
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    ps = [float(v) for v in ds.PixelSpacing]
    lps = (ipp + np.outer(cols * ps[1], iop[:3]) + np.outer(rows * ps[0], iop[3:]))
    return lps * LPS_TO_RAS


def assert_voxels_at_dicom_positions(volume, files, atol=1e-3, step=1):
    """Every pixel of every file is a voxel of ``volume`` at the same RAS point."""
    inverse = np.linalg.inv(volume.affine)
    for file in files:
        ds = pydicom.dcmread(file)
        rows, cols = np.mgrid[0:ds.Rows:step, 0:ds.Columns:step]
        rows, cols = rows.ravel(), cols.ravel()
        ras = dicom_voxel_ras(ds, rows, cols)
        index = (inverse[:3, :3] @ ras.T).T + inverse[:3, 3]
        rounded = np.round(index)
        np.testing.assert_allclose(index, rounded, atol=atol)
        values = volume.data[tuple(rounded.astype(int).T)]
        np.testing.assert_allclose(values, hu_of(ds)[rows, cols], atol=1e-3)


def write_series(folder: Path, positions, *, iop=AXIAL, thickness=5.0, series_uid=None,
                 description="synthetic", shuffle=True, per_slice=None, seed=0,
                 offset_step=10) -> list[Path]:
    """A CT series from CT_small's pixels at the given LPS positions.

    Slice ``k`` (in the order of ``positions``) holds CT_small's stored values
    plus ``offset_step * k``. File names and InstanceNumbers are shuffled
    unless ``shuffle`` is False. ``per_slice[k]`` maps keywords to values for
    slice k. Returns the files in the order of ``positions``.
    """
    base = pydicom.dcmread(data_file("CT_small.dcm"))
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    n = len(positions)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n) if shuffle else np.arange(n)
    files = []
    for k, position in enumerate(positions):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = description
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = int(order[k]) + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
        if thickness is None:
            del ds.SliceThickness
        else:
            ds.SliceThickness = thickness
        del ds.SliceLocation
        pixels = base.pixel_array.astype(np.int16) + np.int16(offset_step * k)
        ds.PixelData = pixels.astype("<i2").tobytes()
        for keyword, value in (per_slice[k] if per_slice else {}).items():
            setattr(ds, keyword, value)
        path = folder / f"slice_{int(order[k]):03d}.dcm"
        ds.save_as(path)
        files.append(path)
    return files


def axial_positions(n, spacing=2.5, start=(-158.1358, -179.0358, -75.7)):
    start = np.asarray(start)
    return [start + np.array([0.0, 0.0, k * spacing]) for k in range(n)]


def read_quietly(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DicomReadWarning)
        return read_dicom(path)


def to_ras(data, affine):
    """Reorient an array + affine to RAS with nibabel.orientations."""
    transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt("RAS"))
    return (nio.apply_orientation(data, transform),
            affine @ nio.inv_ornt_aff(transform, data.shape))


def run_dcm2niix(folder: Path, out: Path) -> nib.Nifti1Image:
    if shutil.which("dcm2niix") is None:
        pytest.skip("dcm2niix not installed")
    out.mkdir()
    subprocess.run(["dcm2niix", "-z", "y", "-o", str(out), str(folder)], check=True,
                   capture_output=True, timeout=60)
    outputs = glob.glob(str(out / "*.nii.gz"))
    assert len(outputs) == 1, outputs
    return nib.load(outputs[0])


def assert_same_as_nifti(volume, img):
    """Every voxel of ``volume`` sits at the same RAS point with the same value."""
    theirs = img.get_fdata()
    # Voxel by voxel, through both affines.
    index = np.indices(volume.data.shape).reshape(3, -1)
    ras = volume.affine[:3, :3] @ index + volume.affine[:3, 3:4]
    inverse = np.linalg.inv(img.affine)
    their_index = inverse[:3, :3] @ ras + inverse[:3, 3:4]
    np.testing.assert_allclose(their_index, np.round(their_index), atol=2e-3)
    values = theirs[tuple(np.round(their_index).astype(int))]
    np.testing.assert_allclose(volume.data.reshape(-1), values, atol=1e-3)
    # And as whole arrays in a common (RAS) orientation.
    ours_ras, ours_affine = to_ras(volume.data, volume.affine)
    theirs_ras, theirs_affine = to_ras(theirs, img.affine)
    np.testing.assert_allclose(ours_ras, theirs_ras, atol=1e-3)
    np.testing.assert_allclose(ours_affine, theirs_affine, atol=2e-3)


# ---------------------------------------------------------------------------
# is_dicom_file
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("CT_small.dcm", True),
    ("rtstruct.dcm", True),  # no preamble, valid SOP Class UID
    ("ExplVR_BigEndNoMeta.dcm", True),
    ("README.txt", False),
    ("crayons.icc", False),
])
def test_is_dicom_file(name, expected):
    assert is_dicom_file(data_file(name)) is expected


def test_is_dicom_file_rejects_folders_and_junk(tmp_path):
    (tmp_path / "junk.dcm").write_bytes(np.random.default_rng(0).bytes(4000))
    assert not is_dicom_file(tmp_path)
    assert not is_dicom_file(tmp_path / "junk.dcm")
    assert not is_dicom_file(tmp_path / "missing.dcm")


# ---------------------------------------------------------------------------
# Single files: values and geometry
# ---------------------------------------------------------------------------


def test_ct_small_hounsfield_units_and_hand_computed_affine():
    path = data_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    (vol,) = read_dicom(path)

    assert vol.modality == "CT" and vol.name == "series (CT)"
    assert vol.data.shape == (1, 128, 128) and vol.data.dtype == np.int16
    np.testing.assert_array_equal(vol.data[0], ds.pixel_array.astype(np.int32) - 1024)
    # IOP (1,0,0,0,1,0): columns go +x (left), rows +y (posterior), slice
    # along +z -- already (S, P, L). Slice spacing = SliceThickness (5 mm).
    ps = 0.661468
    expected = np.array([
        [0.0, 0.0, -ps, 158.135803],
        [0.0, -ps, 0.0, 179.035797],
        [5.0, 0.0, 0.0, -75.699997],
        [0.0, 0.0, 0.0, 1.0],
    ])
    np.testing.assert_allclose(vol.affine, expected, atol=1e-6)
    assert axcodes(vol.affine) == ("S", "P", "L")
    meta = vol.metadata
    assert meta["slice_thickness_mm"] == 5.0 and meta["modality"] == "CT"
    assert meta["series_instance_uid"] == ds.SeriesInstanceUID
    assert meta["study_instance_uid"] == ds.StudyInstanceUID
    assert meta["manufacturer"] == "GE MEDICAL SYSTEMS"
    assert meta["transfer_syntax"] == "Explicit VR Little Endian"
    assert meta["files"] == [str(path)]
    assert meta["dicom_reference"]["FrameOfReferenceUID"] == ds.FrameOfReferenceUID
    assert vol.source == str(path)
    # No patient-identifying tag anywhere in the volume.
    text = repr(vol.metadata) + vol.name
    for keyword in ("PatientName", "PatientID"):
        assert str(ds.get(keyword)) not in text


@pytest.mark.parametrize("name", [
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "MR_small_expb.dcm",
])
def test_compressed_and_other_encodings_match_uncompressed(name):
    (reference,) = read_dicom(data_file("MR_small.dcm"))
    (vol,) = read_dicom(data_file(name))
    np.testing.assert_array_equal(vol.data, reference.data)
    np.testing.assert_allclose(vol.affine, reference.affine, atol=1e-9)
    assert vol.modality == "MR"
    assert vol.metadata["transfer_syntax"] == pydicom.dcmread(
        data_file(name), stop_before_pixels=True).file_meta.TransferSyntaxUID.name


def test_oblique_mr_float_rescale_voxels_at_dicom_positions():
    path = data_file("MR2_UNCI.dcm")  # oblique, RescaleSlope 3.77, intercept 6e-5
    (vol,) = read_dicom(path)
    assert vol.data.dtype == np.float32
    assert vol.is_oblique
    assert_voxels_at_dicom_positions(vol, [path], step=7)


def test_enhanced_ct_per_frame_positions_and_shared_groups():
    path = data_file("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    (vol,) = read_dicom(path)
    # Shared: IOP (-1,0,0,0,1,0), pixel spacing 0.388672, intercept -1024.
    # Per frame: frame 0 at z=-159, frame 1 at z=-149.
    assert vol.data.shape == (2, 512, 512)
    hu = ds.pixel_array.astype(np.int32) - 1024
    # Rows run posterior already; columns run to the patient's right
    # (row cosine -x in LPS), flipped to run left.
    np.testing.assert_array_equal(vol.data, hu[:, :, ::-1])
    ps = 0.388672
    first = np.array([99.5, -301.5, -159.0]) + 511 * ps * np.array([-1.0, 0.0, 0.0])
    expected = np.array([
        [0.0, 0.0, -ps, -first[0]],
        [0.0, -ps, 0.0, -first[1]],
        [10.0, 0.0, 0.0, first[2]],
        [0.0, 0.0, 0.0, 1.0],
    ])
    np.testing.assert_allclose(vol.affine, expected, atol=1e-6)
    assert vol.metadata["slice_thickness_mm"] == 10.0


def _add_functional_groups(ds, positions, orientations, spacing=(0.5, 0.6),
                           slope=2.0, intercept=-10.0):
    """Give an enhanced MR dataset per-frame positions/orientations."""
    shared = pydicom.Dataset()
    measures = pydicom.Dataset()
    measures.PixelSpacing = list(spacing)
    measures.SliceThickness = 3.0
    shared.PixelMeasuresSequence = [measures]
    transform = pydicom.Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = slope, intercept
    transform.RescaleType = "US"
    shared.PixelValueTransformationSequence = [transform]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for position, orientation in zip(positions, orientations):
        item = pydicom.Dataset()
        plane = pydicom.Dataset()
        plane.ImagePositionPatient = list(position)
        item.PlanePositionSequence = [plane]
        ori = pydicom.Dataset()
        ori.ImageOrientationPatient = list(orientation)
        item.PlaneOrientationSequence = [ori]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    return ds


@pytest.mark.parametrize("name", [
    "emri_small.dcm",
    "emri_small_RLE.dcm",
    "emri_small_jpeg_2k_lossless.dcm",
    "emri_small_jpeg_ls_lossless.dcm",
    "emri_small_big_endian.dcm",
])
def test_enhanced_mr_functional_groups_with_compression(tmp_path, name):
    reference = pydicom.dcmread(data_file("emri_small.dcm")).pixel_array  # (10, 64, 64)
    ds = pydicom.dcmread(data_file(name))
    # Frames acquired top to bottom: descending z, 1.2 mm apart.
    positions = [(-20.0, -30.0, 40.0 - 1.2 * f) for f in range(10)]
    _add_functional_groups(ds, positions, [AXIAL] * 10)
    path = tmp_path / name
    ds.save_as(path)

    (vol,) = read_dicom(path)
    assert vol.data.shape == (10, 64, 64) and vol.data.dtype == np.int16
    # Sorted by position: inferior (last frame) first; slope 2, intercept -10.
    np.testing.assert_array_equal(vol.data, reference[::-1].astype(np.int32) * 2 - 10)
    np.testing.assert_allclose(vol.spacing, (1.2, 0.5, 0.6), atol=1e-9)
    np.testing.assert_allclose(vol.affine[:3, 3], [20.0, 30.0, 40.0 - 1.2 * 9], atol=1e-9)
    assert vol.metadata["slice_thickness_mm"] == 3.0


def test_enhanced_frames_with_different_orientations_are_separate_volumes(tmp_path):
    ds = pydicom.dcmread(data_file("emri_small.dcm"))
    reference = ds.pixel_array
    positions = [(0.0, 0.0, 2.0 * f) for f in range(5)] + [(3.0 * f, 0.0, 0.0) for f in range(5)]
    _add_functional_groups(ds, positions, [AXIAL] * 5 + [SAGITTAL] * 5, slope=1, intercept=0)
    ds.SeriesDescription = "two stacks"
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path)

    with pytest.warns(DicomReadWarning) as record:
        volumes = read_dicom(path)
    (message,) = [str(w.message) for w in record]
    assert message == (f"{path}: series 'two stacks': slices disagree in orientation "
                       "(5 axial, 5 sagittal) and no orientation holds most of them; "
                       "each is read as a separate volume")
    assert sorted(v.name for v in volumes) == ["two stacks (MR) axial", "two stacks (MR) sagittal"]
    axial = next(v for v in volumes if v.name.endswith("axial"))
    sagittal = next(v for v in volumes if v.name.endswith("sagittal"))
    np.testing.assert_array_equal(axial.data, reference[:5])
    assert axial.spacing[0] == pytest.approx(2.0)
    assert sagittal.data.shape == (64, 64, 5)  # (S, P, L): slices run along L
    assert sagittal.spacing[2] == pytest.approx(3.0)


# ---------------------------------------------------------------------------
# DICOMDIR and folder trees
# ---------------------------------------------------------------------------

#: (name, slices along the slice axis) of every volume in pydicom's DICOMDIR
#: test set, in SeriesNumber order. The tri-plane localisers and the radial
#: MIPs share a SeriesInstanceUID across orientations and split into one
#: volume per orientation; "Routine Brain" has a 202.5 mm gap: its 4 slices
#: stay at their true places on a 1.25 mm grid of 165 slices (not
#: interpolated). The CT scouts (ImageType LOCALIZER) are listed last.
DICOMDIR_VOLUMES = {
    "FAST LOCALIZER (MR)": 1,
    "FAST LOCALIZER (MR) #2": 1,
    "FAST LOCALIZER (MR) #3": 1,
    "Routine Brain (CT)": 165,
    "FAST LOCALIZER (MR) #4": 1,
    "T/S/C RF FAST PILOT (MR) coronal": 1,
    "T/S/C RF FAST PILOT (MR) sagittal": 1,
    "T/S/C RF FAST PILOT (MR) axial": 1,
    "T/S/C RF FAST PILOT (MR) coronal #2": 1,
    "T/S/C RF FAST PILOT (MR) sagittal #2": 1,
    "T/S/C RF FAST PILOT (MR) axial #2": 1,
    "SmartScore - Gated 0.5 sec (CT)": 5,
    **{f"ANGIO Projected from C (MR) {name}": 1 for name in (
        "coronal", "coronal #2", "coronal #3", "sagittal", "sagittal #2",
        "sagittal #3", "sagittal #4")},
    "Scout (CT) sagittal [localizer]": 1,
    "Scout (CT) coronal [localizer]": 1,
}


def _slice_count(volume) -> int:
    """Slices along the volume's acquisition (normal) axis."""
    first = pydicom.dcmread(volume.metadata["files"][0], stop_before_pixels=True)
    iop = np.array([float(v) for v in first.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:]) * LPS_TO_RAS
    cosines = volume.affine[:3, :3] / np.linalg.norm(volume.affine[:3, :3], axis=0)
    axis = int(np.argmax(np.abs(normal @ cosines)))
    return volume.data.shape[axis]


def test_dicomdir_series_and_slice_counts(dicomdir_root):
    with pytest.warns(DicomReadWarning) as record:
        volumes = read_dicom(dicomdir_root / "DICOMDIR")
    assert {v.name: _slice_count(v) for v in volumes} == DICOMDIR_VOLUMES
    assert [v.name for v in volumes] == list(DICOMDIR_VOLUMES)  # SeriesNumber order
    numbers = [v.metadata["series_number"] for v in volumes if not v.metadata["localizer"]]
    assert numbers == sorted(numbers)
    assert [v.name for v in volumes if v.metadata["localizer"]] == list(DICOMDIR_VOLUMES)[-2:]
    brain = volumes[list(DICOMDIR_VOLUMES).index("Routine Brain (CT)")]
    assert brain.data.dtype == np.int16 and not brain.metadata["resampled"]
    assert len(brain.metadata["missing_slices"]["indices"]) == 161
    assert_voxels_at_dicom_positions(brain, brain.metadata["files"], step=7)
    messages = [str(w.message) for w in record]
    # The three CR radiographs have no patient geometry; nothing else skipped.
    skipped = [m for m in messages if "skipped" in m]
    assert len(skipped) == 1 and "skipped 3 of 31 files" in skipped[0]
    assert "2D image without patient geometry" in skipped[0] and "CR1/6154" in skipped[0]
    assert any("uneven slice spacing" in m and "Routine Brain" in m for m in messages)
    for message in messages:  # patients: Doe^Archibald, Doe^Peter (ID 98890234)
        assert "Doe^" not in message and "98890234" not in message

    smart = volumes[list(DICOMDIR_VOLUMES).index("SmartScore - Gated 0.5 sec (CT)")]
    assert smart.metadata["slice_spacing_mm"] == pytest.approx(2.5)
    assert_voxels_at_dicom_positions(smart, smart.metadata["files"])


def test_folder_tree_walk_finds_the_same_series(dicomdir_root):
    with pytest.warns(DicomReadWarning) as record:
        volumes = read_dicom(dicomdir_root)
    skipped = [str(w.message) for w in record if "skipped" in str(w.message)]
    assert len(skipped) == 1
    for expected in ("skipped 55 of 91 files", "not a DICOM file: 2 files (README.txt",
                     "2D image without patient geometry: 3 files",
                     "no pixel data (truncated?): 50 files (TINY_ALPHA/"):
        assert expected in skipped[0]
    assert sorted(v.name for v in volumes) == sorted(DICOMDIR_VOLUMES)
    assert all(v.source == str(dicomdir_root) for v in volumes)


def test_dcm2niix_agrees_voxel_by_voxel(dicomdir_root, tmp_path):
    series = tmp_path / "ct"
    shutil.copytree(dicomdir_root / "98892001" / "CT5N", series)
    (vol,) = read_dicom(series)
    img = run_dcm2niix(series, tmp_path / "nifti")
    assert img.shape == (16, 16, 5)
    assert_same_as_nifti(vol, img)


def _rotation(ax_deg, az_deg):
    a, b = np.radians(ax_deg), np.radians(az_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return rx @ rz


def test_dcm2niix_agrees_on_an_oblique_series(tmp_path):
    rot = _rotation(20.0, 30.0)
    row, col, normal = rot[:, 0], rot[:, 1], rot[:, 2]
    start = np.array([-40.0, -60.0, 10.0])
    positions = [start + 3.0 * k * normal for k in range(6)]
    files = write_series(tmp_path / "oblique", positions,
                         iop=tuple(np.concatenate([row, col])), thickness=3.0)
    (vol,) = read_dicom(tmp_path / "oblique")
    assert vol.is_oblique
    assert_voxels_at_dicom_positions(vol, files, step=5)
    img = run_dcm2niix(tmp_path / "oblique", tmp_path / "nifti")
    assert_same_as_nifti(vol, img)


# ---------------------------------------------------------------------------
# Synthetic series: sorting, spacing, tilt, splitting, rescale
# ---------------------------------------------------------------------------


def test_slices_sorted_by_position_not_file_name_or_instance_number(tmp_path):
    positions = axial_positions(6)
    files = write_series(tmp_path / "s", positions, shuffle=True, seed=3)
    (vol,) = read_dicom(tmp_path / "s")
    base = pydicom.dcmread(data_file("CT_small.dcm")).pixel_array.astype(np.int32) - 1024
    for k in range(6):  # (S, P, L): slice k is the k-th position from inferior
        np.testing.assert_array_equal(vol.data[k], base + 10 * k)
    assert vol.metadata["files"] == [str(f) for f in files]
    assert vol.metadata["slice_spacing_mm"] == pytest.approx(2.5)
    assert vol.metadata["warnings"] == []
    assert_voxels_at_dicom_positions(vol, files, step=3)


def test_missing_slice_is_reported_and_slices_stay_in_place(tmp_path):
    positions = axial_positions(7, spacing=2.0)
    files = write_series(tmp_path / "gap", positions, description="gappy")
    files[4].unlink()  # the slice at 8 mm is missing: a 4 mm gap
    kept = files[:4] + files[5:]
    with pytest.warns(DicomReadWarning) as record:
        (vol,) = read_dicom(tmp_path / "gap")
    message = str(record[0].message)
    assert str(tmp_path / "gap") in message and "gappy" in message
    assert "1 missing" in message and "4 mm between slices 4 and 5" in message
    assert "nothing is interpolated" in message
    assert vol.metadata["warnings"] == [message] and not vol.metadata["resampled"]
    # Integer HU kept; the 6 acquired slices exact at their true positions.
    assert vol.data.shape[0] == 7 and vol.data.dtype == np.int16
    assert vol.metadata["slice_spacing_mm"] == pytest.approx(2.0)
    assert vol.metadata["missing_slices"] == {"axis": 0, "indices": [4]}
    assert_voxels_at_dicom_positions(vol, kept, step=3)
    assert np.all(vol.data[4] == vol.data.min())


def test_missing_slice_is_interpolated_only_when_asked(tmp_path):
    files = write_series(tmp_path / "gap", axial_positions(7, spacing=2.0))
    files[4].unlink()
    with pytest.warns(DicomReadWarning, match="resampled by linear interpolation"):
        (vol,) = read_dicom(tmp_path / "gap", resample=True)
    assert vol.metadata["resampled"] and vol.data.dtype == np.float32
    assert "missing_slices" not in vol.metadata
    assert_voxels_at_dicom_positions(vol, files[:4] + files[5:], step=3)
    expected = (vol.data[3].astype(np.float64) + vol.data[5]) / 2
    np.testing.assert_allclose(vol.data[4], expected, atol=1e-3)


def test_gantry_tilt_keeps_true_positions_in_a_sheared_affine(tmp_path):
    tilt = np.radians(15.0)
    positions = [np.array([-158.0, -179.0 + 2.5 * k * np.tan(tilt), -75.0 + 2.5 * k])
                 for k in range(5)]
    files = write_series(tmp_path / "tilt", positions, description="tilted")
    with pytest.warns(DicomReadWarning, match=r"gantry tilt of 15\.00 degrees detected"):
        (vol,) = read_dicom(tmp_path / "tilt")
    assert vol.metadata["gantry_tilt_deg"] == pytest.approx(15.0, abs=1e-3)
    assert vol.metadata["slice_spacing_mm"] == pytest.approx(2.5)
    slice_step = vol.affine[:3, 0]  # array axis 0 = S
    np.testing.assert_allclose(slice_step, [0.0, -2.5 * np.tan(tilt), 2.5], atol=1e-5)
    assert_voxels_at_dicom_positions(vol, files, step=3)


def test_thickness_differs_from_spacing(tmp_path):
    files = write_series(tmp_path / "thick", axial_positions(5, spacing=2.0), thickness=3.0)
    (vol,) = read_dicom(tmp_path / "thick")
    assert vol.metadata["slice_thickness_mm"] == 3.0
    assert vol.metadata["slice_spacing_mm"] == pytest.approx(2.0)
    assert vol.spacing[0] == pytest.approx(2.0)
    assert_voxels_at_dicom_positions(vol, files, step=4)


def test_slices_of_another_orientation_are_set_apart_as_localizer(tmp_path):
    uid = generate_uid()
    axial = write_series(tmp_path / "mix", axial_positions(3), series_uid=uid,
                         description="stack")
    sagittal_positions = [np.array([-10.0 + 4.0 * k, -100.0, 50.0]) for k in range(4)]
    sagittal = write_series(tmp_path / "mix" / "sag", sagittal_positions, iop=SAGITTAL,
                            series_uid=uid, description="stack")
    with pytest.warns(DicomReadWarning) as record:
        volumes = read_dicom(tmp_path / "mix")
    # The 4 sagittal slices are the stack; the 3 axial ones are listed after it.
    assert [v.name for v in volumes] == ["stack (CT)", "stack (CT) axial [localizer]"]
    assert [v.metadata["localizer"] for v in volumes] == [False, True]
    assert volumes[0].data.shape == (128, 128, 4)
    assert volumes[1].data.shape == (3, 128, 128)
    assert_voxels_at_dicom_positions(volumes[0], sagittal, step=5)
    assert_voxels_at_dicom_positions(volumes[1], axial, step=5)
    (message,) = [str(w.message) for w in record]
    assert "slices disagree in orientation; 3 axial set apart as localizer(s) from the " \
           "4-slice sagittal stack" in message and str(tmp_path / "mix") in message


def test_image_type_localizer_is_listed_last(tmp_path):
    write_series(tmp_path / "scout", axial_positions(1), description="topogram",
                 per_slice=[{"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"],
                             "SeriesNumber": 1}])
    files = write_series(tmp_path / "ct", axial_positions(4), description="abdomen",
                         per_slice=[{"SeriesNumber": 2}] * 4)
    volumes = read_dicom(tmp_path)
    assert [v.name for v in volumes] == ["abdomen (CT)", "topogram (CT) [localizer]"]
    assert_voxels_at_dicom_positions(volumes[0], files, step=6)


@pytest.mark.parametrize("tags", ["echo", "none", "unique times"])
def test_repeated_positions_make_one_4d_volume(tmp_path, tags):
    positions = axial_positions(4) * 2
    per_slice = [{"EchoNumbers": 1 + k // 4} if tags == "echo" else
                 {"AcquisitionTime": f"1200{k:02d}"} if tags == "unique times" else {}
                 for k in range(8)]
    # Without an echo tag the two repeats go by InstanceNumber (1-4, then 5-8);
    # a tag unique to every slice (AcquisitionTime) must not split per slice.
    files = write_series(tmp_path / "echo", positions, per_slice=per_slice, shuffle=False)
    (vol,) = read_dicom(tmp_path / "echo")
    labels = ["echo 1", "echo 2"] if tags == "echo" else ["part 1", "part 2"]
    assert vol.name == "synthetic (CT)" and vol.metadata["phase_labels"] == labels
    assert vol.data.shape == (2, 4, 128, 128) and vol.data.dtype == np.int16
    assert vol.metadata["files"] == [str(f) for f in files]
    for phase, part in zip(vol.data, (files[:4], files[4:])):
        assert_voxels_at_dicom_positions(vol.with_data(phase), part, step=6)


def test_rescale_applied_per_slice(tmp_path):
    per_slice = [{"RescaleSlope": 1, "RescaleIntercept": -1024} if k % 2 == 0 else
                 {"RescaleSlope": 0.5, "RescaleIntercept": -1000.25} for k in range(4)]
    files = write_series(tmp_path / "r", axial_positions(4), per_slice=per_slice)
    (vol,) = read_dicom(tmp_path / "r")
    assert vol.data.dtype == np.float32
    assert_voxels_at_dicom_positions(vol, files, step=4)

    per_slice = [{"RescaleIntercept": -1024 + 100 * k} for k in range(4)]
    files = write_series(tmp_path / "i", axial_positions(4), per_slice=per_slice)
    (vol,) = read_dicom(tmp_path / "i")
    assert vol.data.dtype == np.int16  # integral rescale keeps integers
    assert_voxels_at_dicom_positions(vol, files, step=4)


def test_single_slice_without_thickness_assumes_1_mm(tmp_path):
    write_series(tmp_path / "one", axial_positions(1), thickness=None)
    with pytest.warns(DicomReadWarning, match="assuming 1 mm"):
        (vol,) = read_dicom(tmp_path / "one")
    assert vol.data.shape == (1, 128, 128) and vol.spacing[0] == pytest.approx(1.0)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(ReadError, match="no such file"):
        read_dicom(tmp_path / "nope")
    with pytest.raises(ReadError, match="empty"):
        read_dicom(tmp_path)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "scan.dcm").write_bytes(b"\x00" * 10)
    with pytest.raises(ReadError, match="no readable CT/MR image series among 2 files") as err:
        read_dicom(tmp_path)
    assert "not a DICOM file: 2 files" in str(err.value)


@pytest.mark.parametrize("name, reason", [
    ("rtstruct.dcm", r"is an RT Structure Set \(RTSTRUCT\): contours are not supported yet"),
    ("test-SR.dcm", r"has no image data \(Comprehensive SR Storage\)"),
    ("JPEG2000.dcm", "is a 2D image without patient geometry"),
    ("SC_rgb.dcm", r"is a colour \(RGB\) image"),
    ("MR_truncated.dcm", r"cannot be decoded \(transfer syntax Explicit VR Little Endian\)"),
    ("README.txt", "is not a DICOM file"),
])
def test_unusable_single_files(name, reason):
    path = data_file(name)
    with pytest.raises(ReadError, match=reason) as err:
        read_dicom(path)
    assert str(path) in str(err.value)


def test_cr_radiograph_is_refused_as_2d(dicomdir_root):
    path = dicomdir_root / "77654033" / "CR1" / "6154"
    with pytest.raises(ReadError, match="is a 2D image without patient geometry"):
        read_dicom(path)


def test_undecodable_compressed_file_names_the_transfer_syntax(tmp_path):
    ds = pydicom.dcmread(data_file("MR_small_jp2klossless.dcm"))
    fragment = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([fragment[:40]])
    path = tmp_path / "broken.dcm"
    ds.save_as(path)
    with pytest.raises(ReadError, match=r"broken\.dcm cannot be decoded \(transfer syntax "
                                        r"JPEG 2000 Image Compression \(Lossless Only\)\)"):
        read_dicom(path)


def test_truncated_files(tmp_path):
    data = data_file("CT_small.dcm").read_bytes()
    (tmp_path / "head.dcm").write_bytes(data[:600])
    with pytest.raises(ReadError, match="head.dcm has no pixel data"):
        read_dicom(tmp_path / "head.dcm")
    (tmp_path / "pixels.dcm").write_bytes(data[:-5000])
    with pytest.raises(ReadError, match="pixels.dcm cannot be decoded"):
        read_dicom(tmp_path / "pixels.dcm")


def test_good_series_survive_bad_files_with_a_warning(tmp_path):
    folder = tmp_path / "mixed"
    files = write_series(folder / "ct", axial_positions(4), shuffle=False)
    shutil.copy(data_file("rtstruct.dcm"), folder / "rtstruct.dcm")
    shutil.copy(data_file("SC_rgb.dcm"), folder / "rgb.dcm")
    (folder / "notes.txt").write_text("hello")
    # A truncated copy of a slice of the series: dropped, the rest is read.
    truncated = folder / "ct" / "zz_truncated.dcm"
    extra = write_series(tmp_path / "extra", axial_positions(5), shuffle=False)[4]
    ds = pydicom.dcmread(extra)
    ds.SeriesInstanceUID = pydicom.dcmread(files[0]).SeriesInstanceUID
    ds.save_as(truncated)
    truncated.write_bytes(truncated.read_bytes()[:-3000])

    with pytest.warns(DicomReadWarning) as record:
        (vol,) = read_dicom(folder)
    assert vol.data.shape == (4, 128, 128)
    assert_voxels_at_dicom_positions(vol, files, step=8)
    message = " ".join(str(w.message) for w in record)
    assert "skipped 4 of 8 files" in message
    for expected in ("rtstruct.dcm", "rgb.dcm", "notes.txt", "zz_truncated.dcm",
                     "colour image", "RT structure set (not supported yet)", "not a DICOM file",
                     "pixel data cannot be decoded"):
        assert expected in message
    assert "CompressedSamples" not in message  # CT_small's patient name


def test_nothing_readable_summarises_reasons(tmp_path):
    for name in ("rtstruct.dcm", "test-SR.dcm", "SC_rgb.dcm", "JPEG2000.dcm"):
        shutil.copy(data_file(name), tmp_path / name)
    with pytest.raises(ReadError) as err:
        read_dicom(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path}: no readable CT/MR image series among 4 files")
    for expected in ("RT structure set (not supported yet): 1 file (rtstruct.dcm)",
                     "colour image: 1 file (SC_rgb.dcm)",
                     "2D image without patient geometry: 1 file (JPEG2000.dcm)"):
        assert expected in message


# ---------------------------------------------------------------------------
# Writing derived series
# ---------------------------------------------------------------------------


def test_write_round_trip_ct_exact(tmp_path):
    latin1 = {"SpecificCharacterSet": "ISO_IR 100", "PatientName": "Müller^Jörg"}
    files = write_series(tmp_path / "src", axial_positions(5, spacing=2.0), thickness=3.0,
                         per_slice=[latin1] * 5)
    (vol,) = read_dicom(tmp_path / "src")
    written = write_dicom_series(vol, tmp_path / "out", "denoised")
    assert [p.name for p in written] == [f"IM{k:05d}.dcm" for k in range(1, 6)]

    (back,) = read_dicom(tmp_path / "out")
    np.testing.assert_array_equal(back.data, vol.data)
    assert back.data.dtype == np.int16
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)
    assert back.name == "denoised (CT)"
    assert back.metadata["slice_thickness_mm"] == pytest.approx(3.0)

    source, out = pydicom.dcmread(files[0]), pydicom.dcmread(written[0])
    assert out.SOPClassUID == pydicom.uid.CTImageStorage
    assert list(out.ImageType) == ["DERIVED", "SECONDARY"]
    assert out.RescaleSlope == 1 and out.RescaleIntercept == 0
    assert out.DerivationDescription
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "FrameOfReferenceUID"):
        assert out.get(keyword) == source.get(keyword), keyword
    assert str(out.PatientName) == "Müller^Jörg"  # re-encoded as UTF-8
    assert out.SeriesInstanceUID != source.SeriesInstanceUID
    assert len({pydicom.dcmread(p).SOPInstanceUID for p in written}) == 5


def test_write_round_trip_float_mr_and_tilted_geometry(tmp_path):
    tilt = np.radians(10.0)
    positions = [np.array([-150.0, -170.0 + 2.0 * k * np.tan(tilt), -70.0 + 2.0 * k])
                 for k in range(4)]
    write_series(tmp_path / "src", positions)
    (ct,) = read_quietly(tmp_path / "src")
    values = ct.data.astype(np.float32) * 0.37 + 0.123
    mr = ct.with_data(values, modality="MR")
    written = write_dicom_series(mr, tmp_path / "out", "synthetic MR")

    (back,) = read_quietly(tmp_path / "out")
    out = pydicom.dcmread(written[0])
    assert out.SOPClassUID == pydicom.uid.MRImageStorage and back.modality == "MR"
    slope = float(out.RescaleSlope)
    np.testing.assert_allclose(back.data, values, atol=slope / 2 + 1e-4)
    np.testing.assert_allclose(back.affine, ct.affine, atol=1e-4)
    assert back.metadata["gantry_tilt_deg"] == pytest.approx(10.0, abs=1e-3)


def test_write_without_source_makes_a_new_study(tmp_path):
    (vol,) = read_dicom(data_file("CT_small.dcm"))
    vol = vol.with_data(vol.data, modality="OT")
    vol.metadata.pop("files")
    written = write_dicom_series(vol, tmp_path / "out", "mask")
    out = pydicom.dcmread(written[0])
    assert out.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert out.StudyInstanceUID != vol.metadata["study_instance_uid"]
    assert str(out.PatientName) == ""
    (back,) = read_dicom(tmp_path / "out")
    np.testing.assert_array_equal(back.data, vol.data)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)


def test_write_refuses_non_empty_folder_unless_overwrite(tmp_path):
    (vol,) = read_dicom(data_file("CT_small.dcm"))
    write_dicom_series(vol, tmp_path / "out", "first")
    with pytest.raises(WriteError, match="not empty"):
        write_dicom_series(vol, tmp_path / "out", "second")
    write_dicom_series(vol, tmp_path / "out", "second", overwrite=True)
    (back,) = read_dicom(tmp_path / "out")
    assert back.name == "second (CT)"
    with pytest.raises(WriteError, match="3D"):
        write_dicom_series(vol.with_data(vol.data[None]), tmp_path / "4d", "x")


def test_4d_series_with_an_undecodable_file_falls_back_to_one_volume_per_echo(tmp_path):
    positions = axial_positions(4) * 2
    per_slice = [{"EchoNumbers": 1 + k // 4} for k in range(8)]
    files = write_series(tmp_path / "echo", positions, per_slice=per_slice, shuffle=False)
    files[6].write_bytes(files[6].read_bytes()[:-3000])  # echo 2, third slice: truncated
    with pytest.warns(DicomReadWarning) as record:
        volumes = read_dicom(tmp_path / "echo")
    assert [v.name for v in volumes] == ["synthetic (CT) echo 1", "synthetic (CT) echo 2"]
    assert volumes[0].data.shape == (4, 128, 128)
    assert_voxels_at_dicom_positions(volumes[0], files[:4], step=6)
    assert volumes[1].metadata["missing_slices"] == {"axis": 0, "indices": [2]}
    assert_voxels_at_dicom_positions(volumes[1], files[4:6] + files[7:], step=6)
    messages = " ".join(str(w.message) for w in record)
    assert "pixel data cannot be decoded: 1 file" in messages and files[6].name in messages
