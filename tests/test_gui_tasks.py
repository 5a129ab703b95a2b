"""Task tabs in a real viewer: runs off the GUI thread, results, cancel, bad input."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui


@pytest.fixture
def panel(make_napari_viewer, tiny_models):
    from napari_mediffuse.gui.panel import MediffusePanel

    viewer = make_napari_viewer()
    panel = MediffusePanel(viewer)
    viewer.window.add_dock_widget(panel)
    return viewer, panel


def _wait(qtbot, tab, timeout=120_000):
    qtbot.waitUntil(lambda: tab.worker is None, timeout=timeout)


def test_synthesis_tab_adds_synthetic_ct_layer(panel, qtbot):
    viewer, panel = panel
    tab = panel.task_tabs["synthesize"]
    assert tab.model_combo.count() == 1 and "tiny-ct-prior" in tab.model_combo.currentText()
    tab.param_widgets["slices"].value = 16
    tab.param_widgets["rows"].value = 20
    tab.param_widgets["columns"].value = 24
    tab.param_widgets["steps"].value = 2
    tab.start()
    assert tab.worker is not None and not tab.run_button.isEnabled()
    _wait(qtbot, tab)
    assert tab.last_error == ""
    (layer,) = tab.last_result
    assert layer.data.shape == (16, 20, 24)
    assert tuple(layer.scale) == pytest.approx((3.0, 3.0, 3.0))
    assert layer.metadata["synthetic"] is True and "synthetic" in layer.name
    assert layer.metadata["modality"] == "CT"
    assert tuple(layer.contrast_limits) == pytest.approx((-160.0, 240.0))


def test_cancel_stops_and_adds_nothing(panel, qtbot):
    viewer, panel = panel
    tab = panel.task_tabs["synthesize"]
    tab.param_widgets["slices"].value = 32
    tab.param_widgets["steps"].value = 500
    tab.start()
    qtbot.waitUntil(lambda: tab.progress_bar.value() >= 1, timeout=60_000)
    tab.cancel()
    _wait(qtbot, tab)
    assert len(viewer.layers) == 0
    assert "cancelled" in tab.status.text()
    assert tab.run_button.isEnabled()
