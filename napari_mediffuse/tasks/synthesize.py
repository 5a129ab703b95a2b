"""Volume synthesis from the 2D CT prior: a coarse whole-body layout refined slice by slice.

A 2D prior samples slices independently, so stacking 2D samples gives a
volume whose neighbouring slices do not match. Without a coarse prior the
whole volume is one sample of the reverse diffusion: at every step the noise of the *volume* is
estimated slice by slice along one plane, and the plane alternates
(axial, coronal, sagittal, axial, ...). The demo prior was trained on all
three orientations, so each plane's estimate is in-distribution, and
alternating them couples every voxel to its neighbours in all three
directions (the idea of TPDM / DiffusionBlend-style "2D priors for 3D").
Whole slices are evaluated in one pass (the network is fully convolutional
and gets each pixel's coordinates); with ``RunOptions.window`` the predictor
uses overlapping sliding windows with blended noise estimates instead, so
any size works.

Alternating planes give continuity but not anatomy: the three plane views
of a 2D prior do not agree on any one body, and their consensus is tissue
without structure. So, when a coarse prior (task ``ct_prior_coarse``) is
installed, synthesis runs in two stages, as MedDiff-FM's coarse-to-fine
levels:

1. :func:`draw_coarse_layout`: the coarse prior draws the whole body (outline,
   bones, organs, gas) in one box (32^3 voxels of 12 mm for the demo), as a
   2D image whose channels are the box's axial slices;
2. :func:`place_box` resamples that box onto the output grid (both centred
   on the RAS origin; air outside the box), it is noised to the refinement
   step ``refine_from`` and the 2D prior runs from there in axial slices,
   adding the detail the coarse box cannot hold while keeping its layout
   (detail below ~ the noise level at that step is redrawn). The noise is
   correlated between neighbouring slices (``slice_correlation``), so with
   deterministic DDIM neighbouring slices get related detail: the layout and
   that correlation give the 3D coherence, and each slice stays an in-
   distribution axial draw (coronal and sagittal passes, the method until
   session 13, blurred bone and edges: HU histograms 1.5-2 times further from
   real CT; docs/evaluation/clinical.md).

Refining even a patient's own 8 mm box this way draws no vertebrae or
mandible (benchmarks/synthesis_oracle_layout.py): the unconditional prior
keeps the layout's blur or redraws the layout. So, when a detail model (task
``ct_prior_detail``) is installed for the region and the layout's voxel size,
a cascade step comes between the two (:func:`draw_detail`): a conditional 2D
model draws every axial slice at its own voxel size (4 mm) given the same
slice of the layout, from start noise correlated along S. On the detail
model's grid its draw is the result; on another grid the 2D prior refines it
from :data:`DETAIL_REFINE_FROM`.

The images are generated at the checkpoint's native pixel spacing and
resampled to the requested spacing when it differs.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..engine.control import ProgressSpan, check_cancel
from ..engine.devices import resolve_batch_size
from ..engine.checkpoint import CheckpointError
from ..engine.intensity import denormalize, intensity_range, normalize
from ..engine.registry import list_checkpoints
from ..engine.registry import load as load_model
from ..engine.runner import SliceRunner
from ..engine.sampling import (AxisCorrelatedNoise, add_noise, ddim_sample, from_residual, make_generator, randn,
                               residual_scale)
from ..engine.schedulers import alphas_cumprod
from ..io.volume import Volume, affine_from_world
from ..engine.position import body_extent, slice_coordinates
from .common import (BODY_HU, GRID_LIMITS, PLANE_AXIS, RunOptions, TaskInputError, bind_region, load_prior,
                     predictor_for, region_index, takes_slice_position)

PLANES = ("axial", "coronal", "sagittal")


def plane_stack(volume: torch.Tensor, plane: str) -> torch.Tensor:
    """(S, P, L) tensor -> (N, 1, H, W) slices shown as in training.

    Axial slices are (P, L); coronal (S, L) and sagittal (S, P) slices have
    superior at the top (row 0), as ``training.data.take_slice`` makes them.
    """
    if plane == "axial":
        stack = volume
    elif plane == "coronal":
        stack = volume.permute(1, 0, 2).flip(1)
    elif plane == "sagittal":
        stack = volume.permute(2, 0, 1).flip(1)
    else:
        raise ValueError(f"unknown plane {plane!r}; choose from {PLANES}")
    return stack.unsqueeze(1)


def volume_from_stack(stack: torch.Tensor, plane: str) -> torch.Tensor:
    """Inverse of :func:`plane_stack`."""
    stack = stack[:, 0]
    if plane == "axial":
        return stack
    if plane == "coronal":
        return stack.flip(1).permute(1, 0, 2)
    return stack.flip(1).permute(1, 2, 0)


def alternating_plane_predictor(predictor, planes=PLANES, *, batch_size: Optional[int] = None, region=None, cancel=None,
                                slice_positions: dict | None = None, condition: torch.Tensor | None = None):
    """Noise predictor for a whole (1, 1, S, P, L) volume, one plane per call.

    Calls alternate through ``planes``; each call runs ``predictor`` on the
    volume's slices of the current plane in batches. ``slice_positions``
    ({plane: (N,) array}, see :func:`volume_slice_positions`): each slice's
    place along the plane's normal, for a prior that takes it.
    ``condition`` (1, C, S, P, L): a conditional model's condition volume,
    given slice by slice with the volume's slices.
    """
    state = {"call": 0}
    batch_size = resolve_batch_size(batch_size)  # no device: this loop does not halve on running out of memory
    # the condition does not change between steps: its slices of each plane, stacked once
    condition_stacks = ({} if condition is None
                        else {plane: torch.cat([plane_stack(channel, plane) for channel in condition[0]], dim=1)
                              for plane in set(planes)})

    def predict(x: torch.Tensor, t: int) -> torch.Tensor:
        plane = planes[state["call"] % len(planes)]
        state["call"] += 1
        stack = plane_stack(x[0, 0], plane)
        conditions = condition_stacks.get(plane)
        eps = torch.empty_like(stack)
        for start in range(0, stack.shape[0], batch_size):
            check_cancel(cancel)
            chunk = stack[start:start + batch_size]
            extra = ({} if slice_positions is None
                     else {"slice_position": slice_positions[plane][start:start + batch_size]})
            if conditions is not None:
                extra["condition"] = conditions[start:start + batch_size]
            eps[start:start + batch_size] = predictor(chunk, t, region=region, **extra).to(eps.dtype)
        return volume_from_stack(eps, plane)[None, None]

    return predict


def volume_slice_positions(layout_hu: np.ndarray | None, shape) -> dict:
    """Each plane's slice positions (:func:`~..engine.position.slice_coordinates`)
    in a volume of ``shape`` (S, P, L): within the body of the coarse layout
    (HU, on the output grid; voxels above :data:`~.common.BODY_HU`, as the
    training volumes are cropped), or within the whole box without one."""
    positions = {}
    for plane in PLANES:
        axis = PLANE_AXIS[plane]
        n = shape[axis]
        extent = (0, n) if layout_hu is None else body_extent(layout_hu, axis, BODY_HU)
        positions[plane] = slice_coordinates(np.arange(n), *extent)
    return positions


#: Planes the 2D prior refines a coarse layout in (see :func:`synthesize`).
REFINE_PLANES = ("axial",)
#: Noise correlation between neighbouring axial slices when refining a coarse
#: layout slice by slice: measured with ct-prior-multi at 4 mm for 0-0.99
#: (docs/evaluation/clinical.md, synthesis): 0.97 keeps the adjacent-slice
#: differences within 1.0-1.3x real CT's in the neck and chest (0: 2.8x) with
#: HU histograms near the best of the sweep (0.9: closer in the neck, but 1.5x).
DEFAULT_SLICE_CORRELATION = 0.97

#: Step of the 1000-step schedule at which the 2D prior takes over from the
#: coarse layout (noise std 0.92 of the [-1, 1] range with the cosine schedule,
#: signal 0.38: the coarse layout survives in the low frequencies, everything
#: finer is redrawn; 450, the default until session 13, kept the coarse
#: prior's blur: HU histograms 62-96 HU from real against means of 34 and 61 now).
DEFAULT_REFINE_FROM = 750
#: Step the 2D prior refines a detail stage's volume from when the output grid
#: is not the detail model's own: the detail stage already drew the anatomy,
#: the prior adds what is finer than its voxels. Not tuned (session 23): below
#: 750, where the prior redraws everything finer than about 8 mm, which is
#: what the detail stage drew.
DETAIL_REFINE_FROM = 400


def draw_coarse_layout(checkpoint, predictor, *, region: int, steps: int, generator,
                       progress=None, cancel=None) -> np.ndarray:
    """One draw of a coarse whole-body prior, in HU.

    Parameters
    ----------
    checkpoint, predictor
        A ``ct_prior_coarse`` checkpoint and its noise predictor: a 2D
        network whose image channels are the box's axial slices, or a 3D
        network of the whole box.
    region : int
        Region class index.
    steps : int
        DDIM steps.
    generator : torch.Generator
        Seeded noise source.

    Returns
    -------
    ndarray (S, P, L)
        The box (``checkpoint.card['volume_shape']``) in HU, centred on the
        RAS origin, voxels of ``checkpoint.card['voxel_spacing_mm']``.
    """
    shape = tuple(int(n) for n in checkpoint.card["volume_shape"])
    # (1, S as channels, P, L) for a 2D network, (1, 1, S, P, L) for a 3D one
    lead = (1, 1) if getattr(predictor, "spatial_dims", 2) == 3 else (1,)
    x_T = randn(lead + shape, generator, predictor.device)
    x0 = ddim_sample(bind_region(predictor, region), x_T, checkpoint.schedule, steps=steps, generator=generator,
                     progress=progress, cancel=cancel)
    box = x0.reshape(shape)
    return denormalize(SliceRunner.host(box).numpy(), intensity_range(None, checkpoint.normalization))


def draw_detail(checkpoint, predictor, layout_hu: np.ndarray, *, region: int, steps: int, noise, eta: float = 0.0,
                batch_size: Optional[int] = None, progress=None, cancel=None) -> np.ndarray:
    """The detail stage: a conditional model (task ``ct_prior_detail``) draws
    every axial slice of a coarse layout placed on its grid.

    Parameters
    ----------
    checkpoint, predictor
        The detail checkpoint and its noise predictor.
    layout_hu : ndarray (S, P, L)
        The coarse layout on the detail model's grid (``checkpoint.card
        ['pixel_spacing_mm']`` voxels), in HU (:func:`placed_layout`).
    region : int
        Region class index.
    steps : int
        DDIM steps from pure noise.
    noise : torch.Generator or AxisCorrelatedNoise
        The start noise of the whole volume (correlated along S, so that
        neighbouring slices get related detail), and with ``eta`` > 0 each
        step's.
    eta : float
        0 = deterministic DDIM, 1 = ancestral.

    Returns
    -------
    ndarray (S, P, L)
        The detailed volume in HU, on the layout's grid.
    """
    hu_range = intensity_range(None, checkpoint.normalization)
    condition = normalize(np.asarray(layout_hu, dtype=np.float32), checkpoint.normalization, hu_range)
    condition = torch.from_numpy(np.ascontiguousarray(condition))[None, None].to(predictor.device)
    predict = alternating_plane_predictor(predictor, ("axial",), batch_size=batch_size, region=region,
                                          cancel=cancel, condition=condition)
    x_T = randn((1, 1) + tuple(layout_hu.shape), noise, predictor.device)
    n_train = len(alphas_cumprod(checkpoint.schedule))
    residual = residual_scale(checkpoint.card) is not None
    x0 = ddim_sample(predict, x_T, checkpoint.schedule, steps=max(1, int(steps)), t_start=n_train - 1, eta=eta,
                     generator=noise, clip=None if residual else (-1.0, 1.0), progress=progress, cancel=cancel)
    x0 = from_residual(x0, condition, checkpoint.card).clamp(-1.0, 1.0)
    return denormalize(SliceRunner.host(x0[0, 0]).numpy(), hu_range)


def check_layout(layout) -> tuple:
    """``(box_hu, voxel_mm)`` of a given coarse layout, checked (see :func:`synthesize`)."""
    try:
        box_hu, voxel_mm = layout
        box_hu, voxel_mm = np.asarray(box_hu, dtype=np.float32), float(voxel_mm)
    except (TypeError, ValueError) as exc:
        raise TaskInputError(f"layout must be (box in HU, voxel size in mm): {exc}") from exc
    if box_hu.ndim != 3 or min(box_hu.shape) < 2:
        raise TaskInputError(f"layout must be a 3D box of at least 2 voxels a side, got shape {box_hu.shape}")
    if not np.isfinite(box_hu).all() or not (np.isfinite(voxel_mm) and voxel_mm > 0):
        raise TaskInputError("layout must hold finite HU and a positive voxel size in mm")
    return box_hu, voxel_mm


def place_box(box: np.ndarray, box_spacing, shape, spacing, *, fill: float,
              mode: str = "constant") -> np.ndarray:
    """Resample a box centred on the origin onto a grid centred on the origin.

    Both are in display orientation (S, P, L) with axis-aligned voxels, so the
    map is a per-axis scale and shift: output voxel ``i`` lies at
    ``(i - (n - 1) / 2) * spacing`` mm. Linear interpolation; ``fill``
    (air) outside the box, or with ``mode='nearest'`` the box's edge values
    (a volume cut from a longer scan continues beyond its edges).
    """
    box_spacing = np.asarray(box_spacing, dtype=float)
    spacing = np.asarray(spacing, dtype=float)
    scale = spacing / box_spacing
    offset = (np.asarray(box.shape) - 1) / 2.0 - scale * (np.asarray(shape) - 1) / 2.0
    return ndimage.affine_transform(np.asarray(box, dtype=np.float32), scale, offset=offset,
                                    output_shape=tuple(shape), order=1, mode=mode, cval=fill)


def covering_shape(shape, spacing, voxel_mm: float) -> tuple:
    """Voxels of ``voxel_mm`` (isotropic) of a grid centred as one of
    ``shape`` x ``spacing`` mm that covers it: its outermost voxel centres lie
    at or beyond the other grid's, so resampling between the two (linear,
    :func:`place_box`) never reads outside the source and fills no edge voxel
    with air. The same shape when the voxel sizes are equal."""
    spacing = np.broadcast_to(np.asarray(spacing, dtype=float), (len(shape),))
    return tuple(int(np.ceil((n - 1) * s / voxel_mm - 1e-6)) + 1 for n, s in zip(shape, spacing))


def placed_layout(box_hu: np.ndarray, box_spacing, shape, voxel_mm: float, checkpoint) -> np.ndarray:
    """A coarse box placed on the (isotropic ``voxel_mm``) grid of ``shape``,
    in HU, with ``checkpoint``'s air outside the box."""
    hu_range = intensity_range(None, checkpoint.normalization)
    return place_box(box_hu, box_spacing, shape, (voxel_mm,) * 3, fill=hu_range[0])


def noised_layout(layout_hu: np.ndarray, checkpoint, t: int, generator, device) -> torch.Tensor:
    """The 2D stage's start: a placed layout (:func:`placed_layout`) in
    ``checkpoint``'s normalised units, noised to step ``t`` of its schedule:
    (1, 1, S, P, L)."""
    layout = normalize(layout_hu, checkpoint.normalization, intensity_range(None, checkpoint.normalization))
    x0 = torch.from_numpy(layout)[None, None].to(device=device, dtype=torch.float32)
    return add_noise(x0, t, alphas_cumprod(checkpoint.schedule), generator)


def resolve_stage_model(model, task: str, region: str, *, label: str, fits=None):
    """The checkpoint of a synthesis stage (``task``) and its class for
    ``region``: ``'auto'`` = the first installed checkpoint of ``task`` trained
    on ``region`` (or recording no regions) for which ``fits(card)`` holds
    (none: no such stage, so a head-and-neck volume is not drawn with an
    abdomen's model), ``None``/``'none'`` = none, otherwise a name or folder
    (which must exist and know the region). Returns ``(checkpoint,
    region_class)`` or ``(None, None)``."""
    from ..engine.checkpoint import read_card
    from .common import trained_regions

    if model is None or str(model).lower() == "none":
        return None, None
    if str(model).lower() == "auto":
        for info in list_checkpoints(task=task, modality="CT"):
            card = read_card(info.path)
            trained = trained_regions(card)
            if (not region or not trained or region in trained) and (fits is None or fits(card)):
                model = info.path
                break
        else:
            return None, None
    try:
        checkpoint = load_model(model, task=task, modality="CT")
    except CheckpointError as exc:
        raise TaskInputError(f"{label}: {exc}") from exc
    try:
        return checkpoint, region_index(region, checkpoint.card)
    except ValueError as exc:
        raise TaskInputError(f"{label}: {exc}") from exc


def resolve_coarse_prior(coarse_model, region: str):
    """The coarse prior (task ``ct_prior_coarse``) and its class for ``region``
    (:func:`resolve_stage_model`)."""
    return resolve_stage_model(coarse_model, "ct_prior_coarse", region, label="coarse prior")


#: Gaussian sigma of a coarse box's low-pass filter, per voxel of the box
#: (training.data.resample_isotropic made the coarse priors' boxes with it,
#: training.layout_detail.coarse_view the detail stage's layouts).
LAYOUT_SIGMA_PER_VOXEL = 0.4


def coarsest_layout_mm(card: dict) -> Optional[float]:
    """The coarsest layout voxel (mm) a detail model (its card) learnt to detail.

    It learnt layouts of ``coarse_voxel_mm`` voxels, each blurred further by a
    Gaussian of sigma up to ``layout_blur_mm`` (training's
    ``condition_blur_mm``): as blurred as a box of voxels up to
    sqrt(c^2 + (b / 0.4)^2) mm (sigmas add in quadrature). ``None`` when the
    card records no ``coarse_voxel_mm``."""
    trained_mm = card.get("coarse_voxel_mm")
    if trained_mm is None:
        return None
    blur_mm = float(card.get("layout_blur_mm") or 0.0)
    return math.hypot(float(trained_mm), blur_mm / LAYOUT_SIGMA_PER_VOXEL)


def fits_layout(card: dict, layout_mm: float) -> bool:
    """Whether a detail model (its card) learnt layouts of ``layout_mm`` voxels:
    from its ``coarse_voxel_mm`` (within 1 %) to :func:`coarsest_layout_mm`."""
    trained_mm = card.get("coarse_voxel_mm")
    if trained_mm is None:
        return False
    return 0.99 * float(trained_mm) <= float(layout_mm) <= 1.01 * coarsest_layout_mm(card)


def resolve_detail_model(detail_model, region: str, layout_mm: float):
    """The detail stage (task ``ct_prior_detail``) and its class for
    ``region`` (:func:`resolve_stage_model`); ``'auto'`` takes only a model
    trained from layouts of ``layout_mm`` voxels (card ``coarse_voxel_mm``),
    since a layout of another voxel size is not what it learnt to detail."""
    checkpoint, region_class = resolve_stage_model(detail_model, "ct_prior_detail", region, label="detail stage",
                                                   fits=lambda card: fits_layout(card, layout_mm))
    if checkpoint is not None and not checkpoint.card.get("pixel_spacing_mm"):
        raise TaskInputError(f"detail stage: {checkpoint.name} records no pixel_spacing_mm: the voxel size it "
                             "draws at is not known")
    return checkpoint, region_class


def synthesis_affine(shape, spacing) -> np.ndarray:
    """Display-orientation (S, P, L) affine whose volume centre is the RAS origin."""
    affine = affine_from_world(spacing, (0.0, 0.0, 0.0))
    centre = (np.asarray(shape, dtype=float) - 1) / 2.0
    affine[:3, 3] = -affine[:3, :3] @ centre
    return affine


#: Voxel size (mm) a multi-resolution prior generates at when no spacing is
#: asked for: the demo prior's, so a default-sized volume (e.g. 64 x 101 x
#: 122 voxels) still holds a whole abdomen, not a 10 cm block of it.
DEFAULT_SPACING_MM = 3.0


def generation_spacing(card: dict, spacing=None) -> float:
    """The voxel size (mm) the prior generates at: its pixel spacing, or for a
    multi-resolution prior (a pixel-size range in its domain, no single
    spacing) the requested spacing's finest axis brought into that range
    (:data:`DEFAULT_SPACING_MM` when none is requested), so a 4 mm box is
    drawn at 4 mm, not at 64 times the voxels."""
    if card.get("pixel_spacing_mm"):
        return float(card["pixel_spacing_mm"][0])
    low, high = (card.get("domain") or {}).get("pixel_spacing_mm") or (1.0, 1.0)
    wanted = min(spacing) if spacing else DEFAULT_SPACING_MM
    return float(min(max(wanted, float(low)), float(high)))


def synthesize(shape, *, spacing=None, region: str = "abdomen", model=None, steps: int = 50,
               planes=None, eta: float = 0.0, coarse_model="auto", refine_from: int | None = None,
               slice_correlation: float | None = None, layout=None, detail_model="auto",
               options: RunOptions | None = None) -> Volume:
    """Generate a CT volume (HU) from the CT prior.

    Parameters
    ----------
    shape : (int, int, int)
        Output voxels along (S, P, L): slices, rows, columns.
    spacing : (float, float, float), optional
        Output voxel spacing in mm; by default the checkpoint's native pixel
        spacing (isotropic), or 3 mm for a multi-resolution prior
        (:func:`generation_spacing`).
    region : str
        Body region the sample should show (``'abdomen'``, ``'chest'``,
        ``'head-neck'`` or ``'unknown'``), if the checkpoint is
        region-conditioned.
    model : str, optional
        Checkpoint name or folder; the default CT prior otherwise.
    steps : int
        DDIM steps (network evaluations over the whole volume).
    planes : sequence of str, optional
        Planes alternated at successive steps. Default: axial only when a
        coarse layout is refined (:data:`REFINE_PLANES`: the layout and the
        slice-correlated noise give the 3D coherence; coronal and sagittal
        passes blur bone and edges), all three from noise (:data:`PLANES`).
    eta : float
        0 = deterministic DDIM from the seeded noise; 1 = ancestral.
    coarse_model : str or None
        Coarse whole-body prior for the layout (first stage): ``'auto'``
        (default) uses the installed ``ct_prior_coarse`` checkpoint if there
        is one, ``None`` or ``'none'`` samples from noise with the 2D prior
        alone, or a checkpoint name or folder.
    refine_from : int, optional
        Diffusion step (of the schedule's 1000) at which the 2D prior starts
        from the noised coarse layout (:data:`DEFAULT_REFINE_FROM`; after a
        detail stage :data:`DETAIL_REFINE_FROM`); higher redraws more. The
        2D stage then runs ``steps * refine_from / 1000`` DDIM steps (at
        least 2).
    slice_correlation : float, optional
        Correlation in [0, 1) of the 2D stage's noise between neighbouring
        axial slices (:class:`~..engine.sampling.AxisCorrelatedNoise`).
        Default: :data:`DEFAULT_SLICE_CORRELATION` when a coarse layout is
        refined, 0 (independent) from noise.
    layout : (ndarray, float), optional
        ``(box_hu, voxel_mm)``: a coarse layout to refine instead of drawing
        one (``coarse_model`` is then not used): a box (S, P, L) in HU centred
        on the origin, of isotropic ``voxel_mm`` voxels, as
        :func:`draw_coarse_layout` returns. E.g. a real scan resampled, to
        measure what the 2D stage makes of a layout as good as a patient's.
    detail_model : str or None
        Detail stage after the coarse layout (task ``ct_prior_detail``: a
        conditional model drawing each axial slice at its own voxel size, 4 mm,
        from the layout): ``'auto'`` (default) uses an installed one trained
        on ``region`` from layouts of the layout's voxel size, ``None`` or
        ``'none'`` refines the layout with the 2D prior alone, or a
        checkpoint name or folder (a warning in the metadata when it learnt
        layouts of another voxel size). On the detail model's own grid its
        draw is the result (``refine_from`` is then not used: a warning says
        so); on another grid the 2D prior refines it from ``refine_from``
        (default :data:`DETAIL_REFINE_FROM`). Not used without a layout.
    options : RunOptions
        Device, seed, batch size, progress and cancel.

    Returns
    -------
    Volume
        HU values, marked synthetic, with an affine centred on the origin.
    """
    options = options or RunOptions()
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise TaskInputError(f"synthesis needs a 3D shape (slices, rows, columns), got {shape}")
    if shape[0] > GRID_LIMITS["slices"] or max(shape[1:]) > GRID_LIMITS["side"]:
        raise TaskInputError(f"synthesis: shape {shape} is too large (supported: at most "
                             f"{GRID_LIMITS['slices']} slices of {GRID_LIMITS['side']} x {GRID_LIMITS['side']})")
    if isinstance(planes, str):
        planes = (planes,)
    if planes is not None and (not planes or any(plane not in PLANES for plane in planes)):
        raise TaskInputError(f"planes must be a non-empty sequence of {', '.join(PLANES)}; got {tuple(planes)!r}")
    if slice_correlation is not None and not 0.0 <= float(slice_correlation) < 1.0:
        raise TaskInputError(f"slice_correlation must be in [0, 1), got {slice_correlation}")
    if not 0.0 <= float(eta) <= 1.0:
        raise TaskInputError(f"eta must be in [0, 1], got {eta}")
    if layout is not None:  # checked before any model is loaded
        box_hu, box_mm = check_layout(layout)
    checkpoint, predictor = load_prior(model, options)
    card = checkpoint.card
    patch = int((card.get("patch_size") or [1])[0])
    spacing = None if spacing is None else tuple(float(s) for s in spacing)
    if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
        raise TaskInputError(f"spacing must be three positive numbers in mm, got {spacing}")
    native = generation_spacing(card, spacing)
    spacing = (native,) * 3 if spacing is None else spacing
    try:
        region_class = region_index(region, card)
    except ValueError as exc:
        raise TaskInputError(str(exc)) from exc
    # generate at the prior's native spacing, then resample
    native_shape = tuple(max(1, int(round(n * s / native))) for n, s in zip(shape, spacing))
    if min(native_shape) < patch:
        raise TaskInputError(
            f"shape {shape} at {spacing} mm is {native_shape} voxels at the model's {native:g} mm; "
            f"every side must be at least the model's patch size ({patch} voxels = {patch * native:g} mm)")

    if layout is not None:
        coarse, coarse_region = None, None
    else:
        coarse, coarse_region = resolve_coarse_prior(coarse_model, region)
    refining = layout is not None or coarse is not None
    if coarse is not None:
        box_mm = float(coarse.card["voxel_spacing_mm"][0])
    # the detail stage (a cascade step after the coarse layout), checked before anything is drawn
    detail, detail_region = resolve_detail_model(detail_model, region, box_mm) if refining else (None, None)
    # the defaults depend on whether a coarse layout is refined
    planes = tuple(planes) if planes is not None else (REFINE_PLANES if refining else PLANES)
    if slice_correlation is None:
        slice_correlation = DEFAULT_SLICE_CORRELATION if refining else 0.0

    started = time.monotonic()
    gen = make_generator(options.seed)
    n_train = int(checkpoint.schedule["num_train_timesteps"])
    # the later stages' noise (start and, with eta > 0, every step): correlated
    # along S; the coarse prior's own draw keeps the plain generator
    fine_noise = AxisCorrelatedNoise(gen, float(slice_correlation), axis=-3) if slice_correlation else gen
    detail_mm = float(detail.card["pixel_spacing_mm"][0]) if detail is not None else None
    detail_shape = None if detail is None else covering_shape(native_shape, native, detail_mm)
    # the detail stage's volume is the result when it is drawn at the output's native voxel size
    # (its grid is then the native grid: covering_shape of equal voxels is the same shape)
    detail_is_final = detail is not None and abs(detail_mm - native) < 1e-6
    warnings = []
    if detail is not None and not fits_layout(detail.card, box_mm):
        trained_mm, coarsest_mm = detail.card.get("coarse_voxel_mm"), coarsest_layout_mm(detail.card)
        learnt = (f"{trained_mm:g}" if coarsest_mm is None or coarsest_mm <= 1.01 * trained_mm
                  else f"{trained_mm:g} to {coarsest_mm:.3g}") if trained_mm is not None else "unknown"
        warnings.append(f"detail stage {detail.name} learnt layouts of {learnt} mm voxels, not {box_mm:g} mm")
    if detail_is_final and refine_from is not None:
        warnings.append(f"refine_from {refine_from} not used: the detail stage's {detail_mm:g} mm draw is the "
                        "result on this grid")
    if not refining:
        t_start, fine_steps, coarse_steps, detail_steps = None, steps, 0, 0
        layout_hu = None
        x_t = randn((1, 1) + native_shape, fine_noise, predictor.device)
    else:
        default_from = DEFAULT_REFINE_FROM if detail is None else DETAIL_REFINE_FROM
        t_start = default_from if refine_from is None else int(refine_from)
        if not 1 <= t_start < n_train:
            raise TaskInputError(f"refine_from must be a step in [1, {n_train - 1}], got {t_start}")
        fine_steps = 0 if detail_is_final else max(2, round(steps * t_start / n_train))
        coarse_steps = 0 if coarse is None else steps
        detail_steps = 0 if detail is None else steps
        total = coarse_steps + detail_steps + fine_steps
        if coarse is not None:
            box_hu = draw_coarse_layout(coarse, predictor_for(coarse, options),
                                        region=coarse_region, steps=coarse_steps,
                                        generator=gen, cancel=options.cancel,
                                        progress=ProgressSpan(options.progress, 0, total, "coarse layout"))
        if detail is not None:
            box_hu = draw_detail(detail, predictor_for(detail, options),
                                 placed_layout(box_hu, box_mm, detail_shape, detail_mm, detail),
                                 region=detail_region, steps=detail_steps, noise=fine_noise, eta=eta,
                                 batch_size=options.batch_size, cancel=options.cancel,
                                 progress=ProgressSpan(options.progress, coarse_steps, total, "detail"))
            box_mm = detail_mm
        layout_hu = placed_layout(box_hu, box_mm, native_shape, native, checkpoint)
        if not detail_is_final:
            x_t = noised_layout(layout_hu, checkpoint, t_start, fine_noise, predictor.device)
    # a prior with the 3D position learns where in the body each slice lies
    positions = volume_slice_positions(layout_hu, native_shape) if takes_slice_position(predictor) else None
    hu_range = intensity_range(None, checkpoint.normalization)
    if detail_is_final:
        x0 = torch.from_numpy(normalize(layout_hu, checkpoint.normalization, hu_range))[None, None]
    else:
        predict = alternating_plane_predictor(predictor, planes, batch_size=options.batch_size,
                                              region=region_class, cancel=options.cancel, slice_positions=positions)
        start = coarse_steps + detail_steps
        x0 = ddim_sample(predict, x_t, checkpoint.schedule, steps=fine_steps, t_start=t_start, eta=eta,
                         generator=fine_noise, cancel=options.cancel,
                         progress=ProgressSpan(options.progress, start, start + fine_steps, "synthesis"))
    if native_shape != shape:
        x0 = F.interpolate(x0, size=shape, mode="trilinear", align_corners=True)
    hu = denormalize(SliceRunner.host(x0[0, 0]).numpy(), hu_range)
    params = {"shape": list(shape), "spacing_mm": list(spacing), "region": region, "steps": steps,
              "planes": None if detail_is_final else list(planes), "slice_correlation": float(slice_correlation), "eta": float(eta),
              "seed": options.seed,
              "coarse_model": "given layout" if layout is not None else None if coarse is None else coarse.name,
              "detail_model": None if detail is None else detail.name,
              "refine_from": None if detail_is_final else t_start,
              "refine_steps": fine_steps if refining and not detail_is_final else None,
              "slice_positions": positions is not None and not detail_is_final,
              "seconds": round(time.monotonic() - started, 1)}
    return Volume(
        data=hu.astype(np.float32), affine=synthesis_affine(shape, spacing), modality="CT",
        name=f"synthetic CT ({region}, seed {options.seed})", source="",
        metadata={"task": "synthesize", "synthetic": True, "parameters": params,
                  "model": checkpoint.name, "warnings": warnings},
    )


def add_command(subparsers) -> None:
    from .cli import add_common_options, check_output_free, cli_progress, options_from_args

    p = subparsers.add_parser("synthesize", help="generate a 3D-coherent synthetic CT volume (HU)")
    p.add_argument("-o", "--output", required=True, help="output NIfTI file")
    p.add_argument("--shape", type=int, nargs=3, required=True, metavar=("Z", "Y", "X"),
                   help="voxels along superior, posterior, left")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("DZ", "DY", "DX"),
                   help="voxel spacing in mm (default: the model's own; 3 mm for a prior trained at several pixel sizes)")
    p.add_argument("--region", default="abdomen", help="body region (abdomen, chest, head-neck, unknown)")
    p.add_argument("--coarse-model", default="auto", metavar="NAME|FOLDER|none",
                   help="coarse whole-body prior drawing the layout first (default: the installed one, if any; "
                        "'none': the 2D prior alone)")
    p.add_argument("--detail-model", default="auto", metavar="NAME|FOLDER|none",
                   help="detail stage drawing 4 mm axial slices from the coarse layout (default: an installed one "
                        "for the region and the layout's voxel size, if any; 'none': the 2D prior refines the "
                        "layout itself)")
    p.add_argument("--refine-from", type=int, default=None, metavar="T",
                   help=f"step (of 1000) at which the 2D prior refines the coarse layout "
                        f"(default {DEFAULT_REFINE_FROM}, {DETAIL_REFINE_FROM} after a detail stage; higher "
                        "redraws more)")
    p.add_argument("--planes", nargs="+", choices=PLANES, default=None,
                   help="planes the 2D prior alternates (default: axial when refining a coarse layout, all three "
                        "from noise)")
    p.add_argument("--slice-correlation", type=float, default=None, metavar="RHO",
                   help=f"noise correlation of neighbouring axial slices, in [0, 1) (default {DEFAULT_SLICE_CORRELATION} "
                        "when refining a coarse layout, 0 from noise)")
    p.add_argument("--eta", type=float, default=0.0,
                   help="0 = deterministic DDIM (default), 1 = ancestral: fresh (slice-correlated) noise at each step")
    add_common_options(p, steps=50)

    def run(args) -> int:
        from .. import io

        check_output_free(args.output, args.overwrite)
        options = options_from_args(args, progress=cli_progress(args.verbose))
        volume = synthesize(args.shape, spacing=args.spacing, region=args.region, model=args.model,
                            steps=args.steps, coarse_model=args.coarse_model, refine_from=args.refine_from,
                            planes=args.planes, slice_correlation=args.slice_correlation, eta=args.eta,
                            detail_model=args.detail_model, options=options)
        io.write_nifti(volume, args.output, overwrite=args.overwrite)
        print(f"wrote {args.output}")
        return 0

    p.set_defaults(func=run)
