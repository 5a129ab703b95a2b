"""Pieces every task shares: input checks, model loading, slice-wise runs,
and result volumes that record where they came from.

Tasks take a :class:`~napari_mediffuse.io.Volume` (array in display
orientation (S, P, L) + affine) and return a new Volume, never modifying
their input.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from ..engine.checkpoint import Checkpoint, CheckpointError, read_card
from ..engine.control import CancelCheck, ProgressCallback, check_cancel, report
from ..engine.devices import resolve_batch_size
from ..engine.inference import NoisePredictor
from ..engine.intensity import intensity_range, normalize, denormalize
from ..engine.networks import REGIONS
from ..engine.registry import load as load_model
from ..engine.registry import resolve_checkpoint
from ..engine.runner import SliceRunner, device_of
from ..io.volume import Volume

#: Display orientation axes: index of the slice axis for each plane.
PLANE_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}
#: Voxels above this (HU) are body (or table): the CT priors' training volumes
#: are cropped to their box (``data.crop_to_body_hu``), so a slice's place in
#: the volume (the priors' third coordinate) is measured in it.
BODY_HU = -700.0


class TaskInputError(ValueError):
    """The input does not suit the task (modality, dimensions, size...)."""


@dataclass
class RunOptions:
    """Options common to every task run.

    Parameters
    ----------
    device : str
        'auto', 'cpu', 'cuda', 'mps'.
    precision : str
        'auto' (reduced precision on GPU), 'fp32', 'fp16', 'bf16'.
    seed : int or None
        Seed of every random draw; the same seed gives the same result.
    batch_size : int or None
        Slices processed together; None: 32 on a CUDA GPU where the task runs
        through the slice runner (halved while it runs out of memory), else 4
        (:func:`~..engine.devices.resolve_batch_size`).
    window : int or None
        Sliding-window size (pixels) for slices too large for memory.
    progress : callable(done, total, message), optional
    cancel : callable() -> bool, optional
    """

    device: str = "auto"
    precision: str = "auto"
    seed: Optional[int] = 0
    batch_size: Optional[int] = None
    window: Optional[int] = None
    progress: Optional[ProgressCallback] = None
    cancel: Optional[CancelCheck] = None
    extra: dict = field(default_factory=dict)


#: The grids every task accepts (issue 16 asks for at least 0.3-5 mm pixels,
#: 0.5-10 mm slices, 1-1000 slices of up to 1024 x 1024; the pixel range also
#: covers OpenKBP's 5.1 mm boxes). Outside, a task refuses before it starts:
#: memory is bounded by 1000 x 1024 x 1024 voxels (4 GB as float32).
GRID_LIMITS = {"pixel_mm": (0.2, 6.0), "slice_mm": (0.3, 12.0), "slices": 1000, "side": 1024}


def check_grid(volume: Volume, *, task: str) -> None:
    """Raise :class:`TaskInputError` naming the limit a volume's grid breaks
    (:data:`GRID_LIMITS`); any orientation, oblique included, is accepted."""
    label = f"{volume.name!r}" + (f" ({volume.source})" if volume.source else "")
    n, rows, cols = volume.data.shape[-3:]
    slice_mm, row_mm, col_mm = volume.spacing
    lo, hi = GRID_LIMITS["pixel_mm"]
    problems = []
    if not (lo <= row_mm <= hi and lo <= col_mm <= hi):
        problems.append(f"pixels of {row_mm:.3g} x {col_mm:.3g} mm (supported: {lo:g}-{hi:g} mm)")
    lo, hi = GRID_LIMITS["slice_mm"]
    if n > 1 and not lo <= slice_mm <= hi:
        problems.append(f"slices {slice_mm:.3g} mm apart (supported: {lo:g}-{hi:g} mm)")
    if n > GRID_LIMITS["slices"]:
        problems.append(f"{n} slices (supported: at most {GRID_LIMITS['slices']})")
    if max(rows, cols) > GRID_LIMITS["side"]:
        problems.append(f"slices of {rows} x {cols} pixels (supported: at most "
                        f"{GRID_LIMITS['side']} x {GRID_LIMITS['side']})")
    if problems:
        raise TaskInputError(f"{task}: {label} has {'; '.join(problems)}; nothing was written")


def require_volume(volume: Volume, *, task: str, modality: str | None = None, min_size: int = 1) -> None:
    """Raise :class:`TaskInputError` unless ``volume`` is a 3D scan of ``modality``
    on a supported grid (:func:`check_grid`)."""
    label = f"{volume.name!r}" + (f" ({volume.source})" if volume.source else "")
    if volume.data.ndim != 3:
        raise TaskInputError(f"{task} needs a 3D volume; {label} has shape {volume.data.shape}")
    if modality is not None and volume.modality != modality:
        raise TaskInputError(f"{task} needs a {modality} scan; {label} is {volume.modality}")
    if min(volume.data.shape[1:]) < min_size:
        raise TaskInputError(f"{task}: {label} is too small ({volume.data.shape}); "
                             f"slices must be at least {min_size} pixels")
    if volume.data.dtype.kind == "f" and not np.all(np.isfinite(volume.data)):
        # io.read and the panel replace them (io/validate.py); a volume built in Python may not
        raise TaskInputError(f"{task}: {label} has NaN or infinite voxels; pass it through "
                             "napari_mediffuse.io.validate.check_volume (replaces them, with a warning)")
    check_grid(volume, task=task)


def load_prior(model, options: RunOptions, *, task: str = "ct_prior", modality: str = "CT"):
    """Load a checkpoint (name, path or default) and wrap it in a predictor."""
    checkpoint: Checkpoint = load_model(model, task=task, modality=modality)
    return checkpoint, predictor_for(checkpoint, options)


def predictor_for(checkpoint: Checkpoint, options: RunOptions) -> NoisePredictor:
    """A loaded checkpoint's network on the run's device, precision and window
    (a segmentation checkpoint's returns its raw logits: no schedule to convert them by)."""
    schedule = None if checkpoint.objective == "segmentation" else checkpoint.schedule
    return NoisePredictor(checkpoint.network, device=options.device, precision=options.precision,
                          window=options.window, schedule=schedule)


def slice_offset(volume: Volume, plane: str = "axial") -> int:
    """Index in the whole scan of the volume's first ``plane`` slice (a slab cut
    along the axial axis, as the panel's preview is, starts further on)."""
    return int(volume.metadata.get("slice_offset", 0)) if PLANE_AXIS[plane] == 0 else 0


def slices_of(array: np.ndarray, plane: str) -> np.ndarray:
    """View of a (S, P, L) array as a stack of 2D slices of ``plane``."""
    return np.moveaxis(array, PLANE_AXIS[plane], 0)


def map_slices(array: np.ndarray, fn: Callable[[np.ndarray, slice], np.ndarray], *, plane: str = "axial",
               batch_size: Optional[int] = None, progress: Optional[ProgressCallback] = None,
               cancel: Optional[CancelCheck] = None, message: str = "") -> np.ndarray:
    """Apply ``fn`` to batches of 2D slices of a (S, P, L) array along ``plane``.

    ``fn(batch, index)`` gets an array (B, H, W) and the slice indices it
    covers and returns an array of the same shape. Progress is reported per
    batch; cancellation is checked between batches (and inside ``fn`` if it
    runs a sampler).
    """
    batch_size = resolve_batch_size(batch_size)  # CPU functions (BM3D, NLM): the device plays no part
    stack = slices_of(array, plane)
    out = np.empty(stack.shape, dtype=np.float32)
    n = stack.shape[0]
    for start in range(0, n, batch_size):
        check_cancel(cancel)
        index = slice(start, min(n, start + batch_size))
        out[index] = fn(np.ascontiguousarray(stack[index], dtype=np.float32), index)
        report(progress, index.stop, n, message or f"slice {index.stop}/{n}")
    return np.moveaxis(out, 0, PLANE_AXIS[plane])


class Normalizer:
    """A checkpoint's intensity rule bound to one volume (HU <-> [-1, 1])."""

    def __init__(self, rule: dict, data: np.ndarray):
        self.rule = rule
        self.range = intensity_range(data, rule)

    def forward(self, data: np.ndarray) -> np.ndarray:
        return normalize(data, self.rule, self.range)

    def inverse(self, x: np.ndarray) -> np.ndarray:
        return denormalize(x, self.range)

    @property
    def units_per_step(self) -> float:
        """Scanner units (HU) per normalised unit."""
        return (self.range[1] - self.range[0]) / 2.0


#: Network evaluations of a learned restoration model (1 = its posterior mean).
LEARNED_STEPS = 1


#: Mirrored views of a 2D image, as axes of a (B, H, W) batch to reverse:
#: as is, mirrored left-right, upside down, both. A restoration model trained
#: with those flips (its augmentation) gives an estimate for each; their mean
#: (geometric self-ensemble, Lim et al., EDSR 2017) averages out part of the
#: model's own error.
FLIP_VIEWS = ((), (2,), (1,), (1, 2))


def check_ensemble(ensemble: int, method: str, model: str) -> int:
    """The number of learned estimates a task averages, checked: at least 1,
    and other than 1 only for ``method`` 'learned' (``model`` names it in the
    message)."""
    if int(ensemble) < 1:
        raise TaskInputError(f"ensemble must be at least 1, got {ensemble}")
    if int(ensemble) != 1 and method != "learned":
        raise TaskInputError(f"ensemble (averaged estimates) applies to the {model}, not {method!r}")
    return int(ensemble)


#: ``method='auto'``: a learned model where it applies, else DiffPIR (super-resolution; denoising
#: keeps DiffPIR as its default: the learned denoiser trails BM3D on lightly noised slices,
#: docs/evaluation/clinical.md).
AUTO_METHOD = "auto"


def resolve_auto_method(model: Optional[str], *, learned_task: str,
                        domain_warnings: Callable[[dict], list[str]]) -> tuple[str, Optional[str], str]:
    """What ``method='auto'`` runs: ``('learned' or 'diffusion', model, why)``.

    A ``model`` of task ``learned_task`` runs as named. Otherwise the first
    installed ``learned_task`` model for CT runs where the scan is inside
    what it saw (``domain_warnings(card)``, :func:`~.domain.check_domain`
    for the scan, returns nothing), and DiffPIR with ``model`` (a prior, or
    ``None``: the default one) elsewhere: the panel always names a model from
    its list, whose first entry is the default prior. Reads cards only.
    """
    if model is not None:
        named = resolve_checkpoint(model, modality="CT")
        if named.task == learned_task:
            return "learned", model, f"{named.name} named"
    try:
        info = resolve_checkpoint(task=learned_task, modality="CT")
    except CheckpointError:
        return "diffusion", model, f"no {learned_task} model installed"
    outside = domain_warnings(read_card(info.path))
    if outside:
        return "diffusion", model, outside[0]
    return "learned", None, f"{info.name}, inside what it saw"


def learned_estimate(predictor, checkpoint, condition_hu: np.ndarray, norm: "Normalizer", runner, *,
                     region_class: int, noise, steps: int = LEARNED_STEPS, flip_rows: bool = False,
                     ensemble: int = 1, flips=FLIP_VIEWS[:1], progress=None, cancel=None) -> np.ndarray:
    """A learned restoration model's estimate (HU) of a batch of 2D images
    given their condition (HU, (B, H, W): the low-dose slice, the cubic
    interpolation of thick slices).

    The posterior mean for ``steps=1``, a DDIM sample for more
    (:func:`~napari_mediffuse.engine.sampling.conditional_estimate`); a
    residual model's correction is added to its condition
    (:func:`~napari_mediffuse.engine.sampling.from_residual`). ``flip_rows``
    presents the rows reversed, as the model saw coronal and sagittal planes
    (superior up).

    ``ensemble`` estimates are averaged, each from its own noise draw (the
    one-step posterior mean still varies with the noise it starts from:
    about 1.7 HU std between two draws on a 4 mm neck slice, against a 2.5 HU
    error) and each presented through the next of ``flips`` (axes to
    reverse, :data:`FLIP_VIEWS`; only flips the model was trained with, which
    the task knows) and mirrored back. Each costs one run of the model. The
    pixel coordinates the network sees are not mirrored, as in training (the
    flips came before the crop). HU outside the model's window come from the
    condition.
    """
    from ..engine.sampling import conditional_estimate, from_residual, residual_scale

    ensemble = int(ensemble)
    low, high = norm.range
    condition = norm.forward(condition_hu)
    if flip_rows:
        condition = condition[:, ::-1]
    regions = torch.full((len(condition_hu),), int(region_class), dtype=torch.long)
    residual = residual_scale(checkpoint.card) is not None

    def one_view(k, condition_t):
        def predict(x, t):
            return predictor(x, t, condition=condition_t, region=regions)

        span = None if progress is None else (
            lambda done, n, message="": progress(k * n + done, ensemble * n, message))
        x0 = conditional_estimate(predict, condition_t.shape, checkpoint.schedule, steps=steps, generator=noise,
                                  device=condition_t.device, dtype=runner.sample_dtype, progress=span,
                                  cancel=cancel, clip=None if residual else (-1.0, 1.0))
        return runner.numpy(from_residual(x0, condition_t, checkpoint.card))

    estimate = mean_over_views(condition, ensemble, flips, runner, one_view)
    if flip_rows:
        estimate = estimate[:, ::-1]
    return norm.inverse(estimate) + (condition_hu - np.clip(condition_hu, low, high))


def mean_over_views(condition: np.ndarray, ensemble: int, flips, runner, run_view) -> np.ndarray:
    """The mean of ``run_view(k, condition_t)`` (a (B, H, W) array) over
    ``ensemble`` views: view ``k`` is ``condition`` (B, H, W) mirrored
    through the next of ``flips`` and put on the runner's device; each
    result is mirrored back before it is averaged."""
    if int(ensemble) < 1:
        raise ValueError(f"ensemble must be at least 1, got {ensemble}")
    total = None
    for k in range(int(ensemble)):
        axes = tuple(flips[k % len(flips)])
        out = run_view(k, runner.tensor(np.flip(condition, axes) if axes else condition))
        out = np.flip(out, axes) if axes else out
        total = out if total is None else total + out
    return total / int(ensemble) if int(ensemble) > 1 else total


def lesion_probability(predictor, checkpoint, slice_hu: np.ndarray, norm: "Normalizer", runner, *,
                       region_class: int, ensemble: int = 1, flips=FLIP_VIEWS[:1]) -> np.ndarray:
    """A lesion segmenter's probability (float32 in [0, 1], (B, H, W)) that each
    pixel of a batch of axial slices (HU) is a lesion.

    ``ensemble`` views, each presented through the next of ``flips`` (as
    :func:`learned_estimate`) and mirrored back, are averaged as
    probabilities. Deterministic: the network sees no noise.
    """
    from ..engine.inference import segmentation_logits
    from ..engine.schedulers import complete_schedule

    regions = torch.full((len(slice_hu),), int(region_class), dtype=torch.long)
    steps = int(complete_schedule(checkpoint.schedule)["num_train_timesteps"])

    def one_view(k, condition_t):
        logits = segmentation_logits(predictor, condition_t, num_train_timesteps=steps, region=regions)
        return runner.numpy(torch.sigmoid(logits.float()))

    return mean_over_views(norm.forward(slice_hu), ensemble, flips, runner, one_view).astype(np.float32)


def learned_slices(volume: Volume, data: np.ndarray, *, task, label: str, model, options: "RunOptions",
                   steps: int = LEARNED_STEPS, ensemble: int = 1, region=None, indices=None,
                   message: str = "learned restoration"):
    """A learned model's result on axial slices of ``data``: a restoration
    model's estimate (HU), or a lesion segmenter's probability
    (:func:`lesion_probability`; card ``objective: segmentation``).

    Loads the ``task`` checkpoint ``model`` (default: the installed one;
    ``task`` may name several) on the options' device and runs it on each
    slice of ``indices`` (default: all), seeded per slice, with the flips the
    models are trained with (:func:`learned_estimate`); ``label`` names the
    user's task in the messages. Returns ``(results, checkpoint, warnings)``:
    ``results`` is stacked in the order of ``indices``; ``warnings`` are the
    domain checks of the model's card against ``volume``.
    """
    from .domain import check_domain

    checkpoint, predictor = load_prior(model, options, task=task)
    norm = Normalizer(checkpoint.normalization, data)
    region_class = region_index(region, checkpoint.card)
    runner = SliceRunner.for_predictor(predictor, options, index_offset=slice_offset(volume))
    warnings = check_domain(checkpoint.card, volume, task=label, region=region)
    segmenter = checkpoint.objective == "segmentation"

    def restore(index, noise, progress):
        if segmenter:
            return lesion_probability(predictor, checkpoint, data[index], norm, runner, region_class=region_class,
                                      ensemble=ensemble, flips=FLIP_VIEWS)
        return learned_estimate(predictor, checkpoint, data[index], norm, runner, region_class=region_class,
                                noise=noise, steps=steps, ensemble=ensemble, flips=FLIP_VIEWS,
                                progress=progress, cancel=options.cancel)

    indices = range(data.shape[0]) if indices is None else indices
    results = runner.run(indices, restore, cost=(1 if segmenter else steps) * ensemble, message=message)
    return results.astype(np.float32, copy=False), checkpoint, warnings


def result_volume(source: Volume, data: np.ndarray, *, task: str, suffix: str, params: dict,
                  affine: np.ndarray | None = None, modality: str | None = None,
                  synthetic: bool = False, model: str | None = None) -> Volume:
    """A result on the source's grid (or ``affine``), named and traced.

    The name is ``"<input> <suffix>"``; metadata records the task, its
    parameters, the model and the source, and ``synthetic`` marks generated
    images (never to be mistaken for acquired ones). The result keeps the
    source's ``layout``, so it is saved in the input's array layout.
    """
    metadata = {
        "derived_from": source.name,
        "task": task,
        "parameters": dict(params),
        "model": model,
        "synthetic": bool(synthetic),
        "warnings": [],
    }
    if "files" in source.metadata:
        metadata["files"] = source.metadata["files"]  # lets DICOM export file into the same study
    return Volume(data=data, affine=source.affine if affine is None else affine,
                  modality=modality or source.modality, name=f"{source.name} {suffix}",
                  source="", metadata=metadata, layout=source.layout)  # written like its input


def mark_out_of_domain(results, warnings: list[str]) -> None:
    """Record domain warnings (:func:`~.domain.check_domain`) on result volumes:
    in their warnings, ``metadata['out_of_domain']`` (the NIfTI description
    says it) and their names (the panel's layer names)."""
    if not warnings:
        return
    for result in results:
        result.metadata.setdefault("warnings", []).extend(warnings)
        result.metadata["out_of_domain"] = True
        if "outside the model's domain" not in result.name:
            result.name += " [outside the model's domain]"


# -- body regions ----------------------------------------------------------------

def trained_regions(card: dict) -> list[str]:
    """Body regions named in a checkpoint's training data (empty when its card
    does not record them: then any region is accepted)."""
    names = {entry.get("region") for entry in card.get("training", {}).get("data", [])
             if isinstance(entry, dict)}
    return [name for name in REGIONS if name in names]


def default_region(card: dict) -> int:
    """Body-region class for a prior: the region it was trained on when it
    was trained on one only (a demo prior), else 0 ('unknown')."""
    regions = trained_regions(card)
    return REGIONS.index(regions[0]) if len(regions) == 1 else 0


def region_index(region: str | int | None, card: dict) -> int:
    """Region class from a name ('abdomen'), an index, or None (prior's default).

    A name must be one the checkpoint was trained on, when its card says: a
    region class it never saw would condition the network on an untrained
    embedding.
    """
    if region is None or region == "":
        return default_region(card)
    if isinstance(region, int):
        return region
    if region not in REGIONS:
        raise ValueError(f"unknown body region {region!r}; choose one of {', '.join(REGIONS)}")
    trained = trained_regions(card)
    if trained and region not in trained:
        raise ValueError(f"checkpoint {card.get('name', '')!r} was trained on {', '.join(trained)} only; "
                         f"it does not know the region {region!r}")
    return REGIONS.index(region)


def bind_region(predictor, region: int):
    """``predictor(x, t)`` with the region class bound (when the network uses one);
    other keywords (``extent``) pass through."""
    def predict(x: torch.Tensor, t: int, **kwargs) -> torch.Tensor:
        return predictor(x, t, region=torch.full((x.shape[0],), int(region), dtype=torch.long), **kwargs)

    predict.device = device_of(predictor)  # where its inputs must live
    return predict


def in_crop(predictor, extent):
    """``predictor(x, t)`` on crops of larger slices: ``extent`` ``((start, full), ...)``
    per axis in pixels (see :class:`~..engine.inference.NoisePredictor`)."""
    def predict(x: torch.Tensor, t: int) -> torch.Tensor:
        return predictor(x, t, extent=extent)

    predict.device = device_of(predictor)
    return predict


# -- the slice's place in the volume (3D position of a 2D prior) -------------------

def takes_slice_position(predictor) -> bool:
    """Whether ``predictor`` (a :class:`NoisePredictor`) runs a network that
    takes each slice's place along the volume's third axis (``position_axes:
    3``). Synthesis gives it; the tasks on real scans do not (measured: it
    changes nothing there, docs/models/ct-prior-multi.md)."""
    network = getattr(predictor, "network", None)
    return bool(getattr(network, "uses_slice_position", False))
