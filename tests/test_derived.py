"""Derived results as DICOM: synthetic images are unmistakable, labels leave as
DICOM SEG, heatmaps as Parametric Maps; every tag is checked on re-reading.

The source series is built from the real abdominal CT in ../shared/data.
"""
from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest

from conftest import shared
from napari_mediffuse import io
from napari_mediffuse.io.dicom import DicomReadWarning
from napari_mediffuse.io.derived import (
    synthetic_series_description, write_dicom_seg, write_parametric_map,
)
from napari_mediffuse.plugin import _volume_from_layer_data, read_layers, write_image
from napari_mediffuse.tasks.common import result_volume
from test_dicom_series import CROP, write_ct_series


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    """The CT volume read from a 10-slice DICOM series (48 x 48, 2.5 mm)."""
    img = nib.load(shared("ct/abdomen_ct_3mm.nii.gz"))
    data = np.transpose(np.asanyarray(img.dataobj)[:, :, 40:50], (2, 1, 0))[:, ::-1, ::-1]
    slices = np.ascontiguousarray(data[:, CROP[0], CROP[1]]).astype(np.int16)
    folder = tmp_path_factory.mktemp("source") / "ct"
    write_ct_series(folder, slices, -80.0 + 2.5 * np.arange(10), description="abdomen")
    (volume,) = io.read(folder)
    return volume


def headers(folder):
    return [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]


def translated(ct, **changes):
    """A synthetic 'MR' on the CT's grid, as the translation task returns it."""
    data = (ct.data.astype(np.float32) + 1024.0) / 4.0
    params = dict(steps=20, seed=0, sampler="ddim")
    kwargs = dict(task="translate", suffix="translated to MR", params=params, modality="MR",
                  synthetic=True, model="ct2mr-demo")
    kwargs.update(changes)
    return result_volume(ct, data, **kwargs)


def test_synthetic_export_carries_every_marking(tmp_path, ct):
    result = translated(ct)
    io.write_dicom_series(result, tmp_path / "out", series_description=f"{result.name} (mediffuse)")
    sources = {float(pydicom.dcmread(f).ImagePositionPatient[2]): pydicom.dcmread(f)
               for f in ct.metadata["files"]}
    written = headers(tmp_path / "out")
    assert len(written) == 10
    first_source = next(iter(sources.values()))
    for ds in written:
        assert ds.SeriesDescription.startswith("SYNTHETIC translate ct2mr-demo: ")
        assert len(ds.SeriesDescription) <= 64
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert "task=translate" in ds.DerivationDescription
        assert "model=ct2mr-demo" in ds.DerivationDescription
        assert '"steps":20' in ds.DerivationDescription and '"sampler":"ddim"' in ds.DerivationDescription
        assert ds.ImageComments.startswith("SYNTHETIC")
        # The source image at the same position, and only it.
        (item,) = ds.SourceImageSequence
        source = sources[float(ds.ImagePositionPatient[2])]
        assert item.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert item.ReferencedSOPClassUID == source.SOPClassUID
        # Same patient and frame of reference, never the acquired study.
        assert ds.PatientID == first_source.PatientID
        assert ds.FrameOfReferenceUID == first_source.FrameOfReferenceUID
        assert ds.StudyInstanceUID != first_source.StudyInstanceUID
        assert ds.StudyDescription.startswith("SYNTHETIC") and ds.AccessionNumber == ""
        # CT/MR Image Storage has no ContentQualification (the Parametric Map has).
        assert "ContentQualification" not in ds
    assert len({ds.StudyInstanceUID for ds in written}) == 1
    assert written[0].Modality == "MR"


def test_keep_source_study_option(tmp_path, ct):
    io.write_dicom_series(translated(ct), tmp_path / "out", series_description="x",
                          keep_source_study=True)
    source = pydicom.dcmread(ct.metadata["files"][0])
    assert {ds.StudyInstanceUID for ds in headers(tmp_path / "out")} == {source.StudyInstanceUID}


def test_denoised_and_sr_results_are_marked_too(tmp_path, ct):
    denoised = result_volume(ct, ct.data, task="denoise", suffix="denoised", params={"method": "nlm"},
                             model=None)
    io.write_dicom_series(denoised, tmp_path / "den", series_description=denoised.name)
    ds = headers(tmp_path / "den")[0]
    assert ds.SeriesDescription.startswith("SYNTHETIC denoise: ")
    assert "task=denoise" in ds.DerivationDescription


def test_long_names_shorten_only_the_rest():
    model = "ct2mr-abdomen-pelvis-multi-2026"
    text = synthetic_series_description("a very long layer name " * 4, "translate", model)
    assert len(text) == 64 and text.startswith(f"SYNTHETIC translate {model}: a very")
    assert text.endswith("...")
    assert synthetic_series_description("SYNTHETIC translate m: kept", "translate", "m") == \
        "SYNTHETIC translate m: kept"  # a re-export is not marked twice
    with pytest.raises(io.WriteError, match="too long"):
        synthetic_series_description("x", "translate", "m" * 60)


def test_acquired_volume_is_not_marked(tmp_path, ct):
    io.write_dicom_series(ct, tmp_path / "copy", series_description="copy of abdomen")
    ds = headers(tmp_path / "copy")[0]
    source = pydicom.dcmread(ct.metadata["files"][0])
    assert ds.SeriesDescription == "copy of abdomen"
    assert ds.StudyInstanceUID == source.StudyInstanceUID


def test_round_trip_through_the_plugin_keeps_the_marking(tmp_path, ct):
    io.write_dicom_series(translated(ct), tmp_path / "out", series_description="translated")
    first = headers(tmp_path / "out")[0]
    (layer,) = read_layers(str(tmp_path / "out"))
    data, kwargs, kind = layer
    assert kind == "image" and kwargs["name"].startswith("SYNTHETIC translate ct2mr-demo")
    assert kwargs["metadata"]["synthetic"] is True
    # Saved from napari as NIfTI: the header says SYNTHETIC.
    (nifti,) = write_image(str(tmp_path / "layer.nii.gz"), data, kwargs)
    assert "SYNTHETIC" in str(nib.load(nifti).header["descrip"].astype(str))
    # Exported again as DICOM: still marked, same derivation, a new study again.
    volume = _volume_from_layer_data(data, kwargs)
    io.write_dicom_series(volume, tmp_path / "again", series_description=kwargs["name"])
    again = headers(tmp_path / "again")[0]
    assert first.SeriesDescription == "SYNTHETIC translate ct2mr-demo: translated"
    assert again.SeriesDescription == "SYNTHETIC translate ct2mr-demo: translated (MR)"
    assert again.DerivationDescription == first.DerivationDescription
    assert again.StudyInstanceUID != pydicom.dcmread(ct.metadata["files"][0]).StudyInstanceUID


def test_labels_result_exports_as_dicom_seg_referencing_its_series(tmp_path, ct):
    labels = np.zeros(ct.data.shape, np.uint8)
    labels[2:5, 10:20, 10:20] = 1
    labels[6, 30:40, 5:9] = 2  # a second region, one slice only
    mask = result_volume(ct, labels, task="anomaly", suffix="anomaly mask", params={"t": 200},
                         model="ct-prior-demo", modality="OT")
    path = write_dicom_seg(mask, tmp_path / "seg.dcm")
    seg = pydicom.dcmread(path)
    assert seg.SOPClassUID.name == "Segmentation Storage"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.metadata["series_instance_uid"]
    assert seg.SeriesDescription.startswith("anomaly: ")
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "napari-mediffuse anomaly"
    # Read with its series: the same labels on the same grid.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (back,) = [v for v in io.read(_with_source(tmp_path, ct, path))
                   if v.metadata.get("layer_type") == "labels"]
    np.testing.assert_array_equal(back.data, labels)
    np.testing.assert_allclose(back.affine, ct.affine)


def _with_source(tmp_path, ct, seg_path):
    """A folder holding the source series and the SEG."""
    import shutil

    folder = tmp_path / "study"
    shutil.copytree(ct.metadata["files"][0].rsplit("/", 1)[0], folder / "ct")
    shutil.copy(seg_path, folder / "seg.dcm")
    return folder


def test_heatmap_exports_as_parametric_map(tmp_path, ct):
    heat = np.random.default_rng(0).random(ct.data.shape).astype(np.float32) * 3.5
    heatmap = result_volume(ct, heat, task="anomaly", suffix="anomaly heatmap", params={},
                            model="ct-prior-demo", modality="OT")
    path = write_parametric_map(heatmap, tmp_path / "pm.dcm")
    pm = pydicom.dcmread(path)
    assert pm.SOPClassUID.name == "Parametric Map Storage"
    assert pm.ContentQualification == "RESEARCH"
    assert "task=anomaly" in pm.DerivationDescription and "model=ct-prior-demo" in pm.DerivationDescription
    (back,) = io.read(path)
    assert back.data.dtype == np.float32
    np.testing.assert_array_equal(back.data, heat)
    np.testing.assert_allclose(back.affine, ct.affine, atol=1e-5)


def test_seg_export_without_a_dicom_source_is_refused(tmp_path, ct):
    mask = ct.with_data((ct.data > 0).astype(np.uint8))
    mask.metadata.pop("files")
    with pytest.raises(io.WriteError) as error:
        write_dicom_seg(mask, tmp_path / "seg.dcm")
    assert str(error.value).startswith(f"{tmp_path / 'seg.dcm'}: a DICOM SEG or Parametric Map "
                                       "references the DICOM series")
    assert not (tmp_path / "seg.dcm").exists()


def test_super_resolved_slices_reference_the_thick_slice_they_lie_in(tmp_path, ct):
    factor = 5  # 2.5 mm -> 0.5 mm
    data = np.repeat(ct.data, factor, axis=0)[: (ct.data.shape[0] - 1) * factor + 1]
    affine = ct.affine.copy()
    affine[:3, 0] /= factor
    sr = result_volume(ct, data, task="sr", suffix="SR x5", params={"factor": factor},
                       affine=affine, model="ct-prior-demo")
    io.write_dicom_series(sr, tmp_path / "sr", series_description=sr.name)
    sources = {pydicom.dcmread(f).SOPInstanceUID: float(pydicom.dcmread(f).ImagePositionPatient[2])
               for f in ct.metadata["files"]}
    written = headers(tmp_path / "sr")
    assert len(written) == 46 and written[0].SeriesDescription.startswith("SYNTHETIC sr ct-prior-demo")
    for ds in written:
        z = float(ds.ImagePositionPatient[2])
        referenced = [sources[item.ReferencedSOPInstanceUID] for item in ds.SourceImageSequence]
        assert 1 <= len(referenced) <= 2
        assert min(abs(r - z) for r in referenced) <= 1.25 + 1e-6  # the thick slice it lies in


def test_cli_convert_of_saved_nifti_results_keeps_the_marking_and_writes_seg(tmp_path, ct, capsys):
    from napari_mediffuse.cli import main

    source = ct.metadata["files"][0].rsplit("/", 1)[0]
    io.write_nifti(translated(ct), tmp_path / "mr.nii.gz")
    assert main(["convert", str(tmp_path / "mr.nii.gz"), "-o", str(tmp_path / "mr_dicom"),
                 "--source", source]) == 0
    ds = headers(tmp_path / "mr_dicom")[0]
    original = pydicom.dcmread(ct.metadata["files"][0])
    assert ds.SeriesDescription.startswith("SYNTHETIC translate")  # from the NIfTI header
    assert "task=translate" in ds.DerivationDescription
    assert ds.PatientID == original.PatientID and ds.StudyInstanceUID != original.StudyInstanceUID
    assert len(ds.SourceImageSequence) == 1

    labels = np.zeros(ct.data.shape, np.uint8)
    labels[3:6, 12:30, 12:30] = 1
    io.write_nifti(ct.with_data(labels), tmp_path / "mask.nii.gz", dtype=np.uint8)
    out = tmp_path / "mask.dcm"
    assert main(["convert", str(tmp_path / "mask.nii.gz"), "-o", str(out)]) == 2  # no source
    assert "references the DICOM series it was computed on" in capsys.readouterr().err
    assert not out.exists()
    assert main(["convert", str(tmp_path / "mask.nii.gz"), "-o", str(out), "--source", source]) == 0
    seg = pydicom.dcmread(out)
    assert seg.SOPClassUID.name == "Segmentation Storage"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == original.SeriesInstanceUID
    with pytest.warns(DicomReadWarning, match="opens on its own frame of reference"):
        back = io.read_dicom(out)[0]
    ras = back.affine @ np.array([*np.argwhere(back.data)[0], 1.0])
    index = np.round(np.linalg.inv(ct.affine) @ ras).astype(int)[:3]
    assert labels[tuple(index)] == 1 and int(back.data.sum()) == int(labels.sum())
