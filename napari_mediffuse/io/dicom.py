"""DICOM reading with pydicom: files, folders, folder trees and DICOMDIRs.

:func:`read_dicom` turns whatever the user points at into one
:class:`~napari_mediffuse.io.volume.Volume` per image series:

1. **Find files** -- a single file, every file under a folder (recursively),
   or the files a DICOMDIR references.
2. **Read headers** (pixel data deferred) and describe every 2D frame -- a
   single-frame file is one frame, an enhanced multi-frame file holds many --
   with its position, orientation, pixel spacing and rescale.
3. **Group** frames by SeriesInstanceUID, then split groups that mix
   orientations, image sizes or pixel spacings, and groups where several
   frames share a slice position (echoes, phases, repeated acquisitions).
4. **Stack** each group: slices are sorted by their position projected on
   the slice normal (never by file name or InstanceNumber), the slice
   spacing comes from the positions, uneven spacing (missing slices) is
   resampled onto a regular grid, a gantry tilt is kept in a sheared affine.
5. **Decode** pixels, apply RescaleSlope/RescaleIntercept slice by slice (CT
   in Hounsfield units), build the index -> RAS+ affine from the LPS patient
   coordinates and reorient to the display orientation (S, P, L).

Geometry of a DICOM frame (all in LPS millimetres, DICOM's patient system)::

    position(r, c) = ImagePositionPatient
                     + c * PixelSpacing[1] * row_cosines      # IOP[:3]
                     + r * PixelSpacing[0] * column_cosines   # IOP[3:]

where ``r`` is the row index (down the image) and ``c`` the column index
(across). Our arrays stack frames as ``data[slice, r, c]``.

Files that cannot be used (not DICOM, no pixel data, no patient geometry,
colour, corrupt) are skipped with a warning when other series are readable;
:class:`~napari_mediffuse.io.errors.ReadError` is raised only when nothing
readable remains. Messages never contain patient-identifying tags.
"""
from __future__ import annotations

import logging
import math
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.pixels import iter_pixels
from pydicom.uid import UID

from .errors import ReadError
from .volume import Volume, reorient

__all__ = ["DicomReadWarning", "is_dicom_file", "read_dicom"]

#: SOP class of a DICOMDIR (Media Storage Directory Storage).
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"

#: Orientation cosines (and pixel spacings, relative) closer than this are
#: considered equal when grouping frames.
ORIENTATION_TOLERANCE = 1e-4

#: Slices closer than this (mm, along the normal) share a position.
DUPLICATE_POSITION_TOLERANCE_MM = 0.01

#: Slice gaps may deviate from their mean by ``max(abs, rel * mean)`` before
#: the spacing counts as uneven and the stack is resampled.
SPACING_TOLERANCE_MM = 0.01
SPACING_TOLERANCE_REL = 0.01

#: A slice-to-slice step further than this from the slice normal is a gantry
#: tilt (degrees); below it the step is taken along the normal exactly.
TILT_TOLERANCE_DEG = 0.01

#: Resampling an uneven stack never makes more than this many times its slices.
MAX_RESAMPLE_FACTOR = 64

#: Slice positions further than this (mm) from a straight line get a warning.
COLLINEARITY_TOLERANCE_MM = 0.05

#: Skipped files named in a warning or error before "and N more".
MAX_LISTED_FILES = 5

#: LPS (DICOM) <-> RAS (nibabel) for homogeneous 4x4 matrices.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Header read when sniffing a file without the 128-byte preamble (bytes).
_SNIFF_BYTES = 16384

_UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)+$")

#: Files ignored silently when walking a folder (not worth a warning).
_IGNORED_NAMES = {"thumbs.db", "desktop.ini"}

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class DicomReadWarning(UserWarning):
    """Something was skipped, resampled or assumed while reading DICOM."""


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def is_dicom_file(path) -> bool:
    """Cheaply test whether ``path`` is a DICOM file.

    True for files with the 128-byte preamble followed by ``'DICM'``, and for
    preamble-less (raw dataset) files that pydicom parses with ``force=True``
    into a valid SOP Class UID (0008,0016). Only the first 16 KiB are read.

    Parameters
    ----------
    path : str or Path
        File to test. Folders and unreadable paths give False.

    Returns
    -------
    bool
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
            if len(head) == 132 and head[128:132] == b"DICM":
                return True
            if len(head) < 8 or not _starts_like_dataset(head):
                return False
            head += fh.read(_SNIFF_BYTES - len(head))
    except OSError:
        return False
    try:
        with _quiet_pydicom():
            ds = pydicom.dcmread(BytesIO(head), force=True, stop_before_pixels=True,
                                 specific_tags=[0x00080016])
            uid = str(ds.get("SOPClassUID", "") or "")
    except Exception:  # anything pydicom chokes on is not DICOM for us
        return False
    return len(uid) <= 64 and bool(_UID_PATTERN.match(uid))


def read_dicom(path) -> list[Volume]:
    """Read every CT/MR image series under ``path``.

    Parameters
    ----------
    path : str or Path
        A DICOM file, a folder (searched recursively; it may hold several
        series, studies or patients) or a DICOMDIR file (only the files it
        references are read).

    Returns
    -------
    list of Volume
        One volume per series (or per part of a series that mixes
        orientations or repeats slice positions), sorted by SeriesNumber.
        ``data`` is ``(S, P, L)`` ordered; CT values are Hounsfield units.
        Integer int16/int32 when the rescale is integral, float32 otherwise
        (and after resampling). ``name`` is ``"<SeriesDescription> (<Modality>)"``
        (unique within the list), ``source`` the given path. ``metadata``
        holds ``series_instance_uid``, ``study_instance_uid``,
        ``series_description``, ``series_number``, ``modality``,
        ``slice_thickness_mm``, ``slice_spacing_mm``, ``pixel_spacing_mm``,
        ``gantry_tilt_deg``, ``manufacturer``, ``transfer_syntax``, ``files``
        (source files in slice order), ``warnings`` and ``dicom_reference``
        (non-identifying tags for writing derived series).

    Raises
    ------
    ReadError
        The path does not exist, holds no DICOM image with patient geometry,
        or (for a single file) the file is corrupt, non-image, 2D without
        patient geometry, colour, or cannot be decoded.

    Warns
    -----
    DicomReadWarning
        Skipped files (when other series were readable), uneven slice spacing
        (resampled), gantry tilt, assumed slice thickness.
    """
    path = Path(path)
    if not path.exists():
        raise ReadError(f"{path}: no such file or folder")
    files, single = _input_files(path)

    skips = _SkipLog()
    frames: list[_Frame] = []
    for file in files:
        try:
            frames.extend(_frames_from_file(file))
        except _Skip as skip:
            if single:
                raise ReadError(f"{file} {skip.reason}") from None
            skips.add(file, skip.kind, skip.reason)

    volumes: list[tuple[tuple, Volume]] = []
    for group in _group_frames(frames):
        built = _build_with_retries(group, skips, single)
        if built is not None:
            for note in built.metadata["warnings"]:
                _warn(note)
            volumes.append((group.sort_key, built))

    if not volumes:
        raise ReadError(skips.error_message(path, len(files)))
    if skips:
        _warn(skips.warning_message(path, len(files)))

    volumes.sort(key=lambda item: item[0])
    result = [vol for _, vol in volumes]
    _make_names_unique(result)
    for vol in result:
        vol.source = str(path)
    return result


# ---------------------------------------------------------------------------
# Finding files
# ---------------------------------------------------------------------------


def _input_files(path: Path) -> tuple[list[Path], bool]:
    """Files to read for ``path`` and whether it is a single-file read."""
    if path.is_dir():
        files = _walk_folder(path)
        if not files:
            raise ReadError(f"{path}: the folder is empty (no files found)")
        return files, False
    if _is_dicomdir(path):
        files = _dicomdir_files(path)
        if not files:
            raise ReadError(f"{path}: the DICOMDIR references no image files")
        return files, False
    return [path], True


def _walk_folder(folder: Path) -> list[Path]:
    """All regular files under ``folder``, sorted, hidden files excluded."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith(".") or name.lower() in _IGNORED_NAMES:
                continue
            files.append(Path(root) / name)
    return files


def _is_dicomdir(path: Path) -> bool:
    """True for a DICOMDIR file (by name or by its media storage SOP class)."""
    if path.name.upper() == "DICOMDIR":
        return True
    if not is_dicom_file(path):
        return False
    try:
        with _quiet_pydicom():
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True,
                                 specific_tags=[0x00080016])
    except Exception:
        return False
    return _sop_class(ds) == DICOMDIR_SOP_CLASS


def _dicomdir_files(path: Path) -> list[Path]:
    """Files referenced by the records of a DICOMDIR, in record order."""
    try:
        with _quiet_pydicom():
            ds = pydicom.dcmread(path, force=True)
            records = list(ds.get("DirectoryRecordSequence") or [])
    except Exception as exc:
        raise ReadError(f"{path}: unreadable DICOMDIR ({type(exc).__name__})") from exc
    if not records:
        raise ReadError(f"{path}: not a DICOMDIR with directory records")
    files: list[Path] = []
    seen = set()
    for record in records:
        file_id = record.get("ReferencedFileID")
        if not file_id:
            continue
        parts = [file_id] if isinstance(file_id, str) else list(file_id)
        resolved = _resolve_case_insensitive(path.parent, parts)
        if resolved not in seen:
            seen.add(resolved)
            files.append(resolved)
    return files


def _resolve_case_insensitive(root: Path, parts: list[str]) -> Path:
    """``root / parts`` matching each component case-insensitively if needed.

    DICOMDIR file IDs are upper case; file systems may hold lower case names.
    A path that cannot be matched is returned as written (and later reported
    as missing).
    """
    current = root
    for part in parts:
        candidate = current / part
        if not candidate.exists() and current.is_dir():
            matches = [p for p in current.iterdir() if p.name.upper() == part.upper()]
            if matches:
                candidate = matches[0]
        current = candidate
    return current


# ---------------------------------------------------------------------------
# Headers -> frames
# ---------------------------------------------------------------------------


@dataclass
class _Frame:
    """One 2D image plane: a single-frame file or one frame of a multi-frame file.

    Geometry is in DICOM LPS millimetres.
    """

    path: Path
    frame_index: int | None  # index into a multi-frame file; None: single-frame
    header: Dataset  # header of the whole file (pixel data deferred)
    series_uid: str
    rows: int
    columns: int
    row_cosines: np.ndarray  # IOP[:3], direction of increasing column index
    column_cosines: np.ndarray  # IOP[3:], direction of increasing row index
    position: np.ndarray  # ImagePositionPatient: centre of the first voxel
    pixel_spacing: tuple[float, float]  # (between rows, between columns), mm
    thickness: float | None  # SliceThickness, mm
    slope: float
    intercept: float
    instance_number: int
    split_keys: dict[str, str] = field(default_factory=dict)

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal: row cosines x column cosines."""
        n = np.cross(self.row_cosines, self.column_cosines)
        return n / np.linalg.norm(n)

    @property
    def order_key(self) -> tuple:
        """Acquisition order (InstanceNumber, file, frame); for tie-breaks only."""
        return (self.instance_number, str(self.path), self.frame_index or 0)


class _Skip(Exception):
    """A file that cannot be used.

    ``kind`` is a short category for summaries ("not a DICOM file");
    ``reason`` completes the sentence "<file> ...".
    """

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def _frames_from_file(path: Path) -> list[_Frame]:
    """Describe the image frames of one file, or raise :class:`_Skip`.

    DICOMDIR files met while walking a folder give no frames (silently).
    """
    if not path.is_file():
        raise _Skip("missing file", "does not exist or is not a regular file")
    if not os.access(path, os.R_OK):
        raise _Skip("unreadable file", "cannot be opened (no read permission)")
    if not is_dicom_file(path):
        raise _Skip("not a DICOM file", "is not a DICOM file")
    try:
        with _quiet_pydicom():
            ds = pydicom.dcmread(path, force=True, defer_size="2 KB")
    except Exception as exc:
        raise _Skip("corrupt or truncated", "is corrupt or truncated (unreadable header: "
                    f"{type(exc).__name__})") from None
    sop_class = _sop_class(ds)
    if sop_class == DICOMDIR_SOP_CLASS:
        return []
    try:
        with _quiet_pydicom():
            _check_image(ds, sop_class)
            return _describe_frames(ds, path)
    except _Skip:
        raise
    except Exception as exc:
        raise _Skip("invalid header", f"has invalid header values ({type(exc).__name__})") from None


def _sop_class(ds: Dataset) -> str:
    """SOP Class UID of a dataset (from the file meta if the dataset lacks it)."""
    uid = ds.get("SOPClassUID")
    if not uid and getattr(ds, "file_meta", None) is not None:
        uid = ds.file_meta.get("MediaStorageSOPClassUID")
    return str(uid or "")


def _sop_class_name(uid: str) -> str:
    """Human-readable SOP class ('CT Image Storage'), or the UID itself."""
    if not uid:
        return "unknown SOP class"
    name = UID(uid).name
    return name if name else uid


def _check_image(ds: Dataset, sop_class: str) -> None:
    """Raise :class:`_Skip` unless ``ds`` is a greyscale image with pixel data."""
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        name = _sop_class_name(sop_class)
        if "Image Storage" in name:
            raise _Skip("no pixel data (truncated?)",
                        f"has no pixel data although it is a {name} file (truncated?)")
        raise _Skip(f"no image data ({name})", f"has no image data ({name})")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or not photometric.startswith("MONOCHROME"):
        raise _Skip("colour image", f"is a colour ({photometric}) image; only "
                    "greyscale CT/MR images can be read")
    if not ds.get("Rows") or not ds.get("Columns"):
        raise _Skip("invalid header", "has no image size (Rows/Columns)")


def _describe_frames(ds: Dataset, path: Path) -> list[_Frame]:
    """Frames of a checked image file, each with its full geometry."""
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        return [_enhanced_frame(ds, path, i) for i in range(n_frames)]
    if n_frames > 1:
        return _legacy_multiframe(ds, path, n_frames)
    return [_single_frame(ds, path)]


def _single_frame(ds: Dataset, path: Path) -> _Frame:
    """The frame of a classic single-frame image (CT/MR Image Storage...)."""
    row_cos, col_cos = _orientation(ds.get("ImageOrientationPatient"))
    position = _position(ds.get("ImagePositionPatient"))
    if row_cos is None or position is None:
        raise _Skip("2D image without patient geometry", _NO_GEOMETRY)
    keys = {
        "echo": _key_text(ds.get("EchoNumbers")),
        "time point": _key_text(ds.get("TemporalPositionIdentifier")),
        "acquisition": _key_text(ds.get("AcquisitionNumber")),
        "trigger": _key_text(ds.get("TriggerTime")),
        "b-value": _key_text(ds.get("DiffusionBValue")),
        "type": _key_text(ds.get("ImageType")),
        "time": _key_text(ds.get("AcquisitionTime")),
    }
    return _Frame(
        path=path, frame_index=None, header=ds,
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        rows=int(ds.Rows), columns=int(ds.Columns),
        row_cosines=row_cos, column_cosines=col_cos, position=position,
        pixel_spacing=_pixel_spacing(ds.get("PixelSpacing")),
        thickness=_optional_float(ds.get("SliceThickness")),
        slope=_float_or(ds.get("RescaleSlope"), 1.0),
        intercept=_float_or(ds.get("RescaleIntercept"), 0.0),
        instance_number=_int_or(ds.get("InstanceNumber"), 0),
        split_keys=keys,
    )


def _enhanced_frame(ds: Dataset, path: Path, index: int) -> _Frame:
    """Frame ``index`` of an enhanced (functional-group) multi-frame image.

    Every functional group is looked up in the frame's item of the
    Per-frame Functional Groups Sequence first and in the Shared Functional
    Groups Sequence second; top-level attributes are the last resort.
    """
    plane_pos = _functional_item(ds, index, "PlanePositionSequence")
    plane_ori = _functional_item(ds, index, "PlaneOrientationSequence")
    measures = _functional_item(ds, index, "PixelMeasuresSequence")
    transform = _functional_item(ds, index, "PixelValueTransformationSequence")
    content = _functional_item(ds, index, "FrameContentSequence")
    echo = _functional_item(ds, index, "MREchoSequence")
    diffusion = _functional_item(ds, index, "MRDiffusionSequence")
    frame_type = (_functional_item(ds, index, "MRImageFrameTypeSequence")
                  or _functional_item(ds, index, "CTImageFrameTypeSequence"))
    segment = _functional_item(ds, index, "SegmentIdentificationSequence")

    row_cos, col_cos = _orientation(_get(plane_ori, ds, "ImageOrientationPatient"))
    position = _position(_get(plane_pos, ds, "ImagePositionPatient"))
    if row_cos is None or position is None:
        raise _Skip("2D image without patient geometry", _NO_GEOMETRY)
    slope = _get(transform, ds, "RescaleSlope")
    intercept = _get(transform, ds, "RescaleIntercept")
    keys = {
        "echo": _key_text(echo.get("EffectiveEchoTime") if echo else None),
        "time point": _key_text(content.get("TemporalPositionIndex") if content else None),
        "acquisition": _key_text(content.get("FrameAcquisitionNumber") if content else None),
        "stack": _key_text(content.get("StackID") if content else None),
        "b-value": _key_text(diffusion.get("DiffusionBValue") if diffusion else None),
        "type": _key_text(frame_type.get("FrameType") if frame_type else None),
        "segment": _key_text(segment.get("ReferencedSegmentNumber") if segment else None),
    }
    return _Frame(
        path=path, frame_index=index, header=ds,
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        rows=int(ds.Rows), columns=int(ds.Columns),
        row_cosines=row_cos, column_cosines=col_cos, position=position,
        pixel_spacing=_pixel_spacing(_get(measures, ds, "PixelSpacing")),
        thickness=_optional_float(_get(measures, ds, "SliceThickness")),
        slope=_float_or(slope, 1.0), intercept=_float_or(intercept, 0.0),
        instance_number=index, split_keys=keys,
    )


def _legacy_multiframe(ds: Dataset, path: Path, n_frames: int) -> list[_Frame]:
    """Frames of a multi-frame image without functional groups.

    Only images with a Grid Frame Offset Vector (RT Dose, some NM) carry
    per-frame positions: frame ``f`` lies at
    ``ImagePositionPatient + (offset[f] - offset[0]) * normal``.
    """
    offsets = ds.get("GridFrameOffsetVector")
    if not offsets or len(offsets) != n_frames:
        raise _Skip("multi-frame image without per-frame positions",
                    "is a multi-frame image without per-frame positions "
                    "(no functional groups or Grid Frame Offset Vector)")
    base = _single_frame(ds, path)
    slope = base.slope
    if "RescaleSlope" not in ds and "DoseGridScaling" in ds:
        slope = _float_or(ds.get("DoseGridScaling"), 1.0)
    frames = []
    offsets = [float(v) for v in offsets]
    for index, offset in enumerate(offsets):
        frame = _Frame(**{**base.__dict__, "split_keys": {}})
        frame.frame_index = index
        frame.instance_number = index
        frame.slope = slope
        frame.position = base.position + (offset - offsets[0]) * base.normal
        frames.append(frame)
    return frames


_NO_GEOMETRY = ("is a 2D image without patient geometry (no ImagePositionPatient/"
                "ImageOrientationPatient); only CT/MR images positioned in the "
                "patient can be read")


def _functional_item(ds: Dataset, index: int, keyword: str) -> Dataset | None:
    """First item of functional group ``keyword`` for frame ``index``.

    Per-frame groups take precedence over shared groups; None if neither has it.
    """
    for container, item_index in (("PerFrameFunctionalGroupsSequence", index),
                                  ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(container)
        if groups and item_index < len(groups):
            sequence = groups[item_index].get(keyword)
            if sequence:
                return sequence[0]
    return None


def _get(item: Dataset | None, ds: Dataset, keyword: str):
    """``item.keyword`` if present, else the top-level ``ds.keyword`` (or None)."""
    if item is not None and keyword in item:
        return item.get(keyword)
    return ds.get(keyword)


def _orientation(value) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Unit row and column cosines from ImageOrientationPatient, or (None, None).

    Cosines stored with few decimals are not exactly perpendicular; the
    column cosines are made perpendicular to the row cosines (Gram-Schmidt).
    """
    if value is None or len(value) != 6:
        return None, None
    iop = np.array([float(v) for v in value])
    row, col = iop[:3], iop[3:]
    row_norm, col_norm = np.linalg.norm(row), np.linalg.norm(col)
    if row_norm < 1e-3 or col_norm < 1e-3:
        return None, None
    row, col = row / row_norm, col / col_norm
    if abs(row @ col) > 1e-2:
        raise _Skip("invalid header", "has an invalid ImageOrientationPatient (row and column "
                    "directions are not perpendicular)")
    col = col - (row @ col) * row
    return row, col / np.linalg.norm(col)


def _position(value) -> np.ndarray | None:
    """ImagePositionPatient as a float array, or None."""
    if value is None or len(value) != 3:
        return None
    return np.array([float(v) for v in value])


def _pixel_spacing(value) -> tuple[float, float]:
    """(row spacing, column spacing) in mm; raises :class:`_Skip` if missing."""
    if value is None or len(value) != 2 or min(float(v) for v in value) <= 0:
        raise _Skip("invalid header", "has no valid PixelSpacing")
    return float(value[0]), float(value[1])


def _optional_float(value) -> float | None:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) and result > 0 else None


def _float_or(value, default: float) -> float:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return default
    return result if math.isfinite(result) else default


def _int_or(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _key_text(value) -> str:
    """A hashable text form of a splitting tag ('' when absent)."""
    if value is None or value == "":
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


# ---------------------------------------------------------------------------
# Grouping
# ---------------------------------------------------------------------------


@dataclass
class _Group:
    """Frames that make one volume, with a label distinguishing split parts."""

    frames: list[_Frame]
    label: str
    sort_key: tuple


def _group_frames(frames: list[_Frame]) -> list[_Group]:
    """Split frames into volumes: series, then geometry, then repeated positions."""
    by_series: dict[str, list[_Frame]] = {}
    for frame in frames:
        by_series.setdefault(frame.series_uid, []).append(frame)

    groups = []
    for series_index, series_frames in enumerate(by_series.values()):
        number = _int_or(series_frames[0].header.get("SeriesNumber"), 10**9)
        geometry_parts = _split_by_geometry(series_frames)
        part_index = 0
        for geo_label, geo_frames in geometry_parts:
            for dup_label, part in _split_repeated_positions(geo_frames):
                label = " ".join(text for text in (geo_label, dup_label) if text)
                groups.append(_Group(part, label, (number, series_index, part_index)))
                part_index += 1
    return groups


def _split_by_geometry(frames: list[_Frame]) -> list[tuple[str, list[_Frame]]]:
    """Cluster frames by orientation, image size and pixel spacing.

    Returns ``[(label, frames), ...]``; the label is empty when there is one
    cluster, else a plane name ('axial', 'sagittal'...), the image size or
    the pixel spacing -- whatever differs.
    """
    clusters: list[list[_Frame]] = []
    for frame in frames:
        for cluster in clusters:
            if _same_geometry(cluster[0], frame):
                cluster.append(frame)
                break
        else:
            clusters.append([frame])
    if len(clusters) == 1:
        return [("", clusters[0])]

    firsts = [c[0] for c in clusters]
    if any(not _same_orientation(firsts[0], f) for f in firsts[1:]):
        labels = [_plane_name(f.normal) for f in firsts]
    elif len({(f.rows, f.columns) for f in firsts}) > 1:
        labels = [f"{f.rows}x{f.columns}" for f in firsts]
    else:
        labels = [f"pixel spacing {f.pixel_spacing[0]:g}x{f.pixel_spacing[1]:g} mm"
                  for f in firsts]
    return list(zip(labels, clusters))


def _same_orientation(a: _Frame, b: _Frame) -> bool:
    return (np.abs(a.row_cosines - b.row_cosines).max() <= ORIENTATION_TOLERANCE
            and np.abs(a.column_cosines - b.column_cosines).max() <= ORIENTATION_TOLERANCE)


def _same_geometry(a: _Frame, b: _Frame) -> bool:
    """Same orientation, image size and pixel spacing (within tolerance)."""
    if (a.rows, a.columns) != (b.rows, b.columns):
        return False
    spacing_a, spacing_b = np.array(a.pixel_spacing), np.array(b.pixel_spacing)
    if np.abs(spacing_a - spacing_b).max() > ORIENTATION_TOLERANCE * spacing_a.max():
        return False
    return _same_orientation(a, b)


def _plane_name(normal_lps: np.ndarray) -> str:
    """'axial', 'coronal' or 'sagittal' after the slice normal's main axis."""
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal_lps)))]


def _split_repeated_positions(frames: list[_Frame]) -> list[tuple[str, list[_Frame]]]:
    """Separate frames that share slice positions (echoes, phases, repeats).

    The first tag (echo, temporal position, acquisition number, trigger time,
    b-value, image type, acquisition time) whose values give as many parts
    as there are frames at the most repeated position, none with repeated
    positions, is used; then all tags together; else frames are dealt out in
    acquisition order: the n-th frame at each position goes to part n.
    """
    normal = frames[0].normal
    repeats = _max_repeats(frames, normal)
    if repeats == 1:
        return [("", frames)]

    key_names = list(dict.fromkeys(name for f in frames for name in f.split_keys))
    candidates = [[name] for name in key_names] + [key_names]
    for names in candidates:
        parts: dict[tuple, list[_Frame]] = {}
        for frame in frames:
            value = tuple(frame.split_keys.get(name, "") for name in names)
            parts.setdefault(value, []).append(frame)
        if len(parts) == repeats and not any(_max_repeats(p, normal) > 1
                                             for p in parts.values()):
            ordered = sorted(parts.items(), key=lambda kv: _natural_key(kv[0]))
            return [(_split_label(names, value), part) for value, part in ordered]

    return _deal_out_by_order(frames, normal)


def _split_label(names: list[str], values: tuple) -> str:
    """'echo 2', 'time point 3', 'echo 2 acquisition 1'..."""
    return " ".join(f"{name} {value}" for name, value in zip(names, values) if value)


def _natural_key(values: tuple) -> tuple:
    """Sort numbers numerically, text alphabetically."""
    key = []
    for value in values:
        try:
            key.append((0, float(value), ""))
        except ValueError:
            key.append((1, 0.0, value))
    return tuple(key)


def _max_repeats(frames: list[_Frame], normal: np.ndarray) -> int:
    """Largest number of frames sharing one slice position."""
    offsets = np.sort([f.position @ normal for f in frames])
    new_position = np.diff(offsets) >= DUPLICATE_POSITION_TOLERANCE_MM
    run_ids = np.concatenate([[0], np.cumsum(new_position)])
    return int(np.bincount(run_ids).max())


def _deal_out_by_order(frames: list[_Frame], normal: np.ndarray):
    """The n-th frame (in acquisition order) at each position goes to part n."""
    ordered = sorted(frames, key=lambda f: (f.position @ normal, f.order_key))
    parts: list[list[_Frame]] = []
    position_group: list[_Frame] = []

    def flush():
        for rank, frame in enumerate(sorted(position_group, key=lambda f: f.order_key)):
            while len(parts) <= rank:
                parts.append([])
            parts[rank].append(frame)

    last = None
    for frame in ordered:
        offset = frame.position @ normal
        if last is not None and offset - last >= DUPLICATE_POSITION_TOLERANCE_MM:
            flush()
            position_group = []
        position_group.append(frame)
        last = offset
    flush()
    return [(f"part {i + 1}", part) for i, part in enumerate(parts)]


# ---------------------------------------------------------------------------
# Slice geometry
# ---------------------------------------------------------------------------


@dataclass
class _StackGeometry:
    """Where the slices of a group are, all in LPS millimetres.

    ``offsets`` are the sorted slice positions along the unit ``normal``
    relative to the first slice; the output grid has ``n_slices`` slices
    ``spacing`` apart (along the normal), slice ``k`` at
    ``origin + k * spacing * step_direction``. ``step_direction`` has unit
    component along the normal; it differs from the normal under gantry tilt.
    """

    frames: list[_Frame]
    offsets: np.ndarray
    origin: np.ndarray
    normal: np.ndarray
    step_direction: np.ndarray
    spacing: float
    n_slices: int
    tilt_deg: float
    resample: bool
    notes: list[str]


def _stack_geometry(frames: list[_Frame], where: str) -> _StackGeometry:
    """Sort frames along the normal and derive spacing, tilt and resampling.

    Parameters
    ----------
    frames : list of _Frame
        Same orientation, no repeated positions.
    where : str
        "<folder>: series '<description>'", to prefix warnings.
    """
    normal = frames[0].normal
    frames = sorted(frames, key=lambda f: (f.position @ normal, f.order_key))
    positions = np.array([f.position for f in frames])
    origin = positions[0]
    offsets = (positions - origin) @ normal
    notes: list[str] = []

    if len(frames) == 1:
        thickness = frames[0].thickness
        if thickness is None:
            thickness = 1.0
            notes.append(f"{where}: single slice without SliceThickness; "
                         "assuming 1 mm")
        return _StackGeometry(frames, offsets, origin, normal, normal, thickness,
                              1, 0.0, False, notes)

    step_direction, tilt_deg, deviation = _fit_step_direction(positions, offsets, normal)
    if deviation > COLLINEARITY_TOLERANCE_MM:
        notes.append(f"{where}: slice positions deviate up to {deviation:.3g} mm "
                     "from a straight line; the volume places them on the best-fit line")
    if tilt_deg > TILT_TOLERANCE_DEG:
        notes.append(f"{where}: gantry tilt of {tilt_deg:.2f} degrees detected; "
                     "the affine is sheared so every slice keeps its true position")
    else:
        step_direction, tilt_deg = normal, 0.0

    spacing, n_slices, uneven_note = _regular_grid(offsets, where)
    resample = uneven_note is not None
    if resample:
        notes.append(uneven_note)
    return _StackGeometry(frames, offsets, origin, normal, step_direction, spacing,
                          n_slices, tilt_deg, resample, notes)


def _fit_step_direction(positions: np.ndarray, offsets: np.ndarray,
                        normal: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Least-squares direction ``u`` with ``positions ~ origin + offsets * u``.

    ``u`` has a unit component along the normal (``u @ normal == 1``); its
    angle to the normal is the gantry tilt. Returns ``(u, tilt_deg,
    max_deviation_mm)``.
    """
    displacement = positions - positions[0]
    u = (offsets @ displacement) / (offsets @ offsets)
    u = u + (1.0 - u @ normal) * normal  # exact unit normal component
    residual = displacement - np.outer(offsets, u)
    deviation = float(np.linalg.norm(residual, axis=1).max())
    tilt = float(np.degrees(np.arccos(np.clip(1.0 / np.linalg.norm(u), -1.0, 1.0))))
    return u, tilt, deviation


def _regular_grid(offsets: np.ndarray, where: str) -> tuple[float, int, str | None]:
    """Slice spacing and count of the output grid, and a note if uneven.

    Regular stacks keep their slices (spacing = mean gap). Uneven stacks
    (a gap deviating from the mean by more than ``max(0.01 mm, 1 %)``, e.g.
    a missing slice) get a uniform grid at the smallest gap, adjusted so the
    first and last slices stay exactly where they are. If the smallest gap
    is a stray (the grid would have more than ``MAX_RESAMPLE_FACTOR`` times
    the slices), the median gap is used instead.
    """
    gaps = np.diff(offsets)
    extent = float(offsets[-1] - offsets[0])
    mean_gap = extent / len(gaps)
    tolerance = max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_REL * mean_gap)
    if np.abs(gaps - mean_gap).max() <= tolerance:
        return mean_gap, len(offsets), None

    smallest = float(gaps.min())
    if extent / smallest + 1 > MAX_RESAMPLE_FACTOR * len(offsets):
        smallest = float(np.median(gaps))
    n_slices = min(int(round(extent / smallest)) + 1, MAX_RESAMPLE_FACTOR * len(offsets))
    spacing = extent / (n_slices - 1)
    odd = [k for k, gap in enumerate(gaps)
           if abs(gap - smallest) > max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_REL * smallest)]
    listed = ", ".join(f"{gaps[k]:.4g} mm between slices {k + 1} and {k + 2}"
                       for k in odd[:MAX_LISTED_FILES])
    if len(odd) > MAX_LISTED_FILES:
        listed += f" and {len(odd) - MAX_LISTED_FILES} more"
    note = (f"{where}: uneven slice spacing or missing slices (regular gap "
            f"{smallest:.4g} mm; {listed}); resampled by linear interpolation "
            f"onto {n_slices} slices {spacing:.4g} mm apart")
    return spacing, n_slices, note


# ---------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------


class _PixelError(Exception):
    """Pixel data of ``path`` cannot be decoded; ``reason`` completes "<file> ..."."""

    def __init__(self, path: Path, reason: str):
        super().__init__(reason)
        self.path = path
        self.reason = reason


def _load_slices(frames: list[_Frame]) -> np.ndarray:
    """Decode and rescale the frames into an ``(n, rows, columns)`` array.

    RescaleSlope/RescaleIntercept are applied per frame. The result is int16
    (or int32 if needed; float64 beyond int32) when every slope and intercept
    is integral, else float32.
    """
    raw = _decode_frames(frames)
    slopes = [f.slope for f in frames]
    intercepts = [f.intercept for f in frames]
    integral = (all(float(v).is_integer() for v in slopes + intercepts)
                and all(r.dtype.kind in "biu" for r in raw))
    if not integral:
        out = np.empty((len(raw),) + raw[0].shape, dtype=np.float32)
        for k, (r, s, i) in enumerate(zip(raw, slopes, intercepts)):
            out[k] = r.astype(np.float64) * s + i
        return out

    # Value range of each rescaled slice (a negative slope swaps the ends).
    ends = [(int(r.min()) * int(s) + int(i), int(r.max()) * int(s) + int(i))
            for r, s, i in zip(raw, slopes, intercepts)]
    low, high = min(min(e) for e in ends), max(max(e) for e in ends)
    dtype = next((t for t in (np.int16, np.int32)
                  if np.iinfo(t).min <= low and high <= np.iinfo(t).max), np.float64)
    out = np.empty((len(raw),) + raw[0].shape, dtype=dtype)
    for k, (r, s, i) in enumerate(zip(raw, slopes, intercepts)):
        out[k] = r.astype(np.int64) * int(s) + int(i)
    return out


def _decode_frames(frames: list[_Frame]) -> list[np.ndarray]:
    """Stored pixel values of each frame (2D arrays), in the order given.

    Every file is decoded once; of a multi-frame file only the frames needed.
    """
    needed: dict[Path, list[_Frame]] = {}
    for frame in frames:
        needed.setdefault(frame.path, []).append(frame)
    decoded: dict[tuple[Path, int | None], np.ndarray] = {}
    for path, file_frames in needed.items():
        indices = sorted({f.frame_index for f in file_frames}, key=lambda i: -1 if i is None else i)
        for index, pixels in zip(indices, _decode_file(file_frames[0], indices)):
            decoded[(path, index)] = pixels
    return [decoded[(f.path, f.frame_index)] for f in frames]


def _decode_file(frame: _Frame, indices: list[int | None]) -> list[np.ndarray]:
    """Decoded frames ``indices`` of ``frame.path`` (``[None]``: single-frame).

    Raises :class:`_PixelError` naming the transfer syntax on any failure.
    """
    path = frame.path
    syntax = _transfer_syntax_name(frame.header)
    try:
        with _quiet_pydicom():
            ds = pydicom.dcmread(path, force=True)
            if indices == [None]:
                arrays = [np.asarray(ds.pixel_array)]
            else:
                arrays = [np.asarray(a) for a in iter_pixels(ds, indices=indices)]
    except Exception as exc:
        detail = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise _PixelError(path, f"cannot be decoded (transfer syntax {syntax}): "
                                f"{detail}") from None
    expected = (frame.rows, frame.columns)
    for k, pixels in enumerate(arrays):
        if pixels.ndim == 3 and pixels.shape[0] == 1:
            arrays[k] = pixels = pixels[0]
        if pixels.shape != expected:
            raise _PixelError(path, f"has pixel data of shape {pixels.shape} that does "
                                    f"not match its {expected[0]}x{expected[1]} header "
                                    f"(transfer syntax {syntax})")
    return arrays


def _transfer_syntax_name(ds: Dataset) -> str:
    """Name of the file's transfer syntax ('JPEG 2000 Image Compression'...)."""
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if not uid:
        return "unknown (no file meta information)"
    name = UID(str(uid)).name
    return name or str(uid)


def _resample_slices(data: np.ndarray, offsets: np.ndarray, n_slices: int) -> np.ndarray:
    """Linearly interpolate slices at ``offsets`` onto ``n_slices`` even ones.

    The output grid runs from ``offsets[0]`` to ``offsets[-1]`` (mm) so the
    first and last slices are copied exactly. Returns float32.
    """
    targets = np.linspace(offsets[0], offsets[-1], n_slices)
    out = np.empty((n_slices,) + data.shape[1:], dtype=np.float32)
    for k, target in enumerate(targets):
        j = int(np.clip(np.searchsorted(offsets, target, side="right") - 1,
                        0, len(offsets) - 2))
        weight = (target - offsets[j]) / (offsets[j + 1] - offsets[j])
        if weight <= 1e-9:
            out[k] = data[j]
        elif weight >= 1 - 1e-9:
            out[k] = data[j + 1]
        else:
            out[k] = (1.0 - weight) * data[j].astype(np.float64) + weight * data[j + 1]
    return out


# ---------------------------------------------------------------------------
# Volume assembly
# ---------------------------------------------------------------------------


def _build_with_retries(group: _Group, skips: "_SkipLog", single: bool) -> Volume | None:
    """Build a group's volume, dropping files whose pixels cannot be decoded.

    In a single-file read a decoding failure raises ReadError at once.
    """
    frames = list(group.frames)
    while frames:
        try:
            return _build_volume(frames, group.label)
        except _PixelError as err:
            if single:
                raise ReadError(f"{err.path} {err.reason}") from None
            skips.add(err.path, "pixel data cannot be decoded", err.reason)
            frames = [f for f in frames if f.path != err.path]
    return None


def _build_volume(frames: list[_Frame], label: str) -> Volume:
    """Stack, rescale, resample and reorient one group of frames."""
    header = frames[0].header
    description = " ".join(str(header.get("SeriesDescription", "") or "").split())
    where = f"{_folder_of(frames)}: series '{description or 'series'}'"
    if label:
        where += f" ({label})"

    geometry = _stack_geometry(frames, where)
    data = _load_slices(geometry.frames)
    if geometry.resample:
        data = _resample_slices(data, geometry.offsets, geometry.n_slices)
    affine = _affine_ras(geometry)
    data, affine = reorient(data, affine)

    modality = str(header.get("Modality", "") or "OT").strip() or "OT"
    name = f"{description or 'series'} ({modality})"
    if label:
        name += f" {label}"
    metadata = _metadata(geometry, modality, description)
    return Volume(data=data, affine=affine, modality=modality, name=name,
                  metadata=metadata)


def _affine_ras(geometry: _StackGeometry) -> np.ndarray:
    """Index ``(slice, row, column)`` -> RAS+ mm affine of a stack."""
    first = geometry.frames[0]
    row_spacing, column_spacing = first.pixel_spacing
    affine = np.eye(4)
    affine[:3, 0] = geometry.step_direction * geometry.spacing
    affine[:3, 1] = first.column_cosines * row_spacing  # down the rows
    affine[:3, 2] = first.row_cosines * column_spacing  # along a row
    affine[:3, 3] = geometry.origin
    return LPS_TO_RAS @ affine


def _metadata(geometry: _StackGeometry, modality: str, description: str) -> dict:
    """The metadata dict of a DICOM volume (no patient-identifying tags)."""
    frames = geometry.frames
    header = frames[0].header
    thicknesses = [f.thickness for f in frames if f.thickness is not None]
    thickness = float(np.median(thicknesses)) if thicknesses else geometry.spacing
    files = list(dict.fromkeys(str(frame.path) for frame in frames))
    return {
        "series_instance_uid": str(header.get("SeriesInstanceUID", "") or ""),
        "study_instance_uid": str(header.get("StudyInstanceUID", "") or ""),
        "series_description": description,
        "series_number": _int_or(header.get("SeriesNumber"), None),
        "modality": modality,
        "slice_thickness_mm": thickness,
        "slice_spacing_mm": float(geometry.spacing),
        "pixel_spacing_mm": tuple(float(v) for v in frames[0].pixel_spacing),
        "gantry_tilt_deg": float(geometry.tilt_deg),
        "resampled": bool(geometry.resample),
        "manufacturer": str(header.get("Manufacturer", "") or ""),
        "transfer_syntax": _transfer_syntax_name(header),
        "files": files,
        "warnings": list(geometry.notes),
        "dicom_reference": _dicom_reference(header),
    }


#: Non-identifying tags kept in metadata['dicom_reference'].
REFERENCE_KEYWORDS = (
    "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPClassUID",
    "StudyDate", "StudyTime", "StudyDescription", "SeriesDate", "SeriesTime",
    "SeriesNumber", "Modality", "BodyPartExamined", "PatientPosition",
    "Manufacturer", "ManufacturerModelName", "ConvolutionKernel",
    "MagneticFieldStrength", "RepetitionTime", "EchoTime", "KVP",
    "WindowCenter", "WindowWidth",
)


def _dicom_reference(header: Dataset) -> dict[str, Any]:
    """Small dict of non-identifying tags used to write derived series.

    Numbers (DS, IS, FD...) become float/int, everything else text; of
    multi-valued tags (window centre/width) the first value is kept.
    """
    reference: dict[str, Any] = {}
    for keyword in REFERENCE_KEYWORDS:
        element = header.get(keyword) if keyword in header else None
        if element is None:
            continue
        value = header[keyword].value
        vr = header[keyword].VR
        if type(value).__name__ == "MultiValue" or isinstance(value, (list, tuple)):
            if not len(value):
                continue
            value = value[0]
        if value is None or value == "":
            continue
        if vr in _NUMERIC_VRS:
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            reference[keyword] = int(number) if vr in _INTEGER_VRS else number
        else:
            reference[keyword] = str(value)
    if "SOPClassUID" not in reference and _sop_class(header):
        reference["SOPClassUID"] = _sop_class(header)
    return reference


_NUMERIC_VRS = {"DS", "IS", "FD", "FL", "US", "SS", "UL", "SL", "UV", "SV"}
_INTEGER_VRS = {"IS", "US", "SS", "UL", "SL", "UV", "SV"}


def _folder_of(frames: list[_Frame]) -> str:
    """Folder holding a group's files (their common parent)."""
    parents = {str(f.path.parent) for f in frames}
    if len(parents) == 1:
        return parents.pop()
    return os.path.commonpath(sorted(parents))


def _make_names_unique(volumes: list[Volume]) -> None:
    """Append ' #2', ' #3'... to repeated volume names, in order."""
    counts: dict[str, int] = {}
    for vol in volumes:
        counts[vol.name] = counts.get(vol.name, 0) + 1
        if counts[vol.name] > 1:
            vol.name = f"{vol.name} #{counts[vol.name]}"


# ---------------------------------------------------------------------------
# Skipped files, warnings
# ---------------------------------------------------------------------------


class _SkipLog:
    """Files skipped while reading a folder, with their reasons."""

    def __init__(self):
        self.entries: list[tuple[Path, str, str]] = []  # (path, kind, reason)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def add(self, path: Path, kind: str, reason: str) -> None:
        self.entries.append((path, kind, reason))

    def summary(self, root: Path, *, details: bool = False) -> str:
        """'<kind>: 3 files (a, b, c and 2 more); <kind>: ...'.

        With ``details`` the full reason for the first file of each kind is
        added (e.g. the transfer syntax that failed to decode).
        """
        by_kind: dict[str, list[tuple[Path, str]]] = {}
        for path, kind, reason in self.entries:
            by_kind.setdefault(kind, []).append((path, reason))
        parts = []
        for kind, items in by_kind.items():
            names = ", ".join(_relative(p, root) for p, _ in items[:MAX_LISTED_FILES])
            if len(items) > MAX_LISTED_FILES:
                names += f" and {len(items) - MAX_LISTED_FILES} more"
            text = f"{kind}: {_count(len(items), 'file')} ({names})"
            if details:
                first_path, first_reason = items[0]
                text += f" -- {_relative(first_path, root)} {first_reason}"
            parts.append(text)
        return "; ".join(parts)

    def warning_message(self, root: Path, n_files: int) -> str:
        return f"{root}: skipped {len(self.entries)} of {_count(n_files, 'file')}: " \
               f"{self.summary(root)}"

    def error_message(self, root: Path, n_files: int) -> str:
        if not self.entries:
            return f"{root}: no DICOM image series found"
        return (f"{root}: no readable CT/MR image series among "
                f"{_count(n_files, 'file')}: {self.summary(root, details=True)}")


def _count(n: int, noun: str) -> str:
    """'1 file', '3 files'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (a folder, or a DICOMDIR's folder)."""
    base = root if root.is_dir() else root.parent
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def _warn(message: str) -> None:
    warnings.warn(message, DicomReadWarning, stacklevel=3)


def _starts_like_dataset(head: bytes) -> bool:
    """True if the bytes start with a low group number (0000-0008), either endian.

    Raw (preamble-less) DICOM datasets start with group 0002 (file meta) or
    0008; anything else is rejected without parsing.
    """
    little = int.from_bytes(head[0:2], "little")
    big = int.from_bytes(head[0:2], "big")
    return little <= 0x0008 or big <= 0x0008


@contextmanager
def _quiet_pydicom():
    """Silence pydicom's value validation warnings and log messages.

    pydicom reports invalid values by quoting them, which could put patient
    names or dates into warnings and logs; we report our own messages instead.
    """
    logger = logging.getLogger("pydicom")
    old_level, old_mode = logger.level, pydicom_config.settings._reading_validation_mode
    logger.setLevel(logging.CRITICAL)
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom_config.settings._reading_validation_mode = old_mode
        logger.setLevel(old_level)
