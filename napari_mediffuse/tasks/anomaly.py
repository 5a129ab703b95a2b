"""Anomaly heatmaps and masks from a healthy-anatomy prior (partial diffusion).

MedDiff-FM section 3.4.2 / AnoDDPM (Wyatt et al., CVPRW 2022): the scan is
noised to step ``t``, only inside a region of interest, and the prior
reconstructs a *healthy* version (outside the region the scan is pasted back
at every step, RePaint-style, so the reconstruction stays anchored to this
patient). Structures the prior has not learned (lesions) are not
reconstructed, so

    heatmap = robust_z( smooth( |clip(x) - clip(x_hat)| ) )   inside the ROI, 0 outside

where ``clip`` is a soft-tissue HU window (bone and air errors saturate),
``|.|`` is one-sided when the user looks for lesions of one polarity
('darker': hypodense, e.g. liver metastases in the portal phase; 'brighter':
hyperdense), ``x_hat`` may first be shifted per slice to this patient's
level inside the ROI (``match_level``: a prior that paints a contrast-
enhanced organ darker than this patient's otherwise flags the whole organ),
``smooth`` a Gaussian of ``smooth_mm`` in the slice plane (normalised inside
the ROI), and ``robust_z`` subtracts the median and divides by the scaled
MAD of the ROI's residual (values: "robust standard deviations above this
scan's typical reconstruction error"). With two or more reconstructions the
residual is first divided by their per-voxel spread (+10 HU; the 'spread'
score), discounting places the prior itself is unsure about. ``x_hat`` is
averaged over ``ensemble`` noise seeds (and over several ``t`` when a list
is given) to cut variance. A threshold (automatic: a percentile of the heatmap over the
ROI of the volume, never below a floor; or user-set) gives the binary mask.

``method='learned'`` uses a model trained on synthetic lesions pasted into
healthy CT (:mod:`training.healing`) instead of the prior: a *lesion
segmenter* (a ``lesion_segmentation`` checkpoint), whose per-pixel lesion
probability, smoothed in the ROI, is the heatmap and whose mask is that
heatmap above 0.5 (DRAEM's discriminative half); or a lesion-healing
model (``lesion_healing``), a conditional model of the healthy axial slice
given the slice, which takes the place of ``x_hat``. One network evaluation
per slice (and per ``ensemble`` view), no partial diffusion, so ``t``,
``steps``, ``patch_mm``, ``pixel_mm`` and the 'spread' score do not apply.

Defaults are those measured best by ``python -m training.evaluate anomaly``
with the demo prior (docs/evaluation/anomaly.md).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
from scipy import ndimage

from ..engine.checkpoint import SEGMENTATION_TASK
from ..engine.schedulers import alphas_cumprod
from ..io.volume import Volume
from .common import (PLANE_AXIS, Normalizer, RunOptions, TaskInputError, learned_slices, mark_out_of_domain,
                     require_volume, result_volume)
from .domain import check_domain
from .inpaint import Prior, masked_reconstruction, prepare_prior
from .masks import resolve_roi

#: Noise step the scan is diffused to (of 1000). MedDiff-FM uses 950 with a
#: large foundation model; with the demo prior 100 scored best of 100-999
#: (docs/evaluation/anomaly.md).
DEFAULT_T = 100
#: DDIM steps from t down to 0 (network evaluations per slice and seed).
DEFAULT_STEPS = 10
#: Noise seeds averaged.
DEFAULT_ENSEMBLE = 2
#: In-plane Gaussian smoothing of the residual (sigma, mm). 3 mm keeps the
#: LUNG1 tumour's mask (Dice 0.42; 0.30 at 6 mm); 6 mm ranks 10-30 mm soft-
#: tissue lesions higher (pixel AUROC 0.755 -> 0.806 on OpenKBP), so it is a
#: user setting (docs/evaluation/anomaly_real.md, session 16).
DEFAULT_SMOOTH_MM = 3.0
#: HU window both images are clipped to before the residual (soft tissue).
DEFAULT_WINDOW_HU = (-160.0, 240.0)
#: Automatic threshold: this percentile of the heatmap over the ROI ...
DEFAULT_PERCENTILE = 99.0
#: ... but never below this many robust standard deviations.
DEFAULT_MIN_THRESHOLD = 4.0
#: Floor of the robust scale (HU), so a near-perfect reconstruction does not
#: turn noise into huge scores.
MIN_SCALE_HU = 2.0
#: Scores: 'residual' = |x - x_hat|; 'spread' = |x - x_hat| / (spread of the
#: ensemble's reconstructions + floor), which discounts places where the
#: prior itself is unsure (organ edges, bowel content) -- needs >= 2 runs.
SCORES = ("residual", "spread")
#: None: 'spread' when there are >= 2 reconstructions, else 'residual'.
DEFAULT_SCORE = None
#: Floor (HU) added to the ensemble spread for the 'spread' score.
SPREAD_FLOOR_HU = 10.0
#: Cell size (mm) of the patched reconstruction; None = whole ROI at once.
DEFAULT_PATCH_MM = None
#: Step the sampler stops at (its clean-image estimate is kept); 0 = the end.
DEFAULT_T_END = 0
#: In-plane pixel size (mm) the prior reconstructs at; None = the prior's own rule.
DEFAULT_PIXEL_MM = None
#: Which departures count: 'both' = |x - x_hat|; 'darker' = where the scan is
#: below the healthy reconstruction (hypodense lesions), 'brighter' = above.
POLARITIES = ("both", "darker", "brighter")
DEFAULT_POLARITY = "both"
#: Where the heatmap comes from: the prior's partial diffusion (a healthy version's residual),
#: or a model learnt on synthetic lesions: a segmenter or a lesion-healing model (module doc).
METHODS = ("diffusion", "learned")
#: Checkpoint tasks of the learned method's models: a lesion segmenter (its
#: probability is the heatmap) or a lesion-healing model (its healthy version's residual).
HEALING_TASK = "lesion_healing"
LEARNED_TASKS = (SEGMENTATION_TASK, HEALING_TASK)
#: A segmenter's mask: pixels whose (smoothed) lesion probability is above this.
SEGMENTATION_THRESHOLD = 0.5


@dataclass
class AnomalyResult:
    """What :func:`detect_anomalies` returns; every volume is on the input's grid.

    Attributes
    ----------
    heatmap : Volume
        float32 anomaly score (robust z, >= 0; a lesion segmenter's: its
        probability, 0-1), 0 outside the ROI.
    mask : Volume
        uint8, 1 where ``heatmap > threshold``.
    reconstruction : Volume or None
        The healthy reconstruction (HU; synthetic), equal to the input
        outside the ROI; None from a lesion segmenter (it gives none).
    roi : Volume
        uint8, the region of interest that was analysed.
    threshold : float
        Heatmap value the mask was cut at.
    """

    heatmap: Volume
    mask: Volume
    reconstruction: Optional[Volume]
    roi: Volume
    threshold: float


# -- maps and thresholds (shared with the evaluation's baseline) ---------------------

def smooth_in_roi(values: np.ndarray, roi: np.ndarray, spacing, *, smooth_mm: float,
                  plane: str = "axial") -> np.ndarray:
    """Gaussian smoothing (sigma ``smooth_mm``) in the slice plane, normalised
    inside ``roi`` (outside voxels do not leak in); 0 outside the ROI."""
    axis = PLANE_AXIS[plane]
    sigma = [smooth_mm / s for i, s in enumerate(spacing) if i != axis]
    out = np.zeros(np.shape(values), dtype=np.float32)
    # slice by slice (the smoothing is in-plane): float32 work space of one slice, not of the volume
    for i in range(out.shape[axis]):
        at = (slice(None),) * axis + (i,)
        inside = roi[at]
        if not inside.any():
            continue
        v = np.where(inside, values[at], 0.0).astype(np.float32)
        if smooth_mm > 0:
            weight = ndimage.gaussian_filter(inside.astype(np.float32), sigma)
            v = np.where(inside, ndimage.gaussian_filter(v, sigma) / np.maximum(weight, 1e-6), 0.0)
        out[at] = v
    return out


def robust_normalise(values: np.ndarray, roi: np.ndarray, *, min_scale: float = MIN_SCALE_HU):
    """``max(values - median, 0) / (1.4826 MAD)`` over the ROI; 0 outside.

    Returns the normalised map and ``(median, scale)`` (units of ``values``).
    """
    inside = values[roi]
    median = float(np.median(inside))
    np.subtract(inside, median, out=inside)
    scale = max(1.4826 * float(np.median(np.abs(inside, out=inside))), float(min_scale))
    del inside
    # in place, float32: one copy of the volume
    z = np.array(values, dtype=np.float32)
    z -= median
    np.maximum(z, 0.0, out=z)
    z /= scale
    z[~roi] = 0.0
    return z, (median, scale)


def check_polarity(polarity: str) -> None:
    """Raise :class:`TaskInputError` unless ``polarity`` is one of :data:`POLARITIES`."""
    if polarity not in POLARITIES:
        raise TaskInputError(f"unknown polarity {polarity!r}; choose one of {', '.join(POLARITIES)}")


def level_matched(image_hu: np.ndarray, reconstruction_hu: np.ndarray, roi: np.ndarray, *,
                  window_hu=DEFAULT_WINDOW_HU, plane: str = "axial") -> np.ndarray:
    """The reconstruction (HU) shifted, slice by slice in ``plane``, by the
    median of the (windowed) signed residual ``image - reconstruction`` over
    the slice's ROI: the prior's level of an organ (contrast phase, scanner
    calibration) is replaced by this patient's, while lesions smaller than
    half the organ's section do not move the median."""
    low, high = window_hu if window_hu is not None else (-np.inf, np.inf)
    axis = PLANE_AXIS[plane]
    out = np.array(reconstruction_hu, dtype=np.float32)
    for i in range(out.shape[axis]):
        at = (slice(None),) * axis + (i,)
        inside = roi[at]
        if inside.any():
            diff = np.clip(image_hu[at][inside], low, high) - np.clip(out[at][inside], low, high)
            out[at][inside] += np.float32(np.median(diff))
    return out


def residual_heatmap(image_hu: np.ndarray, reconstruction_hu: np.ndarray, roi: np.ndarray, spacing, *,
                     smooth_mm: float = DEFAULT_SMOOTH_MM, window_hu=DEFAULT_WINDOW_HU,
                     plane: str = "axial", spread_hu: Optional[np.ndarray] = None,
                     spread_floor_hu: float = SPREAD_FLOOR_HU, polarity: str = DEFAULT_POLARITY,
                     match_level: bool = False):
    """Anomaly heatmap from an image and its healthy reconstruction (see module doc).

    ``polarity`` ('both', 'darker', 'brighter') keeps both signs of the
    residual or only where the image is below / above the reconstruction;
    ``match_level`` first applies :func:`level_matched`. With ``spread_hu``
    (the ensemble's per-voxel standard deviation, HU) the smoothed residual
    is divided by ``smoothed spread + spread_floor_hu`` before the robust
    normalisation ('spread' score).

    Returns ``(heatmap, (median, scale))`` (HU for the residual score, a
    ratio for the spread score).
    """
    check_polarity(polarity)
    if match_level:
        reconstruction_hu = level_matched(image_hu, reconstruction_hu, roi, window_hu=window_hu, plane=plane)
    # signed a - b of the windowed images, in place: one float32 volume of work space
    diff = np.array(image_hu, dtype=np.float32)
    b = np.asarray(reconstruction_hu, dtype=np.float32)
    if window_hu is not None:
        np.clip(diff, *window_hu, out=diff)
        diff -= np.clip(b, *window_hu)
    else:
        diff -= b
    if polarity == "both":
        np.abs(diff, out=diff)
    elif polarity == "darker":
        np.negative(diff, out=diff)
        np.maximum(diff, 0.0, out=diff)
    else:
        np.maximum(diff, 0.0, out=diff)
    residual = smooth_in_roi(diff, roi, spacing, smooth_mm=smooth_mm, plane=plane)
    del diff
    if spread_hu is None:
        return robust_normalise(residual, roi)
    spread = smooth_in_roi(np.asarray(spread_hu, dtype=np.float32), roi, spacing,
                           smooth_mm=max(smooth_mm, 1e-3) * 2.0, plane=plane)
    spread += np.float32(spread_floor_hu)
    ratio = np.divide(residual, spread, out=spread)  # float32, in place
    ratio[~roi] = 0.0
    return robust_normalise(ratio, roi, min_scale=0.02)


def auto_threshold(heatmap: np.ndarray, roi: np.ndarray, *, percentile: float = DEFAULT_PERCENTILE,
                   minimum: float = DEFAULT_MIN_THRESHOLD) -> float:
    """``max(percentile of the heatmap over the ROI, minimum)``."""
    return float(max(np.percentile(heatmap[roi], percentile), minimum))


def t_values(t: Union[int, Sequence[int]], schedule: Optional[dict] = None) -> list[int]:
    """Validate one step or a list of steps (averaged) against the schedule."""
    n = len(alphas_cumprod(schedule))
    values = [int(t)] if np.isscalar(t) else [int(v) for v in t]
    if not values:
        raise TaskInputError("give at least one noise step t")
    for v in values:
        if not 1 <= v < n:
            raise TaskInputError(f"noise step t must be in 1..{n - 1} (of {n}); got {v}")
    return values


# -- the task ---------------------------------------------------------------------

def detect_anomalies(volume: Volume, *, roi=None, t: Union[int, Sequence[int]] = DEFAULT_T,
                     ensemble: int = DEFAULT_ENSEMBLE, steps: int = DEFAULT_STEPS,
                     threshold: Optional[float] = None, percentile: float = DEFAULT_PERCENTILE,
                     min_threshold: float = DEFAULT_MIN_THRESHOLD, smooth_mm: float = DEFAULT_SMOOTH_MM,
                     window_hu: Optional[tuple] = DEFAULT_WINDOW_HU, score: Optional[str] = DEFAULT_SCORE,
                     patch_mm: Optional[float] = DEFAULT_PATCH_MM, t_end: int = DEFAULT_T_END, eta: float = 0.0,
                     plane: str = "axial", region: Optional[str] = None, model=None,
                     pixel_mm: Optional[float] = DEFAULT_PIXEL_MM, polarity: str = DEFAULT_POLARITY,
                     match_level: bool = False, method: str = "diffusion",
                     options: Optional[RunOptions] = None) -> AnomalyResult:
    """Anomaly heatmap and mask of a scan against a healthy-anatomy prior.

    Parameters
    ----------
    volume : Volume
        A 3D CT in HU (display orientation).
    roi : None, ndarray or Volume
        Region analysed: ``None`` finds the body automatically; a boolean or
        label array on the grid (nonzero = inside, e.g. a napari Labels layer's
        data or an organ from a segmentation); a label :class:`Volume` on the
        same grid (shape and affine checked).
    t : int or sequence of int
        Noise step(s) of the partial diffusion (of the schedule's 1000);
        higher wipes out larger / higher-contrast lesions but reconstructs
        the patient's anatomy less faithfully. Several values are averaged.
    ensemble : int
        Noise seeds averaged per step (variance reduction).
    steps : int
        DDIM steps from ``t`` to 0 (network evaluations per slice and seed).
    threshold : float, optional
        Heatmap value for the mask (robust SDs; a lesion segmenter's: its
        probability, in (0, 1)); automatic when ``None`` (a segmenter: 0.5).
    percentile : float
        Automatic threshold: this percentile (0-100) of the heatmap in the ROI...
    min_threshold : float
        ... but at least this value (so a normal scan is not forced to have
        a mask).
    smooth_mm : float
        In-plane Gaussian sigma (mm) of the residual.
    window_hu : (float, float) or None
        HU window both images are clipped to before the residual.
    score : {'residual', 'spread'} or None
        'residual': |x - x_hat|; 'spread': the residual divided by the
        spread of the ensemble's reconstructions (+10 HU), which discounts
        places the prior is unsure about (needs ensemble x len(t) >= 2).
        ``None``: 'spread' when possible, else 'residual'.
    patch_mm : float or None
        ``None`` (or 0): the whole ROI is noised and reconstructed at once
        (MedDiff-FM). A size in mm: the ROI is reconstructed by checkerboard
        cells of that size, 4 passes, the rest of the scan kept as context
        (patched diffusion); costs 4 times more, judges each region against
        the patient's own surroundings.
    t_end : int
        Step the sampler stops at, keeping the prior's clean-image estimate
        there (0 = run to the end).
    eta : float
        Sampler stochasticity (0 = deterministic DDIM).
    plane : {'axial', 'coronal', 'sagittal'}
        Slice orientation of the 2D prior.
    region : str, optional
        Body-region class for the prior ('abdomen'...); default the prior's.
    model : str, path, Prior or None
        Checkpoint name or folder (default: the installed CT prior; for the
        learned method the installed lesion segmenter, else lesion-healing model).
    pixel_mm : float or None
        In-plane pixel size (mm) the prior reconstructs at; the heatmap is
        still on the scan's grid. ``None``: the prior's own (a multi-
        resolution prior: the scan's). A coarser size than a thin-slice
        scan's keeps the prior away from fine texture it reconstructs
        poorly and costs (size ratio)^2 less; it must lie within the pixel
        sizes the prior was trained at.
    polarity : {'both', 'darker', 'brighter'}
        Departures that count: both signs, or only where the scan is darker
        (hypodense lesions, e.g. liver metastases) / brighter than the
        healthy reconstruction.
    match_level : bool
        Shift the reconstruction, slice by slice, to this patient's median
        level inside the ROI before the residual (for an organ ROI whose
        enhancement differs from what the prior learnt).
    method : {'diffusion', 'learned'}
        The healthy version from the prior's partial diffusion, or a model
        trained on synthetic lesions (``model`` then names a
        ``lesion_segmentation`` or ``lesion_healing`` checkpoint; axial only;
        ``ensemble`` averages flipped views): a segmenter's heatmap is its
        lesion probability smoothed by ``smooth_mm``, its mask the heatmap
        above ``threshold`` (``percentile``,
        ``min_threshold``, ``polarity`` and ``match_level`` do not apply).
    options : RunOptions
        Device, seed (first of the ensemble's seeds), batch size, progress,
        cancel.

    Returns
    -------
    AnomalyResult

    Raises
    ------
    TaskInputError
        Not 3D; modality unlike the prior's (an MR for a CT prior); empty
        ROI; ROI on another grid; bad ``t``.
    """
    options = options or RunOptions()
    require_volume(volume, task="anomaly detection")
    if method not in METHODS:
        raise TaskInputError(f"unknown anomaly method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "learned":
        return _detect_learned(volume, roi=roi, ensemble=ensemble, threshold=threshold, percentile=percentile,
                               min_threshold=min_threshold, smooth_mm=smooth_mm, window_hu=window_hu,
                               score=score, patch_mm=patch_mm, plane=plane, region=region, model=model,
                               pixel_mm=pixel_mm, polarity=polarity, match_level=match_level, options=options)
    if plane not in PLANE_AXIS:
        raise TaskInputError(f"unknown plane {plane!r}; choose one of {', '.join(PLANE_AXIS)}")
    if int(ensemble) < 1:
        raise TaskInputError(f"ensemble must be at least 1, got {ensemble}")
    prior = prepare_prior(volume, model, options, task="anomaly detection", region=region).at_pixel_size(pixel_mm)
    steps_t = t_values(t, prior.schedule)
    if score is None:
        score = "spread" if int(ensemble) * len(steps_t) >= 2 else "residual"
    if score not in SCORES:
        raise TaskInputError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
    if score == "spread" and int(ensemble) * len(steps_t) < 2:
        raise TaskInputError("the 'spread' score needs at least 2 reconstructions (ensemble >= 2 or several t)")
    check_polarity(polarity)  # before the reconstruction's minutes, not after
    roi_mask = resolve_roi(volume, roi)
    start = time.perf_counter()
    rec_hu, spread_hu = healthy_reconstruction(volume, roi_mask, prior, t=steps_t, ensemble=ensemble, steps=steps,
                                               eta=eta, plane=plane, patch_mm=patch_mm, t_end=t_end,
                                               options=options, return_spread=True)
    seconds = time.perf_counter() - start
    n_slices = int(np.any(np.moveaxis(roi_mask, PLANE_AXIS[plane], 0), axis=(1, 2)).sum())
    params = dict(method="diffusion", t=steps_t if len(steps_t) > 1 else steps_t[0], ensemble=int(ensemble),
                  steps=int(steps),
                  eta=eta, plane=plane, seed=options.seed, roi="body (automatic)" if roi is None else "given",
                  score=score, polarity=polarity, match_level=bool(match_level),
                  patch_mm=patch_mm or None, t_end=int(t_end), region=region,
                  pixel_mm=None if prior.pixel_spacing_mm is None else list(prior.pixel_spacing_mm),
                  seconds=round(seconds, 2),
                  seconds_per_slice=round(seconds / max(n_slices, 1), 3))
    result = anomaly_result(volume, rec_hu, roi_mask, threshold=threshold, percentile=percentile,
                            min_threshold=min_threshold, smooth_mm=smooth_mm, window_hu=window_hu,
                            spread_hu=spread_hu if score == "spread" else None, polarity=polarity,
                            match_level=match_level, plane=plane, params=params, model_name=prior.name)
    mark_out_of_domain([result.heatmap, result.mask, result.reconstruction, result.roi],
                       check_domain(prior.card, volume, task="anomaly detection", region=region))
    return result


def _detect_learned(volume: Volume, *, roi, ensemble, threshold, percentile, min_threshold, smooth_mm,
                    window_hu, score, patch_mm, plane, region, model, pixel_mm, polarity, match_level,
                    options: RunOptions) -> AnomalyResult:
    """:func:`detect_anomalies` with a lesion segmenter or a lesion-healing model."""
    if plane != "axial":
        raise TaskInputError("the learned anomaly method works on axial slices (the plane it was trained "
                             f"on); got plane {plane!r}")
    for name, value in (("patch_mm", patch_mm), ("pixel_mm", pixel_mm)):
        if value:
            raise TaskInputError(f"{name} applies to the diffusion method, not 'learned'")
    if score not in (None, "residual"):
        raise TaskInputError(f"the learned method scores the residual; the {score!r} score needs the "
                             "diffusion method's ensemble of reconstructions")
    if int(ensemble) < 1:
        raise TaskInputError(f"ensemble must be at least 1, got {ensemble}")
    check_polarity(polarity)
    model, segmenter = learned_model(model)  # resolved once: the checkpoint checked is the one run
    if segmenter and (polarity != "both" or match_level):
        raise TaskInputError("polarity and match_level compare the scan with a healthy version; a lesion "
                             "segmenter gives no healthy version (use polarity 'both', no match_level)")
    if segmenter and threshold is not None and not 0.0 < float(threshold) < 1.0:
        raise TaskInputError(f"a lesion segmenter's threshold is a probability in (0, 1); got {threshold}")
    roi_mask = resolve_roi(volume, roi)
    data = np.asarray(volume.data, dtype=np.float32)
    slices = np.flatnonzero(np.any(roi_mask, axis=(1, 2)))
    start = time.perf_counter()
    results, checkpoint, warnings = learned_slices(volume, data, task=LEARNED_TASKS, label="anomaly detection",
                                                   model=model, options=options, ensemble=int(ensemble),
                                                   region=region, indices=slices, message="anomaly (learned)")
    seconds = time.perf_counter() - start
    params = dict(method="learned", ensemble=int(ensemble), plane="axial", seed=options.seed,
                  roi="body (automatic)" if roi is None else "given",
                  score="lesion probability" if segmenter else "residual", region=region,
                  seconds=round(seconds, 2), seconds_per_slice=round(seconds / max(len(slices), 1), 3))
    if segmenter:
        probability = np.zeros(data.shape, dtype=np.float32)
        probability[slices] = results
        del results
        result = segmentation_result(volume, probability, roi_mask, threshold=threshold, smooth_mm=smooth_mm,
                                     params=params, model_name=checkpoint.name)
    else:
        rec_hu = data.copy()
        rec_hu[slices] = results
        del results
        rec_hu[~roi_mask] = data[~roi_mask]
        params.update(polarity=polarity, match_level=bool(match_level))
        result = anomaly_result(volume, rec_hu, roi_mask, threshold=threshold, percentile=percentile,
                                min_threshold=min_threshold, smooth_mm=smooth_mm, window_hu=window_hu,
                                polarity=polarity, match_level=match_level, plane="axial", params=params,
                                model_name=checkpoint.name)
    mark_out_of_domain([v for v in (result.heatmap, result.mask, result.reconstruction, result.roi)
                        if v is not None], warnings)
    return result


def learned_model(model=None) -> tuple[str, bool]:
    """The learned method's checkpoint folder for ``model`` (name, folder or
    None: the installed segmenter, else healing model) and whether it is a
    lesion segmenter; reads its card only."""
    from ..engine.registry import resolve_checkpoint

    info = resolve_checkpoint(model, task=LEARNED_TASKS, modality="CT")
    return str(info.path), info.task == SEGMENTATION_TASK


def probability_heatmap(probability: np.ndarray, roi: np.ndarray, spacing, *,
                        smooth_mm: float = DEFAULT_SMOOTH_MM, plane: str = "axial") -> np.ndarray:
    """A lesion segmenter's heatmap: its probability (0-1) smoothed in the
    slice plane inside ``roi`` (Gaussian sigma ``smooth_mm``; 0: as is), 0 outside."""
    heat = smooth_in_roi(np.asarray(probability, dtype=np.float32), roi, spacing, smooth_mm=smooth_mm, plane=plane)
    heat[~np.asarray(roi, dtype=bool)] = 0.0
    return heat


def segmentation_result(volume: Volume, probability: np.ndarray, roi: np.ndarray, *,
                        threshold: Optional[float] = None, smooth_mm: float = DEFAULT_SMOOTH_MM,
                        params: Optional[dict] = None, model_name: Optional[str] = None) -> AnomalyResult:
    """Heatmap (lesion probability smoothed by ``smooth_mm``), mask (the
    heatmap above ``threshold``) and ROI volumes from a segmenter's
    probability (no healthy reconstruction).

    The mask cuts the smoothed map the user sees: on the LUNG1 tumour the
    unsmoothed probability above 0.5 scored Dice 0.11 (scattered pixels in
    the lungs: 4.5 % of normal pixels flagged), the 3 mm heatmap 0.31
    (session 21). Smoothing dilutes lesions small against it: at 3 mm a
    certain 6 mm lesion peaks at 0.4 and is not masked, so look for small
    lesions with ``smooth_mm`` 0-1."""
    heat = probability_heatmap(probability, roi, volume.spacing, smooth_mm=smooth_mm)
    thr = SEGMENTATION_THRESHOLD if threshold is None else float(threshold)
    params = dict(params or {}, smooth_mm=smooth_mm, threshold=thr,
                  threshold_rule=f"probability {SEGMENTATION_THRESHOLD:g}" if threshold is None else "user")
    mask = ((heat > thr) & np.asarray(roi, dtype=bool)).astype(np.uint8)
    return _result_volumes(volume, heat, mask, roi, None, params=params,
                           units="lesion probability (0-1)", model_name=model_name)


def cell_phases(shape, spacing, *, plane: str = "axial", cell_mm: float, offset: float = 0.0,
                phases: int = 4) -> np.ndarray:
    """Checkerboard of square cells of ``cell_mm`` in the slice plane.

    Returns an int array (the volume's shape) giving each voxel's phase,
    ``0 .. phases-1``: with 4 phases every cell's 8 neighbours are in other
    phases, with 2 its 4 edge neighbours. ``offset`` (fraction of a cell)
    shifts the grid.
    """
    axis = PLANE_AXIS[plane]
    in_plane = [a for a in range(3) if a != axis]
    idx = []
    for a in in_plane:
        cell = max(1, int(round(cell_mm / spacing[a])))
        pos = (np.arange(shape[a]) + int(round(offset * cell))) // cell
        idx.append(pos)
    r, c = np.meshgrid(idx[0], idx[1], indexing="ij")
    phase2d = (r + c) % 2 if phases == 2 else (r % 2) * 2 + (c % 2)
    return np.broadcast_to(np.expand_dims(phase2d, axis), shape)


def healthy_reconstruction(volume: Volume, roi: np.ndarray, prior: Prior, *, t, ensemble: int = DEFAULT_ENSEMBLE,
                           steps: int = DEFAULT_STEPS, eta: float = 0.0, plane: str = "axial",
                           patch_mm: Optional[float] = None, phases: int = 4, t_end: int = 0,
                           options: Optional[RunOptions] = None, return_spread: bool = False):
    """The prior's healthy version of ``volume`` inside ``roi`` (HU, float32;
    the input outside), averaged over ``ensemble`` seeds and the steps ``t``.

    ``patch_mm=None`` noises and reconstructs the whole ROI at once
    (MedDiff-FM, AnoDDPM). A cell size in mm reconstructs the ROI by
    checkerboard cells instead (patched diffusion, Behrendt et al., pDDPM
    2023): in each of ``phases`` passes one set of cells is noised and
    reconstructed while the rest of the scan is kept as context, so each
    region is judged against the patient's own surroundings; each ensemble
    member shifts the grid by a fraction of a cell.

    ``t_end > 0`` stops the sampler there and keeps the prior's clean-image
    estimate (a posterior mean: smoother, no drawn fine detail).

    With ``return_spread`` also the per-voxel standard deviation over the
    ensemble (HU).
    """
    from dataclasses import replace

    options = options or RunOptions()
    norm = Normalizer(prior.normalization, volume.data)
    t_list = t_values(t, prior.schedule)
    base = 0 if options.seed is None else int(options.seed)
    seeds = [None] * int(ensemble) if options.seed is None else [base + k for k in range(int(ensemble))]
    if not patch_mm:
        rec, spread = masked_reconstruction(volume, roi, prior, t_start=t_list, steps=steps, eta=eta, t_end=t_end,
                                            plane=plane, seeds=seeds, options=options, message="anomaly",
                                            return_spread=True)
    else:
        runs = []
        calls = len(seeds) * phases
        for k, seed in enumerate(seeds):
            phase = cell_phases(roi.shape, volume.spacing, plane=plane, cell_mm=patch_mm,
                                offset=k / len(seeds), phases=phases)
            run = np.zeros(roi.shape, dtype=np.float32)
            for p in range(phases):
                unknown = roi & (phase == p)
                if not unknown.any():
                    continue
                call = k * phases + p
                progress = None if options.progress is None else (
                    lambda d, n, m="", c=call: options.progress(c * n + d, calls * n, m or "anomaly"))
                rec_p = masked_reconstruction(volume, unknown, prior, t_start=t_list, steps=steps, eta=eta,
                                              t_end=t_end, plane=plane, seeds=(seed,), message="anomaly",
                                              options=replace(options, progress=progress))
                run[unknown] = rec_p[unknown]
            runs.append(run)
        stacked = np.stack(runs)
        rec = stacked.mean(0)
        spread = stacked.std(0) if len(runs) > 1 else np.zeros_like(rec)
    rec_hu = norm.inverse(rec)  # float32
    del rec
    rec_hu[~roi] = volume.data[~roi]
    if return_spread:
        spread = np.asarray(spread, dtype=np.float32) * np.float32(norm.units_per_step)
        spread[~roi] = 0.0
        return rec_hu, spread
    return rec_hu


def anomaly_result(volume: Volume, reconstruction_hu: np.ndarray, roi: np.ndarray, *,
                   threshold: Optional[float] = None, percentile: float = DEFAULT_PERCENTILE,
                   min_threshold: float = DEFAULT_MIN_THRESHOLD, smooth_mm: float = DEFAULT_SMOOTH_MM,
                   window_hu: Optional[tuple] = DEFAULT_WINDOW_HU, plane: str = "axial",
                   spread_hu: Optional[np.ndarray] = None, polarity: str = DEFAULT_POLARITY,
                   match_level: bool = False, params: Optional[dict] = None,
                   model_name: Optional[str] = None) -> AnomalyResult:
    """Heatmap, threshold and mask volumes from a reconstruction (see :func:`detect_anomalies`)."""
    heat, (median, scale) = residual_heatmap(volume.data, reconstruction_hu, roi, volume.spacing,
                                             smooth_mm=smooth_mm, window_hu=window_hu, plane=plane,
                                             spread_hu=spread_hu, polarity=polarity, match_level=match_level)
    auto = threshold is None
    thr = auto_threshold(heat, roi, percentile=percentile, minimum=min_threshold) if auto else float(threshold)
    mask = ((heat > thr) & roi).astype(np.uint8)
    params = dict(params or {})
    params.update(smooth_mm=smooth_mm, window_hu=None if window_hu is None else list(window_hu),
                  threshold=thr, threshold_rule=(f"max(p{percentile:g} over ROI, {min_threshold:g})"
                                                 if auto else "user"),
                  residual_median_hu=median, residual_scale_hu=scale)
    units = ("robust SD of the reconstruction error"
             + (f" (1 = {scale:.1f} HU)" if spread_hu is None else " / ensemble spread"))
    return _result_volumes(volume, heat, mask, roi, reconstruction_hu, params=params, units=units,
                           model_name=model_name)


def _result_volumes(volume: Volume, heat: np.ndarray, mask: np.ndarray, roi: np.ndarray,
                    reconstruction_hu: Optional[np.ndarray], *, params: dict, units: str,
                    model_name: Optional[str]) -> AnomalyResult:
    """The result's volumes on the input's grid, their names tagged with the key parameters."""
    # key parameters in the layer names, so runs with other settings are told apart
    tag = ""
    if "t" in params:
        t_text = "+".join(str(v) for v in params["t"]) if isinstance(params["t"], list) else str(params["t"])
        tag = f" (t={t_text}, {params.get('ensemble', 1)} seeds)"
    elif params.get("method") == "learned":
        tag = f" (learned, {params.get('ensemble', 1)} views)"
    heat_vol = result_volume(volume, heat, task="anomaly detection", suffix=f"anomaly heatmap{tag}",
                             params=params, modality="OT", model=model_name)
    heat_vol.metadata["units"] = units
    mask_vol = result_volume(volume, mask, task="anomaly detection", suffix=f"anomaly mask{tag}", params=params,
                             modality="OT", model=model_name)
    rec_vol = None
    if reconstruction_hu is not None:
        rec_data = reconstruction_hu
        if np.issubdtype(volume.data.dtype, np.integer):
            rec_data = np.round(reconstruction_hu).astype(np.int32)
        rec_vol = result_volume(volume, rec_data, task="anomaly detection", suffix=f"healthy reconstruction{tag}",
                                params=params, synthetic=True, model=model_name)
    roi_vol = result_volume(volume, roi.astype(np.uint8), task="anomaly detection",
                            suffix="anomaly ROI", params=params, modality="OT", model=model_name)
    return AnomalyResult(heatmap=heat_vol, mask=mask_vol, reconstruction=rec_vol, roi=roi_vol,
                         threshold=float(params["threshold"]))


# -- napari display (Qt-free layer tuples) -------------------------------------------

def heatmap_layer_data(heatmap: Volume, *, threshold: Optional[float] = None, colormap: str = "inferno",
                       opacity: float = 0.7, **overrides):
    """napari ``(data, kwargs, 'image')`` for a heatmap over the CT.

    Additive blending (black = no change to the CT underneath), ``colormap``
    ('inferno' or 'turbo'), contrast limits from half the threshold (below:
    invisible) to the top of the map, the CT's scale and translate.
    """
    from ..layers import image_layer_data

    data = heatmap.data
    top = float(np.percentile(data[data > 0], 99.9)) if np.any(data > 0) else 1.0
    if threshold is None:
        threshold = heatmap.metadata.get("parameters", {}).get("threshold")
    low = 0.5 * float(threshold) if threshold is not None else 0.0
    high = max(top, (2.0 * float(threshold)) if threshold is not None else 0.0, low + 1e-3)
    kwargs = dict(colormap=colormap, blending="additive", opacity=opacity,
                  contrast_limits=(low, high), interpolation2d="linear")
    kwargs.update(overrides)
    return image_layer_data(heatmap, **kwargs)


def mask_layer_data(mask: Volume, **overrides):
    """napari ``(data, kwargs, 'labels')`` for the anomaly mask (the CT's grid)."""
    from ..layers import labels_layer_data

    kwargs = dict(opacity=0.5)
    kwargs.update(overrides)
    return labels_layer_data(mask, **kwargs)


def anomaly_layers(result: AnomalyResult, *, reconstruction: bool = False, colormap: str = "inferno") -> list:
    """Layer tuples to add over the CT: [reconstruction,] heatmap, mask."""
    from ..layers import image_layer_data

    layers = []
    if reconstruction and result.reconstruction is not None:  # a segmenter gives none
        layers.append(image_layer_data(result.reconstruction, visible=False))
    layers.append(heatmap_layer_data(result.heatmap, threshold=result.threshold, colormap=colormap))
    layers.append(mask_layer_data(result.mask))
    return layers


# -- CLI --------------------------------------------------------------------------

def add_command(subparsers) -> None:
    from .cli import add_common_options, add_region_option

    p = subparsers.add_parser(
        "anomaly", help="anomaly heatmap and mask from the healthy-CT prior (partial diffusion) or a "
                        "learned lesion segmenter",
        description="Noise the CT inside a region of interest to step t, reconstruct a healthy version "
                    "with the prior and map where the scan departs from it (--method learned: a model "
                    "trained on synthetic lesions instead). HEATMAP (float: robust SDs of the "
                    "reconstruction error; a lesion segmenter's probability, 0-1) and MASK (uint8) are "
                    "NIfTI files on INPUT's grid. Research tool, not for diagnosis.")
    p.add_argument("input", help="CT: NIfTI file, DICOM file or series folder")
    p.add_argument("-o", "--output", required=True, help="heatmap NIfTI (.nii.gz)")
    p.add_argument("--mask-out", help="binary anomaly mask NIfTI (.nii.gz)")
    p.add_argument("--reconstruction-out", help="healthy reconstruction NIfTI (.nii.gz, HU, synthetic)")
    p.add_argument("--roi", help="region of interest: NIfTI label image on INPUT's grid, nonzero = inside "
                                 "(default: the body, found automatically)")
    p.add_argument("--roi-labels", type=int, nargs="+",
                   help="use only these label values of --roi (e.g. 5 = liver in TotalSegmentator)")
    p.add_argument("--method", default="diffusion", choices=list(METHODS),
                   help="the prior's partial diffusion, or a model trained on synthetic lesions (--model "
                        "names a lesion_segmentation or lesion_healing checkpoint; default: the installed "
                        "segmenter) (default %(default)s)")
    p.add_argument("--t", type=int, nargs="+", default=[DEFAULT_T],
                   help=f"noise step(s) of 1000; several are averaged (default {DEFAULT_T})")
    p.add_argument("--ensemble", type=int, default=DEFAULT_ENSEMBLE,
                   help=f"noise seeds averaged (default {DEFAULT_ENSEMBLE})")
    p.add_argument("--threshold", type=float,
                   help="heatmap threshold for the mask (default: automatic; a segmenter: probability 0.5)")
    p.add_argument("--percentile", type=float, default=DEFAULT_PERCENTILE,
                   help=f"automatic threshold percentile over the ROI (default {DEFAULT_PERCENTILE:g}; "
                        "not for a segmenter)")
    p.add_argument("--smooth-mm", type=float, default=DEFAULT_SMOOTH_MM,
                   help=f"in-plane smoothing sigma in mm (default {DEFAULT_SMOOTH_MM:g})")
    p.add_argument("--patch-mm", type=float, default=DEFAULT_PATCH_MM,
                   help="reconstruct the ROI by checkerboard cells of this size in mm, the rest kept as "
                        "context (patched diffusion; 0 = whole ROI at once; default %(default)s)")
    p.add_argument("--t-end", type=int, default=DEFAULT_T_END,
                   help="stop the sampler at this step and keep its clean-image estimate (default %(default)s)")
    p.add_argument("--score", default=DEFAULT_SCORE, choices=list(SCORES),
                   help="residual, or residual / ensemble spread (default: spread when ensemble x t >= 2)")
    p.add_argument("--polarity", default=DEFAULT_POLARITY, choices=list(POLARITIES),
                   help="departures that count: both signs, or only where the scan is darker (hypodense "
                        "lesions) / brighter than the healthy reconstruction (default %(default)s)")
    p.add_argument("--match-level", action="store_true",
                   help="shift the reconstruction per slice to the scan's median level inside the ROI "
                        "(an organ ROI enhanced unlike the prior's training scans)")
    p.add_argument("--plane", default="axial", choices=list(PLANE_AXIS))
    p.add_argument("--pixel-mm", type=float, default=DEFAULT_PIXEL_MM,
                   help="in-plane pixel size (mm) the prior reconstructs at, within the sizes it was trained "
                        "at (default: the prior's own; a multi-resolution prior: the scan's)")
    add_region_option(p)
    add_common_options(p, steps=DEFAULT_STEPS)
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    from .. import io
    from .cli import check_output_free, cli_progress, options_from_args, print_warnings, read_single_volume
    from .masks import mask_volume_on_grid

    outputs = [args.output] + [p for p in (args.mask_out, args.reconstruction_out) if p]
    for path in outputs:
        if not io.is_nifti_path(path):
            raise io.WriteError(f"{path}: outputs are NIfTI files (.nii or .nii.gz); nothing was written")
        check_output_free(path, args.overwrite)
    model = args.model
    if args.method == "learned":  # resolved once, before the scan is read; detect_anomalies gets the folder
        model, segmenter = learned_model(args.model)
        if segmenter and args.reconstruction_out:
            raise TaskInputError(f"--reconstruction-out: {model} is a lesion segmenter, which gives no "
                                 "healthy reconstruction; nothing was written")
    volume = read_single_volume(args.input, series=args.series, modality=args.modality)
    roi = None
    if args.roi:
        roi = mask_volume_on_grid(read_single_volume(args.roi), volume, what="ROI", values=args.roi_labels)
    elif args.roi_labels:
        raise TaskInputError("--roi-labels needs --roi (a label image)")
    result = detect_anomalies(volume, roi=roi, t=args.t, ensemble=args.ensemble, steps=args.steps,
                              threshold=args.threshold, percentile=args.percentile,
                              smooth_mm=args.smooth_mm, score=args.score, patch_mm=args.patch_mm,
                              t_end=args.t_end, pixel_mm=args.pixel_mm, polarity=args.polarity,
                              match_level=args.match_level, method=args.method,
                              plane=args.plane, model=model, region=args.region,
                              options=options_from_args(args, cli_progress()))
    io.write_nifti(result.heatmap, args.output, overwrite=args.overwrite, dtype=np.float32)
    if args.mask_out:
        io.write_nifti(result.mask, args.mask_out, overwrite=args.overwrite, dtype=np.uint8)
    if args.reconstruction_out and result.reconstruction is not None:  # refused above for a segmenter
        io.write_nifti(result.reconstruction, args.reconstruction_out, overwrite=args.overwrite)
    params = result.heatmap.metadata["parameters"]
    print(f"wrote {', '.join(outputs)}: threshold {result.threshold:.2f}, "
          f"{int(result.mask.data.sum())} voxels flagged, {params['seconds']} s")
    print_warnings(result.heatmap)
    return 0
