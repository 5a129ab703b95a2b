"""Outputs on the input's own layout, and every layer at its true place.

Part 1 (issue 16 item 3): an output written for a NIfTI input has exactly
the input's array shape and affine (RAS, LPS, LAS and oblique inputs), for
tasks, the napari writer and DICOM input (dcm2niix's layout, checked
against the dcm2niix binary).

Part 2 (issue 17 item 1): napari layers of a gantry-tilted CT, an oblique MR
and two series of one scan at different obliquities put landmarks where
dcm2niix (and the phantom) has them, within half a voxel, and overlay.
"""
from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations as nio

from geometry_cases import (  # noqa: F401 (nifti_case is a fixture)
    CASE_SHAPE,
    LAYOUTS,
    assert_same_grid,
    landmark_centroids,
    nifti_case,
    rotation,
    run_dcm2niix,
    stack_positions,
    true_landmarks_ras,
    write_dicom_series,
    write_nifti_case,
)
from napari_mediffuse import io, plugin
from napari_mediffuse.io.geometry import RAS_TO_WORLD, display_grid, layout_of
from napari_mediffuse.layers import (
    image_layer_data,
    labels_layer_data,
    layer_affine,
    layer_to_volume,
    onto_source_grid,
    slice_range_layer_data,
    world_to_grid_index,
)


def read_quietly(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return io.read(path)


# ---------------------------------------------------------------------------
# 1. Outputs on the input's layout
# ---------------------------------------------------------------------------


def test_read_records_the_file_layout_and_write_restores_it_voxel_for_voxel(nifti_case, tmp_path):
    raw = np.asanyarray(nib.load(str(nifti_case)).dataobj)
    (volume,) = io.read(nifti_case)
    assert io.volume.axcodes(volume.affine) == ("S", "P", "L")  # tasks see the display orientation
    assert volume.data.shape == CASE_SHAPE[::-1]
    assert volume.layout == layout_of(nib.load(str(nifti_case)).affine)
    out = io.write_nifti(volume, tmp_path / "copy.nii.gz")
    assert_same_grid(out, nifti_case)
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(out)).dataobj), raw)


def _denoise_and_check(path, tmp_path, method):
    from napari_mediffuse.tasks.denoise import denoise

    (volume,) = io.read(path)
    result = denoise(volume, method=method)
    out = io.write_nifti(result, tmp_path / f"denoised_{method}.nii.gz")
    assert_same_grid(out, path)
    # The values are the result's, voxel for voxel, in the file's layout.
    back = io.read_nifti(out)
    np.testing.assert_allclose(back.data, result.data, atol=1e-3)


def test_denoise_output_has_the_input_shape_and_affine(nifti_case, tmp_path):
    _denoise_and_check(nifti_case, tmp_path, "nlm")


def test_bm3d_output_of_an_oblique_input_has_its_shape_and_affine(tmp_path):
    _denoise_and_check(write_nifti_case(tmp_path, "oblique"), tmp_path, "bm3d")  # 8 s: one layout


def test_super_resolution_output_keeps_the_input_layout(nifti_case, tmp_path):
    """SR refines the slice axis (S): the output's other axes, their order and
    directions are the input's; the slice axis has ``factor`` times the slices."""
    from napari_mediffuse.tasks.superres import super_resolve

    (volume,) = io.read(nifti_case)
    result = super_resolve(volume, factor=2, method="cubic")
    out = nib.load(str(io.write_nifti(result, tmp_path / "sr.nii.gz")))
    inp = nib.load(str(nifti_case))
    assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(inp.affine)
    slice_axis = 2  # z is the thick axis of every case
    expected_shape = list(inp.shape)
    expected_shape[slice_axis] *= 2
    assert out.shape == tuple(expected_shape)
    keep = [a for a in range(3) if a != slice_axis]
    np.testing.assert_allclose(out.affine[:3, keep], inp.affine[:3, keep], atol=1e-4)
    np.testing.assert_allclose(out.affine[:3, slice_axis], inp.affine[:3, slice_axis] / 2, atol=1e-4)
    back = io.read_nifti(out.get_filename())
    np.testing.assert_allclose(back.affine, result.affine, atol=1e-4)
    np.testing.assert_allclose(back.data, result.data, atol=1e-3)


def test_anomaly_and_inpaint_outputs_have_the_input_shape_and_affine(nifti_case, tiny_models, tmp_path):
    """Diffusion tasks with a tiny random prior (geometry only, not quality):
    heatmap, mask, reconstruction and inpainted scan, each on the input's grid."""
    from napari_mediffuse.tasks.anomaly import detect_anomalies
    from napari_mediffuse.tasks.common import RunOptions
    from napari_mediffuse.tasks.inpaint import inpaint

    (volume,) = io.read(nifti_case)
    options = RunOptions(device="cpu", seed=0)
    found = detect_anomalies(volume, t=100, ensemble=1, steps=2, options=options)
    for name, result in [("heat", found.heatmap), ("mask", found.mask), ("rec", found.reconstruction)]:
        assert_same_grid(io.write_nifti(result, tmp_path / f"{name}.nii.gz"), nifti_case)
    lesion = np.zeros(volume.data.shape, np.uint8)
    lesion[2:4, 8:12, 10:14] = 1
    filled = inpaint(volume, volume.with_data(lesion), steps=2, options=options)
    out = io.write_nifti(filled, tmp_path / "inpainted.nii.gz")
    assert_same_grid(out, nifti_case)
    raw = np.asanyarray(nib.load(str(nifti_case)).dataobj)
    kept = io.volume.reorient(lesion, volume.affine, volume.layout)[0] == 0  # the mask in the file's layout
    np.testing.assert_allclose(nib.load(str(out)).get_fdata()[kept], raw[kept], atol=1e-3)


def test_result_volume_carries_the_source_layout(nifti_case):
    from napari_mediffuse.tasks.common import result_volume

    (volume,) = io.read(nifti_case)
    mask = result_volume(volume, volume.data > 300, task="test", suffix="mask", params={})
    assert mask.layout == volume.layout


def _napari_attributes(layer_data):
    """What napari hands a writer: the layer's state, built by a real layer."""
    from napari.layers import Image, Labels

    data, kwargs, kind = layer_data
    layer = (Labels if kind == "labels" else Image)(data, **kwargs)
    data, state, _ = layer.as_layer_data_tuple()
    return data, state


def test_napari_save_of_a_file_layer_writes_the_input_grid(nifti_case, tmp_path):
    (layer_data,) = plugin.read_layers(str(nifti_case))
    data, attributes = _napari_attributes(layer_data)
    (written,) = plugin.write_image(str(tmp_path / "saved.nii.gz"), data, attributes)
    assert_same_grid(written, nifti_case)
    np.testing.assert_array_equal(np.asanyarray(nib.load(written).dataobj),
                                  np.asanyarray(nib.load(str(nifti_case)).dataobj))


def test_napari_save_of_a_mask_layer_writes_the_input_grid(nifti_case, tmp_path):
    (volume,) = io.read(nifti_case)
    mask = volume.with_data((volume.data > 300).astype(np.uint8))
    data, attributes = _napari_attributes(labels_layer_data(mask))
    (written,) = plugin.write_labels(str(tmp_path / "mask.nii.gz"), data, attributes)
    assert_same_grid(written, nifti_case)
    raw = np.asanyarray(nib.load(str(nifti_case)).dataobj)
    np.testing.assert_array_equal(np.asanyarray(nib.load(written).dataobj), (raw > 300).astype(np.uint8))


def test_a_moved_layer_is_saved_where_it_is_drawn(tmp_path):
    """A user who moves a layer (translate) saves it at its new place."""
    path = write_nifti_case(tmp_path, "LAS")
    (layer_data,) = plugin.read_layers(str(path))
    data, attributes = _napari_attributes(layer_data)
    attributes["translate"] = tuple(np.asarray(attributes["translate"]) + np.array([10.0, 0.0, 0.0]))
    (written,) = plugin.write_image(str(tmp_path / "moved.nii.gz"), data, attributes)
    moved = nib.load(written)
    assert moved.shape == nib.load(str(path)).shape
    shift = moved.affine[:3, 3] - nib.load(str(path)).affine[:3, 3]
    np.testing.assert_allclose(RAS_TO_WORLD @ shift, [10.0, 0.0, 0.0], atol=1e-4)  # 10 mm superior


def test_4d_nifti_written_back_in_its_layout(tmp_path):
    rng = np.random.default_rng(3)
    raw = rng.normal(size=(7, 5, 4, 3)).astype(np.float32)  # x, y, z, t
    affine = np.diag([-2.0, 2.0, 4.0, 1.0])  # LAS
    nib.save(nib.Nifti1Image(raw, affine), str(tmp_path / "f.nii"))
    volume = io.read_nifti(tmp_path / "f.nii")
    assert volume.data.shape == (3, 4, 5, 7)
    out = io.write_nifti(volume, tmp_path / "g.nii")
    assert_same_grid(out, tmp_path / "f.nii")
    np.testing.assert_array_equal(nib.load(str(out)).get_fdata(), raw)


AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
SAGITTAL = ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0))


@pytest.mark.parametrize("orientation", ["axial", "sagittal", "oblique"])
def test_dicom_input_is_written_in_dcm2niix_layout(tmp_path, orientation):
    if orientation == "oblique":
        rot = rotation(20.0, 0.0, 30.0)
        row, col = rot[:, 0], rot[:, 1]
    else:
        row, col = np.array(AXIAL if orientation == "axial" else SAGITTAL)
    normal = np.cross(row, col)
    write_dicom_series(tmp_path / "dcm", stack_positions((-30.0, -40.0, -20.0), 3.0 * normal, 5),
                       row_cosines=row, column_cosines=col, pixel_spacing=2.0, size=24, thickness=3.0)
    (volume,) = read_quietly(tmp_path / "dcm")
    out = io.write_nifti(volume, tmp_path / "ours.nii.gz")
    (theirs,) = run_dcm2niix(tmp_path / "dcm", tmp_path / "dcm2niix")
    assert_same_grid(out, theirs)
    np.testing.assert_allclose(nib.load(str(out)).get_fdata(), nib.load(str(theirs)).get_fdata(), atol=1e-3)


@pytest.mark.parametrize("orientation", ["sagittal", "oblique"])
def test_derived_dicom_of_a_dicom_input_converts_to_the_input_grid(tmp_path, orientation):
    """A task result exported as DICOM is written in the source's own slice
    stack: dcm2niix gives it the input's array shape and affine, and every
    slice references the source slice at its position."""
    from napari_mediffuse.tasks.denoise import denoise

    if orientation == "oblique":
        rot = rotation(20.0, 0.0, 30.0)
        row, col = rot[:, 0], rot[:, 1]
    else:
        row, col = np.array(SAGITTAL)
    normal = np.cross(row, col)
    write_dicom_series(tmp_path / "dcm", stack_positions((-30.0, -40.0, -20.0), 3.0 * normal, 10),
                       row_cosines=row, column_cosines=col, pixel_spacing=2.0, size=24, thickness=3.0)
    (volume,) = read_quietly(tmp_path / "dcm")
    result = denoise(volume, method="nlm")
    files = io.write_dicom_series(result, tmp_path / "derived", "denoised")
    (source_nifti,) = run_dcm2niix(tmp_path / "dcm", tmp_path / "n1")
    (derived_nifti,) = run_dcm2niix(tmp_path / "derived", tmp_path / "n2")
    assert_same_grid(derived_nifti, source_nifti)
    import pydicom

    first = pydicom.dcmread(files[0])
    np.testing.assert_allclose([float(v) for v in first.ImageOrientationPatient], np.concatenate([row, col]),
                               atol=1e-5)
    assert first.Rows == first.Columns == 24 and len(files) == 10


def test_real_oblique_mr_written_as_dcm2niix_writes_it(tmp_path):
    """pydicom's MR2_UNCI (one oblique 1024 x 1024 slice): read, shown
    resampled, recovered exactly from the layer and written in dcm2niix's
    shape and affine."""
    import shutil

    from pydicom.data import get_testdata_file

    path = get_testdata_file("MR2_UNCI.dcm")
    if path is None:
        pytest.skip("pydicom test file MR2_UNCI.dcm not available")
    (tmp_path / "mr").mkdir()
    shutil.copy(path, tmp_path / "mr" / "MR2_UNCI.dcm")
    (volume,) = read_quietly(tmp_path / "mr")
    assert volume.is_oblique
    layer_data = image_layer_data(volume)
    assert layer_data[1]["metadata"].get("display_note")  # shown resampled, and said so
    data, attributes = _napari_attributes(layer_data)
    (written,) = plugin.write_image(str(tmp_path / "saved.nii.gz"), data, attributes)
    (theirs,) = run_dcm2niix(tmp_path / "mr", tmp_path / "dcm2niix")
    ours, theirs = nib.load(written), nib.load(str(theirs))
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours.get_fdata(), theirs.get_fdata(), atol=1e-3)
    # In-plane axes and origin equal; the slice axis points the same way. Its
    # length differs for a single slice: dcm2niix takes SpacingBetweenSlices
    # (6.6 mm), the DICOM reader SliceThickness (6 mm).
    np.testing.assert_allclose(ours.affine[:, [0, 1, 3]], theirs.affine[:, [0, 1, 3]], atol=1e-4)
    direction = ours.affine[:3, 2] / np.linalg.norm(ours.affine[:3, 2])
    np.testing.assert_allclose(direction, theirs.affine[:3, 2] / np.linalg.norm(theirs.affine[:3, 2]), atol=1e-5)


# ---------------------------------------------------------------------------
# 2. Layers at their true place
# ---------------------------------------------------------------------------


def _world(ras: np.ndarray) -> np.ndarray:
    return ras @ RAS_TO_WORLD.T


def _drawn_landmarks(layer_data, which=None) -> np.ndarray:
    """Landmark centroids (RAS mm) where napari draws them: the layer data
    through its scale and translate, the transform napari applies."""
    data, kwargs, _ = layer_data
    index_to_world = np.eye(4)
    index_to_world[:3, :3] = np.diag(kwargs["scale"][-3:])
    index_to_world[:3, 3] = kwargs["translate"][-3:]
    index_to_ras = np.eye(4)
    index_to_ras[:3] = RAS_TO_WORLD.T @ index_to_world[:3]
    return landmark_centroids(np.asarray(data), index_to_ras, which=which)


def _theirs(nifti_path) -> np.ndarray:
    img = nib.load(str(nifti_path))
    return landmark_centroids(img.get_fdata(), img.affine)


TILT_DEG = 20.0


@pytest.fixture(scope="module")
def tilted_ct(tmp_path_factory):
    """40 axial slices 2.5 mm apart with a 20 degree gantry tilt (the couch
    steps 2.5 mm, each slice shifted tan(20 deg) * 2.5 mm along y), and
    dcm2niix's tilt-corrected conversion."""
    root = tmp_path_factory.mktemp("tilt")
    step = np.array([0.0, 2.5 * np.tan(np.radians(TILT_DEG)), 2.5])
    write_dicom_series(root / "dcm", stack_positions((-64.0, -84.0, -48.75), step, 40),
                       row_cosines=(1, 0, 0), column_cosines=(0, 1, 0), pixel_spacing=2.0, size=64,
                       tilt_deg=TILT_DEG, thickness=2.5)
    outputs = run_dcm2niix(root / "dcm", root / "dcm2niix")
    corrected = [p for p in outputs if "Tilt" in p.name]
    assert corrected, f"dcm2niix wrote no tilt-corrected file: {outputs}"
    return root / "dcm", corrected[0], [p for p in outputs if "Tilt" not in p.name][0]


def test_tilted_ct_layer_puts_landmarks_where_dcm2niix_does(tilted_ct):
    folder, corrected, uncorrected = tilted_ct
    (volume,) = read_quietly(folder)
    assert volume.metadata["gantry_tilt_deg"] == pytest.approx(TILT_DEG, abs=0.01)
    layer_data = image_layer_data(volume)
    note = layer_data[1]["metadata"]["display_note"]
    assert "resampled" in note and "20.0 degrees" in note
    drawn = _drawn_landmarks(layer_data)
    half_voxel = 0.5 * min(volume.spacing)
    np.testing.assert_array_less(np.linalg.norm(drawn - _theirs(corrected), axis=1), half_voxel)
    np.testing.assert_array_less(np.linalg.norm(drawn - true_landmarks_ras(), axis=1), half_voxel)
    # What the old scale/translate drew (the shear dropped, 2.66 mm steps along
    # the slice axis): the top slice 36 mm from its place (issue 17).
    top = np.array([len(volume.data) - 1, 0.0, 0.0, 1.0])
    spacing, origin = np.array(volume.spacing), _world(volume.affine[:3, 3])
    naive = origin + spacing * top[:3]
    assert np.linalg.norm(naive - _world((volume.affine @ top)[:3])) == pytest.approx(36.0, abs=0.1)
    # dcm2niix's uncorrected file drops the shear too: its top slice is 35 mm off.
    plain_top = nib.load(str(uncorrected)).affine @ np.array([0.0, 0.0, 39.0, 1.0])
    true_top = nib.load(str(corrected)).affine @ np.array([0.0, 0.0, 39.0, 1.0])
    assert abs(plain_top[1] - true_top[1]) > 30.0


def test_tilted_ct_layer_gives_back_its_original_voxels_and_affine(tilted_ct, tmp_path):
    folder, _, uncorrected = tilted_ct
    (volume,) = read_quietly(folder)
    layer_data = image_layer_data(volume)
    data, attributes = _napari_attributes(layer_data)
    assert data.shape != volume.data.shape  # shown on a larger axis-aligned grid

    class Layer:  # what the panel passes: a napari layer's fields
        pass

    layer = Layer()
    layer.data, layer.name, layer.metadata = data, attributes["name"], attributes["metadata"]
    layer.scale, layer.translate = attributes["scale"], attributes["translate"]
    layer.rotate, layer.shear, layer.affine = attributes["rotate"], attributes["shear"], attributes["affine"]
    back = layer_to_volume(layer)
    np.testing.assert_array_equal(back.data, volume.data)
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-9)
    # Saved: dcm2niix's array (same shape and values) with the true, sheared affine.
    (written,) = plugin.write_image(str(tmp_path / "tilted.nii.gz"), data, attributes)
    ours, theirs = nib.load(written), nib.load(str(uncorrected))
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours.get_fdata(), theirs.get_fdata(), atol=1e-3)
    np.testing.assert_allclose(landmark_centroids(ours.get_fdata(), ours.affine), true_landmarks_ras(), atol=1.0)


def test_an_edited_resampled_layer_is_resampled_back_onto_its_grid(tilted_ct):
    folder, _, _ = tilted_ct
    (volume,) = read_quietly(folder)
    mask = volume.with_data((volume.data > 500).astype(np.uint8))
    data, kwargs, _ = labels_layer_data(mask)
    assert set(np.unique(data)) <= {0, 1}  # nearest: labels stay labels

    class Layer:
        pass

    layer = Layer()
    layer.data, layer.name, layer.metadata = data.copy(), "mask", kwargs["metadata"]
    layer.scale, layer.translate = kwargs["scale"], kwargs["translate"]
    layer.data[layer.data == 1] = 2  # the user relabels every landmark
    back = layer_to_volume(layer)
    assert back.data.shape == volume.data.shape
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-9)
    agree = np.mean((back.data == 2) == (mask.data == 1))
    assert agree > 0.995
    assert any("resampled back" in w for w in back.metadata["warnings"])


def test_a_mask_painted_over_a_resampled_layer_goes_onto_the_grid_the_task_gets(tilted_ct):
    """A Labels layer the user paints over the tilted CT (on the grid napari
    draws) reaches the task on the CT's original grid, nearest label."""
    from napari.layers import Image, Labels

    folder, _, _ = tilted_ct
    (volume,) = read_quietly(folder)
    data, kwargs, _ = image_layer_data(volume)
    ct = Image(data, **kwargs)
    painted = Labels((data > 500).astype(np.uint8), scale=ct.scale, translate=ct.translate)
    mask = onto_source_grid(layer_to_volume(painted), ct)
    assert mask.data.shape == volume.data.shape and mask.data.dtype == np.uint8
    np.testing.assert_allclose(mask.affine, volume.affine, atol=1e-9)
    assert np.mean(mask.data == (volume.data > 500)) > 0.995
    unrelated = volume.with_data(np.zeros(volume.data.shape, np.uint8))
    assert onto_source_grid(unrelated, ct) is unrelated


def _oblique_mr(folder, rot, size=48, n=14):
    """An MR stack from MR2_UNCI's header (6 mm slices 6.6 mm apart), rotated
    by ``rot`` from MR2_UNCI's own (oblique) orientation, centred on the phantom."""
    row0 = np.array([0.569486, 0.822001, 0.0])
    col0 = np.array([0.0, 0.0, -1.0])
    row, col = rot @ row0, rot @ col0
    normal = np.cross(row, col)
    spacing = 4.0
    first = -(size - 1) / 2 * spacing * (row + col) - (n - 1) / 2 * 6.6 * normal
    return write_dicom_series(folder, stack_positions(first, 6.6 * normal, n), row_cosines=row,
                              column_cosines=col, pixel_spacing=spacing, size=size,
                              template="MR2_UNCI.dcm", thickness=6.0)


def test_oblique_mr_layer_puts_landmarks_where_dcm2niix_does(tmp_path):
    _oblique_mr(tmp_path / "mr", np.eye(3))
    (volume,) = read_quietly(tmp_path / "mr")
    assert volume.modality == "MR" and volume.is_oblique
    layer_data = image_layer_data(volume)
    (theirs,) = run_dcm2niix(tmp_path / "mr", tmp_path / "dcm2niix")
    drawn = _drawn_landmarks(layer_data)
    half_voxel = 0.5 * min(volume.spacing)
    np.testing.assert_array_less(np.linalg.norm(drawn - _theirs(theirs), axis=1), half_voxel)
    np.testing.assert_array_less(np.linalg.norm(drawn - true_landmarks_ras(), axis=1), half_voxel)


def test_two_obliquities_of_one_scan_overlay(tmp_path):
    """The same phantom scanned twice, planes 25 degrees apart: both layers
    put every landmark at the same world place (within half a voxel)."""
    _oblique_mr(tmp_path / "a", np.eye(3))
    _oblique_mr(tmp_path / "b", rotation(25.0, 10.0, 0.0))
    (a,) = read_quietly(tmp_path / "a")
    (b,) = read_quietly(tmp_path / "b")
    assert np.degrees(np.arccos(abs(np.dot(a.affine[:3, 0], b.affine[:3, 0])
                                    / np.linalg.norm(a.affine[:3, 0]) / np.linalg.norm(b.affine[:3, 0])))) > 5
    drawn_a, drawn_b = _drawn_landmarks(image_layer_data(a)), _drawn_landmarks(image_layer_data(b))
    half_voxel = 0.5 * min(min(a.spacing), min(b.spacing))
    np.testing.assert_array_less(np.linalg.norm(drawn_a - drawn_b, axis=1), half_voxel)


def test_straight_and_slightly_oblique_grids_are_not_resampled(tmp_path):
    """A grid within a quarter voxel of the world axes is drawn as it is."""
    (volume,) = io.read(write_nifti_case(tmp_path, "LAS"))
    data, kwargs, _ = image_layer_data(volume)
    assert data is volume.data and "display_note" not in kwargs["metadata"]
    tiny = volume.affine.copy()
    tiny[:3, :3] = rotation(0.05, 0.0, 0.0) @ tiny[:3, :3]
    grid = display_grid(tiny, volume.spatial_shape)
    assert not grid.resample and grid.error_mm < 0.25 * min(volume.spacing)


def test_layer_affine_reads_napari_transforms():
    """A layer from elsewhere (rotated in napari) gives its true index -> RAS."""
    from napari.layers import Image

    layer = Image(np.zeros((4, 5, 6)), scale=(3.0, 1.0, 1.0), translate=(10.0, 0.0, 0.0), rotate=30.0)
    world = np.eye(4)
    world[:3] = RAS_TO_WORLD @ layer_affine(layer)[:3]
    for index in [(0, 0, 0), (3, 4, 5), (1, 2, 3)]:
        np.testing.assert_allclose(world[:3, :3] @ index + world[:3, 3], layer.data_to_world(index), atol=1e-9)


def test_reader_notifies_the_resampling_and_preview_finds_the_true_slice(tilted_ct, caplog):
    """Opening the tilted series says it is shown resampled; the world point
    of slice 20's centre maps back to slice 20 of the grid the tasks get."""
    from napari.layers import Image

    folder, _, _ = tilted_ct
    with caplog.at_level("WARNING", logger="napari_mediffuse.plugin"):
        (layer_data,) = plugin.read_layers(str(folder))
    assert any("resampled onto an axis-aligned" in r.getMessage() for r in caplog.records)
    data, kwargs, _ = layer_data
    layer = Image(data, **kwargs)
    volume = layer_to_volume(layer)
    centre = volume.affine @ np.array([20.0, 31.5, 31.5, 1.0])
    point = layer.data_to_world(layer.world_to_data(_world(centre[:3])))
    np.testing.assert_allclose(world_to_grid_index(layer, point), [20.0, 31.5, 31.5], atol=1e-6)


@pytest.mark.parametrize("start, stop", [(15, 16), (9, 21)])
def test_preview_cut_of_a_tilted_layer_stays_in_place(tilted_ct, start, stop):
    """The panel's preview keeps slices start:stop of a result: they are drawn
    where those slices of the volume are (one tilted slice is a plain axial
    plane, drawn as it is; several are resampled again). Landmark 1 spans
    slices 12-17 (z -20 to -4 mm)."""
    folder, _, _ = tilted_ct
    (volume,) = read_quietly(folder)
    data, kwargs, _ = slice_range_layer_data(image_layer_data(volume), start, stop)
    assert ("grid_data" in kwargs["metadata"]) == (stop - start > 1)
    cut = volume.slab(start, stop)
    np.testing.assert_allclose(_drawn_landmarks((data, kwargs, "image"), which=[1]),
                               landmark_centroids(cut.data, cut.affine, which=[1]),
                               atol=0.5 * min(volume.spacing))


@pytest.mark.gui
def test_tilted_and_oblique_layers_overlay_in_a_viewer(make_napari_viewer, tilted_ct, tmp_path):
    """In a real viewer: both series opened through the plugin put every
    landmark, taken to world coordinates through the layers napari made
    (``data_to_world``), at its true place, so they overlay."""
    folder, _, _ = tilted_ct
    _oblique_mr(tmp_path / "mr", rotation(25.0, 10.0, 0.0))
    viewer = make_napari_viewer()
    found = []
    for path in (folder, tmp_path / "mr"):
        (layer,) = viewer.open(str(path), plugin="napari-mediffuse")
        assert "resampled" in layer.metadata["display_note"]
        corners = np.array([layer.data_to_world(p) for p in np.vstack([np.zeros(3), np.eye(3)])])
        index_to_world = np.eye(4)
        index_to_world[:3, :3] = (corners[1:] - corners[0]).T
        index_to_world[:3, 3] = corners[0]
        index_to_ras = np.eye(4)
        index_to_ras[:3] = RAS_TO_WORLD.T @ index_to_world[:3]
        centroids = landmark_centroids(np.asarray(layer.data), index_to_ras)
        half_voxel = 0.5 * min(layer_to_volume(layer).spacing)
        np.testing.assert_array_less(np.linalg.norm(centroids - true_landmarks_ras(), axis=1), half_voxel)
        found.append(centroids)
    np.testing.assert_array_less(np.linalg.norm(found[0] - found[1], axis=1), 2.0)


@pytest.mark.gui
def test_panel_result_of_a_tilted_ct_overlays_and_saves_on_the_input_grid(make_napari_viewer, tiny_models,
                                                                          tilted_ct, qtbot, tmp_path):
    """Denoise (NLM) from the panel on the tilted CT, whole volume and preview:
    the result layers are drawn where the CT is, and the saved result has
    dcm2niix's array shape with the true affine."""
    from napari_mediffuse.gui.panel import MediffusePanel

    folder, _, uncorrected = tilted_ct
    viewer = make_napari_viewer()
    panel = MediffusePanel(viewer)
    (ct,) = viewer.open(str(folder), plugin="napari-mediffuse")
    tab = panel.task_tabs["denoise"]
    tab.param_widgets["method"].value = "nlm"
    tab.start(layer=ct)
    qtbot.waitUntil(lambda: tab.worker is None, timeout=120_000)
    assert tab.last_error == ""
    (result,) = tab.last_result
    assert result.data.shape == ct.data.shape
    np.testing.assert_allclose(result.scale, ct.scale)
    np.testing.assert_allclose(result.translate, ct.translate)
    source, denoised = layer_to_volume(ct), layer_to_volume(result)
    assert denoised.data.shape == source.data.shape
    np.testing.assert_allclose(denoised.affine, source.affine, atol=1e-9)
    data, state, _ = result.as_layer_data_tuple()
    (written,) = plugin.write_image(str(tmp_path / "denoised.nii.gz"), data, state)
    saved_ct = io.write_nifti(source, tmp_path / "ct.nii.gz")
    assert nib.load(written).shape == nib.load(str(uncorrected)).shape == nib.load(str(saved_ct)).shape
    np.testing.assert_allclose(nib.load(written).affine, nib.load(str(saved_ct)).affine, atol=1e-4)
    # Preview of slice 15 (landmark 1): drawn where slice 15 of the CT is.
    centre = source.affine @ np.array([15.0, 31.5, 31.5, 1.0])
    viewer.dims.point = tuple(ct.data_to_world(ct.world_to_data(_world(centre[:3]))))
    tab.preview_check.setChecked(True)
    tab.start(layer=ct)
    qtbot.waitUntil(lambda: tab.worker is None, timeout=120_000)
    assert tab.last_error == ""
    (preview,) = tab.last_result
    drawn = _drawn_landmarks((np.asarray(preview.data), {"scale": preview.scale, "translate": preview.translate},
                              "image"), which=[1])
    cut = source.slab(15, 16)
    np.testing.assert_allclose(drawn, landmark_centroids(cut.data, cut.affine, which=[1]),
                               atol=0.5 * min(source.spacing))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_diffusion_denoise_sr_and_translation_outputs_keep_the_input_layout(layout, tiny_translation_models,
                                                                            tmp_path):
    """The diffusion tasks through the command line (tiny random models: geometry only):
    every output file has the input's array shape and affine (SR: twice the slices along z)."""
    from napari_mediffuse.cli import main

    path = write_nifti_case(tmp_path, layout, shape=(36, 40, 4))  # slices of at least 32 pixels
    for command in (["denoise", "--steps", "1"], ["translate", "--direction", "ct2mr", "--steps", "1",
                                                   "--ensemble", "1"]):
        out = tmp_path / f"{command[0]}.nii.gz"
        assert main([command[0], str(path), "-o", str(out), *command[1:]]) == 0
        assert_same_grid(out, path)
    out = tmp_path / "sr.nii.gz"
    assert main(["sr", str(path), "-o", str(out), "--factor", "2", "--steps", "1"]) == 0
    sr, inp = nib.load(str(out)), nib.load(str(path))
    assert sr.shape == inp.shape[:2] + (2 * inp.shape[2],)
    np.testing.assert_allclose(sr.affine[:3, :2], inp.affine[:3, :2], atol=1e-4)
    np.testing.assert_allclose(sr.affine[:3, 2], inp.affine[:3, 2] / 2, atol=1e-4)
