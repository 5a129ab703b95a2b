"""Series assembly: frames -> stacks -> volumes (geometry only, no pixels).

3. **Group** frames by SeriesInstanceUID, then split groups that mix
   orientations, image sizes or pixel spacings, and groups where several
   frames share a slice position (echoes, phases, repeated acquisitions).
4. **Stack** each group: slices are sorted by their position projected on
   the slice normal (never by file name or InstanceNumber), the slice
   spacing comes from the positions, uneven spacing (missing slices) is
   resampled onto a regular grid, a gantry tilt is kept in a sheared affine.
5. Build the index -> RAS+ affine from the LPS patient coordinates and
   reorient to the display orientation (S, P, L).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from ..errors import ReadError
from ..volume import Volume, reorient
from .decode import _PixelError, _load_slices, _resample_slices, _transfer_syntax_name
from .discovery import (
    LPS_TO_RAS, MAX_LISTED_FILES, _Frame, _int_or, _sop_class, _SkipLog,
)

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


