"""Tiny scans in the layouts users have, for geometry tests of every task.

* NIfTI: :data:`LAYOUTS` (RAS, LPS, LAS as dcm2niix writes, and an oblique
  grid), written by :func:`write_nifti_case` or the :func:`nifti_case`
  fixture (parametrised over the four). :func:`assert_same_grid` is the
  check every output must pass: ``nib.load(out).shape == nib.load(inp).shape``
  and affines equal to 1e-4 mm.
* DICOM: :func:`write_dicom_series` samples an analytic phantom (a CT-like
  body with bright spherical landmarks at known patient positions) on any
  slice stack (tilted, oblique), from pydicom's own test files as templates,
  so the true world position of every landmark is known.

Use from a test module::

    from geometry_cases import LAYOUTS, assert_same_grid, nifti_case  # noqa: F401 (fixture)
"""
from __future__ import annotations

import copy
import glob
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

#: NIfTI layouts of the geometry tests.
LAYOUTS = ("RAS", "LPS", "LAS", "oblique")

#: Voxel spacing (mm) of the NIfTI cases along the file axes (x, y, z):
#: thin pixels, thick slices, as clinical CT.
CASE_SPACING = (0.8, 0.9, 3.0)

#: Array shape (x, y, z) of the NIfTI cases: all different, so a swapped
#: axis shows.
CASE_SHAPE = (24, 20, 6)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def rotation(ax_deg: float, ay_deg: float = 0.0, az_deg: float = 0.0) -> np.ndarray:
    """Rotation matrix about x, then y, then z (degrees)."""
    a, b, c = np.radians([ax_deg, ay_deg, az_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def case_affine(layout: str) -> np.ndarray:
    """Index (x, y, z) -> RAS mm affine of a NIfTI case."""
    signs = {"RAS": (1, 1, 1), "LPS": (-1, -1, 1), "LAS": (-1, 1, 1), "oblique": (-1, 1, 1)}[layout]
    linear = np.diag(np.multiply(signs, CASE_SPACING))
    if layout == "oblique":  # an MR planned off the scanner axes: 15 and 10 degrees
        linear = rotation(15.0, 0.0, 10.0) @ linear
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = (-12.3, 20.7, -40.1)
    return affine


def ct_phantom(shape, seed: int = 0) -> np.ndarray:
    """CT-like int16 HU array: air around an elliptic 40 HU body with noise and
    a 700 HU 'bone' off centre (so flips and swaps change the array)."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = sum(g ** 2 for g in grids[:2]) < 0.8
    bone = ((grids[0] - 0.4) ** 2 + (grids[1] + 0.3) ** 2) < 0.04
    data = np.where(body, 40.0, -1000.0) + rng.normal(0.0, 20.0, shape)
    data[bone] = 700.0
    return np.round(data).astype(np.int16)


def write_nifti_case(folder: Path, layout: str, *, shape=CASE_SHAPE, seed: int = 0) -> Path:
    """A tiny CT NIfTI (``.nii.gz``) in ``layout``; returns its path."""
    img = nib.Nifti1Image(ct_phantom(shape, seed), case_affine(layout))
    img.set_sform(case_affine(layout), code=1)
    img.set_qform(case_affine(layout), code=1)
    path = Path(folder) / f"ct_{layout}.nii.gz"
    nib.save(img, str(path))
    return path


@pytest.fixture(params=LAYOUTS)
def nifti_case(request, tmp_path) -> Path:
    """Path of a tiny CT NIfTI in each layout of :data:`LAYOUTS`."""
    return write_nifti_case(tmp_path, request.param)


def assert_same_grid(output, reference, *, atol: float = 1e-4) -> None:
    """``output`` has exactly ``reference``'s array shape and affine (mm)."""
    out, ref = nib.load(str(output)), nib.load(str(reference))
    assert out.shape == ref.shape, f"{Path(output).name}: shape {out.shape}, input {ref.shape}"
    np.testing.assert_allclose(out.affine, ref.affine, atol=atol,
                               err_msg=f"{Path(output).name}: affine differs from the input's")


# -- DICOM series of an analytic phantom --------------------------------------------------

#: Landmark spheres (centre LPS mm, radius mm, HU) of :func:`phantom_lps`.
LANDMARKS = (
    (np.array([-20.0, -10.0, 5.0]), 8.0, 1000.0),
    (np.array([25.0, 15.0, -12.0]), 8.0, 1000.0),
    (np.array([5.0, 30.0, 30.0]), 8.0, 1000.0),
)


def phantom_lps(points: np.ndarray) -> np.ndarray:
    """HU of the analytic phantom at LPS points (n, 3) mm: a 40 HU ellipsoid
    (120 x 90 x 150 mm semi-axes) in air with :data:`LANDMARKS`."""
    inside = ((points[:, 0] / 120.0) ** 2 + (points[:, 1] / 90.0) ** 2 + (points[:, 2] / 150.0) ** 2) < 1.0
    values = np.where(inside, 40.0, -1000.0)
    for centre, radius, hu in LANDMARKS:
        values[np.linalg.norm(points - centre, axis=1) < radius] = hu
    return values


def stack_positions(first, normal_step, n: int) -> list[np.ndarray]:
    """ImagePositionPatient (LPS mm) of ``n`` slices ``normal_step`` apart."""
    return [np.asarray(first, float) + k * np.asarray(normal_step, float) for k in range(n)]


def write_dicom_series(folder: Path, positions, *, row_cosines, column_cosines, pixel_spacing: float,
                       size: int, template: str = "CT_small.dcm", tilt_deg: float | None = None,
                       thickness: float | None = None, seed: int = 0) -> list[Path]:
    """One series sampling :func:`phantom_lps` at the given slice positions.

    Parameters
    ----------
    positions : list of ndarray
        ImagePositionPatient (LPS mm) of each slice, in acquisition order.
    row_cosines, column_cosines : sequence of float
        ImageOrientationPatient's two halves.
    pixel_spacing : float
        Square pixels (mm); ``size`` x ``size`` pixels per slice.
    template : str
        pydicom test file whose header is copied (``CT_small.dcm`` for CT,
        ``MR2_UNCI.dcm`` for MR).
    tilt_deg : float, optional
        GantryDetectorTilt written in every slice (CT).
    """
    path = get_testdata_file(template)
    if path is None:
        pytest.skip(f"pydicom test file {template} not available")
    base = pydicom.dcmread(path)
    base.PixelData = b""  # not decoded: the pixels are written below
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    row_cosines, column_cosines = np.asarray(row_cosines, float), np.asarray(column_cosines, float)
    series_uid = generate_uid()
    rows, cols = np.mgrid[0:size, 0:size]
    rng = np.random.default_rng(seed)
    is_ct = str(base.Modality) == "CT"
    files = []
    for k, ipp in enumerate(positions):
        ds = copy.deepcopy(base)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = f"phantom {template.split('.')[0]}"
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in np.concatenate([row_cosines, column_cosines])]
        ds.PixelSpacing = [f"{pixel_spacing:.6f}"] * 2
        ds.Rows = ds.Columns = size
        if thickness is not None:
            ds.SliceThickness = f"{thickness:.4f}"
        for keyword in ("SliceLocation", "SpacingBetweenSlices"):
            if keyword in ds:
                delattr(ds, keyword)
        if tilt_deg is not None:
            ds.GantryDetectorTilt = f"{tilt_deg:.4f}"
        points = (np.asarray(ipp, float) + np.outer(cols.ravel() * pixel_spacing, row_cosines)
                  + np.outer(rows.ravel() * pixel_spacing, column_cosines))
        hu = phantom_lps(points).reshape(size, size) + rng.normal(0.0, 5.0, (size, size))
        if is_ct:  # stored = HU + 1024, int16, slope 1
            ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            stored = np.round(hu + 1024).astype("<i2")
        else:  # MR: arbitrary units, uint16
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            stored = np.clip(np.round(hu + 1000.0), 0, 65535).astype("<u2")
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = stored.tobytes()
        out = folder / f"slice_{k:03d}.dcm"
        ds.save_as(out, enforce_file_format=True)
        files.append(out)
    return files


def run_dcm2niix(folder: Path, out: Path) -> list[Path]:
    """dcm2niix's NIfTI files for a DICOM folder (skips when it is missing)."""
    if shutil.which("dcm2niix") is None:
        pytest.skip("dcm2niix not installed (pip install dcm2niix)")
    out.mkdir(parents=True)
    subprocess.run(["dcm2niix", "-z", "y", "-o", str(out), str(folder)], check=True,
                   capture_output=True, timeout=120)
    return [Path(p) for p in sorted(glob.glob(str(out / "*.nii.gz")))]


def landmark_centroids(data: np.ndarray, index_to_ras: np.ndarray, *, reach_mm: float = 20.0,
                       which=None) -> np.ndarray:
    """RAS position (mm) of each landmark of :data:`LANDMARKS` found in an
    array: the centre of mass of the intensity above the body's level within
    ``reach_mm`` of the landmark's true centre (a first moment, which linear
    resampling keeps, unlike a thresholded blob).

    ``index_to_ras`` maps the array's index to RAS mm; returns (n, 3) in the
    order of :data:`LANDMARKS` (or of the indices ``which``). Any units (HU,
    MR stored values, rescaled).
    """
    data = np.asarray(data, dtype=float)
    top = float(data.max())
    body = float(np.median(data[data > 0.5 * (float(data.min()) + top)]))
    index = np.indices(data.shape).reshape(3, -1).T.astype(float)
    ras = index @ index_to_ras[:3, :3].T + index_to_ras[:3, 3]
    excess = np.clip(data.reshape(-1) - body, 0.0, None)
    out = []
    truth = true_landmarks_ras()
    for k in range(len(truth)) if which is None else which:
        centre = truth[k]
        near = np.linalg.norm(ras - centre, axis=1) < reach_mm
        weights = excess * near
        assert weights.sum() > 0, f"landmark {k} not found"
        out.append((ras * weights[:, None]).sum(axis=0) / weights.sum())
    return np.array(out)


def true_landmarks_ras() -> np.ndarray:
    """RAS centres (mm) of :data:`LANDMARKS`."""
    return np.array([LPS_TO_RAS @ centre for centre, _, _ in LANDMARKS])
