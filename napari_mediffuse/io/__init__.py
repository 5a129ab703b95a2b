"""Reading and writing CT/MR volumes with their geometry (Qt-free).

>>> from napari_mediffuse import io
>>> volumes = io.read("scan.nii.gz")      # or a DICOM file, folder, DICOMDIR
>>> ct = volumes[0]
>>> ct.data.shape, ct.spacing, ct.affine   # (S, P, L) array, mm, index->RAS
>>> io.write_nifti(ct, "copy.nii.gz")
"""
from __future__ import annotations

from pathlib import Path

from .errors import MediffuseIOError, ReadError, WriteError
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

__all__ = [
    "DISPLAY_AXCODES", "MediffuseIOError", "ReadError", "WriteError", "Volume",
    "affine_from_world", "is_dicom_file", "is_nifti_path", "read", "read_dicom",
    "read_nifti", "reorient", "voxel_spacing", "world_scale_translate",
    "write_dicom_series", "write_nifti", "can_read",
]


def can_read(path) -> bool:
    """Cheap check: is ``path`` something :func:`read` should try?"""
    path = Path(path)
    if path.is_dir():
        return True
    if is_nifti_path(path):
        return True
    if path.name.upper() == "DICOMDIR" or path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return True
    return path.is_file() and is_dicom_file(path)


def read(path) -> list[Volume]:
    """Read a NIfTI file, a DICOM file, a DICOM folder (tree) or a DICOMDIR.

    Returns
    -------
    list of Volume
        One per series (a NIfTI file is one series).

    Raises
    ------
    ReadError
        With a message naming the path and the reason.
    """
    path = Path(path)
    if not path.exists():
        raise ReadError(f"{path}: no such file or folder")
    if is_nifti_path(path):
        return [read_nifti(path)]
    if path.is_dir() or is_dicom_file(path) or path.name.upper() == "DICOMDIR":
        return read_dicom(path)
    raise ReadError(
        f"{path}: not a NIfTI (.nii, .nii.gz) or DICOM file "
        "(no DICOM preamble and not a DICOM data set)"
    )
