"""Conversion between :class:`~napari_mediffuse.io.Volume` and napari layers.

Qt-free: builds napari "layer data tuples" and reads napari layer objects
duck-typed (``data``, ``scale``, ``translate``, ``metadata``), so the CLI and
tests can use it without a viewer.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .display import default_contrast_limits, value_range
from .io.volume import Volume, affine_from_world, slab_affine

#: Metadata keys every image layer of this plugin carries.
GEOMETRY_KEYS = ("affine", "modality", "spacing", "source_path")


def image_layer_data(volume: Volume, **overrides) -> tuple[np.ndarray, dict[str, Any], str]:
    """napari ``(data, kwargs, 'image')`` tuple for a volume.

    CT opens in the soft-tissue window and MR in a robust percentile window;
    the slider range covers all values so the user can widen the window.
    """
    kwargs = volume.napari_kwargs()
    limits = default_contrast_limits(volume.data, volume.modality)
    kwargs.update(
        colormap="gray",
        contrast_limits=limits,
        blending="translucent",
        interpolation2d="nearest",
    )
    kwargs["metadata"]["contrast_limits_range"] = value_range(volume.data)
    kwargs.update(overrides)
    return (volume.data, kwargs, "image")


def labels_layer_data(volume: Volume, **overrides) -> tuple[np.ndarray, dict[str, Any], str]:
    """napari ``(data, kwargs, 'labels')`` tuple for an integer mask volume."""
    kwargs = volume.napari_kwargs()
    kwargs.update(overrides)
    data = volume.data
    if data.dtype == bool:
        data = data.astype(np.uint8)
    return (data, kwargs, "labels")


def layer_to_volume(layer, *, modality: str | None = None) -> Volume:
    """Rebuild a :class:`Volume` from a napari layer (or any object with
    ``data``, ``scale``, ``translate``, ``metadata`` and ``name``).

    The exact affine in ``metadata['affine']`` is used when it belongs to this
    grid (the layer was read by this plugin, or is a result on the input's
    grid); otherwise the affine is built from the layer's scale and translate
    (world axes (S, P, L) mm, see :mod:`napari_mediffuse.io.volume`).
    """
    data = np.asarray(layer.data)
    if data.ndim < 3:
        raise ValueError(
            f"layer {layer.name!r} is {data.ndim}D {data.shape}: a CT/MR volume needs 3 dimensions"
        )
    layer_meta = dict(getattr(layer, "metadata", None) or {})
    affine = layer_meta.get("affine")
    affine = None if affine is None else np.asarray(affine, dtype=float)
    if affine is None or affine.shape != (4, 4) or not _layer_matches_affine(layer, affine):
        affine = affine_from_world(layer.scale, layer.translate)
    return Volume(
        data=data,
        affine=affine,
        modality=modality or layer_meta.get("modality", "OT"),
        name=layer.name,
        source=str(layer_meta.get("source_path", "")),
        metadata={k: v for k, v in layer_meta.items() if k not in GEOMETRY_KEYS},
    )

def _layer_matches_affine(layer, affine: np.ndarray, tol: float = 1e-3) -> bool:
    """True if the layer's scale still equals the affine's voxel spacing
    (guards against a user changing scale, or a resampled result keeping the
    metadata of its input)."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    return np.allclose(np.asarray(layer.scale)[-3:], spacing, atol=tol)


def swipe_crop(data, scale, translate, *, axis: int, fraction: float):
    """The part of a layer right of a swipe line, as a view (no copy).

    Parameters
    ----------
    data : array, shape (..., N, ...)
        The layer's data.
    scale, translate : sequence of float
        The layer's scale (mm per voxel) and translate (mm), one per axis.
    axis : int
        Data axis the swipe line moves along (the horizontal screen axis).
    fraction : float
        Position of the line from the start of ``axis``, 0 to 1: voxels
        before ``round(fraction * N)`` are cut away.

    Returns
    -------
    view : array
        ``data`` without the voxels before the line along ``axis``.
    translate : tuple of float
        The translate that keeps the view's voxels where they were in world
        coordinates (mm).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"swipe position must be between 0 and 1, got {fraction}")
    n = data.shape[axis]
    start = min(int(round(fraction * n)), n - 1)  # keep one voxel so the layer stays valid
    index = [slice(None)] * data.ndim
    index[axis] = slice(start, None)
    shifted = [float(t) for t in translate]
    shifted[axis] += start * float(scale[axis])
    return data[tuple(index)], tuple(shifted)


def slice_range_layer_data(layer_data: tuple, start: int, stop: int) -> tuple:
    """Keep slices ``start:stop`` (axis 0) of a napari layer data tuple.

    The translate (mm) and the ``affine`` in the metadata move with the
    first kept slice, so the result stays exactly where it was in world
    space. Used by the panel's preview, which runs a task on a slab of
    slices (for context) and shows only the slice under the slider.
    """
    data, kwargs, kind = layer_data
    kwargs = dict(kwargs)
    scale = kwargs.get("scale") or (1.0,) * data.ndim
    translate = list(kwargs.get("translate") or (0.0,) * data.ndim)
    axis = data.ndim - 3 if data.ndim >= 3 else 0  # the slice axis of the (S, P, L) volume
    translate[axis] += start * float(scale[axis])
    kwargs["translate"] = tuple(translate)
    meta = dict(kwargs.get("metadata") or {})
    if meta.get("affine") is not None:
        meta["affine"] = slab_affine(meta["affine"], start)
    kwargs["metadata"] = meta
    index = [slice(None)] * data.ndim
    index[axis] = slice(start, stop)
    return np.ascontiguousarray(data[tuple(index)]), kwargs, kind
