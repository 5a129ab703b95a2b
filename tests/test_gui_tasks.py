"""Task tabs in a real viewer: runs off the GUI thread, results, cancel, bad input."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui


@pytest.fixture
def panel(make_napari_viewer, tiny_translation_models):
    from napari_mediffuse.gui.panel import MediffusePanel

    viewer = make_napari_viewer()
    panel = MediffusePanel(viewer)
    viewer.window.add_dock_widget(panel)
    return viewer, panel


def _wait(qtbot, tab, timeout=120_000):
    qtbot.waitUntil(lambda: tab.worker is None, timeout=timeout)


def _run(qtbot, tab, **values) -> list:
    """Set parameters, run the tab to the end, return the layers it added."""
    for name, value in values.items():
        tab.param_widgets[name].value = value
    tab.start()
    _wait(qtbot, tab)
    assert tab.last_error == ""
    return tab.last_result


def _assert_on_grid_of(result, layer):
    assert result.data.shape == layer.data.shape
    np.testing.assert_allclose(result.scale, layer.scale)
    np.testing.assert_allclose(result.translate, layer.translate)


def test_synthesis_tab_adds_synthetic_ct_layer(panel, qtbot):
    viewer, panel = panel
    tab = panel.task_tabs["synthesize"]
    assert tab.model_combo.count() == 1 and "tiny-ct-prior" in tab.model_combo.currentText()
    assert "tiny-ct-prior" in tab.model_summary.text() and "models" in tab.model_summary.text()
    tab.param_widgets["slices"].value = 16
    tab.param_widgets["rows"].value = 20
    tab.param_widgets["columns"].value = 24
    tab.param_widgets["steps"].value = 2
    tab.start()
    assert tab.worker is not None and not tab.run_button.isEnabled()
    qtbot.waitUntil(lambda: tab._napari_progress is not None or tab.worker is None, timeout=60_000)
    seen_napari_progress = tab._napari_progress is not None
    _wait(qtbot, tab)
    assert seen_napari_progress and tab._napari_progress is None  # closed when done
    assert tab.last_error == ""
    (layer,) = tab.last_result
    assert layer.data.shape == (16, 20, 24)
    assert tuple(layer.scale) == pytest.approx((3.0, 3.0, 3.0))
    assert layer.metadata["synthetic"] is True and "synthetic" in layer.name
    assert layer.metadata["modality"] == "CT"
    assert tuple(layer.contrast_limits) == pytest.approx((-160.0, 240.0))
    # no coarse prior among the test's models: drawn from noise in alternating planes; the correlation
    # spin box, left at its default, leaves the slices independent there
    params = layer.metadata["parameters"]
    assert params["coarse_model"] is None and params["planes"] == ["axial", "coronal", "sagittal"]
    assert tab.param_widgets["slice_correlation"].value == pytest.approx(0.97)
    assert params["slice_correlation"] == 0.0
    tab.param_widgets["slice_correlation"].value = 0.5  # moved by the user: taken as it is
    tab.start()
    _wait(qtbot, tab)
    assert tab.last_result[0].metadata["parameters"]["slice_correlation"] == pytest.approx(0.5)


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


@pytest.fixture
def ct_crop_layer(ct_small_path, panel):
    """A small crop of the real CT opened through the plugin (HU, 3 mm).

    Tests taking it list ``ct_small_path`` before ``panel``, so a missing
    scan skips before a viewer and panel are built."""
    viewer, _ = panel
    (layer,) = viewer.open(str(ct_small_path), plugin="napari-mediffuse")
    layer.data = np.ascontiguousarray(layer.data[10:14, 20:60, 30:80])
    return layer


def test_denoise_tab_result_shares_geometry(ct_small_path, panel, ct_crop_layer, qtbot):
    viewer, panel = panel
    tab = panel.task_tabs["denoise"]
    assert tab.input_combo.currentText() == ct_crop_layer.name
    (result,) = _run(qtbot, tab, method="nlm")
    _assert_on_grid_of(result, ct_crop_layer)
    assert result.metadata["modality"] == "CT" and "denoised" in result.name
    # NLM smooths: less high-frequency energy than the input, same mean HU within a few HU
    assert np.abs(np.diff(result.data, axis=2)).mean() < np.abs(np.diff(ct_crop_layer.data, axis=2)).mean()
    assert abs(float(result.data.mean()) - float(ct_crop_layer.data.mean())) < 10


def test_bad_inputs_get_clear_messages(ct_small_path, mr_lps_path, panel, ct_crop_layer):
    viewer, panel = panel
    tab = panel.task_tabs["denoise"]
    (mr,) = viewer.open(str(mr_lps_path), plugin="napari-mediffuse")
    assert mr.name not in [tab.input_combo.itemText(i) for i in range(tab.input_combo.count())]
    tab.start(layer=mr)
    assert "is MR; it needs a CT volume" in tab.last_error and tab.worker is None
    flat = viewer.add_image(np.zeros((20, 30), np.float32), name="photo", metadata={"modality": "CT"})
    tab.start(layer=flat)
    assert "'photo' is a 2D image layer" in tab.last_error
    n_layers = len(viewer.layers)
    inpaint = panel.task_tabs["inpaint"]
    inpaint.start()
    inpaint_error = inpaint.last_error
    if inpaint.worker is not None:  # the mask check runs in the worker
        import time
        while inpaint.worker is not None:
            time.sleep(0.05)
            from qtpy.QtWidgets import QApplication
            QApplication.processEvents()
        inpaint_error = inpaint.last_error
    assert "Labels layer" in inpaint_error
    assert len(viewer.layers) == n_layers


def test_anomaly_tab_adds_heatmap_and_mask_on_ct_grid(ct_small_path, panel, ct_crop_layer, qtbot):
    viewer, panel = panel
    tab = panel.task_tabs["anomaly"]
    kinds = {type(layer).__name__: layer
             for layer in _run(qtbot, tab, t=200, steps=2, ensemble=1, polarity="darker", match_level=True,
                               smooth_mm=6.0, region="abdomen")}
    heat, mask = kinds["Image"], kinds["Labels"]
    for layer in (heat, mask):
        _assert_on_grid_of(layer, ct_crop_layer)
    assert "t=200" in heat.name and "t=200" in mask.name
    # the panel's choices reach the task
    params = heat.metadata["parameters"]
    assert params["polarity"] == "darker" and params["match_level"] is True and params["smooth_mm"] == 6.0
    assert params["region"] == "abdomen"
    assert heat.blending == "additive" and heat.colormap.name in ("inferno", "turbo")


def test_anomaly_tab_runs_the_learned_method_with_a_healing_model(ct_small_path, panel, ct_crop_layer, qtbot):
    from test_anomaly_learned import save_zero_healer

    viewer, panel = panel
    tab = panel.task_tabs["anomaly"]
    folder = next(p.parent for p in tab_model_paths(tab))  # the test's models folder
    save_zero_healer(folder / "zero-healer")
    tab.refresh_models()
    labels = [tab.model_combo.itemText(i) for i in range(tab.model_combo.count())]
    assert any("zero-healer" in label for label in labels) and any("tiny-ct-prior" in label for label in labels)
    tab.model_combo.setCurrentIndex(next(i for i, label in enumerate(labels) if "zero-healer" in label))
    heat, mask = (layer for layer in _run(qtbot, tab, method="learned", ensemble=1))
    _assert_on_grid_of(heat, ct_crop_layer)
    assert heat.metadata["parameters"]["method"] == "learned" and "learned" in heat.name
    assert int(np.asarray(mask.data).sum()) == 0  # a healer that changes nothing flags nothing
    # the prior chosen with the learned method: the task says which kind of model it needs
    tab.model_combo.setCurrentIndex(next(i for i, label in enumerate(labels) if "tiny-ct-prior" in label))
    tab.start()
    _wait(qtbot, tab)
    assert "this needs a 'lesion_segmentation' model or a 'lesion_healing' model" in tab.last_error


def tab_model_paths(tab):
    from pathlib import Path

    return [Path(tab.model_combo.itemData(i)) for i in range(tab.model_combo.count())]


def test_preview_runs_only_the_slice_under_the_slider(ct_small_path, panel, ct_crop_layer, qtbot):
    viewer, panel = panel
    tab = panel.task_tabs["denoise"]
    tab.param_widgets["method"].value = "nlm"
    index = 2
    viewer.dims.set_point(0, ct_crop_layer.translate[0] + index * ct_crop_layer.scale[0])
    tab.preview_check.setChecked(True)
    (result,) = _run(qtbot, tab)
    assert result.data.shape == (1,) + ct_crop_layer.data.shape[1:]
    assert "preview" in result.name
    # the one slice sits exactly on the input slice it came from (mm)
    assert result.translate[0] == pytest.approx(ct_crop_layer.translate[0] + index * ct_crop_layer.scale[0])
    np.testing.assert_allclose(result.translate[1:], ct_crop_layer.translate[1:])
    assert abs(float(result.data.mean()) - float(ct_crop_layer.data[index].mean())) < 10


def test_sr_tab_adds_thin_slices_in_the_same_space(ct_small_path, panel, ct_crop_layer, qtbot):
    viewer, panel = panel
    tab = panel.task_tabs["sr"]
    factor = 3
    (result,) = _run(qtbot, tab, factor=factor, steps=1, planes="coronal")
    n, rows, cols = ct_crop_layer.data.shape
    assert result.data.shape == (n * factor, rows, cols)
    np.testing.assert_allclose(result.scale, (3.0 / factor, 3.0, 3.0))
    # each group of thin slices is centred on its thick slice (mm)
    thin_centre = result.translate[0] + (factor - 1) / 2 * result.scale[0]
    assert thin_centre == pytest.approx(ct_crop_layer.translate[0])
    np.testing.assert_allclose(result.translate[1:], ct_crop_layer.translate[1:])
    # averaging the thin slices gives back the thick ones (HU)
    slabs = result.data.reshape(n, factor, rows, cols).mean(axis=1)
    assert np.abs(slabs - ct_crop_layer.data).mean() < 40


def test_inpaint_tab_replaces_only_the_painted_voxels(ct_small_path, panel, ct_crop_layer, qtbot):
    viewer, panel = panel
    mask = np.zeros(ct_crop_layer.data.shape, np.uint8)
    mask[1:3, 15:25, 20:30] = 1
    viewer.add_labels(mask, name="lesion", scale=ct_crop_layer.scale, translate=ct_crop_layer.translate)
    tab = panel.task_tabs["inpaint"]
    tab.param_widgets["mask"].reset_choices()
    (result,) = _run(qtbot, tab, mask="lesion", steps=2, resample=0, region="abdomen")
    assert result.metadata["parameters"]["region"] == "abdomen"
    _assert_on_grid_of(result, ct_crop_layer)
    inside = mask > 0
    np.testing.assert_allclose(result.data[~inside], ct_crop_layer.data[~inside], atol=0.5)
    assert np.abs(result.data[inside] - ct_crop_layer.data[inside]).mean() > 1.0


@pytest.mark.parametrize("source", ["CT", "MR"])
def test_translate_tab_marks_synthetic_on_input_grid(ct_small_path, mr_lps_path, panel, ct_crop_layer, source,
                                                     qtbot):
    viewer, panel = panel
    if source == "MR":
        (layer,) = viewer.open(str(mr_lps_path), plugin="napari-mediffuse")
        layer.data = np.ascontiguousarray(layer.data[:3, 20:60, 20:60])
    else:
        layer = ct_crop_layer
    tab = panel.task_tabs["translate"]
    tab.refresh_inputs()
    tab.input_combo.setCurrentText(layer.name)
    # the model chooser follows the input: only models translating from its modality
    direction = "ct2mr" if source == "CT" else "mr2ct"
    assert tab.model_combo.count() == 1 and f"tiny-{direction}" in tab.model_combo.currentText()
    (result,) = _run(qtbot, tab, steps=1, guidance=1.0)
    _assert_on_grid_of(result, layer)
    assert result.metadata["synthetic"] is True and "synthetic" in result.name
    assert result.metadata["modality"] == ("MR" if source == "CT" else "CT")


def test_2d_samples_tab_adds_an_image_stack(panel, tiny_models, qtbot):
    from conftest import save_tiny_checkpoint

    save_tiny_checkpoint(tiny_models / "tiny-image-prior", name="tiny-image-prior", task="image_prior",
                         modality="MR", summary="tiny 2D prior for tests")
    viewer, panel = panel
    # a scan far from the samples' 0..2 stack: its slider position must not hide them
    viewer.add_image(np.zeros((40, 8, 8), np.float32), scale=(3.0, 1.0, 1.0), translate=(200.0, 0.0, 0.0))
    viewer.dims.set_point(0, 260.0)
    tab = panel.task_tabs["sample_images"]
    tab.refresh_models()
    assert "tiny-image-prior" in tab.model_combo.currentText()
    assert "tiny 2D prior for tests" in tab.model_summary.text()
    (layer,) = _run(qtbot, tab, count=3, steps=2)
    assert layer.data.shape == (3, 16, 16)  # the checkpoint's 16-pixel patch size
    assert 0.0 <= float(layer.data.min()) and float(layer.data.max()) <= 1.0
    assert layer.metadata["synthetic"] is True and "synthetic" in layer.name
    assert viewer.dims.point[0] == pytest.approx(1.0)  # the middle sample is on screen
    assert tuple(viewer.camera.center[-2:]) == pytest.approx((7.5, 7.5))  # framed on the samples


def test_batch_size_zero_leaves_the_batch_to_the_device(panel, ct_crop_layer, qtbot, monkeypatch):
    viewer, panel = panel
    tab = panel.task_tabs["denoise"]
    seen = []

    def run(volume, values, options):
        seen.append(options.batch_size)
        return []
    monkeypatch.setattr(tab.spec, "run", run)
    assert tab.param_widgets["batch_size"].value == 0  # automatic by default
    _run(qtbot, tab)
    _run(qtbot, tab, batch_size=6)
    assert seen == [None, 6]  # None: 32 on a CUDA GPU, 4 elsewhere (engine.devices.resolve_batch_size)
