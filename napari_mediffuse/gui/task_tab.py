"""A generic dock tab for one task: input, model, parameters, Run / Cancel.

A :class:`TaskSpec` says which layers a task accepts, which checkpoints it
can use, its parameters (magicgui widgets with defaults and tooltips) and a
plain function that runs it; :class:`TaskTab` turns that into a tab that
runs the function off the GUI thread (napari's ``thread_worker``) with a
progress bar, cooperative Cancel, and errors as napari notifications. The
viewer is never blocked and the input layer is never modified.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import napari
import numpy as np
from magicgui.widgets import Container, create_widget
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..engine.control import Cancelled
from ..engine.devices import PRECISIONS, autocast_dtype, available_devices, describe_device, select_device
from ..engine.registry import list_checkpoints
from ..layers import layer_to_volume, onto_source_grid, slice_range_layer_data, world_to_grid_index
from ..io import validate
from ..io.volume import Volume
from ..tasks.common import RunOptions


#: ``Param.annotation`` for a chooser of the viewer's Labels layers.
LABELS_LAYER = "labels_layer"
#: slices on each side of the previewed slice given to the task as context
PREVIEW_CONTEXT = 1


def zero_is_auto(value):
    """Spin boxes use 0 for 'automatic': the task functions take None."""
    return None if value <= 0 else value


@dataclass
class Param:
    """One task parameter shown in the tab."""

    name: str
    default: Any
    label: str = ""
    tooltip: str = ""
    options: dict = field(default_factory=dict)  # magicgui options: min, max, step, choices...
    advanced: bool = False
    annotation: Any = None


INPUT_MODALITY = "input"


@dataclass
class TaskSpec:
    """What a tab needs to know about a task.

    ``run(volume, values, options)`` returns a list of napari layer data
    tuples ``(data, kwargs, layer_type)``; it runs in a worker thread and must
    not touch Qt or the viewer.
    """

    key: str
    title: str
    run: Callable[..., list]
    modalities: tuple[str, ...] = ("CT",)
    model_task: Optional[str | tuple[str, ...]] = "ct_prior"  # checkpoint task(s) the model chooser lists
    #: modality of the checkpoints listed; INPUT_MODALITY = the input layer's
    #: (a translation model is chosen by its source modality)
    model_modality: Optional[str] = "CT"
    params: list[Param] = field(default_factory=list)
    preview: bool = True  # 'current slice only' makes sense for this task
    needs_input: bool = True
    description: str = ""


class _Relay(QObject):
    """Carries progress from the worker thread to the GUI thread."""

    progress = Signal(int, int, str)


def _is_volume_layer(layer) -> bool:
    return isinstance(layer, napari.layers.Image) and layer.ndim >= 3 and not layer.rgb


class TaskTab(QWidget):
    """Tab for one :class:`TaskSpec` in the mediffuse panel."""

    def __init__(self, viewer: napari.Viewer, spec: TaskSpec, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.spec = spec
        self.worker = None
        self._cancel = threading.Event()
        self._relay = _Relay()
        self._relay.progress.connect(self._on_progress)
        self.last_result: list = []
        self.last_error: str = ""
        self._napari_progress = None

        layout = QVBoxLayout(self)
        if spec.description:
            text = QLabel(spec.description)
            text.setWordWrap(True)
            layout.addWidget(text)
        form = QFormLayout()
        self.input_combo = QComboBox()
        self.input_combo.setToolTip("Input layer: " + "/".join(spec.modalities) + " volumes only")
        if spec.needs_input:
            form.addRow("Input", self.input_combo)
        self.model_combo = QComboBox()
        self.model_combo.setToolTip("Checkpoints from the bundled, user and $MEDIFFUSE_MODELS folders")
        for combo in (self.input_combo, self.model_combo):  # long names must not widen the dock
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(18)
        self.model_summary = QLabel("")  # the chosen model's card summary, always visible
        self.model_summary.setWordWrap(True)
        if spec.model_task:
            form.addRow("Model", self.model_combo)
            form.addRow("", self.model_summary)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto"] + available_devices())
        self.device_combo.setToolTip("auto = CUDA GPU, then Apple MPS, then CPU")
        form.addRow("Device", self.device_combo)
        self.precision_combo = QComboBox()
        self.precision_combo.addItems(list(PRECISIONS))
        self.precision_combo.setToolTip("network precision: auto = fp32 on CPU, bf16 (or fp16) on a GPU")
        form.addRow("Precision", self.precision_combo)
        self.device_label = QLabel()
        form.addRow("", self.device_label)
        layout.addLayout(form)

        main = [p for p in spec.params if not p.advanced]
        advanced = [p for p in spec.params if p.advanced]
        self.param_widgets = {}
        self.params_container = self._container(main)
        layout.addWidget(self.params_container.native)
        if advanced:
            self.advanced_box = QGroupBox("Advanced")
            self.advanced_box.setCheckable(True)
            self.advanced_box.setChecked(False)
            box_layout = QVBoxLayout(self.advanced_box)
            self.advanced_container = self._container(advanced)
            box_layout.addWidget(self.advanced_container.native)
            self.advanced_container.native.setVisible(False)
            self.advanced_box.toggled.connect(self.advanced_container.native.setVisible)
            layout.addWidget(self.advanced_box)

        self.preview_check = QCheckBox("Current slice only (preview)")
        self.preview_check.setToolTip("Run on the axial slice under the slider: seconds, for tuning parameters")
        if spec.preview:
            layout.addWidget(self.preview_check)
        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        self.progress_bar = QProgressBar()
        self.progress_bar.setVisible(False)
        layout.addWidget(self.progress_bar)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.run_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        self.device_combo.currentTextChanged.connect(self._update_device_label)
        self.model_combo.currentIndexChanged.connect(self._update_model_summary)
        if self.spec.model_modality == INPUT_MODALITY:
            self.input_combo.currentTextChanged.connect(self.refresh_models)
        viewer.layers.events.inserted.connect(self.refresh_inputs)
        viewer.layers.events.removed.connect(self.refresh_inputs)
        self.refresh_inputs()
        self.refresh_models()
        self._update_device_label()

    # -- widgets -------------------------------------------------------------------
    def _container(self, params: list[Param]) -> Container:
        widgets = []
        for p in params:
            if p.annotation == LABELS_LAYER:
                w = self._labels_chooser(p)
                self.param_widgets[p.name] = w
                widgets.append(w)
                continue
            options = dict(p.options)
            if p.tooltip:
                options.setdefault("tooltip", p.tooltip)
            w = create_widget(value=p.default, name=p.name, label=p.label or p.name.replace("_", " "),
                              annotation=p.annotation, options=options)
            if p.tooltip:
                w.tooltip = p.tooltip
            self.param_widgets[p.name] = w
            widgets.append(w)
        return Container(widgets=widgets)

    def _labels_chooser(self, p: Param):
        """A chooser of the viewer's Labels layers (plus 'none' when optional)."""
        from magicgui.widgets import ComboBox

        optional = p.default is None

        def choices(_widget=None):
            names = [layer.name for layer in self.viewer.layers if isinstance(layer, napari.layers.Labels)]
            return ([p.options.get("none_label", "(none)")] if optional else []) + names

        w = ComboBox(name=p.name, label=p.label or p.name.replace("_", " "), choices=choices,
                     tooltip=p.tooltip)
        w._mediffuse_optional = optional
        return w

    def values(self) -> dict:
        """Parameter values; Labels-layer choices become Volumes (read here, in
        the GUI thread, so the worker never touches a layer)."""
        values = {}
        for name, w in self.param_widgets.items():
            value = w.value
            if getattr(w, "_mediffuse_optional", None) is not None:
                value = (layer_to_volume(self.viewer.layers[value]) if value in self.viewer.layers
                         else None)
            values[name] = value
        return values

    def _refresh_layer_choices(self):
        for w in self.param_widgets.values():
            if getattr(w, "_mediffuse_optional", None) is not None:
                w.reset_choices()

    def compatible_layers(self) -> list:
        out = []
        for layer in self.viewer.layers:
            if not _is_volume_layer(layer):
                continue
            modality = (layer.metadata or {}).get("modality", "OT")
            if modality in self.spec.modalities:
                out.append(layer)
        return out

    def refresh_inputs(self, event=None):
        self._refresh_layer_choices()
        current = self.input_combo.currentText()
        names = [layer.name for layer in self.compatible_layers()]
        self.input_combo.clear()
        self.input_combo.addItems(names)
        if current in names:
            self.input_combo.setCurrentText(current)
        if self.spec.needs_input and not names:
            self.status.setText(f"Open a {'/'.join(self.spec.modalities)} volume to run {self.spec.title.lower()}.")

    def refresh_models(self, event=None):
        current = self.model_combo.currentText()
        self.model_combo.clear()
        if not self.spec.model_task:
            return
        modality = self.spec.model_modality
        if modality == INPUT_MODALITY:
            layer = self.input_layer()
            modality = (layer.metadata or {}).get("modality") if layer is not None else None
        for info in list_checkpoints(task=self.spec.model_task, modality=modality):
            self.model_combo.addItem(info.label(), str(info.path))
            self.model_combo.setItemData(self.model_combo.count() - 1,  # tooltip, and the summary label
                                         f"{info.summary or info.name} ({info.origin}: {info.path})", 3)
        if self.model_combo.count() == 0:
            self.model_combo.addItem("(no checkpoint installed)", None)
        elif current:
            self.model_combo.setCurrentText(current)
        self._update_model_summary()

    def _update_model_summary(self, index=None):
        tooltip = self.model_combo.itemData(self.model_combo.currentIndex(), 3)
        self.model_summary.setText(tooltip or "")

    def _update_device_label(self):
        try:
            self.device_label.setText(describe_device(select_device(self.device_combo.currentText())))
        except ValueError as exc:
            self.device_label.setText(str(exc))

    # -- running ---------------------------------------------------------------------
    def input_layer(self):
        name = self.input_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def _preview_range(self, layer, n_slices: int) -> tuple[int, int, int]:
        """Slices ``start:stop`` around the axial slice under the slider (one
        neighbour each side, context for the task) and that slice's index."""
        # in the grid the task gets (an oblique layer is drawn resampled)
        index = int(np.clip(round(world_to_grid_index(layer, self.viewer.dims.point)[0]), 0, n_slices - 1))
        return max(0, index - PREVIEW_CONTEXT), min(n_slices, index + PREVIEW_CONTEXT + 1), index

    def start(self, layer=None):
        """Validate the input and start the task in a worker thread.

        ``layer`` overrides the input chooser (scripting, tests).
        """
        if self.worker is not None:
            return
        self.last_error = ""
        volume = None
        preview = None  # (start, stop, index) of the previewed slab
        if self.spec.needs_input:
            layer = layer if layer is not None else self.input_layer()
            wanted = "/".join(self.spec.modalities)
            if layer is None:
                return self._fail(f"{self.spec.title}: choose a {wanted} volume layer")
            if not _is_volume_layer(layer):
                return self._fail(f"{self.spec.title}: {layer.name!r} is a {layer.ndim}D "
                                  f"{type(layer).__name__.lower()} layer; it needs a 3D {wanted} volume")
            modality = (layer.metadata or {}).get("modality", "unknown")
            if modality not in self.spec.modalities:
                return self._fail(f"{self.spec.title}: {layer.name!r} is {modality}; it needs a {wanted} volume")
            try:
                # the reader's checks for layers from any reader: finite affine, NaN/inf voxels replaced
                volume = validate.check_volume(layer_to_volume(layer), where=f"layer {layer.name!r}")
            except ValueError as exc:
                return self._fail(str(exc))
            if self.spec.preview and self.preview_check.isChecked():
                preview = self._preview_range(layer, volume.data.shape[0])
        model = self.model_combo.currentData() if self.spec.model_task else None
        if self.spec.model_task and model is None:
            wanted = self.spec.model_task if isinstance(self.spec.model_task, str) else " or ".join(self.spec.model_task)
            return self._fail(f"{self.spec.title}: no {wanted} checkpoint installed "
                              "(see README: Models)")
        try:
            values = self.values()
        except ValueError as exc:
            return self._fail(f"{self.spec.title}: {exc}")
        values["model"] = model
        if layer is not None:  # a mask painted over an oblique layer: onto the grid the task gets
            values = {k: onto_source_grid(v, layer) if isinstance(v, Volume) else v for k, v in values.items()}
        preview_slice = None
        if preview is not None:  # the input and any mask on its grid, cut to the slab
            start, stop, index = preview
            full_shape = volume.data.shape
            for key, value in values.items():
                if isinstance(value, Volume) and value.data.shape == full_shape:
                    values[key] = value.slab(start, stop)
            volume = volume.slab(start, stop)
            volume.name = f"{volume.name} [preview]"
            preview_slice = index - start
        self._cancel.clear()
        try:  # a precision the device lacks is refused here, before the worker starts
            autocast_dtype(select_device(self.device_combo.currentText()), self.precision_combo.currentText())
        except ValueError as exc:
            return self._fail(f"{self.spec.title}: {exc}")
        options = RunOptions(device=self.device_combo.currentText(),
                             precision=self.precision_combo.currentText(), progress=self._relay.progress.emit,
                             cancel=self._cancel.is_set, seed=values.pop("seed", 0),
                             batch_size=zero_is_auto(values.pop("batch_size", 0)))

        @thread_worker
        def work():
            layers = self.spec.run(volume, values, options)
            if preview_slice is not None:  # keep the slice under the slider, drop the context
                layers = [slice_range_layer_data(item, preview_slice, preview_slice + 1) for item in layers]
            return layers

        self.worker = work(_ignore_errors=True)  # errors are handled by _on_errored
        self.worker.returned.connect(self._on_returned)
        self.worker.errored.connect(self._on_errored)
        self.worker.finished.connect(self._on_finished)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress_bar.setVisible(True)
        self.progress_bar.setRange(0, 0)
        self.status.setText("running…")
        self._started = time.monotonic()
        self.worker.start()

    def cancel(self):
        if self.worker is not None:
            self._cancel.set()
            self.status.setText("cancelling…")

    def _on_progress(self, done: int, total: int, message: str):
        """GUI thread: the tab's bar and napari's activity progress bar."""
        from napari.utils import progress

        self.progress_bar.setRange(0, max(total, 1))
        self.progress_bar.setValue(done)
        self.status.setText(message)
        if self.worker is None:
            return  # a late update after the run ended
        bar = self._napari_progress
        if bar is None or bar.total != max(total, 1):
            self._close_napari_progress()
            bar = self._napari_progress = progress(total=max(total, 1), desc=f"mediffuse {self.spec.title}")
        # set_description refreshes the bar, which may process events (and end
        # the run) re-entrantly: work on the local reference only.
        bar.n = done
        bar.set_description(f"mediffuse {self.spec.title}: {message}")

    def _close_napari_progress(self):
        if self._napari_progress is not None:
            self._napari_progress.close()
            self._napari_progress = None

    def _on_returned(self, layer_data: list):
        self.last_result = []
        for data, kwargs, layer_type in layer_data:
            add = getattr(self.viewer, f"add_{layer_type}")
            self.last_result.append(add(data, **kwargs))
        if not self.spec.needs_input and self.last_result:
            bring_into_view(self.viewer, self.last_result[0])
        seconds = time.monotonic() - self._started
        self.status.setText(f"done in {seconds:.1f} s")
        show_info(f"{self.spec.title}: done in {seconds:.1f} s")
        # what the user must not miss (outside the model's domain, resampled grids): one notification each
        notes = dict.fromkeys(w for _, kwargs, _ in layer_data
                              for w in (kwargs.get("metadata") or {}).get("warnings", []))
        for note in list(notes)[:3]:
            show_warning(f"{self.spec.title}: {note}")

    def _on_errored(self, exc: Exception):
        if isinstance(exc, Cancelled):
            self.status.setText("cancelled; nothing was added")
            show_warning(f"{self.spec.title}: cancelled")
            return
        self._fail(f"{self.spec.title}: {exc}")

    def _on_finished(self):
        self._close_napari_progress()
        self.worker = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.progress_bar.setVisible(False)

    def _fail(self, message: str):
        self.last_error = message
        self.status.setText(message)
        show_error(message)


def bring_into_view(viewer, layer) -> None:
    """Put the sliders of the axes not on screen at the middle of ``layer`` and frame it.

    A new image on no input's grid (a synthesis, a stack of 2D samples) would
    otherwise sit outside the slice on screen and show nothing, or show as a
    speck beside a large scan.
    """
    low, high = layer.extent.world
    offset = viewer.dims.ndim - layer.ndim
    for axis in viewer.dims.not_displayed:
        if 0 <= axis - offset < layer.ndim:
            viewer.dims.set_point(axis, (low[axis - offset] + high[axis - offset]) / 2)
    viewer.reset_view()  # fits the whole scene; then zoom from it onto the layer
    shown = [axis - offset for axis in viewer.dims.displayed if axis >= offset]
    scene_low, scene_high = viewer.layers.extent.world
    scene_size = max(scene_high[offset + a] - scene_low[offset + a] for a in shown)
    layer_size = max(high[a] - low[a] for a in shown)
    viewer.camera.center = tuple((low[a] + high[a]) / 2 for a in shown)
    if layer_size > 0:
        viewer.camera.zoom *= scene_size / layer_size
