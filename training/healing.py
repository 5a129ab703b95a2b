"""Training data for the learned lesion-healing model (``data.kind: lesion_healing``).

The anomaly task's ``learned`` method compares a scan with a *healthy*
version of it. The partial-diffusion prior draws that version with an error
on normal tissue as large as the lesions it should reveal (about 44 HU of
bias at 4 mm, docs/evaluation/anomaly_reconstruction_error.md); a
conditional model trained to undo lesions pasted into healthy CT learns the
healthy version directly (the self-supervised synthetic-anomaly recipe of
DRAEM, Zavrtanik et al. ICCV 2021, and of foreign-patch interpolation, Tan et
al. 2022, with a restoration network instead of a segmentation one).

Each sample is an axial crop of a training slice at its own pixel size (the
target) and the same crop with 0-``max_lesions`` synthetic lesions (the
condition). The lesions here are deliberately *not* those of the evaluation
(:mod:`training.lesions`, lobulated ellipsoids with a necrotic core added to
the tissue): they are blobs cut from thresholded smooth noise inside a
random ellipse, with a Gaussian edge, either *added* to the tissue
(``contrast_hu``, either sign) or *replacing* it by a random soft-tissue
level (``replace_hu``: nodules in the lung, fluid or fat in an organ), with
a smooth internal texture; or, in ``lesions.organ_probability`` of the lesion
crops, a cluster of hypodense lesions confined to one organ
(:func:`organ_lesions`). So the inserted-lesion benchmark is not the
training distribution, and the real tumours (LUNG1, LiTS) are the honest
test.

With ``data.target: lesion_mask`` the sample's image is the lesions' mask
(pixels at or above half a lesion's weight) instead of the healthy crop: the
training data of the lesion *segmenter* (``train.objective: segmentation``),
DRAEM's discriminative half without its reconstruction. A healing model
trained here removed 2-4 % of its own lesions' contrast (session 20,
benchmarks/healing_removal.py); telling lesion from tissue is the easier
question, and the one the anomaly map asks.

Validation samples come from the ``data.validation`` patients.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

from napari_mediffuse.engine.position import coordinate_grid

from .data import SampleStream, TrainingVolume, load_volumes, restoration_sample, volume_probabilities

#: Smoothed HU above which a pixel is body (the lungs are filled in as holes).
BODY_HU = -500.0


def body_mask(slice_hu: np.ndarray) -> np.ndarray:
    """The body of one axial slice (HU): tissue above -500 HU with its holes (lungs, airway) filled."""
    tissue = ndimage.uniform_filter(slice_hu, 3) > BODY_HU
    return ndimage.binary_fill_holes(tissue)


def _smooth_field(shape, sigma_px: float, rng: np.random.Generator) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_px, mode="wrap")
    return field / max(float(field.std()), 1e-6)


def lesion_weight(shape, center, spacing_mm, *, diameter_mm: float, rng: np.random.Generator,
                  edge_mm: float = 1.0) -> np.ndarray:
    """A soft blob (float32 in [0, 1], ``shape``) of about ``diameter_mm`` at ``center`` (row, col).

    A random ellipse (axis ratio 0.6-1.6, any orientation) whose normalised
    radius is perturbed by smooth noise of a third of the diameter, so the
    border is irregular; the edge is a logistic ramp of ``edge_mm``.
    """
    rows = (np.arange(shape[0]) - center[0]) * spacing_mm[0]
    cols = (np.arange(shape[1]) - center[1]) * spacing_mm[1]
    r, c = np.meshgrid(rows, cols, indexing="ij")
    angle = rng.uniform(0, math.pi)
    u, v = r * math.cos(angle) + c * math.sin(angle), -r * math.sin(angle) + c * math.cos(angle)
    ratio = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
    a, b = diameter_mm / 2 * math.sqrt(ratio), diameter_mm / 2 / math.sqrt(ratio)
    radius = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    sigma_px = max(diameter_mm / 3.0 / float(np.mean(spacing_mm)), 1.0)
    radius = radius + rng.uniform(0.0, 0.35) * _smooth_field(shape, sigma_px, rng)
    edge = max(edge_mm, 0.3) / (diameter_mm / 2)
    return (1.0 / (1.0 + np.exp(np.clip((radius - 1.0) / (edge / 4), -30, 30)))).astype(np.float32)


#: Smoothed HU of organ parenchyma (muscle, liver, spleen, kidney, enhanced or not), where
#: :func:`organ_lesions` places its clusters.
PARENCHYMA_HU = (0.0, 200.0)

#: Soft tissue (HU, smoothed over about 2 mm) where :func:`corrupt` puts a
#: ``tissue_probability`` share of its blobs: muscle, glands and organs, not fat, lung or bone.
LESION_TISSUE_HU = (-100.0, 200.0)


def parenchyma_mask(slice_hu: np.ndarray, spacing_mm, *, hu_range=PARENCHYMA_HU,
                    margin_mm: float = 3.0) -> np.ndarray:
    """Organ parenchyma of one axial slice: pixels whose HU smoothed over about
    2 mm lies in ``hu_range``, eroded by ``margin_mm`` (not a fat or lung border)."""
    sigma = [max(2.0 / float(s), 0.5) for s in spacing_mm]
    smooth = ndimage.gaussian_filter(np.asarray(slice_hu, dtype=np.float32), sigma)
    tissue = (smooth > hu_range[0]) & (smooth < hu_range[1])
    steps = int(round(margin_mm / float(np.mean(spacing_mm))))
    return ndimage.binary_erosion(tissue, iterations=steps) if steps > 0 else tissue


def organ_lesions(slice_hu: np.ndarray, spacing_mm, rng: np.random.Generator, *, count=(2, 6),
                  diameter_mm=(8.0, 70.0), contrast_hu=(15.0, 90.0), texture_hu=(0.0, 15.0),
                  parenchyma=None) -> tuple[np.ndarray, np.ndarray]:
    """``slice_hu`` with a cluster of hypodense lesions in one organ, and their soft mask.

    What metastases in an enhanced liver look like (several, 1-7 cm, often
    touching, 15-90 HU below the parenchyma), and what the first segmenters
    never saw: the organ is the connected piece of :func:`parenchyma_mask`
    around a random parenchyma pixel, the lesions' centres lie in it, their
    contrast (one level for the cluster, each lesion within 30 % of it) is
    confined to the organ's extent (dilated 1 mm), their diameters
    log-uniform in ``diameter_mm``. Unchanged (empty mask) when the slice has
    no parenchyma.
    """
    out = np.array(slice_hu, dtype=np.float32)
    mask = np.zeros(out.shape, dtype=np.float32)
    tissue = parenchyma_mask(out, spacing_mm) if parenchyma is None else parenchyma
    pixels = np.argwhere(tissue)
    if not len(pixels):
        return out, mask
    labels, _ = ndimage.label(tissue)
    organ = labels == labels[tuple(pixels[int(rng.integers(len(pixels)))])]
    grow = max(int(round(1.0 / float(np.mean(spacing_mm)))), 1)
    extent = ndimage.gaussian_filter(ndimage.binary_dilation(organ, iterations=grow).astype(np.float32), 0.7)
    inside = np.argwhere(organ)
    level = math.exp(rng.uniform(math.log(contrast_hu[0]), math.log(contrast_hu[1])))
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        center = inside[int(rng.integers(len(inside)))]
        diameter = math.exp(rng.uniform(math.log(diameter_mm[0]), math.log(diameter_mm[1])))
        w = extent * lesion_weight(out.shape, center, spacing_mm, diameter_mm=diameter, rng=rng,
                                   edge_mm=rng.uniform(1.0, 3.0))
        texture = rng.uniform(*texture_hu) * _smooth_field(out.shape, rng.uniform(1.0, 3.0), rng)
        # overlapping lesions share one darkening (confluent metastases are not twice as dark)
        new = np.maximum(mask, w)
        out = out + (new - mask) * (-level * rng.uniform(0.7, 1.3)) + w * texture
        mask = new
    return out, mask


def corrupt(slice_hu: np.ndarray, spacing_mm, rng: np.random.Generator, *, body=None,
            max_lesions: int = 3, diameter_mm=(3.0, 40.0), contrast_hu=(10.0, 300.0),
            replace_hu=(-150.0, 150.0), replace_probability: float = 0.4,
            texture_hu=(0.0, 25.0), organ_probability: float = 0.0,
            organ_lesion_count=(2, 6), organ_diameter_mm=(8.0, 70.0),
            organ_contrast_hu=(15.0, 90.0), tissue_probability: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``slice_hu`` with 1-``max_lesions`` synthetic lesions (module doc), and their soft mask.

    Centres are drawn inside ``body`` (default :func:`body_mask`); diameters
    log-uniform in ``diameter_mm``; an added lesion's contrast log-uniform in
    ``contrast_hu`` with a random sign; a replacing one's level uniform in
    ``replace_hu``; texture a smooth field of std uniform in ``texture_hu``.
    With probability ``organ_probability`` the slice gets, instead, a cluster
    of :func:`organ_lesions` (``organ_lesion_count`` lesions of
    ``organ_diameter_mm``, ``organ_contrast_hu`` darker than their organ) in
    the parenchyma inside ``body``; a slice without parenchyma gets the blobs
    above (so clusters are a little rarer than ``organ_probability``).
    With probability ``tissue_probability`` a blob's centre is drawn in soft
    tissue instead (:data:`LESION_TISSUE_HU`, :func:`parenchyma_mask`), where
    lesions of a few tens of HU are both common and hard to see; anywhere in
    ``body`` otherwise, or when the slice has no soft tissue.
    """
    body = body_mask(slice_hu) if body is None else body  # once, for either kind of lesion
    if organ_probability and rng.random() < organ_probability:
        out, mask = organ_lesions(slice_hu, spacing_mm, rng, count=organ_lesion_count,
                                  diameter_mm=organ_diameter_mm, contrast_hu=organ_contrast_hu,
                                  parenchyma=parenchyma_mask(slice_hu, spacing_mm) & body)
        if mask.any():
            return out, mask
    out = np.array(slice_hu, dtype=np.float32)
    mask = np.zeros(out.shape, dtype=np.float32)
    inside = np.argwhere(body)
    if not len(inside):
        return out, mask
    tissue = None
    if tissue_probability > 0:
        tissue = np.argwhere(parenchyma_mask(slice_hu, spacing_mm, hu_range=LESION_TISSUE_HU, margin_mm=2.0) & body)
    for _ in range(int(rng.integers(1, max_lesions + 1))):
        pool = tissue if tissue is not None and len(tissue) and rng.random() < tissue_probability else inside
        center = pool[int(rng.integers(len(pool)))]
        diameter = math.exp(rng.uniform(math.log(diameter_mm[0]), math.log(diameter_mm[1])))
        w = lesion_weight(out.shape, center, spacing_mm, diameter_mm=diameter, rng=rng,
                          edge_mm=rng.uniform(0.5, 2.0))
        texture = rng.uniform(*texture_hu) * _smooth_field(out.shape, rng.uniform(1.0, 3.0), rng)
        if rng.random() < replace_probability:
            level = rng.uniform(*replace_hu)
            out = out + w * (level + texture - out)
        else:
            sign = 1.0 if rng.random() < 0.5 else -1.0
            contrast = math.exp(rng.uniform(math.log(contrast_hu[0]), math.log(contrast_hu[1])))
            out = out + w * (sign * contrast + texture)
        mask = np.maximum(mask, w)
    return out, mask


#: Largest weight of a lesion pixel under ``lesion_loss_share`` (a one-pixel lesion must not
#: carry half a sample's gradient alone).
MAX_LESION_WEIGHT = 200.0


def share_weight_map(mask: np.ndarray, share: float) -> np.ndarray:
    """Per-pixel loss weights ``1 + k mask`` with ``k`` such that the lesions'
    soft ``mask`` carries ``share`` of the total weight (``k`` at most
    :data:`MAX_LESION_WEIGHT`; all ones without lesions)."""
    mask = np.asarray(mask, dtype=np.float32)
    area = float(mask.sum())
    if area <= 0.0:
        return np.ones_like(mask)
    # (1 + k) area / (n + k area) = share  ->  k = (share n - area) / ((1 - share) area)
    k = min(max(share * mask.size - area, 0.0) / ((1.0 - share) * area), MAX_LESION_WEIGHT)
    return (1.0 + k * mask).astype(np.float32)


def lesion_balance_map(mask: np.ndarray, spacing_mm, reference_mm: float,
                       max_weight: float = MAX_LESION_WEIGHT) -> np.ndarray:
    """Per-pixel loss weights that give every lesion of a binary ``mask`` (a
    connected component) at least the weight of a round lesion of
    ``reference_mm`` diameter: the pixels of a lesion of area ``a`` (mm^2)
    weigh ``max(1, A_ref / a)`` (at most ``1 + max_weight``), every other
    pixel 1. Without it a lesion counts by its pixels: at 4 mm a 10 mm lesion
    is 5 pixels, a 40 mm one 80, and the loss learns the large ones."""
    mask = np.asarray(mask, dtype=bool)
    weight = np.ones(mask.shape, dtype=np.float32)
    labels, count = ndimage.label(mask)
    if not count:
        return weight
    pixel_mm2 = float(np.prod(np.asarray(spacing_mm, dtype=float)))
    reference = math.pi * (float(reference_mm) / 2.0) ** 2
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:] * pixel_mm2
    per_lesion = np.clip(reference / areas, 1.0, 1.0 + max_weight).astype(np.float32)
    weight[mask] = per_lesion[labels[mask] - 1]
    return weight


#: Soft tissue (HU) that :func:`shift_soft_tissue` moves: fat to enhanced organs, not air or bone.
SOFT_TISSUE_HU = (-200.0, 300.0)


#: Spacing (mm) of the random nodes of :func:`shift_soft_tissue`'s field: organ scale.
SHIFT_SCALE_MM = 50.0


def shift_soft_tissue(crop_hu: np.ndarray, amplitude_hu: float, rng: np.random.Generator, *,
                      spacing_mm=(1.0, 1.0), scale_mm: float = SHIFT_SCALE_MM) -> np.ndarray:
    """``crop_hu`` with its soft tissue shifted by a smooth random field (HU).

    The field is drawn at nodes at least ``scale_mm`` apart over the crop's extent
    (``spacing_mm`` per pixel) and interpolated linearly between them: a
    random common offset of up to ``amplitude_hu`` and a node-to-node
    variation of half that (under about 2 HU per mm), at organ scale
    whatever the pixel size. Patients,
    contrast phases and scanners differ this way (an enhanced liver is 50-60
    HU above an unenhanced one); lesions do not. The first segmenter flagged
    half of a contrast-enhanced liver (LiTS) as lesion; a first form of this
    field, smooth over a third of the crop *in pixels*, varied over 25 mm at
    0.78 mm pixels, lesion scale, and taught the model to ignore the LIDC
    lesions (session 21).
    """
    from skimage.transform import resize

    out = np.array(crop_hu, dtype=np.float32)
    soft = (out > SOFT_TISSUE_HU[0]) & (out < SOFT_TISSUE_HU[1])
    extent_mm = np.array(out.shape, dtype=float) * np.asarray(spacing_mm, dtype=float)
    nodes = tuple(int(n) for n in np.maximum(2, np.floor(extent_mm / scale_mm).astype(int) + 1))  # >= scale apart
    coarse = rng.uniform(-1.0, 1.0) + 0.5 * rng.standard_normal(nodes)
    field = amplitude_hu * resize(coarse, out.shape, order=1, mode="edge", anti_aliasing=False)
    out[soft] += field[soft].astype(np.float32)
    return out


def ct_like_noise(shape, std_hu: float, rng: np.random.Generator, *, spacing_mm=(1.0, 1.0),
                  grain_mm: float = 0.7, cutoff_mm: float = 3.0) -> np.ndarray:
    """Band-limited Gaussian noise (HU, std ``std_hu``) with CT noise's texture.

    Filtered back-projection leaves noise without its lowest frequencies (the
    ramp filter) and without the finest (the kernel): white noise blurred
    by ``grain_mm`` less the same noise blurred by ``cutoff_mm``, in mm at
    any pixel size. Scanners, doses and kernels differ this way and lesions
    do not: the segmenters flagged the grainy fat of a noisy 1 mm chest CT
    (session 21). Measured in stage 4 (session 22) it did the opposite: 0-40 HU
    of it on half the inputs made the segmenter flag 18 % of that chest; the
    bundled model trained without it.
    """
    white = rng.standard_normal(shape).astype(np.float32)
    spacing = np.asarray(spacing_mm, dtype=float)
    fine = ndimage.gaussian_filter(white, grain_mm / spacing)
    band = fine - ndimage.gaussian_filter(white, cutoff_mm / spacing)
    return (band * (std_hu / max(float(band.std()), 1e-6))).astype(np.float32)


#: What a sample's image is (``data.target``): the healthy crop or the lesions' 0/1 mask.
TARGETS = ("healthy", "lesion_mask")


class LesionHealingPairs(SampleStream):
    """Endless stream of (healthy, with synthetic lesions) axial crops (module docstring)."""

    def __init__(self, volumes: list[TrainingVolume], data_config: dict, normalization: dict,
                 *, seed: int = 0, rank: int = 0, part: str = "train"):
        super().__init__()
        self.volumes = volumes
        self.patch = int(data_config["patch_size"])
        self.seed, self.rank, self.part = seed, rank, part
        self.augment = bool(data_config.get("augment", False)) and part == "train"
        self.residual_scale = float(data_config.get("residual_scale") or 0.0)
        self.clean_probability = float(data_config.get("clean_probability", 0.2))
        # the lesions are a few per cent of the pixels: their squared error counts
        # 1 + lesion_loss_weight times (else the loss barely sees them)
        self.lesion_loss_weight = float(data_config.get("lesion_loss_weight", 0.0))
        # or, per sample, the weight that gives the lesions' pixels this share of the sample's
        # loss: a 10 mm lesion at 4 mm is 0.1 % of a 96 px crop, and with a fixed weight of 10 the
        # loss still barely saw it (stage 2 learnt to leave every slice as it was)
        self.lesion_loss_share = float(data_config.get("lesion_loss_share", 0.0))
        if not 0.0 <= self.lesion_loss_share < 1.0:
            raise ValueError(f"data.lesion_loss_share must be in [0, 1), got {self.lesion_loss_share}")
        if self.lesion_loss_share and self.lesion_loss_weight:
            raise ValueError("data.lesion_loss_weight and data.lesion_loss_share: give one of them")
        lesions = dict(data_config.get("lesions") or {})
        unknown = set(lesions) - {"max_lesions", "diameter_mm", "contrast_hu", "replace_hu",
                                  "replace_probability", "texture_hu", "organ_probability",
                                  "organ_lesion_count", "organ_diameter_mm", "organ_contrast_hu",
                                  "tissue_probability"}
        if unknown:
            raise ValueError(f"data.lesions: unknown keys {sorted(unknown)}")
        self.lesions = lesions
        # organ-scale soft-tissue level changes (shift_soft_tissue), applied to the healthy crop
        # before the lesions, so they are part of normal anatomy in both target kinds
        self.level_shift_hu = float(data_config.get("level_shift_hu", 0.0)) if part == "train" else 0.0
        self.level_shift_probability = float(data_config.get("level_shift_probability", 0.5))
        # extra CT-like noise on the input (ct_like_noise), std uniform in noise_hu: noise is no lesion
        noise_hu = data_config.get("noise_hu") or (0.0, 0.0)
        if (not isinstance(noise_hu, (list, tuple)) or len(noise_hu) != 2
                or not 0.0 <= float(noise_hu[0]) <= float(noise_hu[1])):
            raise ValueError(f"data.noise_hu must be [low, high] HU with 0 <= low <= high, got {noise_hu!r}")
        self.noise_hu = (float(noise_hu[0]), float(noise_hu[1])) if part == "train" else (0.0, 0.0)
        self.noise_probability = float(data_config.get("noise_probability", 0.5))
        if not 0.0 <= self.noise_probability <= 1.0:
            raise ValueError(f"data.noise_probability must be in [0, 1], got {self.noise_probability}")
        self.target = data_config.get("target", "healthy")
        if self.target not in TARGETS:
            raise ValueError(f"data.target must be one of {TARGETS}, got {self.target!r}")
        if self.target == "lesion_mask" and (self.residual_scale or self.lesion_loss_share
                                             or self.lesion_loss_weight):
            raise ValueError("data.target lesion_mask: residual_scale, lesion_loss_share and "
                             "lesion_loss_weight belong to the healing target; remove them")
        # segmenter: each lesion weighs at least as much as one of this diameter (lesion_balance_map)
        self.lesion_balance_mm = float(data_config.get("lesion_balance_mm", 0.0))
        if self.lesion_balance_mm < 0 or (self.lesion_balance_mm and self.target != "lesion_mask"):
            raise ValueError("data.lesion_balance_mm must be a diameter in mm >= 0, and belongs to the "
                             f"lesion_mask target; got {self.lesion_balance_mm} with target {self.target!r}")
        if self.target == "healthy" and float(noise_hu[1]) > 0:
            raise ValueError("data.noise_hu belongs to the lesion_mask target (a healing model would learn "
                             "to denoise); remove it")
        self.low, self.high = float(normalization["low"]), float(normalization["high"])
        self.volume_p = volume_probabilities([v.data.size for v in volumes], [v.region for v in volumes],
                                             data_config.get("region_weights"))

    def _to_hu(self, x):
        return (x + 1.0) * (self.high - self.low) / 2.0 + self.low

    def _to_units(self, hu):
        return np.clip(2.0 * (hu - self.low) / (self.high - self.low) - 1.0, -1.0, 1.0)

    def sample(self, rng: np.random.Generator, augment=None) -> dict:
        volume = self.volumes[int(rng.choice(len(self.volumes), p=self.volume_p))]
        index = int(rng.integers(volume.data.shape[0]))
        clean = np.asarray(volume.data[index], dtype=np.float32)
        hu = self._to_hu(clean)
        body = body_mask(hu)
        # the crop: centred near a body pixel (most crops of a 512 px slice are otherwise air)
        h, w = clean.shape
        size = self.patch
        padded = max(h, size), max(w, size)
        inside = np.argwhere(body)
        if len(inside):
            cr, cc = inside[int(rng.integers(len(inside)))]
        else:
            cr, cc = h // 2, w // 2
        r0 = int(np.clip(cr - size // 2 + rng.integers(-size // 4, size // 4 + 1), 0, padded[0] - size))
        c0 = int(np.clip(cc - size // 2 + rng.integers(-size // 4, size // 4 + 1), 0, padded[1] - size))
        crop_hu = np.full((size, size), self.low, dtype=np.float32)
        crop_body = np.zeros((size, size), dtype=bool)
        part = hu[r0:r0 + size, c0:c0 + size]
        crop_hu[:part.shape[0], :part.shape[1]] = part
        crop_body[:part.shape[0], :part.shape[1]] = body[r0:r0 + size, c0:c0 + size]
        if self.level_shift_hu and rng.random() < self.level_shift_probability:
            crop_hu = shift_soft_tissue(crop_hu, self.level_shift_hu, rng, spacing_mm=volume.spacing_mm[1:])
        if rng.random() < self.clean_probability or not crop_body.any():
            corrupted_hu, lesions = crop_hu, np.zeros_like(crop_hu)
        else:
            corrupted_hu, lesions = corrupt(crop_hu, volume.spacing_mm[1:], rng, body=crop_body, **self.lesions)
        if self.noise_hu[1] > 0 and rng.random() < self.noise_probability:
            corrupted_hu = corrupted_hu + ct_like_noise(corrupted_hu.shape, rng.uniform(*self.noise_hu), rng,
                                                        spacing_mm=volume.spacing_mm[1:])
        planes = np.stack([self._to_units(crop_hu), self._to_units(corrupted_hu), lesions]).astype(np.float32)
        if augment is not None:
            if rng.random() < 0.5:
                planes = planes[:, :, ::-1]
            if rng.random() < 0.5:
                planes = planes[:, ::-1]
        coords = coordinate_grid([(r0, r0 + size), (c0, c0 + size)], (h, w)).numpy()
        if self.target == "lesion_mask":
            planes = np.stack([(planes[2] >= 0.5).astype(np.float32), planes[1]])
            sample = restoration_sample(np.ascontiguousarray(planes), coords, volume.region)
            if self.lesion_balance_mm:
                sample["weight_map"] = torch.from_numpy(
                    lesion_balance_map(planes[0] > 0.5, volume.spacing_mm[1:], self.lesion_balance_mm)[None])
            return sample
        sample = restoration_sample(np.ascontiguousarray(planes[:2]), coords, volume.region, self.residual_scale)
        if self.lesion_loss_weight:
            sample["weight_map"] = torch.from_numpy(1.0 + self.lesion_loss_weight * planes[2:3])
        elif self.lesion_loss_share:
            sample["weight_map"] = torch.from_numpy(share_weight_map(planes[2:3], self.lesion_loss_share))
        return sample

    def augmentation(self, seed: int):
        return True if self.augment else None


def make_datasets(config: dict, *, seed: int = 0, rank: int = 0, start_step: int = 0):
    """(train, validation) streams of a ``data.kind: lesion_healing`` config."""
    data, norm = config["data"], config["normalization"]
    if norm.get("type") != "hu_window":
        raise ValueError("data.kind lesion_healing needs normalization type hu_window")
    if data.get("pixel_sizes_mm") or data.get("spacing_mm"):
        raise ValueError("data.kind lesion_healing keeps each scan's own pixel size: "
                         "remove pixel_sizes_mm / spacing_mm")
    train = LesionHealingPairs(load_volumes(data, norm), data, norm, seed=seed, rank=rank)
    train.start_step = start_step
    return train, LesionHealingPairs(load_volumes(data, norm, split="validation"), data, norm, seed=seed,
                                     part="val")
