"""What a model saw in training, and whether a scan falls inside it.

Every model card may hold a ``domain`` block::

    "domain": {"modality": "CT", "regions": ["abdomen"],
               "pixel_spacing_mm": [3.0, 3.0], "slice_spacing_mm": [3.0, 3.0],
               "intensity": "HU -1024..2048"}

(cards without one get it derived from their other fields). A task compares
its input with it before running: a scan outside the pixel-size range or of
another body region gives warnings that the result carries (CLI: stderr and
the output file's description; panel: a notification and the layer name).
Where the output would be meaningless, e.g. a translation model trained on
abdominal pairs given a head MR, the task refuses unless the user forces it.

The scan's body region is, in order: the user's ``region``; DICOM
BodyPartExamined; a guess from the scan itself (:func:`guess_region`).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage

from ..engine.networks import REGIONS
from ..io.volume import Volume

#: A pixel or slice size within this factor of the trained range counts as inside.
SPACING_TOLERANCE = 1.25
#: Axial body width (mm) below which a scan is taken as head or neck.
HEAD_NECK_MAX_WIDTH_MM = 230.0
#: Fraction of the body's axial area below -400 HU above which a CT is taken as chest (lungs).
CHEST_MIN_LUNG_FRACTION = 0.12

#: Axial slices the region guess looks at (evenly spaced): enough for a median, bounded memory.
GUESS_SLICES = 24

#: DICOM BodyPartExamined values (upper case) -> region names.
BODY_PARTS = {
    "HEAD": "head-neck", "BRAIN": "head-neck", "SKULL": "head-neck", "NECK": "head-neck",
    "HEADNECK": "head-neck", "HEAD_NECK": "head-neck", "HEAD AND NECK": "head-neck", "HN": "head-neck",
    "CHEST": "chest", "THORAX": "chest", "LUNG": "chest", "BREAST": "chest", "HEART": "chest",
    "ABDOMEN": "abdomen", "LIVER": "abdomen", "PELVIS": "abdomen", "ABDOMENPELVIS": "abdomen",
    "KIDNEY": "abdomen", "PANCREAS": "abdomen",
}


class OutOfDomainError(ValueError):
    """The scan is outside what the model saw, so its output would be meaningless."""


def model_domain(card: dict) -> dict:
    """The card's ``domain`` block, completed from its other fields."""
    domain = dict(card.get("domain") or {})
    domain.setdefault("modality", card.get("source_modality") or card.get("modality"))
    if "regions" not in domain:
        names = {entry.get("region") for entry in card.get("training", {}).get("data", [])
                 if isinstance(entry, dict)}
        domain["regions"] = [name for name in REGIONS if name in names and name != "unknown"]
    spacing = card.get("pixel_spacing_mm")
    if "pixel_spacing_mm" not in domain and spacing:
        domain["pixel_spacing_mm"] = [float(min(spacing)), float(max(spacing))]
    return domain


def body_part_region(volume: Volume) -> Optional[str]:
    """Region named by the scan's DICOM BodyPartExamined, if any."""
    meta = volume.metadata
    value = meta.get("BodyPartExamined") or (meta.get("dicom_reference") or {}).get("BodyPartExamined")
    if not value:
        return None
    return BODY_PARTS.get(str(value).strip().upper().replace("-", ""))


def body_mask(volume: Volume) -> np.ndarray:
    """Voxels of the patient's body: above -500 HU for CT, above Otsu's threshold otherwise."""
    data = np.asarray(volume.data, dtype=np.float32)
    finite = data[np.isfinite(data)]
    if volume.modality == "CT":
        threshold = -500.0
    elif finite.size:
        from skimage.filters import threshold_otsu

        threshold = float(threshold_otsu(finite[:: max(1, finite.size // 200_000)]))
    else:
        return np.zeros(data.shape, bool)
    return np.nan_to_num(data, nan=-np.inf) > threshold


def guess_region(volume: Volume) -> tuple[Optional[str], str]:
    """Body region judged from the scan: ``(region or None, how it was judged)``.

    The median over axial slices of the body's widest left-right extent (mm):
    under 230 mm is a head or neck. Wider CT is chest when lung (below
    -400 HU) fills at least 12 % of the body's axial area, else abdomen; wider
    MR is left undecided between them.
    """
    if volume.data.ndim != 3:
        return None, "not a 3D scan"
    # a few evenly spaced axial slices: a 512 x 512 x 600 scan is judged in a fraction of a second
    picked = np.unique(np.linspace(0, volume.data.shape[0] - 1, GUESS_SLICES).round().astype(int))
    volume = volume.with_data(np.asarray(volume.data[picked]), affine=volume.affine)
    body = body_mask(volume)
    if not body.any():
        return None, "no body found in the scan"
    cols = np.flatnonzero(body.any(axis=(0, 1)))
    spacing = volume.spacing
    widths = []
    for s in range(body.shape[0]):
        c = np.flatnonzero(body[s].any(axis=0))
        # a body cut by the field of view has no measurable width
        if c.size and c[0] > 0 and c[-1] < body.shape[2] - 1:
            widths.append((c[-1] - c[0] + 1) * spacing[2])
    if not widths or cols.size == 0:
        return None, "the body is not wholly inside the field of view"
    width = float(np.median(widths))
    if width < HEAD_NECK_MAX_WIDTH_MM:
        return "head-neck", f"judged from the scan: body {width:.0f} mm wide"
    if volume.modality != "CT":
        return None, f"judged from the scan: body {width:.0f} mm wide (chest or abdomen)"
    filled = ndimage.binary_fill_holes(body, structure=np.ones((1, 3, 3), bool))
    lung = filled & (np.asarray(volume.data) < -400)
    fraction = float(lung.sum() / max(1, filled.sum()))
    region = "chest" if fraction >= CHEST_MIN_LUNG_FRACTION else "abdomen"
    return region, f"judged from the scan: body {width:.0f} mm wide, {100 * fraction:.0f} % lung"


def scan_region(volume: Volume, region: Optional[str] = None) -> tuple[Optional[str], str]:
    """The scan's body region and where it came from (user, DICOM, or a guess)."""
    if region:
        return region, "given by the user"
    named = body_part_region(volume)
    if named:
        return named, "from DICOM BodyPartExamined"
    return guess_region(volume)


def _range_text(lo: float, hi: float) -> str:
    return f"{lo:g} mm" if np.isclose(lo, hi) else f"{lo:g}-{hi:g} mm"


def check_domain(card: dict, volume: Volume, *, task: str, region: Optional[str] = None,
                 refuse_other_region: bool = False, force: bool = False,
                 slice_spacing_mm: Optional[float] = None) -> list[str]:
    """Warnings for a scan outside the model's domain (an empty list inside it).

    Parameters
    ----------
    card : dict
        The model's card.
    volume : Volume
        The task's input.
    task : str
        Task name for the messages.
    region : str, optional
        The user's statement of the scan's region (wins over DICOM and the guess).
    refuse_other_region : bool
        Raise :class:`OutOfDomainError` when the scan's region is not one the
        model saw (translation: its output would be meaningless), unless ``force``.
    force : bool
        Run anyway; the refusal becomes a warning.
    slice_spacing_mm : float, optional
        For a task whose model works across the slices (super-resolution:
        the thick slices' spacing, mm), checked against the domain's
        ``slice_spacing_mm``. Tasks that run slice by slice leave it out.
    """
    domain = model_domain(card)
    name = card.get("name", "the model")
    label = f"{volume.name!r}" + (f" ({volume.source})" if volume.source else "")
    warnings = []
    lo_hi = domain.get("pixel_spacing_mm")
    if lo_hi:
        pixel = float(np.mean(volume.spacing[1:]))
        lo, hi = float(lo_hi[0]), float(lo_hi[-1])
        if not lo / SPACING_TOLERANCE <= pixel <= hi * SPACING_TOLERANCE:
            warnings.append(f"{name} was trained on {_range_text(lo, hi)} pixels; this scan's are "
                            f"{pixel:.2g} mm (outside what the model saw)")
    lo_hi = domain.get("slice_spacing_mm")
    if lo_hi and slice_spacing_mm is not None:
        lo, hi = float(lo_hi[0]), float(lo_hi[-1])
        if not lo / SPACING_TOLERANCE <= float(slice_spacing_mm) <= hi * SPACING_TOLERANCE:
            warnings.append(f"{name} was trained on {_range_text(lo, hi)} slices; this scan's are "
                            f"{float(slice_spacing_mm):.2g} mm apart (outside what the model saw)")
    regions = [r for r in domain.get("regions") or [] if r != "unknown"]
    if regions:
        found, how = scan_region(volume, region)
        if found is not None and found not in regions:
            message = (f"{name} saw {', '.join(regions)} only; {label} looks like {found} ({how})")
            if refuse_other_region and not force:
                raise OutOfDomainError(f"{task}: {message}, so its output would be meaningless. "
                                       "Nothing was written; pass --force (panel: Force) to run anyway, "
                                       "or --region if the region is wrong")
            warnings.append(message + ("; run anyway (forced)" if refuse_other_region else ""))
    return warnings
