"""A DICOM SEG opened alone while its CT series is loaded goes on that
layer's grid, voxel for voxel (issue 17); without the series it keeps its
own frame of reference. ``regrid_segmentation`` paints a SEG opened first
onto its series read afterwards.

The CT series and SEGs are built from the real abdominal CT as in
tests/test_seg.py (its fixture and helpers are imported, not copied).
"""
from __future__ import annotations

import re
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from napari_mediffuse import io, plugin
from napari_mediffuse.io.dicom import DicomReadWarning, read_dicom
from napari_mediffuse.io.dicom.seg import regrid_segmentation
from napari_mediffuse.io.geometry import resample_to_grid
from napari_mediffuse.layers import layer_to_volume
from test_dicom_series import ct_dataset
from test_seg import ct_files, expected_masks, write_seg  # noqa: F401 (ct_files: fixture)

#: Labels the SEG of expected_masks(overlap=False) marks, in CT voxel order.
LIVER_VOXELS, LESION_VOXELS = 4 * 20 * 20, 2 * 8 * 10


def expected_labels(shape=(10, 48, 48)) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    for number, mask in expected_masks(overlap=False).items():
        labels[mask] = number
    return labels


@pytest.fixture
def seg_alone(tmp_path, ct_files):  # noqa: F811
    """The organs SEG of the CT series, alone in its own folder."""
    folder = tmp_path / "seg"
    folder.mkdir()
    return write_seg(ct_files, folder / "seg.dcm", expected_masks(overlap=False))


@pytest.fixture
def notifications(monkeypatch):
    """Error messages the reader shows in napari."""
    shown = []
    monkeypatch.setattr(plugin, "_notify_error", shown.append)
    return shown


def assert_on_ct_grid(labels, ct):
    """``labels`` (a napari Labels layer) overlays ``ct`` voxel for voxel and
    holds the SEG's segments on the exact CT voxels it marked."""
    assert labels.data.shape == ct.data.shape == (10, 48, 48)
    np.testing.assert_allclose(labels.scale, ct.scale, atol=1e-9)
    np.testing.assert_allclose(labels.translate, ct.translate, atol=1e-9)
    for index in [(0, 0, 0), (9, 47, 47), (2, 10, 8)]:
        np.testing.assert_allclose(labels.data_to_world(index), ct.data_to_world(index), atol=1e-9)
    np.testing.assert_array_equal(np.asarray(labels.data), expected_labels())
    assert np.count_nonzero(labels.data == 1) == LIVER_VOXELS
    assert np.count_nonzero(labels.data == 2) == LESION_VOXELS
    # liver on slices 2, 3, 6, 7 only (never interpolated on 4, 5); lesion on 3 and 6
    assert labels.data[2, 10, 8] == labels.data[7, 29, 27] == 1 and labels.data[4, 15, 15] == 0
    assert labels.data[3, 32, 30] == labels.data[6, 39, 39] == 2 and labels.data[3, 31, 30] == 0
    assert labels.features["segment"].tolist() == ["background", "liver", "lesion"]
    assert tuple(labels.colormap.map(1))[:3] == pytest.approx((200 / 255, 30 / 255, 30 / 255))
    assert labels.metadata["on_referenced_grid"] is True
    assert labels.metadata["referenced_layer"] == ct.name
    # A task given the labels as a mask gets the CT's grid.
    mask, scan = layer_to_volume(labels), layer_to_volume(ct)
    assert mask.data.shape == scan.data.shape
    np.testing.assert_allclose(mask.affine, scan.affine, atol=1e-9)


@pytest.mark.gui
def test_seg_dropped_alone_opens_on_the_loaded_series_grid(make_napari_viewer, ct_files,  # noqa: F811
                                                           seg_alone):
    import napari

    viewer = make_napari_viewer()
    (ct,) = viewer.open(str(ct_files[0].parent), plugin="napari-mediffuse")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DicomReadWarning)  # no "own frame of reference" note
        (labels,) = viewer.open(str(seg_alone), plugin="napari-mediffuse")
    assert isinstance(labels, napari.layers.Labels) and labels.name == "organs (SEG)"
    assert_on_ct_grid(labels, ct)
    assert labels.metadata["warnings"] == []
    assert len(viewer.layers) == 2
    # The CT layer moved 1 m away covers none of the segmented voxels: own frame, with a note.
    ct.translate = np.asarray(ct.translate) + [1000.0, 0.0, 0.0]
    with pytest.warns(DicomReadWarning) as record:
        (again,) = viewer.open(str(seg_alone), plugin="napari-mediffuse")
    assert [str(w.message) for w in record][0] == (
        f"{seg_alone}: none of its segmented voxels lies on the loaded layer '{ct.name}'")
    assert again.data.shape == (6, 48, 48) and again.metadata["on_referenced_grid"] is False
    assert np.count_nonzero(again.data == 1) == LIVER_VOXELS


@pytest.mark.gui
def test_panel_open_folder_of_a_seg_alone_uses_the_loaded_series(make_napari_viewer, ct_files,  # noqa: F811
                                                                 seg_alone):
    from napari_mediffuse.gui.panel import MediffusePanel

    viewer = make_napari_viewer()
    panel = MediffusePanel(viewer)
    (ct,) = viewer.open(str(ct_files[0].parent), plugin="napari-mediffuse")
    (labels,) = panel.scan.open_folder(seg_alone.parent)
    assert_on_ct_grid(labels, ct)


@pytest.mark.gui
def test_series_loaded_twice_takes_the_visible_layer_and_says_so(make_napari_viewer, ct_files,  # noqa: F811
                                                                 seg_alone):
    viewer = make_napari_viewer()
    (first,) = viewer.open(str(ct_files[0].parent), plugin="napari-mediffuse")
    (second,) = viewer.open(str(ct_files[0].parent), plugin="napari-mediffuse")
    first.visible = False
    with pytest.warns(DicomReadWarning) as record:
        (labels,) = viewer.open(str(seg_alone), plugin="napari-mediffuse")
    note = (f"{seg_alone}: its series is loaded 2 times ('{second.name}', '{first.name}'); "
            f"the segmentation opens on the grid of '{second.name}'")
    assert [str(w.message) for w in record] == [note]
    assert labels.metadata["warnings"] == [note]
    assert_on_ct_grid(labels, second)


@pytest.mark.gui
def test_seg_of_a_series_not_loaded_keeps_its_own_frame(make_napari_viewer, tmp_path, ct_files):  # noqa: F811
    """A CT of another series is loaded: the SEG opens on its own frame, as
    headless (6 slices from the first to the last segmented one)."""
    other = write_seg(ct_files, tmp_path / "other.dcm", expected_masks(overlap=False),
                      series_uid=generate_uid())
    with pytest.warns(DicomReadWarning, match="opens on its own frame of reference"):
        ((data, kwargs, kind),) = plugin.read_layers(str(other))  # headless: no viewer
    assert kind == "labels" and data.shape == (6, 48, 48)
    assert kwargs["metadata"]["on_referenced_grid"] is False
    viewer = make_napari_viewer()
    (ct,) = viewer.open(str(ct_files[0].parent), plugin="napari-mediffuse")
    with pytest.warns(DicomReadWarning, match="opens on its own frame of reference"):
        (labels,) = viewer.open(str(other), plugin="napari-mediffuse")
    assert labels.data.shape == (6, 48, 48) and labels.metadata["on_referenced_grid"] is False
    assert "referenced_layer" not in labels.metadata
    np.testing.assert_array_equal(np.asarray(labels.data), expected_labels()[2:8])
    # ... and still in the CT's patient coordinates: slice 0 of it is CT slice 2
    np.testing.assert_allclose(labels.data_to_world((0, 10, 8)), ct.data_to_world((2, 10, 8)), atol=1e-3)


@pytest.mark.gui
def test_bad_seg_with_its_series_loaded_is_one_line_and_loses_nothing(make_napari_viewer, tmp_path,
                                                                      ct_files, seg_alone,  # noqa: F811
                                                                      notifications):
    viewer = make_napari_viewer()
    viewer.open(str(ct_files[0].parent), plugin="napari-mediffuse")
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(seg_alone.read_bytes()[:-2000])  # pixel data cut short
    viewer.open(str(broken), plugin="napari-mediffuse")
    (message,) = notifications
    assert message.startswith(f"{broken} is a DICOM SEG ") and "\n" not in message
    assert [layer.name for layer in viewer.layers] == ["abdomen (CT)"]


def test_regrid_paints_a_seg_opened_first_onto_its_series(tmp_path, ct_files, seg_alone):  # noqa: F811
    with pytest.warns(DicomReadWarning):
        (own,) = read_dicom(seg_alone)
    (ct,) = read_dicom(ct_files[0].parent)
    (labels,) = regrid_segmentation(own, ct)
    assert labels.data.shape == ct.data.shape and labels.layout == ct.layout
    np.testing.assert_allclose(labels.affine, ct.affine)
    np.testing.assert_array_equal(labels.data, expected_labels())
    assert labels.metadata["on_referenced_grid"] and labels.metadata["warnings"] == []
    assert {n: s["label"] for n, s in labels.metadata["segments"].items()} == {1: "liver", 2: "lesion"}
    # Another series (same patient coordinates assumed): painted, with a note.
    other = ct.with_data(ct.data)
    other.metadata["series_instance_uid"], other.name = generate_uid(), "other (CT)"
    (labels,) = regrid_segmentation(own, other)
    np.testing.assert_array_equal(labels.data, expected_labels())
    assert not labels.metadata["on_referenced_grid"]
    assert labels.metadata["warnings"] == [
        f"{seg_alone}: painted on 'other (CT)', a series it does not reference "
        "(the same patient coordinates are assumed)"]
    # Bad input: one line naming what and why.
    with pytest.raises(io.ReadError, match=r"^abdomen \(CT\): not a DICOM SEG read from one file"):
        regrid_segmentation(ct, ct)
    seg_alone.unlink()
    with pytest.raises(io.ReadError, match=f"^{re.escape(str(seg_alone))}: no such file"):
        regrid_segmentation(own, ct)


def oblique_ct(folder, ct_files, degrees=20.0):  # noqa: F811
    """The same 10 slices, tilted ``degrees`` about the patient's left-right
    axis (a proper oblique acquisition: positions along the slice normal)."""
    folder.mkdir(parents=True)
    angle = np.radians(degrees)
    rows, cols = np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(angle), np.sin(angle)])
    normal = np.cross(rows, cols)
    series_uid, study_uid = generate_uid(), generate_uid()
    files = []
    for k, source in enumerate(ct_files):
        hu = pydicom.dcmread(source).pixel_array.astype(np.int16) - 1024
        position = np.array([-16.8, -120.4, -80.0]) + 2.5 * k * normal
        ds = ct_dataset(hu, position, series_uid=series_uid, study_uid=study_uid, instance=k + 1,
                        iop=[*rows, *cols], description="oblique")
        files.append(folder / f"slice{k:03d}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    return files


@pytest.mark.gui
def test_seg_of_an_oblique_series_overlays_its_resampled_layer(make_napari_viewer, tmp_path,
                                                              ct_files):  # noqa: F811
    """The oblique CT is shown resampled; its SEG is painted on the CT's
    original grid and shown resampled onto the same display grid, so it
    overlays the layer voxel for voxel and gives the tasks the original grid."""
    files = oblique_ct(tmp_path / "oblique", ct_files)
    seg = write_seg(files, tmp_path / "seg.dcm", expected_masks(overlap=False))
    viewer = make_napari_viewer()
    (ct,) = viewer.open(str(tmp_path / "oblique"), plugin="napari-mediffuse")
    assert "resampled" in ct.metadata["display_note"]
    (labels,) = viewer.open(str(seg), plugin="napari-mediffuse")
    assert labels.data.shape == ct.data.shape
    np.testing.assert_allclose(labels.scale, ct.scale, atol=1e-9)
    np.testing.assert_allclose(labels.translate, ct.translate, atol=1e-9)
    assert labels.metadata["on_referenced_grid"] and labels.metadata["referenced_layer"] == ct.name
    assert labels.metadata["warnings"] == [labels.metadata["display_note"]]  # on the grid: no other note
    # The tasks' grid: the CT's original voxels, each segment on the voxels the SEG marked.
    mask, scan = layer_to_volume(labels), layer_to_volume(ct)
    assert mask.data.shape == scan.data.shape == (10, 48, 48)
    np.testing.assert_allclose(mask.affine, scan.affine, atol=1e-9)
    np.testing.assert_array_equal(mask.data, expected_labels())
    # What napari draws: those labels, nearest, on the CT layer's display grid.
    shown = resample_to_grid(expected_labels(), scan.affine, ct.metadata["display_affine"],
                             ct.data.shape, order=0, cval=0.0)
    np.testing.assert_array_equal(np.asarray(labels.data), shown)
    assert np.count_nonzero(labels.data == 1) > 0.9 * LIVER_VOXELS  # same spacing: about as many
