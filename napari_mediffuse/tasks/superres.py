"""Thick -> thin slice super-resolution: DiffPIR with the CT prior, and interpolation.

The slice axis is array axis 0 (S) of the display orientation. The thick
slices are modelled as **slab averages** of the unknown thin volume (a box
slice profile of the slice thickness), ``y = H x``
(:class:`~.diffpir.SlabOperator`).

Geometry convention (the *slab model*): thick slice ``j`` is centred at
``z_j`` (its affine position) and has thickness ``T`` (DICOM
SliceThickness, else the slice spacing ``D``). Super-resolving by ``k``
gives ``k`` thin slices per thick slice, spacing ``d = D / k``, centred
symmetrically about ``z_j``: ``z_j + (m - (k - 1) / 2) d`` for
``m = 0 .. k-1``. So the output has ``k n`` slices, its affine has column 0
divided by ``k`` and its first slice centre at ``z_0 - (k - 1) d / 2``, and
the average of the ``k`` thin slices of a slab lies exactly at the thick
slice's centre. :func:`training.degrade.simulate_thick_slices` uses the same
convention, so thick slices made from a thin volume super-resolve back onto
its grid.

``method='diffusion'`` (MedDiff-FM section 3.5.1): a 2D prior cannot see the
slice axis in axial slices, so DiffPIR runs on **coronal and sagittal**
planes, where the slice axis lies in-plane (the demo prior is trained on all
three orientations), and the two results are averaged. Each plane starts
from the cubic interpolation, noised to a start step, and every x0 estimate
gets the exact data step
``x0_hat = x0 + H^T (H H^T + rho_t I)^-1 (y - H x0)`` (MedDiff-FM's
``x0 + H^T (y - H x0) / (1 + rho_t)`` when ``H H^T = I``). The sampler
stops at the step of ``end_hu`` (100 HU) and returns the prior's
posterior-mean estimate there rather than sampling invented texture down
to step 0. The prior works
at its own pixel spacing (``pixel_spacing_mm`` of its card): planes whose
pixels differ by more than 5 % are resampled to it (cubic) and back, the
detail that round trip removes from the cubic interpolation is added back
(the prior cannot supply detail finer than its pixels), and a final data
step on the output grid makes the result consistent with the thick slices.

``method='learned'``: a conditional model trained for the job
(``task: super_resolution`` checkpoints, :mod:`training.thick_thin`; MedDiff-FM
fine-tunes its prior with a ControlNet on the thick slab; ours is the
prior's network with the condition as extra inputs, trained from random
weights to generate a correction of it). It sees each coronal
or sagittal plane's cubic interpolation and returns its estimate of the thin
plane: with ``steps=1`` the posterior mean (one network evaluation from
pure noise, the best estimate in PSNR), with more steps a deterministic DDIM
sample (sharper, drawn texture). A final data step makes it consistent with
the thick slices, and the two plane directions are averaged as above.

``method='auto'`` (the default): ``'learned'`` where a super_resolution model
is installed and the scan is inside what it saw (pixel size, thick-slice
spacing, region), else ``'diffusion'``; on the held-out chest CT the learned
model gains 2 dB over cubic at 5 mm -> 1 mm, DiffPIR about what cubic does
(docs/evaluation/clinical.md).

Baselines: ``'cubic'`` (cubic spline through the thick-slice centres) and
``'sinc'`` (Lanczos-3 windowed sinc), interpolating along the slice axis.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np
from scipy import ndimage

from ..engine.runner import SliceRunner, device_of
from ..engine.schedulers import timestep_for_noise_level
from ..io.volume import Volume
from .baselines import cubic_along, cubic_matrix, sinc_along, thin_positions  # noqa: F401
from .common import (
    AUTO_METHOD,
    FLIP_VIEWS,
    LEARNED_STEPS,
    Normalizer,
    RunOptions,
    TaskInputError,
    bind_region,
    check_ensemble,
    learned_estimate,
    load_prior,
    region_index,
    mark_out_of_domain,
    resolve_auto_method,
    result_volume,
)
from .domain import check_domain
from .denoise import check_ct_volume, estimate_noise_hu
from .diffpir import DEFAULT_LAMBDA, SlabOperator, rho_t, run_diffpir

log = logging.getLogger(__name__)

METHODS = ("diffusion", "learned", "cubic", "sinc")
#: Methods that run a network (the others interpolate).
MODEL_METHODS = ("diffusion", "learned")
PLANES = ("both", "coronal", "sagittal")
#: Default network evaluations per plane.
DEFAULT_STEPS = 4
#: Start noise of the diffusion SR at strength 1 (normalised std, ~110 HU):
#: the order of the error of the cubic interpolation it starts from.
DEFAULT_START_SIGMA = 0.07
#: Checkpoint task of learned super-resolution models.
SR_TASK = "super_resolution"
#: Views the learned model is averaged over: as is and mirrored left-right (it
#: is trained with that flip only; the rows run along the slab axis).
SR_FLIPS = FLIP_VIEWS[:2]
#: Noise level (HU) whose posterior-mean estimate ends the diffusion SR
#: (tuned on simulated thick slices, see docs/evaluation/restoration.md).
DEFAULT_END_HU = 100.0
#: Thinnest output slice spacing accepted (mm).
MIN_SPACING_MM = 0.3
MAX_FACTOR = 16
#: Smallest in-plane size (pixels) for the diffusion method.
MIN_SLICE_PIXELS = 32


# -- geometry -------------------------------------------------------------------

def thin_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    """Affine of the thin grid: column 0 / k, first centre at z_0 - (k-1) d / 2."""
    affine = np.asarray(affine, dtype=float)
    out = affine.copy()
    out[:3, 0] = affine[:3, 0] / factor
    out[:3, 3] = affine[:3, 3] - affine[:3, 0] * (factor - 1) / (2.0 * factor)
    return out


def slice_thickness(volume: Volume) -> float:
    """Slice thickness (mm) along axis 0: the recorded one if plausible, else the spacing."""
    spacing = float(volume.spacing[0])
    recorded = volume.metadata.get("slice_thickness_mm")
    try:
        recorded = float(recorded)
    except (TypeError, ValueError):
        return spacing
    return recorded if 0.5 * spacing <= recorded <= 3.0 * spacing else spacing


def slab_operator(n_thick: int, factor: int, spacing_mm: float, thickness_mm: float) -> SlabOperator:
    """``H`` from the output grid (``factor * n_thick`` thin slices) to the thick slices."""
    d = spacing_mm / factor
    thick = np.arange(n_thick) * spacing_mm
    thin = (np.arange(n_thick * factor) - (factor - 1) / 2.0) * d
    return SlabOperator.from_geometry(thick, thickness_mm, thin, d)


def check_factor(volume: Volume, factor) -> int:
    """The factor as an int, or :class:`TaskInputError` saying why it does not fit."""
    try:
        value = float(factor)
    except (TypeError, ValueError):
        raise TaskInputError(f"factor must be a whole number >= 2, got {factor!r}") from None
    if not value.is_integer() or value < 2:
        raise TaskInputError(f"factor must be a whole number >= 2, got {factor!r}")
    k = int(value)
    spacing = float(volume.spacing[0])
    if spacing / k < MIN_SPACING_MM:
        raise TaskInputError(
            f"factor {k} does not fit the slice spacing {spacing:.3g} mm: the thin slices would be "
            f"{spacing / k:.3g} mm apart (at least {MIN_SPACING_MM} mm); use a factor <= "
            f"{max(1, int(spacing / MIN_SPACING_MM))}")
    if k > MAX_FACTOR:
        raise TaskInputError(f"factor {k} is too large (at most {MAX_FACTOR})")
    return k


# -- baselines --------------------------------------------------------------------

# -- diffusion ----------------------------------------------------------------------

def _smooth_inverse(op: SlabOperator) -> np.ndarray:
    """Cubic interpolation matrix from the thick centres onto ``op``'s thin grid."""
    g = op.geometry
    thick = np.asarray(g["thick_centres_mm"], dtype=np.float64)
    step = float(thick[1] - thick[0]) if len(thick) > 1 else 1.0
    positions = (np.asarray(g["thin_centres_mm"]) - thick[0]) / step
    return cubic_matrix(len(thick), positions)


def diffpir_planes(thick_planes: np.ndarray, op: SlabOperator, initial: np.ndarray, *, predictor,
                   checkpoint, plane_spacing_mm: tuple[float, float], steps: int = DEFAULT_STEPS,
                   strength: float = 1.0, end_hu: float = DEFAULT_END_HU, noise_hu: float = 0.0,
                   lam: float = DEFAULT_LAMBDA, eta: float = 0.0, smooth: bool = False,
                   region: Optional[str] = None, batch_size: Optional[int] = None, seed: Optional[int] = 0,
                   progress=None, cancel=None, flip_rows: bool = True, stream: int = 0,
                   out: Optional[np.ndarray] = None, average_with_out: bool = False) -> np.ndarray:
    """DiffPIR super-resolution of 2D planes whose rows run along the slice axis.

    Parameters
    ----------
    thick_planes : ndarray (N, n_thick, W)
        Measured planes (HU), rows = thick slices.
    op : SlabOperator
        ``H`` (n_thick x n_thin) on the output rows, built by
        :meth:`SlabOperator.from_geometry` (e.g. :func:`slab_operator`).
    initial : ndarray (N, n_thin, W)
        Starting estimate on the output grid (HU), e.g. the cubic interpolation.
    predictor, checkpoint :
        From :func:`~.common.load_prior`.
    plane_spacing_mm : (float, float)
        Output pixel size along rows (thin spacing) and columns, mm.
    steps, strength, end_hu, noise_hu, lam, eta, smooth, region :
        See :func:`super_resolve`.
    flip_rows : bool
        Present rows superior-up, as the prior saw coronal / sagittal slices
        in training (rows of the display orientation run inferior -> superior).
    stream : int
        Noise stream of these planes (coronal and sagittal runs draw apart).
    out : ndarray (N, n_thin, W), optional
        Where to write the result (may be a view of the output volume).
    average_with_out : bool
        Average with what ``out`` already holds (an earlier plane direction)
        instead of overwriting it.

    Returns
    -------
    ndarray (N, n_thin, W)
        Super-resolved planes, HU, consistent with ``thick_planes``.
    """
    if op.geometry is None:
        raise ValueError("diffpir_planes needs a SlabOperator built by SlabOperator.from_geometry")
    card = checkpoint.card
    norm = Normalizer(checkpoint.normalization, initial)
    low, high = norm.range
    schedule = checkpoint.schedule
    prior_mm = card.get("pixel_spacing_mm") or plane_spacing_mm
    zoom = (plane_spacing_mm[0] / float(prior_mm[0]), plane_spacing_mm[1] / float(prior_mm[-1]))
    resample = any(abs(z - 1.0) > 0.05 for z in zoom)
    n, n_thin, width = initial.shape
    if resample:
        shape = (max(8, int(round(n_thin * zoom[0]))), max(8, int(round(width * zoom[1]))))
        zoom = (shape[0] / n_thin, shape[1] / width)
        g = op.geometry
        d = g["thin_spacing_mm"]
        # pixel centres of the prior's grid (ndimage.zoom, grid_mode=True) in mm
        grid_mm = g["thin_centres_mm"][0] + ((np.arange(shape[0]) + 0.5) / zoom[0] - 0.5) * d
        work_op = SlabOperator.from_geometry(g["thick_centres_mm"], g["thickness_mm"], grid_mm,
                                             d / zoom[0])
    else:
        shape, work_op = (n_thin, width), op
    out_p = _smooth_inverse(op) if smooth else None
    work_p = _smooth_inverse(work_op) if smooth else None
    if flip_rows:
        work_op = SlabOperator(work_op.weights[::-1, ::-1])
        work_p = None if work_p is None else work_p[::-1, ::-1]
    predict = bind_region(predictor, region_index(region, card))
    runner = SliceRunner(device_of(predictor), seed=seed, batch_size=batch_size, progress=progress, cancel=cancel)
    sigma_n = max(float(noise_hu), 1e-3) / norm.units_per_step
    t_start = timestep_for_noise_level(max(strength * DEFAULT_START_SIGMA, 1e-6), schedule)
    t_end = min(timestep_for_noise_level(max(end_hu, 0.0) / norm.units_per_step, schedule), t_start)
    nsteps = max(1, min(int(steps), t_start - t_end + 1))

    def restore(index, noise, span):
        init = np.ascontiguousarray(initial[index], dtype=np.float32)
        thick = np.ascontiguousarray(thick_planes[index], dtype=np.float32)
        if resample:
            # the measured rows keep their slab positions; only the columns
            # change to the prior's pixel size, as for the initial estimate
            init_w, thick_w = _resize(init, shape), _resize(thick, (thick.shape[1], shape[1]))
        else:
            init_w, thick_w = init, thick
        y, x = norm.forward(thick_w), norm.forward(init_w)
        if flip_rows:
            y, x = y[:, ::-1], x[:, ::-1]
        y_t, x_t = runner.tensor(y), runner.tensor(x)

        def step(x0, t, abar_t):
            return work_op.data_step(x0, y_t, rho_t(abar_t, sigma_n, lam), axis=2, right_inverse=work_p)

        if strength <= 0 or t_start == 0:
            x0 = step(x_t, 0, 1.0)
        else:
            x0 = run_diffpir(predict, x_t, schedule, step, t_start=t_start, t_end=t_end, steps=nsteps,
                             eta=eta, generator=noise, progress=span, cancel=cancel)
        result = runner.numpy(x0)
        if flip_rows:
            result = result[:, ::-1]
        result = norm.inverse(result)
        if resample:
            # the prior's grid back to the output grid, plus the detail of the
            # interpolation finer than the prior's pixels
            result = _resize(result, (n_thin, width)) + (init - _resize(init_w, (n_thin, width)))
        # HU outside the prior's window come from the interpolation
        result = result + (init - np.clip(init, low, high))
        # exact consistency with the measured slabs on the output grid
        result = op.data_step(result.astype(np.float64), thick.astype(np.float64), 0.0,
                              axis=1, right_inverse=out_p).astype(np.float32)
        if average_with_out:
            result = 0.5 * (result + out[index])
        return result

    return runner.run(range(n), restore, cost=nsteps, stream=stream, message="diffusion super-resolution",
                      out=out)


def conditional_planes(thick_planes: np.ndarray, op: SlabOperator, initial: np.ndarray, *, predictor,
                       checkpoint, steps: int = LEARNED_STEPS, region: Optional[str] = None,
                       smooth: bool = True, batch_size: Optional[int] = None, seed: Optional[int] = 0, progress=None,
                       cancel=None, flip_rows: bool = True, stream: int = 0, out: Optional[np.ndarray] = None,
                       average_with_out: bool = False, ensemble: int = 1) -> np.ndarray:
    """Learned super-resolution of 2D planes whose rows run along the slice axis.

    The conditional model (``task: super_resolution``) gets each plane's cubic
    interpolation ``initial`` as its condition and estimates the thin plane:
    its posterior mean for ``steps=1``, a DDIM sample for more. The estimate
    is then made consistent with ``thick_planes`` by an exact data step on
    the output grid (``smooth``: a cubic correction of the slab residuals,
    without steps at slab borders; else DiffPIR's slab-constant one).

    Parameters are those of :func:`diffpir_planes`; the planes are used at
    the scan's own pixel size (the model was trained on it, see its card's
    domain). ``ensemble`` estimates are averaged, every other one of the
    plane mirrored left-right (:func:`~napari_mediffuse.tasks.common.learned_estimate`).

    Returns
    -------
    ndarray (N, n_thin, W)
        Super-resolved planes, HU, consistent with ``thick_planes``.
    """
    if op.geometry is None:
        raise ValueError("conditional_planes needs a SlabOperator built by SlabOperator.from_geometry")
    norm = Normalizer(checkpoint.normalization, initial)
    right_inverse = _smooth_inverse(op) if smooth else None
    region_class = region_index(region, checkpoint.card)
    runner = SliceRunner(device_of(predictor), seed=seed, batch_size=batch_size, progress=progress, cancel=cancel)
    nsteps = max(1, int(steps))

    def restore(index, noise, span):
        init = np.ascontiguousarray(initial[index], dtype=np.float32)
        result = learned_estimate(predictor, checkpoint, init, norm, runner, region_class=region_class,
                                  noise=noise, steps=nsteps, flip_rows=flip_rows, ensemble=ensemble,
                                  flips=SR_FLIPS, progress=span, cancel=cancel)
        thick = np.asarray(thick_planes[index], dtype=np.float64)
        result = op.data_step(result.astype(np.float64), thick, 0.0, axis=1,
                              right_inverse=right_inverse).astype(np.float32)
        if average_with_out:
            result = 0.5 * (result + out[index])
        return result

    return runner.run(range(len(initial)), restore, cost=nsteps * ensemble, stream=stream,
                      message="learned super-resolution", out=out)


def _resize(stack: np.ndarray, shape) -> np.ndarray:
    """Cubic resampling of (N, H, W) planes to (N, *shape), pixel centres aligned."""
    n, h, w = stack.shape
    zoom = (1.0, shape[0] / h, shape[1] / w)
    return ndimage.zoom(np.asarray(stack, dtype=np.float32), zoom, order=3, mode="nearest",
                       grid_mode=True)


# -- the task ----------------------------------------------------------------------------

def super_resolve(volume: Volume, *, factor: int, method: str = AUTO_METHOD, model: Optional[str] = None,
                  steps: Optional[int] = None, strength: float = 1.0, planes: str = "both",
                  lam: float = DEFAULT_LAMBDA, eta: float = 0.0, end_hu: float = DEFAULT_END_HU,
                  smooth: bool = False, noise_hu: Optional[float] = None,
                  region: Optional[str] = None, ensemble: int = 1,
                  options: Optional[RunOptions] = None) -> Volume:
    """Thick -> thin slices: ``factor`` thin slices per thick slice along axis 0.

    Parameters
    ----------
    volume : Volume
        3D CT in HU, display orientation; axis 0 (S) is the slice axis.
    factor : int
        Thin slices per thick slice (>= 2), e.g. 5 for 5 mm -> 1 mm; the
        thin spacing (slice spacing / factor, mm) must be >= 0.3 mm.
    method : {'auto', 'diffusion', 'learned', 'cubic', 'sinc'}
        DiffPIR with the CT prior on coronal / sagittal planes, the learned
        super-resolution model on the same planes, cubic-spline or Lanczos
        windowed-sinc interpolation. 'auto' (default): learned where a
        super_resolution model is installed (or ``model`` names one) and the
        scan (pixel size, thick-slice spacing, region) is inside its domain,
        else diffusion (:func:`~.common.resolve_auto_method`; the result's
        parameters say which and why).
    model : str, optional
        Checkpoint name or folder: a CT prior (diffusion) or a ``super_resolution``
        model (learned).
    steps : int
        Network evaluations per plane (diffusion: default 4; learned: 1 =
        the model's posterior mean, the default, more = a DDIM sample).
    strength : float
        Scales the start noise of the diffusion (1 = the default start step;
        0 = the interpolation made consistent with the thick slices).
    planes : {'both', 'coronal', 'sagittal'}
        Planes the prior works on; 'both' averages the two (twice the time).
    lam : float
        DiffPIR lambda (``rho_t = lambda sigma_n^2 / sigma_t^2``).
    eta : float
        0 deterministic DDIM, up to 1 fresh noise at each step.
    end_hu : float
        Stop the diffusion at the step of this noise level (HU) and return
        the prior's posterior-mean estimate there (0 = sample to the end;
        larger = smoother, fewer invented details).
    smooth : bool
        Data step with a smooth (cubic) correction of the slab residuals
        instead of DiffPIR's slab-constant ``H^T`` one; both fit the thick
        slices exactly.
    noise_hu : float, optional
        Noise std (HU) of the thick slices; estimated when omitted.
    region : str, optional
        Body region for region-conditioned priors.
    ensemble : int
        Learned only (with 'auto', used when it picks learned): the mean of this many estimates of each plane, each
        from its own noise draw, presented in turn as is and mirrored along
        its in-plane axis (the model is trained with that flip; rows, along
        which the slab geometry runs, are never flipped). Each costs one more
        network evaluation.
    options : RunOptions

    Returns
    -------
    Volume
        HU within the input's value range, ``factor * n`` slices, spacing
        along axis 0 divided by ``factor``,
        first slice centre ``(factor - 1) / (2 factor)`` thick spacings
        before the input's (the slab model, see the module docstring).

    Raises
    ------
    TaskInputError
        Not a CT, a 2D image, too small, or a factor that does not fit.
    """
    options = options or RunOptions()
    if method not in (AUTO_METHOD,) + METHODS:
        raise TaskInputError(f"unknown super-resolution method {method!r}; choose one of "
                             f"{', '.join((AUTO_METHOD,) + METHODS)}")
    if planes not in PLANES:
        raise TaskInputError(f"unknown planes {planes!r}; choose one of {', '.join(PLANES)}")
    chosen_because = None
    if method == AUTO_METHOD:
        check_ensemble(ensemble, "learned", "learned model")
        method, model, chosen_because = resolve_auto_method(
            model, learned_task=SR_TASK,
            domain_warnings=lambda card: learned_sr_domain(card, volume, factor, region))
        log.info("super-resolution: method auto -> %s (%s)", method, chosen_because)
        ensemble = ensemble if method == "learned" else 1
    ensemble = check_ensemble(ensemble, method, "learned model")
    check_ct_volume(volume, task="super-resolution", min_size=MIN_SLICE_PIXELS if method in MODEL_METHODS else 2)
    k = check_factor(volume, factor)
    started = time.perf_counter()
    data = np.asarray(volume.data, dtype=np.float32)
    n_thick = data.shape[0]
    spacing = float(volume.spacing[0])
    thickness = slice_thickness(volume)
    affine = thin_affine(volume.affine, k)
    params = {"method": method, "factor": k, "region": region, "thick_spacing_mm": spacing, "slice_thickness_mm": thickness,
              "thin_spacing_mm": spacing / k}
    if chosen_because is not None:
        params["method_auto"] = chosen_because
    model_name = None
    domain_warnings = []
    if method == "cubic":
        out = cubic_along(data, k, axis=0)
    elif method == "sinc":
        out = sinc_along(data, k, axis=0)
    else:
        learned = method == "learned"
        steps = (LEARNED_STEPS if learned else DEFAULT_STEPS) if steps is None else int(steps)
        checkpoint, predictor = load_prior(model, options, task=SR_TASK if learned else "ct_prior")
        model_name = checkpoint.name
        # the learned model saw slabs of given thicknesses cut into given thin spacings;
        # DiffPIR's prior works on the thin grid
        domain_warnings = (learned_sr_domain(checkpoint.card, volume, k, region) if learned else
                           check_domain(checkpoint.card, volume, task="super-resolution", region=region))
        op = slab_operator(n_thick, k, spacing, thickness)
        initial = cubic_along(data, k, axis=0)
        if not learned and noise_hu is None:
            noise_hu = float(np.median(estimate_noise_hu(data)))
        chosen = ("coronal", "sagittal") if planes == "both" else (planes,)
        # the output grid is held once (k times the input): each plane direction writes into it,
        # the second averaging with the first batch by batch
        out = np.empty(initial.shape, dtype=np.float32)
        for i, plane in enumerate(chosen):
            axis = 1 if plane == "coronal" else 2
            col_mm = float(volume.spacing[2 if axis == 1 else 1])
            common = dict(predictor=predictor, checkpoint=checkpoint, steps=steps, region=region,
                          batch_size=options.batch_size, seed=options.seed, stream=i,
                          progress=_stage(options.progress, i, len(chosen), plane), cancel=options.cancel,
                          out=np.moveaxis(out, axis, 0), average_with_out=i > 0)
            # views (N planes, slice axis, in-plane axis): batches are copied as they are used
            if learned:
                conditional_planes(np.moveaxis(data, axis, 0), op, np.moveaxis(initial, axis, 0),
                                   ensemble=ensemble, **common)
            else:
                diffpir_planes(np.moveaxis(data, axis, 0), op, np.moveaxis(initial, axis, 0),
                               plane_spacing_mm=(spacing / k, col_mm), strength=strength, end_hu=end_hu,
                               smooth=smooth, noise_hu=noise_hu, lam=lam, eta=eta, **common)
        del initial
        params.update(steps=int(steps), planes=planes)
        if learned:
            params["ensemble"] = ensemble
        else:
            params.update(strength=float(strength), lam=float(lam), eta=float(eta), end_hu=float(end_hu),
                          smooth=bool(smooth), noise_hu=float(noise_hu))
    # interpolation overshoot and slab corrections can leave the input's HU
    # range (e.g. below air next to bone); keep within it
    out = np.clip(out, float(data.min()), float(data.max()), out=out if out.dtype == np.float32 else None)
    params["seconds"] = round(time.perf_counter() - started, 3)
    n_steps = f", {int(steps)} step{'s' if int(steps or 0) != 1 else ''}" if method in MODEL_METHODS else ""
    suffix = f"super-resolved x{k} ({method}{n_steps})"
    result = result_volume(volume, out.astype(np.float32, copy=False), task="super_resolution", suffix=suffix,
                           params=params, affine=affine, model=model_name)
    result.metadata["slice_thickness_mm"] = spacing / k
    mark_out_of_domain([result], domain_warnings)
    return result


#: Thin-slice spacings (mm) a learned model's training slabs were cut into: the 1 mm chest and
#: 1.5 mm head CTs of ct_sr_multi.yaml (its card records the scans, not their spacings).
LEARNED_THIN_MM = (1.0, 1.5)


def learned_sr_domain(card: dict, volume: Volume, factor, region=None) -> list[str]:
    """:func:`~.domain.check_domain` of a learned model for this scan's thick slices, and its thin
    spacing (thick spacing / factor) against the spacings it was trained to restore."""
    from .domain import SPACING_TOLERANCE

    spacing = float(volume.spacing[0])
    warnings = check_domain(card, volume, task="super-resolution", region=region, slice_spacing_mm=spacing)
    try:
        thin = spacing / float(factor)
    except (TypeError, ValueError):  # check_factor names the problem
        return warnings
    lo, hi = LEARNED_THIN_MM
    if not lo / SPACING_TOLERANCE <= thin <= hi * SPACING_TOLERANCE:
        warnings.append(f"{card.get('name', 'the model')} restores {lo:g}-{hi:g} mm slices; "
                        f"x{factor:g} of these makes {thin:.2g} mm")
    return warnings


def _stage(progress, index: int, count: int, plane: str):
    """Progress of one plane direction mapped onto the whole run."""
    if progress is None:
        return None

    def report(done, total, message=""):
        progress(index * total + done, count * total, f"{plane}: {message}")

    return report


# -- CLI ----------------------------------------------------------------------------------

def add_command(subparsers) -> None:
    """``mediffuse sr INPUT -o OUTPUT --factor K [--method ...]``."""
    from .cli import add_common_options, add_ensemble_option, add_region_option

    p = subparsers.add_parser(
        "sr", help="thick -> thin slice super-resolution (DiffPIR with the CT prior, a learned model, "
                   "cubic or sinc)",
        description="Super-resolve a CT across slices: FACTOR thin slices per thick slice along the "
                    "slice axis (slab model: thick slices are averages of the thin ones). Output: "
                    "NIfTI in HU with the new slice spacing.")
    p.add_argument("input", help="NIfTI file, DICOM file or DICOM folder")
    p.add_argument("-o", "--output", required=True, help="output NIfTI file (.nii or .nii.gz)")
    p.add_argument("--factor", required=True, type=float,
                   help="thin slices per thick slice (whole number >= 2, e.g. 5 for 5 mm -> 1 mm)")
    p.add_argument("--method", choices=(AUTO_METHOD,) + METHODS, default=AUTO_METHOD,
                   help="auto (default: learned where a super_resolution model is installed and the scan is "
                        "inside what it saw, else diffusion), diffusion (DiffPIR with the CT prior), learned "
                        "(a super_resolution model, --model), cubic or sinc")
    add_common_options(p)
    p.add_argument("--steps", type=int,
                   help=f"network evaluations per plane (default: diffusion {DEFAULT_STEPS}, "
                        f"learned {LEARNED_STEPS} = the model's posterior mean)")
    p.add_argument("--strength", type=float, default=1.0, help="scales the start noise (default 1)")
    p.add_argument("--planes", choices=PLANES, default="both",
                   help="planes the prior works on (default both, averaged)")
    p.add_argument("--lambda", dest="lam", type=float, default=DEFAULT_LAMBDA,
                   help=f"DiffPIR lambda (default {DEFAULT_LAMBDA})")
    add_region_option(p)
    add_ensemble_option(p, per="plane")
    p.set_defaults(func=_cmd_sr)


def _cmd_sr(args) -> int:
    from .cli import finish_volume_command, prepare_volume_command

    volume, options = prepare_volume_command(args)
    result = super_resolve(volume, factor=args.factor, method=args.method, model=args.model,
                           steps=args.steps, strength=args.strength, planes=args.planes, lam=args.lam,
                           region=args.region, ensemble=args.ensemble, options=options)
    p = result.metadata["parameters"]
    auto_note = f"; method auto: {p['method_auto']}" if "method_auto" in p else ""
    return finish_volume_command(args, result, f"{result.name}{auto_note}; {result.data.shape[0]} slices at "
                                 f"{p['thin_spacing_mm']:.3g} mm, {p['seconds']:.1f} s")
