"""The in-memory volume every reader returns and every task consumes.

Geometry conventions (used everywhere in napari_mediffuse):

* ``Volume.data`` is a NumPy array whose **last three axes** are spatial.
  A 4D series (fMRI, dynamic CT) has a leading non-spatial axis (time).
* ``Volume.affine`` is a 4x4 matrix mapping the spatial array index
  ``(i, j, k)`` (the last three axes, in that order) to RAS+ millimetres,
  nibabel's convention.
* Readers put volumes in the *display orientation* ``(S, P, L)``: array axis 0
  runs inferior -> superior, axis 1 anterior -> posterior, axis 2 patient
  right -> left. napari then shows axial slices by default, anterior at the
  top and the patient's right on the screen's left (the radiological
  convention), exactly like a PACS viewer. Reorienting is lossless (axis
  flips and permutations); the affine is updated so every voxel keeps its RAS
  position.
* napari world coordinates are ``(S, P, L)`` millimetres, i.e.
  ``(z, -y, -x)`` in RAS. Layers use ``scale`` = voxel spacing in mm and
  ``translate`` = world position of voxel (0, 0, 0), so layers of different
  scans of one patient overlay in the scanner frame.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import nibabel as nib
from nibabel import orientations as nio

#: Axis codes of the display orientation (see module docstring).
DISPLAY_AXCODES = ("S", "P", "L")

#: RAS -> napari world (S, P, L) axis map.
RAS_TO_WORLD = np.array([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])


@dataclass
class Volume:
    """A scan (or a result) with its geometry.

    Parameters
    ----------
    data : ndarray
        Voxel values; last three axes spatial. CT in Hounsfield units.
    affine : ndarray, shape (4, 4)
        Spatial array index -> RAS+ millimetres.
    modality : str
        DICOM-style modality code: ``'CT'``, ``'MR'``, ``'OT'`` (unknown), ...
    name : str
        Human-readable layer name.
    source : str
        Path the data came from ('' for computed volumes).
    metadata : dict
        Extra information: DICOM series tags, slice thickness (mm), warnings,
        provenance of derived results.
    """

    data: np.ndarray
    affine: np.ndarray
    modality: str = "OT"
    name: str = "volume"
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.affine = np.asarray(self.affine, dtype=float)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")
        if self.data.ndim < 3:
            raise ValueError(
                f"a Volume needs at least 3 dimensions, got shape {self.data.shape}"
            )

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """Shape of the three spatial axes."""
        return tuple(int(s) for s in self.data.shape[-3:])

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing in mm along the three spatial array axes."""
        return voxel_spacing(self.affine)

    @property
    def is_oblique(self) -> bool:
        """True when the array axes are not aligned with the patient axes."""
        return is_oblique(self.affine)

    def with_data(self, data: np.ndarray, **changes) -> "Volume":
        """A copy with new voxel values on the same grid (metadata copied)."""
        if data.shape[-3:] != self.data.shape[-3:] and "affine" not in changes:
            raise ValueError(
                f"new data {data.shape} is not on the grid {self.data.shape[-3:]}"
            )
        return replace(self, data=data, metadata=dict(self.metadata), **changes)

    def slab(self, start: int, stop: int) -> "Volume":
        """Slices ``start:stop`` along axis 0, with the affine moved so every
        kept voxel stays at the same world position (mm)."""
        return self.with_data(self.data[start:stop], affine=slab_affine(self.affine, start))

    def napari_kwargs(self) -> dict[str, Any]:
        """``scale``, ``translate`` and ``metadata`` for a napari layer."""
        scale, translate = world_scale_translate(self.affine)
        extra = self.data.ndim - 3
        scale = (1.0,) * extra + scale
        translate = (0.0,) * extra + translate
        meta = dict(self.metadata)
        meta.update(
            affine=self.affine.copy(),
            modality=self.modality,
            spacing=self.spacing,
            source_path=self.source,
        )
        return {"name": self.name, "scale": scale, "translate": translate, "metadata": meta}


def slab_affine(affine: np.ndarray, start: int) -> np.ndarray:
    """Affine of the slices from ``start`` on (axis 0): same voxel axes, the
    origin moved to voxel ``(start, 0, 0)``, so kept voxels stay in place (mm)."""
    out = np.array(affine, dtype=float)
    out[:3, 3] = (out @ np.array([start, 0.0, 0.0, 1.0]))[:3]
    return out


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing (mm) along each array axis: norms of the affine columns."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def is_oblique(affine: np.ndarray, tol: float = 1e-3) -> bool:
    """True if any array axis is off the RAS axes by more than ``tol`` (cosine)."""
    cosines = np.asarray(affine)[:3, :3] / np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    return bool(np.any(np.abs(np.abs(cosines).max(axis=0) - 1.0) > tol))


def world_scale_translate(affine: np.ndarray) -> tuple[tuple, tuple]:
    """napari ``scale`` and ``translate`` (world = (S, P, L) mm) of an affine.

    The scale is the voxel spacing; the translate is the world position of
    voxel (0, 0, 0). For a volume in display orientation the world axes match
    the array axes; an oblique rotation is not representable by scale and
    translate and is dropped for display only (the exact affine stays in the
    layer metadata).
    """
    affine = np.asarray(affine, dtype=float)
    origin_world = RAS_TO_WORLD @ affine[:3, 3]
    return voxel_spacing(affine), tuple(float(v) for v in origin_world)


def affine_from_world(scale, translate) -> np.ndarray:
    """Inverse of :func:`world_scale_translate` for an axis-aligned layer.

    Builds the index -> RAS affine of a napari layer in display orientation
    from its ``scale`` and ``translate`` (last three axes).
    """
    scale = np.asarray(scale, dtype=float)[-3:]
    translate = np.asarray(translate, dtype=float)[-3:]
    world_to_ras = RAS_TO_WORLD.T  # orthogonal
    affine = np.eye(4)
    affine[:3, :3] = world_to_ras @ np.diag(scale)
    affine[:3, 3] = world_to_ras @ translate
    return affine


def reorient(data: np.ndarray, affine: np.ndarray, axcodes=DISPLAY_AXCODES):
    """Flip/permute the last three axes of ``data`` to ``axcodes``.

    Lossless: returns ``(data, affine)`` with the affine updated so that each
    voxel keeps its RAS position. Oblique volumes go to the closest axes.
    """
    affine = np.asarray(affine, dtype=float)
    current = nio.io_orientation(affine)
    target = nio.axcodes2ornt(axcodes)
    transform = nio.ornt_transform(current, target)
    spatial_shape = data.shape[-3:]
    lead = data.ndim - 3
    # apply_orientation works on the first axes: move spatial axes first.
    moved = np.moveaxis(data, list(range(lead, data.ndim)), [0, 1, 2]) if lead else data
    moved = nio.apply_orientation(moved, transform)
    out = np.moveaxis(moved, [0, 1, 2], list(range(lead, data.ndim))) if lead else moved
    new_affine = affine @ nio.inv_ornt_aff(transform, spatial_shape)
    return np.ascontiguousarray(out), new_affine


def axcodes(affine: np.ndarray) -> tuple[str, str, str]:
    """Closest anatomical axis codes of an affine, e.g. ``('R', 'A', 'S')``."""
    return tuple(nib.aff2axcodes(affine))
