"""How good is a CT prior? One-step denoising of held-out slices.

Gaussian noise of a known level is added to held-out axial slices (never
seen in training); the prior predicts the clean slice in one network
evaluation (Tweedie's estimate x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar) at
the step whose noise level matches). PSNR of the noisy and the denoised
slice against the clean one, in the [-160, 240] HU soft-tissue window and in
the prior's full HU window, shows whether the prior has learned CT.
"""
from __future__ import annotations

import numpy as np
import torch

from napari_mediffuse.engine.inference import NoisePredictor
from napari_mediffuse.engine.intensity import hu_per_unit, intensity_range
from napari_mediffuse.engine.sampling import make_generator, predict_x0
from napari_mediffuse.engine.schedulers import alphas_cumprod, timestep_for_noise_level

from .data import load_volumes
from .metrics import psnr_hu


def one_step_denoising(network, config: dict, *, noise_hu=(25.0, 50.0, 100.0), max_slices: int = 16,
                       seed: int = 0, device: str = "cpu") -> dict:
    """PSNR (dB) before/after one-step denoising of held-out slices.

    Returns ``{"noise_25HU": {"psnr_noisy_soft": ..., "psnr_denoised_soft": ...,
    "psnr_noisy_full": ..., "psnr_denoised_full": ..., "t": ..., "slices": n}, ...}``.
    """
    normalization = config["normalization"]
    scale = hu_per_unit(normalization)
    low, high = intensity_range(None, normalization)
    volumes = load_volumes(config["data"], normalization)
    slices = np.concatenate([v.holdout_part() for v in volumes], axis=0)
    if len(slices) == 0:
        raise ValueError("no held-out slices: set data.holdout_fraction in the config")
    slices = slices[np.linspace(0, len(slices) - 1, min(max_slices, len(slices))).round().astype(int)]
    clean = torch.from_numpy(slices)[:, None]
    # noise estimates whatever the model predicts (epsilon, v or sample)
    predictor = NoisePredictor(network, device=device, schedule=config.get("schedule"))
    abar = alphas_cumprod(config.get("schedule"))
    gen = make_generator(seed)
    region = torch.full((len(clean),), volumes[0].region)
    results = {}
    for level in noise_hu:
        sigma = level / scale
        t = timestep_for_noise_level(sigma, config.get("schedule"))
        a = float(abar[t])
        noisy = clean + sigma * torch.randn(clean.shape, generator=gen)
        # x_t = sqrt(a) * noisy is the noisy image at step t (noise std sigma*sqrt(a)
        # matches sqrt(1-a) up to the nearest step)
        eps = predictor(noisy * a ** 0.5, t, region=region)
        denoised = predict_x0(noisy * a ** 0.5, eps, a).clamp(-1, 1)
        to_hu = lambda x: (x.numpy()[:, 0] + 1) * scale + low  # noqa: E731
        ref, noisy_hu, den_hu = to_hu(clean), to_hu(noisy), to_hu(denoised)
        results[f"noise_{int(level)}HU"] = {
            "t": t, "slices": int(len(clean)),
            "psnr_noisy_soft": psnr_hu(noisy_hu, ref, (-160, 240)),
            "psnr_denoised_soft": psnr_hu(den_hu, ref, (-160, 240)),
            "psnr_noisy_full": psnr_hu(noisy_hu, ref, (low, high)),
            "psnr_denoised_full": psnr_hu(den_hu, ref, (low, high)),
        }
    return results
