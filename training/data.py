"""Training data: CT volumes -> multi-level 2D samples with coordinates.

MedDiff-FM's multi-level sampling, in 2D: each sample is a slice (axial,
coronal or sagittal) either *image level* (the whole slice, padded square
and resized to the patch size) or *patch level* (a crop at native
resolution), with the coordinates of its pixels in the whole slice
(normalised to [-1, 1]) for the network's position channels, and the
volume's body-region class.

Two spacing modes:

* ``data.spacing_mm``: every volume resampled to one isotropic spacing at
  load (the demo priors);
* ``data.pixel_sizes_mm: [low, high]``: volumes kept at their own voxel
  size and each slice resampled, when drawn, to a pixel size drawn
  log-uniformly in ``[low, high]`` (never finer than the slice's coarser
  axis: no axis is upsampled), so one prior learns 0.6-4 mm pixels.

Anatomy channels (``data.anatomy_channels: {name: [labels], ...}``): where
an entry names a label map of structures on the scan's grid (``structures:
structures.nii.gz``, a file beside each matched scan: OpenKBP's organs and
targets), each sample also carries a ``condition`` of one plane per channel,
+1 inside the channel's structures and -1 outside, cropped, resampled and
augmented with the image. Scans without structures, and a fraction
``data.anatomy_dropout`` of those with them, get 0 (unknown) in every plane,
so the prior also learns to do without.

Patients are split by the config: ``data.validation`` (held-out patients,
the validation loss) and ``data.evaluation_only`` (scans that must never be
trained on) are checked against ``data.train`` by
:func:`check_data_config` before anything is loaded.
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
from napari_mediffuse.engine.position import body_extent, coordinate_grid, slice_coordinates
from napari_mediffuse.tasks.common import PLANE_AXIS
from napari_mediffuse.tasks.common import region_index as task_region_index

log = logging.getLogger(__name__)

ORIENTATIONS = ("axial", "coronal", "sagittal")


@dataclass
class TrainingVolume:
    """A normalised CT volume in display orientation, split into train/held-out."""

    data: np.ndarray  # float32 in [-1, 1], (S, P, L)
    region: int
    source: str
    holdout_start: int  # axial index where the held-out block starts
    spacing_mm: tuple = (1.0, 1.0, 1.0)  # (S, P, L) voxel size of ``data``
    patient: str = ""
    structures: np.ndarray | None = None  # uint8 label map on the grid of ``data``, or None
    # coordinates in [-1, 1] of the first and last axial slice of ``data`` in its
    # whole scan's body (a block of a scan cut round a tumour is part of it)
    axial_span: tuple = (-1.0, 1.0)

    def train_labels(self) -> np.ndarray | None:
        return None if self.structures is None else self.structures[: self.holdout_start]

    def holdout_labels(self) -> np.ndarray | None:
        return None if self.structures is None else self.structures[self.holdout_start:]

    def slice_coordinate(self, orientation: str, index: int, part: str = "train") -> float:
        """The place in [-1, 1] of slice ``index`` of this volume's ``part``
        along the axis normal to ``orientation`` (the prior's third coordinate):
        axial slices within the whole scan's body, coronal and sagittal ones
        within this volume's."""
        if orientation != "axial":
            n = self.data.shape[PLANE_AXIS[orientation]]
            return float(slice_coordinates(index, 0, n))
        full = index + (self.holdout_start if part != "train" else 0)
        n = self.data.shape[0]
        first, last = self.axial_span
        return float(first + (last - first) * (full / (n - 1) if n > 1 else 0.5))

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


class ConfigError(ValueError):
    """A training config that cannot run (missing file, patient in both splits...)."""


#: File names that say nothing about the patient: the folder names it (OpenKBP's pt_N/ct.nii.gz).
GENERIC_NAMES = ("ct", "image", "img", "volume", "scan", "structures")


def patient_id(path: Path) -> str:
    """The patient a file belongs to: its name without extension, or its
    folder's name when the file name is generic (``pt_12/ct.nii.gz`` -> ``pt_12``)."""
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return path.parent.name if name.lower() in GENERIC_NAMES else name


def _entries(entries) -> list[dict]:
    return [{"path": e} if isinstance(e, str) else dict(e) for e in (entries or [])]


def dataset_files(entries) -> list[tuple[Path, int]]:
    """(path, region) for each config entry; a folder entry contributes every
    NIfTI file in it (or those matching the entry's ``glob``, e.g.
    ``*/ct.nii.gz``) and every DICOM series below it."""
    return [(path, region) for path, region, _ in _entry_files(entries)]


def _entry_files(entries) -> list[tuple[Path, int, dict]]:
    files = []
    for entry in _entries(entries):
        first = len(files)  # this entry's files are files[first:]
        path = resolve_path(entry["path"])
        region = region_index(entry.get("region"))
        if path.is_dir():
            pattern = entry.get("glob", "*")
            nifti = sorted(p for p in path.glob(pattern) if io.is_nifti_path(p))
            if pattern == "*":
                nifti = sorted(p for p in path.rglob("*") if io.is_nifti_path(p))
            if entry.get("structures"):  # a label map beside each scan is not a scan
                nifti = [p for p in nifti if p.name != entry["structures"]]
            if entry.get("glob") and not nifti:
                raise ConfigError(f"training data {path}: no file matches glob {pattern!r}")
            files.extend((p, region, entry) for p in nifti)
            if not nifti:
                files.append((path, region, entry))  # a DICOM tree: read as series
        elif path.exists():
            files.append((path, region, entry))
        else:
            raise FileNotFoundError(f"training data {path} not found (paths are relative to {Path.cwd()})")
        unknown = [f for f in entry.get("orientation_fix") or () if f not in ORIENTATION_FIXES]
        if unknown:
            raise ConfigError(f"{path}: unknown orientation_fix {unknown[0]!r}; known: {', '.join(ORIENTATION_FIXES)}")
        mask = entry.get("exclude_mask")
        if mask and not resolve_path(mask).exists():
            raise FileNotFoundError(f"exclude_mask {resolve_path(mask)} of {path} not found")
        for scan, _, _ in files[first:]:
            labels = structures_path(scan, entry)
            if labels is not None and not labels.exists():
                raise FileNotFoundError(f"structures {labels} of {scan} not found")
    return files


def structures_path(scan: Path, entry: dict) -> Path | None:
    """The structure label map of ``scan`` named by its entry's ``structures``
    (a file name beside the scan, e.g. OpenKBP's ``pt_N/structures.nii.gz``),
    or None."""
    name = entry.get("structures")
    return None if not name else Path(scan).parent / name


def check_data_config(data_config: dict) -> dict:
    """Check a config's data before any training: every file exists and no
    patient is in two splits. Returns ``{split: [patient ids]}``.

    Raises
    ------
    FileNotFoundError
        A file or folder named by the config does not exist (the message names it).
    ConfigError
        A patient (same file or same patient id) is in ``train`` and in
        ``validation`` or ``evaluation_only``.
    """
    splits = {"train": data_config.get("train"), "validation": data_config.get("validation"),
              "evaluation_only": data_config.get("evaluation_only")}
    if not splits["train"]:
        raise ConfigError("data.train names no training data")
    found = {}
    for split, entries in splits.items():
        found[split] = {(p.resolve(), patient_id(p)) for p, _, _ in _entry_files(entries)}
    train_paths = {p for p, _ in found["train"]}
    train_ids = {i: p for p, i in found["train"]}
    for split in ("validation", "evaluation_only"):
        for path, pid in sorted(found[split]):
            if path in train_paths or pid in train_ids:
                other = path if path in train_paths else train_ids[pid]
                raise ConfigError(f"patient {pid!r} is in data.train ({other}) and in data.{split} ({path}): "
                                  "split by patient")
    return {split: sorted(i for _, i in found[split]) for split in splits}


def body_box(data: np.ndarray, threshold: float, margin: int = 4) -> tuple:
    """Slices of the bounding box of voxels above ``threshold`` (the body,
    table included), grown by ``margin`` voxels: a neck in a 576 mm box of air
    becomes a neck with a little air round it."""
    return tuple(slice(*body_extent(data, axis, threshold, margin)) for axis in range(data.ndim))


def excluded_blocks(mask: np.ndarray, spacing_s: float, margin_mm: float, min_slices: int) -> list[slice]:
    """Contiguous axial blocks clear of a label (e.g. a tumour) by ``margin_mm``:
    a scan may be trained on outside its lesion. Blocks thinner than
    ``min_slices`` are dropped."""
    hit = np.nonzero(mask.reshape(mask.shape[0], -1).any(axis=1))[0]
    n = mask.shape[0]
    if hit.size == 0:
        return [slice(0, n)]
    grow = int(math.ceil(margin_mm / spacing_s))
    keep = np.ones(n, dtype=bool)
    for i in hit:
        keep[max(0, i - grow): i + grow + 1] = False
    blocks, start = [], None
    for i in range(n + 1):
        if i < n and keep[i]:
            start = i if start is None else start
        elif start is not None:
            if i - start >= min_slices:
                blocks.append(slice(start, i))
            start = None
    return blocks


#: Orientation fixes an entry may need (``orientation_fix: [...]``), applied in
#: order to the (S, P, L) display array when a file's affine does not match its
#: anatomy (found by looking: OpenKBP's boxes need ``rot90_PL`` and ``flip_S``,
#: the InVesalius head CT ``flip_P``).
ORIENTATION_FIXES = ("flip_S", "flip_P", "flip_L", "rot90_PL")


def fix_orientation(data: np.ndarray, spacing_mm, fixes) -> tuple[np.ndarray, tuple]:
    """Apply ``fixes`` (see :data:`ORIENTATION_FIXES`) to an (S, P, L) array
    and its voxel spacing. ``rot90_PL`` turns each axial slice a quarter turn
    anticlockwise on screen (its right column becomes its top row), swapping
    the P and L spacings."""
    spacing = tuple(float(v) for v in spacing_mm)
    for fix in fixes or ():
        if fix not in ORIENTATION_FIXES:
            raise ConfigError(f"unknown orientation_fix {fix!r}; known: {', '.join(ORIENTATION_FIXES)}")
        if fix == "rot90_PL":
            data = np.rot90(data, 1, axes=(1, 2))
            spacing = (spacing[0], spacing[2], spacing[1])
        else:
            data = np.flip(data, axis="SPL".index(fix[-1]))
    return np.ascontiguousarray(data), spacing


def load_volumes(data_config: dict, normalization: dict, split: str = "train") -> list[TrainingVolume]:
    """Read, resample (``spacing_mm``) or keep at native spacing
    (``pixel_sizes_mm``), crop to the body (``crop_to_body_hu``) and normalise
    every volume of ``data_config[split]``; with ``data.packed``, read them
    from that pack instead (:mod:`training.pack`).

    Training volumes keep their most superior ``holdout_fraction`` of axial
    slices for validation; ``validation`` volumes are held out whole.
    """
    if data_config.get("packed"):  # loaded earlier, on a machine with the files (training.pack)
        from .pack import read_pack

        return read_pack(resolve_path(data_config["packed"]), split)
    spacing = float(data_config.get("spacing_mm", 0) or 0)
    holdout = float(data_config.get("holdout_fraction", 0.0)) if split == "train" else 1.0
    crop_hu = data_config.get("crop_to_body_hu")
    volumes = []
    for path, region, entry in _entry_files(data_config[split]):
        for vol in io.read(path):
            if vol.data.ndim != 3:
                log.warning("%s: skipping %dD series %s", path, vol.data.ndim, vol.name)
                continue
            data, voxel = fix_orientation(vol.data.astype(np.float32), vol.spacing, entry.get("orientation_fix"))
            labels = None
            if data_config.get("anatomy_channels") and structures_path(path, entry) is not None:
                labels = read_structures(structures_path(path, entry), vol.data.shape, vol.spacing,
                                         entry.get("orientation_fix"))
            blocks = [slice(0, data.shape[0])]
            body_s = body_extent(data, 0, float(crop_hu)) if crop_hu is not None else (0, data.shape[0])
            if entry.get("exclude_mask"):
                mask = io.read(resolve_path(entry["exclude_mask"]))[0].data
                if mask.shape != vol.data.shape:
                    raise ConfigError(f"exclude_mask {entry['exclude_mask']} has shape {mask.shape}, "
                                      f"its scan {path} {vol.data.shape}")
                mask, _ = fix_orientation(mask, vol.spacing, entry.get("orientation_fix"))
                blocks = excluded_blocks(mask > 0, voxel[0], float(entry.get("exclude_margin_mm", 10.0)),
                                         int(entry.get("min_slices", 4)))
            for block in blocks:
                part = data[block]
                part_labels = None if labels is None else labels[block]
                first, stop = block.start, block.stop
                if crop_hu is not None:
                    box = body_box(part, float(crop_hu))
                    part = part[box]
                    part_labels = None if part_labels is None else part_labels[box]
                    first, stop = block.start + box[0].start, block.start + box[0].stop
                span = tuple(float(x) for x in slice_coordinates([first, stop - 1], *body_s))
                if spacing:
                    part = resample_isotropic(part, voxel, spacing)
                    if part_labels is not None:
                        part_labels = resample_isotropic(part_labels, voxel, spacing, labels=True)
                    part_spacing = (spacing,) * 3
                else:
                    part_spacing = voxel
                part = np.ascontiguousarray(normalize(part, normalization), dtype=np.float32)
                n = part.shape[0]
                start = n - int(round(holdout * n)) if holdout else n
                volumes.append(TrainingVolume(data=part, region=region, source=str(path), holdout_start=start,
                                              spacing_mm=part_spacing, patient=patient_id(path),
                                              structures=None if part_labels is None
                                              else np.ascontiguousarray(part_labels),
                                              axial_span=span))
    if not volumes:
        raise ValueError(f"no {split} volumes found")
    return volumes


def read_structures(path: Path, shape, spacing_mm, orientation_fix=None) -> np.ndarray:
    """A label map of structures (one label per voxel) on its scan's grid
    ``shape``, in display orientation with the scan's ``orientation_fix``,
    as uint8."""
    labels = io.read(path)[0].data
    if labels.shape != tuple(shape):
        raise ConfigError(f"structures {path} have shape {labels.shape}, their scan {tuple(shape)}")
    if labels.min() < 0 or labels.max() > 255 or not np.array_equal(labels, np.round(labels)):
        raise ConfigError(f"structures {path}: not a label map of integers 0-255")
    return fix_orientation(labels.astype(np.uint8), spacing_mm, orientation_fix)[0]


def resample_isotropic(data: np.ndarray, spacing_mm, target_mm: float, *, labels: bool = False) -> np.ndarray:
    """Resample a volume to ``target_mm`` isotropic voxels (linear).

    Axes that get coarser are low-pass filtered first (a Gaussian of
    0.4 x the zoom-out factor in input voxels), so that downsampling
    averages tissue instead of picking single noisy voxels. A label map
    (``labels``) is resampled by nearest neighbour, onto the same grid.
    """
    zoom = np.asarray([s / target_mm for s in spacing_mm], dtype=float)
    if np.allclose(zoom, 1.0, atol=1e-3):
        return data
    if labels:
        return ndimage.zoom(data, zoom, order=0, mode="nearest")
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

    ``slice_2d`` is (H, W), or (C, H, W) for an image with its aligned
    planes (anatomy), all treated alike. Returns the image (size, size) or
    (C, size, size) and its coordinates (2, size, size)."""
    stack = slice_2d if slice_2d.ndim == 3 else slice_2d[None]
    c, h, w = stack.shape
    side = max(h, w)
    padded = np.full((c, side, side), -1.0, dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    padded[:, top:top + h, left:left + w] = stack
    tensor = torch.from_numpy(padded)[None]
    resized = F.interpolate(tensor, size=(size, size), mode="area" if side > size else "bilinear",
                            **({} if side > size else {"align_corners": False}))[0].numpy()
    coords = coordinate_grid([(0, size), (0, size)], (size, size)).numpy()
    return (resized if slice_2d.ndim == 3 else resized[0]), coords


def patch_level(slice_2d: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random ``size`` crop at native resolution with its coordinates in the
    slice; ``slice_2d`` (H, W), or (C, H, W) cropped alike (see :func:`stacked_patch`)."""
    crop, coords = stacked_patch(slice_2d if slice_2d.ndim == 3 else slice_2d[None], size, rng)
    return (crop if slice_2d.ndim == 3 else crop[0]), coords


def stacked_patch(stack: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The same random ``size`` crop of every plane of ``stack`` (C, H, W)
    (padded with air when smaller), and its coordinates in the plane: the
    aligned image / condition pairs of the conditional models."""
    c, h, w = stack.shape
    ph, pw = max(h, size), max(w, size)
    if (ph, pw) != (h, w):
        padded = np.full((c, ph, pw), -1.0, dtype=np.float32)
        padded[:, :h, :w] = stack
        stack = padded
    r0, c0 = int(rng.integers(0, ph - size + 1)), int(rng.integers(0, pw - size + 1))
    coords = coordinate_grid([(r0, r0 + size), (c0, c0 + size)], (h, w)).numpy()
    return np.ascontiguousarray(stack[:, r0:r0 + size, c0:c0 + size]), coords


def restoration_sample(target_and_condition: np.ndarray, coords: np.ndarray, region: int,
                       residual_scale: float = 0.0) -> dict:
    """A training sample of a learned restoration model from an aligned crop
    (2, H, W) of target and condition: the image is the target, or with
    ``residual_scale`` s the correction ``s (target - condition)`` the model
    generates (card ``residual_scale``)."""
    target, condition = target_and_condition[0:1], target_and_condition[1:2]
    image = target if not residual_scale else (target - condition) * residual_scale
    return {
        "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
        "condition": torch.from_numpy(np.ascontiguousarray(condition, dtype=np.float32)),
        "coords": torch.from_numpy(coords),
        "region": torch.tensor(region, dtype=torch.long),
    }


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
        """(H, W), or (C, H, W): one transform for all the planes."""
        shifted = torch.from_numpy(slice_2d + 1.0)  # air -> 0 so padding is air
        out = np.asarray(aug(shifted if slice_2d.ndim == 3 else shifted[None])).astype(np.float32) - 1.0
        return out if slice_2d.ndim == 3 else out[0]

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
    start_step: int = 0  # a resumed run draws a fresh stream, not the first run's again

    def sample(self, rng: np.random.Generator, augment=None) -> dict:
        raise NotImplementedError

    def augmentation(self, seed: int):
        """A callable augmenting one sample's array, or None (no augmentation)."""
        return None

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        key = [self.seed, self.rank, worker] + ([int(self.start_step)] if self.start_step else [])
        rng = np.random.default_rng(key)
        augment = self.augmentation(int(rng.integers(2**31)))
        while True:
            yield self.sample(rng, augment)

    def fixed_batch(self, n: int, seed: int = 1234) -> dict:
        """A reproducible batch (validation): same samples every call."""
        rng = np.random.default_rng(seed)
        items = [self.sample(rng) for _ in range(n)]
        return {key: torch.stack([it[key] for it in items]) for key in items[0]}


class RestorationCrops(SampleStream):
    """Base of the streams of (target, condition) crops that train the
    conditional models: ``patch_size``, ``residual_scale`` (see
    :func:`restoration_sample`) and left-right flips (``augment``, training
    part only) from the data config."""

    def __init__(self, data_config: dict, *, seed: int = 0, rank: int = 0, part: str = "train"):
        super().__init__()
        self.patch = int(data_config["patch_size"])
        self.seed, self.rank, self.part = seed, rank, part
        self.augment = bool(data_config.get("augment", False)) and part == "train"
        self.residual_scale = float(data_config.get("residual_scale") or 0.0)

    def augmentation(self, seed: int):
        return True if self.augment else None


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
        sizes = data_config.get("pixel_sizes_mm")
        self.pixel_sizes = (float(sizes[0]), float(sizes[1])) if sizes else None
        self.augment = bool(data_config.get("augment", False)) and part == "train"
        self.anatomy = anatomy_channels(data_config)
        # validation keeps every scan's structures (and draws the same slices as without them)
        self.anatomy_dropout = float(data_config.get("anatomy_dropout", 0.0)) if part == "train" else 0.0
        # the slice's place along the volume's third axis as a third coordinate;
        # a fraction of training samples get it 'not known' (NaN), as a task may
        self.slice_position = bool(data_config.get("slice_position", False))
        self.slice_position_dropout = (float(data_config.get("slice_position_dropout", 0.0))
                                       if part == "train" else 0.0)
        self.seed = seed
        self.rank = rank
        self.part = part
        self.volume_p = volume_probabilities([self._array(v).size for v in volumes],
                                             [v.region for v in volumes], data_config.get("region_weights"))

    def _array(self, volume: TrainingVolume) -> np.ndarray:
        return volume.train_part() if self.part == "train" else volume.holdout_part()

    def _arrays(self):
        return [self._array(v) for v in self.volumes]

    def _labels(self, volume: TrainingVolume) -> np.ndarray | None:
        return volume.train_labels() if self.part == "train" else volume.holdout_labels()

    def sample(self, rng: np.random.Generator, augment=None) -> dict:
        k = int(rng.choice(len(self.volumes), p=self.volume_p))
        array = self._array(self.volumes[k])
        orientation = self.orientations[int(rng.choice(len(self.orientations), p=self.orientation_p))]
        index = int(rng.integers(0, array.shape[PLANE_AXIS[orientation]]))
        plane = take_slice(array, orientation, index)
        labels = self._labels(self.volumes[k]) if self.anatomy else None
        if labels is not None:  # the image and its anatomy planes travel together from here on
            plane = np.concatenate([plane[None], anatomy_planes(take_slice(labels, orientation, index),
                                                                self.anatomy)])
        if self.pixel_sizes is not None:
            spacing = plane_spacing(self.volumes[k].spacing_mm, orientation)
            plane = resample_plane(plane, spacing, draw_pixel_size(rng, spacing, self.pixel_sizes))
        if rng.random() < self.p_image:
            if augment is not None:
                plane = augment(plane)
            image, coords = image_level(plane, self.patch)
        elif augment is not None:
            image, coords = augmented_patch(plane, self.patch, rng, augment)
        else:
            image, coords = patch_level(plane, self.patch, rng)
        if self.slice_position:
            dropped = self.slice_position_dropout > 0 and rng.random() < self.slice_position_dropout
            third = math.nan if dropped else self.volumes[k].slice_coordinate(orientation, index, self.part)
            coords = np.concatenate([coords, np.full((1,) + coords.shape[1:], third, dtype=coords.dtype)])
        sample = {
            "image": torch.from_numpy(np.ascontiguousarray(image if image.ndim == 3 else image[None])[:1]),
            "coords": torch.from_numpy(np.ascontiguousarray(coords)),
            "region": torch.tensor(self.volumes[k].region, dtype=torch.long),
        }
        if self.anatomy:
            dropped = self.anatomy_dropout > 0 and rng.random() < self.anatomy_dropout
            condition = (image[1:] if labels is not None and not dropped
                         else np.zeros((len(self.anatomy),) + image.shape[-2:], dtype=np.float32))
            sample["condition"] = torch.from_numpy(np.ascontiguousarray(condition, dtype=np.float32))
        return sample

    def augmentation(self, seed: int):
        return make_augmentation(seed) if self.augment else None


def anatomy_channels(data_config: dict) -> list[tuple[int, ...]]:
    """The labels of each anatomy channel (``data.anatomy_channels``:
    ``{name: [label, ...]}``, in order), or [] when the config has none."""
    channels = data_config.get("anatomy_channels") or {}
    if not isinstance(channels, dict) or not all(isinstance(v, list) and v for v in channels.values()):
        raise ConfigError("data.anatomy_channels: a mapping {name: [label, ...]}, e.g. {mandible: [7]}")
    return [tuple(int(x) for x in labels) for labels in channels.values()]


def anatomy_planes(labels_2d: np.ndarray, channels) -> np.ndarray:
    """(K, H, W) planes of a label slice: +1 where the slice holds channel
    k's labels, -1 elsewhere (0 is kept for 'unknown')."""
    return np.stack([np.where(np.isin(labels_2d, labels), 1.0, -1.0) for labels in channels]).astype(np.float32)


def volume_probabilities(sizes, regions, region_weights: dict | None = None) -> np.ndarray:
    """Probability of drawing each volume: by size (voxels), or with
    ``region_weights`` ({region name: weight}) first a region by its weight
    and then a volume of it by size, so 170 neck boxes do not drown the one
    abdomen. Regions without volumes drop out (the others are renormalised)."""
    sizes = np.asarray(sizes, dtype=float)
    if sizes.sum() <= 0:
        raise ValueError("no slices to draw: every volume of this split is empty "
                         "(a validation stream needs data.validation or holdout_fraction > 0)")
    if not region_weights:
        return sizes / sizes.sum()
    p = np.zeros_like(sizes)
    for name, weight in region_weights.items():
        members = np.array([r == region_index(name) for r in regions]) & (sizes > 0)
        if members.any() and weight > 0:
            p[members] = float(weight) * sizes[members] / sizes[members].sum()
    if p.sum() <= 0:
        raise ValueError(f"region_weights {region_weights} select none of the volumes")
    return p / p.sum()


def plane_spacing(spacing_mm, orientation: str) -> tuple[float, float]:
    """(row, column) pixel size in mm of a slice of an (S, P, L) volume."""
    s, p, l_ = spacing_mm
    return {"axial": (p, l_), "coronal": (s, l_), "sagittal": (s, p)}[orientation]


def draw_pixel_size(rng: np.random.Generator, spacing: tuple[float, float], sizes: tuple[float, float]) -> float:
    """A pixel size in mm, log-uniform in ``sizes`` but never finer than the
    slice's coarser axis (a 2.5 mm axis is not upsampled to 1 mm; a 4.5 mm
    neck box stays at 4.5 mm)."""
    floor = max(spacing)
    low, high = max(sizes[0], floor), max(sizes[1], floor)
    return float(np.exp(rng.uniform(np.log(low), np.log(high)))) if high > low else low


def resample_plane(plane: np.ndarray, spacing: tuple[float, float], pixel_mm: float) -> np.ndarray:
    """A slice (H, W), or a stack of aligned planes (C, H, W), resampled to
    square ``pixel_mm`` pixels (bilinear, antialiased when made coarser)."""
    shape = tuple(max(1, int(round(n * s / pixel_mm))) for n, s in zip(plane.shape[-2:], spacing))
    if shape == plane.shape[-2:]:
        return plane
    tensor = torch.from_numpy(np.ascontiguousarray(plane)).reshape((1, -1) + plane.shape[-2:])
    out = F.interpolate(tensor, size=shape, mode="bilinear", align_corners=False, antialias=True)[0].numpy()
    return out if plane.ndim == 3 else out[0]


def augmented_patch(plane: np.ndarray, size: int, rng: np.random.Generator, augment) -> tuple[np.ndarray, np.ndarray]:
    """A random ``size`` crop with geometric augmentation applied to a window
    1.5x larger around it (not the whole slice: a 500-px slice costs ~10x more
    to warp), so rotation brings in tissue, not padding, at the corners.
    ``plane`` is (H, W) or (C, H, W) (one transform for all the planes).
    Coordinates are those of the crop in the slice."""
    stack = plane if plane.ndim == 3 else plane[None]
    c, h, w = stack.shape
    margin = size // 4
    r0 = int(rng.integers(0, max(h, size) - size + 1))
    c0 = int(rng.integers(0, max(w, size) - size + 1))
    window = np.full((c, size + 2 * margin, size + 2 * margin), -1.0, dtype=np.float32)
    rs, cs = r0 - margin, c0 - margin
    src = stack[:, max(rs, 0):min(rs + window.shape[1], h), max(cs, 0):min(cs + window.shape[2], w)]
    window[:, max(-rs, 0):max(-rs, 0) + src.shape[1], max(-cs, 0):max(-cs, 0) + src.shape[2]] = src
    crop = augment(window if plane.ndim == 3 else window[0])[..., margin:margin + size, margin:margin + size]
    coords = coordinate_grid([(r0, r0 + size), (c0, c0 + size)], (h, w)).numpy()
    return np.ascontiguousarray(crop), coords


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


def pooling_factor(data_config: dict) -> int:
    """How many voxels of ``augment_spacing_mm`` (optional) make one of
    ``spacing_mm`` along each axis: a whole number, 1 without it."""
    fine = data_config.get("augment_spacing_mm")
    if not fine:
        return 1
    ratio = float(data_config["spacing_mm"]) / float(fine)
    factor = int(round(ratio))
    if factor < 1 or abs(ratio - factor) > 1e-6:
        raise ConfigError(f"data.augment_spacing_mm ({fine}) must divide data.spacing_mm "
                          f"({data_config['spacing_mm']}) a whole number of times")
    return factor


def loading_config(data_config: dict) -> dict:
    """The data settings the volumes are loaded with: those of ``data_config``,
    at ``augment_spacing_mm`` when it is set (coarse boxes augmented finer and
    averaged down, :class:`CoarseVolumes`). The trainer and packs both load
    through it, so a pack holds the volumes the run needs."""
    factor = pooling_factor(data_config)  # checked here, before any volume is loaded
    return {**data_config, "spacing_mm": float(data_config["spacing_mm"]) / factor} if factor > 1 else data_config


def block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each ``factor``^3 block (a volume at ``factor`` times coarser voxels)."""
    if factor == 1:
        return volume
    shape = [n // factor for n in volume.shape]
    split = [d for n in shape for d in (n, factor)]
    return volume[tuple(slice(0, n * factor) for n in shape)].reshape(split).mean(axis=(1, 3, 5))


class CoarseVolumes(SampleStream):
    """Endless stream of whole coarse volumes for the coarse 3D prior.

    Each sample is one training volume at ``spacing_mm`` (coarse, e.g. 12 mm),
    centred in a ``volume_shape`` (S, P, L) box of air, randomly rotated,
    scaled and shifted in 3D (MONAI ``RandAffine``), and laid out as a 2D
    image whose channels are the axial slices: ``image`` (S, P, L),
    ``coords`` (2, P, L) of the whole box, ``region``. A 2D UNet on slices-
    as-channels sees the whole body at once at a fraction of a 3D UNet's
    cost on CPU (a 3D MONAI UNet took 6 s per step of 4 x 32^3 here), but
    cannot keep detail along S. With ``box_as: volume`` the box is one 3D
    image instead, for a 3D network: ``image`` (1, S, P, L), ``coords``
    (3, S, P, L). With ``augment_spacing_mm`` the volumes come at that finer
    voxel (a whole fraction of ``spacing_mm``), are augmented there and averaged
    down to ``spacing_mm`` (:func:`block_mean`), validation boxes too.
    """

    def __init__(self, volumes: list[TrainingVolume], data_config: dict, *, seed: int = 0,
                 rank: int = 0, part: str = "train"):
        super().__init__()
        self.shape = tuple(int(n) for n in data_config["volume_shape"])
        box_as = data_config.get("box_as", "channels")
        if box_as not in ("channels", "volume"):
            raise ConfigError(f"data.box_as must be 'channels' (a 2D network, axial slices as channels) or "
                              f"'volume' (a 3D network), got {box_as!r}")
        self.as_volume = box_as == "volume"
        # volumes loaded at a finer augment_spacing_mm are augmented there and then averaged down:
        # resampling a 16 mm box to rotate it smears its bone, a few voxels wide, into the soft tissue
        self.factor = pooling_factor(data_config)
        loaded_mm = float(data_config["spacing_mm"]) / self.factor
        for v in volumes:
            if not np.allclose(v.spacing_mm, loaded_mm, rtol=1e-3):
                raise ConfigError(f"{v.source}: volume at {tuple(float(x) for x in v.spacing_mm)} mm, the boxes need "
                                  f"{loaded_mm:g} mm (data.spacing_mm / data.augment_spacing_mm; a pack made "
                                  "from other settings?)")
        self.boxes = [centre_fit(v.data, tuple(n * self.factor for n in self.shape)) for v in volumes]
        self.regions = [v.region for v in volumes]
        # with region_weights a region first, then one of its boxes (all boxes are alike in size):
        # 170 neck boxes must not drown the two abdomens
        self.volume_p = volume_probabilities([1] * len(volumes), self.regions, data_config.get("region_weights"))
        # every sample is the whole box: the same coordinates each time
        spatial = self.shape if self.as_volume else self.shape[1:]
        self.coords = coordinate_grid([(0, n) for n in spatial], spatial)
        self.augment = bool(data_config.get("augment", False)) and part == "train"
        self.seed, self.rank, self.part = seed, rank, part

    def sample(self, rng: np.random.Generator, augment=None) -> dict:
        k = int(rng.choice(len(self.boxes), p=self.volume_p))
        box = self.boxes[k]
        if augment is not None:
            box = augment(box)
        box = block_mean(box, self.factor)
        image = torch.from_numpy(np.ascontiguousarray(box, dtype=np.float32))
        return {
            "image": image[None] if self.as_volume else image,
            "coords": self.coords,
            "region": torch.tensor(self.regions[k], dtype=torch.long),
        }

    def augmentation(self, seed: int):
        if not self.augment:
            return None
        from monai.transforms import RandAffine

        # whole-body pose and size vary between patients; no flips (anatomy is not symmetric)
        shift = 2 * self.factor  # voxels of the box as augmented: 2 of its final voxels
        aug = RandAffine(prob=0.9, rotate_range=(math.radians(8),) * 3, scale_range=(0.1,) * 3,
                         translate_range=(shift,) * 3, padding_mode="zeros", mode="bilinear")
        aug.set_random_state(seed)

        def apply(box: np.ndarray) -> np.ndarray:
            out = aug(torch.from_numpy(box + 1.0)[None])  # air -> 0 so padding is air
            return np.asarray(out)[0].astype(np.float32) - 1.0

        return apply
