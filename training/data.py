"""Training data: CT volumes -> multi-level 2D samples with coordinates.

MedDiff-FM's multi-level sampling, in 2D: each sample is a slice (axial,
coronal or sagittal) either *image level* (the whole slice, padded square
and resized to the patch size) or *patch level* (a crop at native
resolution), with the coordinates of its pixels in the whole slice
(normalised to [-1, 1]) for the network's position channels, and the
volume's body-region class.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from napari_mediffuse import io
from napari_mediffuse.engine.intensity import normalize
from napari_mediffuse.engine.position import coordinate_grid
from napari_mediffuse.tasks.common import PLANE_AXIS
from napari_mediffuse.tasks.common import region_index as task_region_index

log = logging.getLogger(__name__)

ORIENTATIONS = ("axial", "coronal", "sagittal")


@dataclass
class TrainingVolume:
    """A normalised CT volume in display orientation, split into train/held-out."""

    data: np.ndarray  # float32 in [-1, 1], (S, P, L), isotropic spacing
    region: int
    source: str
    holdout_start: int  # axial index where the held-out block starts

    def train_part(self) -> np.ndarray:
        return self.data[: self.holdout_start]

    def holdout_part(self) -> np.ndarray:
        return self.data[self.holdout_start:]


def resolve_path(path: str) -> Path:
    """Expand ``$VARS`` and ``~``; relative paths are from the working folder."""
    return Path(os.path.expandvars(os.path.expanduser(path)))


def region_index(name) -> int:
    """Region class of a config entry (name, index or None = unknown)."""
    return task_region_index(name, {})


def dataset_files(entries) -> list[tuple[Path, int]]:
    """(path, region) for each config entry; a folder entry contributes every
    NIfTI file in it and every DICOM series below it."""
    files = []
    for entry in entries:
        entry = {"path": entry} if isinstance(entry, str) else entry
        path = resolve_path(entry["path"])
        region = region_index(entry.get("region"))
        if path.is_dir():
            nifti = sorted(p for p in path.rglob("*") if io.is_nifti_path(p))
            files.extend((p, region) for p in nifti)
            if not nifti:
                files.append((path, region))  # a DICOM tree: read as series
        elif path.exists():
            files.append((path, region))
        else:
            raise FileNotFoundError(f"training data {path} not found (paths are relative to {Path.cwd()})")
    return files


def load_volumes(data_config: dict, normalization: dict) -> list[TrainingVolume]:
    """Read, resample to isotropic spacing and normalise every training volume."""
    spacing = float(data_config.get("spacing_mm", 0) or 0)
    holdout = float(data_config.get("holdout_fraction", 0.0))
    volumes = []
    for path, region in dataset_files(data_config["train"]):
        for vol in io.read(path):
            if vol.data.ndim != 3:
                log.warning("%s: skipping %dD series %s", path, vol.data.ndim, vol.name)
                continue
            data = vol.data.astype(np.float32)
            if spacing:
                data = resample_isotropic(data, vol.spacing, spacing)
            data = normalize(data, normalization)
            n = data.shape[0]
            start = n - int(round(holdout * n)) if holdout else n
            volumes.append(TrainingVolume(data=data, region=region, source=str(path), holdout_start=start))
    if not volumes:
        raise ValueError("no training volumes found")
    return volumes


def resample_isotropic(data: np.ndarray, spacing_mm, target_mm: float) -> np.ndarray:
    """Resample a volume to ``target_mm`` isotropic voxels (linear).

    Axes that get coarser are low-pass filtered first (a Gaussian of
    0.4 x the zoom-out factor in input voxels), so that downsampling
    averages tissue instead of picking single noisy voxels.
    """
    zoom = np.asarray([s / target_mm for s in spacing_mm], dtype=float)
    if np.allclose(zoom, 1.0, atol=1e-3):
        return data
    sigma = [0.4 / z if z < 1 else 0.0 for z in zoom]
    if any(sigma):
        data = ndimage.gaussian_filter(data, sigma, mode="nearest")
    return ndimage.zoom(data, zoom, order=1, mode="nearest")


def take_slice(volume: np.ndarray, orientation: str, index: int) -> np.ndarray:
    """A 2D slice of an (S, P, L) volume, displayed the usual way
    (coronal and sagittal with superior at the top)."""
    axis = PLANE_AXIS[orientation]
    plane = np.take(volume, index, axis=axis)
    return plane[::-1] if orientation != "axial" else plane  # S up on screen


def image_level(slice_2d: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole slice padded square (with air) and resized to ``size``.

    Returns the image (size, size) and its coordinates (2, size, size)."""
    h, w = slice_2d.shape
    side = max(h, w)
    padded = np.full((side, side), -1.0, dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    padded[top:top + h, left:left + w] = slice_2d
    tensor = torch.from_numpy(padded)[None, None]
    resized = F.interpolate(tensor, size=(size, size), mode="area" if side > size else "bilinear",
                            **({} if side > size else {"align_corners": False}))[0, 0].numpy()
    coords = coordinate_grid([(0, size), (0, size)], (size, size)).numpy()
    return resized, coords


def patch_level(slice_2d: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random ``size`` crop at native resolution with its coordinates in the slice."""
    h, w = slice_2d.shape
    ph, pw = max(h, size), max(w, size)
    if (ph, pw) != (h, w):  # slice smaller than the patch: pad with air
        padded = np.full((ph, pw), -1.0, dtype=np.float32)
        padded[:h, :w] = slice_2d
        slice_2d = padded
    r0 = int(rng.integers(0, ph - size + 1))
    c0 = int(rng.integers(0, pw - size + 1))
    crop = slice_2d[r0:r0 + size, c0:c0 + size]
    coords = coordinate_grid([(r0, r0 + size), (c0, c0 + size)], (h, w)).numpy()
    return np.ascontiguousarray(crop), coords


def make_augmentation(seed: int):
    """Mild geometric augmentation (MONAI): rotation, scaling, shear.

    Applied to whole slices before cropping, with air outside the slice.
    Intensities are not augmented: HU are physical units the prior must keep.
    """
    from monai.transforms import RandAffine

    aug = RandAffine(prob=0.5, rotate_range=(math.radians(10),), scale_range=(0.1, 0.1),
                     shear_range=(0.05, 0.05), padding_mode="zeros", mode="bilinear")
    aug.set_random_state(seed)

    def apply(slice_2d: np.ndarray) -> np.ndarray:
        shifted = torch.from_numpy(slice_2d + 1.0)[None]  # air -> 0 so padding is air
        out = aug(shifted)
        return np.asarray(out)[0].astype(np.float32) - 1.0

    return apply


class SampleStream(torch.utils.data.IterableDataset):
    """Endless, seeded stream of training samples.

    Subclasses define ``sample(rng, augment)`` and may override
    :meth:`augmentation`. Each process (DDP rank) and data-loader worker
    draws from its own stream (seeded by ``seed``, ``rank`` and the worker),
    so ranks see different samples and a run is reproducible.
    """

    seed: int = 0
    rank: int = 0

    def sample(self, rng: np.random.Generator, augment=None) -> dict:
        raise NotImplementedError

    def augmentation(self, seed: int):
        """A callable augmenting one sample's array, or None (no augmentation)."""
        return None

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        rng = np.random.default_rng([self.seed, self.rank, worker])
        augment = self.augmentation(int(rng.integers(2**31)))
        while True:
            yield self.sample(rng, augment)

    def fixed_batch(self, n: int, seed: int = 1234) -> dict:
        """A reproducible batch (validation): same samples every call."""
        rng = np.random.default_rng(seed)
        items = [self.sample(rng) for _ in range(n)]
        return {key: torch.stack([it[key] for it in items]) for key in items[0]}


class MultiLevelSlices(SampleStream):
    """Endless stream of multi-level 2D training samples (see :class:`SampleStream`)."""

    def __init__(self, volumes: list[TrainingVolume], data_config: dict, *, seed: int = 0,
                 rank: int = 0, part: str = "train"):
        super().__init__()
        self.volumes = volumes
        self.patch = int(data_config["patch_size"])
        self.p_image = float(data_config.get("image_level_probability", 0.25))
        orient = data_config.get("orientations", {"axial": 1.0})
        self.orientations = [o for o in ORIENTATIONS if orient.get(o, 0) > 0]
        weights = np.array([orient[o] for o in self.orientations], dtype=float)
        self.orientation_p = weights / weights.sum()
        self.augment = bool(data_config.get("augment", False)) and part == "train"
        self.seed = seed
        self.rank = rank
        self.part = part

    def _arrays(self):
        return [v.train_part() if self.part == "train" else v.holdout_part() for v in self.volumes]

    def sample(self, rng: np.random.Generator, augment=None) -> dict:
        arrays = self._arrays()
        sizes = np.array([a.size for a in arrays], dtype=float)
        k = int(rng.choice(len(arrays), p=sizes / sizes.sum()))
        array = arrays[k]
        orientation = self.orientations[int(rng.choice(len(self.orientations), p=self.orientation_p))]
        index = int(rng.integers(0, array.shape[PLANE_AXIS[orientation]]))
        plane = take_slice(array, orientation, index)
        if augment is not None:
            plane = augment(plane)
        if rng.random() < self.p_image:
            image, coords = image_level(plane, self.patch)
        else:
            image, coords = patch_level(plane, self.patch, rng)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image))[None],
            "coords": torch.from_numpy(np.ascontiguousarray(coords)),
            "region": torch.tensor(self.volumes[k].region, dtype=torch.long),
        }

    def augmentation(self, seed: int):
        return make_augmentation(seed) if self.augment else None


def centre_fit(volume: np.ndarray, shape, fill: float = -1.0) -> np.ndarray:
    """Crop or pad (with ``fill``, air) a volume to ``shape`` about its centre."""
    out = np.full(tuple(shape), fill, dtype=np.float32)
    src, dst = [], []
    for n, m in zip(volume.shape, shape):
        if n >= m:
            a = (n - m) // 2
            src.append(slice(a, a + m))
            dst.append(slice(0, m))
        else:
            a = (m - n) // 2
            src.append(slice(0, n))
            dst.append(slice(a, a + n))
    out[tuple(dst)] = volume[tuple(src)]
    return out


class CoarseVolumes(SampleStream):
    """Endless stream of whole coarse volumes for the coarse 3D prior.

    Each sample is one training volume at ``spacing_mm`` (coarse, e.g. 12 mm),
    centred in a ``volume_shape`` (S, P, L) box of air, randomly rotated,
    scaled and shifted in 3D (MONAI ``RandAffine``), and laid out as a 2D
    image whose channels are the axial slices: ``image`` (S, P, L),
    ``coords`` (2, P, L) of the whole box, ``region``. A 2D UNet on slices-
    as-channels sees the whole body at once at a fraction of a 3D UNet's
    cost on CPU (a 3D MONAI UNet took 6 s per step of 4 x 32^3 here).
    """

    def __init__(self, volumes: list[TrainingVolume], data_config: dict, *, seed: int = 0,
                 rank: int = 0, part: str = "train"):
        super().__init__()
        self.shape = tuple(int(n) for n in data_config["volume_shape"])
        self.boxes = [centre_fit(v.data, self.shape) for v in volumes]
        self.regions = [v.region for v in volumes]
        # every sample is the whole box: the same coordinates each time
        self.coords = coordinate_grid([(0, n) for n in self.shape[1:]], self.shape[1:])
        self.augment = bool(data_config.get("augment", False)) and part == "train"
        self.seed, self.rank, self.part = seed, rank, part

    def sample(self, rng: np.random.Generator, augment=None) -> dict:
        k = int(rng.integers(len(self.boxes)))
        box = self.boxes[k]
        if augment is not None:
            box = augment(box)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(box, dtype=np.float32)),
            "coords": self.coords,
            "region": torch.tensor(self.regions[k], dtype=torch.long),
        }

    def augmentation(self, seed: int):
        if not self.augment:
            return None
        from monai.transforms import RandAffine

        # whole-body pose and size vary between patients; no flips (anatomy is not symmetric)
        aug = RandAffine(prob=0.9, rotate_range=(math.radians(8),) * 3, scale_range=(0.1,) * 3,
                         translate_range=(2, 2, 2), padding_mode="zeros", mode="bilinear")
        aug.set_random_state(seed)

        def apply(box: np.ndarray) -> np.ndarray:
            out = aug(torch.from_numpy(box + 1.0)[None])  # air -> 0 so padding is air
            return np.asarray(out)[0].astype(np.float32) - 1.0

        return apply
