"""Training data for the learned low-dose CT denoiser (``data.kind: low_dose``).

Pairs are made from real CT with the low-dose simulator of
:mod:`training.degrade` (Poisson and electronic noise in the sinogram,
filtered back-projection): for a few axial slices of every training volume,
at its own pixel size, the noise of a reduced dose is simulated once (the
dose fraction drawn in ``dose_range``, the reconstruction filter from
``filters`` and the full-dose photons from ``photons``, so one model sees
ramp-filtered and apodised noise textures of several levels). ``photons:
auto`` matches each slice's full dose to its own noise
(:func:`training.degrade.matched_photons`), so a dose fraction means the same
noise increase on a 4 mm neck box as on a 0.8 mm chest slice. Simulating a
512 x 512 slice takes seconds, so the noise images are kept in a bank
(saved beside the run, ``noise_bank.npz``, and reused when the run
resumes) and each sample is a random crop of a (clean, clean + s x noise)
pair, with ``s`` drawn in ``noise_scale_range`` (a dose change scales the
added noise) and random flips. With ``noise_texture: {probability: p,
blur_px: [a, b]}`` a share p of the samples get, instead of the bank's
filtered back-projection noise, Gaussian white noise blurred by a Gaussian of
a-b pixels and scaled to the bank noise's std: other reconstruction kernels
and iterative reconstructions make other textures, and a model that saw only
the simulator's learns to remove that texture alone. The clean slice is the image, the noisy
one the condition; with ``residual_scale`` r the image is ``r (clean -
noisy)`` instead, a correction of the low-dose slice (the card records r).

Validation pairs come from the ``data.validation`` patients (never trained on).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .data import (RestorationCrops, TrainingVolume, load_volumes, restoration_sample, stacked_patch,
                   volume_probabilities)

log = logging.getLogger(__name__)

#: Slices of at least this many pixels count as large (clinical 256-512 px
#: slices): they get ``large_slices_per_volume`` bank slices, the small
#: 128 x 128 neck boxes ``slices_per_volume``.
LARGE_SLICE_PIXELS = 50_000


def axial_indices(n: int, count: int, margin: float = 0.1) -> np.ndarray:
    """``count`` axial indices spread over the central part of ``n`` slices."""
    low, high = int(margin * n), max(int(margin * n), n - 1 - int(margin * n))
    return np.unique(np.linspace(low, high, max(1, count)).round().astype(int))


def simulate_bank(volumes: list[TrainingVolume], hu_volumes: list[np.ndarray], data_config: dict, *,
                  seed: int = 0) -> list[dict]:
    """Noise images (HU) of simulated reduced doses for a few slices of every volume.

    ``hu_volumes`` are the volumes in HU (the simulator works in
    attenuation). Returns one dict per slice: ``volume``, ``slice``,
    ``noise`` (float32 HU), ``dose``, ``filter``, ``photons``.
    """
    from .degrade import low_dose_noise, matched_photons

    rng = np.random.default_rng(seed)
    per_volume = int(data_config.get("slices_per_volume", 2))
    per_large = int(data_config.get("large_slices_per_volume", per_volume))
    dose_low, dose_high = data_config.get("dose_range", [0.15, 0.5])
    filters = list(data_config.get("filters", ["ramp", "shepp-logan"]))
    photons = data_config.get("photons", [8e5, 4e5])
    matched = photons == "auto"  # each slice's own noise sets its full dose (degrade.matched_photons)
    bank = []
    for i, (volume, hu) in enumerate(zip(volumes, hu_volumes)):
        count = per_large if hu.shape[1] * hu.shape[2] >= LARGE_SLICE_PIXELS else per_volume
        pixel_mm = float(np.mean(volume.spacing_mm[1:]))
        for z in axial_indices(hu.shape[0], count):
            dose = float(rng.uniform(dose_low, dose_high))
            name = filters[int(rng.integers(len(filters)))]
            if matched:
                try:
                    i0 = matched_photons(hu[z], pixel_mm, filter_name=name, seed=int(rng.integers(2**31)),
                                         iterations=1)
                except ValueError:  # no soft tissue in this slice: nothing to calibrate on
                    continue
            else:
                i0 = float(photons[int(rng.integers(len(photons)))])
            noise = low_dose_noise(hu[z], pixel_mm, dose, photons=i0, rng=rng, filter_name=name)
            bank.append({"volume": i, "slice": int(z), "noise": noise.astype(np.float32), "dose": dose,
                         "filter": name, "photons": i0})
    return bank


def save_bank(path: Path, bank: list[dict]) -> None:
    arrays = {f"noise_{k}": b["noise"] for k, b in enumerate(bank)}
    meta = np.array([(b["volume"], b["slice"], b["dose"], b["photons"]) for b in bank], dtype=np.float64)
    np.savez_compressed(path, meta=meta, filters=np.array([b["filter"] for b in bank]), **arrays)


def load_bank(path: Path) -> list[dict]:
    with np.load(path) as f:
        meta, filters = f["meta"], f["filters"]
        return [{"volume": int(m[0]), "slice": int(m[1]), "dose": float(m[2]), "photons": float(m[3]),
                 "filter": str(filters[k]), "noise": f[f"noise_{k}"]} for k, m in enumerate(meta)]


class LowDosePairs(RestorationCrops):
    """Endless stream of (clean, simulated low-dose) axial patches (module docstring)."""

    def __init__(self, volumes: list[TrainingVolume], bank: list[dict], data_config: dict, normalization: dict,
                 *, seed: int = 0, rank: int = 0, part: str = "train"):
        super().__init__(data_config, seed=seed, rank=rank, part=part)
        self.volumes, self.bank = volumes, bank
        self.scale_range = tuple(data_config.get("noise_scale_range", [0.7, 1.4])) if part == "train" else (1.0, 1.0)
        texture = data_config.get("noise_texture") or {}
        self.texture_p = float(texture.get("probability", 0.0)) if part == "train" else 0.0
        try:
            low_px, high_px = (float(v) for v in texture.get("blur_px", [0.0, 1.5]))
        except (TypeError, ValueError):
            low_px, high_px = -1.0, -1.0  # reported below
        self.texture_blur_px = (low_px, high_px)
        if not 0.0 <= self.texture_p <= 1.0 or not 0.0 <= low_px <= high_px:
            raise ValueError(f"data.noise_texture needs a probability in [0, 1] and blur_px [low, high] with "
                             f"0 <= low <= high, got {texture}")
        low, high = float(normalization["low"]), float(normalization["high"])
        self.units_per_hu = 2.0 / (high - low)  # hu_window: a noise of 1 HU in normalised units
        # loss_weighting: inverse_noise weighs each sample by (reference_noise_hu / its added noise)^power
        weighting = data_config.get("loss_weighting") or {}
        if weighting and weighting.get("type") != "inverse_noise":
            raise ValueError(f"data.loss_weighting type must be inverse_noise, got {weighting.get('type')!r}")
        self.noise_weighting = bool(weighting)
        self.reference_noise_hu = float(weighting.get("reference_noise_hu", 10.0))
        self.weight_bounds = tuple(weighting.get("bounds", [0.05, 20.0]))
        self.weight_power = float(weighting.get("power", 2.0))  # 1: inverse std, a gentler balance
        per_volume = volume_probabilities([v.data.size for v in volumes], [v.region for v in volumes],
                                          data_config.get("region_weights"))
        counts = np.bincount([b["volume"] for b in bank], minlength=len(volumes))
        p = np.array([per_volume[b["volume"]] / counts[b["volume"]] for b in bank])
        self.bank_p = p / p.sum()

    def sample(self, rng: np.random.Generator, augment=None) -> dict:
        entry = self.bank[int(rng.choice(len(self.bank), p=self.bank_p))]
        volume = self.volumes[entry["volume"]]
        clean = volume.data[entry["slice"]]
        scale = float(rng.uniform(*self.scale_range))
        noise = entry["noise"]
        if self.texture_p and rng.random() < self.texture_p:
            noise = other_texture(noise, float(rng.uniform(*self.texture_blur_px)), rng)
        noisy = np.clip(clean + scale * self.units_per_hu * noise, -1.0, 1.0)
        both = np.stack([clean, noisy]).astype(np.float32)
        if augment is not None:
            if rng.random() < 0.5:
                both = both[:, :, ::-1]
            if rng.random() < 0.5:
                both = both[:, ::-1]
        crop, coords = stacked_patch(np.ascontiguousarray(both), self.patch, rng)
        sample = restoration_sample(crop, coords, volume.region, self.residual_scale)
        if self.noise_weighting:
            sample["weight"] = torch.tensor(self._inverse_noise_weight(crop), dtype=torch.float32)
        return sample

    def _inverse_noise_weight(self, crop: np.ndarray) -> float:
        """(reference / added noise std)^power of a (clean, noisy) crop, bounded: the
        squared error of a 3 HU neck-box correction then counts as much as that of
        a 30 HU chest one, instead of 100 times less (the model then learned to
        smooth every scan alike, texture included)."""
        added_hu = float(np.std(crop[1] - crop[0])) / self.units_per_hu
        low, high = self.weight_bounds
        return float(np.clip((self.reference_noise_hu / max(added_hu, 1e-3)) ** self.weight_power, low, high))


def other_texture(noise: np.ndarray, blur_px: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian white noise blurred by ``blur_px`` pixels (0: white), with the std of ``noise`` (HU)."""
    from scipy import ndimage

    white = rng.standard_normal(noise.shape, dtype=np.float32)
    if blur_px > 0:
        white = ndimage.gaussian_filter(white, blur_px)
    return white * np.float32(float(np.std(noise)) / max(float(np.std(white)), 1e-12))


def _hu(volume: TrainingVolume, normalization: dict) -> np.ndarray:
    low, high = float(normalization["low"]), float(normalization["high"])
    return (volume.data.astype(np.float32) + 1.0) * (high - low) / 2.0 + low


def _bank_for(volumes, data_config, normalization, *, seed: int, cache: Path | None) -> list[dict]:
    if cache is not None and cache.exists():
        bank = load_bank(cache)
        log.info("noise bank: %d slices from %s", len(bank), cache)
        return bank
    bank = simulate_bank(volumes, [_hu(v, normalization) for v in volumes], data_config, seed=seed)
    log.info("noise bank: simulated %d slices", len(bank))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_bank(cache, bank)
    return bank


def make_datasets(config: dict, *, seed: int = 0, rank: int = 0, start_step: int = 0, output=None):
    """(train, validation) streams of a ``data.kind: low_dose`` config; the
    noise banks are cached in ``output`` (the run folder) when given."""
    data, norm = config["data"], config["normalization"]
    if norm.get("type") != "hu_window":
        raise ValueError("data.kind low_dose needs normalization type hu_window")
    if data.get("pixel_sizes_mm") or data.get("spacing_mm"):
        raise ValueError("data.kind low_dose keeps each scan's own pixel size: remove pixel_sizes_mm / spacing_mm")
    out = Path(output) if output and rank == 0 else None  # one process writes the cache
    train_volumes = load_volumes(data, norm)
    val_volumes = load_volumes(data, norm, split="validation")
    val_config = dict(data, slices_per_volume=int(data.get("validation_slices_per_volume", 1)),
                      large_slices_per_volume=int(data.get("validation_slices_per_volume", 1)))
    train_bank = _bank_for(train_volumes, data, norm, seed=seed, cache=out / "noise_bank.npz" if out else None)
    val_bank = _bank_for(val_volumes, val_config, norm, seed=seed + 1,
                         cache=out / "noise_bank_val.npz" if out else None)
    train = LowDosePairs(train_volumes, train_bank, data, norm, seed=seed, rank=rank)
    train.start_step = start_step
    return train, LowDosePairs(val_volumes, val_bank, data, norm, seed=seed, part="val")
