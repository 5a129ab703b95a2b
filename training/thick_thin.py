"""Training data for the learned thick -> thin super-resolution model.

Pairs are made from real thin-slice CT (``data.kind: thick_thin``): for a
factor ``k`` the thin volume's slices are averaged over slabs of ``k``
(:meth:`~napari_mediffuse.tasks.diffpir.SlabOperator.slab_average`, the
same slab model as :func:`training.degrade.simulate_thick_slices` and the
task) and the thick slices are interpolated back onto the thin grid with the
task's cubic spline (:func:`~napari_mediffuse.tasks.baselines.cubic_along`).
A sample is a coronal or sagittal plane patch (the slice axis in-plane,
superior up, as the task presents it): the thin truth is the image, the
cubic interpolation the condition, with the patch's coordinates in the plane
and the volume's region. With ``residual_scale`` s the image is
``s (truth - condition)`` instead: the model generates a correction of the
interpolation (the card records s; the task adds it back).

The thin volumes keep their own voxel size (the task runs on the scan's own
grid). A volume's most superior ``holdout_fraction`` of slices is never
drawn for training; the validation loss is computed on it, and the
evaluation (``python -m training.evaluate sr``) scores inside it.
"""
from __future__ import annotations

import logging

import numpy as np

from napari_mediffuse.tasks.baselines import cubic_along
from napari_mediffuse.tasks.diffpir import SlabOperator

from .data import (RestorationCrops, TrainingVolume, load_volumes, restoration_sample, stacked_patch, take_slice,
                   volume_probabilities)

log = logging.getLogger(__name__)

PLANES = ("coronal", "sagittal")


def thick_and_cubic(thin: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """``(thin[:n k], cubic)``: the thin slices the slabs cover and the cubic
    interpolation of their slab averages onto the same grid (axis 0)."""
    n_thick = thin.shape[0] // factor
    if n_thick < 2:
        raise ValueError(f"{thin.shape[0]} slices give fewer than 2 slabs of {factor}")
    covered = np.ascontiguousarray(thin[: n_thick * factor], dtype=np.float32)
    thick = SlabOperator.slab_average(n_thick, factor).forward(covered, axis=0).astype(np.float32)
    return covered, cubic_along(thick, factor, axis=0)


def factors_for(spacing_mm: float, factors, max_thick_mm: float) -> list[int]:
    """The factors whose thick slices (``k x spacing``) are at most ``max_thick_mm``."""
    return [int(k) for k in factors if int(k) * spacing_mm <= max_thick_mm + 1e-6]


class ThickThinPlanes(RestorationCrops):
    """Endless stream of (thin truth, cubic condition) plane patches (see module docstring).

    Parameters
    ----------
    volumes : list of TrainingVolume
        Normalised thin-slice CT at its own voxel size.
    data_config : dict
        ``patch_size``, ``factors`` (e.g. [2, 3, 4, 5]), ``max_thick_mm``
        (thickest slab drawn, mm), ``region_weights`` (optional).
    part : {'train', 'val'}
        The training part of each volume or its held-out superior block.
    """

    def __init__(self, volumes: list[TrainingVolume], data_config: dict, *, seed: int = 0, rank: int = 0,
                 part: str = "train"):
        super().__init__(data_config, seed=seed, rank=rank, part=part)
        max_thick = float(data_config.get("max_thick_mm", 6.0))
        self.pairs = []  # (volume index, factor, thin, cubic)
        for i, volume in enumerate(volumes):
            array = volume.train_part() if part == "train" else volume.holdout_part()
            for k in factors_for(float(volume.spacing_mm[0]), data_config.get("factors", [2, 3, 4, 5]), max_thick):
                if array.shape[0] // k < 2:
                    continue
                thin, cubic = thick_and_cubic(array, k)
                self.pairs.append((i, k, thin, cubic))
        if not self.pairs:
            raise ValueError(f"no {part} thick/thin pairs: volumes too short for the factors")
        self.volumes = volumes
        # a volume by its size (or region weights), then one of its factors uniformly
        per_volume = volume_probabilities([volumes[i].data.size for i in range(len(volumes))],
                                          [v.region for v in volumes], data_config.get("region_weights"))
        counts = np.bincount([i for i, *_ in self.pairs], minlength=len(volumes))
        p = np.array([per_volume[i] / counts[i] for i, *_ in self.pairs])
        self.pair_p = p / p.sum()
        log.info("%s thick/thin pairs: %s", part,
                 ", ".join(f"{volumes[i].patient or i} x{k}" for i, k, *_ in self.pairs))

    def sample(self, rng: np.random.Generator, augment=None) -> dict:
        i, k, thin, cubic = self.pairs[int(rng.choice(len(self.pairs), p=self.pair_p))]
        plane = PLANES[int(rng.integers(len(PLANES)))]
        axis = 1 if plane == "coronal" else 2
        index = int(rng.integers(thin.shape[axis]))
        truth, condition = take_slice(thin, plane, index), take_slice(cubic, plane, index)
        both = np.stack([truth, condition])
        if augment is not None and rng.random() < 0.5:
            both = both[:, :, ::-1]  # left-right: the slab model is unchanged
        crop, coords = stacked_patch(both, self.patch, rng)
        return restoration_sample(crop, coords, self.volumes[i].region, self.residual_scale)


def make_datasets(config: dict, *, seed: int = 0, rank: int = 0, start_step: int = 0):
    """(train, validation) streams of a ``data.kind: thick_thin`` config."""
    data = config["data"]
    if data.get("pixel_sizes_mm") or data.get("spacing_mm"):
        raise ValueError("data.kind thick_thin keeps each scan's own voxel size: "
                         "remove pixel_sizes_mm / spacing_mm")
    volumes = load_volumes(data, config["normalization"])
    train = ThickThinPlanes(volumes, data, seed=seed, rank=rank)
    train.start_step = start_step
    return train, ThickThinPlanes(volumes, data, seed=seed, part="val")
