"""Series assembly: frames -> stacks -> volumes, following dcm2niix's rules.

3. **Group** frames by SeriesInstanceUID after dropping duplicated SOP
   instances (the same file copied twice), then split groups that mix
   orientations, image sizes or pixel spacings. Frames of an orientation
   that differs from the series' main stack, and frames whose ImageType says
   LOCALIZER, are set apart as localizers. Frames sharing slice positions
   (echoes, phases, repeated acquisitions) become one 4D volume when every
   part covers the same positions (as dcm2niix and a 4D NIfTI do).
4. **Stack** each group: slices are sorted by their position projected on
   the slice normal (never by file name or InstanceNumber); the slice
   spacing comes from the positions, with a tolerance relative to the
   spacing so the rounding scanners apply to ImagePositionPatient (0.1 mm)
   is accepted; a gantry tilt is kept in a sheared affine. Missing slices
   are reported and the acquired slices stay at their true positions on the
   regular grid (never interpolated unless the caller asks).
5. Build the index -> RAS+ affine from the LPS patient coordinates and
   reorient to the display orientation (S, P, L).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from ..errors import ReadError
from ..geometry import dcm2niix_layout
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

#: A slice may lie this fraction of the slice spacing off its place on the
#: regular grid before the stack counts as unevenly spaced. dcm2niix accepts
#: gaps within 0.2 mm of each other (20 % of a 1 mm spacing); relative, the
#: rule treats thin and thick slices alike: 0.625 mm slices whose positions
#: are rounded to 0.1 mm are off by at most 0.05 mm (8 %), a missing slice
#: moves the next one a whole spacing (100 %).
SPACING_TOLERANCE_REL = 0.2

#: A slice-to-slice step further than this from the slice normal is a gantry
#: tilt (degrees); below it the step is taken along the normal exactly.
TILT_TOLERANCE_DEG = 0.01

#: The regular grid of a stack with gaps never has more than this many times
#: its slices (a stray tiny gap would otherwise make a huge grid).
MAX_RESAMPLE_FACTOR = 64

#: Slice positions further than this (mm) from a straight line get a warning.
COLLINEARITY_TOLERANCE_MM = 0.05

#: ImageType values that mark a localizer (scout, topogram, survey).
LOCALIZER_TYPES = ("LOCALIZER",)


# ---------------------------------------------------------------------------
# Grouping
# ---------------------------------------------------------------------------


@dataclass
class _Group:
    """Frames that make one volume.

    ``phases`` holds one frame list per phase/echo of a 4D volume (a single
    list for a 3D volume); ``label`` distinguishes the parts of a split
    series; ``notes`` are warnings about the whole series (duplicates,
    localizers set apart).
    """

    phases: list[list[_Frame]]
    label: str
    sort_key: tuple
    phase_labels: list[str] = field(default_factory=list)
    localizer: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def frames(self) -> list[_Frame]:
        return [frame for phase in self.phases for frame in phase]


def _group_frames(frames: list[_Frame]) -> list[_Group]:
    """Split frames into volumes: series, then geometry, then repeated positions.

    Localizers sort after every other volume; otherwise the order is
    SeriesNumber, then the order the series were met.
    """
    frames, duplicate_notes = _drop_duplicate_instances(frames)
    by_series: dict[str, list[_Frame]] = {}
    for frame in frames:
        by_series.setdefault(frame.series_uid, []).append(frame)

    groups = []
    for series_index, series_frames in enumerate(by_series.values()):
        number = _int_or(series_frames[0].header.get("SeriesNumber"), 10**9)
        clusters = _split_by_geometry(series_frames)
        localizers, notes = _localizer_flags(clusters)
        if localizers.count(False) == 1 and len(clusters) > 1:  # the stack needs no label
            clusters = [("" if not loc else label, part)
                        for (label, part), loc in zip(clusters, localizers)]
        notes = duplicate_notes.get(series_frames[0].series_uid, []) + notes
        part_index = 0
        for (geo_label, geo_frames), localizer in zip(clusters, localizers):
            parts = _split_repeated_positions(geo_frames)
            if len(parts) > 1 and _same_positions([part for _, part in parts]):
                parts = [("", [part for _, part in parts], [label for label, _ in parts])]
            else:
                parts = [(label, [part], []) for label, part in parts]
            for dup_label, phases, phase_labels in parts:
                label = " ".join(text for text in (geo_label, dup_label) if text)
                key = (localizer, number, series_index, part_index)
                groups.append(_Group(phases, label, key, phase_labels, localizer,
                                     notes if part_index == 0 else []))
                part_index += 1
    groups.sort(key=lambda group: group.sort_key)
    return groups


def _drop_duplicate_instances(frames: list[_Frame]) -> tuple[list[_Frame], dict[str, list[str]]]:
    """Keep the first copy (in path order) of every SOP instance frame.

    The same file exported twice (copied folders, PACS retries) must not
    make a second series or a repeated slice. Returns the kept frames, in
    their original order, and one note per affected series (keyed by
    SeriesInstanceUID). Frames without a SOPInstanceUID are all kept.
    """
    first: dict[tuple[str, int | None], _Frame] = {}
    dropped_ids: set[int] = set()
    dropped: dict[str, list[tuple[_Frame, _Frame]]] = {}
    for frame in sorted(frames, key=lambda f: (str(f.path), f.frame_index or 0)):
        key = (frame.sop_uid, frame.frame_index)
        if not frame.sop_uid or key not in first:
            first.setdefault(key, frame)
            continue
        dropped_ids.add(id(frame))
        if frame.frame_index in (None, 0):  # report files, not frames
            dropped.setdefault(frame.series_uid, []).append((frame, first[key]))
    notes = {}
    for series_uid, pairs in dropped.items():
        listed = ", ".join(f"{copy.path} (same as {original.path.name})"
                           for copy, original in pairs[:MAX_LISTED_FILES])
        if len(pairs) > MAX_LISTED_FILES:
            listed += f" and {len(pairs) - MAX_LISTED_FILES} more"
        notes[series_uid] = [f"{_folder_of([pairs[0][0]])}: dropped "
                             f"{_plural(len(pairs), 'duplicated instance')} (same SOPInstanceUID "
                             f"as a file already read): {listed}"]
    return [f for f in frames if id(f) not in dropped_ids], notes


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _localizer_flags(clusters: list[tuple[str, list[_Frame]]]) -> tuple[list[bool], list[str]]:
    """Which geometry clusters of one series are localizers, and notes.

    A cluster is a localizer when its ImageType says LOCALIZER, or when its
    orientation differs from the series' main stack: the cluster holding
    more than half of the series' frames (and at least 3). Without such a
    stack, clusters of different orientations stay separate volumes and the
    disagreement is reported.
    """
    flags = [all(any(t in f.image_type for t in LOCALIZER_TYPES) for f in frames)
             for _, frames in clusters]
    if len(clusters) == 1:
        return flags, []
    total = sum(len(frames) for _, frames in clusters)
    main = max(range(len(clusters)), key=lambda i: len(clusters[i][1]))
    main_frames = clusters[main][1]
    first = min((f for _, frames in clusters for f in frames), key=lambda f: str(f.path))
    where = f"{first.path}: series '{_description(first.header)}'"
    differing = [i for i in range(len(clusters))
                 if not _same_orientation(clusters[i][1][0], main_frames[0])]
    if not differing:
        return flags, []
    if len(main_frames) * 2 > total and len(main_frames) >= 3:
        for i in differing:
            flags[i] = True
        listed = ", ".join(f"{len(clusters[i][1])} {_plane_name(clusters[i][1][0].normal)}"
                           for i in differing)
        return flags, [f"{where}: slices disagree in orientation; {listed} set apart as "
                       f"localizer(s) from the {len(main_frames)}-slice "
                       f"{_plane_name(main_frames[0].normal)} stack"]
    counts = ", ".join(f"{len(frames)} {_plane_name(frames[0].normal)}" for _, frames in clusters)
    return flags, [f"{where}: slices disagree in orientation ({counts}) and no orientation "
                   "holds most of them; each is read as a separate volume"]


def _same_positions(parts: list[list[_Frame]]) -> bool:
    """True if every part has its slices at the same positions (mm)."""
    normal = parts[0][0].normal
    reference = np.sort([f.position @ normal for f in parts[0]])
    for part in parts[1:]:
        offsets = np.sort([f.position @ normal for f in part])
        if len(offsets) != len(reference) or np.abs(offsets - reference).max() > \
                DUPLICATE_POSITION_TOLERANCE_MM:
            return False
    return True


def _description(header: Dataset) -> str:
    """SeriesDescription with runs of white space collapsed ('' if absent)."""
    return " ".join(str(header.get("SeriesDescription", "") or "").split())


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
    ``grid_index[j]`` is the grid slice of frame ``j``; grid slices no frame
    lands on are ``missing``. ``interpolate`` asks for linear resampling
    instead (only when the caller requested it).
    """

    frames: list[_Frame]
    offsets: np.ndarray
    origin: np.ndarray
    normal: np.ndarray
    step_direction: np.ndarray
    spacing: float
    n_slices: int
    tilt_deg: float
    grid_index: np.ndarray
    missing: list[int]
    interpolate: bool
    notes: list[str]

    @property
    def resample(self) -> bool:
        """True when the grid differs from the acquired slices."""
        return self.interpolate or bool(self.missing)


def _stack_geometry(frames: list[_Frame], where: str, *, resample: bool = False) -> _StackGeometry:
    """Sort frames along the normal and derive spacing, tilt and the grid.

    Parameters
    ----------
    frames : list of _Frame
        Same orientation, no repeated positions.
    where : str
        "<folder>: series '<description>'", to prefix warnings.
    resample : bool
        Interpolate an unevenly spaced stack onto its regular grid instead
        of placing the acquired slices on it and reporting the gaps.
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
                              1, 0.0, np.zeros(1, dtype=int), [], False, notes)

    step_direction, tilt_deg, deviation = _fit_step_direction(positions, offsets, normal)
    if deviation > COLLINEARITY_TOLERANCE_MM:
        notes.append(f"{where}: slice positions deviate up to {deviation:.3g} mm "
                     "from a straight line; the volume places them on the best-fit line")
    if tilt_deg > TILT_TOLERANCE_DEG:
        notes.append(f"{where}: gantry tilt of {tilt_deg:.2f} degrees detected; "
                     "the affine is sheared so every slice keeps its true position")
    else:
        step_direction, tilt_deg = normal, 0.0

    grid = _slice_grid(offsets)
    interpolate = False
    if grid.note:
        interpolate = resample
        action = (f"resampled by linear interpolation onto {grid.n_slices} slices "
                  f"{grid.spacing:.4g} mm apart (as asked)" if interpolate else
                  f"the {len(frames)} acquired slices are kept unchanged on a grid of "
                  f"{grid.n_slices} slices {grid.spacing:.4g} mm apart"
                  + (f"; {len(grid.missing)} empty grid slices are filled with the "
                     "series' lowest value and listed in metadata['missing_slices']"
                     if grid.missing else "")
                  + (f"; slices moved up to {grid.max_shift:.3g} mm to the nearest grid "
                     "position" if grid.max_shift > SPACING_TOLERANCE_REL * grid.spacing else "")
                  + "; nothing is interpolated")
        notes.append(f"{where}: {grid.note}; {action}")
    return _StackGeometry(frames, offsets, origin, normal, step_direction, grid.spacing,
                          grid.n_slices, tilt_deg, grid.index,
                          [] if interpolate else grid.missing, interpolate, notes)


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


@dataclass
class _Grid:
    """Regular slice grid of a stack (see :func:`_slice_grid`)."""

    spacing: float  # mm
    n_slices: int
    index: np.ndarray  # grid slice of each acquired slice
    missing: list[int]  # grid slices without an acquired slice
    max_shift: float  # largest distance of a slice from its grid place, mm
    note: str | None  # what is uneven, None for a regular stack


def _slice_grid(offsets: np.ndarray) -> _Grid:
    """The regular grid a sorted stack lies on, and what deviates from it.

    The stack is regular when every slice lies within
    :data:`SPACING_TOLERANCE_REL` of a step of the evenly spaced grid from
    the first to the last slice (the spacing is then the mean gap). Else
    each gap is counted in typical single gaps (the median of the gaps up to
    1.5 times the smallest; the median gap if that would make a grid of more
    than :data:`MAX_RESAMPLE_FACTOR` times the slices): gaps of two steps or
    more are missing slices. The step is then fitted so the first and last
    slices sit exactly on the grid, and the largest distance of a slice from
    its grid place is reported.
    """
    n = len(offsets)
    gaps = np.diff(offsets)
    extent = float(offsets[-1] - offsets[0])
    spacing = extent / (n - 1)  # first hypothesis: every slice present
    index = np.arange(n)
    shift = float(np.abs(offsets - offsets[0] - index * spacing).max())
    if shift <= SPACING_TOLERANCE_REL * spacing:
        return _Grid(spacing, n, index, [], shift, None)

    # Count each gap in typical single gaps (robust to rounded positions:
    # a gap is rounded on its own, errors do not add up), then fit the step.
    step = float(np.median(gaps[gaps <= 1.5 * gaps.min()]))
    if extent / step + 1 > MAX_RESAMPLE_FACTOR * n:
        step = float(np.median(gaps))
    counts = np.maximum(np.rint(gaps / step), 1).astype(int)
    index = np.concatenate([[0], np.cumsum(counts)])
    n_grid = int(index[-1]) + 1
    spacing = extent / (n_grid - 1)
    shift = float(np.abs(offsets - offsets[0] - index * spacing).max())
    tolerance = SPACING_TOLERANCE_REL * spacing
    missing = sorted(set(range(n_grid)) - set(index.tolist()))
    odd = [k for k, gap in enumerate(gaps) if abs(gap - spacing) > tolerance]
    listed = ", ".join(f"{gaps[k]:.4g} mm between slices {k + 1} and {k + 2}"
                       for k in odd[:MAX_LISTED_FILES])
    if len(odd) > MAX_LISTED_FILES:
        listed += f" and {len(odd) - MAX_LISTED_FILES} more"
    what = f"{len(missing)} missing" if missing else "irregular gaps"
    note = (f"uneven slice spacing or missing slices ({what}; regular gap "
            f"{spacing:.4g} mm; {listed})")
    return _Grid(spacing, n_grid, index, missing, shift, note)


# ---------------------------------------------------------------------------
# Volume assembly
# ---------------------------------------------------------------------------


def _build_with_retries(group: _Group, skips: "_SkipLog", single: bool, *,
                        resample: bool = False) -> list[Volume]:
    """Build a group's volume(s), dropping files whose pixels cannot be decoded.

    In a single-file read a decoding failure raises ReadError at once. A 4D
    group whose phases no longer cover the same positions once a file is
    dropped is built phase by phase.
    """
    phases = [list(phase) for phase in group.phases]
    while all(phases):
        if len(phases) > 1 and not _same_positions(phases):
            break
        try:
            return [_build_volume(group, phases, resample=resample)]
        except _PixelError as err:
            if single:
                raise ReadError(f"{err.path} {err.reason}") from None
            skips.add(err.path, "pixel data cannot be decoded", err.reason)
            phases = [[f for f in phase if f.path != err.path] for phase in phases]
    if len(phases) == 1:
        return []  # every file of a 3D group failed
    volumes = []
    for k, phase in enumerate(phases):
        if phase:
            label = f"{group.label} {group.phase_labels[k]}".strip()
            part = _Group([phase], label, group.sort_key, [], group.localizer,
                          group.notes if not volumes else [])
            volumes.extend(_build_with_retries(part, skips, single, resample=resample))
    return volumes


def _build_volume(group: _Group, phases: list[list[_Frame]], *, resample: bool = False) -> Volume:
    """Stack, rescale, place on the grid and reorient one group of frames.

    Several phases (echoes, time points) give a 4D ``(phase, S, P, L)``
    volume; they share one grid because they cover the same positions.
    """
    header = phases[0][0].header
    description = _description(header)
    where = f"{_folder_of(phases[0])}: series '{description or 'series'}'"
    if group.label:
        where += f" ({group.label})"

    geometries = [_stack_geometry(phase, where, resample=resample) for phase in phases]
    geometry = geometries[0]
    stacks = [_grid_slices(_load_slices(g.frames), g) for g in geometries]
    data = stacks[0] if len(stacks) == 1 else np.stack(stacks)
    before = _affine_ras(geometry)
    data, affine = reorient(data, before)

    modality = str(header.get("Modality", "") or "OT").strip() or "OT"
    name = f"{description or 'series'} ({modality})"
    if group.label:
        name += f" {group.label}"
    if group.localizer:
        name += " [localizer]"
    metadata = _metadata(geometry, modality, description)
    metadata["warnings"] = list(group.notes) + metadata["warnings"]
    metadata["localizer"] = group.localizer
    if len(phases) > 1:
        metadata["phase_labels"] = list(group.phase_labels)
        metadata["files"] = [path for g in geometries for path in _files_of(g.frames)]
        metadata["sop_instance_uids"] = [uid for g in geometries
                                         for uid in _sop_uids_of(g.frames)]
    if geometry.missing:
        metadata["missing_slices"] = _missing_after_reorient(geometry.missing, before, affine)
    return Volume(data=data, affine=affine, modality=modality, name=name,
                  metadata=metadata, layout=dcm2niix_layout(before))  # outputs in dcm2niix's layout


def _grid_slices(data: np.ndarray, geometry: _StackGeometry) -> np.ndarray:
    """The acquired slices ``(n, rows, columns)`` on the stack's grid.

    Regular stacks are returned as they are; with ``interpolate`` the grid is
    interpolated linearly (float32); otherwise every slice is copied to its
    grid slice and missing grid slices hold the lowest value (dtype kept).
    """
    if geometry.interpolate:
        return _resample_slices(data, geometry.offsets, geometry.n_slices)
    if geometry.n_slices == len(data):
        return data
    out = np.full((geometry.n_slices,) + data.shape[1:], data.min(), dtype=data.dtype)
    out[geometry.grid_index] = data
    return out


def _missing_after_reorient(missing: list[int], before: np.ndarray, after: np.ndarray) -> dict:
    """``{'axis': a, 'indices': [...]}``: the missing grid slices in the
    reoriented array (the stack axis may have moved and flipped)."""
    to_new = np.linalg.inv(after) @ before
    axis = int(np.argmax(np.abs(to_new[:3, 0])))
    indices = sorted(int(round((to_new @ np.array([k, 0.0, 0.0, 1.0]))[axis])) for k in missing)
    return {"axis": axis, "indices": indices}


def _files_of(frames: list[_Frame]) -> list[str]:
    return list(dict.fromkeys(str(frame.path) for frame in frames))


def _sop_uids_of(frames: list[_Frame]) -> list[str]:
    return list(dict.fromkeys(frame.sop_uid for frame in frames if frame.sop_uid))


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
        "resampled": bool(geometry.interpolate),
        "manufacturer": str(header.get("Manufacturer", "") or ""),
        "transfer_syntax": _transfer_syntax_name(header),
        "files": _files_of(frames),
        "sop_instance_uids": _sop_uids_of(frames),
        "warnings": list(geometry.notes),
        "dicom_reference": _dicom_reference(header),
        # A synthetic export read back stays marked (layer name, NIfTI, re-export).
        "synthetic": _is_synthetic(header, description),
        "derivation_description": str(header.get("DerivationDescription", "") or ""),
    }


def _is_synthetic(header: Dataset, description: str) -> bool:
    """True for a series marked SYNTHETIC (upper case, as :mod:`..derived` writes it)."""
    comments = str(header.get("ImageComments", "") or "")
    return description.startswith("SYNTHETIC") or comments.startswith("SYNTHETIC")


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


