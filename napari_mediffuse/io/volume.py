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
* ``Volume.layout`` records the array layout the volume came in (axis codes
  such as ``('L', 'A', 'S')``: the file's own for NIfTI, dcm2niix's for
  DICOM). Writers put the array back in that layout, so an output file has
  exactly the input's array shape and affine; results of tasks carry their
  source's layout.
* napari world coordinates are ``(S, P, L)`` millimetres, i.e.
  ``(z, -y, -x)`` in RAS, for every layer of the plugin. napari draws 2D
  slices along the array axes only, so every layer is shown on an
  axis-aligned grid: ``scale`` = voxel spacing in mm and ``translate`` =
  world position of voxel (0, 0, 0) are then its whole index-to-world
  transform. An oblique or gantry-tilted grid is resampled for display onto
  an axis-aligned grid of the same spacing (see
  :mod:`napari_mediffuse.io.geometry`); the original voxels and affine stay
  in the layer metadata for the tasks and for saving. Layers of different
  scans of one patient overlay in the scanner frame.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import nibabel as nib
from nibabel import orientations as nio

from .geometry import RAS_TO_WORLD, display_grid

#: Axis codes of the display orientation (see module docstring).
DISPLAY_AXCODES = ("S", "P", "L")


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
    layout : tuple of str, optional
        Axis codes of the array layout to write the volume in (the input
        file's, e.g. ``('L', 'A', 'S')``); None writes ``data`` as it is.
    """

    data: np.ndarray
    affine: np.ndarray
    modality: str = "OT"
    name: str = "volume"
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    layout: tuple[str, str, str] | None = None

    def __post_init__(self):
        self.affine = np.asarray(self.affine, dtype=float)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")
        if self.data.ndim < 3:
            raise ValueError(
                f"a Volume needs at least 3 dimensions, got shape {self.data.shape}"
            )
        if self.layout is not None:
            self.layout = tuple(str(code) for code in self.layout)
            if len(self.layout) != 3 or sorted(nio.axcodes2ornt(self.layout)[:, 0].tolist()) != [0, 1, 2]:
                raise ValueError(f"layout must be three axis codes such as ('L', 'A', 'S'), got {self.layout}")

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
        kept voxel stays at the same world position (mm).

        ``metadata['slice_offset']`` records where the slab starts in the
        scan: tasks key each slice's noise by its index in the scan, so a slab
        (the panel's preview) gives the same slices as the whole run."""
        out = self.with_data(self.data[start:stop], affine=slab_affine(self.affine, start))
        out.metadata["slice_offset"] = int(self.metadata.get("slice_offset", 0)) + int(start)
        return out

    def in_layout(self) -> tuple[np.ndarray, np.ndarray]:
        """``(data, affine)`` in :attr:`layout` (as they are when it is None).

        Lossless flips and permutations; every voxel keeps its RAS position.
        """
        if self.layout is None:
            return self.data, self.affine
        return reorient(self.data, self.affine, self.layout)

    def napari_kwargs(self) -> dict[str, Any]:
        """``scale``, ``translate`` and ``metadata`` for a napari layer of ``data``.

        For a grid napari can draw as it is (see
        :func:`~napari_mediffuse.io.geometry.display_grid`); an oblique grid
        must be resampled first (:func:`napari_mediffuse.layers.image_layer_data`
        does). The metadata holds the exact ``affine``, the ``layout`` to save
        in, and ``display_affine``: what ``scale`` and ``translate`` say.
        """
        grid = display_grid(self.affine, self.spatial_shape)
        scale, translate = world_scale_translate(grid.affine)
        extra = self.data.ndim - 3
        scale = (1.0,) * extra + scale
        translate = (0.0,) * extra + translate
        meta = dict(self.metadata)
        meta.update(
            affine=self.affine.copy(),
            display_affine=grid.affine,
            layout=self.layout,
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
    voxel (0, 0, 0). Exact for an axis-aligned grid in display orientation
    (what every layer of the plugin shows, see
    :func:`~napari_mediffuse.io.geometry.display_grid`).
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
