"""Screenshots of the mediffuse panel in use, for docs/ (run under a virtual X server).

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshots.py docs/screenshots

Opens the bundled sample CT, runs each tab on it with the bundled demo model
(real runs, on the CPU), and saves one picture per tab.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

from napari_mediffuse.gui.panel import MediffusePanel
from napari_mediffuse.plugin import sample_abdomen_ct


def wait(tab, timeout=900):
    start = time.monotonic()
    while tab.worker is not None and time.monotonic() - start < timeout:
        QApplication.processEvents()
        time.sleep(0.05)


def main(out: str) -> int:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(title="napari-mediffuse")
    viewer.window._qt_window.resize(1500, 950)
    panel = MediffusePanel(viewer)
    viewer.window.add_dock_widget(panel, name="mediffuse", area="right")
    (data, kwargs, _), = sample_abdomen_ct()
    ct = viewer.add_image(data, **kwargs)
    viewer.dims.set_point(0, ct.translate[0] + 60 * ct.scale[0])

    def shot(name):
        QApplication.processEvents()
        viewer.screenshot(str(out / f"{name}.png"), canvas_only=False)

    runs = [
        ("denoise", {"method": "diffusion"}),
        ("anomaly", {}),
    ]
    for key, values in runs:
        tab = panel.task_tabs[key]
        panel.tabs.setCurrentIndex([panel.tabs.tabText(i) for i in range(panel.tabs.count())].index(tab.spec.title))
        for name, value in values.items():
            tab.param_widgets[name].value = value
        tab.input_combo.setCurrentText(ct.name)
        tab.start()
        wait(tab)
        shot(f"tab_{key}")
        for layer in tab.last_result:
            layer.visible = key == "anomaly"
    panel.compare.grid_button.setChecked(False)
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "docs/screenshots"))
