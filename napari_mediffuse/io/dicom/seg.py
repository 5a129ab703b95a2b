"""DICOM Segmentation (SEG) objects -> labels volumes, read with highdicom.

A SEG holds one binary (or fractional) frame per segment and slice, each
with its own patient position. :func:`read_segmentation` paints the frames
into an integer label map (voxel value = segment number):

* on the grid of the **referenced series** when that series was read in the
  same call (a folder holding the CT and its SEG), so the labels overlay the
  scan voxel for voxel;
* else on the grid of that series **already loaded** (a napari layer): the
  plugin passes the loaded series' grids as ``loaded`` (see
  :func:`napari_mediffuse.layers.loaded_series_grids`);
* otherwise on the SEG's **own frame of reference**: the frames' positions
  give a regular grid (as for an image series, see
  :func:`~napari_mediffuse.io.dicom.assembly._slice_grid`); slices where no
  segment is present stay 0 -- a segment that skips slices is never
  interpolated.

Overlapping segments cannot share one label map: each segment then becomes
its own labels volume, with a note. The volume's ``metadata`` has
``layer_type = 'labels'``, ``segments``: ``{number: {'label', 'color'
(RGB 0-255), 'category', 'type'}}``, ``on_referenced_grid`` and
``segmented_outside`` (segmented voxels dropped off the grid).

:func:`regrid_segmentation` paints a SEG read earlier onto an image volume's
grid (the SEG opened first, its series afterwards).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from pydicom.dataset import Dataset

from ..errors import ReadError
from ..volume import Volume, reorient
from .assembly import (
    DUPLICATE_POSITION_TOLERANCE_MM, _description, _dicom_reference, _slice_grid,
)
from .discovery import (
    LPS_TO_RAS, RTSTRUCT_SOP_CLASS, SEG_SOP_CLASS, _enhanced_frame, _Frame, _int_or,
    _quiet_pydicom, _Skip,
)

__all__ = ["SEG_SOP_CLASS", "RTSTRUCT_SOP_CLASS", "read_segmentation", "regrid_segmentation"]

#: A SEG frame's pixels may lie this far (voxels) off the target grid's
#: voxel centres before the painting is reported as nearest-neighbour.
ALIGNMENT_TOLERANCE_VOXELS = 0.1


def read_segmentation(path: Path, volumes: list[Volume], *, loaded: Sequence[Volume] = ()) -> list[Volume]:
    """Labels volume(s) of the DICOM SEG file ``path``.

    Parameters
    ----------
    path : Path
        A Segmentation Storage file.
    volumes : list of Volume
        Image volumes read together with it; the one whose
        ``series_instance_uid`` the SEG references gives the grid. When none
        does, a referenced series of ``loaded`` gives it
        (``metadata['referenced_layer']`` names it), else the SEG's own frame.
    loaded : sequence of Volume
        Grids of the series already open (napari layers), preferred first
        (the visible ones): ``affine``, the spatial shape of ``data`` (a
        zero-stride view will do), ``name`` and
        ``metadata['series_instance_uid']``; see
        :func:`napari_mediffuse.layers.loaded_series_grids`.

    Returns
    -------
    list of Volume
        One label map (value = segment number), or one per segment when
        segments overlap. ``metadata['warnings']`` says which grid was used.

    Raises
    ------
    _Skip
        The file is not a readable SEG (corrupt, no segments, no geometry).
    """
    seg = _open(path)
    referenced = _referenced_series(seg)
    target = _referencing(volumes, referenced)
    notes: list[str] = []
    layer_grid = None  # the loaded series used, if any
    if target is None:
        candidates = _referencing_all(loaded, referenced)
        if candidates:
            target = layer_grid = candidates[0]
            if len(candidates) > 1:
                names = ", ".join(f"'{c.name}'" for c in candidates)
                notes.append(f"{path}: its series is loaded {len(candidates)} times ({names}); "
                             f"the segmentation opens on the grid of '{layer_grid.name}'")
    labels = _labels(path, seg, referenced, target, notes)
    if layer_grid is not None and _all_dropped(labels):
        # the layer no longer covers the segmented voxels (cropped, moved): its own frame
        labels = _labels(path, seg, referenced, None, [
            f"{path}: none of its segmented voxels lies on the loaded layer '{layer_grid.name}'"])
    elif layer_grid is not None:
        for vol in labels:
            vol.metadata["referenced_layer"] = layer_grid.name
    return labels


def regrid_segmentation(labels: Volume, image: Volume) -> list[Volume]:
    """A SEG read earlier (``labels``, from :func:`read_segmentation`),
    painted again from its file onto the grid of ``image``, voxel for voxel.

    For a SEG opened before its series: the result has ``image``'s affine,
    spatial shape and layout, and holds every segment of the file (one
    volume per segment when they overlap, as read). ``metadata['on_referenced_grid']`` is True when
    ``image`` is a series the SEG references; painting onto another series
    (same patient coordinates assumed) adds a note.

    Raises
    ------
    ReadError
        ``labels`` does not come from a DICOM SEG file, or the file cannot be
        read any more (the message names it and the reason).
    """
    files = [f for f in labels.metadata.get("files") or [] if f]
    if "SEG" not in (labels.modality, labels.metadata.get("modality")) or len(files) != 1:
        raise ReadError(f"{labels.name}: not a DICOM SEG read from one file, cannot paint it "
                        f"onto the grid of {image.name}")
    path = Path(files[0])
    if not path.is_file():
        raise ReadError(f"{path}: no such file (the SEG was moved or deleted since it was read)")
    try:
        seg = _open(path)
        referenced = _referenced_series(seg)
        notes = []
        if image.metadata.get("series_instance_uid") not in referenced:
            notes.append(f"{path}: painted on '{image.name}', a series it does not reference "
                         "(the same patient coordinates are assumed)")
        result = _labels(path, seg, referenced, image, notes)
    except _Skip as skip:
        raise ReadError(f"{path} {skip.reason}") from None
    except OSError as exc:
        raise ReadError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    for vol in result:
        vol.metadata["on_referenced_grid"] = not notes
        vol.source = labels.source
    return result


def _referencing_all(volumes: Iterable[Volume], referenced: set[str]) -> list[Volume]:
    """The image volumes (no localizer) of a series in ``referenced``, in order."""
    return [v for v in volumes if v.metadata.get("series_instance_uid") in referenced
            and not v.metadata.get("localizer")]


def _referencing(volumes: Iterable[Volume], referenced: set[str]) -> Volume | None:
    found = _referencing_all(volumes, referenced)
    return found[0] if found else None


def _all_dropped(labels: list[Volume]) -> bool:
    """True when segmented voxels were all outside the grid."""
    return (not any(np.any(v.data) for v in labels)
            and any(v.metadata.get("segmented_outside", 0) for v in labels))


def _labels(path: Path, seg, referenced: set[str], target: Volume | None,
            notes: list[str]) -> list[Volume]:
    """Paint ``seg`` onto ``target``'s grid (its own frame when None)."""
    segments = _segments(seg)
    frames = _seg_frames(seg, path)
    pixels = _frame_masks(seg, path)
    description = _description(seg) or "segmentation"
    notes = list(notes)
    if target is not None:
        affine, shape = target.affine, target.spatial_shape  # the normal case: no note
    else:
        affine, shape = _own_grid(frames)
        missing = ", ".join(sorted(referenced)) or "none named"
        notes.append(f"{path}: segmentation '{description}': its series ({missing}) was not "
                     "read with it; it opens on its own frame of reference (it still overlays "
                     "the scan in the same patient coordinates)")

    numbers = [int(f.split_keys.get("segment") or 1) for f in frames]
    maps, overlaps, outside, misaligned = _paint(frames, pixels, numbers, affine, shape)
    if outside:
        notes.append(f"{path}: {outside} segmented voxels lie outside the grid and were dropped")
    if misaligned > ALIGNMENT_TOLERANCE_VOXELS:
        notes.append(f"{path}: the segmentation frames lie up to {misaligned:.2f} voxels off "
                     "the grid; painted at the nearest voxels")
    base = {
        "layer_type": "labels",
        "series_instance_uid": str(seg.get("SeriesInstanceUID", "") or ""),
        "series_description": description,
        "modality": "SEG",
        "referenced_series_uids": sorted(referenced),
        "on_referenced_grid": target is not None,
        "files": [str(path)],
        "dicom_reference": _dicom_reference(seg),
        "segmented_outside": int(outside),
    }
    layout = None if target is None else target.layout  # saved like its series

    def to_display(data):  # own grid: display orientation, as for image series
        return reorient(data, affine) if target is None else (data, affine)

    if overlaps:
        pairs = ", ".join(f"{segments.get(a, {}).get('label', a)} and "
                          f"{segments.get(b, {}).get('label', b)} ({n} voxels)"
                          for (a, b), n in sorted(overlaps.items()))
        notes.append(f"{path}: segments overlap ({pairs}); one label map cannot hold both, so "
                     "each segment opens as its own labels layer")
        result = []
        for number in sorted(maps):
            data, out_affine = to_display(maps[number])
            meta = dict(base, segments={number: segments.get(number, {})}, warnings=list(notes))
            label = segments.get(number, {}).get("label", str(number))
            result.append(Volume(data=data, affine=out_affine, modality="SEG",
                                 name=f"{description} (SEG) {label}", metadata=meta,
                                 layout=layout))
        return result

    combined = np.zeros(shape, dtype=_label_dtype(max(segments) if segments else 1))
    for number, mask in maps.items():
        combined[mask > 0] = number
    data, out_affine = to_display(combined)
    meta = dict(base, segments=segments, warnings=notes)
    return [Volume(data=data, affine=out_affine, modality="SEG", name=f"{description} (SEG)",
                   metadata=meta, layout=layout)]


def _open(path: Path):
    """The highdicom Segmentation of ``path`` (raises :class:`_Skip`)."""
    import highdicom as hd

    try:
        with _quiet_pydicom():
            return hd.seg.segread(path)
    except Exception as exc:
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise _Skip("unreadable DICOM SEG", f"is a DICOM SEG that cannot be read ({detail})") from None


def _segments(seg) -> dict[int, dict]:
    """``{number: {'label', 'color', 'category', 'type'}}`` from the SegmentSequence."""
    from highdicom.color import CIELabColor

    segments = {}
    for item in seg.get("SegmentSequence") or []:
        number = _int_or(item.get("SegmentNumber"), len(segments) + 1)
        info = {"label": str(item.get("SegmentLabel", "") or f"segment {number}")}
        lab = item.get("RecommendedDisplayCIELabValue")
        if lab is not None and len(lab) == 3:
            try:
                info["color"] = [int(v) for v in CIELabColor.from_dicom_value(list(lab)).to_rgb()]
            except Exception:  # a malformed colour only loses the colour
                pass
        for key, keyword in (("category", "SegmentedPropertyCategoryCodeSequence"),
                             ("type", "SegmentedPropertyTypeCodeSequence")):
            codes = item.get(keyword)
            if codes:
                info[key] = str(codes[0].get("CodeMeaning", "") or "")
        segments[number] = info
    if not segments:
        raise _Skip("DICOM SEG without segments", "is a DICOM SEG without segments "
                    "(empty SegmentSequence)")
    return segments


def _seg_frames(seg: Dataset, path: Path) -> list[_Frame]:
    """Geometry and segment number of every frame (functional groups)."""
    n_frames = int(seg.get("NumberOfFrames", 1) or 1)
    return [_enhanced_frame(seg, path, index) for index in range(n_frames)]


def _frame_masks(seg: Dataset, path: Path) -> np.ndarray:
    """``(frames, rows, columns)`` boolean masks (fractional: >= half the maximum)."""
    try:
        with _quiet_pydicom():
            pixels = np.asarray(seg.pixel_array)
    except Exception as exc:
        raise _Skip("DICOM SEG pixels cannot be decoded",
                    f"is a DICOM SEG whose frames cannot be decoded ({type(exc).__name__})") from None
    if pixels.ndim == 2:
        pixels = pixels[None]
    if str(seg.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL":
        maximum = float(seg.get("MaximumFractionalValue", 255) or 255)
        return pixels >= maximum / 2.0
    return pixels > 0


def _referenced_series(seg: Dataset) -> set[str]:
    """SeriesInstanceUIDs the SEG was made from."""
    uids = {str(item.get("SeriesInstanceUID", "")) for item in
            (seg.get("ReferencedSeriesSequence") or [])}
    for item in seg.get("SourceImageEvidenceSequence") or []:  # some writers only put them here
        for series in item.get("ReferencedSeriesSequence") or []:
            uids.add(str(series.get("SeriesInstanceUID", "")))
    return {uid for uid in uids if uid}


def _own_grid(frames: list[_Frame]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Index -> RAS affine and shape of the grid the SEG frames lie on."""
    first = frames[0]
    normal = first.normal
    offsets = np.array(sorted({round(float(f.position @ normal) / DUPLICATE_POSITION_TOLERANCE_MM)
                               for f in frames})) * DUPLICATE_POSITION_TOLERANCE_MM
    lowest = min(frames, key=lambda f: f.position @ normal)
    if len(offsets) > 1:
        grid = _slice_grid(offsets - offsets[0])
        spacing, n_slices = grid.spacing, grid.n_slices
    else:
        spacing, n_slices = first.thickness or 1.0, 1
    affine = np.eye(4)
    affine[:3, 0] = normal * spacing
    affine[:3, 1] = first.column_cosines * first.pixel_spacing[0]
    affine[:3, 2] = first.row_cosines * first.pixel_spacing[1]
    affine[:3, 3] = lowest.position
    return LPS_TO_RAS @ affine, (n_slices, first.rows, first.columns)


def _paint(frames, pixels, numbers, affine, shape):
    """Paint each frame's mask into one map per segment on the target grid.

    Returns ``(maps, overlaps, outside, misaligned)``: ``{number: uint8 map}``,
    ``{(a, b): voxels}`` where segments ``a < b`` overlap, the count of
    segmented voxels outside the grid, and the largest distance (voxels) of a
    painted pixel from a voxel centre.
    """
    inverse = np.linalg.inv(affine)
    maps: dict[int, np.ndarray] = {}
    outside, misaligned = 0, 0.0
    for frame, mask, number in zip(frames, pixels, numbers):
        rows, cols = np.nonzero(mask)
        target = maps.setdefault(number, np.zeros(shape, dtype=np.uint8))
        if rows.size == 0:
            continue
        lps = (frame.position[:, None]
               + frame.column_cosines[:, None] * (rows * frame.pixel_spacing[0])
               + frame.row_cosines[:, None] * (cols * frame.pixel_spacing[1]))
        ras = LPS_TO_RAS[:3, :3] @ lps
        index = inverse[:3, :3] @ ras + inverse[:3, 3:4]
        nearest = np.rint(index).astype(int)
        misaligned = max(misaligned, float(np.abs(index - nearest).max()))
        inside = np.all((nearest >= 0) & (nearest < np.array(shape)[:, None]), axis=0)
        outside += int((~inside).sum())
        target[tuple(nearest[:, inside])] = 1
    overlaps = {}
    numbers_sorted = sorted(maps)
    for i, a in enumerate(numbers_sorted):
        for b in numbers_sorted[i + 1:]:
            count = int(np.count_nonzero(maps[a] & maps[b]))
            if count:
                overlaps[(a, b)] = count
    return ({n: m * n if n < 256 else m.astype(np.uint16) * n for n, m in maps.items()},
            overlaps, outside, misaligned)


def _label_dtype(top: int):
    return np.uint8 if top < 256 else np.uint16

