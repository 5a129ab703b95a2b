"""Image-quality metrics in Hounsfield units."""
from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity


def clip_window(x: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    return np.clip(np.asarray(x, dtype=np.float64), window[0], window[1])


def psnr_hu(image: np.ndarray, reference: np.ndarray, window: tuple[float, float]) -> float:
    """PSNR (dB) after clipping both to an HU window; the peak is the window width.

    As in MedDiff-FM's Table 5 ([-160, 240] HU) and for the full range.
    """
    a, b = clip_window(image, window), clip_window(reference, window)
    mse = float(np.mean((a - b) ** 2))
    peak = float(window[1] - window[0])
    return float("inf") if mse == 0 else 10.0 * np.log10(peak ** 2 / mse)


def ssim_hu(image: np.ndarray, reference: np.ndarray, window: tuple[float, float]) -> float:
    """Mean SSIM over slices (2D, last two axes) after clipping to an HU window."""
    a, b = clip_window(image, window), clip_window(reference, window)
    a, b = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    rng = float(window[1] - window[0])
    return float(np.mean([structural_similarity(x, y, data_range=rng) for x, y in zip(a, b)]))
