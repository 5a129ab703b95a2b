"""Conversion between :class:`~napari_mediffuse.io.Volume` and napari layers.

Qt-free: builds napari "layer data tuples" and reads napari layer objects
duck-typed (``data``, ``scale``, ``translate``, ``metadata``, and ``rotate``,
``shear``, ``affine`` when present), so the CLI and tests can use it without
a viewer.

Every layer lives in one world frame, ``(S, P, L)`` millimetres, and is
drawn on an axis-aligned grid, so its ``scale`` and ``translate`` are its
whole index-to-world transform (napari slices 2D views along the array axes
only). An oblique or gantry-tilted volume is resampled onto an axis-aligned
grid of the same spacing for display (linear for images, nearest for
labels); the layer metadata keeps the original voxels (``grid_data``) and
affine, which :func:`layer_to_volume` gives back to the tasks and writers.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .display import default_contrast_limits, value_range
from .io.geometry import display_grid, fingerprint, ras_affine, resample_to_grid
from .io.volume import DISPLAY_AXCODES, Volume, affine_from_world, axcodes, reorient, slab_affine

#: Metadata keys every layer of this plugin carries (geometry, not provenance).
GEOMETRY_KEYS = ("affine", "display_affine", "layout", "modality", "spacing", "source_path",
                 "grid_data", "grid_fingerprint")


def image_layer_data(volume: Volume, **overrides) -> tuple[np.ndarray, dict[str, Any], str]:
    """napari ``(data, kwargs, 'image')`` tuple for a volume.

    CT opens in the soft-tissue window and MR in a robust percentile window;
    the slider range covers all values so the user can widen the window. An
    oblique grid is shown resampled (linear), with a note in
    ``metadata['warnings']`` and ``metadata['display_note']``.
    """
    data, kwargs = _layer_parts(volume, order=1)
    limits = default_contrast_limits(volume.data, volume.modality)
    kwargs.update(
        colormap="gray",
        contrast_limits=limits,
        blending="translucent",
        interpolation2d="nearest",
    )
    kwargs["metadata"]["contrast_limits_range"] = value_range(volume.data)
    kwargs.update(overrides)
    return (data, kwargs, "image")


def labels_layer_data(volume: Volume, **overrides) -> tuple[np.ndarray, dict[str, Any], str]:
    """napari ``(data, kwargs, 'labels')`` tuple for an integer mask volume
    (an oblique grid is shown resampled, nearest label)."""
    if volume.data.dtype == bool:
        volume = volume.with_data(volume.data.astype(np.uint8))
    data, kwargs = _layer_parts(volume, order=0)
    kwargs.update(_segment_display(volume.metadata.get("segments")))
    kwargs.update(overrides)
    return (data, kwargs, "labels")


def _segment_display(segments: dict | None) -> dict[str, Any]:
    """napari ``colormap`` and ``features`` for DICOM SEG segments
    (``{number: {'label', 'color' (RGB 0-255)}}``): each segment keeps its
    recommended colour, and its name shows in the status bar."""
    if not segments:
        return {}
    numbers = sorted(int(n) for n in segments)
    kwargs: dict[str, Any] = {"features": {
        "index": [0] + numbers,
        "segment": ["background"] + [str(segments[n].get("label", n)) for n in numbers]}}
    colors = {n: segments[n]["color"] for n in numbers if segments[n].get("color")}
    if colors:
        colormap = {None: [0.0, 0.0, 0.0, 0.0], 0: [0.0, 0.0, 0.0, 0.0]}
        colormap.update({n: [c / 255.0 for c in rgb] + [1.0] for n, rgb in colors.items()})
        kwargs["colormap"] = colormap
    return kwargs


def display_note(layer_data: tuple) -> str | None:
    """The note saying a layer tuple was resampled for display, if it was."""
    return (layer_data[1].get("metadata") or {}).get("display_note")


def _layer_parts(volume: Volume, *, order: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Layer data on napari's axis-aligned grid, and its kwargs."""
    if axcodes(volume.affine) != DISPLAY_AXCODES:  # lossless; the layout is kept for saving
        data, affine = reorient(volume.data, volume.affine)
        volume = volume.with_data(data, affine=affine)
    grid = display_grid(volume.affine, volume.spatial_shape)
    kwargs = volume.napari_kwargs()
    meta = kwargs["metadata"]
    if not grid.resample:
        return volume.data, kwargs
    cval = 0.0 if order == 0 else float(np.nanmin(volume.data)) if volume.data.size else 0.0
    shown = resample_to_grid(volume.data, volume.affine, grid.affine, grid.shape, order=order, cval=cval)
    note = (f"{volume.name}: its grid is {grid.obliquity_deg:.1f} degrees off the patient axes "
            f"(oblique or gantry-tilted); napari draws 2D slices only along the array axes, so it is shown "
            f"resampled onto an axis-aligned {' x '.join(f'{s:.3g}' for s in volume.spacing)} mm grid "
            f"({'nearest label' if order == 0 else 'linear'}). Tasks and saving use the original voxels.")
    meta.update(grid_data=volume.data, grid_fingerprint=fingerprint(shown), display_affine=grid.affine,
                display_note=note, warnings=list(meta.get("warnings", [])) + [note])
    return shown, kwargs


def layer_to_volume(layer, *, modality: str | None = None) -> Volume:
    """Rebuild a :class:`Volume` from a napari layer (or any object with
    ``data``, ``scale``, ``translate``, ``metadata`` and ``name``).

    When the layer still sits where this plugin put it, the exact geometry
    comes back: the ``affine`` in its metadata and, for a layer resampled for
    display, the original voxels (or, if the layer was edited, its voxels
    resampled back onto the original grid: nearest for integer data, linear
    otherwise). Otherwise (a layer from elsewhere, or one the user moved) the
    affine is the layer's own index-to-world transform (world axes (S, P, L)
    mm, see :mod:`napari_mediffuse.io.volume`).
    """
    data = np.asarray(layer.data)
    if data.ndim < 3:
        raise ValueError(
            f"layer {layer.name!r} is {data.ndim}D {data.shape}: a CT/MR volume needs 3 dimensions"
        )
    layer_meta = dict(getattr(layer, "metadata", None) or {})
    drawn = layer_affine(layer)
    affine = _matrix(layer_meta.get("affine"))
    shown = _matrix(layer_meta.get("display_affine"))
    shown = affine if shown is None else shown
    notes = []
    if affine is None or shown is None or not np.allclose(drawn, shown, atol=1e-3):
        affine = drawn  # the plugin's geometry does not describe this layer (any more)
    elif layer_meta.get("grid_data") is not None:
        original = np.asarray(layer_meta["grid_data"])
        if fingerprint(data) == layer_meta.get("grid_fingerprint"):
            data = original
        else:
            integer = data.dtype.kind in "biu"
            data = resample_to_grid(data, shown, affine, original.shape[-3:], order=0 if integer else 1,
                                    cval=0.0 if integer else float(np.nanmin(data)))
            notes.append(f"{layer.name}: edited on its display grid; resampled back onto its original "
                         f"oblique grid ({'nearest' if integer else 'linear'})")
    layout = layer_meta.get("layout")
    metadata = _plain_metadata(layer_meta)
    if notes:
        metadata["warnings"] = list(metadata.get("warnings", [])) + notes
    return Volume(
        data=data,
        affine=affine,
        modality=modality or layer_meta.get("modality", "OT"),
        name=layer.name,
        source=str(layer_meta.get("source_path", "")),
        metadata=metadata,
        layout=tuple(layout) if layout is not None else None,
    )


def onto_source_grid(volume: Volume, layer) -> Volume:
    """A volume on the grid ``layer`` is drawn on (a mask the user painted
    over an oblique layer shown resampled), moved onto the layer's original
    grid, the one :func:`layer_to_volume` gives the tasks: nearest for
    integer data, linear otherwise. Any other volume is returned as it is."""
    meta = getattr(layer, "metadata", None) or {}
    shown, affine = _matrix(meta.get("display_affine")), _matrix(meta.get("affine"))
    if meta.get("grid_data") is None or shown is None or affine is None:
        return volume
    if volume.data.shape[-3:] != np.asarray(layer.data).shape[-3:] or not np.allclose(volume.affine, shown, atol=1e-3):
        return volume
    integer = volume.data.dtype.kind in "biu"
    data = resample_to_grid(volume.data, shown, affine, np.asarray(meta["grid_data"]).shape[-3:],
                            order=0 if integer else 1, cval=0.0 if integer else float(np.nanmin(volume.data)))
    return volume.with_data(data, affine=affine, layout=meta.get("layout"))


def series_grid(layer) -> Volume | None:
    """The grid a scan layer of a DICOM series is drawn on, for painting a
    DICOM SEG of that series onto it (``io.read(path, loaded=...)``, see
    :func:`napari_mediffuse.io.dicom.seg.read_segmentation`).

    A data-less volume (zero-stride zeros) named like the layer, with its
    ``series_instance_uid``. For a layer resampled for display (oblique or
    tilted) it is the original grid: a labels volume on it is shown
    resampled onto the very display grid of the layer (the same affine and
    shape give the same grid) and gives the tasks the original voxels, as
    the layer does. A layer moved in napari gives the grid it is drawn on.
    None for a layer without a series, a localizer, a labels layer, one with
    fewer than three dimensions or a multiscale one.
    """
    meta = dict(getattr(layer, "metadata", None) or {})
    uid = meta.get("series_instance_uid")
    if not uid or meta.get("localizer") or meta.get("layer_type") == "labels" \
            or getattr(layer, "multiscale", False):
        return None
    shape = np.shape(layer.data)
    if len(shape) < 3:
        return None
    drawn = layer_affine(layer)
    affine, shown = _matrix(meta.get("affine")), _matrix(meta.get("display_affine"))
    if meta.get("grid_data") is not None and affine is not None and shown is not None \
            and np.allclose(drawn, shown, atol=1e-3):
        affine, spatial = affine, np.shape(meta["grid_data"])[-3:]
    else:
        affine, spatial = drawn, shape[-3:]
    return Volume(data=np.broadcast_to(np.zeros((), np.uint8), tuple(spatial)), affine=affine,
                  modality=meta.get("modality", "OT"), name=str(layer.name),
                  metadata={"series_instance_uid": str(uid)}, layout=meta.get("layout"))


def loaded_series_grids(layers) -> list[Volume]:
    """:func:`series_grid` of each image layer that has one: the visible
    layers first, then in the layers' order. A layer whose geometry cannot be
    read is left out (it is no candidate; nothing is changed)."""
    found = []
    for order, layer in enumerate(layers):
        try:
            grid = series_grid(layer)
        except Exception:
            grid = None
        if grid is not None:
            found.append((not getattr(layer, "visible", True), order, grid))
    return [grid for _, _, grid in sorted(found, key=lambda item: item[:2])]


def layer_affine(layer) -> np.ndarray:
    """Index -> RAS mm affine of a layer's last three axes, from everything
    napari composes into its data-to-world transform (``affine`` after
    ``translate``, ``rotate``, ``shear`` and ``scale``)."""
    ndim = np.asarray(layer.data).ndim
    scale = np.asarray(getattr(layer, "scale", None) if getattr(layer, "scale", None) is not None
                       else (1.0,) * ndim, dtype=float)
    translate = np.asarray(getattr(layer, "translate", None) if getattr(layer, "translate", None) is not None
                           else (0.0,) * ndim, dtype=float)
    rotate, shear, extra = getattr(layer, "rotate", None), getattr(layer, "shear", None), getattr(layer, "affine", None)
    if rotate is None and shear is None and extra is None:
        return affine_from_world(scale, translate)
    from napari.utils.transforms import Affine, CompositeAffine

    composite = CompositeAffine(scale=scale, translate=translate, rotate=rotate, shear=shear, ndim=ndim)
    if extra is not None and not isinstance(extra, Affine):
        extra = Affine(affine_matrix=np.asarray(extra, dtype=float), ndim=ndim)
    matrix = composite.affine_matrix if extra is None else extra.affine_matrix @ composite.affine_matrix
    world = np.eye(4)
    world[:3, :3] = matrix[-4:-1, -4:-1]
    world[:3, 3] = matrix[-4:-1, -1]
    return ras_affine(world)


def world_to_grid_index(layer, world_point) -> np.ndarray:
    """Index (float) in the grid :func:`layer_to_volume` returns of a world
    point (S, P, L mm, the last three values of ``world_point``)."""
    meta = getattr(layer, "metadata", None) or {}
    affine = _matrix(meta.get("affine"))
    if affine is None or meta.get("grid_data") is None:
        affine = layer_affine(layer)
    ras = ras_affine(np.eye(4)) @ np.append(np.asarray(world_point, dtype=float)[-3:], 1.0)
    return (np.linalg.inv(affine) @ ras)[:3]


def _plain_metadata(meta: dict) -> dict:
    """Layer metadata without the geometry keys and the display note (a
    volume gets its geometry back in its fields; the note belongs to the layer)."""
    note = meta.get("display_note")
    out = {k: v for k, v in meta.items() if k not in GEOMETRY_KEYS + ("display_note",)}
    if note and "warnings" in out:
        out["warnings"] = [w for w in out["warnings"] if w != note]
    return out


def _matrix(value) -> np.ndarray | None:
    if value is None:
        return None
    value = np.asarray(value, dtype=float)
    return value if value.shape == (4, 4) else None


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
    """Keep slices ``start:stop`` (axis 0 of the volume's grid) of a napari
    layer data tuple.

    The translate (mm) and the affines in the metadata move with the first
    kept slice, so the result stays exactly where it was in world space; a
    tuple resampled for display is cut on its original grid and resampled
    again. Used by the panel's preview, which runs a task on a slab of slices
    (for context) and shows only the slice under the slider.
    """
    data, kwargs, kind = layer_data
    kwargs = dict(kwargs)
    meta = dict(kwargs.get("metadata") or {})
    if meta.get("grid_data") is not None:
        grid = np.asarray(meta["grid_data"])
        axis = grid.ndim - 3
        index = [slice(None)] * grid.ndim
        index[axis] = slice(start, stop)
        cut = Volume(data=np.ascontiguousarray(grid[tuple(index)]), affine=slab_affine(meta["affine"], start),
                     modality=meta.get("modality", "OT"), name=kwargs.get("name", "layer"),
                     source=str(meta.get("source_path", "")), layout=meta.get("layout"),
                     metadata=_plain_metadata(meta))
        keep = {k: v for k, v in kwargs.items() if k not in ("scale", "translate", "metadata")}
        build = labels_layer_data if kind == "labels" else image_layer_data
        return build(cut, **keep)
    scale = kwargs.get("scale") or (1.0,) * data.ndim
    translate = list(kwargs.get("translate") or (0.0,) * data.ndim)
    axis = data.ndim - 3 if data.ndim >= 3 else 0  # the slice axis of the (S, P, L) volume
    translate[axis] += start * float(scale[axis])
    kwargs["translate"] = tuple(translate)
    for key in ("affine", "display_affine"):
        if meta.get(key) is not None:
            meta[key] = slab_affine(meta[key], start)
    kwargs["metadata"] = meta
    index = [slice(None)] * data.ndim
    index[axis] = slice(start, stop)
    return np.ascontiguousarray(data[tuple(index)]), kwargs, kind
