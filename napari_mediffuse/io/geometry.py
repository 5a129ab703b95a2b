"""Grid geometry shared by readers, writers and the napari layers.

Two questions are answered here, both with plain NumPy/SciPy (no Qt):

* **Layout** (:func:`dcm2niix_layout`): the array layout a volume is written
  back in. Readers put every volume in the display orientation ``(S, P, L)``
  (see :mod:`napari_mediffuse.io.volume`) and record the layout it came in as
  three axis codes (``Volume.layout``): the file's own for NIfTI, the one
  dcm2niix writes for DICOM. Writers flip/permute back to it, so an output
  has exactly the input's array shape and affine.
* **Display grid** (:func:`display_grid`, :func:`resample_to_grid`): where
  napari can draw a grid. napari slices 2D views along the layer's array axes
  only: a rotation or shear that mixes the sliced axis with the displayed
  ones (an oblique MR, a gantry-tilted CT) is dropped from the drawing
  (napari warns "Non-orthogonal slicing ... not fully supported"). A grid off
  the world axes by less than a quarter voxel over its whole extent is shown
  as the nearest axis-aligned grid; any other is resampled onto an
  axis-aligned grid of the same spacing, and the original voxels and affine
  are kept for the tasks and for saving.

World coordinates are napari's: ``(S, P, L)`` millimetres,
``world = RAS_TO_WORLD @ ras``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from itertools import product

import nibabel as nib
import numpy as np
from scipy import ndimage

#: RAS -> napari world (S, P, L) axis map (orthogonal: its inverse is its transpose).
RAS_TO_WORLD = np.array([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])

#: A grid drawn without resampling may sit at most this many voxels from its
#: true place (mm / smallest spacing), anywhere in the volume.
DISPLAY_TOLERANCE_VOXELS = 0.25


def world_affine(affine: np.ndarray) -> np.ndarray:
    """Index -> napari world ``(S, P, L)`` mm, from an index -> RAS affine."""
    out = np.eye(4)
    out[:3] = RAS_TO_WORLD @ np.asarray(affine, dtype=float)[:3]
    return out


def ras_affine(world: np.ndarray) -> np.ndarray:
    """Inverse of :func:`world_affine`: index -> RAS from index -> world."""
    out = np.eye(4)
    out[:3] = RAS_TO_WORLD.T @ np.asarray(world, dtype=float)[:3]
    return out


# -- layout ---------------------------------------------------------------------------

def layout_of(affine: np.ndarray) -> tuple[str, str, str]:
    """Axis codes of an array layout (closest anatomical axes), e.g. ``('L', 'A', 'S')``."""
    return tuple(nib.aff2axcodes(np.asarray(affine, dtype=float)))


def dcm2niix_layout(stack_affine: np.ndarray) -> tuple[str, str, str]:
    """Axis codes of the array dcm2niix writes for a DICOM stack.

    Parameters
    ----------
    stack_affine : ndarray, shape (4, 4)
        Index ``(slice, row, column)`` -> RAS mm of the stack as read.

    Returns
    -------
    tuple of str
        dcm2niix's layout: axis 0 along a row (the row cosines), axis 1 up
        the columns (rows stored bottom first), axis 2 along the slice normal
        ``row x column`` (checked against dcm2niix 1.0.2026 for axial,
        sagittal, coronal, oblique and tilted stacks).
    """
    a = np.asarray(stack_affine, dtype=float)[:3, :3]
    slice_step, row_step, column_step = a[:, 0], a[:, 1], a[:, 2]
    # LPS -> RAS is a rotation, so the normal row x column keeps its form in RAS.
    normal = np.cross(column_step, row_step)
    sign = 1.0 if float(np.dot(slice_step, normal)) >= 0 else -1.0
    layout = np.eye(4)
    layout[:3, :3] = np.column_stack([column_step, -row_step, sign * slice_step])
    return layout_of(layout)


def dicom_stack_layout(layout) -> tuple[str, str, str]:
    """Axis codes ``(slice, row, column)`` of the DICOM stack that dcm2niix
    converts to ``layout`` (the inverse of :func:`dcm2niix_layout`): slices
    along dcm2niix's axis 2, rows down its axis 1 reversed, columns along its
    axis 0. A derived series written in this stack converts, with dcm2niix,
    to the source series' layout."""
    opposite = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}
    first, second, third = (str(code) for code in layout)
    return (third, opposite[second], first)


# -- display grid -----------------------------------------------------------------------

@dataclass(frozen=True)
class DisplayGrid:
    """How napari shows a grid.

    Attributes
    ----------
    affine : ndarray, shape (4, 4)
        Index -> RAS mm of the grid napari draws; its world matrix is
        diagonal (positive spacing on the world axes), so napari's ``scale``
        and ``translate`` are the whole transform.
    shape : tuple of int
        Spatial shape of the drawn grid.
    resample : bool
        True when the voxels must be resampled onto it (see
        :data:`DISPLAY_TOLERANCE_VOXELS`); False when they are drawn as they
        are, at most ``error_mm`` from their true place.
    error_mm : float
        Largest distance (mm) between a voxel centre's true place and where
        napari would draw it without resampling.
    obliquity_deg : float
        Largest angle (degrees) between an array axis and its world axis.
    """

    affine: np.ndarray
    shape: tuple
    resample: bool
    error_mm: float
    obliquity_deg: float


def display_grid(affine: np.ndarray, shape, *, tolerance: float = DISPLAY_TOLERANCE_VOXELS) -> DisplayGrid:
    """The axis-aligned grid napari draws for a grid in display orientation.

    Parameters
    ----------
    affine : ndarray, shape (4, 4)
        Index -> RAS mm of a grid whose axes are closest to ``(S, P, L)``.
    shape : sequence of int
        Its spatial shape.
    tolerance : float
        Largest misplacement accepted without resampling, in voxels of the
        smallest spacing.

    Returns
    -------
    DisplayGrid
        Same spacing (mm) as ``affine`` along each axis. Without resampling
        the grid keeps the volume's centre exactly; with resampling it covers
        every voxel centre of the original grid.
    """
    shape = np.asarray(shape[-3:], dtype=float)
    world = world_affine(affine)
    linear, origin = world[:3, :3], world[:3, 3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(np.diag(linear) <= 0):
        raise ValueError("display_grid needs a grid in display orientation (S, P, L); reorient it first")
    cosines = np.clip(np.diag(linear) / spacing, -1.0, 1.0)
    obliquity = float(np.degrees(np.arccos(cosines.min())))
    corners = np.array(list(product(*[(0.0, n - 1.0) for n in shape])))
    centre = (shape - 1.0) / 2.0
    straight = np.diag(spacing)
    # Drawn as `straight` about the centre: the misplacement of each corner.
    error = float(np.linalg.norm((corners - centre) @ (linear - straight).T, axis=1).max())
    if error <= tolerance * spacing.min():
        out = np.eye(4)
        out[:3, :3] = straight
        out[:3, 3] = origin + (linear - straight) @ centre
        return DisplayGrid(ras_affine(out), tuple(int(n) for n in shape), False, error, obliquity)
    points = corners @ linear.T + origin
    low, high = points.min(axis=0), points.max(axis=0)
    n = np.floor((high - low) / spacing + 1e-6).astype(int) + 1
    out = np.eye(4)
    out[:3, :3] = straight
    out[:3, 3] = low
    return DisplayGrid(ras_affine(out), tuple(int(v) for v in n), True, error, obliquity)


def resample_to_grid(data: np.ndarray, affine: np.ndarray, grid_affine: np.ndarray, grid_shape, *,
                     order: int, cval: float = 0.0) -> np.ndarray:
    """Values of ``data`` (on ``affine``) at the voxel centres of another grid.

    Parameters
    ----------
    data : ndarray
        Last three axes spatial; leading axes (time) are resampled one by one.
    affine, grid_affine : ndarray, shape (4, 4)
        Index -> RAS mm of the data and of the target grid.
    grid_shape : sequence of int
        Spatial shape of the target grid.
    order : int
        Spline order: 1 (linear) for images, 0 (nearest) for labels.
    cval : float
        Value outside the data (air for CT, 0 for labels).

    Returns
    -------
    ndarray
        ``data.shape[:-3] + grid_shape``, the data's dtype (integers rounded).
    """
    index_map = np.linalg.inv(np.asarray(affine, dtype=float)) @ np.asarray(grid_affine, dtype=float)
    lead = data.shape[:-3]
    grid_shape = tuple(int(n) for n in grid_shape[-3:])
    flat = np.asarray(data).reshape((-1,) + data.shape[-3:])
    out = np.empty((flat.shape[0],) + grid_shape, dtype=data.dtype)
    for t in range(flat.shape[0]):
        ndimage.affine_transform(flat[t], index_map[:3, :3], offset=index_map[:3, 3], output_shape=grid_shape,
                                 output=out[t], order=order, mode="constant", cval=cval, prefilter=False)
    return out.reshape(lead + grid_shape)


def fingerprint(data: np.ndarray) -> str:
    """Hash of an array's values and shape: tells whether a layer was edited."""
    data = np.ascontiguousarray(data)
    digest = hashlib.blake2b(str((data.shape, data.dtype.str)).encode(), digest_size=16)
    digest.update(memoryview(data.reshape(-1)).cast("B"))
    return digest.hexdigest()
