"""Conversion between :class:`~napari_mediffuse.io.Volume` and napari layers.

Qt-free: builds napari "layer data tuples" and reads napari layer objects
duck-typed (``data``, ``scale``, ``translate``, ``metadata``), so the CLI and
tests can use it without a viewer.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .display import default_contrast_limits, value_range
from .io.volume import Volume, affine_from_world

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
