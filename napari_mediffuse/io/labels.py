"""Recognising label maps (segmentations) among files that store no modality.

A NIfTI file says nothing about being a scan or a segmentation. A label map
(TotalSegmentator's output, a tumour mask) is integer, non-negative, has a
few distinct values, and is piecewise constant: neighbouring labelled voxels
almost always hold the same value. Scans are the opposite -- on the real
files in ../shared/data, among neighbouring voxel pairs that are not both 0,
the share of equal pairs (along all three axes) separates the label maps
(TotalSegmentator's 117 classes, LiTS liver/tumour, a lung tumour mask) from
every CT and MR there (8-bit brain MRs included); see tests/test_seg.py.
"""
from __future__ import annotations

import numpy as np

__all__ = ["MAX_LABELS", "MIN_NEIGHBOUR_AGREEMENT", "looks_like_label_map"]

#: At most this many distinct values (TotalSegmentator has 117 classes).
MAX_LABELS = 1024

#: Share of equal neighbouring pairs (not both 0) above which a volume is a label map.
MIN_NEIGHBOUR_AGREEMENT = 0.5

#: NIfTI intent code NIFTI_INTENT_LABEL: the writer says it is a label map.
NIFTI_INTENT_LABEL = 1002


def looks_like_label_map(data: np.ndarray, *, intent_code: int = 0, description: str = "") -> bool:
    """True when ``data`` is a label map rather than a CT/MR image.

    Parameters
    ----------
    data : ndarray
        Voxel values (3D, or 4D with a leading non-spatial axis).
    intent_code : int
        The NIfTI header's intent code; NIFTI_INTENT_LABEL (1002) decides.
    description : str
        The header's ``descrip``: a named CT/MR modality (our writer puts it
        there) means an image.
    """
    if intent_code == NIFTI_INTENT_LABEL:
        return True
    text = description.upper()
    if "MODALITY=CT" in text or "MODALITY=MR" in text:
        return False
    if data.size == 0 or data.dtype.kind not in "biuf":
        return False
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all() or not np.array_equal(data, np.round(data)):
            return False
    low, high = float(data.min()), float(data.max())
    if low < 0 or high == 0 or high > np.iinfo(np.int32).max:
        return False
    values = np.unique(data)
    if len(values) > MAX_LABELS:
        return False
    return _neighbour_agreement(data) >= MIN_NEIGHBOUR_AGREEMENT


def _neighbour_agreement(data: np.ndarray) -> float:
    """Share of equal neighbouring voxel pairs, along the three spatial axes
    together, among pairs that are not both 0."""
    equal = labelled = 0
    for axis in (-3, -2, -1):
        n = data.shape[axis]
        if n < 2:
            continue
        left = np.take(data, np.arange(1, n), axis=axis)
        right = np.take(data, np.arange(n - 1), axis=axis)
        pairs = (left != 0) | (right != 0)
        labelled += int(np.count_nonzero(pairs))
        equal += int(np.count_nonzero((left == right) & pairs))
    return equal / labelled if labelled else 0.0
