"""npe2 reader, writer and sample-data contributions (see napari.yaml).

These are thin adapters over :mod:`napari_mediffuse.io`: errors become napari
notifications instead of tracebacks, and nothing already loaded is touched.
"""
from __future__ import annotations

import logging
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from . import io
from .io.volume import Volume
from .layers import (
    display_note, image_layer_data, labels_layer_data, layer_to_volume, loaded_series_grids,
)

log = logging.getLogger(__name__)

#: The sample CT shipped in the package (credit in data/sample/README.md).
SAMPLE_CT = "abdomen_ct_3mm.nii.gz"

_NULL_LAYER = [(None,)]  # napari's "read fine, nothing to add" sentinel


def sample_ct_path() -> Path:
    """Path of the bundled abdominal CT (NIfTI, HU, 3 mm)."""
    return Path(str(resources.files("napari_mediffuse") / "data" / "sample" / SAMPLE_CT))


def _notify_warning(message: str) -> None:
    log.warning(message)
    try:
        from napari.utils.notifications import show_warning
    except ImportError:  # napari not installed: headless use
        return
    show_warning(message)


def _with_display_notes(layers: list[tuple]) -> list[tuple]:
    """Notify, for each layer an oblique grid made us resample for display, that it was."""
    for layer in layers:
        if display_note(layer):
            _notify_warning(display_note(layer))
    return layers


def _notify_error(message: str) -> None:
    log.error(message)
    try:
        from napari.utils.notifications import show_error
    except ImportError:  # napari not installed: headless use
        return
    show_error(message)


# -- reader -----------------------------------------------------------------

def get_reader(path):
    """npe2 reader hook: a reader function if ``path`` looks like ours.

    Never raises (npe2 would show a traceback): an odd path is either declined
    or offered, and then :func:`read_layers` says what is wrong with it.
    """
    try:
        if isinstance(path, (list, tuple)):
            if len(path) != 1:
                return None  # stacks of files: a DICOM folder is the way to pass a series
            path = path[0]
        if not io.can_read(path):
            return None
    except Exception:  # a path object npe2 passes that we cannot even inspect
        return None
    return read_layers


def read_layers(path) -> list[tuple]:
    """Read ``path`` into napari layer data.

    Every failure (a bad file, a library error, running out of memory)
    becomes one notification naming the file and the reason; napari's layers
    already loaded are never touched.
    """
    if isinstance(path, (list, tuple)):
        path = path[0] if path else ""
    try:
        # a SEG dropped alone goes on the grid of its series if that is loaded
        volumes = io.read(path, loaded=_viewer_series_grids())
        return _with_display_notes([_layer_data(v) for v in volumes])
    except io.ReadError as exc:
        _notify_error(str(exc))
    except MemoryError:
        _notify_error(f"{path}: not enough memory to read it")
    except Exception as exc:  # a fault no check foresaw: still one line, never a traceback into napari
        log.debug("reading %s failed", path, exc_info=True)
        _notify_error(f"{path}: cannot read ({type(exc).__name__}: {exc})")
    return _NULL_LAYER


def _viewer_series_grids() -> list[Volume]:
    """Grids of the DICOM series loaded in the current napari viewer (none
    headless), for a SEG whose series is not read with it
    (:func:`~napari_mediffuse.layers.series_grid`)."""
    if "napari._qt.qt_main_window" not in sys.modules:  # no viewer was ever made: headless
        return []
    try:
        import napari

        viewer = napari.current_viewer()
        if viewer is None:
            return []
        return loaded_series_grids([layer for layer in viewer.layers
                                    if isinstance(layer, napari.layers.Image)])
    except Exception:  # never let a viewer oddity stop the read: the SEG then opens on its own frame
        log.debug("listing the loaded series failed", exc_info=True)
        return []


def _layer_data(volume: Volume) -> tuple:
    """Labels for a segmentation; an image otherwise, a localizer hidden
    (listed apart: it is there to look at, not drawn over the scan)."""
    if volume.metadata.get("layer_type") == "labels":
        return labels_layer_data(volume)
    if volume.metadata.get("localizer"):
        return image_layer_data(volume, visible=False)
    return image_layer_data(volume)


# -- writers ----------------------------------------------------------------

def write_image(path: str, data: Any, attributes: dict) -> list[str]:
    """npe2 single-layer writer: an image layer to NIfTI, geometry kept."""
    return [str(io.write_nifti(_volume_from_layer_data(data, attributes), path))]


def write_labels(path: str, data: Any, attributes: dict) -> list[str]:
    """npe2 single-layer writer: a labels layer to an integer NIfTI."""
    volume = _volume_from_layer_data(np.asarray(data), attributes)
    return [str(io.write_nifti(volume, path, dtype=_smallest_label_dtype(volume.data)))]


def _smallest_label_dtype(data: np.ndarray):
    top = int(data.max()) if data.size else 0
    for dtype in (np.uint8, np.uint16, np.int32):
        if top <= np.iinfo(dtype).max:
            return dtype
    return np.int64


class _LayerView:
    """Duck-typed layer built from npe2 writer arguments."""

    def __init__(self, data, attributes: dict):
        self.data = np.asarray(data)
        self.name = attributes.get("name", "layer")
        ndim = self.data.ndim
        self.scale = attributes.get("scale", (1.0,) * ndim)
        self.translate = attributes.get("translate", (0.0,) * ndim)
        # the rest of napari's data-to-world transform, when the writer gets it
        self.rotate = attributes.get("rotate")
        self.shear = attributes.get("shear")
        self.affine = attributes.get("affine")
        self.metadata = attributes.get("metadata", {}) or {}


def _volume_from_layer_data(data, attributes: dict) -> Volume:
    return layer_to_volume(_LayerView(data, attributes))


# -- sample data --------------------------------------------------------------

def sample_abdomen_ct() -> list[tuple]:
    """npe2 sample: real abdominal CT, 3 mm, in HU (TotalSegmentator, CC BY 4.0)."""
    volume = io.read_nifti(sample_ct_path(), modality="CT")
    volume.name = "abdomen CT (sample)"
    return [image_layer_data(volume)]


__all__ = [
    "get_reader", "read_layers", "write_image", "write_labels",
    "sample_abdomen_ct", "sample_ct_path", "labels_layer_data",
]
