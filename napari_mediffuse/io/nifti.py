"""NIfTI reading and writing with nibabel."""
from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InputWarning, ReadError, WriteError
from .validate import (atomic_output, check_nifti_header, check_output_file, effective_nifti_shape,
                       library_log_lines)
from .geometry import layout_of
from .derived import marks_from_nifti_description
from .labels import looks_like_label_map
from .volume import Volume, reorient

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti_path(path) -> bool:
    """True if ``path`` has a NIfTI file name (``.nii`` or ``.nii.gz``)."""
    name = str(path).lower()
    return name.endswith(NIFTI_SUFFIXES)


def nifti_description(volume: Volume) -> str:
    """The header's 80-byte ``descrip``: modality, and the marks a reader of the
    file alone must see (a synthetic image; a model run outside what it saw)."""
    meta = volume.metadata
    marks = ["SYNTHETIC"] if meta.get("synthetic") else []
    if meta.get("out_of_domain"):
        marks.append("OUT-OF-DOMAIN input")
    if meta.get("task"):
        marks.append(str(meta["task"]))
    return " ".join([f"modality={volume.modality} mediffuse"] + marks)[:79]


def guess_modality(data: np.ndarray, description: str = "") -> str:
    """Guess 'CT' or 'MR' for a NIfTI file, which stores no modality.

    The header's ``descrip`` field wins when it names one (our writer puts it
    there); otherwise a volume whose values span air (about -1000 HU) to soft
    tissue (0-100 HU) is called CT, anything else MR.
    """
    text = description.upper()
    for modality in ("CT", "MR", "PT"):
        if f"MODALITY={modality}" in text:
            return modality
    sample = np.asarray(data[..., :: max(1, data.shape[-1] // 64)], dtype=np.float64)  # no overflow
    sample = sample[np.isfinite(sample)]  # one NaN would make every percentile NaN
    if sample.size == 0:
        return "OT"
    low, median, high = np.percentile(sample, [1, 50, 99])
    if low < -500 and high > 0 and median < 500:
        return "CT"
    return "MR"


def read_nifti(path, *, modality: str | None = None) -> Volume:
    """Read a 3D or 4D NIfTI file into a :class:`Volume` in display orientation.

    Parameters
    ----------
    path : str or Path
        ``.nii`` or ``.nii.gz`` file.
    modality : str, optional
        Force the modality; guessed from the values otherwise
        (see :func:`guess_modality`).

    Returns
    -------
    Volume
        Data with scaling (scl_slope/inter) applied, spatial axes reoriented to
        (S, P, L), a 4th (time) axis moved first.

    Raises
    ------
    ReadError
        Missing, truncated or corrupt file, or not a 3D/4D image.
    """
    path = Path(path)
    header = check_nifti_header(path)  # before any voxel is read (validate.py)
    shape = effective_nifti_shape(int(d) for d in header["dim"][1:int(header["dim"][0]) + 1])
    with library_log_lines() as notes:  # nibabel's header fixes, as our warnings
        try:
            img = nib.load(str(path))
            if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
                raise ReadError(f"{path}: not a NIfTI image ({type(img).__name__})")
            raw = np.asanyarray(img.dataobj).reshape(shape)
        except ReadError:
            raise
        except MemoryError:
            raise ReadError(f"{path}: not enough memory for {' x '.join(map(str, shape))} voxels") from None
        except Exception as exc:  # nibabel/numpy/zlib faults vary: one line, no traceback
            raise ReadError(f"{path}: cannot read NIfTI file ({type(exc).__name__}: {exc})") from None

    if raw.ndim == 2:
        raw = raw[:, :, None]
    if raw.ndim not in (3, 4):
        raise ReadError(f"{path}: {raw.ndim}D NIfTI images are not supported (3D or 4D only)")
    if raw.dtype.kind not in "biuf":
        raise ReadError(f"{path}: unsupported voxel type {raw.dtype} (RGB or complex)")

    affine = _best_affine(img)
    layout = layout_of(affine)  # the file's own layout: outputs are written back in it
    data = raw
    if data.ndim == 4:
        data = np.moveaxis(data, 3, 0)  # time first: napari slider
    data, affine = reorient(data, affine)

    descrip = _header_text(img.header.get("descrip"))
    labels = modality is None and looks_like_label_map(
        data, intent_code=int(img.header.get("intent_code", 0)), description=descrip)
    if modality is None:  # a label map (TotalSegmentator, a mask) is no MR image
        modality = "SEG" if labels else guess_modality(data, descrip)
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    metadata = {
        "nifti_description": descrip,
        "slice_thickness_mm": float(abs(np.linalg.norm(affine[:3, 0]))),
        "warnings": [f"{path.name}: {note}" for note in dict.fromkeys(notes)],
    }
    for note in metadata["warnings"]:
        warnings.warn(InputWarning(note), stacklevel=2)
    if labels:
        metadata["layer_type"] = "labels"
    metadata.update(marks_from_nifti_description(descrip))  # a saved result stays SYNTHETIC
    return Volume(data=data, affine=affine, modality=modality, name=name,
                  source=str(path), metadata=metadata, layout=layout)


def _best_affine(img) -> np.ndarray:
    """The sform when set, else the qform, else nibabel's fallback."""
    sform, scode = img.get_sform(coded=True)
    if sform is not None and scode > 0:
        return np.asarray(sform, dtype=float)
    qform, qcode = img.get_qform(coded=True)
    if qform is not None and qcode > 0:
        return np.asarray(qform, dtype=float)
    return np.asarray(img.affine, dtype=float)


def _header_text(value) -> str:
    if value is None:
        return ""
    value = np.asarray(value).item()
    if isinstance(value, bytes):
        return value.decode("latin-1", errors="replace").strip("\x00 ")
    return str(value)


def write_nifti(volume: Volume, path, *, overwrite: bool = False,
                dtype=None) -> Path:
    """Write a :class:`Volume` to NIfTI, keeping its geometry exactly.

    Parameters
    ----------
    volume : Volume
        Spatial axes last; a leading time axis is written as NIfTI's 4th axis.
    path : str or Path
        Target ``.nii`` or ``.nii.gz`` file.
    overwrite : bool
        Refuse to replace an existing file unless True.
    dtype : numpy dtype, optional
        On-disk type; the data's own type by default (bool is written uint8).

    Returns
    -------
    Path
        The written file, in ``volume.layout`` when set (the input file's
        layout: same array shape and affine as the input), else as
        ``volume.data`` is. Both sform and qform hold the affine (the qform
        to float32 precision; the sform is exact when the affine has shear,
        which a qform cannot represent).
    """
    path = Path(path)
    if not is_nifti_path(path):
        raise WriteError(f"{path}: a NIfTI file name must end in .nii or .nii.gz")
    check_output_file(path, overwrite=overwrite)  # folder, name, existing file or link
    data, affine = volume.in_layout()
    data = np.asarray(data)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    if dtype is not None:
        data = data.astype(dtype)
    if data.dtype == np.float64:
        data = data.astype(np.float32)
    if data.ndim == 4:
        data = np.moveaxis(data, 0, 3)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_sform(affine, code=1)  # scanner anatomical
    img.set_qform(affine, code=1)
    img.header["descrip"] = nifti_description(volume)
    # A unique temporary file in the target folder, renamed only when complete:
    # an interrupted or failed write leaves the user's name untouched.
    with atomic_output(path, overwrite=overwrite) as tmp:
        try:
            nib.save(img, str(tmp))
        except OSError:
            raise
        except Exception as exc:  # nibabel refusing the data: one line, nothing written
            raise WriteError(f"{path}: cannot write NIfTI ({exc}); nothing was written") from None
    return path
