"""DICOM reading with pydicom: files, folders, folder trees and DICOMDIRs.

:func:`read_dicom` turns whatever the user points at into one
:class:`~napari_mediffuse.io.volume.Volume` per image series:

1. **Find files** -- a single file, every file under a folder (recursively),
   or the files a DICOMDIR references.
2. **Read headers** (pixel data deferred) and describe every 2D frame -- a
   single-frame file is one frame, an enhanced multi-frame file holds many --
   with its position, orientation, pixel spacing and rescale.
3. **Group** frames by SeriesInstanceUID after dropping duplicated SOP
   instances, set localizers apart, split groups that mix orientations,
   image sizes or pixel spacings, and make frames that share slice
   positions (echoes, phases) one 4D volume (:mod:`.assembly`).
4. **Stack** each group: slices are sorted by their position projected on
   the slice normal (never by file name or InstanceNumber), the slice
   spacing comes from the positions with a tolerance relative to it (as
   dcm2niix), missing slices are reported and the acquired ones kept at
   their true places, a gantry tilt is kept in a sheared affine.
5. **Decode** pixels (:mod:`.decode`), apply RescaleSlope/RescaleIntercept
   slice by slice (CT in Hounsfield units), build the index -> RAS+ affine
   from the LPS patient coordinates and reorient to the display orientation
   (S, P, L).
6. **Segmentations**: DICOM SEG files become labels volumes on their
   series' grid (:mod:`.seg`); RTSTRUCT is refused as not supported yet.

The modules: :mod:`.discovery` (files, headers -> frames, skip log),
:mod:`.assembly`, :mod:`.decode`, :mod:`.seg`.

Frame geometry (LPS millimetres, ``data[slice, r, c]``): see :mod:`.discovery`.

Files that cannot be used (not DICOM, no pixel data, no patient geometry,
colour, corrupt) are skipped with a warning when other series are readable;
:class:`~napari_mediffuse.io.errors.ReadError` is raised only when nothing
readable remains. Messages never contain patient-identifying tags.
"""
from __future__ import annotations

from typing import Sequence

from pathlib import Path

from ..errors import ReadError
from ..volume import Volume
from .assembly import _build_with_retries, _group_frames, _make_names_unique
from .discovery import (
    DicomReadWarning, _Frame, _frames_from_file, _input_files, _Segmentation, _Skip, _SkipLog,
    _warn, is_dicom_file,
)
from .seg import read_segmentation

__all__ = ["DicomReadWarning", "is_dicom_file", "read_dicom"]


def read_dicom(path, *, resample: bool = False, loaded: Sequence[Volume] = ()) -> list[Volume]:
    """Read every CT/MR image series under ``path``.

    Parameters
    ----------
    path : str or Path
        A DICOM file, a folder (searched recursively; it may hold several
        series, studies or patients) or a DICOMDIR file (only the files it
        references are read).

    resample : bool
        Interpolate an unevenly spaced stack (missing slices, irregular gaps)
        linearly onto its regular grid (float32). By default the acquired
        slices are kept unchanged at their true places on the grid, missing
        grid slices hold the series' lowest value and are listed in
        ``metadata['missing_slices']``.

    Returns
    -------
    list of Volume
        One volume per series (or per part of a series that mixes
        orientations), sorted by SeriesNumber; localizers (ImageType
        LOCALIZER, or slices whose orientation differs from the series'
        stack) come last, named ``... [localizer]`` with
        ``metadata['localizer']`` True. Echoes, phases or repeats at the same
        positions make one 4D volume ``(phase, S, P, L)`` with
        ``metadata['phase_labels']``. ``data`` is ``(S, P, L)`` ordered; CT
        values are Hounsfield units. Integer int16/int32 when the rescale is
        integral, float32 otherwise (and after interpolation). ``name`` is
        ``"<SeriesDescription> (<Modality>)"`` (unique within the list),
        ``source`` the given path. ``metadata`` holds
        ``series_instance_uid``, ``study_instance_uid``,
        ``series_description``, ``series_number``, ``modality``,
        ``slice_thickness_mm``, ``slice_spacing_mm``, ``pixel_spacing_mm``,
        ``gantry_tilt_deg``, ``manufacturer``, ``transfer_syntax``, ``files``
        (source files in slice order), ``sop_instance_uids``, ``warnings``
        and ``dicom_reference`` (non-identifying tags for writing derived
        series). A DICOM SEG gives a labels volume (see
        :mod:`~napari_mediffuse.io.dicom.seg`).

    Raises
    ------
    ReadError
        The path does not exist, holds no DICOM image with patient geometry,
        or (for a single file) the file is corrupt, non-image, 2D without
        patient geometry, colour, or cannot be decoded.

    Warns
    -----
    DicomReadWarning
        Skipped files (when other series were readable), duplicated
        instances dropped, localizers set apart, missing slices or uneven
        spacing, gantry tilt, assumed slice thickness.
    """
    path = Path(path)
    if not path.exists():
        raise ReadError(f"{path}: no such file or folder")
    files, single = _input_files(path)

    skips = _SkipLog()
    frames: list[_Frame] = []
    segmentations: list[Path] = []
    for file in files:
        try:
            frames.extend(_frames_from_file(file))
        except _Segmentation:
            segmentations.append(file)
        except _Skip as skip:
            if single:
                raise ReadError(f"{file} {skip.reason}") from None
            skips.add(file, skip.kind, skip.reason)

    volumes: list[tuple[tuple, Volume]] = []
    for group in _group_frames(frames):
        for built in _build_with_retries(group, skips, single, resample=resample):
            for note in built.metadata["warnings"]:
                _warn(note)
            volumes.append((group.sort_key, built))

    images = [vol for _, vol in sorted(volumes, key=lambda item: item[0])]
    for file in segmentations:  # after the images: a SEG goes on its series' grid
        try:
            labels = read_segmentation(file, images, loaded=loaded)
        except _Skip as skip:
            if single:
                raise ReadError(f"{file} {skip.reason}") from None
            skips.add(file, skip.kind, skip.reason)
            continue
        for vol in labels:
            for note in vol.metadata["warnings"]:
                _warn(note)
            volumes.append(((False, 10**10, 0, 0), vol))  # after the images, before localizers

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

