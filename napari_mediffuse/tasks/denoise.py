"""Low-dose CT denoising: DiffPIR with the CT prior, and classical baselines.

``denoise(volume, method='diffusion')`` runs plug-and-play DiffPIR
(MedDiff-FM section 3.4.1) slice by slice on axial slices:

1. the noise std of each slice is estimated from the image itself
   (:func:`estimate_noise_hu`: MAD of the finest diagonal wavelet detail in
   soft tissue), or given by the user (``noise_hu``);
2. the reverse process starts at the step whose noise level matches
   ``strength x`` that std (``timestep_for_noise_level``), from the noisy
   slice itself (scaled by ``sqrt(abar_t)``): the image noise plays the part
   of the diffusion noise (``strength`` scales the noise assumed in it;
   nothing is added);
3. at every step the prior's x0 estimate is pulled towards the measurement,
   ``x0_hat = (y + rho_t x0) / (1 + rho_t)``,
   ``rho_t = lambda sigma_n^2 / sigma_t^2``, then a DDIM step follows.

The prior sees the slice on its native pixel grid (noise is a per-pixel
property; resampling would correlate it and lose resolution); a warning is
recorded when the pixel size is far from the prior's. HU outside the prior's
window (air below it, dense bone and metal above it) are kept from the
input, so nothing is silently clipped. Defaults (2 steps, lambda 10) were
tuned on simulated quarter dose; see docs/evaluation/restoration.md.

Baselines, same interface: ``'bm3d'`` (the bm3d package, default profile,
white-noise std = the estimated noise) and ``'nlm'`` (scikit-image non-local
means, ``h = 0.8 sigma``, fast mode).
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np
import torch
from scipy import ndimage

from ..engine.runner import SliceRunner
from ..engine.schedulers import timestep_for_noise_level
from ..io.volume import Volume
from .baselines import bm3d_slices, nlm_slices
from .common import (
    LEARNED_STEPS,
    Normalizer,
    RunOptions,
    TaskInputError,
    bind_region,
    check_ensemble,
    learned_slices,
    load_prior,
    map_slices,
    region_index,
    require_volume,
    result_volume,
    mark_out_of_domain,
    slice_offset,
)
from .domain import check_domain
from .diffpir import denoise_data_step, rho_t, run_diffpir

log = logging.getLogger(__name__)

METHODS = ("diffusion", "learned", "bm3d", "nlm")
#: Methods that run a network (the others filter).
MODEL_METHODS = ("diffusion", "learned")
#: Checkpoint task of learned denoisers.
DENOISE_TASK = "denoising"
#: Default network evaluations per slice of the diffusion denoiser.
DEFAULT_STEPS = 2
#: DiffPIR lambda of the denoiser (tuned on simulated quarter dose, see
#: docs/evaluation/restoration.md).
DENOISE_LAMBDA = 10.0
#: HU range treated as soft tissue when estimating noise.
SOFT_TISSUE_HU = (-150.0, 250.0)
#: Smallest slice side (pixels) the diffusion denoiser accepts.
MIN_SLICE_PIXELS = 32
#: Smallest soft-tissue pixel count for a per-slice noise estimate.
MIN_NOISE_PIXELS = 200


# -- noise estimation ---------------------------------------------------------

def _diagonal_detail(slice_hu: np.ndarray) -> np.ndarray:
    """Finest diagonal (HH) Haar detail, scaled so white noise keeps its std."""
    s = np.asarray(slice_hu, dtype=np.float64)
    return (s[:-1, :-1] - s[1:, :-1] - s[:-1, 1:] + s[1:, 1:]) / 2.0


def _soft_tissue_mask(slice_hu: np.ndarray, soft_tissue) -> np.ndarray:
    smooth = ndimage.uniform_filter(np.asarray(slice_hu, dtype=np.float32), 5, mode="nearest")
    mask = (smooth > soft_tissue[0]) & (smooth < soft_tissue[1])
    mask = ndimage.binary_erosion(mask, iterations=2)
    return mask[:-1, :-1] & mask[1:, 1:] & mask[1:, :-1] & mask[:-1, 1:]


def soft_tissue_detail(image: np.ndarray, slice_hu: np.ndarray, *, soft_tissue=SOFT_TISSUE_HU) -> np.ndarray:
    """The finest diagonal (Haar HH) detail of ``image`` over the soft tissue
    of ``slice_hu`` (the pixels :func:`estimate_noise_hu` reads; ``image`` may
    be the slice itself or a noise image simulated for it)."""
    return _diagonal_detail(image)[_soft_tissue_mask(slice_hu, soft_tissue)]


def robust_std(detail: np.ndarray) -> float:
    """Donoho's noise std of Haar detail values: median absolute value / 0.6745."""
    return float(np.median(np.abs(detail)) / 0.6745)


def estimate_noise_hu(data: np.ndarray, *, soft_tissue=SOFT_TISSUE_HU) -> np.ndarray:
    """Noise std (HU) of each axial slice, estimated from the image itself.

    The median absolute deviation of the finest diagonal wavelet (Haar HH)
    detail, over soft-tissue pixels (smoothed HU inside ``soft_tissue``, away
    from edges), divided by 0.6745: Donoho's robust estimator, as in
    ``skimage.restoration.estimate_sigma``, restricted to soft tissue where
    CT noise matters and anatomy is smooth. Exact for white Gaussian noise;
    spatially correlated CT noise (FBP) reads lower than its pixel std, which
    the denoiser's ``strength`` compensates.

    Parameters
    ----------
    data : ndarray (H, W) or (N, H, W)
        Slices in HU.
    soft_tissue : (float, float)
        HU range of the pixels used.

    Returns
    -------
    ndarray (N,)
        One std per slice, HU. Slices with too little soft tissue get the
        median of the others (or of the whole stack's pixels).
    """
    stack = np.asarray(data).reshape(-1, *np.asarray(data).shape[-2:])
    if min(stack.shape[1:]) < 4:
        raise TaskInputError(f"slices of {stack.shape[1:]} pixels are too small to estimate noise")
    sigmas = np.full(len(stack), np.nan)
    pooled = []
    for i, s in enumerate(stack):
        values = soft_tissue_detail(s, s, soft_tissue=soft_tissue)
        if values.size >= MIN_NOISE_PIXELS:
            sigmas[i] = robust_std(values)
        pooled.append(values)
    if np.all(np.isnan(sigmas)):
        values = np.concatenate(pooled)
        if values.size < 20:  # no soft tissue at all: every non-air pixel
            values = np.concatenate([_diagonal_detail(s)[(s[:-1, :-1] > -900)] for s in stack])
        fallback = robust_std(values) if values.size else 0.0
    else:
        fallback = np.nanmedian(sigmas)
    sigmas[np.isnan(sigmas)] = fallback
    return sigmas.astype(np.float64)


# -- checks -------------------------------------------------------------------

def check_ct_volume(volume: Volume, *, task: str, min_size: int) -> None:
    """A 3D CT (not a single slice) with slices of at least ``min_size`` pixels."""
    require_volume(volume, task=task, modality="CT", min_size=1)
    label = f"{volume.name!r}" + (f" ({volume.source})" if volume.source else "")
    if min(volume.data.shape) < 2:
        raise TaskInputError(f"{task} needs a 3D CT volume; {label} is a 2D image "
                             f"(shape {volume.data.shape})")
    if min(volume.data.shape[1:]) < min_size:
        raise TaskInputError(f"{task}: {label} is too small for the model ({volume.data.shape}); "
                             f"slices must be at least {min_size} x {min_size} pixels")


# -- the task -------------------------------------------------------------------

def denoise(volume: Volume, *, method: str = "diffusion", model: Optional[str] = None,
            steps: Optional[int] = None, strength: float = 1.0, noise_hu: Optional[float] = None,
            lam: float = DENOISE_LAMBDA, eta: float = 0.0, region: Optional[str] = None,
            ensemble: int = 1, options: Optional[RunOptions] = None) -> Volume:
    """Denoise a (low-dose) CT volume, axial slice by axial slice.

    Parameters
    ----------
    volume : Volume
        3D CT in HU, display orientation (S, P, L).
    method : {'diffusion', 'learned', 'bm3d', 'nlm'}
        DiffPIR with the CT prior, a learned denoiser (a ``denoising``
        checkpoint: a conditional model of clean given low-dose slices), or a
        classical baseline.
    model : str, optional
        Checkpoint name or folder: a CT prior (diffusion; default: the first
        installed ``ct_prior``) or a ``denoising`` model (learned).
    steps : int
        Network evaluations per slice (diffusion: at most the start step + 1;
        learned: 1, the default here for it, is the model's posterior mean,
        more draw a DDIM sample).
    strength : float
        Multiplies the noise level the method assumes (1 = the estimated
        noise; larger removes more, smaller keeps more texture; 0 returns the
        input). For diffusion it sets the start step; for BM3D / NLM the
        filtering strength; for learned (at most 1) the share of the
        model's correction applied (1 = its estimate).
    noise_hu : float, optional
        Noise std in HU; estimated per slice from the image when omitted
        (:func:`estimate_noise_hu`).
    lam : float
        DiffPIR's lambda in ``rho_t = lambda sigma_n^2 / sigma_t^2``
        (larger: more prior, smoother).
    eta : float
        0: deterministic DDIM steps; up to 1: fresh noise at every step.
    region : str, optional
        Body region for region-conditioned priors ('abdomen', ...).
    ensemble : int
        Learned only: the mean of this many estimates of each slice, each
        from its own noise draw and presented in turn as is, mirrored
        left-right, upside down and both (the denoisers are trained with
        those flips), each mirrored back. Each costs one more network
        evaluation; 8 gained 0.2 dB on the OpenKBP validation boxes
        (docs/evaluation/clinical.md).
    options : RunOptions
        Device, seed, batch size, progress, cancel.

    Returns
    -------
    Volume
        Denoised HU on the input's grid (same affine), named
        ``"<input> denoised (<method>...)"``.

    Raises
    ------
    TaskInputError
        Not a CT, a 2D image, or slices too small for the model.
    """
    options = options or RunOptions()
    if method not in METHODS:
        raise TaskInputError(f"unknown denoising method {method!r}; choose one of {', '.join(METHODS)}")
    if strength < 0:
        raise TaskInputError(f"strength must be >= 0, got {strength}")
    ensemble = check_ensemble(ensemble, method, "learned denoiser")
    if noise_hu is not None and not noise_hu > 0:
        raise TaskInputError(f"noise_hu must be > 0 HU, got {noise_hu}")
    check_ct_volume(volume, task="denoise", min_size=MIN_SLICE_PIXELS if method in MODEL_METHODS else 8)
    data = np.asarray(volume.data, dtype=np.float32)
    started = time.perf_counter()
    if noise_hu is None:
        sigmas = estimate_noise_hu(data)
    else:
        sigmas = np.full(data.shape[0], float(noise_hu))
    params = {"method": method, "strength": float(strength), "region": region,
              "noise_hu": float(np.median(sigmas)), "noise_estimated": noise_hu is None}
    warnings: list[str] = []
    model_name = None
    if strength == 0:
        out = data.copy()
        suffix = f"denoised ({method}, strength 0)"
    elif method == "diffusion":
        out, info, model_name = _denoise_diffusion(data, volume, sigmas, model=model,
                                                   steps=DEFAULT_STEPS if steps is None else steps,
                                                   strength=strength, lam=lam, eta=eta,
                                                   region=region, options=options)
        params.update(info)
        warnings += info.pop("warnings", [])
        suffix = f"denoised (diffusion, {info['steps']} steps)"
    elif method == "learned":
        out, info, model_name = _denoise_learned(data, volume, model=model, steps=steps, strength=strength,
                                                 region=region, ensemble=ensemble, options=options)
        warnings += info.pop("warnings", [])
        params.update(info)
        suffix = "denoised (learned)"
    else:
        fn = bm3d_slices if method == "bm3d" else nlm_slices
        out = map_slices(data, lambda batch, index: fn(batch, sigmas[index] * strength),
                         plane="axial", batch_size=options.batch_size, progress=options.progress,
                         cancel=options.cancel, message=f"{method} denoising")
        suffix = f"denoised ({method})"
    params["seconds"] = round(time.perf_counter() - started, 3)
    result = result_volume(volume, out.astype(np.float32), task="denoise", suffix=suffix,
                           params=params, model=model_name)
    mark_out_of_domain([result], warnings)
    return result


def diffpir_denoise(predictor, y: torch.Tensor, sigma_n, schedule: dict, *, steps: int = DEFAULT_STEPS,
                    strength: float = 1.0, lam: float = DENOISE_LAMBDA, eta: float = 0.0,
                    generator=None, progress=None, cancel=None) -> torch.Tensor:
    """DiffPIR denoising of a batch of normalised slices that share one start step.

    Parameters
    ----------
    predictor : callable
        ``eps = predictor(x_t, t)``.
    y : Tensor (B, 1, H, W)
        Noisy slices, normalised intensities, on the predictor's device.
    sigma_n : float or array (B,)
        Noise std of each slice, normalised units.
    schedule : dict
        The prior's noise schedule.
    steps, strength, lam, eta :
        See :func:`denoise`. The start step matches the largest
        ``strength * sigma_n`` of the batch (:func:`start_step`; the
        volume task groups slices by their own start step).
    generator : torch.Generator or SliceNoise
        Noise source (per slice: :class:`~napari_mediffuse.engine.runner.SliceNoise`).

    Returns
    -------
    Tensor (B, 1, H, W)
        Denoised slices (normalised); ``y`` itself when the start step is 0.
    """
    sigma = np.array(np.broadcast_to(np.asarray(sigma_n, dtype=np.float64), (y.shape[0],)))
    t_start = start_step(float(np.max(sigma)), strength, schedule)
    if t_start == 0 or strength <= 0:
        return y
    # strength scales the noise the method assumes y carries (no noise is added)
    s_n = torch.as_tensor(sigma * strength, dtype=y.dtype).view(-1, 1, 1, 1).to(y.device)

    def step(x0, t, abar_t):
        return denoise_data_step(x0, y, rho_t(abar_t, 1.0, lam) * s_n ** 2)

    return run_diffpir(predictor, y, schedule, step, t_start=t_start, steps=steps, noise_in_y=s_n,
                       eta=eta, generator=generator, progress=progress, cancel=cancel)


def _denoise_learned(data, volume, *, model, steps, strength, region, ensemble, options):
    """The learned denoiser's estimate of each axial slice (its posterior mean for one step)."""
    steps = LEARNED_STEPS if steps is None else max(1, int(steps))
    estimate, checkpoint, warnings = learned_slices(volume, data, task=DENOISE_TASK, label="denoise", model=model,
                                                    options=options, steps=steps, ensemble=ensemble,
                                                    region=region, message="learned denoising")
    share = min(float(strength), 1.0)
    out = data + share * (estimate - data) if share < 1.0 else estimate
    return out, {"steps": steps, "ensemble": ensemble, "warnings": warnings}, checkpoint.name


def start_step(sigma_n: float, strength: float, schedule: dict) -> int:
    """The step whose noise level is ``strength * sigma_n`` (normalised units)."""
    return timestep_for_noise_level(max(float(strength) * float(sigma_n), 1e-6), schedule)


def _denoise_diffusion(data, volume, sigmas, *, model, steps, strength, lam, eta, region, options):
    checkpoint, predictor = load_prior(model, options)
    card = checkpoint.card
    norm = Normalizer(checkpoint.normalization, data)
    low, high = norm.range
    schedule = checkpoint.schedule
    predict = bind_region(predictor, region_index(region, card))
    runner = SliceRunner.for_predictor(predictor, options, index_offset=slice_offset(volume))
    sigma_n = sigmas / norm.units_per_step  # normalised noise std per slice
    # each slice starts at the step of its own noise level, whatever batch it is in
    t_all = np.array([start_step(s, strength, schedule) for s in sigma_n])
    steps = max(1, int(steps))
    per_slice_steps = np.minimum(steps, t_all + 1)
    warnings = check_domain(card, volume, task="denoise", region=region)

    def restore(index, noise, progress):
        y_hu = data[index]
        y = runner.tensor(norm.forward(y_hu))
        x0 = y.clone()
        # slices with the same start step run together (one timestep sequence)
        for t in np.unique(t_all[index]):
            group = np.flatnonzero(t_all[index] == t)
            x0[group] = diffpir_denoise(predict, y[group], sigma_n[index][group], schedule,
                                        steps=int(per_slice_steps[index][group[0]]), strength=strength,
                                        lam=lam, eta=eta, generator=noise.subset(group),
                                        cancel=options.cancel)
        restored = norm.inverse(runner.numpy(x0))
        # HU the prior's window clipped away (air, dense bone, metal): from the input
        return restored + (y_hu - np.clip(y_hu, low, high))

    out = runner.run(range(data.shape[0]), restore, message="diffusion denoising")
    info = {"steps": int(per_slice_steps.max()), "t_start": int(np.median(t_all)), "lambda": float(lam),
            "eta": float(eta), "warnings": warnings}
    return out.astype(np.float32, copy=False), info, checkpoint.name


# -- CLI ------------------------------------------------------------------------------

def add_command(subparsers) -> None:
    """``mediffuse denoise INPUT -o OUTPUT [--method ...]``."""
    from .cli import add_common_options, add_ensemble_option, add_region_option

    p = subparsers.add_parser(
        "denoise", help="denoise a (low-dose) CT: DiffPIR with the CT prior, a learned denoiser, BM3D or NLM",
        description="Denoise a CT volume slice by slice. The noise level is estimated from the "
                    "image unless --noise-hu is given. Output: NIfTI in HU on the input's grid.")
    p.add_argument("input", help="NIfTI file, DICOM file or DICOM folder")
    p.add_argument("-o", "--output", required=True, help="output NIfTI file (.nii or .nii.gz)")
    p.add_argument("--method", choices=METHODS, default="diffusion",
                   help="diffusion (DiffPIR with the CT prior), learned (a denoising model, --model), "
                        "bm3d or nlm (default diffusion)")
    add_common_options(p)
    p.add_argument("--steps", type=int,
                   help=f"network evaluations per slice (default: diffusion {DEFAULT_STEPS}, learned 1 = "
                        "the model's posterior mean)")
    p.add_argument("--strength", type=float, default=1.0,
                   help="multiplies the assumed noise level (default 1; larger = smoother)")
    p.add_argument("--noise-hu", type=float, help="noise std in HU (default: estimated from the image)")
    p.add_argument("--lambda", dest="lam", type=float, default=DENOISE_LAMBDA,
                   help=f"DiffPIR lambda (default {DENOISE_LAMBDA:g})")
    add_region_option(p)
    add_ensemble_option(p, per="slice")
    p.set_defaults(func=_cmd_denoise)


def _cmd_denoise(args) -> int:
    from .cli import finish_volume_command, prepare_volume_command

    volume, options = prepare_volume_command(args)
    result = denoise(volume, method=args.method, model=args.model, steps=args.steps,
                     strength=args.strength, noise_hu=args.noise_hu, lam=args.lam,
                     region=args.region, ensemble=args.ensemble, options=options)
    p = result.metadata["parameters"]
    return finish_volume_command(args, result, f"{result.name}; noise {p['noise_hu']:.1f} HU"
                                 f"{' estimated' if p['noise_estimated'] else ''}, {p['seconds']:.1f} s")
