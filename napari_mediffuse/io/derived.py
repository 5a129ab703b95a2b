"""Derived results as DICOM: synthetic images marked as such, DICOM SEG, Parametric Maps.

Everything a task computes leaves the plugin unmistakable:

* **Synthetic images** (translation, synthesis, inpainting, and denoising or
  super-resolution, which alter pixels) written by
  :func:`~napari_mediffuse.io.dicom_write.write_dicom_series` get
  :func:`mark_synthetic`: a SeriesDescription starting ``SYNTHETIC`` that
  keeps the task and model names (only the rest is shortened to the 64
  characters of an LO), ImageType ``DERIVED\\SECONDARY``, a
  DerivationDescription with task, model and parameters, ImageComments
  saying it is not an acquired image, a SourceImageSequence referencing the
  source images, and by default a **new StudyInstanceUID** for the same
  patient, so a PACS never files it with the acquired study.
  CT/MR Image Storage has no ContentQualification attribute; the IODs that
  have one (Parametric Map) get RESEARCH.
* **Labels** (anomaly mask, inpainting mask, a user's painting) are written
  with highdicom as a DICOM SEG referencing the source series
  (:func:`write_dicom_seg`).
* **Heatmaps** are written with highdicom as a DICOM Parametric Map
  (:func:`write_parametric_map`; float values, ContentQualification
  RESEARCH), and as a float NIfTI with :func:`~napari_mediffuse.io.write_nifti`.

pydicom writes the image series; highdicom has no writer for (legacy or
enhanced) CT/MR images derived from other images, only for SEG, Parametric
Map and Secondary Capture.
"""
from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from .errors import WriteError
from .volume import Volume

__all__ = [
    "SYNTHETIC_PREFIX", "is_task_result", "mark_synthetic", "marks_from_nifti_description",
    "source_image_references",
    "synthetic_series_description", "write_dicom_seg", "write_parametric_map",
]

#: Every synthetic series description starts with this.
SYNTHETIC_PREFIX = "SYNTHETIC"

#: DICOM length limits (characters): LO (SeriesDescription), ST, LT.
LO_MAX, ST_MAX, LT_MAX = 64, 1024, 10240

#: RAS <-> LPS for 4x4 affines (its own inverse).
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: A source image references a derived slice when their positions along the
#: slice normal are closer than this many slice spacings.
_REFERENCE_REACH = 0.51


# ---------------------------------------------------------------------------
# Synthetic marking (image series written with pydicom)
# ---------------------------------------------------------------------------


def is_task_result(volume: Volume) -> bool:
    """True for a volume a task computed (``metadata['task']``) or one read
    back from a synthetic export (``metadata['synthetic']``)."""
    meta = volume.metadata
    return bool(meta.get("task")) or bool(meta.get("synthetic"))


def synthetic_series_description(description: str, task: str | None, model: str | None) -> str:
    """``'SYNTHETIC <task> <model>: <description>'`` within 64 characters.

    Only ``description`` is shortened (ending in '...'); the task and model
    names never are. A description already marked (a re-export) is kept
    as it is, shortened if needed.

    Raises
    ------
    WriteError
        The task and model names alone do not fit in 64 characters.
    """
    description = " ".join(str(description or "").split())
    if description.startswith(SYNTHETIC_PREFIX):  # upper case: our marking
        return description[:LO_MAX]
    head = " ".join(part for part in (SYNTHETIC_PREFIX, task, model) if part)
    if len(head) > LO_MAX:
        raise WriteError(f"task and model names '{task} {model}' are too long for a DICOM "
                         f"SeriesDescription ({len(head)} > {LO_MAX} characters)")
    for name in (task, model):  # the head already says them
        if name and re.match(rf"{re.escape(str(name))}\b", description, flags=re.IGNORECASE):
            description = description[len(str(name)):].strip(" :-")
    if not description:
        return head
    room = LO_MAX - len(head) - 2
    if room < 4:
        return head
    if len(description) > room:
        description = description[:room - 3].rstrip() + "..."
    return f"{head}: {description}"


def marks_from_nifti_description(text: str) -> dict[str, Any]:
    """``{'synthetic': True, 'task': 'translate'}`` from a NIfTI ``descrip``
    this package wrote (``'modality=MR mediffuse SYNTHETIC translate'``), so
    a result saved as NIfTI and exported to DICOM later is still marked;
    ``{}`` for other files."""
    tokens = str(text).split()
    if "mediffuse" not in tokens:
        return {}
    marks: dict[str, Any] = {}
    if SYNTHETIC_PREFIX in tokens:
        marks["synthetic"] = True
    rest = [t for t in tokens[tokens.index("mediffuse") + 1:]
            if t not in (SYNTHETIC_PREFIX, "OUT-OF-DOMAIN", "input")]
    if rest:
        marks["task"] = rest[-1]
    return marks


def derivation_description(volume: Volume) -> str:
    """DerivationDescription (ST, 1024 characters): task, model, parameters."""
    meta = volume.metadata
    if not meta.get("task") and meta.get("derivation_description"):
        return str(meta["derivation_description"])[:ST_MAX]  # a re-export keeps the original
    parameters = json.dumps(meta.get("parameters") or {}, sort_keys=True, default=str,
                            separators=(",", ":"))
    text = (f"{SYNTHETIC_PREFIX} image computed by napari-mediffuse, not acquired. "
            f"task={meta.get('task') or 'unknown'}; "
            f"model={meta.get('model') or ('none' if 'parameters' in meta else 'not recorded')}; "
            f"source={meta.get('derived_from') or 'unknown'}; parameters={parameters}")
    if len(text) > ST_MAX:
        text = text[:ST_MAX - 3] + "..."
    return text


def mark_synthetic(ds: Dataset, volume: Volume, description: str, source: Dataset | None, *,
                   keep_source_study: bool = False) -> None:
    """Mark the series template ``ds`` of a task result as synthetic.

    Sets SeriesDescription, ImageType, DerivationDescription, ImageComments
    and, unless ``keep_source_study``, a new StudyInstanceUID (with a
    SYNTHETIC study description, today's date and no accession number) for
    the same patient. The Frame of Reference is kept: the result lies in the
    source's patient coordinates.
    """
    meta = volume.metadata
    ds.SeriesDescription = synthetic_series_description(description, meta.get("task"),
                                                        meta.get("model"))
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = derivation_description(volume)
    ds.ImageComments = (f"{SYNTHETIC_PREFIX}: computed by napari-mediffuse "
                        f"({meta.get('task') or 'derived'}), not an acquired image")
    if keep_source_study and source is not None:
        return
    now = _dt.datetime.now()
    ds.StudyInstanceUID = generate_uid()
    ds.StudyDate, ds.StudyTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.StudyID, ds.AccessionNumber = "", ""
    source_study = str(source.get("StudyDescription", "") or "") if source is not None else ""
    ds.StudyDescription = f"{SYNTHETIC_PREFIX} results" + (f" of {source_study}" if source_study else "")
    ds.StudyDescription = ds.StudyDescription[:LO_MAX]


def source_image_references(files: Sequence, positions: np.ndarray, normal: np.ndarray,
                            spacing: float) -> list[list[Dataset]]:
    """SourceImageSequence items for each written slice.

    Parameters
    ----------
    files : sequence of paths
        The source series' files.
    positions : ndarray (n, 3)
        ImagePositionPatient (LPS mm) of each written slice.
    normal : ndarray (3,)
        Unit slice normal of the written slices.
    spacing : float
        Their slice spacing, mm.

    Returns
    -------
    list of list of Dataset
        For slice ``k``, one item (ReferencedSOPClassUID,
        ReferencedSOPInstanceUID) per source image within half a slice (of
        the coarser of the two grids) of it along the normal; every source
        image when none is (e.g. source slices in another orientation).
    """
    sources = []
    for path in files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, force=True,
                                     specific_tags=["SOPClassUID", "SOPInstanceUID",
                                                    "ImagePositionPatient"])
        except Exception:  # a source gone missing is not referenced
            continue
        if not header.get("SOPInstanceUID"):
            continue
        position = header.get("ImagePositionPatient")
        offset = float(np.asarray([float(v) for v in position]) @ normal) if position else None
        sources.append((str(header.get("SOPClassUID", "")), str(header.SOPInstanceUID), offset))
    # Within half a slice of the coarser grid: a thin slice of an SR result
    # references the thick source slice it lies in.
    offsets = np.sort([s[2] for s in sources if s[2] is not None])
    source_gap = float(np.median(np.diff(offsets))) if len(offsets) > 1 else 0.0
    reach = _REFERENCE_REACH * max(spacing, source_gap, 1e-6)
    result = []
    for position in np.asarray(positions, dtype=float):
        here = float(position @ normal)
        near = [s for s in sources if s[2] is not None and abs(s[2] - here) <= reach]
        result.append([_reference_item(c, u) for c, u, _ in (near or sources)])
    return result


def _reference_item(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


# ---------------------------------------------------------------------------
# DICOM SEG and Parametric Map (highdicom)
# ---------------------------------------------------------------------------


def write_dicom_seg(labels: Volume, path, *, source_files: Sequence | None = None,
                    segments: dict | None = None, description: str | None = None,
                    overwrite: bool = False) -> Path:
    """Write a labels volume as a DICOM SEG referencing its source series.

    Parameters
    ----------
    labels : Volume
        Integer label map (0 = background, value = segment number) on the
        grid of (or overlapping) the source series.
    path : str or Path
        The ``.dcm`` file to write.
    source_files : sequence of paths, optional
        The source series' DICOM files; default ``labels.metadata['files']``
        (results and layers keep their input's files).
    segments : dict, optional
        ``{number: {'label': str, 'color': [r, g, b]}}``; default
        ``labels.metadata['segments']``, else one segment per value named
        after the volume.
    description : str, optional
        SeriesDescription; default the volume's name (with the task).
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    Path

    Raises
    ------
    WriteError
        No source series, values that are not labels, or highdicom refuses
        the geometry (the message names the file and the reason).
    """
    import highdicom as hd

    path = Path(path)
    _check_target(path, overwrite)
    data = np.asarray(labels.data)
    if data.ndim != 3:
        raise WriteError(f"{path}: only 3D label maps can be written as DICOM SEG "
                         f"(got shape {data.shape})")
    if (data.dtype.kind == "f" and not np.array_equal(data, np.round(data))) or data.min() < 0:
        raise WriteError(f"{path}: a DICOM SEG needs integer labels >= 0; this volume holds "
                         "other values (write a heatmap as a Parametric Map instead)")
    data = data.astype(np.int64)
    present = [int(v) for v in np.unique(data) if v > 0]
    if not present:
        raise WriteError(f"{path}: the label map is empty; nothing to write")
    # SEG numbers its segments 1..N: every value up to the largest gets a
    # segment (absent ones stay empty), so label values survive the round trip.
    numbers = list(range(1, max(present) + 1))
    sources = _source_datasets(labels, source_files, path)
    segments = segments or labels.metadata.get("segments") or {}
    meta = labels.metadata
    descriptions = [_segment_description(hd, n, segments.get(n) or segments.get(str(n)) or {},
                                         labels.name, meta) for n in numbers]
    # A label map (value = segment number) is what highdicom takes for
    # non-overlapping BINARY segments.
    label_map = data.astype(np.uint8 if max(numbers) < 256 else np.uint16)
    volume = _hd_volume(hd, label_map, labels.affine, sources[0])
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=volume,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=generate_uid(),
            series_number=_derived_series_number(sources[0], 2000), sop_instance_uid=generate_uid(),
            instance_number=1, manufacturer="napari-mediffuse",
            manufacturer_model_name="napari-mediffuse", software_versions=_software_version(),
            device_serial_number="0",
            series_description=_description(description or labels.name, meta))
    except Exception as exc:
        raise WriteError(f"{path}: cannot build a DICOM SEG ({_one_line(exc)})") from None
    _save(seg, path)
    return path


def write_parametric_map(heatmap: Volume, path, *, source_files: Sequence | None = None,
                         description: str | None = None, unit: str = "score",
                         overwrite: bool = False) -> Path:
    """Write a float map (anomaly heatmap...) as a DICOM Parametric Map.

    Values are stored as 32-bit floats (FloatPixelData) with a Real World
    Value Mapping saying what they are; ContentQualification is RESEARCH.
    The same map can be written as a float NIfTI with
    :func:`~napari_mediffuse.io.write_nifti`.

    Raises
    ------
    WriteError
        No source series, non-finite values, or highdicom refuses it.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    path = Path(path)
    _check_target(path, overwrite)
    data = np.asarray(heatmap.data, dtype=np.float32)
    if data.ndim != 3:
        raise WriteError(f"{path}: only 3D maps can be written as a Parametric Map "
                         f"(got shape {data.shape})")
    if not np.all(np.isfinite(data)):
        raise WriteError(f"{path}: the map has NaN or infinite values")
    sources = _source_datasets(heatmap, source_files, path)
    meta = heatmap.metadata
    low, high = float(data.min()), float(data.max())
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=unit[:16], lut_explanation=f"{meta.get('task') or 'derived'} {unit}"[:64],
        unit=codes.UCUM.NoUnits, value_range=(low, high if high > low else low + 1.0),
        slope=1.0, intercept=0.0)
    volume = _hd_volume(hd, data, heatmap.affine, sources[0])
    center, width = (low + high) / 2.0, max(high - low, 1e-6)
    try:
        pmap = hd.pm.ParametricMap(
            source_images=sources, pixel_array=volume, series_instance_uid=generate_uid(),
            series_number=_derived_series_number(sources[0], 3000), sop_instance_uid=generate_uid(),
            instance_number=1, manufacturer="napari-mediffuse",
            manufacturer_model_name="napari-mediffuse", software_versions=_software_version(),
            device_serial_number="0", contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            voi_lut_transformations=[hd.VOILUTTransformation(window_center=center,
                                                             window_width=width)],
            content_qualification=hd.ContentQualificationValues.RESEARCH,
            image_flavor=hd.pm.ImageFlavorValues.VOLUME,
            derived_pixel_contrast=hd.pm.DerivedPixelContrastValues.NONE,
            series_description=_description(description or heatmap.name, meta),
            content_description=derivation_description(heatmap)[:64])
    except Exception as exc:
        raise WriteError(f"{path}: cannot build a DICOM Parametric Map ({_one_line(exc)})") from None
    pmap.DerivationDescription = derivation_description(heatmap)
    _save(pmap, path)
    return path


def _check_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise WriteError(f"{path}: file exists; choose another name or allow overwriting "
                         "(nothing was written)")
    if not path.parent.is_dir():
        raise WriteError(f"{path}: folder {path.parent} does not exist")


def _source_datasets(volume: Volume, source_files, path: Path) -> list[Dataset]:
    """Headers of the source series, with the Type 2 tags highdicom copies
    made present (empty) when an export lacks them."""
    files = list(source_files if source_files is not None else volume.metadata.get("files") or [])
    if not files:
        raise WriteError(f"{path}: a DICOM SEG or Parametric Map references the DICOM series it "
                         "was computed on, and this volume has none (read the scan from DICOM, "
                         "or write a NIfTI file instead)")
    datasets = []
    for file in files:
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except Exception as exc:
            raise WriteError(f"{path}: cannot read source DICOM file {file} "
                             f"({type(exc).__name__})") from None
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                        "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                        "ReferringPhysicianName"):
            if keyword not in ds:
                setattr(ds, keyword, "")
        datasets.append(ds)
    return datasets


def _hd_volume(hd, array: np.ndarray, affine_ras: np.ndarray, source: Dataset):
    """A highdicom Volume (index -> LPS) of ``array`` in the source's frame of reference."""
    return hd.Volume(array=array, affine=_RAS_TO_LPS @ np.asarray(affine_ras, dtype=float),
                     coordinate_system="PATIENT",
                     frame_of_reference_uid=str(source.get("FrameOfReferenceUID", "")) or None)


def _segment_description(hd, number: int, info: dict, name: str, meta: dict):
    """highdicom SegmentDescription of segment ``number``."""
    from pydicom.sr.codedict import codes

    task = meta.get("task")
    if task:
        algorithm = dict(
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name=f"napari-mediffuse {task}"[:64], version=_software_version()[:64],
                family=codes.cid7162.ArtificialIntelligence,
                parameters={"model": str(meta.get("model") or "none")[:64]}))
        category, kind = codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Abnormal
    else:
        algorithm = dict(algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        category, kind = codes.SCT.Tissue, codes.SCT.Tissue
    label = str(info.get("label") or (name if number == 1 else f"{name} {number}"))[:64]
    description = hd.seg.SegmentDescription(
        segment_number=number, segment_label=label, segmented_property_category=category,
        segmented_property_type=kind, **algorithm)
    color = info.get("color")
    if color is not None and len(color) == 3:
        description.RecommendedDisplayCIELabValue = list(
            hd.color.CIELabColor.from_rgb(*[int(c) for c in color]).value)
    return description


def _description(text: str, meta: dict) -> str:
    """SeriesDescription of a SEG/Parametric Map: the task first when computed."""
    task = meta.get("task")
    text = " ".join(str(text).split())
    if task and not text.lower().startswith(str(task).lower()):
        text = f"{task}: {text}"
    return text[:LO_MAX]


def _derived_series_number(source: Dataset, base: int) -> int:
    number = source.get("SeriesNumber")
    try:
        return base + int(number)
    except (TypeError, ValueError):
        return base


def _save(ds: Dataset, path: Path) -> None:
    tmp = path.with_name(path.name + ".part")
    try:
        ds.save_as(tmp, enforce_file_format=True)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"{path}: cannot write ({exc}); nothing was kept") from None


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def _software_version() -> str:
    try:
        from importlib.metadata import version

        return f"napari-mediffuse {version('napari-mediffuse')}"
    except Exception:
        return "napari-mediffuse"
