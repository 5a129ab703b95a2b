"""Writing a derived volume as a DICOM series (one single-frame file per slice).

The written series is meant to file into the source study on a PACS: patient
and study tags and the Frame of Reference UID are copied from a source file,
the series and every instance get new UIDs, and ``ImageType`` says
``DERIVED\\SECONDARY``. Geometry is exact: every slice's
ImagePositionPatient/ImageOrientationPatient/PixelSpacing comes from the
volume's affine (RAS -> DICOM's LPS), so :func:`~napari_mediffuse.io.dicom.read_dicom`
gives the same affine back (to ~1e-6 mm; DS values carry 16 characters).

Values are stored as int16 with RescaleSlope/RescaleIntercept: integral data
(CT in HU, masks) is stored exactly with slope 1; other data is quantised to
65535 levels spanning its range (error at most half a slope).

A volume with a ``layout`` (read from DICOM or NIfTI, or a task's result)
is written in the slice stack dcm2niix converts back to that layout (for a
DICOM source: the source's own slices, rows and columns), so the derived
series converts to the input's array shape and affine. Otherwise slices are
written along the first array axis (axial for a volume in the display
orientation (S, P, L)); rows along the second axis, columns along the third.
"""
from __future__ import annotations

import copy
import datetime as _dt
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    PYDICOM_IMPLEMENTATION_UID,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pydicom.valuerep import DSfloat, PersonName

from .derived import is_task_result, mark_synthetic, source_image_references
from .dicom.discovery import DicomReadWarning, _quiet_pydicom
from .errors import WriteCancelled, WriteError
from .validate import check_output_folder
from .geometry import dicom_stack_layout
from .volume import Volume, reorient

__all__ = ["write_dicom_series"]

#: RAS <-> LPS for the spatial part of an affine (its own inverse).
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: File names written (and, with overwrite=True, replaced): IM00001.dcm ...
_FILE_PATTERN = re.compile(r"^IM\d{5}\.dcm$")

#: Row and column directions may deviate this much from perpendicular (cosine).
_ORTHOGONALITY_TOLERANCE = 1e-4

_INT16 = np.iinfo(np.int16)

#: Tags copied from the source file: patient, study and frame of reference.
_PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "PatientAge", "PatientSize", "PatientWeight", "PatientIdentityRemoved",
    "DeidentificationMethod",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
    "ReferringPhysicianName", "StudyDescription",
    "FrameOfReferenceUID", "PositionReferenceIndicator",
    "BodyPartExamined", "PatientPosition",
)

#: Acquisition tags copied when the source has the same modality.
_MODALITY_KEYWORDS = {
    "CT": ("KVP", "ConvolutionKernel"),
    "MR": ("ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType",
           "RepetitionTime", "EchoTime", "EchoTrainLength", "MagneticFieldStrength"),
}


def write_dicom_series(volume: Volume, folder, series_description: str, *,
                       source_files: Sequence | None = None, overwrite: bool = False,
                       series_number: int | None = None,
                       derivation_description: str | None = None,
                       keep_source_study: bool = False) -> list[Path]:
    """Write ``volume`` as a derived DICOM series, one file per slice.

    A task's result (``metadata['task']``, or a synthetic series read back)
    is marked synthetic (see :func:`~napari_mediffuse.io.derived.mark_synthetic`):
    SeriesDescription ``SYNTHETIC <task> <model>: ...``, DerivationDescription
    with the parameters, and a new study for the same patient unless
    ``keep_source_study``. Every slice references the source images at its
    position (SourceImageSequence).

    Parameters
    ----------
    volume : Volume
        3D volume (spatial axes only); slices are written in the stack of
        its ``layout`` (see the module docstring), else along axis 0.
        ``modality`` 'CT' gives CT Image Storage, 'MR' MR Image Storage,
        anything else Secondary Capture Image Storage (with patient geometry).
    folder : str or Path
        Target folder, created if needed; files are named ``IM00001.dcm``...
    series_description : str
        SeriesDescription of the new series (also its layer name on reading).
    source_files : sequence of paths, optional
        DICOM files of the source series. Patient, study and frame-of-reference
        tags are copied from the first one so the result files into the same
        study. Defaults to ``volume.metadata['files']`` (what
        :func:`~napari_mediffuse.io.dicom.read_dicom` records); without any,
        a new study and frame of reference are created.
    overwrite : bool
        Allow writing into a non-empty folder; previously written
        ``IM#####.dcm`` files there are removed first, other files are kept.
    series_number : int, optional
        SeriesNumber; default 1000 + the source's SeriesNumber (or 1000).
    derivation_description : str, optional
        DerivationDescription; default names the series and this software
        (a task's result: its task, model and parameters).
    keep_source_study : bool
        File a task's result into the source study instead of a new one
        (the default keeps synthetic images out of the acquired study).

    Returns
    -------
    list of Path
        Written files in slice order.

    Raises
    ------
    WriteError
        Folder not empty (and ``overwrite`` False), volume not 3D, values not
        finite, geometry not representable (non-perpendicular in-plane axes),
        unreadable explicit source file, or an OS error while writing
        (files written so far are removed).
    """
    folder = Path(folder)
    check_output_folder(folder, overwrite=overwrite)  # parent writable, name accepted, empty
    data = np.asarray(volume.data)
    if data.ndim != 3:
        raise WriteError(f"{folder}: only 3D volumes can be written as a DICOM series "
                         f"(got shape {data.shape})")
    affine = volume.affine
    if volume.layout is not None:  # the source's own slice stack: dcm2niix gives back its layout
        data, affine = reorient(data, affine, dicom_stack_layout(volume.layout))
    geometry = _slice_geometry(affine, folder, data.shape[0])
    stored, slope, intercept = _quantise(data, folder)
    source = _source_dataset(volume, source_files, folder)
    references = _source_references(volume, source_files, geometry)
    created = not folder.exists()
    _prepare_folder(folder, overwrite)  # only now: nothing is touched on bad input

    template = _series_template(volume, series_description, source, geometry,
                                slope, intercept, series_number, derivation_description,
                                data, keep_source_study=keep_source_study)
    written: list[Path] = []
    try:
        for k in range(data.shape[0]):
            path = folder / f"IM{k + 1:05d}.dcm"
            ds = _slice_dataset(template, geometry, k, stored[k], references[k])
            ds.save_as(path, enforce_file_format=True)
            written.append(path)
    except BaseException as exc:  # OS error, Ctrl-C, anything: the series is complete or absent
        for path in [*written, folder / f"IM{len(written) + 1:05d}.dcm"]:
            path.unlink(missing_ok=True)
        if created:
            try:
                folder.rmdir()  # only if empty: never another program's files
            except OSError:
                pass
        if isinstance(exc, KeyboardInterrupt):
            raise WriteCancelled(f"{folder}: cancelled while writing; nothing was kept") from None
        if isinstance(exc, OSError):
            raise WriteError(f"{folder}: cannot write DICOM files ({exc}); nothing was kept") from exc
        raise
    return written


# ---------------------------------------------------------------------------
# Folder, geometry, values
# ---------------------------------------------------------------------------


def _prepare_folder(folder: Path, overwrite: bool) -> None:
    """Create ``folder`` or check it may be written into."""
    if folder.exists() and not folder.is_dir():
        raise WriteError(f"{folder}: exists and is not a folder")
    if folder.exists():
        existing = list(folder.iterdir())
        if existing and not overwrite:
            raise WriteError(f"{folder}: folder is not empty ({len(existing)} entries); "
                             "choose an empty folder (nothing was written)")
        for path in existing:
            if path.is_file() and _FILE_PATTERN.match(path.name):
                path.unlink()
    else:
        try:
            folder.mkdir(parents=True)
        except OSError as exc:
            raise WriteError(f"{folder}: cannot create folder ({exc})") from exc


class _SliceGeometry:
    """DICOM (LPS) geometry of the slices along array axis 0.

    Attributes
    ----------
    row_cosines, column_cosines : ndarray (3,)
        ImageOrientationPatient halves: direction along a row (increasing
        column index, array axis 2) and down a column (array axis 1).
    pixel_spacing : (float, float)
        (between rows, between columns) in mm.
    positions : ndarray (n, 3)
        ImagePositionPatient of each slice, mm.
    normal : ndarray (3,)
        Unit slice normal (row x column cosines).
    spacing : float
        Slice spacing along the normal, mm.
    """

    def __init__(self, affine_ras: np.ndarray, n_slices: int):
        lps = _RAS_TO_LPS @ np.asarray(affine_ras, dtype=float)
        down, across, step = lps[:3, 1], lps[:3, 2], lps[:3, 0]
        self.pixel_spacing = (float(np.linalg.norm(down)), float(np.linalg.norm(across)))
        self.column_cosines = down / self.pixel_spacing[0]
        self.row_cosines = across / self.pixel_spacing[1]
        normal = np.cross(self.row_cosines, self.column_cosines)
        self.normal = normal / np.linalg.norm(normal)
        self.spacing = float(abs(step @ self.normal))
        self.positions = lps[:3, 3] + np.outer(np.arange(n_slices), step)
        self.step = step


def _slice_geometry(affine: np.ndarray, folder: Path, n_slices: int):
    """Checked :class:`_SliceGeometry` of an affine (raises WriteError)."""
    affine = np.asarray(affine, dtype=float)
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(norms <= 0) or not np.all(np.isfinite(affine)):
        raise WriteError(f"{folder}: the volume's affine is degenerate")
    geometry = _SliceGeometry(affine, n_slices)
    if abs(geometry.row_cosines @ geometry.column_cosines) > _ORTHOGONALITY_TOLERANCE:
        raise WriteError(f"{folder}: the volume's in-plane axes are not perpendicular "
                         "(sheared affine); DICOM slices cannot represent it")
    if geometry.spacing < 1e-6 * np.linalg.norm(geometry.step):
        raise WriteError(f"{folder}: the volume's slice axis lies in the slice plane; "
                         "DICOM slices cannot represent it")
    return geometry


def _quantise(data: np.ndarray, folder: Path) -> tuple[np.ndarray, float, float]:
    """int16 stored values and (slope, intercept) with ``value = stored * slope + intercept``.

    Integral data within int16 is stored as is (slope 1, intercept 0);
    integral data spanning at most 65536 values gets an integer intercept;
    anything else spans the int16 range linearly. The slope and intercept are
    rounded to DICOM DS strings *before* quantising so the reader's values
    are the ones intended.
    """
    if data.dtype == bool:
        data = data.astype(np.int16)
    if data.size == 0:
        raise WriteError(f"{folder}: the volume is empty")
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        raise WriteError(f"{folder}: the volume has NaN or infinite values; "
                         "DICOM cannot store them")
    if data.dtype.kind not in "biuf":
        raise WriteError(f"{folder}: cannot store values of type {data.dtype}")
    low, high = float(data.min()), float(data.max())
    integral = data.dtype.kind in "biu" or bool(np.all(data == np.round(data)))

    if integral and low >= _INT16.min and high <= _INT16.max:
        return data.astype("<i2"), 1.0, 0.0
    if integral and high - low <= _INT16.max - _INT16.min:
        intercept = low - _INT16.min
        stored = (data.astype(np.int64) - int(intercept)).astype("<i2")
        return stored, 1.0, intercept

    slope = _ds_round((high - low) / (_INT16.max - _INT16.min - 2)) if high > low else 1.0
    intercept = _ds_round((high + low) / 2.0)
    stored = np.empty(data.shape, dtype="<i2")
    for k in range(data.shape[0]):  # slice by slice: bounded float64 memory
        values = np.rint((data[k].astype(np.float64) - intercept) / slope)
        stored[k] = np.clip(values, _INT16.min, _INT16.max)
    return stored, slope, intercept


def _ds_round(value: float) -> float:
    """``value`` as a DICOM DS (16 characters) would store it."""
    return float(str(DSfloat(float(value), auto_format=True)))


def _ds(value: float) -> DSfloat:
    """A DS value with the most precision 16 characters allow."""
    value = float(value)
    if abs(value) < 1e-12:
        value = 0.0
    return DSfloat(value, auto_format=True)


# ---------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------


def _source_dataset(volume: Volume, source_files, folder: Path) -> Dataset | None:
    """Header of the first source file (patient/study tags), or None.

    An explicitly given source that cannot be read is an error; a source
    path taken from the volume's metadata that has gone missing only warns.
    """
    explicit = source_files is not None
    files = list(source_files) if explicit else list(volume.metadata.get("files") or [])
    if not files:
        return None
    path = Path(files[0])
    try:
        with _quiet_pydicom():
            return pydicom.dcmread(path, force=True, stop_before_pixels=True)
    except Exception as exc:
        if explicit:
            raise WriteError(f"{folder}: cannot read source DICOM file {path} "
                             f"({type(exc).__name__})") from exc
        warnings.warn(f"{folder}: source file {path} is not readable; the derived "
                      "series gets a new study and frame of reference",
                      DicomReadWarning, stacklevel=3)
        return None


def _sop_class_for(modality: str) -> str:
    return {"CT": CTImageStorage, "MR": MRImageStorage}.get(modality,
                                                           SecondaryCaptureImageStorage)


def _series_template(volume: Volume, description: str, source: Dataset | None,
                     geometry, slope: float, intercept: float,
                     series_number: int | None, derivation: str | None,
                     data: np.ndarray, *, keep_source_study: bool = False) -> Dataset:
    """Dataset with every tag shared by the slices of the new series."""
    modality = (volume.modality or "OT").upper()
    sop_class = _sop_class_for(modality)
    now = _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: any copied name encodes
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SOPClassUID = sop_class
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time

    # Patient, study, frame of reference: from the source, else new/empty.
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "", "", "", ""
    ds.StudyInstanceUID = generate_uid()
    ds.StudyDate, ds.StudyTime = date, time
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "", "", ""
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    source_modality = ""
    if source is not None:
        source_modality = str(source.get("Modality", "") or "").upper()
        keywords = _PATIENT_STUDY_KEYWORDS + (
            _MODALITY_KEYWORDS.get(modality, ()) if source_modality == modality else ())
        for keyword in keywords:
            value = source.get(keyword)
            if value is not None:
                # Decoded text (names as str): re-encoded as UTF-8 on writing.
                setattr(ds, keyword, str(value) if isinstance(value, PersonName)
                        else copy.deepcopy(value))

    # Series.
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    if series_number is None:
        base = source.get("SeriesNumber") if source is not None else None
        series_number = 1000 + (int(base) if base not in (None, "") else 0)
    ds.SeriesNumber = int(series_number)
    ds.SeriesDescription = str(description)[:64]
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.ContentDate, ds.ContentTime = date, time
    ds.DerivationDescription = (derivation or
                                f"{description}: derived with napari-mediffuse")[:1024]
    ds.Manufacturer = "napari-mediffuse"
    ds.SoftwareVersions = _software_version()
    ds.BurnedInAnnotation = "NO"
    if modality == "MR":
        ds.setdefault("ScanningSequence", "RM")  # research mode: no acquisition
        ds.setdefault("SequenceVariant", "NONE")
        for keyword in ("ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength"):
            ds.setdefault(keyword, None)
    elif modality == "CT":
        ds.setdefault("KVP", None)
        ds.AcquisitionNumber = None
        ds.RescaleType = "HU"
    else:
        ds.ConversionType = "WSD"  # workstation

    # Plane geometry shared by all slices.
    ds.ImageOrientationPatient = [_ds(v) for v in
                                  np.concatenate([geometry.row_cosines, geometry.column_cosines])]
    ds.PixelSpacing = [_ds(v) for v in geometry.pixel_spacing]
    ds.SliceThickness = _ds(_thickness(volume, geometry))

    # Pixel module: signed 16 bit greyscale with rescale.
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(data.shape[1]), int(data.shape[2])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), _ds(intercept)
    center, width = _window(data, modality)
    ds.WindowCenter, ds.WindowWidth = _ds(center), _ds(width)
    if is_task_result(volume):  # never to pass for an acquired series
        mark_synthetic(ds, volume, description, source, keep_source_study=keep_source_study)
    return ds


def _source_references(volume: Volume, source_files, geometry) -> list[list[Dataset]]:
    """SourceImageSequence items of each slice (empty without a DICOM source)."""
    files = list(source_files) if source_files is not None else list(volume.metadata.get("files") or [])
    if not files:
        return [[] for _ in range(len(geometry.positions))]
    return source_image_references(files, geometry.positions, geometry.normal, geometry.spacing)


def _slice_dataset(template: Dataset, geometry, k: int, pixels: np.ndarray,
                   references: list[Dataset] | None = None) -> Dataset:
    """The dataset of slice ``k`` (new SOP Instance UID, its position, pixels,
    the source images it was computed from)."""
    ds = copy.deepcopy(template)
    if references:
        ds.SourceImageSequence = references
    sop_uid = generate_uid()
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = k + 1
    position = geometry.positions[k]
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.SliceLocation = _ds(position @ geometry.normal)
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = template.SOPClassUID
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def _thickness(volume: Volume, geometry) -> float:
    """SliceThickness: the source's thickness if the slice grid is unchanged.

    A volume read from DICOM (and results on its grid) keep their recorded
    thickness (it may differ from the spacing); otherwise the spacing.
    """
    recorded = volume.metadata.get("slice_thickness_mm")
    recorded_spacing = volume.metadata.get("slice_spacing_mm")
    if recorded and recorded_spacing and abs(recorded_spacing - geometry.spacing) < 1e-4:
        return float(recorded)
    return geometry.spacing


def _window(data: np.ndarray, modality: str) -> tuple[float, float]:
    """Default display window: soft tissue for CT, 1-99 % percentiles otherwise."""
    if modality == "CT":
        return 40.0, 400.0
    sample = np.asarray(data[:: max(1, data.shape[0] // 16)], dtype=np.float64)
    low, high = np.percentile(sample, [1, 99])
    return (low + high) / 2.0, max(high - low, 1.0)


def _software_version() -> str:
    try:
        from importlib.metadata import version

        return f"napari-mediffuse {version('napari-mediffuse')}"
    except Exception:
        return "napari-mediffuse"
