"""Anomaly detection on real tumours (and on lesions inserted into a validation patient).

    python -m training.evaluate anomaly-real --model /path/to/prior --out docs/evaluation

Cases (``--cases``):

* ``lung1``: the NSCLC-Radiomics (LUNG1) chest CT, 0.57 x 0.57 x 5 mm, with
  its tumour mask. The multi-patient CT prior was trained on this scan only
  outside the tumour: the axial slices within ``--lung1-margin-mm`` (15 mm)
  of it were never drawn (:func:`training.data.excluded_blocks`). Evaluated:
  the tumour slices and those unseen margin slices (tumour-free, so image
  AUROC is defined). ROI (``--lung1-roi``): ``lungs`` (default) = the lung
  fields, i.e. body voxels below -400 HU (the two largest components per
  slice), closed with a 10 mm disc and hole-filled, so vessels, hilar
  structures and a tumour inside the lung are in it -- the organ the
  tumour sits in, as the liver is for LiTS; or ``body`` (the task's
  automatic ROI: body with lungs, mediastinum and chest wall).
* ``lits``: the LiTS volume-117 crop (128^3; voxel size not stored, 1.5 mm
  assumed; evaluation only, never trained on), label 1 liver, 2 tumour. Its
  axial slices are displayed rotated by 180 degrees (spine at the top,
  liver on the image's right) although its affine says otherwise, so
  ``flip_P flip_L`` (:func:`training.data.fix_orientation`) is applied by
  default to give the prior the anatomy it was trained on. ROI = liver
  including tumour (labels 1 | 2). Evaluated: slices with tumour and the
  tumour-free liver slices (with at least ``--min-liver-px`` liver pixels)
  as negatives.
* ``lidc-inserted`` (optional): synthetic lesions (:mod:`training.lesions`,
  10-30 mm, hypo/hyper 30-90 HU) inserted into the 1 mm LIDC chest CT, a
  validation patient of the multi-patient prior (never trained on). No
  segmentation: lesions go into soft tissue (-100..200 HU, opened with a
  5 mm disc, inside the body); ROI = the body (the task's default). Each
  slice is evaluated with and without its lesion (as ``anomaly``).
* ``openkbp-inserted`` (optional): the same lesions inserted into the
  head-and-neck CTs of OpenKBP's validation patients (never trained on;
  the region the multi-patient prior saw most), one or more axial slices
  per patient from the central 60 % of its box, each resampled in-plane to
  ``--openkbp-pixel-mm`` (4 mm: the patients' own pixels are 3.9-5.1 mm,
  one grid lets their slices form one stack) on a 128 x 128 grid; ROI =
  the body (found on each patient's own volume). Each slice with and
  without its lesion.

For each case the diffusion method (the
:func:`napari_mediffuse.tasks.anomaly.detect_anomalies` pipeline: healthy
reconstruction of the ROI, residual or spread score, in-ROI smoothing,
robust normalisation, automatic threshold), the local z-score baseline
of ``python -m training.evaluate anomaly`` (same smoothing, normalisation and
threshold) and the ROI-level baseline (the diffusion heatmap's pipeline with
a flat reconstruction at the ROI's median HU per slice, same polarity: what
intensity alone tells inside an organ ROI) report pixel AUROC over the ROI of every evaluated slice, PRO,
the Dice of the automatic mask (threshold from all evaluated slices, as a
user running the task on them gets), the best Dice over thresholds (an
optimistic bound), image AUROC (slice maximum in the ROI; only where
tumour-free slices exist) and the fraction of non-tumour ROI pixels the
automatic mask flags.

Writes ``<stem>.json``, ``<stem>_table.md`` (the command in its header) and
``<stem>.png`` to ``--out`` (stem ``anomaly_real``).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from scipy import ndimage

from .anomaly import (_gray, _heat, _overlay, _slice_max, add_heatmap_options, auroc, baseline_heatmap, best_dice,
                      dice, diffusion_configs, diffusion_heatmap, make_lesion_volume, matching_baseline, pro_auc,
                      slice_components, smoothing_variants)

log = logging.getLogger(__name__)

DATA = "../shared/data/ct/"
LUNG1_CT = DATA + "chest_ct_lung1_5mm.nii.gz"
LUNG1_TUMOUR = DATA + "chest_ct_lung1_5mm_tumour.nii.gz"
LITS_CT = DATA + "liver_ct_lits117_crop.nii.gz"
LITS_LABELS = DATA + "liver_ct_lits117_crop_labels.nii.gz"
LIDC_CT = DATA + "chest_ct_lidc0314_1mm.nii.gz"
#: OpenKBP's validation patients: never trained on by any bundled model.
OPENKBP_VALIDATION = DATA + "openkbp/validation"
CASES = ("lung1", "lits", "lidc-inserted", "openkbp-inserted")

#: Targets of issue 18 (measured and reported, never asserted) and MedDiff-FM's
#: BMAD liver result for comparison.
TARGETS = {"pixel_auroc": 0.90, "dice": 0.30, "above_baseline": True,
           "meddiff_fm_bmad_liver": {"image_auroc": 0.853, "pixel_auroc": 0.976, "pro": 0.966, "dice": 0.274}}


@dataclass
class Case:
    """One evaluation case: a stack of axial slices (not necessarily contiguous)."""

    name: str
    kind: str                 # 'real tumour' or 'inserted lesions'
    image: np.ndarray         # (S, H, W) HU, float32
    truth: np.ndarray         # (S, H, W) bool
    roi: np.ndarray           # (S, H, W) bool
    affine: np.ndarray        # a grid with the scan's voxel size (slice positions are not used)
    region: Optional[str]     # body region for the prior
    slices: list              # indices in the source scan
    notes: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def spacing(self):
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


# -- ROIs -------------------------------------------------------------------------

def lung_fields(image_hu: np.ndarray, body: np.ndarray, spacing2d, *, threshold_hu: float = -400.0,
                closing_mm: float = 10.0) -> np.ndarray:
    """Lung-field ROI per axial slice: body voxels below ``threshold_hu``, the
    two largest components, closed with a disc of ``closing_mm`` radius and
    hole-filled (vessels, airways, hilum and intrapulmonary masses inside)."""
    radius = [max(1, int(round(closing_mm / s))) for s in spacing2d]
    yy, xx = np.ogrid[-radius[0]:radius[0] + 1, -radius[1]:radius[1] + 1]
    disc = (yy / radius[0]) ** 2 + (xx / radius[1]) ** 2 <= 1.0
    out = np.zeros(image_hu.shape, dtype=bool)
    for k in range(image_hu.shape[0]):
        air = (image_hu[k] < threshold_hu) & body[k]
        lab, n = ndimage.label(air)
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        keep = np.isin(lab, np.argsort(sizes)[-2:]) & (lab > 0)
        padded = np.pad(keep, [(r, r) for r in radius])
        closed = ndimage.binary_closing(padded, disc)[radius[0]:-radius[0], radius[1]:-radius[1]]
        out[k] = ndimage.binary_fill_holes(closed) & body[k]
    return out


def soft_tissue(image_hu: np.ndarray, body: np.ndarray, spacing2d, *, hu=(-100.0, 200.0),
                opening_mm: float = 5.0) -> np.ndarray:
    """Soft tissue per axial slice: ``hu[0] <= HU <= hu[1]`` inside the body,
    opened with a disc of ``opening_mm`` diameter (no thin rims)."""
    radius = [max(1, int(round(opening_mm / 2 / s))) for s in spacing2d]
    yy, xx = np.ogrid[-radius[0]:radius[0] + 1, -radius[1]:radius[1] + 1]
    disc = (yy / radius[0]) ** 2 + (xx / radius[1]) ** 2 <= 1.0
    tissue = (image_hu >= hu[0]) & (image_hu <= hu[1]) & body
    return np.stack([ndimage.binary_opening(t, disc) for t in tissue])


def grow_in_plane(mask: np.ndarray, spacing2d, margin_mm: float) -> np.ndarray:
    """``mask`` dilated slice by slice by ``margin_mm`` (an ellipse in voxels); unchanged for 0."""
    if margin_mm <= 0:
        return mask
    radius = [max(1, int(round(margin_mm / s))) for s in spacing2d]
    yy, xx = np.ogrid[-radius[0]:radius[0] + 1, -radius[1]:radius[1] + 1]
    disc = (yy / radius[0]) ** 2 + (xx / radius[1]) ** 2 <= 1.0
    return np.stack([ndimage.binary_dilation(m, disc) for m in mask])


def spread_pick(indices, n: int) -> np.ndarray:
    """At most ``n`` of ``indices``, evenly spread (all if ``n`` <= 0)."""
    indices = np.asarray(indices, dtype=int)
    if n <= 0 or len(indices) <= n:
        return indices
    return indices[np.linspace(0, len(indices) - 1, n).round().astype(int)]


# -- cases ------------------------------------------------------------------------

def _stack_volume(data, affine, name):
    from napari_mediffuse import io

    return io.Volume(data=np.ascontiguousarray(data, dtype=np.float32), affine=affine, modality="CT", name=name)


def lung1_case(ct_path=LUNG1_CT, tumour_path=LUNG1_TUMOUR, *, margin_mm: float = 15.0, roi: str = "lungs",
               max_tumour_slices: int = 12, max_normal_slices: int = 12) -> Case:
    """The LUNG1 tumour: its slices and the tumour-free slices the prior never saw."""
    from napari_mediffuse import io
    from napari_mediffuse.tasks.masks import body_mask
    from training.data import excluded_blocks

    ct = io.read(ct_path)[0]
    tumour = io.read(tumour_path)[0].data > 0
    if tumour.shape != ct.data.shape:
        raise ValueError(f"tumour mask {tumour.shape} is not on the CT grid {ct.data.shape}")
    n = ct.data.shape[0]
    trained = np.zeros(n, dtype=bool)
    for block in excluded_blocks(tumour, ct.spacing[0], margin_mm, 4):
        trained[block] = True
    has_tumour = tumour.any(axis=(1, 2))
    unseen_normal = np.flatnonzero(~trained & ~has_tumour)
    # only tumour-free slices in the excluded margin (farther ones were trained on)
    picks = np.sort(np.concatenate([spread_pick(np.flatnonzero(has_tumour), max_tumour_slices),
                                    spread_pick(unseen_normal, max_normal_slices)]))
    image = ct.data[picks].astype(np.float32)
    vol = _stack_volume(image, ct.affine, "lung1")
    body = body_mask(vol)
    mask = lung_fields(image, body, ct.spacing[1:]) if roi == "lungs" else body
    truth = tumour[picks]
    notes = [f"slices {picks.tolist()} of {Path(ct_path).name}: tumour in {np.flatnonzero(has_tumour).tolist()}; "
             f"the prior's training excluded the axial slices within {margin_mm:g} mm of the tumour "
             f"({np.flatnonzero(~trained).tolist()}), so every evaluated slice is unseen",
             f"ROI {roi}: {100 * (truth & mask).sum() / max(truth.sum(), 1):.1f} % of the tumour inside"]
    return Case(f"LUNG1 NSCLC (chest, 0.57 x 5 mm), ROI {roi}", "real tumour", image, truth, mask, ct.affine, "chest",
                picks.tolist(), notes, extra={"roi": roi})


def lits_case(ct_path=LITS_CT, labels_path=LITS_LABELS, *, orientation_fix=("flip_P", "flip_L"),
              max_tumour_slices: int = 12, max_normal_slices: int = 4, min_liver_px: int = 100) -> Case:
    """The LiTS crop's liver tumours; ROI = liver incl. tumour."""
    from napari_mediffuse import io
    from training.data import fix_orientation

    ct = io.read(ct_path)[0]
    labels = io.read(labels_path)[0].data
    if labels.shape != ct.data.shape:
        raise ValueError(f"labels {labels.shape} are not on the CT grid {ct.data.shape}")
    data, _ = fix_orientation(ct.data.astype(np.float32), ct.spacing, list(orientation_fix))
    labels, _ = fix_orientation(labels, ct.spacing, list(orientation_fix))
    liver = labels > 0
    tumour = labels == 2
    enough = liver.sum(axis=(1, 2)) >= min_liver_px
    with_tumour = np.flatnonzero(enough & tumour.any(axis=(1, 2)))
    without = np.flatnonzero(enough & ~tumour.any(axis=(1, 2)))
    picks = np.sort(np.concatenate([spread_pick(with_tumour, max_tumour_slices),
                                    spread_pick(without, max_normal_slices)]))
    truth = tumour[picks]
    roi = liver[picks]
    notes = [f"slices {picks.tolist()} of {Path(ct_path).name} (evaluation only: never trained on); "
             f"{len(without)} tumour-free slices with >= {min_liver_px} liver pixels exist, all at the liver's "
             f"tip; tumour = {100 * truth.sum() / roi.sum():.1f} % of the evaluated liver ROI",
             f"orientation fix {' '.join(orientation_fix) or 'none'} (the crop's axial slices are stored rotated "
             "by 180 degrees relative to the anatomy its affine states)",
             "voxel size not stored: 1.5 mm assumed"]
    return Case("LiTS-117 liver tumours (1.5 mm assumed)", "real tumour", np.ascontiguousarray(data[picks]),
                np.ascontiguousarray(truth), np.ascontiguousarray(roi), ct.affine, "abdomen", picks.tolist(), notes,
                extra={"roi": "liver incl. tumour (labels 1|2)", "orientation_fix": list(orientation_fix)})


def lidc_inserted_case(ct_path=LIDC_CT, *, slices: int = 6, seed: int = 0, size_range=(10.0, 30.0),
                       contrast_range=(30.0, 90.0)) -> Case:
    """Lesions inserted into soft tissue of the LIDC validation patient; each
    slice twice (without, with its lesion); ROI = body."""
    from napari_mediffuse import io
    from napari_mediffuse.tasks.masks import body_mask

    ct = io.read(ct_path)[0]
    data = ct.data
    sub = np.arange(0, data.shape[0], 4)  # every 4th slice: enough to choose from, a quarter of the work
    body_sub = body_mask(_stack_volume(data[sub], ct.affine, "lidc"))
    tissue_sub = soft_tissue(data[sub].astype(np.float32), body_sub, ct.spacing[1:])
    area = tissue_sub.sum(axis=(1, 2)) * ct.spacing[1] * ct.spacing[2]
    candidates = np.flatnonzero(area >= 5000.0)  # mm^2 of soft tissue: room for a 30 mm lesion
    chosen = spread_pick(candidates[1:-1] if len(candidates) > 2 else candidates, slices)
    picks = sub[chosen]
    clean = data[picks].astype(np.float32)
    body = body_sub[chosen]
    tissue = tissue_sub[chosen]
    rng = np.random.default_rng(seed)
    image, truth, info = make_lesion_volume(clean, {"soft tissue": tissue}, ct.spacing[1:], rng, size_range,
                                            contrast_range)
    both = np.concatenate([clean, image])
    notes = [f"slices {picks.tolist()} of {Path(ct_path).name} (a validation patient of the multi-patient prior, "
             "never trained on), each without and with one inserted lesion (10-30 mm, |contrast| 30-90 HU, "
             "alternately hypo/hyper) in soft tissue (-100..200 HU, opened 5 mm); ROI = body"]
    return Case("LIDC-0314 + inserted lesions (chest, 0.78 x 1 mm)", "inserted lesions", both,
                np.concatenate([np.zeros_like(truth), truth]), np.concatenate([body, body]),
                ct.affine, "chest", picks.tolist() * 2, notes, extra={"roi": "body", "lesions": info})


def openkbp_inserted_case(root=OPENKBP_VALIDATION, *, patients: int = 16, slices_per_patient: int = 1,
                          pixel_mm: float = 4.0, size: int = 128, seed: int = 0, size_range=(10.0, 30.0),
                          contrast_range=(30.0, 90.0), orientation_fix=("rot90_PL", "flip_S")) -> Case:
    """Lesions inserted into soft tissue of OpenKBP validation patients' axial
    slices (central 60 % of each box: neck to upper chest; in-plane
    ``pixel_mm`` on a ``size`` x ``size`` grid); each slice twice (without,
    with its lesion); ROI = body."""
    from napari_mediffuse import io
    from napari_mediffuse.tasks.masks import body_mask
    from training.data import centre_fit, fix_orientation

    if pixel_mm <= 0 or size < 16:
        raise ValueError(f"openkbp-inserted: pixel size {pixel_mm} mm and grid {size} px must be > 0 and >= 16")
    folders = sorted(p for p in Path(root).iterdir() if (p / "ct.nii.gz").is_file())
    if not folders:
        raise FileNotFoundError(f"{root}: no OpenKBP patient folders with a ct.nii.gz")
    chosen_patients = [folders[k] for k in spread_pick(np.arange(len(folders)), patients)]
    clean, body, sources = [], [], []
    for folder in chosen_patients:
        ct = io.read(folder / "ct.nii.gz")[0]
        data, spacing = fix_orientation(ct.data.astype(np.float32), ct.spacing, list(orientation_fix))
        grid = np.diag(list(spacing) + [1.0])
        body3d = body_mask(_stack_volume(data, grid, folder.name))
        central = np.arange(int(0.2 * len(data)), int(0.8 * len(data)))
        area = soft_tissue(data[central], body3d[central], spacing[1:]).sum(axis=(1, 2)) * spacing[1] * spacing[2]
        candidates = central[area >= 3000.0]  # mm^2 of soft tissue: room for a 30 mm lesion
        for k in spread_pick(candidates, slices_per_patient):
            zoom = (spacing[1] / pixel_mm, spacing[2] / pixel_mm)
            clean.append(centre_fit(ndimage.zoom(data[k], zoom, order=1), (size, size), -1000.0))
            body.append(centre_fit(ndimage.zoom(body3d[k].astype(np.uint8), zoom, order=0), (size, size), 0) > 0.5)
            sources.append(f"{folder.name}:{int(k)}")
    if not clean:
        raise ValueError(f"{root}: no slice of the chosen patients has 3000 mm^2 of soft tissue for a lesion")
    clean, body = np.stack(clean), np.stack(body)
    tissue = soft_tissue(clean, body, (pixel_mm, pixel_mm))  # on the resampled slices: no blurred rim
    rng = np.random.default_rng(seed)
    image, truth, info = make_lesion_volume(clean, {"soft tissue": tissue}, (pixel_mm, pixel_mm), rng, size_range,
                                            contrast_range)
    for lesion, source in zip(info, sources):
        lesion["source"] = source
    # the slices come from different patients: their spacing along S is a
    # placeholder (the heatmap smooths in-plane only, nothing uses it)
    affine = np.diag([pixel_mm, pixel_mm, pixel_mm, 1.0])
    notes = [f"{len(sources)} axial slices of {len(chosen_patients)} OpenKBP validation patients (never trained "
             f"on): {', '.join(sources)}; orientation fix {' '.join(orientation_fix)}; resampled in-plane to "
             f"{pixel_mm:g} mm on {size} x {size}; each without and with one inserted lesion (10-30 mm, |contrast| "
             "30-90 HU, alternately hypo/hyper) in soft tissue (-100..200 HU, opened 5 mm); ROI = body"]
    return Case(f"OpenKBP validation + inserted lesions (head and neck, {pixel_mm:g} mm)", "inserted lesions",
                np.concatenate([clean, image]), np.concatenate([np.zeros_like(truth), truth]),
                np.concatenate([body, body]), affine, "head-neck", sources * 2, notes,
                extra={"roi": "body", "lesions": info})


# -- metrics ----------------------------------------------------------------------

def score_case(heat: np.ndarray, roi: np.ndarray, truth: np.ndarray, *, percentile: float,
               min_threshold: float, threshold: float | None = None) -> dict:
    """All metrics of one heatmap of a case (S, H, W).

    The automatic threshold is :func:`napari_mediffuse.tasks.anomaly.auto_threshold`
    over the ROI of all evaluated slices, or ``threshold`` where the method
    fixes one (a lesion segmenter's probability 0.5, as the task's). ``image_auroc`` is ``nan`` when
    every slice (or none) has a tumour.
    """
    from napari_mediffuse.tasks.anomaly import auto_threshold

    roi = np.asarray(roi, dtype=bool)
    truth = np.asarray(truth, dtype=bool) & roi
    has = roi.any(axis=(1, 2))
    slice_scores = _slice_max(heat[has], roi[has])
    slice_labels = truth[has].any(axis=(1, 2))
    if threshold is None:
        threshold = auto_threshold(heat, roi, percentile=percentile, minimum=min_threshold)
    mask = (heat > threshold) & roi
    comps = slice_components(truth)
    bd, bt = best_dice(heat[roi], truth[roi])
    normal = roi & ~truth
    normal_slices = roi & ~truth.any(axis=(1, 2), keepdims=True)
    return {
        "image_auroc": auroc(slice_scores, slice_labels),
        "pixel_auroc": auroc(heat[roi], truth[roi]),
        "pro": pro_auc(heat[roi], truth[roi], components=comps[roi]),
        "dice": dice(mask, truth),
        "dice_best": bd,
        "threshold": threshold,
        "threshold_best": bt,
        "normal_flagged_fraction": float(mask[normal].sum() / max(int(normal.sum()), 1)),
        "normal_slices_flagged_fraction": (float(mask[normal_slices].sum() / normal_slices.sum())
                                           if normal_slices.any() else float("nan")),
        "tumour_pixels": int(truth.sum()),
        "roi_pixels": int(roi.sum()),
        "slices": int(has.sum()),
        "tumour_slices": int(slice_labels.sum()),
    }


# -- evaluation -------------------------------------------------------------------

def _region_for(card: dict, region: Optional[str]) -> Optional[str]:
    """``region`` if the prior was trained on it (or records no regions), else ``None``."""
    from napari_mediffuse.tasks.common import trained_regions

    trained = trained_regions(card)
    return region if (not trained or region in trained) else None


def case_prior(case: Case, volume, model, options, *, task: str = "anomaly evaluation"):
    """``(prior, region)``: ``model`` loaded for ``volume``, conditioned on the
    case's region where the prior was trained on it (else its default)."""
    from napari_mediffuse.tasks.inpaint import prepare_prior

    probe = prepare_prior(volume, model, options, task=task)
    region = _region_for(probe.card, case.region)
    return prepare_prior(volume, model, options, task=task, region=region), region


def roi_level_heatmap(image_hu: np.ndarray, roi: np.ndarray, spacing, *, polarity: str, smooth_mm: float,
                      window_hu=None) -> np.ndarray:
    """The diffusion heatmap's pipeline with a flat "reconstruction" at the
    ROI's median HU on each axial slice: what the scan's own intensity inside
    the ROI already tells (strong where the ROI is one organ, little for a
    body ROI), as a second baseline."""
    from napari_mediffuse.tasks.anomaly import level_matched

    level = level_matched(image_hu, np.zeros_like(image_hu, dtype=np.float32), roi, window_hu=window_hu)
    heat, _ = diffusion_heatmap(image_hu, [(level, None)], roi, spacing, score="residual", polarity=polarity,
                                smooth_mm=smooth_mm, window_hu=window_hu)
    return heat


def evaluate_case(case: Case, args) -> tuple[dict, dict]:
    """Metrics per method (diffusion configurations and the baseline) and the
    maps for the picture: ``(results, maps)``."""
    from napari_mediffuse.tasks.anomaly import (SEGMENTATION_THRESHOLD, healthy_reconstruction, level_matched,
                                                probability_heatmap)
    from napari_mediffuse.tasks.common import RunOptions

    options = RunOptions(device=args.device, seed=args.seed, batch_size=args.batch_size,
                         window=getattr(args, "window", None))
    vol = _stack_volume(case.image, case.affine, case.name)
    prior = None
    if args.t:
        prior, region = case_prior(case, vol, args.model, options)
        prior = prior.at_pixel_size(args.pixel_mm)
        case.extra["prior_region"] = region or "prior's default"
    window = tuple(args.window_hu) if args.window_hu else None
    thr = dict(percentile=args.percentile, min_threshold=args.min_threshold)
    recon_roi = grow_in_plane(case.roi, case.spacing[1:], args.recon_margin_mm)
    recs, seconds = {}, {}
    for t in args.t:
        start = time.perf_counter()
        recs[t] = healthy_reconstruction(vol, recon_roi, prior, t=t, ensemble=args.ensemble, steps=args.steps,
                                         eta=args.eta, options=options, patch_mm=args.patch_mm or None,
                                         t_end=args.t_end, return_spread=True)
        seconds[t] = time.perf_counter() - start
        log.info("%s t=%d: %.1f s (%.2f s/slice)", case.name, t, seconds[t], seconds[t] / len(case.image))
    learned = learned_maps(case, vol, args, options) if args.learned_model else None
    results, maps = {}, {}
    variants = [False, True] if args.offset_correct else [False]
    for suffix, smooth_mm in smoothing_variants(args.smooth_mm):
        for label, (ts, score) in diffusion_configs(args.t, args.scores, args.ensemble, args.patch_mm).items():
            for corrected in variants:
                runs = [recs[t] for t in ts]
                if corrected:
                    runs = [(level_matched(case.image, rec, case.roi, window_hu=window), spread)
                            for rec, spread in runs]
                heat, rec = diffusion_heatmap(case.image, runs, case.roi, case.spacing, score=score,
                                              polarity=args.polarity, smooth_mm=smooth_mm, window_hu=window)
                name = (label + ("" if args.polarity == "both" else f" {args.polarity}")
                        + (" offset-corrected" if corrected else "") + suffix)
                results[name] = score_case(heat, case.roi, case.truth, **thr)
                maps[name] = (heat, rec)
        if learned is not None and case.extra["learned_kind"] == "segmenter":
            # the task's heatmap and mask: smoothed probability, cut at 0.5
            heat = probability_heatmap(learned, case.roi, case.spacing, smooth_mm=smooth_mm)
            results["learned segmenter" + suffix] = score_case(heat, case.roi, case.truth, **thr,
                                                               threshold=SEGMENTATION_THRESHOLD)
            maps["learned segmenter" + suffix] = (heat, None)
        elif learned is not None:
            heat, rec = diffusion_heatmap(case.image, [(learned, None)], case.roi, case.spacing, score="residual",
                                          polarity=args.polarity, smooth_mm=smooth_mm, window_hu=window)
            name = "learned" + ("" if args.polarity == "both" else f" {args.polarity}") + suffix
            results[name] = score_case(heat, case.roi, case.truth, **thr)
            maps[name] = (heat, rec)
        heat = baseline_heatmap(case.image, case.roi, case.spacing, sigma_mm=args.baseline_sigma_mm,
                                window_hu=args.window_hu, smooth_mm=smooth_mm)
        results["baseline local z-score" + suffix] = score_case(heat, case.roi, case.truth, **thr)
        maps["baseline local z-score" + suffix] = (heat, None)
        heat = roi_level_heatmap(case.image, case.roi, case.spacing, polarity=args.polarity, smooth_mm=smooth_mm,
                                 window_hu=window)
        results["baseline ROI median level" + suffix] = score_case(heat, case.roi, case.truth, **thr)
    case.extra["seconds_per_slice"] = {str(t): round(s / len(case.image), 2) for t, s in seconds.items()}
    case.extra["model"] = None if prior is None else prior.name
    return results, maps


def learned_maps(case: Case, volume, args, options) -> np.ndarray:
    """The task's ``method='learned'`` on the case's slices (axial; ``--ensemble``
    views): a lesion segmenter's probability, or a lesion-healing model's
    healthy version (HU); ``case.extra['learned_kind']`` says which."""
    from napari_mediffuse.engine.checkpoint import read_card
    from napari_mediffuse.engine.registry import resolve_checkpoint
    from napari_mediffuse.tasks.anomaly import LEARNED_TASKS
    from napari_mediffuse.tasks.common import learned_slices

    folder = resolve_checkpoint(args.learned_model, task=LEARNED_TASKS, modality="CT").path
    region = _region_for(read_card(folder), case.region)
    start = time.perf_counter()
    data = np.asarray(volume.data, dtype=np.float32)
    rec, checkpoint, _ = learned_slices(volume, data, task=LEARNED_TASKS, label="anomaly evaluation",
                                        model=str(folder), options=options,
                                        ensemble=args.learned_ensemble, region=region,
                                        message="anomaly (learned)")
    case.extra["learned_kind"] = "segmenter" if checkpoint.objective == "segmentation" else "healing"
    if case.extra["learned_kind"] == "segmenter" and args.polarity != "both":
        log.warning("%s: --polarity %s does not apply to a lesion segmenter (scored as is)", case.name,
                    args.polarity)
    case.extra["learned_model"] = checkpoint.name
    case.extra["learned_region"] = region or "model's default"
    case.extra["learned_seconds_per_slice"] = round((time.perf_counter() - start) / len(data), 3)
    return rec


def build_cases(args) -> list:
    cases = []
    for name in args.cases:
        if name == "lung1":
            for roi in args.lung1_roi:
                cases.append(lung1_case(args.lung1_ct, args.lung1_tumour, margin_mm=args.lung1_margin_mm,
                                        roi=roi, max_tumour_slices=args.max_tumour_slices,
                                        max_normal_slices=args.max_normal_slices))
        elif name == "lits":
            cases.append(lits_case(args.lits_ct, args.lits_labels, orientation_fix=tuple(args.lits_orientation_fix),
                                   max_tumour_slices=args.max_tumour_slices,
                                   max_normal_slices=args.max_normal_slices, min_liver_px=args.min_liver_px))
        elif name == "lidc-inserted":
            cases.append(lidc_inserted_case(args.lidc_ct, slices=args.lidc_slices, seed=args.seed))
        elif name == "openkbp-inserted":
            cases.append(openkbp_inserted_case(args.openkbp_validation, patients=args.openkbp_patients,
                                               pixel_mm=args.openkbp_pixel_mm, seed=args.seed))
    return cases


def best_diffusion(results: dict) -> str:
    """The model configuration (diffusion or learned) with the highest pixel AUROC."""
    return max((k for k in results if k.startswith(("diffusion", "learned"))),
               key=lambda k: results[k]["pixel_auroc"])


def run(args) -> dict:
    import torch

    torch.set_num_threads(max(1, args.threads))
    report_cases, figure = {}, []
    for case in build_cases(args):
        for note in case.notes:
            log.info("%s: %s", case.name, note)
        results, maps = evaluate_case(case, args)
        report_cases[case.name] = {"kind": case.kind, "slices": case.slices, "notes": case.notes,
                                   "spacing_mm": case.spacing, **case.extra, "results": results}
        figure.append((case, results, maps))
    report = {
        "command": args.command_line,
        "model": None if args.no_diffusion else args.model,
        "learned_model": args.learned_model,
        "settings": {"t": args.t, "t_end": args.t_end, "patch_mm": args.patch_mm, "pixel_mm": args.pixel_mm,
                     "scores": args.scores,
                     "ensemble": args.ensemble, "steps": args.steps, "eta": args.eta, "smooth_mm": args.smooth_mm,
                     "window_hu": args.window_hu, "percentile": args.percentile,
                     "min_threshold": args.min_threshold, "baseline_sigma_mm": args.baseline_sigma_mm,
                     "seed": args.seed, "device": args.device, "threads": args.threads,
                     "offset_correct": args.offset_correct, "polarity": args.polarity,
                     "recon_margin_mm": args.recon_margin_mm, "window": getattr(args, "window", None)},
        "cases": report_cases,
        "targets": TARGETS,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.stem
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    table = markdown_table(report)
    (out / f"{stem}_table.md").write_text(table + "\n")
    print(table)
    save_figure(out / f"{stem}.png", figure)
    return report


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def _fmt(value, percent=False):
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return f"{100 * value:.2f} %" if percent else f"{value:.3f}"


def markdown_table(report: dict) -> str:
    """Case by case, diffusion configurations and the baseline side by side."""
    lines = [f"<!-- {report['command']} -->", "",
             "; ".join(f"{label}: `{report[key]}`" for key, label in
                       (("model", "Model"), ("learned_model", "learned model")) if report.get(key))
             + f"; targets (issue 18): pixel AUROC >= {TARGETS['pixel_auroc']}, "
             f"above the baseline, Dice >= {TARGETS['dice']} (MedDiff-FM on BMAD liver: pixel AUROC 0.976, "
             "Dice 0.274). Dice (task's threshold): the task's automatic threshold (a lesion segmenter's: its "
             "smoothed probability above 0.5).", "",
             "| case | kind | method | pixel AUROC | PRO (FPR<=0.3) | Dice (task's threshold) | Dice (best threshold) "
             "| image AUROC | normal pixels flagged | slices (tumour) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for cname, case in report["cases"].items():
        for method, m in case["results"].items():
            lines.append(f"| {cname} | {case['kind']} | {method} | {_fmt(m['pixel_auroc'])} | {_fmt(m['pro'])} | "
                         f"{_fmt(m['dice'])} | {_fmt(m['dice_best'])} | {_fmt(m['image_auroc'])} | "
                         f"{_fmt(m['normal_flagged_fraction'], True)} | {m['slices']} ({m['tumour_slices']}) |")
    return "\n".join(lines)


# -- picture ------------------------------------------------------------------------

def _crop_box(truth2d: np.ndarray, size: int):
    h, w = truth2d.shape
    size = min(size, h, w)
    if truth2d.any():
        cy, cx = (int(round(c)) for c in ndimage.center_of_mass(truth2d))
    else:
        cy, cx = h // 2, w // 2
    y0 = int(np.clip(cy - size // 2, 0, h - size))
    x0 = int(np.clip(cx - size // 2, 0, w - size))
    return slice(y0, y0 + size), slice(x0, x0 + size)


def save_figure(path, figure, *, rows_per_case: int = 2,
                crop_px: int = 192, tile: int = 224):
    """Per case the slices with the largest tumour area: CT (truth in blue,
    ROI in yellow), healthy reconstruction (the CT again for a lesion
    segmenter, which gives none), model heatmap and mask, baseline heatmap and
    mask (green = hit, red = false positive, blue = missed edge); masks at
    the thresholds the metrics used."""
    from PIL import Image, ImageDraw

    rows, row_titles = [], []
    for case, results, maps in figure:
        label = best_diffusion(results)
        d_map, d_rec = maps[label]
        if d_rec is None:
            d_rec = case.image
        baseline = matching_baseline(label, maps)
        b_map, _ = maps[baseline]
        thr_d, thr_b = results[label]["threshold"], results[baseline]["threshold"]
        area = case.truth.sum(axis=(1, 2))
        for k in np.argsort(area)[::-1][:rows_per_case]:
            box = _crop_box(case.truth[k], crop_px)
            truth, roi = case.truth[k][box], case.roi[k][box]
            ct = _gray(case.image[k][box])
            ct[roi & ~ndimage.binary_erosion(roi)] = (230, 200, 0)
            ct[truth & ~ndimage.binary_erosion(truth)] = (60, 120, 255)
            tiles = [ct, _gray(d_rec[k][box]), _heat(d_map[k][box], 2 * thr_d),
                     _overlay(_gray(case.image[k][box]), d_map[k][box] > thr_d, truth),
                     _heat(b_map[k][box], 2 * thr_b), _overlay(_gray(case.image[k][box]), b_map[k][box] > thr_b, truth)]
            tiles = [np.asarray(Image.fromarray(t).resize((tile, tile), Image.NEAREST)) for t in tiles]
            rows.append(np.concatenate(tiles, axis=1))
            row_titles.append(f"{case.name}, slice {case.slices[k]}: {label} | baseline")
    header, gap = 18, 14
    width = rows[0].shape[1]
    canvas = Image.new("RGB", (width, header + len(rows) * (tile + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(["CT, tumour (blue), ROI (yellow)", "healthy reconstruction (segmenter: CT)",
                              "heatmap: model",
                              "mask (auto)", "heatmap: baseline z-score", "mask (auto)"]):
        draw.text((i * tile + 4, 3), text, fill=(0, 0, 0))
    for r, (row, title) in enumerate(zip(rows, row_titles)):
        y = header + r * (tile + gap)
        draw.text((4, y), title, fill=(0, 0, 0))
        canvas.paste(Image.fromarray(row), (0, y + gap))
    canvas.save(path, optimize=True)


# -- command line ---------------------------------------------------------------------

def add_command(subparsers) -> None:
    from napari_mediffuse.tasks.anomaly import DEFAULT_POLARITY, POLARITIES

    p = subparsers.add_parser("anomaly-real", help="anomaly detection on real tumours (LUNG1, LiTS) and inserted "
                                                   "lesions in a validation patient",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ct-prior-demo", help="checkpoint name or folder")
    p.add_argument("--cases", nargs="+", choices=CASES, default=["lung1", "lits"])
    p.add_argument("--lung1-ct", default=LUNG1_CT)
    p.add_argument("--lung1-tumour", default=LUNG1_TUMOUR)
    p.add_argument("--lung1-margin-mm", type=float, default=15.0,
                   help="axial margin around the tumour the prior was not trained on (its config's exclude_margin_mm)")
    p.add_argument("--lung1-roi", nargs="+", choices=["lungs", "body"], default=["lungs"],
                   help="ROI(s) of the LUNG1 case, each a case of its own")
    p.add_argument("--lits-ct", default=LITS_CT)
    p.add_argument("--lits-labels", default=LITS_LABELS)
    p.add_argument("--lits-orientation-fix", nargs="*", default=["flip_P", "flip_L"],
                   help="training.data orientation fixes for the LiTS crop (none: give no value)")
    p.add_argument("--min-liver-px", type=int, default=100, help="liver pixels a LiTS slice needs to be used")
    p.add_argument("--lidc-ct", default=LIDC_CT)
    p.add_argument("--lidc-slices", type=int, default=6)
    p.add_argument("--openkbp-validation", default=OPENKBP_VALIDATION,
                   help="folder of OpenKBP validation patients (pt_N/ct.nii.gz)")
    p.add_argument("--openkbp-patients", type=int, default=16, help="patients (one axial slice each from the central 60 %% of the box: neck to upper chest), evenly "
                        "spread; 0 = all")
    p.add_argument("--openkbp-pixel-mm", type=float, default=4.0, help="in-plane pixel size the slices are put on")
    p.add_argument("--max-tumour-slices", type=int, default=12)
    p.add_argument("--max-normal-slices", type=int, default=12)
    p.add_argument("--t", type=int, nargs="+", default=None,
                   help="noise step(s); each is evaluated, and their average if several (default: the task's)")
    p.add_argument("--ensemble", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--t-end", type=int, default=None)
    p.add_argument("--patch-mm", type=float, default=None)
    p.add_argument("--pixel-mm", type=float, default=None,
                   help="in-plane pixel size (mm) the prior reconstructs at (default: the prior's own rule)")
    p.add_argument("--scores", nargs="+", choices=["residual", "spread"], default=["residual", "spread"])
    p.add_argument("--offset-correct", action="store_true",
                   help="also score each diffusion configuration with the reconstruction shifted per slice by the "
                        "median signed residual in the ROI (the task's --match-level)")
    p.add_argument("--polarity", default=DEFAULT_POLARITY, choices=list(POLARITIES),
                   help="departures scored by the diffusion method (the task's --polarity; default %(default)s)")
    p.add_argument("--recon-margin-mm", type=float, default=0.0,
                   help="the diffusion reconstructs the ROI grown by this margin (in-plane), scored in the ROI, so "
                        "the seam between reconstruction and pasted-back context lies outside the scored region")
    p.add_argument("--window", type=int, default=None,
                   help="run the prior in sliding windows of this many pixels (its training patch: 64) "
                        "instead of whole slices (the task's --window)")
    add_heatmap_options(p, threads=1)
    p.add_argument("--learned-model", default=None,
                   help="also score a lesion segmenter or lesion-healing model (the task's --method "
                        "learned): checkpoint name or "
                        "folder")
    p.add_argument("--learned-ensemble", type=int, default=2,
                   help="views averaged by the learned model (the task's --ensemble; default %(default)s)")
    p.add_argument("--no-diffusion", action="store_true",
                   help="score only the learned model and the baselines (no partial diffusion)")
    p.add_argument("--stem", default="anomaly_real", help="file stem of the outputs")
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    from .anomaly import fill_task_defaults

    fill_task_defaults(args)
    if args.no_diffusion:
        if not args.learned_model:
            raise SystemExit("--no-diffusion needs --learned-model")
        args.t = []
    run(args)
    return 0


__all__ = ["Case", "case_prior", "roi_level_heatmap", "lits_case", "lung1_case", "lidc_inserted_case", "openkbp_inserted_case", "lung_fields", "score_case", "soft_tissue",
           "run"]
