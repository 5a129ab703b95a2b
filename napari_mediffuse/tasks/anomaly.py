"""Anomaly heatmaps and masks from a healthy-anatomy prior (partial diffusion).

MedDiff-FM section 3.4.2 / AnoDDPM (Wyatt et al., CVPRW 2022): the scan is
noised to step ``t``, only inside a region of interest, and the prior
reconstructs a *healthy* version (outside the region the scan is pasted back
at every step, RePaint-style, so the reconstruction stays anchored to this
patient). Structures the prior has not learned (lesions) are not
reconstructed, so

    heatmap = robust_z( smooth( |clip(x) - clip(x_hat)| ) )   inside the ROI, 0 outside

where ``clip`` is a soft-tissue HU window (bone and air errors saturate),
``smooth`` a Gaussian of ``smooth_mm`` in the slice plane (normalised inside
the ROI), and ``robust_z`` subtracts the median and divides by the scaled
MAD of the ROI's residual (values: "robust standard deviations above this
scan's typical reconstruction error"). ``x_hat`` is averaged over
``ensemble`` noise seeds (and over several ``t`` when a list is given) to
cut variance. A threshold (automatic: a percentile of the heatmap over the
ROI of the volume, never below a floor; or user-set) gives the binary mask.

Defaults are those measured best by ``python -m training.evaluate anomaly``
with the demo prior (docs/evaluation/anomaly.md).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
from scipy import ndimage

from ..engine.schedulers import alphas_cumprod
from ..io.volume import Volume
from .common import PLANE_AXIS, Normalizer, RunOptions, TaskInputError, require_volume, result_volume
from .inpaint import Prior, masked_reconstruction, prepare_prior
from .masks import resolve_roi

#: Noise step the scan is diffused to (of 1000). MedDiff-FM uses 950 with a
#: large foundation model; see docs/evaluation/anomaly.md for the demo prior.
DEFAULT_T = 600
#: DDIM steps from t down to 0 (network evaluations per slice and seed).
DEFAULT_STEPS = 10
#: Noise seeds averaged.
DEFAULT_ENSEMBLE = 2
#: In-plane Gaussian smoothing of the residual (sigma, mm).
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


@dataclass
class AnomalyResult:
    """What :func:`detect_anomalies` returns; every volume is on the input's grid.

    Attributes
    ----------
    heatmap : Volume
        float32 anomaly score (robust z, >= 0), 0 outside the ROI.
    mask : Volume
        uint8, 1 where ``heatmap > threshold``.
    reconstruction : Volume
        The prior's healthy reconstruction (HU; synthetic), equal to the
        input outside the ROI.
    roi : Volume
        uint8, the region of interest that was analysed.
    threshold : float
        Heatmap value the mask was cut at.
    """

    heatmap: Volume
    mask: Volume
    reconstruction: Volume
    roi: Volume
    threshold: float


# -- maps and thresholds (shared with the evaluation's baseline) ---------------------

def smooth_in_roi(values: np.ndarray, roi: np.ndarray, spacing, *, smooth_mm: float,
                  plane: str = "axial") -> np.ndarray:
    """Gaussian smoothing (sigma ``smooth_mm``) in the slice plane, normalised
    inside ``roi`` (outside voxels do not leak in); 0 outside the ROI."""
    values = np.where(roi, values, 0.0).astype(np.float32)
    if smooth_mm <= 0:
        return values
    sigma = [smooth_mm / s for s in spacing]
    sigma[PLANE_AXIS[plane]] = 0.0
    weight = ndimage.gaussian_filter(roi.astype(np.float32), sigma)
    smooth = ndimage.gaussian_filter(values, sigma)
    return np.where(roi, smooth / np.maximum(weight, 1e-6), 0.0).astype(np.float32)


def robust_normalise(values: np.ndarray, roi: np.ndarray, *, min_scale: float = MIN_SCALE_HU):
    """``max(values - median, 0) / (1.4826 MAD)`` over the ROI; 0 outside.

    Returns the normalised map and ``(median, scale)`` (units of ``values``).
    """
    inside = values[roi]
    median = float(np.median(inside))
    scale = max(1.4826 * float(np.median(np.abs(inside - median))), float(min_scale))
    z = np.where(roi, np.maximum(values - median, 0.0) / scale, 0.0).astype(np.float32)
    return z, (median, scale)


def residual_heatmap(image_hu: np.ndarray, reconstruction_hu: np.ndarray, roi: np.ndarray, spacing, *,
                     smooth_mm: float = DEFAULT_SMOOTH_MM, window_hu=DEFAULT_WINDOW_HU,
                     plane: str = "axial"):
    """Anomaly heatmap from an image and its healthy reconstruction (see module doc).

    Returns ``(heatmap, (median_hu, scale_hu))``.
    """
    a = np.asarray(image_hu, dtype=np.float32)
    b = np.asarray(reconstruction_hu, dtype=np.float32)
    if window_hu is not None:
        a, b = np.clip(a, *window_hu), np.clip(b, *window_hu)
    residual = smooth_in_roi(np.abs(a - b), roi, spacing, smooth_mm=smooth_mm, plane=plane)
    return robust_normalise(residual, roi)


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
                     window_hu: Optional[tuple] = DEFAULT_WINDOW_HU, eta: float = 0.0,
                     plane: str = "axial", region: Optional[str] = None, model=None,
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
        Heatmap value for the mask (robust SDs); automatic when ``None``.
    percentile : float
        Automatic threshold: this percentile (0-100) of the heatmap in the ROI...
    min_threshold : float
        ... but at least this value (so a normal scan is not forced to have
        a mask).
    smooth_mm : float
        In-plane Gaussian sigma (mm) of the residual.
    window_hu : (float, float) or None
        HU window both images are clipped to before the residual.
    eta : float
        Sampler stochasticity (0 = deterministic DDIM).
    plane : {'axial', 'coronal', 'sagittal'}
        Slice orientation of the 2D prior.
    region : str, optional
        Body-region class for the prior ('abdomen'...); default the prior's.
    model : str, path, Prior or None
        Checkpoint name or folder (default: the installed CT prior).
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
    if plane not in PLANE_AXIS:
        raise TaskInputError(f"unknown plane {plane!r}; choose one of {', '.join(PLANE_AXIS)}")
    if int(ensemble) < 1:
        raise TaskInputError(f"ensemble must be at least 1, got {ensemble}")
    prior = prepare_prior(volume, model, options, task="anomaly detection", region=region)
    steps_t = t_values(t, prior.schedule)
    roi_mask = resolve_roi(volume, roi)
    start = time.perf_counter()
    rec_hu = healthy_reconstruction(volume, roi_mask, prior, t=steps_t, ensemble=ensemble, steps=steps,
                                    eta=eta, plane=plane, options=options)
    seconds = time.perf_counter() - start
    n_slices = int(np.any(np.moveaxis(roi_mask, PLANE_AXIS[plane], 0), axis=(1, 2)).sum())
    params = dict(t=steps_t if len(steps_t) > 1 else steps_t[0], ensemble=int(ensemble), steps=int(steps),
                  eta=eta, plane=plane, seed=options.seed, roi="body (automatic)" if roi is None else "given",
                  seconds=round(seconds, 2), seconds_per_slice=round(seconds / max(n_slices, 1), 3))
    return anomaly_result(volume, rec_hu, roi_mask, threshold=threshold, percentile=percentile,
                          min_threshold=min_threshold, smooth_mm=smooth_mm, window_hu=window_hu,
                          plane=plane, params=params, model_name=prior.name)


def healthy_reconstruction(volume: Volume, roi: np.ndarray, prior: Prior, *, t, ensemble: int = DEFAULT_ENSEMBLE,
                           steps: int = DEFAULT_STEPS, eta: float = 0.0, plane: str = "axial",
                           options: Optional[RunOptions] = None) -> np.ndarray:
    """The prior's healthy version of ``volume`` inside ``roi`` (HU, float32;
    the input outside), averaged over ``ensemble`` seeds and the steps ``t``."""
    options = options or RunOptions()
    norm = Normalizer(prior.normalization, volume.data)
    base = 0 if options.seed is None else int(options.seed)
    seeds = [None] * int(ensemble) if options.seed is None else [base + k for k in range(int(ensemble))]
    rec = masked_reconstruction(volume, roi, prior, t_start=t_values(t, prior.schedule), steps=steps, eta=eta,
                                plane=plane, seeds=seeds, options=options, message="anomaly")
    return np.where(roi, norm.inverse(rec), volume.data).astype(np.float32)


def anomaly_result(volume: Volume, reconstruction_hu: np.ndarray, roi: np.ndarray, *,
                   threshold: Optional[float] = None, percentile: float = DEFAULT_PERCENTILE,
                   min_threshold: float = DEFAULT_MIN_THRESHOLD, smooth_mm: float = DEFAULT_SMOOTH_MM,
                   window_hu: Optional[tuple] = DEFAULT_WINDOW_HU, plane: str = "axial",
                   params: Optional[dict] = None, model_name: Optional[str] = None) -> AnomalyResult:
    """Heatmap, threshold and mask volumes from a reconstruction (see :func:`detect_anomalies`)."""
    heat, (median, scale) = residual_heatmap(volume.data, reconstruction_hu, roi, volume.spacing,
                                             smooth_mm=smooth_mm, window_hu=window_hu, plane=plane)
    auto = threshold is None
    thr = auto_threshold(heat, roi, percentile=percentile, minimum=min_threshold) if auto else float(threshold)
    mask = ((heat > thr) & roi).astype(np.uint8)
    params = dict(params or {})
    params.update(smooth_mm=smooth_mm, window_hu=None if window_hu is None else list(window_hu),
                  threshold=thr, threshold_rule=(f"max(p{percentile:g} over ROI, {min_threshold:g})"
                                                 if auto else "user"),
                  residual_median_hu=median, residual_scale_hu=scale)
    heat_vol = result_volume(volume, heat, task="anomaly detection", suffix="anomaly heatmap",
                             params=params, modality="OT", model=model_name)
    heat_vol.metadata["units"] = f"robust SD of the reconstruction error (1 = {scale:.1f} HU)"
    mask_vol = result_volume(volume, mask, task="anomaly detection", suffix="anomaly mask", params=params,
                             modality="OT", model=model_name)
    rec_data = reconstruction_hu
    if np.issubdtype(volume.data.dtype, np.integer):
        rec_data = np.round(reconstruction_hu).astype(np.int32)
    rec_vol = result_volume(volume, rec_data, task="anomaly detection", suffix="healthy reconstruction",
                            params=params, synthetic=True, model=model_name)
    roi_vol = result_volume(volume, roi.astype(np.uint8), task="anomaly detection",
                            suffix="anomaly ROI", params=params, modality="OT", model=model_name)
    return AnomalyResult(heatmap=heat_vol, mask=mask_vol, reconstruction=rec_vol, roi=roi_vol, threshold=thr)


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
    if reconstruction:
        layers.append(image_layer_data(result.reconstruction, visible=False))
    layers.append(heatmap_layer_data(result.heatmap, threshold=result.threshold, colormap=colormap))
    layers.append(mask_layer_data(result.mask))
    return layers


# -- CLI --------------------------------------------------------------------------

def add_command(subparsers) -> None:
    from .cli import add_common_options

    p = subparsers.add_parser(
        "anomaly", help="anomaly heatmap and mask from the healthy-CT prior (partial diffusion)",
        description="Noise the CT inside a region of interest to step t, reconstruct a healthy version "
                    "with the prior and map where the scan departs from it. HEATMAP (float, robust SDs of "
                    "the reconstruction error) and MASK (uint8) are NIfTI files on INPUT's grid. Research "
                    "tool, not for diagnosis.")
    p.add_argument("input", help="CT: NIfTI file, DICOM file or series folder")
    p.add_argument("-o", "--output", required=True, help="heatmap NIfTI (.nii.gz)")
    p.add_argument("--mask-out", help="binary anomaly mask NIfTI (.nii.gz)")
    p.add_argument("--reconstruction-out", help="healthy reconstruction NIfTI (.nii.gz, HU, synthetic)")
    p.add_argument("--roi", help="region of interest: NIfTI label image on INPUT's grid, nonzero = inside "
                                 "(default: the body, found automatically)")
    p.add_argument("--roi-labels", type=int, nargs="+",
                   help="use only these label values of --roi (e.g. 5 = liver in TotalSegmentator)")
    p.add_argument("--t", type=int, nargs="+", default=[DEFAULT_T],
                   help=f"noise step(s) of 1000; several are averaged (default {DEFAULT_T})")
    p.add_argument("--ensemble", type=int, default=DEFAULT_ENSEMBLE,
                   help=f"noise seeds averaged (default {DEFAULT_ENSEMBLE})")
    p.add_argument("--threshold", type=float, help="heatmap threshold for the mask (default: automatic)")
    p.add_argument("--percentile", type=float, default=DEFAULT_PERCENTILE,
                   help=f"automatic threshold percentile over the ROI (default {DEFAULT_PERCENTILE:g})")
    p.add_argument("--smooth-mm", type=float, default=DEFAULT_SMOOTH_MM,
                   help=f"in-plane smoothing sigma in mm (default {DEFAULT_SMOOTH_MM:g})")
    p.add_argument("--plane", default="axial", choices=list(PLANE_AXIS))
    add_common_options(p, steps=DEFAULT_STEPS)
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    from .. import io
    from .cli import check_output_free, cli_progress, options_from_args, read_single_volume
    from .masks import mask_volume_on_grid

    outputs = [args.output] + [p for p in (args.mask_out, args.reconstruction_out) if p]
    for path in outputs:
        if not io.is_nifti_path(path):
            raise io.WriteError(f"{path}: outputs are NIfTI files (.nii or .nii.gz); nothing was written")
        check_output_free(path, args.overwrite)
    volume = read_single_volume(args.input)
    roi = None
    if args.roi:
        roi = mask_volume_on_grid(read_single_volume(args.roi), volume, what="ROI", values=args.roi_labels)
    elif args.roi_labels:
        raise TaskInputError("--roi-labels needs --roi (a label image)")
    result = detect_anomalies(volume, roi=roi, t=args.t, ensemble=args.ensemble, steps=args.steps,
                              threshold=args.threshold, percentile=args.percentile,
                              smooth_mm=args.smooth_mm, plane=args.plane, model=args.model,
                              options=options_from_args(args, cli_progress()))
    io.write_nifti(result.heatmap, args.output, overwrite=args.overwrite, dtype=np.float32)
    if args.mask_out:
        io.write_nifti(result.mask, args.mask_out, overwrite=args.overwrite, dtype=np.uint8)
    if args.reconstruction_out:
        io.write_nifti(result.reconstruction, args.reconstruction_out, overwrite=args.overwrite)
    params = result.heatmap.metadata["parameters"]
    print(f"wrote {', '.join(outputs)}: threshold {result.threshold:.2f}, "
          f"{int(result.mask.data.sum())} voxels flagged, {params['seconds']} s")
    return 0
