"""The mediffuse dock panel.

The panel only wires widgets to plain functions of the core; everything it
does is also reachable from the Python API and the ``mediffuse`` command.
"""
from __future__ import annotations

from pathlib import Path

import napari
import numpy as np
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QScrollArea,
    QSlider,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from .. import io
from ..display import CT_WINDOW_PRESETS, ct_preset_limits, robust_limits
from ..layers import image_layer_data, labels_layer_data, layer_to_volume, loaded_series_grids, swipe_crop
from ..io.volume import axcodes


def viewer_grid(viewer: napari.Viewer):
    """The viewer's grid settings (``viewer.canvas.grid`` since napari 0.9,
    ``viewer.grid`` before)."""
    canvas = getattr(viewer, "canvas", None)
    return canvas.grid if canvas is not None and hasattr(canvas, "grid") else viewer.grid


#: the modality box's entry that keeps the modality read from the file
AS_READ = "(as read)"

#: metadata key of the swipe's temporary view layer (names the layer it shows)
SWIPE_OF = "swipe_of"


def _scan_layers(viewer: napari.Viewer) -> list:
    """Image layers holding scans or results (not the swipe's temporary view)."""
    return [layer for layer in viewer.layers
            if isinstance(layer, napari.layers.Image) and SWIPE_OF not in layer.metadata]


def _refill(combo: QComboBox, names: list[str]) -> None:
    """Replace a combo box's items, keeping the current choice if it is
    still there, without emitting change signals meanwhile."""
    current = combo.currentText()
    combo.blockSignals(True)
    combo.clear()
    combo.addItems(names)
    if current in names:
        combo.setCurrentText(current)
    combo.blockSignals(False)


class ScanBox(QGroupBox):
    """Scan information, CT window presets, open and export."""

    def __init__(self, viewer: napari.Viewer, parent=None):
        super().__init__("Scan", parent)
        self.viewer = viewer
        self.layer_combo = QComboBox()
        self.layer_combo.setToolTip("Image layer the scan tools act on")
        self.info = QLabel("no image layer")
        self.info.setWordWrap(True)
        self.window_combo = QComboBox()
        self.window_combo.addItems(["(auto)"] + list(CT_WINDOW_PRESETS))
        self.window_combo.setToolTip(
            "CT window preset (level/width in HU); MR uses robust percentiles"
        )
        self.modality_combo = QComboBox()
        self.modality_combo.addItems([AS_READ, "CT", "MR"])
        self.modality_combo.setToolTip(
            "What the selected scan is, for the tasks: overrides DICOM's Modality or the guess "
            "made for NIfTI (a CT crop without air is guessed MR); like --modality"
        )
        open_button = QPushButton("Open DICOM folder…")
        open_button.setToolTip("Read every CT/MR series under a folder (one layer per series)")
        export_button = QPushButton("Export as DICOM series…")
        export_button.setToolTip(
            "Write the selected layer as a derived DICOM series (new UIDs, ImageType DERIVED, "
            "source geometry kept; a task's result is marked SYNTHETIC in a new study); "
            "an active labels layer is written as a DICOM SEG, a task's heatmap as a "
            "Parametric Map"
        )

        form = QFormLayout()
        form.addRow("Layer", self.layer_combo)
        form.addRow("Window", self.window_combo)
        form.addRow("Modality", self.modality_combo)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.info)
        buttons = QHBoxLayout()
        buttons.addWidget(open_button)
        buttons.addWidget(export_button)
        layout.addLayout(buttons)

        self.layer_combo.currentTextChanged.connect(self._on_layer_changed)
        self.window_combo.currentTextChanged.connect(self.apply_window)
        self.modality_combo.currentTextChanged.connect(self.set_modality)
        open_button.clicked.connect(self._open_folder_dialog)
        export_button.clicked.connect(self._export_dialog)
        viewer.layers.events.inserted.connect(self._refresh_layers)
        viewer.layers.events.removed.connect(self._refresh_layers)
        viewer.layers.selection.events.active.connect(self._follow_selection)
        self._refresh_layers()

    # -- layer list -----------------------------------------------------------
    def selected_layer(self):
        name = self.layer_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def _refresh_layers(self, event=None):
        _refill(self.layer_combo, [layer.name for layer in _scan_layers(self.viewer)])
        self._on_layer_changed(self.layer_combo.currentText())

    def _follow_selection(self, event=None):
        active = self.viewer.layers.selection.active
        if active in _scan_layers(self.viewer):
            self.layer_combo.setCurrentText(active.name)

    def _on_layer_changed(self, name: str):
        layer = self.selected_layer()
        if layer is None:
            self.info.setText("no image layer")
            return
        meta = layer.metadata or {}
        self.modality_combo.blockSignals(True)
        self.modality_combo.setCurrentText(meta.get("modality") if "modality_override" in meta
                                           else AS_READ)
        self.modality_combo.blockSignals(False)
        spacing = tuple(float(s) for s in layer.scale[-3:]) if layer.ndim >= 3 else tuple(layer.scale)
        lines = [
            f"modality: {meta.get('modality', 'unknown')}",
            f"shape: {' x '.join(str(s) for s in layer.data.shape)}",
            "spacing: " + " x ".join(f"{s:.3g}" for s in spacing) + " mm",
        ]
        if "affine" in meta:
            lines.append("orientation: " + "".join(axcodes(meta["affine"])))
        thickness = meta.get("slice_thickness_mm")
        if thickness:
            lines.append(f"slice thickness: {thickness:.3g} mm")
        for warning in meta.get("warnings", [])[:3]:
            lines.append(f"⚠ {warning}")
        self.info.setText("\n".join(lines))

    # -- actions ----------------------------------------------------------------
    def set_modality(self, choice: str):
        """Override the selected scan's modality ('CT', 'MR') or restore the one read."""
        layer = self.selected_layer()
        if layer is None:
            return
        meta = layer.metadata
        override = meta.get("modality_override") or {"read": meta.get("modality", "OT")}
        if choice == AS_READ:
            meta["modality"] = override["read"]
            meta.pop("modality_override", None)
        else:
            meta["modality"] = choice
            meta["modality_override"] = {"read": override["read"], "chosen": choice}
        self._on_layer_changed(layer.name)  # the task tabs read the modality when they run

    def apply_window(self, preset: str):
        """Set the selected layer's contrast limits from a preset name."""
        layer = self.selected_layer()
        if layer is None:
            return
        if preset in CT_WINDOW_PRESETS:
            limits = ct_preset_limits(preset)
        else:
            modality = (layer.metadata or {}).get("modality", "OT")
            limits = ct_preset_limits("soft tissue") if modality == "CT" else robust_limits(layer.data)
        low, high = layer.contrast_limits_range
        layer.contrast_limits_range = (min(low, limits[0]), max(high, limits[1]))
        layer.contrast_limits = limits

    def open_folder(self, folder) -> list:
        """Read a DICOM folder and add one layer per series (a SEG whose
        series is loaded already goes on that layer's grid, as in the reader)."""
        try:
            volumes = io.read(folder, loaded=loaded_series_grids(_scan_layers(self.viewer)))
        except io.ReadError as exc:
            show_error(str(exc))
            return []
        except Exception as exc:  # never a traceback into napari; loaded layers stay
            show_error(f"{folder}: cannot read ({type(exc).__name__}: {exc})")
            return []
        added = []
        for volume in volumes:
            if volume.metadata.get("layer_type") == "labels":  # a DICOM SEG
                data, kwargs, _ = labels_layer_data(volume)
                added.append(self.viewer.add_labels(data, **kwargs))
                continue
            data, kwargs, _ = image_layer_data(volume, visible=not volume.metadata.get("localizer"))
            if kwargs["metadata"].get("display_note"):  # an oblique series drawn resampled
                show_warning(kwargs["metadata"]["display_note"])
            added.append(self.viewer.add_image(data, **kwargs))
        return added

    def _open_folder_dialog(self):
        folder = QFileDialog.getExistingDirectory(self, "Open DICOM folder")
        if folder:
            self.open_folder(folder)

    def export_dicom(self, folder) -> list[Path]:
        """Write the active labels layer as a DICOM SEG, a task's heatmap as a
        Parametric Map, any other scan layer as a derived series, into ``folder``."""
        active = self.viewer.layers.selection.active
        if isinstance(active, napari.layers.Labels):
            return self._export_derived(active, Path(folder) / "SEG00001.dcm", io.write_dicom_seg)
        layer = self.selected_layer()
        if layer is None:
            show_error("select an image layer to export")
            return []
        meta = layer.metadata or {}
        if meta.get("task") and meta.get("modality") not in ("CT", "MR"):  # a map, not an image
            return self._export_derived(layer, Path(folder) / "PM00001.dcm", io.write_parametric_map)
        try:
            volume = layer_to_volume(layer)
            files = io.write_dicom_series(
                volume, folder,
                series_description=f"{layer.name} (mediffuse)",
                source_files=(layer.metadata or {}).get("files"),
            )
        except (io.MediffuseIOError, ValueError) as exc:
            show_error(str(exc))
            return []
        show_info(f"wrote {len(files)} DICOM files to {folder}")
        return files

    def _export_derived(self, layer, path: Path, writer) -> list[Path]:
        """One SEG or Parametric Map file referencing the layer's source series
        (a user's painting takes the scan selected in the box as its source)."""
        source = (layer.metadata or {}).get("files")
        scan = self.selected_layer()
        if not source and scan is not None:
            source = (scan.metadata or {}).get("files")
        try:
            if not path.parent.exists():
                path.parent.mkdir(parents=True)
            written = writer(layer_to_volume(layer), path, source_files=source)
        except (io.MediffuseIOError, ValueError, OSError) as exc:
            show_error(str(exc))
            return []
        show_info(f"wrote {written}")
        return [written]

    def _export_dialog(self):
        folder = QFileDialog.getExistingDirectory(self, "Export DICOM series into (empty) folder")
        if folder:
            self.export_dicom(folder)


class CompareBox(QGroupBox):
    """Compare an input and its results: side-by-side grid with linked
    slice position, and linked contrast limits."""

    def __init__(self, viewer: napari.Viewer, parent=None):
        super().__init__("Compare", parent)
        self.viewer = viewer
        self.grid_button = QPushButton("Side by side")
        self.grid_button.setCheckable(True)
        self.grid_button.setToolTip("Show each visible layer in its own grid cell; slices stay linked")
        self.link_button = QPushButton("Link contrast of selected")
        self.link_button.setToolTip("Select two or more image layers (e.g. input and result) "
                                    "so one window applies to all")
        layout = QHBoxLayout(self)
        layout.addWidget(self.grid_button)
        layout.addWidget(self.link_button)
        self.grid_button.toggled.connect(self.set_side_by_side)
        self.link_button.clicked.connect(self.link_selected_contrast)

    def set_side_by_side(self, enabled: bool) -> None:
        """Grid view: one cell per layer, dims (slice position) shared."""
        viewer_grid(self.viewer).enabled = bool(enabled)

    def link_selected_contrast(self) -> list:
        """Link contrast limits (and colormap range) of the selected image layers."""
        from napari.experimental import link_layers

        layers = [layer for layer in self.viewer.layers.selection if isinstance(layer, napari.layers.Image)]
        if len(layers) < 2:
            show_error("select two or more image layers to link their contrast")
            return []
        first = layers[0]
        for layer in layers[1:]:
            low, high = layer.contrast_limits_range
            a, b = first.contrast_limits_range
            layer.contrast_limits_range = (min(low, a), max(high, b))
            layer.contrast_limits = first.contrast_limits
        link_layers(layers, ("contrast_limits", "gamma"))
        show_info(f"linked the contrast of {len(layers)} layers")
        return layers


class SwipeBox(QGroupBox):
    """Swipe between a result and what lies beneath it (usually its input):
    left of the line shows the layers below, right of it the swiped layer.

    napari's 2D image visuals cannot be clipped, so the swipe shows a
    temporary layer holding a view (no copy) of the right part of the data,
    with contrast linked to the original, which is hidden meanwhile.
    """

    def __init__(self, viewer: napari.Viewer, parent=None):
        super().__init__("Swipe", parent)
        from qtpy.QtCore import Qt

        self.viewer = viewer
        self.layer_combo = QComboBox()
        self.layer_combo.setToolTip("Layer revealed right of the swipe line (e.g. a result over its input)")
        self.button = QPushButton("Swipe")
        self.button.setCheckable(True)
        self.button.setToolTip("Drag the slider to move the line; the layers below show on its left")
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(0, 1000)
        self.slider.setValue(500)
        self.slider.setToolTip("Position of the swipe line across the image")
        self.swipe_layer = None
        self._source = None
        form = QFormLayout(self)
        row = QHBoxLayout()
        row.addWidget(self.layer_combo, 1)
        row.addWidget(self.button)
        form.addRow("Layer", row)
        form.addRow("Line", self.slider)
        self.button.toggled.connect(self.set_swipe)
        self.slider.valueChanged.connect(self._update)
        viewer.layers.events.inserted.connect(self._refresh_layers)
        viewer.layers.events.removed.connect(self._on_removed)
        viewer.dims.events.ndisplay.connect(lambda event=None: self.button.setChecked(False))
        self._refresh_layers()

    def _refresh_layers(self, event=None):
        # topmost (usually the newest result) first
        _refill(self.layer_combo, [layer.name for layer in _scan_layers(self.viewer)][::-1])

    def _on_removed(self, event=None):
        if self.swipe_layer is not None and (self.swipe_layer not in self.viewer.layers
                                             or self._source not in self.viewer.layers):
            self.button.setChecked(False)
        self._refresh_layers()

    def _axis(self, layer) -> int:
        """Data axis of ``layer`` shown horizontally on screen."""
        return self.viewer.dims.displayed[-1] - (self.viewer.dims.ndim - layer.ndim)

    def set_swipe(self, enabled: bool) -> None:
        """Start or stop swiping the chosen layer."""
        if not enabled:
            self._stop()
            return
        name = self.layer_combo.currentText()
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        problem = None
        if layer is None:
            problem = "choose an image layer to swipe"
        elif self.viewer.dims.ndisplay != 2:
            problem = "swipe works in the 2D view"
        elif layer.multiscale or layer.rgb:
            problem = f"cannot swipe {layer.name!r}: multiscale and RGB layers are not supported"
        elif not np.allclose(layer.affine.affine_matrix, np.eye(layer.ndim + 1)) or \
                not np.allclose(layer.rotate, np.eye(layer.ndim)):
            problem = f"cannot swipe {layer.name!r}: it has a rotation or affine transform"
        if problem:
            show_error(problem)
            self.button.blockSignals(True)
            self.button.setChecked(False)
            self.button.blockSignals(False)
            return
        from napari.experimental import link_layers

        view, translate = self._crop(layer)
        self._source = layer
        self.swipe_layer = self.viewer.add_image(
            view, scale=layer.scale, translate=translate, colormap=layer.colormap,
            contrast_limits=layer.contrast_limits, gamma=layer.gamma, opacity=layer.opacity,
            blending=layer.blending, interpolation2d=layer.interpolation2d,
            name=f"{layer.name} [swipe]", metadata={SWIPE_OF: layer.name})
        self.viewer.layers.move(self.viewer.layers.index(self.swipe_layer),
                                self.viewer.layers.index(layer) + 1)
        link_layers([layer, self.swipe_layer], ("contrast_limits", "gamma", "colormap", "opacity"))
        layer.visible = False

    def _crop(self, layer):
        return swipe_crop(layer.data, layer.scale, layer.translate, axis=self._axis(layer),
                          fraction=self.slider.value() / 1000)

    def _update(self, value=None):
        if self.swipe_layer is None:
            return
        view, translate = self._crop(self._source)
        self.swipe_layer.translate = translate
        self.swipe_layer.data = view

    def _stop(self):
        swipe, source = self.swipe_layer, self._source
        self.swipe_layer = self._source = None
        if source is not None and source in self.viewer.layers:
            source.visible = True
        if swipe is not None and swipe in self.viewer.layers:
            from napari.experimental import unlink_layers

            unlink_layers([swipe])
            self.viewer.layers.remove(swipe)


class MediffusePanel(QWidget):
    """Dock panel of napari-mediffuse: a Scan tab and one tab per task."""

    def __init__(self, napari_viewer: napari.Viewer, parent=None):
        super().__init__(parent)
        from .specs import task_specs
        from .task_tab import TaskTab

        self.viewer = napari_viewer
        self.tabs = QTabWidget()
        scan_page = QWidget()
        scan_layout = QVBoxLayout(scan_page)
        self.scan = ScanBox(napari_viewer)
        self.compare = CompareBox(napari_viewer)
        self.swipe = SwipeBox(napari_viewer)
        scan_layout.addWidget(self.scan)
        scan_layout.addWidget(self.compare)
        scan_layout.addWidget(self.swipe)
        scan_layout.addStretch(1)
        self.tabs.addTab(scan_page, "Scan")
        self.task_tabs: dict[str, TaskTab] = {}
        for spec in task_specs():
            tab = TaskTab(napari_viewer, spec)
            self.task_tabs[spec.key] = tab
            self.tabs.addTab(_scrollable(tab), spec.title)
        # a modality override changes which tabs take the scan (after ScanBox.set_modality)
        self.scan.modality_combo.currentTextChanged.connect(self._refresh_task_inputs)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.tabs)


    def _refresh_task_inputs(self, _choice: str = "") -> None:
        for tab in self.task_tabs.values():
            tab.refresh_inputs()


def _scrollable(widget: QWidget) -> QScrollArea:
    from qtpy.QtCore import Qt

    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    area.setWidget(widget)
    return area
