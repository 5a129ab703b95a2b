"""npe2 contributions (reader, writers, sample) and a real napari viewer."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from napari_mediffuse import io, plugin
from napari_mediffuse.display import ct_preset_limits
from napari_mediffuse.io.volume import RAS_TO_WORLD


def test_manifest_validates():
    npe2 = shutil.which("npe2")
    cmd = [npe2, "validate", "napari-mediffuse"] if npe2 else [sys.executable, "-m", "npe2", "validate", "napari-mediffuse"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_reader_gives_ct_layer_with_geometry_and_soft_tissue_window(ct_small_path):
    reader = plugin.get_reader(str(ct_small_path))
    assert reader is not None
    (data, kwargs, layer_type), = reader(str(ct_small_path))
    assert layer_type == "image"
    assert kwargs["scale"] == pytest.approx((3.0, 3.0, 3.0), abs=1e-4)
    meta = kwargs["metadata"]
    assert meta["modality"] == "CT" and meta["source_path"] == str(ct_small_path)
    affine = meta["affine"]
    np.testing.assert_allclose(kwargs["translate"], RAS_TO_WORLD @ affine[:3, 3])
    assert kwargs["contrast_limits"] == pytest.approx((-160.0, 240.0))  # soft tissue W400 L40
    assert data.dtype.kind in "iu" and data.min() < -900  # HU kept, not rescaled


def test_reader_declines_unknown_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    assert plugin.get_reader(str(text)) is None


def test_reader_turns_errors_into_notification_not_exception(tmp_path, caplog):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"\0" * 50)
    assert plugin.read_layers(str(bad)) == [(None,)]
    assert "broken.dcm" in caplog.text


def test_dicom_folder_reads_through_plugin_in_hu():
    path = get_testdata_file("CT_small.dcm")
    (data, kwargs, _), = plugin.read_layers(path)
    assert kwargs["metadata"]["modality"] == "CT"
    assert kwargs["scale"][1:] == pytest.approx((0.661468, 0.661468), abs=1e-5)
    # HU = stored value * RescaleSlope + RescaleIntercept (-1024 here)
    ds = pydicom.dcmread(path)
    assert float(ds.RescaleIntercept) == -1024.0
    hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    # the reader reorients to (S, P, L): compare value distributions and one voxel by position
    assert sorted(data.ravel().tolist()) == sorted(hu.ravel().tolist())
    assert data.min() == hu.min() and data.min() < -800


def test_image_writer_round_trip_and_no_overwrite(tmp_path, mr_lps_path):
    (data, kwargs, _), = plugin.read_layers(str(mr_lps_path))
    out = tmp_path / "mr.nii.gz"
    assert plugin.write_image(str(out), data, kwargs) == [str(out)]
    back = io.read_nifti(out)
    np.testing.assert_array_equal(back.data, data)
    np.testing.assert_allclose(back.affine, kwargs["metadata"]["affine"], atol=1e-6)
    with pytest.raises(io.WriteError, match="exists"):
        plugin.write_image(str(out), data, kwargs)


def test_labels_writer_uses_layer_scale_when_no_metadata(tmp_path):
    labels = np.zeros((4, 5, 6), dtype=np.int32)
    labels[1, 2, 3] = 7
    attrs = {"name": "mask", "scale": (2.0, 1.0, 0.5), "translate": (10.0, -5.0, 3.0), "metadata": {}}
    out = tmp_path / "mask.nii.gz"
    plugin.write_labels(str(out), labels, attrs)
    back = io.read_nifti(out)
    assert back.data.dtype == np.uint8
    assert back.spacing == pytest.approx((2.0, 1.0, 0.5))
    np.testing.assert_array_equal(back.data, labels)
    # world (S, P, L) of voxel (1, 2, 3) = translate + index * scale
    ras = back.affine @ np.array([1, 2, 3, 1.0])
    np.testing.assert_allclose(RAS_TO_WORLD @ ras[:3], [12.0, -3.0, 4.5])


def test_sample_data_is_real_ct_in_hu():
    (data, kwargs, _), = plugin.sample_abdomen_ct()
    assert data.shape == (112, 101, 122)
    assert kwargs["scale"] == pytest.approx((3.0, 3.0, 3.0), abs=1e-4)
    assert kwargs["metadata"]["modality"] == "CT"
    liver_like = data[(data > 0) & (data < 200)]
    assert 30 < np.median(liver_like) < 150  # enhanced soft tissue


# -- a real viewer ---------------------------------------------------------------

@pytest.mark.gui
def test_viewer_opens_scan_through_plugin_and_panel_windows_it(make_napari_viewer, ct_small_path):
    from napari_mediffuse.gui.panel import MediffusePanel

    viewer = make_napari_viewer()
    layers = viewer.open(str(ct_small_path), plugin="napari-mediffuse")
    assert len(layers) == 1
    layer = layers[0]
    assert tuple(layer.scale) == pytest.approx((3.0, 3.0, 3.0), abs=1e-4)
    assert layer.metadata["modality"] == "CT"
    assert tuple(layer.contrast_limits) == pytest.approx((-160.0, 240.0))

    panel = MediffusePanel(viewer)
    viewer.window.add_dock_widget(panel)
    assert panel.scan.layer_combo.currentText() == layer.name
    assert "3 x 3 x 3 mm" in panel.scan.info.text()
    panel.scan.window_combo.setCurrentText("lung")
    assert tuple(layer.contrast_limits) == pytest.approx(ct_preset_limits("lung"))


@pytest.mark.gui
def test_viewer_survives_bad_file_and_keeps_loaded_layers(make_napari_viewer, tmp_path, ct_small_path):
    from napari_mediffuse.gui.panel import MediffusePanel

    viewer = make_napari_viewer()
    viewer.open(str(ct_small_path), plugin="napari-mediffuse")
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    viewer.open(str(bad), plugin="napari-mediffuse")
    assert len(viewer.layers) == 1  # nothing lost, nothing added
    empty = tmp_path / "empty"
    empty.mkdir()
    panel = MediffusePanel(viewer)
    assert panel.scan.open_folder(empty) == []
    assert len(viewer.layers) == 1


@pytest.mark.gui
def test_panel_opens_dicom_folder_and_exports_derived_series(make_napari_viewer, tmp_path):
    from napari_mediffuse.gui.panel import MediffusePanel

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), src / "a.dcm")
    viewer = make_napari_viewer()
    panel = MediffusePanel(viewer)
    added = panel.scan.open_folder(src)
    assert len(added) == 1 and added[0].metadata["modality"] == "CT"
    files = panel.scan.export_dicom(tmp_path / "derived")
    assert len(files) == 1
    (back,) = io.read_dicom(tmp_path / "derived")
    np.testing.assert_array_equal(back.data, added[0].data)
    assert back.metadata["series_instance_uid"] != added[0].metadata["series_instance_uid"]


@pytest.mark.gui
def test_compare_side_by_side_and_linked_contrast(make_napari_viewer, ct_small_path):
    from napari_mediffuse.gui.panel import MediffusePanel

    viewer = make_napari_viewer()
    (ct,) = viewer.open(str(ct_small_path), plugin="napari-mediffuse")
    other = viewer.add_image(ct.data.astype("float32") + 10, scale=ct.scale, translate=ct.translate,
                             contrast_limits=(0, 100), name="result")
    panel = MediffusePanel(viewer)
    panel.compare.grid_button.setChecked(True)
    from napari_mediffuse.gui.panel import viewer_grid

    assert viewer_grid(viewer).enabled
    viewer.layers.selection = {ct, other}
    assert len(panel.compare.link_selected_contrast()) == 2
    ct.contrast_limits = (-1000, 1000)
    assert tuple(other.contrast_limits) == pytest.approx((-1000, 1000))


def test_swipe_crop_keeps_world_position():
    from napari_mediffuse.layers import swipe_crop

    data = np.arange(4 * 6 * 10).reshape(4, 6, 10)
    view, translate = swipe_crop(data, (3.0, 0.8, 0.7), (-50.0, 10.0, 20.0), axis=2, fraction=0.3)
    assert view.shape == (4, 6, 7) and np.shares_memory(view, data)
    # voxel (0, 0, 3) stays at x = 20 + 3 * 0.7 mm
    assert translate == pytest.approx((-50.0, 10.0, 22.1))
    assert view[0, 0, 0] == data[0, 0, 3]
    assert swipe_crop(data, (1, 1, 1), (0, 0, 0), axis=2, fraction=1.0)[0].shape[2] == 1
    with pytest.raises(ValueError, match="between 0 and 1"):
        swipe_crop(data, (1, 1, 1), (0, 0, 0), axis=2, fraction=1.5)


@pytest.mark.gui
def test_swipe_shows_input_left_and_result_right(make_napari_viewer, ct_small_path):
    from napari_mediffuse.gui.panel import MediffusePanel

    viewer = make_napari_viewer(show=True)
    (ct,) = viewer.open(str(ct_small_path), plugin="napari-mediffuse")
    ct.contrast_limits = (-2000, 2000)
    flat_input = viewer.add_image(np.full(ct.data.shape, -2000.0, np.float32), scale=ct.scale,
                                  translate=ct.translate, contrast_limits=(-2000, 2000), name="input")
    result = viewer.add_image(np.full(ct.data.shape, 2000.0, np.float32), scale=ct.scale,
                              translate=ct.translate, contrast_limits=(-2000, 2000), name="result")
    ct.visible = False
    panel = MediffusePanel(viewer)
    box = panel.swipe
    assert box.layer_combo.currentText() == "result"  # topmost first
    n_layers = len(viewer.layers)
    box.slider.setValue(250)
    box.button.setChecked(True)
    swipe = box.swipe_layer
    assert swipe is not None and not result.visible
    assert viewer.layers.index(swipe) == viewer.layers.index(result) + 1
    assert swipe.name not in [box.layer_combo.itemText(i) for i in range(box.layer_combo.count())]
    columns = ct.data.shape[2]
    start = round(0.25 * columns)
    assert swipe.data.shape[2] == columns - start
    assert swipe.translate[2] == pytest.approx(ct.translate[2] + start * ct.scale[2])

    def row_profile():
        image = viewer.screenshot(canvas_only=True, flash=False)[..., 0].astype(int)
        row = image[image.shape[0] // 2]
        inside = np.nonzero(row > 0)[0]  # the result is white; input black like the background
        return inside[0], inside[-1], row.shape[0]

    viewer.reset_view()
    first_white, last_white, width = row_profile()
    box.slider.setValue(750)
    first_white_later, last_white_later, _ = row_profile()
    assert first_white_later > first_white and last_white_later == pytest.approx(last_white, abs=2)
    # the line moved by half the image width on screen
    image_width = (last_white - first_white) / 0.75
    assert (first_white_later - first_white) == pytest.approx(0.5 * image_width, rel=0.05)
    # contrast stays linked while swiping; turning it off restores the layer list
    result.contrast_limits = (0, 4000)
    assert tuple(swipe.contrast_limits) == pytest.approx((0, 4000))
    box.button.setChecked(False)
    assert len(viewer.layers) == n_layers and result.visible and box.swipe_layer is None
    assert flat_input.visible


def test_slab_and_slice_range_keep_world_positions(ct_small_path):
    from napari_mediffuse.layers import image_layer_data, slice_range_layer_data

    (volume,) = io.read(ct_small_path)
    slab = volume.slab(5, 8)
    assert slab.data.shape[0] == 3
    # voxel (0, 10, 20) of the slab is voxel (5, 10, 20) of the volume, in RAS mm
    np.testing.assert_allclose(slab.affine @ [0, 10, 20, 1], volume.affine @ [5, 10, 20, 1])
    data, kwargs, kind = slice_range_layer_data(image_layer_data(slab), 1, 2)
    assert data.shape == (1,) + volume.data.shape[1:] and kind == "image"
    np.testing.assert_array_equal(data[0], volume.data[6])
    full = image_layer_data(volume)[1]
    assert kwargs["translate"][0] == pytest.approx(full["translate"][0] + 6 * full["scale"][0])
    np.testing.assert_allclose(kwargs["metadata"]["affine"] @ [0, 0, 0, 1], volume.affine @ [6, 0, 0, 1])
