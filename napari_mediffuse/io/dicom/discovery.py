"""Finding DICOM files and describing their image frames (headers only).

1. **Find files** -- a single file, every file under a folder (recursively),
   or the files a DICOMDIR references.
2. **Read headers** (pixel data deferred) and describe every 2D frame -- a
   single-frame file is one frame, an enhanced multi-frame file holds many --
   with its position, orientation, pixel spacing and rescale.

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

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.uid import UID

from ..errors import ReadError
from ..validate import input_path_fault

#: SOP class of a DICOMDIR (Media Storage Directory Storage).
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"

#: Segmentation Storage (read by :mod:`.seg` as labels).
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"

#: RT Structure Set Storage (contours: not supported yet).
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"

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
    sop_uid: str = ""  # SOPInstanceUID of the file (duplicates are dropped)
    image_type: str = ""  # ImageType / FrameType values joined by '\\'

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal: row cosines x column cosines."""
        n = np.cross(self.row_cosines, self.column_cosines)
        return n / np.linalg.norm(n)

    @property
    def order_key(self) -> tuple:
        """Acquisition order (InstanceNumber, file, frame); for tie-breaks only."""
        return (self.instance_number, str(self.path), self.frame_index or 0)


class _Segmentation(Exception):
    """A DICOM SEG file: read as labels after the image series (see :mod:`.seg`)."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        self.path = path


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
    if not path.is_file():  # a broken or looping link, a FIFO (reading would block)...
        raise _Skip("not a regular file", f"cannot be read: {input_path_fault(path) or 'not a regular file'}")
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
    if sop_class == SEG_SOP_CLASS:
        raise _Segmentation(path)
    if sop_class == RTSTRUCT_SOP_CLASS:
        raise _Skip("RT structure set (not supported yet)",
                    "is an RT Structure Set (RTSTRUCT): contours are not supported yet; "
                    "export the structures as a DICOM SEG or a NIfTI label map")
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
        sop_uid=str(ds.get("SOPInstanceUID", "") or ""),
        image_type=keys["type"].upper(),
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
        sop_uid=str(ds.get("SOPInstanceUID", "") or ""),
        image_type=(keys["type"] or _key_text(ds.get("ImageType"))).upper(),
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
