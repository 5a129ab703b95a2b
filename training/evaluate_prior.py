"""How good is a CT prior? One-step denoising of held-out slices.

Gaussian noise of a known level is added to held-out axial slices (never
seen in training); the prior predicts the clean slice in one network
evaluation (Tweedie's estimate x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar) at
the step whose noise level matches). PSNR of the noisy and the denoised
slice against the clean one, in the [-160, 240] HU soft-tissue window and in
the prior's full HU window, shows whether the prior has learned CT.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from napari_mediffuse.engine.inference import NoisePredictor
from napari_mediffuse.engine.networks import REGIONS
from napari_mediffuse.engine.intensity import hu_per_unit, intensity_range
from napari_mediffuse.engine.sampling import make_generator, predict_x0
from napari_mediffuse.engine.schedulers import alphas_cumprod, timestep_for_noise_level

from .data import anatomy_channels, anatomy_planes, load_volumes
from .metrics import psnr_hu


class HeldOutSlice(NamedTuple):
    """A held-out axial slice (normalised), its region class, its structure
    labels (None where the scan has none, or the config no
    ``anatomy_channels``) and its place in its scan's body (the prior's third
    coordinate, :meth:`training.data.TrainingVolume.slice_coordinate`)."""

    image: np.ndarray
    region: int
    labels: np.ndarray | None
    position: float


def heldout_slices(config: dict, normalization: dict, max_slices: int = 16) -> list[HeldOutSlice]:
    """Held-out axial slices (:class:`HeldOutSlice`).

    With ``data.validation`` (held-out patients): up to ``max_slices`` per
    region, evenly spread over the central 60 % of the axial slices of that
    region's patients (several patients, no skull cap or neck box edge);
    otherwise ``max_slices`` slices of the held-out blocks of the training
    volumes."""
    data = config["data"]
    if data.get("validation"):
        volumes = load_volumes(data, normalization, split="validation")
        picks = []
        for region in sorted({v.region for v in volumes}):
            pool = [(v, i) for v in volumes if v.region == region
                    for i in range(int(0.2 * v.data.shape[0]), max(int(0.8 * v.data.shape[0]), 1))]
            chosen = np.linspace(0, len(pool) - 1, min(max_slices, len(pool))).round().astype(int)
            picks += [HeldOutSlice(v.data[i], region, None if v.structures is None else v.structures[i],
                                   v.slice_coordinate("axial", i, part="validation"))
                      for v, i in (pool[k] for k in chosen)]
        return picks
    volumes = load_volumes(data, normalization)
    picks = [HeldOutSlice(v.holdout_part()[i], v.region, None if v.structures is None else v.holdout_labels()[i],
                          v.slice_coordinate("axial", i, part="holdout"))
             for v in volumes for i in range(len(v.holdout_part()))]
    if not picks:
        raise ValueError("no held-out slices: set data.validation or data.holdout_fraction in the config")
    return [picks[k] for k in np.linspace(0, len(picks) - 1, min(max_slices, len(picks))).round().astype(int)]


def slice_condition(slice_2d: np.ndarray, labels: np.ndarray | None, channels, structures: bool = True):
    """The anatomy planes a prior with ``channels`` gets for a held-out slice
    (1, K, H, W): its structures when known and wanted, else zeros
    ('unknown'); None for a prior without anatomy channels."""
    if not channels:
        return None
    planes = (anatomy_planes(labels, channels) if structures and labels is not None
              else np.zeros((len(channels),) + slice_2d.shape, np.float32))
    return torch.from_numpy(planes)[None]


def one_step_estimate(predictor, clean: torch.Tensor, sigma: float, schedule: dict, *, generator,
                      condition=None, region: int = 0, slice_position: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy, denoised) for a clean slice (1, 1, H, W) in normalised units:
    Gaussian noise of std ``sigma`` added, then Tweedie's one-step estimate
    at the step whose noise level matches; ``slice_position``: the slice's
    place in its scan for a prior that takes it (None: not known)."""
    t = timestep_for_noise_level(sigma, schedule)
    a = float(alphas_cumprod(schedule)[t])
    noisy = clean + sigma * torch.randn(clean.shape, generator=generator)
    # x_t = sqrt(a) * noisy is the noisy image at step t (noise std sigma*sqrt(a)
    # matches sqrt(1-a) up to the nearest step)
    eps = predictor(noisy * a ** 0.5, t, condition=condition, region=torch.full((1,), region),
                    slice_position=None if slice_position is None else torch.tensor([float(slice_position)]))
    return noisy, predict_x0(noisy * a ** 0.5, eps, a).clamp(-1, 1)


def one_step_denoising(network, config: dict, *, noise_hu=(25.0, 50.0, 100.0), max_slices: int = 16,
                       seed: int = 0, device: str = "cpu", region: int | None = None,
                       structures: bool = True, slice_position: bool = True, picks=None) -> dict:
    """PSNR (dB) before/after one-step denoising of held-out slices.

    Returns ``{"noise_25HU": {"psnr_noisy_soft": ..., "psnr_denoised_soft": ...,
    "psnr_noisy_full": ..., "psnr_denoised_full": ..., "t": ..., "slices": n}, ...}``
    (PSNR of all the slices' pixels together), and with ``data.validation``
    the same per region under ``"by_region"``. ``region``: the class given
    to the network (default: each slice's own; a prior trained on one region
    gets that one). A prior with anatomy channels (``data.anatomy_channels``)
    gets each slice's structures where its scan has them and ``structures``
    is true, else 'unknown' (zeros), as in training; the same noise either way.
    A prior with the 3D position (``position_axes: 3``) gets each slice's place
    in its scan when ``slice_position`` is true, else 'not known'.
    ``picks``: the slices of :func:`heldout_slices` when the caller has them
    already (several models on the same slices read the patients once).
    """
    normalization = config["normalization"]
    scale = hu_per_unit(normalization)
    low, high = intensity_range(None, normalization)
    picks = heldout_slices(config, normalization, max_slices) if picks is None else picks
    channels = anatomy_channels(config["data"]) if getattr(network, "condition_channels", 0) else []
    # noise estimates whatever the model predicts (epsilon, v or sample)
    predictor = NoisePredictor(network, device=device, schedule=config.get("schedule"))
    gen = make_generator(seed)
    to_hu = lambda x: (x.numpy().ravel() + 1) * scale + low  # noqa: E731
    groups = {"all": list(range(len(picks)))}
    if config["data"].get("validation"):
        for k, pick in enumerate(picks):
            groups.setdefault(REGIONS[pick.region], []).append(k)
    results = {}
    for level in noise_hu:
        sigma = level / scale
        t = timestep_for_noise_level(sigma, config.get("schedule"))
        per_slice = []
        for slice_2d, r, labels, position in picks:  # one at a time: held-out slices differ in size
            clean = torch.from_numpy(np.ascontiguousarray(slice_2d))[None, None]
            noisy, denoised = one_step_estimate(predictor, clean, sigma, config.get("schedule"), generator=gen,
                                                condition=slice_condition(slice_2d, labels, channels, structures),
                                                region=r if region is None else region,
                                                slice_position=position if slice_position else None)
            per_slice.append((to_hu(clean), to_hu(noisy), to_hu(denoised)))
        for name, members in groups.items():
            ref, noisy_hu, den_hu = (np.concatenate([per_slice[k][j] for k in members]) for j in range(3))
            entry = {
                "t": t, "slices": len(members),
                "psnr_noisy_soft": psnr_hu(noisy_hu, ref, (-160, 240)),
                "psnr_denoised_soft": psnr_hu(den_hu, ref, (-160, 240)),
                "psnr_noisy_full": psnr_hu(noisy_hu, ref, (low, high)),
                "psnr_denoised_full": psnr_hu(den_hu, ref, (low, high)),
            }
            if name == "all":
                results[f"noise_{int(level)}HU"] = entry
            else:
                results.setdefault("by_region", {}).setdefault(name, {})[f"noise_{int(level)}HU"] = entry
    return results
