"""Reading and writing CT/MR volumes with their geometry (Qt-free).

>>> from napari_mediffuse import io
>>> volumes = io.read("scan.nii.gz")      # or a DICOM file, folder, DICOMDIR
>>> ct = volumes[0]
>>> ct.data.shape, ct.spacing, ct.affine   # (S, P, L) array, mm, index->RAS
>>> io.write_nifti(ct, "copy.nii.gz")
"""
from __future__ import annotations

from typing import Sequence

from pathlib import Path

from .errors import InputWarning, MediffuseIOError, ReadError, WriteCancelled, WriteError
from . import validate
from .volume import (
    DISPLAY_AXCODES,
    Volume,
    affine_from_world,
    reorient,
    voxel_spacing,
    world_scale_translate,
)
from .nifti import is_nifti_path, read_nifti, write_nifti
from .dicom import is_dicom_file, read_dicom
from .dicom_write import write_dicom_series
from .derived import write_dicom_seg, write_parametric_map

__all__ = [
    "DISPLAY_AXCODES", "MediffuseIOError", "ReadError", "WriteError", "Volume",
    "affine_from_world", "is_dicom_file", "is_nifti_path", "read", "read_dicom",
    "read_nifti", "reorient", "voxel_spacing", "world_scale_translate",
    "write_dicom_seg", "write_dicom_series", "write_nifti", "write_parametric_map", "can_read", "InputWarning", "WriteCancelled", "validate",
]


def can_read(path) -> bool:
    """Cheap check: is ``path`` something :func:`read` should try?

    Never raises: an odd path (too long, a link loop, no permission) is
    offered when its name looks like ours, so :func:`read` can say what is wrong.
    """
    try:
        path = Path(path)
        if is_nifti_path(path):
            return True
        if path.name.upper() == "DICOMDIR" or path.suffix.lower() in (".dcm", ".dicom", ".ima"):
            return True
        if path.is_dir():
            return True
        return path.is_file() and is_dicom_file(path)
    except (OSError, ValueError):
        return False


def read(path, *, resample: bool = False, loaded: Sequence[Volume] = ()) -> list[Volume]:
    """Read a NIfTI file, a DICOM file, a DICOM folder (tree) or a DICOMDIR.

    Every input first goes through :mod:`~napari_mediffuse.io.validate`
    (path, NIfTI header against the file size, affine), and every volume
    read through the non-finite voxel rule: NaN/inf voxels are replaced
    (NaN and -inf by the smallest finite value, +inf by the largest) with a
    warning, so no task ever computes on them.

    ``resample`` interpolates a DICOM stack with missing slices onto its
    regular grid (see :func:`~napari_mediffuse.io.dicom.read_dicom`); by
    default the acquired slices stay unchanged at their true places.

    ``loaded``: grids of series already open (the viewer's image layers,
    :func:`napari_mediffuse.layers.loaded_series_grids`), preferred first; a
    DICOM SEG read without its series goes on the grid of a loaded series it
    references (:func:`~napari_mediffuse.io.dicom.seg.read_segmentation`).

    Returns
    -------
    list of Volume
        One per series (a NIfTI file is one series).

    Raises
    ------
    ReadError
        With a message naming the path and the reason.
    """
    path = validate.check_input_path(path)
    if is_nifti_path(path) and not path.is_dir():
        volumes = [read_nifti(path)]
    elif path.is_dir() or is_dicom_file(path) or path.name.upper() == "DICOMDIR":
        volumes = read_dicom(path, resample=resample, loaded=loaded)
    else:
        raise ReadError(
            f"{path}: not a NIfTI (.nii, .nii.gz) or DICOM file "
            "(no DICOM preamble and not a DICOM data set)"
        )
    return [validate.check_volume(volume, where=_where(path, volume, len(volumes))) for volume in volumes]


def _where(path: Path, volume: Volume, n: int) -> str:
    """How messages name a volume: the file, plus the series in a folder."""
    return str(path) if n == 1 and not path.is_dir() else f"{path} [{volume.name}]"
