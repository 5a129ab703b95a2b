"""Synthetic lesions inserted into real CT, for evaluating anomaly detection.

A lesion is a lobulated blob of a requested size (equivalent diameter in mm)
inside an organ mask, with a soft (partial-volume) edge and internal texture,
*added* to the real image so the organ's own noise and texture stay
underneath:

* shape: an ellipsoid (random axis ratios 0.8-1.25, random orientation)
  whose distance field is perturbed by smooth noise (irregular, lobulated
  border); the boundary level is chosen so the region inside the organ has
  exactly the requested area (2D) or volume (3D), to one voxel;
* edge: the contrast ramps over ``edge_mm`` (partial volume), the ground
  truth being the voxels at or above half contrast;
* texture: correlated noise of relative amplitude ``texture`` (heterogeneous
  enhancement), and for lesions of 15 mm and more, in half of the cases, a
  central hypodense core (necrosis / cystic change);
* contrast: the HU difference to the surrounding tissue, negative
  (hypodense: metastases, cysts) or positive (hyperdense: hypervascular
  lesions, haemorrhage).

Works on 2D slices and 3D volumes alike (``spacing`` gives the axes' mm).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage


@dataclass
class Lesion:
    """One inserted lesion: where, how big, how bright."""

    center: tuple           # voxel index
    diameter_mm: float      # requested equivalent diameter
    contrast_hu: float      # requested HU difference to the surrounding tissue
    organ: str = ""
    measured_diameter_mm: float = 0.0   # equivalent diameter of the ground-truth mask
    measured_contrast_hu: float = 0.0   # median HU change inside the mask
    voxels: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "hypo" if self.contrast_hu < 0 else "hyper"


def equivalent_diameter_mm(count: int, spacing) -> float:
    """Diameter (mm) of the disc (2D) or ball (3D) of ``count`` voxels' area/volume."""
    measure = count * float(np.prod(spacing))
    if len(spacing) == 2:
        return 2.0 * math.sqrt(measure / math.pi)
    return (6.0 * measure / math.pi) ** (1.0 / 3.0)


def _target_measure(diameter_mm: float, ndim: int) -> float:
    r = diameter_mm / 2.0
    return math.pi * r * r if ndim == 2 else 4.0 / 3.0 * math.pi * r ** 3


def _smooth_noise(shape, sigma_vox, rng: np.random.Generator) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_vox, mode="wrap")
    std = noise.std()
    return noise / std if std > 0 else noise


def _random_rotation(ndim: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((ndim, ndim)))
    return q * np.sign(np.diag(r))


def insert_lesion(image: np.ndarray, organ: np.ndarray, spacing: Sequence[float], *, diameter_mm: float,
                  contrast_hu: float, rng: np.random.Generator, center=None, irregularity: float = 0.2,
                  texture: float = 0.25, edge_mm: float = 1.5, necrosis: Optional[bool] = None,
                  min_inside: float = 0.9, max_tries: int = 100, organ_name: str = ""):
    """Insert one lesion into ``image`` inside ``organ``.

    Parameters
    ----------
    image : ndarray (2D or 3D)
        HU values; not modified.
    organ : ndarray of bool, same shape
        Where the lesion may lie; it is clipped to the organ.
    spacing : sequence of float
        Voxel size (mm) of each axis.
    diameter_mm : float
        Equivalent diameter of the lesion (mm).
    contrast_hu : float
        HU difference to the tissue (negative: hypodense).
    rng : numpy Generator
    center : sequence of int, optional
        Voxel of the centre; random inside the organ otherwise.
    irregularity : float
        Amplitude of the border perturbation (0 = smooth ellipsoid).
    texture : float
        Relative amplitude of the internal correlated noise.
    edge_mm : float
        Width of the partial-volume ramp at the border.
    necrosis : bool, optional
        Force a central hypodense core (default: random for lesions >= 15 mm).
    min_inside : float
        A random centre is accepted when at least this fraction of the
        nominal lesion lies in the organ.

    Returns
    -------
    (new_image float32, lesion_mask bool, Lesion)

    Raises
    ------
    ValueError
        The organ is empty or too small for the lesion.
    """
    image = np.asarray(image, dtype=np.float32)
    organ = np.asarray(organ, dtype=bool)
    spacing = np.asarray(spacing, dtype=float)
    ndim = image.ndim
    if organ.shape != image.shape or len(spacing) != ndim:
        raise ValueError("image, organ and spacing must have matching dimensions")
    if not organ.any():
        raise ValueError("the organ mask is empty")
    radius = diameter_mm / 2.0
    half = np.ceil((1.8 * radius + 2 * edge_mm) / spacing).astype(int) + 2
    candidates = np.argwhere(organ)
    for attempt in range(max_tries):
        c = np.asarray(center if center is not None else candidates[rng.integers(len(candidates))], int)
        lo = np.maximum(c - half, 0)
        hi = np.minimum(c + half + 1, image.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        coords = np.meshgrid(*[(np.arange(a, b) - ci) * s for a, b, ci, s in zip(lo, hi, c, spacing)],
                             indexing="ij")
        pts = np.stack(coords, axis=-1)                      # (..., ndim) mm from the centre
        axes = np.exp(rng.uniform(math.log(0.8), math.log(1.25), ndim))
        axes /= np.prod(axes) ** (1.0 / ndim)                # same area/volume as the sphere
        local = pts @ _random_rotation(ndim, rng)
        dist = np.sqrt(((local / axes) ** 2).sum(-1)) / radius
        sigma_vox = np.maximum(0.35 * radius / spacing, 0.5)
        dist = dist * (1.0 + irregularity * np.clip(_smooth_noise(dist.shape, sigma_vox, rng), -1.5, 1.5))
        inside_org = organ[box]
        nominal = dist <= 1.0
        if center is None and (nominal.sum() == 0 or (nominal & inside_org).sum() < min_inside * nominal.sum()):
            continue
        # boundary level so the lesion (inside the organ) has the requested size
        target = _target_measure(diameter_mm, ndim) / float(np.prod(spacing))
        values = np.sort(dist[inside_org])
        k = int(round(target))
        if k < 1 or k > len(values):
            if center is not None:
                raise ValueError(f"a {diameter_mm} mm lesion does not fit the organ at {tuple(c)}")
            continue
        level = float(values[k - 1]) if k == len(values) else 0.5 * float(values[k - 1] + values[k])
        width = max(edge_mm / radius, 1e-3)
        alpha = np.clip(0.5 + (level - dist) / width, 0.0, 1.0) * inside_org
        mask_local = (dist <= level) & inside_org
        if not mask_local.any():
            continue
        # texture and an optional necrotic core
        tex = _smooth_noise(dist.shape, np.maximum(1.5 / spacing, 0.5), rng)
        profile = contrast_hu * (1.0 + texture * np.clip(tex, -2.5, 2.5))
        has_core = (diameter_mm >= 15 and rng.random() < 0.5) if necrosis is None else bool(necrosis)
        if has_core:
            core = np.clip(0.5 + (0.45 * level - dist) / width, 0.0, 1.0)
            profile = profile - core * 0.5 * abs(contrast_hu)
        out = image.copy()
        out[box] = np.maximum(image[box] + alpha * profile, -1024.0)
        mask = np.zeros(image.shape, dtype=bool)
        mask[box] = mask_local
        change = (out - image)[mask]
        lesion = Lesion(center=tuple(int(v) for v in c), diameter_mm=float(diameter_mm),
                        contrast_hu=float(contrast_hu), organ=organ_name,
                        measured_diameter_mm=equivalent_diameter_mm(int(mask.sum()), spacing),
                        measured_contrast_hu=float(np.median(change)), voxels=int(mask.sum()),
                        extra={"necrotic_core": bool(has_core), "attempts": attempt + 1})
        return out, mask, lesion
    raise ValueError(f"could not place a {diameter_mm:.0f} mm lesion in the organ "
                     f"{organ_name or ''} ({int(organ.sum())} voxels) after {max_tries} tries")


def random_lesion(image: np.ndarray, organs: dict, spacing, rng: np.random.Generator, *,
                  size_range_mm=(10.0, 30.0), contrast_range_hu=(30.0, 90.0), kind: Optional[str] = None,
                  organ_weights: Optional[dict] = None, **kwargs):
    """Insert one lesion of random size, contrast, kind and organ.

    Parameters
    ----------
    organs : dict name -> bool array
        Candidate organs (empty ones are skipped).
    size_range_mm, contrast_range_hu : (float, float)
        Uniform ranges of equivalent diameter and |contrast|.
    kind : {'hypo', 'hyper'}, optional
        Random (50 %) by default.
    organ_weights : dict, optional
        Relative probability of each organ (equal by default).

    Returns ``(new_image, mask, Lesion)``; organs too small for the drawn
    size are skipped in turn.
    """
    names = [n for n, m in organs.items() if np.any(m)]
    if not names:
        raise ValueError("no non-empty organ to place a lesion in")
    weights = np.array([(organ_weights or {}).get(n, 1.0) for n in names], dtype=float)
    diameter = float(rng.uniform(*size_range_mm))
    magnitude = float(rng.uniform(*contrast_range_hu))
    kind = kind or ("hypo" if rng.random() < 0.5 else "hyper")
    contrast = -magnitude if kind == "hypo" else magnitude
    order = list(rng.choice(len(names), size=len(names), replace=False, p=weights / weights.sum()))
    last_error = None
    for i in order:
        try:
            return insert_lesion(image, organs[names[i]], spacing, diameter_mm=diameter, contrast_hu=contrast,
                                 rng=rng, organ_name=names[i], **kwargs)
        except ValueError as exc:
            last_error = exc
    raise ValueError(f"no organ can hold a {diameter:.0f} mm lesion ({last_error})")
