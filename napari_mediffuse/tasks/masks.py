"""Masks on a volume's grid: the body, organs from a label image, ROIs drawn
in napari, and the grid checks every mask input goes through (Qt-free).

All masks are boolean arrays with the volume's spatial shape (display
orientation (S, P, L), see :mod:`napari_mediffuse.io.volume`).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np
from scipy import ndimage

from ..io.volume import Volume, affine_from_world, voxel_spacing
from .common import TaskInputError

#: TotalSegmentator v2 class indices of organs used by the anomaly evaluation
#: (``totalsegmentator/map_to_binary.py``, class map ``total``).
TOTALSEGMENTATOR_LABELS = {
    "spleen": 1,
    "kidney_right": 2,
    "kidney_left": 3,
    "gallbladder": 4,
    "liver": 5,
    "stomach": 6,
    "pancreas": 7,
    "aorta": 52,
    "inferior_vena_cava": 63,
    "autochthon_left": 86,
    "autochthon_right": 87,
    "iliopsoas_left": 88,
    "iliopsoas_right": 89,
}

#: Default CT threshold (HU) separating the body from air.
BODY_THRESHOLD_HU = -500.0


def describe_grid(shape, affine) -> str:
    """``'101 x 122 x 30 voxels, 3 x 3 x 3 mm, origin (185, 311, 94) mm'``."""
    affine = np.asarray(affine, dtype=float)
    spacing = voxel_spacing(affine)
    origin = affine[:3, 3]
    return (f"{' x '.join(str(int(n)) for n in shape)} voxels, "
            f"{' x '.join(f'{s:.4g}' for s in spacing)} mm, "
            f"origin ({', '.join(f'{o:.1f}' for o in origin)}) mm")


def check_same_grid(mask: Volume, volume: Volume, *, what: str = "mask", tol_mm: float = 1e-2) -> None:
    """Raise :class:`TaskInputError` unless ``mask`` lies on ``volume``'s grid.

    Same spatial shape and the same affine (to ``tol_mm`` millimetres on any
    voxel of the grid), so voxel ``(i, j, k)`` of both is the same place in
    the patient. The message names both grids.
    """
    same_shape = tuple(mask.data.shape[-3:]) == tuple(volume.data.shape[-3:])
    diff = np.abs(np.asarray(mask.affine, float) - np.asarray(volume.affine, float))
    # largest position error over the grid: translation + matrix error times the extent
    extent = np.asarray(volume.data.shape[-3:], dtype=float)
    worst = diff[:3, 3].max() + (diff[:3, :3] * extent).sum(axis=1).max()
    if not same_shape or worst > tol_mm:
        m_label = f"{mask.name!r}" + (f" ({mask.source})" if mask.source else "")
        v_label = f"{volume.name!r}" + (f" ({volume.source})" if volume.source else "")
        raise TaskInputError(
            f"the {what} {m_label} is on another grid than the image {v_label}: "
            f"{what} {describe_grid(mask.data.shape[-3:], mask.affine)}; "
            f"image {describe_grid(volume.data.shape[-3:], volume.affine)}. "
            f"Resample the {what} onto the image (same shape and affine); nothing was written")


def mask_from_labels(labels: np.ndarray, values: Optional[Iterable[int]] = None) -> np.ndarray:
    """Boolean mask of a label image: nonzero voxels, or those equal to ``values``."""
    labels = np.asarray(labels)
    if values is None:
        return labels != 0
    values = [int(v) for v in values]
    return np.isin(labels, values)


def mask_volume_on_grid(mask: Volume, volume: Volume, *, what: str = "mask",
                        values: Optional[Iterable[int]] = None, allow_empty: bool = False) -> np.ndarray:
    """A label/mask :class:`Volume` as a boolean array on ``volume``'s grid.

    Checks the grid (:func:`check_same_grid`) and, unless ``allow_empty``,
    that the mask selects at least one voxel.
    """
    if mask.data.ndim != 3:
        raise TaskInputError(f"the {what} {mask.name!r} must be 3D; it has shape {mask.data.shape}")
    check_same_grid(mask, volume, what=what)
    out = mask_from_labels(mask.data, values)
    if not allow_empty and not out.any():
        chosen = "" if values is None else f" with labels {sorted(set(int(v) for v in values))}"
        raise TaskInputError(f"the {what} {mask.name!r} is empty (no voxel{chosen}); "
                             "draw or choose a non-empty region; nothing was written")
    return out


def body_mask(volume: Volume, *, threshold: Optional[float] = None, opening_mm: float = 6.0) -> np.ndarray:
    """The patient's body (boolean, on the volume's grid), found automatically.

    Voxels above ``threshold`` (CT: -500 HU; other modalities: Otsu's
    threshold), opened with a ball of ``opening_mm`` diameter to cut thin
    attachments (the CT table, blankets, cables), the largest connected
    component, then every axial slice's holes filled (lungs, bowel gas) and
    the opening undone by a dilation restricted to the thresholded voxels.

    Parameters
    ----------
    volume : Volume
        A 3D scan (CT in HU).
    threshold : float, optional
        Intensity separating body from air (scanner units).
    opening_mm : float
        Diameter (mm) of the structuring element; 0 disables the opening.

    Returns
    -------
    ndarray of bool, the volume's spatial shape
    """
    data = np.asarray(volume.data, dtype=np.float32)
    if data.ndim != 3:
        raise TaskInputError(f"a body mask needs a 3D volume; {volume.name!r} has shape {data.shape}")
    if threshold is None:
        if volume.modality == "CT":
            threshold = BODY_THRESHOLD_HU
        else:
            from skimage.filters import threshold_otsu

            sample = data.ravel()[:: max(1, data.size // 1_000_000)]
            threshold = float(threshold_otsu(sample))
    raw = data > threshold
    if not raw.any():
        return raw
    structure = _ball(opening_mm, volume.spacing)
    opened = ndimage.binary_opening(raw, structure=structure) if structure is not None else raw
    if not opened.any():
        opened = raw
    labels, n = ndimage.label(opened)
    if n > 1:
        sizes = ndimage.sum_labels(opened, labels, index=np.arange(1, n + 1))
        opened = labels == (int(np.argmax(sizes)) + 1)
    if structure is not None:  # give back the boundary the opening took, not the table
        opened = ndimage.binary_dilation(opened, structure=structure) & raw | opened
    filled = np.stack([ndimage.binary_fill_holes(s) for s in opened])
    return filled


def _ball(diameter_mm: float, spacing) -> Optional[np.ndarray]:
    if diameter_mm <= 0:
        return None
    radius = [max(0, int(round(diameter_mm / 2.0 / s))) for s in spacing]
    if max(radius) == 0:
        return None
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
    dist = sum((g * s) ** 2 for g, s in zip(grids, spacing))
    return dist <= (diameter_mm / 2.0) ** 2 + 1e-6


def resolve_roi(volume: Volume, roi=None, *, what: str = "region of interest") -> np.ndarray:
    """The region of interest of a task as a boolean array on ``volume``'s grid.

    Parameters
    ----------
    volume : Volume
        The image.
    roi : None, ndarray or Volume
        ``None``: the automatic :func:`body_mask`; a boolean/label array with
        the volume's spatial shape (nonzero = inside); a :class:`Volume`
        (label image, e.g. an organ segmentation or a napari Labels layer)
        that must be on the same grid.

    Raises
    ------
    TaskInputError
        ROI empty, or on another grid (the message names both).
    """
    if roi is None:
        mask = body_mask(volume)
        if not mask.any():
            raise TaskInputError(f"no body found in {volume.name!r} (nothing above the body threshold); "
                                 "give a region of interest; nothing was written")
        return mask
    if isinstance(roi, Volume):
        return mask_volume_on_grid(roi, volume, what=what)
    mask = np.asarray(roi)
    if mask.shape != tuple(volume.data.shape[-3:]):
        raise TaskInputError(f"the {what} has shape {mask.shape}; the image {volume.name!r} has "
                             f"{tuple(volume.data.shape[-3:])} (same grid needed); nothing was written")
    mask = mask != 0
    if not mask.any():
        raise TaskInputError(f"the {what} is empty (no voxel selected); nothing was written")
    return mask


def shapes_to_mask(shapes_data: Sequence[np.ndarray], shape_types: Sequence[str], volume: Volume, *,
                   scale=None, translate=None, extrude: bool = False) -> np.ndarray:
    """Rasterise napari Shapes (polygons, rectangles, ellipses) onto a volume's grid.

    Parameters
    ----------
    shapes_data : list of (N, 3) arrays
        Vertices in the Shapes layer's data coordinates (napari
        ``layer.data``); a shape drawn on an axial slice has a constant first
        coordinate.
    shape_types : list of str
        napari ``layer.shape_type``; 'polygon', 'rectangle' and 'ellipse'
        are filled, lines and paths ignored.
    volume : Volume
        The image whose grid the mask is made on.
    scale, translate : sequence of float, optional
        The Shapes layer's scale and translate (world (S, P, L) mm); the
        volume's when omitted.
    extrude : bool
        Apply the union of all shapes to every axial slice (an ROI drawn once
        for the whole scan); otherwise each shape marks the slice it is on.
    """
    from skimage.draw import ellipse as draw_ellipse
    from skimage.draw import polygon as draw_polygon

    shape = tuple(volume.data.shape[-3:])
    vol_kwargs = volume.napari_kwargs()
    v_scale = np.asarray(vol_kwargs["scale"][-3:], float)
    v_translate = np.asarray(vol_kwargs["translate"][-3:], float)
    s_scale = v_scale if scale is None else np.asarray(scale, float)[-3:]
    s_translate = v_translate if translate is None else np.asarray(translate, float)[-3:]
    if volume.is_oblique:  # world axes differ from the grid: go through the affines
        layer_affine = affine_from_world(s_scale, s_translate)
        to_index = np.linalg.inv(volume.affine) @ layer_affine
    else:
        to_index = None
    out = np.zeros(shape, dtype=bool)
    plane = np.zeros(shape[1:], dtype=bool)
    for verts, kind in zip(shapes_data, shape_types):
        verts = np.asarray(verts, dtype=float)
        if verts.shape[-1] == 2:  # a 2D shapes layer: slice 0
            verts = np.concatenate([np.zeros((len(verts), 1)), verts], axis=1)
        verts = verts[:, -3:]
        if to_index is None:
            index = (verts * s_scale + s_translate - v_translate) / v_scale
        else:
            index = (to_index @ np.c_[verts, np.ones(len(verts))].T).T[:, :3]
        rows, cols = index[:, 1], index[:, 2]
        if kind in ("polygon", "rectangle"):
            rr, cc = draw_polygon(rows, cols, shape=shape[1:])
        elif kind == "ellipse":
            center_r, center_c = rows.mean(), cols.mean()
            rad_r = (rows.max() - rows.min()) / 2.0
            rad_c = (cols.max() - cols.min()) / 2.0
            rr, cc = draw_ellipse(center_r, center_c, max(rad_r, 0.5), max(rad_c, 0.5), shape=shape[1:])
        else:
            continue
        if extrude:
            plane[rr, cc] = True
            continue
        k = int(round(float(np.median(index[:, 0]))))
        if 0 <= k < shape[0]:
            out[k, rr, cc] = True
    if extrude:
        out[:] = plane
    return out


def roi_from_layer(layer, volume: Volume, *, extrude: bool = False) -> np.ndarray:
    """A napari Labels or Shapes layer (duck-typed) as a boolean ROI on ``volume``'s grid.

    Labels layers must be on the image's grid (same shape, scale and
    translate, checked); Shapes layers are rasterised
    (:func:`shapes_to_mask`). Raises :class:`TaskInputError` for an empty
    ROI or another grid.
    """
    from ..layers import layer_to_volume

    if hasattr(layer, "shape_type"):
        mask = shapes_to_mask(layer.data, layer.shape_type, volume, scale=layer.scale,
                              translate=layer.translate, extrude=extrude)
        if not mask.any():
            raise TaskInputError(f"the shapes in {layer.name!r} cover no voxel of {volume.name!r} "
                                 "(draw polygons, rectangles or ellipses on the image); nothing was written")
        return mask
    return resolve_roi(volume, layer_to_volume(layer), what=f"layer {layer.name!r}")
