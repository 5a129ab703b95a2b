"""Degradation simulators: low-dose CT and thick slices, from real scans.

There is no real low-dose / normal-dose pair and no thick / thin pair in the
project's data, so the restoration tasks are trained and evaluated on
degradations simulated from real normal-dose, thin-slice CT:

* :func:`simulate_low_dose`: Poisson (quantum) plus Gaussian (electronic)
  noise on the transmitted counts of a parallel-beam sinogram, reconstructed
  by filtered back-projection and **added to the original** (the original
  normal-dose image already carries the noise of the full dose; only the extra
  noise of the reduced dose is added, as in Yu et al., Med. Phys. 2012 and
  Zeng et al., Med. Phys. 2015).
* :func:`simulate_thick_slices`: thick slices as the average of the thin
  slices over each slab (box slice profile), with the geometry of the thick
  series, the same operator ``H`` the super-resolution inverts
  (:class:`napari_mediffuse.tasks.diffpir.SlabOperator`).
"""
from __future__ import annotations

import numpy as np

from napari_mediffuse.io.volume import Volume
from napari_mediffuse.tasks.diffpir import SlabOperator

#: Linear attenuation of water, 1/mm (about 70 keV, the effective energy of a 120 kVp beam).
MU_WATER_PER_MM = 0.0192

#: Incident photons per detector bin and view at full dose. Chosen so that a
#: quarter dose adds about 25 HU (std) of noise in the soft tissue of the
#: project's 3 mm abdominal CT with the default geometry (the order of the
#: extra noise of the Mayo 2016 quarter-dose scans).
DEFAULT_PHOTONS = 8.0e5

#: Electronic noise std, in detected-photon units (Zeng et al. use ~10).
DEFAULT_ELECTRONIC_NOISE = 10.0


def hu_to_mu(hu: np.ndarray, mu_water: float = MU_WATER_PER_MM) -> np.ndarray:
    """Hounsfield units -> linear attenuation (1/mm), air (<= -1000 HU) -> 0."""
    return np.clip(mu_water * (1.0 + np.asarray(hu, dtype=np.float64) / 1000.0), 0.0, None)


def mu_to_hu(mu: np.ndarray, mu_water: float = MU_WATER_PER_MM) -> np.ndarray:
    """Linear attenuation (1/mm) -> Hounsfield units."""
    return 1000.0 * (np.asarray(mu, dtype=np.float64) / mu_water - 1.0)


def low_dose_noise(slice_hu: np.ndarray, pixel_mm: float, dose_fraction: float, *,
                   photons: float = DEFAULT_PHOTONS, electronic_noise: float = DEFAULT_ELECTRONIC_NOISE,
                   views: int | None = None, rng: np.random.Generator | None = None,
                   filter_name: str = "ramp") -> np.ndarray:
    """Extra noise (HU) of a dose reduction, for one 2D slice.

    Parameters
    ----------
    slice_hu : ndarray (H, W)
        Normal-dose slice, HU.
    pixel_mm : float
        Pixel size (mm); detector bins have the same size.
    dose_fraction : float
        Dose of the simulated scan relative to the original, in (0, 1].
    photons : float
        Incident photons per detector bin and view at full dose (I0).
    electronic_noise : float
        Std of the Gaussian electronic noise, in photons.
    views : int, optional
        Projection angles over 180 degrees (default: about 1.5 x the image
        side, at least 180).
    rng : numpy Generator
    filter_name : str
        Reconstruction filter of the noise (``skimage.transform.iradon``):
        ``"ramp"`` (default) or an apodised one (``"hann"``, ``"cosine"``,
        ``"shepp-logan"``), closer to a scanner's soft-tissue kernel (see the
        noise power spectrum in docs/evaluation/restoration.md).

    Returns
    -------
    ndarray (H, W)
        Noise image in HU, to add to ``slice_hu``.
    """
    from skimage.transform import iradon, radon

    if not 0.0 < dose_fraction <= 1.0:
        raise ValueError(f"dose_fraction must be in (0, 1], got {dose_fraction}")
    rng = rng or np.random.default_rng()
    h, w = slice_hu.shape
    if dose_fraction == 1.0:
        return np.zeros((h, w), dtype=np.float32)
    side = max(h, w)
    mu = np.zeros((side, side))
    top, left = (side - h) // 2, (side - w) // 2
    mu[top:top + h, left:left + w] = hu_to_mu(slice_hu)
    views = int(views or max(180, int(round(1.5 * side))))
    theta = np.linspace(0.0, 180.0, views, endpoint=False)
    line_integrals = radon(mu, theta=theta, circle=False) * pixel_mm  # dimensionless
    # noisy counts at the reduced dose: Poisson (quantum) + Gaussian (electronic)
    expected = dose_fraction * photons * np.exp(-line_integrals)
    counts = rng.poisson(expected).astype(np.float64)
    counts += rng.normal(0.0, electronic_noise, size=counts.shape)
    counts = np.maximum(counts, 1.0)  # log of non-positive counts: clamp as scanners do
    noisy = -np.log(counts / (dose_fraction * photons))
    # The original already carries the noise of the full dose (variance ~ 1/I0);
    # the total at dose a must be ~ 1/(a I0): add sqrt(1 - a) of a dose-a realisation.
    extra = (noisy - line_integrals) * np.sqrt(1.0 - dose_fraction)
    noise_mu = iradon(extra / pixel_mm, theta=theta, filter_name=filter_name, circle=False,
                      output_size=side)
    noise_hu = noise_mu * (1000.0 / MU_WATER_PER_MM)  # a difference of attenuations
    return noise_hu[top:top + h, left:left + w].astype(np.float32)


def matched_photons(slices_hu: np.ndarray, pixel_mm: float, *, filter_name: str = "ramp",
                    electronic_noise: float = DEFAULT_ELECTRONIC_NOISE, views: int | None = None,
                    seed: int | None = 0, iterations: int = 2) -> float:
    """Full-dose photons at which the simulator's noise reads like the scan's own.

    A fixed photon count suits one scanner, pixel size and patient size only
    (:data:`DEFAULT_PHOTONS` gives 25 HU extra noise at a quarter dose of the
    3 mm abdominal CT, but 6 HU on the 4-5 mm OpenKBP neck boxes, whose own
    noise reads about 20 HU: a "quarter dose" there was a 90 % dose). This
    finds ``I0`` such that the simulator's full-dose noise, read by the
    denoiser's noise estimator (Haar HH detail over soft tissue,
    :func:`napari_mediffuse.tasks.denoise.estimate_noise_hu`), equals the
    estimator's reading of the scan itself; a dose fraction ``a`` then adds
    ``sqrt(1/a - 1)`` times the scan's own noise, as a real ``a`` dose would.
    Both readings use the same estimator and mask, so its bias for correlated
    noise cancels; anatomy texture the estimator mistakes for noise makes the
    simulated dose lower, never higher.

    Parameters
    ----------
    slices_hu : ndarray (H, W) or (N, H, W)
        Normal-dose slices (HU) of one scan; the median over slices is used.
    pixel_mm : float
        Pixel size (mm).
    filter_name, electronic_noise, views
        As in :func:`low_dose_noise` (the noise texture the estimate is made with).
    seed : int
        Seed of the calibration's noise draws.
    iterations : int
        Rescalings (noise variance is ``1/I0`` plus an electronic term in
        ``1/I0**2``, so one rescaling is not exact).

    Returns
    -------
    float
        Photons per detector bin and view at the scan's own (full) dose.
    """
    from napari_mediffuse.tasks.denoise import estimate_noise_hu, robust_std, soft_tissue_detail

    stack = np.asarray(slices_hu, dtype=np.float32).reshape(-1, *np.shape(slices_hu)[-2:])
    own = estimate_noise_hu(stack)
    rng = np.random.default_rng(seed)
    photons = DEFAULT_PHOTONS
    for _ in range(max(1, iterations)):
        ratios = []
        for s, sigma in zip(stack, own):
            # a dose of 1/2 adds exactly the full dose's noise (variance 1/I0)
            noise = low_dose_noise(s, pixel_mm, 0.5, photons=photons, electronic_noise=electronic_noise,
                                   views=views, rng=rng, filter_name=filter_name)
            values = soft_tissue_detail(noise, s)
            if values.size >= 20 and sigma > 0:
                ratios.append((robust_std(values) / sigma) ** 2)
        if not ratios:
            raise ValueError("no soft tissue to calibrate the simulated dose on")
        photons *= float(np.median(ratios))
    return photons


def simulate_low_dose(slices_hu: np.ndarray, pixel_mm: float, dose_fraction: float = 0.25, *,
                      photons: float = DEFAULT_PHOTONS,
                      electronic_noise: float = DEFAULT_ELECTRONIC_NOISE,
                      views: int | None = None, seed: int | None = 0,
                      filter_name: str = "ramp") -> np.ndarray:
    """Low-dose version of normal-dose slices (HU): original + dose noise.

    ``slices_hu`` is (H, W) or (N, H, W); each slice is simulated
    independently (see :func:`low_dose_noise` for the parameters).
    """
    rng = np.random.default_rng(seed)
    data = np.asarray(slices_hu, dtype=np.float32)
    stack = data.reshape(-1, *data.shape[-2:])
    out = np.stack([s + low_dose_noise(s, pixel_mm, dose_fraction, photons=photons,
                                       electronic_noise=electronic_noise, views=views, rng=rng,
                                       filter_name=filter_name)
                    for s in stack])
    return out.reshape(data.shape)


def simulate_low_dose_volume(volume: Volume, dose_fraction: float = 0.25, *, seed: int | None = 0,
                             **kwargs) -> Volume:
    """A low-dose copy of a CT volume, axial slice by axial slice (axis 0)."""
    pixel_mm = float(np.mean(volume.spacing[1:]))
    data = simulate_low_dose(volume.data, pixel_mm, dose_fraction, seed=seed, **kwargs)
    out = volume.with_data(data, name=f"{volume.name} simulated {dose_fraction:g} dose")
    out.metadata["simulated"] = {"degradation": "low_dose", "dose_fraction": dose_fraction, **kwargs}
    return out


def simulate_thick_slices(volume: Volume, factor: int) -> Volume:
    """Thick slices (axis 0) from thin ones: the mean over slabs of ``factor`` slices.

    The thick series has ``n // factor`` slices (slices left over at the
    superior end are dropped), spacing and thickness ``factor`` times the
    thin spacing, and each thick slice is centred on its slab, so
    super-resolving it by ``factor`` gives back the (cropped) thin grid.
    """
    factor = int(factor)
    if factor < 2:
        raise ValueError(f"factor must be >= 2, got {factor}")
    n_thick = volume.data.shape[0] // factor
    if n_thick < 1:
        raise ValueError(f"{volume.data.shape[0]} slices are fewer than the factor {factor}")
    thin = np.asarray(volume.data[: n_thick * factor], dtype=np.float32)
    op = SlabOperator.slab_average(n_thick, factor)
    thick = op.forward(thin, axis=0).astype(np.float32)
    affine = volume.affine.copy()
    affine[:3, 3] = volume.affine[:3, 3] + volume.affine[:3, 0] * (factor - 1) / 2.0
    affine[:3, 0] = volume.affine[:3, 0] * factor
    out = Volume(data=thick, affine=affine, modality=volume.modality,
                 name=f"{volume.name} simulated {factor}x thick", source="",
                 metadata={"slice_thickness_mm": float(volume.spacing[0] * factor),
                           "simulated": {"degradation": "thick_slices", "factor": factor},
                           "warnings": []})
    return out
