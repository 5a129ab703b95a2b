"""Folders of 2D images (PNG/JPEG, DICOM, NIfTI slices) for the 2D image prior.

The recipe of the student DDPM/DDIM project: a diffusers ``UNet2DModel`` on
128x128 grayscale images (X-ray, MRI, ultrasound or CT), DDPM training,
20-step DDIM sampling. Every image is resized to ``image_size`` (aspect kept,
padded with its minimum) and scaled to [-1, 1] by its own robust percentiles
(photographic formats by 0..255).
"""
from __future__ import annotations

import numpy as np
import torch
from skimage import io as skio
from skimage.transform import resize

from napari_mediffuse import io
from napari_mediffuse.engine.position import coordinate_grid

from .data import SampleStream, resolve_path

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _scale_picture(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    top = 255.0 if image.max() > 1.0 else 1.0
    return image / top * 2.0 - 1.0


def _scale_robust(image: np.ndarray) -> np.ndarray:
    low, high = np.percentile(image, [0.5, 99.5])
    if high <= low:
        high = low + 1.0
    return np.clip((image.astype(np.float32) - low) / (high - low), 0, 1) * 2.0 - 1.0


def fit_square(image: np.ndarray, size: int) -> np.ndarray:
    """Pad to square with the image's minimum (background) and resize to ``size``."""
    h, w = image.shape
    side = max(h, w)
    out = np.full((side, side), image.min(), dtype=np.float32)
    out[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = image
    return resize(out, (size, size), order=1, anti_aliasing=side > size, preserve_range=True).astype(np.float32)


def load_images(folder, size: int, *, every_nth_slice: int = 1) -> np.ndarray:
    """All 2D images under ``folder`` as an (N, size, size) array in [-1, 1].

    Pictures are read as grayscale; NIfTI volumes and DICOM series contribute
    their axial slices (every ``every_nth_slice``-th), skipping nearly empty ones.
    """
    folder = resolve_path(str(folder))
    images = []
    paths = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    dicom_dirs = set()
    for path in paths:
        if path.suffix.lower() in PICTURE_SUFFIXES:
            picture = skio.imread(str(path), as_gray=True)
            images.append(fit_square(_scale_picture(picture), size))
        elif io.is_nifti_path(path) or io.is_dicom_file(path):
            if io.is_dicom_file(path):
                if path.parent in dicom_dirs:
                    continue
                dicom_dirs.add(path.parent)
                volumes = io.read(path.parent)
            else:
                volumes = io.read(path)
            for volume in volumes:
                data = volume.data if volume.data.ndim == 3 else volume.data[0]
                for plane in data[::every_nth_slice]:
                    if np.ptp(plane) <= 0 or np.mean(plane > plane.min()) < 0.05:
                        continue
                    images.append(fit_square(_scale_robust(plane), size))
    if not images:
        raise ValueError(f"{folder}: no PNG/JPEG/TIFF, DICOM or NIfTI images found")
    return np.stack(images)


class ImageFolder(SampleStream):
    """Endless seeded stream of whole images (with full-image coordinates)."""

    def __init__(self, images: np.ndarray, *, seed: int = 0, rank: int = 0, flip: bool = False):
        super().__init__()
        self.images = images
        self.seed, self.rank, self.flip = seed, rank, flip
        size = images.shape[-1]
        self.coords = coordinate_grid([(0, size), (0, size)], (size, size))

    def sample(self, rng: np.random.Generator, augment=None) -> dict:
        image = self.images[int(rng.integers(len(self.images)))]
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
        return {"image": torch.from_numpy(np.ascontiguousarray(image))[None], "coords": self.coords,
                "region": torch.tensor(0)}



def make_datasets(config: dict, *, seed: int = 0, rank: int = 0):
    """(train, validation) for ``data.kind: image_folder``; the last
    ``holdout_fraction`` of the images (in file order) is validation."""
    data = config["data"]
    images = np.concatenate([load_images(entry["path"] if isinstance(entry, dict) else entry,
                                         int(data["image_size"]),
                                         every_nth_slice=int(data.get("every_nth_slice", 1)))
                             for entry in data["train"]])
    n_val = max(1, int(round(float(data.get("holdout_fraction", 0.1)) * len(images))))
    return (ImageFolder(images[:-n_val], seed=seed, rank=rank, flip=bool(data.get("flip", False))),
            ImageFolder(images[-n_val:], seed=seed))
