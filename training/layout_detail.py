"""Training data for the detail stage of volume synthesis (task ``ct_prior_detail``).

Synthesis draws a coarse whole-body layout (``ct-prior-coarse-multi``: 8 mm
voxels) and then needs the detail that an 8 mm box cannot hold: vertebrae,
mandible, airway walls, fat planes. Refining the layout with the
unconditional 2D prior (SDEdit from a noised layout) draws none of it, even
from a patient's own 8 mm box (benchmarks/synthesis_oracle_layout.py). The
detail stage is a cascade step instead (as in cascaded diffusion models): a
conditional 2D model that draws a fine axial slice given the same slice of
the coarse layout placed on the fine grid.

Pairs are made from real CT resampled to ``spacing_mm`` (e.g. 4 mm;
``data.kind: layout_detail``): the condition is the volume as the coarse
prior sees it, made by the task's own resampling
(:func:`coarse_view`: low-pass, onto a grid of ``coarse_mm`` voxels centred
as the coarse prior's box, and back with
:func:`~napari_mediffuse.tasks.synthesize.place_box`), the image is the
fine slice, or with ``residual_scale`` s the correction ``s (fine -
condition)``. A sample is a ``patch_size`` crop of an axial slice and its
condition; the condition is blurred a little more at random
(``condition_blur_mm``), because a coarse prior's draw is softer than a real
box.
"""
from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from napari_mediffuse.tasks.synthesize import LAYOUT_SIGMA_PER_VOXEL, covering_shape, place_box

from .data import (RestorationCrops, TrainingVolume, load_volumes, restoration_sample, stacked_patch,
                   volume_probabilities)

log = logging.getLogger(__name__)


def coarse_view(volume: np.ndarray, spacing_mm, coarse_mm: float, *, fill: float = -1.0) -> np.ndarray:
    """``volume`` as a coarse prior with ``coarse_mm`` voxels holds it, back on its own grid.

    Low-pass filtered (a Gaussian of 0.4 x the zoom-out factor, the rule of
    :func:`training.data.resample_isotropic`, which made the coarse prior's
    training boxes from the native scans: this condition, made from the
    4 mm volume, is a little softer), resampled onto isotropic ``coarse_mm``
    voxels centred on the volume's centre and covering it
    (:func:`~napari_mediffuse.tasks.synthesize.covering_shape`), and placed
    back onto the volume's grid by linear interpolation (what the synthesis
    task does with a drawn box).

    Parameters
    ----------
    volume : ndarray (S, P, L)
        Any intensity units; ``fill`` (air) outside.
    spacing_mm : (float, float, float)
        Voxel size of ``volume`` (mm).
    coarse_mm : float
        Voxel size of the coarse box (mm).
    """
    spacing = np.asarray(spacing_mm, dtype=float)
    coarse_shape = covering_shape(volume.shape, spacing, coarse_mm)
    smooth = ndimage.gaussian_filter(np.asarray(volume, dtype=np.float32),
                                     LAYOUT_SIGMA_PER_VOXEL * coarse_mm / spacing, mode="nearest")
    # the box covers the volume (its outer voxels lie beyond it): a scan cut through the body continues there
    box = place_box(smooth, spacing, coarse_shape, (coarse_mm,) * 3, fill=fill, mode="nearest")
    return place_box(box, (coarse_mm,) * 3, volume.shape, spacing, fill=fill)


class LayoutDetailSlices(RestorationCrops):
    """Endless stream of (fine axial slice, coarse-layout slice) crops (see module docstring).

    Parameters
    ----------
    volumes : list of TrainingVolume
        Normalised CT at ``spacing_mm`` isotropic, cropped to the body.
    data_config : dict
        ``coarse_mm``, ``patch_size``, ``residual_scale`` (optional),
        ``condition_blur_mm`` (largest extra blur of the condition, Gaussian
        sigma in mm; optional), ``region_weights`` (optional), ``augment``
        (left-right flips).
    part : {'train', 'val'}
        The training volumes, or the validation volumes (no augmentation).
    """

    def __init__(self, volumes: list[TrainingVolume], data_config: dict, *, seed: int = 0, rank: int = 0,
                 part: str = "train"):
        super().__init__(data_config, seed=seed, rank=rank, part=part)
        self.blur_mm = float(data_config.get("condition_blur_mm") or 0.0) if part == "train" else 0.0
        coarse_mm = float(data_config["coarse_mm"])
        self.volumes = volumes
        self.layouts = [coarse_view(v.data, v.spacing_mm, coarse_mm) for v in volumes]
        self.volume_p = volume_probabilities([v.data.shape[0] for v in volumes], [v.region for v in volumes],
                                             data_config.get("region_weights"))
        log.info("%s: %d volumes for the detail stage (coarse %g mm)", part, len(volumes), coarse_mm)

    def sample(self, rng: np.random.Generator, augment=None) -> dict:
        k = int(rng.choice(len(self.volumes), p=self.volume_p))
        volume = self.volumes[k]
        index = int(rng.integers(volume.data.shape[0]))
        fine, layout = volume.data[index], self.layouts[k][index]
        if self.blur_mm:
            sigma_px = rng.uniform(0.0, self.blur_mm) / float(volume.spacing_mm[1])
            layout = ndimage.gaussian_filter(layout, sigma_px, mode="nearest")
        both = np.stack([fine, layout])
        if augment is not None and rng.random() < 0.5:
            both = both[:, :, ::-1]
        crop, coords = stacked_patch(both, self.patch, rng)
        return restoration_sample(crop, coords, volume.region, self.residual_scale)


def make_datasets(config: dict, *, seed: int = 0, rank: int = 0, start_step: int = 0):
    """(train, validation) streams of a ``data.kind: layout_detail`` config
    (validation: the ``data.validation`` patients)."""
    data = config["data"]
    if not data.get("spacing_mm"):
        raise ValueError("data.kind layout_detail needs spacing_mm: the fine voxel size the stage draws at")
    if float(data["coarse_mm"]) <= float(data["spacing_mm"]):
        raise ValueError(f"data.coarse_mm ({data['coarse_mm']}) must be coarser than spacing_mm "
                         f"({data['spacing_mm']})")
    train = LayoutDetailSlices(load_volumes(data, config["normalization"]), data, seed=seed, rank=rank)
    train.start_step = start_step
    validation = load_volumes(data, config["normalization"], split="validation" if data.get("validation")
                              else "train")
    return train, LayoutDetailSlices(validation, data, seed=seed, part="val")
