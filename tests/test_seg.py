"""DICOM SEG and NIfTI label maps open as labels (segment names, colours,
the referenced series' grid); RTSTRUCT is refused with a clear message.

SEG objects are written with highdicom from a CT series built from the real
abdominal CT in ../shared/data (see tests/test_dicom_series.py).
"""
from __future__ import annotations

import shutil
import warnings

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from conftest import shared
from napari_mediffuse import io
from napari_mediffuse.io.dicom import DicomReadWarning, read_dicom
from napari_mediffuse.plugin import read_layers
from test_dicom_series import CROP, write_ct_series

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Liver on slices 2, 3, 6, 7 (none on 4, 5); a lesion on slices 3 and 6.
LIVER_SLICES, LESION_SLICES = (2, 3, 6, 7), (3, 6)


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory):
    """A 10-slice CT series (48 x 48, 2.5 mm) from the real abdominal CT."""
    img = nib.load(shared("ct/abdomen_ct_3mm.nii.gz"))
    data = np.transpose(np.asanyarray(img.dataobj)[:, :, 40:50], (2, 1, 0))[:, ::-1, ::-1]
    slices = np.ascontiguousarray(data[:, CROP[0], CROP[1]]).astype(np.int16)
    folder = tmp_path_factory.mktemp("series") / "ct"
    return write_ct_series(folder, slices, -80.0 + 2.5 * np.arange(10), description="abdomen")


def expected_masks(overlap: bool) -> dict[int, np.ndarray]:
    """Segment masks ``(10, 48, 48)`` in the source slices' order."""
    liver = np.zeros((10, 48, 48), bool)
    lesion = np.zeros((10, 48, 48), bool)
    for k in LIVER_SLICES:
        liver[k, 10:30, 8:28] = True
    for k in LESION_SLICES:
        lesion[k, 32:40, 30:40] = True
        if overlap:
            lesion[k, 20:26, 20:26] = True  # inside the liver
    if not overlap:
        liver &= ~lesion
    return {1: liver, 2: lesion}


def write_seg(ct_files, path, masks, *, series_uid=None):
    """A BINARY SEG of ``masks`` ({number: bool array}) referencing ``ct_files``."""
    sources = [pydicom.dcmread(f) for f in ct_files]
    if series_uid is not None:
        for ds in sources:
            ds.SeriesInstanceUID = series_uid
    names = {1: ("liver", codes.SCT.Tissue, codes.SCT.Liver),
             2: ("lesion", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm)}
    descriptions = [hd.seg.SegmentDescription(
        segment_number=n, segment_label=names[n][0], segmented_property_category=names[n][1],
        segmented_property_type=names[n][2], algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for n in sorted(masks)]
    descriptions[0].RecommendedDisplayCIELabValue = list(
        hd.color.CIELabColor.from_rgb(200, 30, 30).value)
    pixels = np.stack([masks[n] for n in sorted(masks)], axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=90,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="test",
        manufacturer_model_name="test", software_versions="0", device_serial_number="0",
        series_description="organs")
    seg.save_as(path)
    return path


def test_liver_seg_from_pydicom_data_opens_as_labels():
    path = get_testdata_file("liver.dcm")
    if path is None:
        pytest.skip("pydicom-data liver.dcm not available")
    with pytest.warns(DicomReadWarning, match="opens on its own frame of reference"):
        (vol,) = read_dicom(path)
    assert vol.metadata["layer_type"] == "labels" and vol.modality == "SEG"
    assert vol.data.dtype == np.uint8 and set(np.unique(vol.data)) == {0, 1}
    segment = vol.metadata["segments"][1]
    assert segment["label"] == "Liver" and segment["type"] == "Liver"
    assert segment["color"] == [221, 130, 101]  # its CIELab (41661, 41167, 40792)
    # Same voxels at the same patient positions as highdicom's own volume.
    ref = hd.seg.segread(path).get_volume(combine_segments=True)
    ref_ras = LPS_TO_RAS @ ref.affine
    ours = np.argwhere(vol.data > 0)
    points = vol.affine[:3, :3] @ ours.T + vol.affine[:3, 3:4]
    index = np.linalg.inv(ref_ras)[:3, :3] @ points + np.linalg.inv(ref_ras)[:3, 3:4]
    np.testing.assert_allclose(index, np.round(index), atol=1e-3)
    assert len(ours) == int(ref.array.sum()) == 107098
    assert np.all(ref.array[tuple(np.round(index).astype(int))] == 1)


def test_seg_with_its_series_is_on_the_series_grid_and_never_interpolated(tmp_path, ct_files):
    folder = tmp_path / "study"
    shutil.copytree(ct_files[0].parent, folder / "ct")
    write_seg(ct_files, folder / "seg.dcm", expected_masks(overlap=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DicomReadWarning)  # the normal case: nothing to say
        ct, labels = read_dicom(folder)
    assert ct.name == "abdomen (CT)" and labels.name == "organs (SEG)"
    np.testing.assert_allclose(labels.affine, ct.affine)
    assert labels.data.shape == ct.data.shape == (10, 48, 48)
    expected = np.zeros((10, 48, 48), np.uint8)
    for number, mask in expected_masks(overlap=False).items():
        expected[mask] = number
    np.testing.assert_array_equal(labels.data, expected)  # slices 4, 5 stay 0: no 0.11, 0.22
    assert labels.data.dtype == np.uint8
    assert {n: s["label"] for n, s in labels.metadata["segments"].items()} == {1: "liver", 2: "lesion"}
    assert labels.metadata["segments"][1]["color"] == [200, 30, 30]
    assert labels.metadata["on_referenced_grid"] and labels.metadata["warnings"] == []
    # A task given the folder takes the scan, not its segmentation.
    from napari_mediffuse.tasks.cli import read_single_volume

    assert read_single_volume(folder).name == "abdomen (CT)"
    # The plugin gives napari a labels layer with the names and colours.
    layers = read_layers(str(folder))
    assert [kind for _, _, kind in layers] == ["image", "labels"]
    data, kwargs, _ = layers[1]
    assert kwargs["features"]["segment"] == ["background", "liver", "lesion"]
    assert kwargs["colormap"][1] == pytest.approx([200 / 255, 30 / 255, 30 / 255, 1.0])


def test_seg_without_its_series_opens_on_its_own_frame(tmp_path, ct_files):
    path = write_seg(ct_files, tmp_path / "seg.dcm", expected_masks(overlap=False))
    with pytest.warns(DicomReadWarning) as record:
        (labels,) = read_dicom(path)
    (message,) = [str(w.message) for w in record]
    assert message.startswith(f"{path}: segmentation 'organs': its series (")
    assert "was not read with it; it opens on its own frame of reference" in message
    assert not labels.metadata["on_referenced_grid"]
    # Slices 2..7 with 4 and 5 empty, each voxel where the CT's voxel is.
    (ct,) = read_dicom(ct_files[0].parent)
    expected = np.zeros(ct.data.shape, np.uint8)
    for number, mask in expected_masks(overlap=False).items():
        expected[mask] = number
    assert labels.data.shape == (6, 48, 48)
    index = np.indices(labels.data.shape).reshape(3, -1)
    points = labels.affine[:3, :3] @ index + labels.affine[:3, 3:4]
    ct_index = np.linalg.inv(ct.affine)[:3, :3] @ points + np.linalg.inv(ct.affine)[:3, 3:4]
    np.testing.assert_allclose(ct_index, np.round(ct_index), atol=1e-3)
    np.testing.assert_array_equal(labels.data.reshape(-1),
                                  expected[tuple(np.round(ct_index).astype(int))])


def test_overlapping_segments_open_as_one_labels_layer_each(tmp_path, ct_files):
    folder = tmp_path / "study"
    shutil.copytree(ct_files[0].parent, folder / "ct")
    write_seg(ct_files, folder / "seg.dcm", expected_masks(overlap=True))
    with pytest.warns(DicomReadWarning) as record:
        ct, liver, lesion = read_dicom(folder)
    messages = [str(w.message) for w in record]
    assert any(m.startswith(f"{folder / 'seg.dcm'}: segments overlap (liver and lesion "
                            "(72 voxels)); one label map cannot hold both") for m in messages)
    masks = expected_masks(overlap=True)
    np.testing.assert_array_equal(liver.data, masks[1].astype(np.uint8))
    np.testing.assert_array_equal(lesion.data, 2 * masks[2].astype(np.uint8))
    assert [liver.name, lesion.name] == ["organs (SEG) liver", "organs (SEG) lesion"]


def test_rtstruct_is_not_supported_yet_with_a_clear_message(tmp_path, ct_files):
    rtstruct = get_testdata_file("rtstruct.dcm")
    if rtstruct is None:
        pytest.skip("pydicom test file rtstruct.dcm not available")
    with pytest.raises(io.ReadError) as error:
        io.read(rtstruct)
    assert str(error.value) == (f"{rtstruct} is an RT Structure Set (RTSTRUCT): contours are "
                                "not supported yet; export the structures as a DICOM SEG or a "
                                "NIfTI label map")
    # Beside a CT series the CT is still read, and the RTSTRUCT is named.
    folder = tmp_path / "study"
    shutil.copytree(ct_files[0].parent, folder / "ct")
    shutil.copy(rtstruct, folder / "rs.dcm")
    with pytest.warns(DicomReadWarning, match=r"RT structure set \(not supported yet\): 1 file \(rs.dcm\)"):
        (ct,) = io.read(folder)
    assert ct.data.shape == (10, 48, 48)
    assert read_layers(rtstruct) == [(None,)]  # napari: a notification, no layer, no traceback


def test_nifti_label_map_opens_as_labels_never_as_mr():
    seg = io.read(shared("ct/abdomen_ct_3mm_small_seg.nii.gz"))[0]
    assert seg.modality == "SEG" and seg.metadata["layer_type"] == "labels"
    assert seg.data.dtype == np.uint8 and int(seg.data.max()) == 117
    (layer,) = read_layers(str(shared("ct/abdomen_ct_3mm_small_seg.nii.gz")))
    assert layer[2] == "labels"
    for scan, modality in (("ct/abdomen_ct_3mm_small.nii.gz", "CT"), ("mr/stroke_T1.nii.gz", "MR"),
                           ("mr/abdomen_mr_3mm_small.nii.gz", "MR")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            volume = io.read(shared(scan))[0]
        assert volume.modality == modality and "layer_type" not in volume.metadata, scan
    tumour = io.read(shared("ct/chest_ct_lung1_5mm_tumour.nii.gz"))[0]
    assert tumour.metadata["layer_type"] == "labels"


def test_panel_opens_seg_as_labels_exports_paintings_and_overrides_modality(
        make_napari_viewer, tmp_path, ct_files):
    import napari

    from napari_mediffuse.gui.panel import AS_READ, MediffusePanel

    folder = tmp_path / "study"
    shutil.copytree(ct_files[0].parent, folder / "ct")
    write_seg(ct_files, folder / "seg.dcm", expected_masks(overlap=False))
    viewer = make_napari_viewer()
    panel = MediffusePanel(viewer)
    image, labels = panel.scan.open_folder(folder)
    assert isinstance(labels, napari.layers.Labels) and isinstance(image, napari.layers.Image)
    assert labels.features["segment"].tolist() == ["background", "liver", "lesion"]

    # A user's painting on the scan leaves as a DICOM SEG referencing the scan.
    painting = viewer.add_labels(np.zeros(image.data.shape, np.uint8), scale=image.scale,
                                 translate=image.translate, name="my painting")
    painting.data[5, 10:14, 20:30] = 3
    viewer.layers.selection.active = painting
    panel.scan.layer_combo.setCurrentText(image.name)
    (path,) = panel.scan.export_dicom(tmp_path / "out")
    seg = pydicom.dcmread(path)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == image.metadata["series_instance_uid"]
    shutil.copy(path, folder / "painting.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = [v for v in read_dicom(folder) if v.name.startswith("my painting")]
    (back,) = back
    np.testing.assert_array_equal(back.data, painting.data)

    # The modality box overrides what the tasks see, and restores it.
    viewer.layers.selection.active = image
    panel.scan.modality_combo.setCurrentText("MR")
    assert image.metadata["modality"] == "MR"
    translate_inputs = [layer.name for layer in panel.task_tabs["translate"].compatible_layers()]
    assert image.name in translate_inputs
    panel.scan.modality_combo.setCurrentText(AS_READ)
    assert image.metadata["modality"] == "CT" and "modality_override" not in image.metadata


def test_fractional_seg_is_thresholded_at_half(tmp_path, ct_files):
    sources = [pydicom.dcmread(f) for f in ct_files]
    probability = np.zeros((10, 48, 48), np.float32)
    probability[4, 10:20, 10:20] = 0.8   # kept
    probability[5, 10:20, 10:20] = 0.3   # below one half: not labelled
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="liver probability",
        segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Liver,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="test", family=codes.cid7162.ArtificialIntelligence, version="1"))
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=probability,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=[description], series_instance_uid=generate_uid(), series_number=91,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="test",
        manufacturer_model_name="test", software_versions="0", device_serial_number="0",
        max_fractional_value=255)
    folder = tmp_path / "study"
    shutil.copytree(ct_files[0].parent, folder / "ct")
    seg.save_as(folder / "seg.dcm")
    _, labels = read_dicom(folder)
    expected = np.zeros((10, 48, 48), np.uint8)
    expected[4, 10:20, 10:20] = 1
    np.testing.assert_array_equal(labels.data, expected)
