"""Lesion inpainting with a diffusion prior (RePaint; MedDiff-FM section 3.5.3).

Inside a mask the user paints, the prior synthesises tissue consistent with
the surroundings ("what would this look like healthy"); every voxel outside
the mask keeps its exact value.

RePaint (Lugmayr et al., CVPR 2022) with DDIM steps: the reverse process runs
on the slice (cropped to the mask's box plus ``CONTEXT_MM`` of context when
that is at most half the slice: the prior gets each pixel's place in the
whole slice, as it was trained on patches), and after every step the known region (outside the mask)
is replaced by the input noised to that step, ``add_noise(x0, t_prev)``,
through :func:`~napari_mediffuse.engine.sampling.ddim_sample`'s ``xt_hook``.
Optional *resampling* (RePaint's jumps of length 1) harmonises the two
regions: the pasted sample is noised back to the current step and the step is
redone, ``resample`` more times per step (each costs one more network
evaluation per step).

The same masked reconstruction, started from a partly noised image instead
of pure noise, is the healthy reconstruction of :mod:`.anomaly`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..engine.checkpoint import Checkpoint
from ..engine.control import ProgressSpan, check_cancel
from ..engine.runner import SliceNoise, SliceRunner, device_of, resolve_seed
from ..engine.sampling import Predictor, add_noise, ddim_sample, make_generator, predict_x0, randn, timestep_sequence
from ..engine.schedulers import alphas_cumprod
from ..io.volume import Volume
from .common import (
    PLANE_AXIS,
    Normalizer,
    RunOptions,
    TaskInputError,
    bind_region,
    in_crop,
    load_prior,
    region_index,
    require_volume,
    result_volume,
    mark_out_of_domain,
    slice_offset,
    slices_of,
)
from .domain import check_domain

#: Default sampler steps for inpainting (from pure noise) and RePaint resampling.
DEFAULT_INPAINT_STEPS = 50
DEFAULT_RESAMPLE = 1
#: Context (mm, in-plane) inpainting keeps around the mask when it crops the
#: slices to it (see :func:`context_box`). Three 16 x 16 px masks on 512 x 399
#: chest slices: 95 s per mask on whole slices, 6 s cropped; error to the real
#: tissue lower on two masks, 4 HU higher on one (docs/evaluation/inpaint_context.md).
CONTEXT_MM = 32.0
#: Slices are cropped only when the box is at most this share of their area.
CROP_MAX_FRACTION = 0.5


@dataclass
class Prior:
    """A diffusion prior ready for a task: everything the samplers need.

    Parameters
    ----------
    predictor : callable
        ``eps = predictor(x_t, t)`` on (B, 1, H, W) normalised slices (region
        class bound); one that also takes ``extent=`` (a crop's place in the
        whole slice, :class:`~..engine.inference.NoisePredictor`) lets inpainting
        run on the mask's context only (:func:`accepts_extent`).
    schedule : dict
        The checkpoint's noise schedule.
    normalization : dict
        The checkpoint's intensity rule (see :mod:`~napari_mediffuse.engine.intensity`).
    name : str
        Model name recorded in result metadata.
    modality : str
        Modality the prior was trained on ('CT', 'MR' or 'any').
    pixel_spacing_mm : (float, float) or None
        In-plane pixel spacing the prior was trained at; slices are resampled
        to it when they differ by more than 10 %. ``None``: use the input grid.
    """

    predictor: Predictor
    schedule: dict
    normalization: dict
    name: str = "prior"
    modality: str = "CT"
    pixel_spacing_mm: Optional[tuple] = None
    card: dict = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, predictor, *, region=None) -> "Prior":
        card = checkpoint.card
        spacing = card.get("pixel_spacing_mm")
        return cls(predictor=bind_region(predictor, region_index(region, card)),
                   schedule=checkpoint.schedule, normalization=checkpoint.normalization,
                   name=checkpoint.name, modality=card.get("modality", "CT"),
                   pixel_spacing_mm=tuple(spacing) if spacing else None, card=card)

    def at_pixel_size(self, pixel_mm: Optional[float]) -> "Prior":
        """This prior run on slices resampled to ``pixel_mm`` (mm, square pixels).

        ``None`` keeps its own rule (its card's spacing, else the input's
        grid). A multi-resolution prior accepts any size within the pixel
        sizes it was trained at (its card's domain, :func:`~.domain.model_domain`),
        a single-resolution one only its own (10 % tolerance, as
        :class:`SliceGrid`); anything else is a :class:`TaskInputError`.
        """
        from dataclasses import replace

        from .domain import model_domain

        if pixel_mm is None:
            return self
        pixel_mm = float(pixel_mm)
        trained = model_domain(self.card).get("pixel_spacing_mm") or self.pixel_spacing_mm
        if not trained:
            raise TaskInputError(f"prior {self.name!r} records no pixel sizes it was trained at; "
                                 "run it on the scan's own grid (no pixel size)")
        low, high = float(min(trained)), float(max(trained))
        if not low / 1.1 <= pixel_mm <= high * 1.1:
            raise TaskInputError(f"pixel size {pixel_mm:g} mm is outside what prior {self.name!r} was trained at "
                                 f"({low:g}-{high:g} mm)")
        return replace(self, pixel_spacing_mm=(pixel_mm, pixel_mm))


def prepare_prior(volume: Volume, model, options: RunOptions, *, task: str, region=None) -> Prior:
    """Check ``volume`` is a 3D scan and load the prior that suits it.

    ``model``: ``None`` (the default CT prior), a checkpoint name or folder,
    or a ready :class:`Prior`. An image of another modality than the prior's
    gives a :class:`TaskInputError` before anything runs.
    """
    require_volume(volume, task=task)
    if isinstance(model, Prior):
        prior = model
    else:
        explicit = model is not None
        checkpoint, predictor = load_prior(model, options, task="ct_prior" if not explicit else None,
                                           modality=None)
        if checkpoint.task not in ("ct_prior", "image_prior"):
            raise TaskInputError(f"{task} needs an image prior; checkpoint {checkpoint.name!r} "
                                 f"is a {checkpoint.task!r} model")
        prior = Prior.from_checkpoint(checkpoint, predictor, region=region)
    if prior.modality not in ("any", volume.modality):
        label = f"{volume.name!r}" + (f" ({volume.source})" if volume.source else "")
        raise TaskInputError(f"{task} with {prior.name!r} needs a {prior.modality} scan (the model was "
                             f"trained on {prior.modality} only); {label} is {volume.modality}. "
                             "Nothing was written")
    return prior


# -- resampling slices to the prior's pixel spacing --------------------------------

class SliceGrid:
    """Resample (B, 1, H, W) slices to the prior's pixel spacing and back.

    Identity when the in-plane spacing is within 10 % of the prior's.
    """

    def __init__(self, in_plane_spacing, prior_spacing, shape):
        self.shape = tuple(int(n) for n in shape)
        self.size = self.shape
        if prior_spacing is not None:
            factors = [s / p for s, p in zip(in_plane_spacing, prior_spacing)]
            if any(abs(f - 1.0) > 0.1 for f in factors):
                self.size = tuple(max(8, int(round(n * f))) for n, f in zip(self.shape, factors))

    @property
    def identity(self) -> bool:
        return self.size == self.shape

    def to_model(self, x: torch.Tensor, *, mask: bool = False) -> torch.Tensor:
        if self.identity:
            return x
        if mask:  # a pixel is known/unknown if any of it is
            return (F.interpolate(x.float(), size=self.size, mode="area") > 0.5).to(x.dtype)
        mode = "area" if self.size[0] < self.shape[0] else "bilinear"
        kwargs = {} if mode == "area" else {"align_corners": False}
        return F.interpolate(x, size=self.size, mode=mode, **kwargs)

    def from_model(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return x
        return F.interpolate(x, size=self.shape, mode="bilinear", align_corners=False)


def in_plane_spacing(volume: Volume, plane: str) -> tuple[float, float]:
    spacing = list(volume.spacing)
    del spacing[PLANE_AXIS[plane]]
    return tuple(spacing)


# -- the masked reconstruction (RePaint) ----------------------------------------

def repaint(predictor: Predictor, x0: torch.Tensor, known: torch.Tensor, schedule: dict, *,
            t_start: Optional[int] = None, steps: int = DEFAULT_INPAINT_STEPS, resample: int = 0,
            eta: float = 0.0, t_end: int = 0, generator=None,
            progress=None, cancel=None) -> torch.Tensor:
    """Regenerate the unknown part of ``x0`` consistently with the known part.

    Parameters
    ----------
    predictor : callable
        ``eps = predictor(x_t, t)``.
    x0 : Tensor (B, 1, H, W)
        Normalised image; its values where ``known == 0`` are ignored
        (beyond the partial noise of ``t_start``).
    known : Tensor (B, 1, H, W)
        1 where the image is kept, 0 where it is regenerated.
    t_start : int, optional
        Step the reverse process starts from: T-1 (default) generates the
        unknown region from pure noise (inpainting); a smaller step starts
        from ``add_noise(x0, t_start)`` and keeps the coarse content
        (partial-diffusion reconstruction for anomaly detection).
    steps : int
        DDIM steps from ``t_start`` to 0.
    resample : int
        Extra RePaint resampling rounds per step (0 = plain pasting).
    eta : float
        DDIM stochasticity (0 deterministic, 1 DDPM-like).
    t_end : int
        Last step; the prior's clean-image estimate there is returned (a
        posterior mean at a small noise level rather than drawn fine detail).

    Returns
    -------
    Tensor (B, 1, H, W)
        ``x0`` where known, the reconstruction elsewhere.
    """
    abar = alphas_cumprod(schedule)
    n_train = len(abar)
    t_start = n_train - 1 if t_start is None else int(t_start)
    generator = generator or make_generator(None)
    t_end = min(max(int(t_end), 0), t_start)
    seq = timestep_sequence(n_train, steps, t_start, t_end)
    previous_of = {seq[i + 1]: seq[i] for i in range(len(seq) - 1)}
    known = known.to(x0.dtype)
    unknown = 1.0 - known

    def paste(x: torch.Tensor, t: int) -> torch.Tensor:
        return known * add_noise(x0, t, abar, generator) + unknown * x

    def hook(x_prev: torch.Tensor, t_prev: int) -> torch.Tensor:
        x_prev = paste(x_prev, t_prev)
        t = previous_of[t_prev]
        a_t, a_prev = float(abar[t]), float(abar[t_prev])
        for _ in range(int(resample)):
            check_cancel(cancel)
            # jump back: q(x_t | x_t_prev), then redo the deterministic step
            ratio = a_t / a_prev
            noise = randn(x_prev.shape, generator, x_prev.device, x_prev.dtype)
            x_t = ratio ** 0.5 * x_prev + (1.0 - ratio) ** 0.5 * noise
            eps = predictor(x_t, t).to(x_t.dtype)
            x0_hat = predict_x0(x_t, eps, a_t).clamp(-1.0, 1.0)
            eps_hat = (x_t - a_t ** 0.5 * x0_hat) / max(1.0 - a_t, 1e-12) ** 0.5
            x_prev = paste(a_prev ** 0.5 * x0_hat + (1.0 - a_prev) ** 0.5 * eps_hat, t_prev)
        return x_prev

    x_t = add_noise(x0, t_start, abar, generator)
    out = ddim_sample(predictor, x_t, schedule, steps=steps, t_start=t_start, t_end=t_end, eta=eta,
                      generator=generator, xt_hook=hook, progress=progress, cancel=cancel)
    return known * x0 + unknown * out


def context_box(unknown_slices: np.ndarray, spacing_mm, context_mm: float) -> Optional[tuple]:
    """In-plane box ``((row_start, row_stop), (col_start, col_stop))`` of the
    unknown pixels of a stack of slices (N, H, W), grown by ``context_mm`` on
    every side and clipped to the slice; ``None`` when it covers more than
    ``CROP_MAX_FRACTION`` of the slice (cropping would save little) or nothing
    is unknown."""
    plane = unknown_slices.any(axis=0)
    if not plane.any():
        return None
    box = []
    for axis, (n, mm) in enumerate(zip(plane.shape, spacing_mm)):
        hit = np.flatnonzero(plane.any(axis=1 - axis))
        margin = int(np.ceil(context_mm / float(mm)))
        box.append((max(0, int(hit[0]) - margin), min(n, int(hit[-1]) + 1 + margin)))
    area = (box[0][1] - box[0][0]) * (box[1][1] - box[1][0])
    return None if area > CROP_MAX_FRACTION * plane.size else tuple(box)


def masked_reconstruction(volume: Volume, unknown: np.ndarray, prior: Prior, *, t_start: Optional[int],
                          steps: int, resample: int = 0, eta: float = 0.0, t_end: int = 0, plane: str = "axial",
                          seeds=(0,), options: RunOptions, message: str = "", return_spread: bool = False,
                          context_mm: Optional[float] = None):
    """Reconstruct the ``unknown`` voxels of a volume slice by slice with :func:`repaint`.

    Slices without unknown voxels are skipped (returned unchanged). With
    several ``seeds`` (and/or a list of ``t_start`` values) the
    reconstructions are averaged. When the unknown voxels lie in a small part
    of the slices, the prior runs on that part plus ``context_mm`` of context
    (:func:`context_box`; ``None``: always whole slices), each pixel given its
    place in the whole slice. Inpainting crops (``CONTEXT_MM``); the anomaly
    task keeps whole slices (its figures were measured so).

    Returns
    -------
    ndarray float32, the volume's shape
        Reconstruction in normalised units ([-1, 1]) on the volume's grid;
        with ``return_spread`` also the standard deviation of the runs
        (normalised units; 0 where nothing was reconstructed).
    """
    norm = Normalizer(prior.normalization, volume.data)
    x_all = slices_of(norm.forward(volume.data), plane)
    u_all = slices_of(unknown, plane)
    todo = np.flatnonzero(u_all.reshape(len(u_all), -1).any(axis=1))
    out = np.array(x_all, dtype=np.float32, copy=True)
    spread = np.zeros(x_all.shape, dtype=np.float32) if return_spread else None
    spacing = in_plane_spacing(volume, plane)
    # each slice's own box (the same slice gets the same crop in a preview slab as in the whole run);
    # slices sharing a box run together
    crops = context_mm is not None and accepts_extent(prior.predictor)
    groups: dict = {}
    for i in todo:
        groups.setdefault(context_box(u_all[i:i + 1], spacing, context_mm) if crops else None, []).append(int(i))
    whole = SliceGrid(spacing, prior.pixel_spacing_mm, out.shape[1:])
    t_list = [t_start] if t_start is None or np.isscalar(t_start) else list(t_start)
    runs = [(t, s) for t in t_list for s in seeds]
    n_train = len(alphas_cumprod(prior.schedule))
    per_run = [len(timestep_sequence(n_train, steps, t, min(t_end, n_train - 1 if t is None else t)))
               * (1 + int(resample)) for t, _ in runs]
    run_seeds = [resolve_seed(seed) for _, seed in runs]
    runner = SliceRunner(device_of(prior.predictor), seed=options.seed, batch_size=options.batch_size,
                         progress=options.progress, cancel=options.cancel,
                         index_offset=slice_offset(volume, plane))
    cost = sum(per_run)
    total = sum(len(runner.batches(members)) for members in groups.values()) * cost
    offset = 0
    for box, members in groups.items():
        crop = (slice(None),) if box is None else (slice(None),) + tuple(slice(*b) for b in box)
        # a crop's first pixel and the whole slice, in the prior's pixels
        predictor = prior.predictor if box is None else in_crop(
            prior.predictor, tuple((b[0] * m / n, m) for b, m, n in zip(box, whole.size, whole.shape)))
        reconstruct = _reconstructor(x_all[crop], u_all[crop], prior, predictor, runs, run_seeds, per_run,
                                     spacing=spacing, steps=steps, resample=resample, eta=eta, t_end=t_end,
                                     runner=runner, message=message, options=options,
                                     with_spread=spread is not None)
        done = runner.run(np.asarray(members), reconstruct, cost=cost, message=message,
                          progress_offset=offset, progress_total=total)
        offset += len(runner.batches(members)) * cost
        where = (np.asarray(members),) if box is None else np.ix_(members, *(np.arange(*b) for b in box))
        if spread is None:
            out[where] = done
        else:
            out[where], spread[where] = done[:, 0], done[:, 1]
    out = np.moveaxis(out, 0, PLANE_AXIS[plane])
    if spread is not None:
        return out, np.moveaxis(spread, 0, PLANE_AXIS[plane])
    return out


def accepts_extent(predictor) -> bool:
    """Whether ``predictor`` takes ``extent`` (a crop's place in the whole slice): a
    :class:`~..engine.inference.NoisePredictor` behind :func:`~.common.bind_region` does; a plain
    ``predictor(x_t, t)`` gets whole slices."""
    import inspect

    try:
        parameters = inspect.signature(predictor).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "extent" or p.kind is p.VAR_KEYWORD for p in parameters)


def _reconstructor(x_all, u_all, prior, predictor, runs, run_seeds, per_run, *, spacing, steps, resample, eta,
                   t_end, runner, message, options, with_spread):
    """The batch function of :func:`masked_reconstruction` on slices ``x_all`` (whole or one crop)."""
    grid = SliceGrid(spacing, prior.pixel_spacing_mm, x_all.shape[1:])
    # a partial diffusion keeps what the prior cannot see: the detail finer than its pixels
    # (generation from pure noise, inpainting, has nothing of the input to keep)
    keep_fine_detail = not grid.identity and all(t is not None for t, _ in runs)

    def reconstruct(index, _noise, span):
        x0 = runner.tensor(x_all[index])
        x0_m = grid.to_model(x0)
        known_m = 1.0 - grid.to_model(runner.tensor(u_all[index]), mask=True)
        results = []
        for r, (t, _) in enumerate(runs):
            # each run's noise is its own seed's stream of each slice
            noise = SliceNoise.for_slices(run_seeds[r], index + runner.index_offset)
            results.append(repaint(predictor, x0_m, known_m, prior.schedule, t_start=t, steps=steps,
                                   resample=resample, eta=eta, t_end=t_end, generator=noise,
                                   progress=_scaled_progress(span, sum(per_run[:r]), per_run[r],
                                                             sum(per_run), message),
                                   cancel=options.cancel))
        stacked = torch.stack([grid.from_model(rec) for rec in results])
        if keep_fine_detail:
            stacked = stacked + (x0 - grid.from_model(x0_m))
        u_np = u_all[index].astype(bool)
        mean = np.where(u_np, runner.numpy(stacked.mean(0)), x_all[index])
        if not with_spread:
            return mean
        std = runner.numpy(stacked.std(0)) if len(results) > 1 else np.zeros_like(mean)
        return np.stack([mean, np.where(u_np, std, 0.0)], axis=1)

    return reconstruct


def _scaled_progress(progress, offset: int, cost: int, total: int, message: str):
    """Sampler progress (step i of n) -> overall units (``cost`` units per run)."""
    if progress is None:
        return None
    span = ProgressSpan(progress, offset, total, message)
    return lambda done, n, text="": span(done * cost // max(n, 1), total, message or text)


# -- the task -------------------------------------------------------------------

def inpaint(volume: Volume, mask, *, steps: int = DEFAULT_INPAINT_STEPS, resample: int = DEFAULT_RESAMPLE,
            dilate_mm: float = 0.0, eta: float = 0.0, plane: str = "axial", region: Optional[str] = None,
            model=None, options: Optional[RunOptions] = None) -> Volume:
    """Replace the voxels inside ``mask`` with tissue synthesised by the prior.

    Parameters
    ----------
    volume : Volume
        A 3D scan (CT in HU for a CT prior).
    mask : ndarray or Volume
        Region to synthesise: a boolean/label array with the volume's spatial
        shape, or a label :class:`Volume` (a napari Labels layer, a NIfTI
        label file) on the same grid (shape and affine); nonzero = inpaint.
    steps : int
        DDIM steps (network evaluations per slice, times ``1 + resample``).
    resample : int
        RePaint resampling rounds per step (0-3; more harmonises better, costs more).
    dilate_mm : float
        Grow the mask by this distance (mm, in-plane) so a lesion's rim is
        replaced too.
    eta : float
        Sampler stochasticity (0 = DDIM).
    plane : {'axial', 'coronal', 'sagittal'}
        Slice orientation the 2D prior runs on.
    region : str, optional
        Body-region class of the prior ('abdomen'...); default: the prior's.
    model : str, path, Prior or None
        Checkpoint name/folder; default: the installed CT prior.
    options : RunOptions

    Returns
    -------
    Volume
        Same grid and units as ``volume``; voxels outside the mask exactly
        unchanged; marked synthetic in metadata.

    Raises
    ------
    TaskInputError
        Not 3D, modality unlike the prior's, empty mask, mask on another grid.
    """
    from .masks import resolve_roi

    options = options or RunOptions()
    require_volume(volume, task="inpainting")
    unknown = resolve_roi(volume, mask, what="inpainting mask") if mask is not None else None
    if unknown is None:
        raise TaskInputError("inpainting needs a mask (paint the region to replace); nothing was written")
    if dilate_mm > 0:
        unknown = _dilate_in_plane(unknown, volume, plane, dilate_mm)
    prior = prepare_prior(volume, model, options, task="inpainting", region=region)
    norm = Normalizer(prior.normalization, volume.data)
    start = time.perf_counter()
    # a lesion is a small part of a slice: the prior runs on it and its context, not the whole slice
    rec = masked_reconstruction(volume, unknown, prior, t_start=None, steps=steps, resample=resample,
                                eta=eta, plane=plane, seeds=(options.seed,), options=options,
                                message="inpainting", context_mm=CONTEXT_MM)
    seconds = time.perf_counter() - start
    synth = norm.inverse(rec)
    data = np.array(volume.data, copy=True)
    if np.issubdtype(data.dtype, np.integer):
        info = np.iinfo(data.dtype)
        synth = np.clip(np.round(synth), info.min, info.max)
    data[unknown] = synth[unknown].astype(data.dtype)
    params = dict(steps=steps, resample=resample, dilate_mm=dilate_mm, eta=eta, plane=plane, region=region,
                  seed=options.seed, inpainted_voxels=int(unknown.sum()), seconds=round(seconds, 2))
    result = result_volume(volume, data, task="inpainting", suffix=f"inpainted ({steps} steps)", params=params,
                           synthetic=True, model=prior.name)
    mark_out_of_domain([result], check_domain(prior.card, volume, task="inpainting", region=region))
    return result


def _dilate_in_plane(mask: np.ndarray, volume: Volume, plane: str, mm: float) -> np.ndarray:
    spacing = in_plane_spacing(volume, plane)
    radius = [int(np.ceil(mm / s)) for s in spacing]
    yy, xx = np.ogrid[-radius[0]:radius[0] + 1, -radius[1]:radius[1] + 1]
    disk = (yy * spacing[0]) ** 2 + (xx * spacing[1]) ** 2 <= mm ** 2 + 1e-6
    structure = np.expand_dims(disk, PLANE_AXIS[plane])
    return ndimage.binary_dilation(mask, structure=structure)


# -- CLI ------------------------------------------------------------------------

def add_command(subparsers) -> None:
    from .cli import add_common_options, add_region_option

    p = subparsers.add_parser(
        "inpaint", help="replace a masked region with tissue synthesised by the prior (RePaint)",
        description="Inside MASK (a NIfTI label image on INPUT's grid, nonzero = replace), synthesise "
                    "tissue consistent with its surroundings with the CT prior (RePaint). Voxels "
                    "outside the mask are copied unchanged. The output is synthetic: never use it "
                    "for diagnosis.")
    p.add_argument("input", help="CT: NIfTI file, DICOM file or series folder")
    p.add_argument("--mask", required=True, help="NIfTI label image on INPUT's grid; nonzero = inpaint")
    p.add_argument("-o", "--output", required=True, help="output NIfTI (.nii.gz) on INPUT's grid")
    p.add_argument("--resample", type=int, default=DEFAULT_RESAMPLE,
                   help=f"RePaint resampling rounds per step (default {DEFAULT_RESAMPLE})")
    p.add_argument("--dilate-mm", type=float, default=0.0, help="grow the mask by this many mm first")
    p.add_argument("--plane", default="axial", choices=list(PLANE_AXIS))
    add_region_option(p)
    add_common_options(p, steps=DEFAULT_INPAINT_STEPS)
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    from .cli import finish_volume_command, prepare_volume_command, read_single_volume

    volume, options = prepare_volume_command(args)
    mask = read_single_volume(args.mask)
    result = inpaint(volume, mask, steps=args.steps, resample=args.resample, dilate_mm=args.dilate_mm,
                     plane=args.plane, model=args.model, region=args.region, options=options)
    p = result.metadata["parameters"]
    return finish_volume_command(args, result, f"{p['inpainted_voxels']} voxels inpainted, {p['seconds']} s")
