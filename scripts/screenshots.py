"""Screenshots of the mediffuse panel in use, for docs/ and the README
(run under a virtual X server; real runs of the bundled demo models on the CPU):

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshots.py docs/screenshots

Opens the bundled sample CT and saves one picture per tab after running it:
the per-slice tasks as a 'current slice only' preview (seconds each), the
super-resolution and synthesis on small volumes, plus the side-by-side and
swipe comparisons. ``--only NAME`` limits it to some shots.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

from napari_mediffuse.gui.panel import MediffusePanel, viewer_grid
from napari_mediffuse.gui.task_tab import bring_into_view
from napari_mediffuse.plugin import sample_abdomen_ct

#: axial slice shown (through the liver, kidneys and spine of the sample CT)
SLICE = 60


def wait(tab, timeout=1800):
    start = time.monotonic()
    while tab.worker is not None and time.monotonic() - start < timeout:
        QApplication.processEvents()
        time.sleep(0.05)
    if tab.last_error:
        raise RuntimeError(f"{tab.spec.title}: {tab.last_error}")


class Shooter:
    def __init__(self, out: Path):
        self.out = out
        self.viewer = napari.Viewer(title="napari-mediffuse")
        self.viewer.window._qt_window.resize(1500, 950)
        self.panel = MediffusePanel(self.viewer)
        self.viewer.window.add_dock_widget(self.panel, name="mediffuse", area="right")
        (data, kwargs, _), = sample_abdomen_ct()
        self.ct = self.viewer.add_image(data, **kwargs)
        self.viewer.dims.set_point(0, self.ct.translate[0] + SLICE * self.ct.scale[0])

    def shot(self, name: str) -> None:
        for _ in range(5):
            QApplication.processEvents()
        self.viewer.screenshot(str(self.out / f"{name}.png"), canvas_only=False)
        print(f"wrote {self.out / name}.png", flush=True)

    def grid(self, enabled: bool = True) -> None:
        viewer_grid(self.viewer).enabled = enabled
        self.viewer.reset_view()

    def show_tab(self, title: str) -> None:
        titles = [self.panel.tabs.tabText(i) for i in range(self.panel.tabs.count())]
        self.panel.tabs.setCurrentIndex(titles.index(title))

    def hide_results(self) -> None:
        for layer in self.viewer.layers:
            layer.visible = layer is self.ct
        viewer_grid(self.viewer).enabled = False

    def run(self, key: str, values: dict, *, preview: bool, layer=None) -> list:
        tab = self.panel.task_tabs[key]
        self.show_tab(tab.spec.title)
        for name, value in values.items():
            tab.param_widgets[name].value = value
        if tab.spec.needs_input:
            tab.input_combo.setCurrentText((layer or self.ct).name)
        if tab.spec.preview:
            tab.preview_check.setChecked(preview)
        started = time.monotonic()
        tab.start()
        wait(tab)
        print(f"{key}: {time.monotonic() - started:.1f} s", flush=True)
        return tab.last_result


def lesion_mask(shape, scale, centre_index, radius_mm: float) -> np.ndarray:
    """A sphere (uint8 labels) of ``radius_mm`` around a voxel index."""
    grid = np.indices(shape, dtype=np.float32)
    distance2 = sum(((grid[i] - c) * s) ** 2 for i, (c, s) in enumerate(zip(centre_index, scale)))
    return (distance2 <= radius_mm ** 2).astype(np.uint8)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="docs/screenshots")
    parser.add_argument("--only", nargs="*", help="names of the shots to make (default: all)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = set(args.only or [])

    def want(name):
        return not wanted or name in wanted

    s = Shooter(out)
    ct, viewer, panel = s.ct, s.viewer, s.panel
    if want("main"):
        s.show_tab("Scan")
        panel.scan.window_combo.setCurrentText("abdomen")
        s.shot("main")
    if want("tab_denoise"):
        denoised, = s.run("denoise", {"method": "diffusion"}, preview=True)
        s.grid(True)
        s.shot("tab_denoise")
        s.hide_results()
    if want("tab_anomaly"):
        s.run("anomaly", {"show_reconstruction": False}, preview=True)
        s.shot("tab_anomaly")
        s.hide_results()
    if want("tab_inpaint"):
        # a 'lesion' painted in the liver (right of the patient = left of the image)
        mask = lesion_mask(ct.data.shape, ct.scale, (SLICE, 45, 35), radius_mm=15.0)
        viewer.add_labels(mask, name="painted lesion", scale=ct.scale, translate=ct.translate, opacity=0.4)
        tab = panel.task_tabs["inpaint"]
        tab.param_widgets["mask"].reset_choices()
        tab.param_widgets["mask"].value = "painted lesion"
        s.run("inpaint", {}, preview=True)
        viewer.layers["painted lesion"].visible = False
        s.grid(True)
        s.shot("tab_inpaint")
        s.hide_results()
    if want("tab_translate") or want("swipe"):
        mr, = s.run("translate", {"direction": "ct2mr"}, preview=True)
        s.grid(True)
        if want("tab_translate"):
            s.shot("tab_translate")
        viewer_grid(viewer).enabled = False
        if want("swipe"):
            mr.visible = True
            s.show_tab("Scan")
            panel.swipe.layer_combo.setCurrentText(mr.name)
            panel.swipe.slider.setValue(500)
            panel.swipe.button.setChecked(True)
            s.shot("swipe")
            panel.swipe.button.setChecked(False)
        s.hide_results()
    if want("tab_sr"):
        # a thick-slice CT: every other slice of a crop, averaged (6 mm slabs)
        crop = ct.data[40:80].astype(np.float32)
        thick = 0.5 * (crop[0::2] + crop[1::2])
        scale = (ct.scale[0] * 2, ct.scale[1], ct.scale[2])
        translate = (ct.translate[0] + 40 * ct.scale[0] + 0.5 * ct.scale[0], ct.translate[1], ct.translate[2])
        thick_layer = viewer.add_image(thick, name="thick 6 mm", scale=scale, translate=translate,
                                       contrast_limits=ct.contrast_limits, metadata={"modality": "CT"})
        ct.visible = False
        s.run("sr", {"factor": 2, "planes": "coronal"}, preview=False, layer=thick_layer)
        viewer.dims.ndisplay = 2
        viewer.dims.order = (1, 0, 2)  # coronal: slice axis vertical on screen
        s.grid(True)
        thick_layer.visible = True
        s.shot("tab_sr")
        viewer.dims.order = (0, 1, 2)
        s.hide_results()
    if want("tab_synthesis"):
        result, = s.run("synthesize", {"slices": 64, "steps": 20}, preview=False)
        ct.visible = False
        viewer.dims.order = (1, 0, 2)
        bring_into_view(viewer, result)  # again, for the coronal order
        s.shot("tab_synthesis")
        viewer.dims.order = (0, 1, 2)
        s.hide_results()
    if want("tab_samples"):
        tab = s.panel.task_tabs["sample_images"]
        if tab.model_combo.currentData() is None:
            print("tab_samples: no 2D image prior installed, skipped", flush=True)
        else:
            ct.visible = False
            viewer_grid(viewer).enabled = False
            samples, = s.run("sample_images", {"count": 8, "steps": 20}, preview=False)
            s.shot("tab_samples")
            samples.visible = False
            ct.visible = True
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
