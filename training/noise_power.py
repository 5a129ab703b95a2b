"""Noise power spectrum (NPS) of CT noise, to check the low-dose simulator.

The NPS of a stationary noise image n (HU) sampled on pixels of ``dx`` mm,
estimated from M square ROIs of N x N pixels (IEC 62220-1 / ICRU 87 style):

    NPS(fx, fy) = dx^2 / (N^2 M) * sum_m |FFT2(n_m - trend_m)|^2     [HU^2 mm^2]

with a 2nd-order polynomial trend removed from each ROI (anatomy and
cupping, not noise). Its integral over frequency is the noise variance, so
``sqrt(sum(NPS) * df^2)`` is the noise std in HU; the radial average against
|f| (1/mm) shows its texture: FBP noise with a ramp filter rises with f,
noise smoothed by a soft kernel or by resampling falls off early.

Real scans have no noise-only image. Two estimates of a CT's own noise,
both in uniform soft tissue (ROIs whose 5 x 5 local mean stays in a HU band):

* ``residual``: the ROI minus its quadratic trend (what anatomy is left adds
  power at the lowest frequencies);
* ``slice_difference``: the same ROI in two adjacent axial slices,
  subtracted and divided by sqrt(2) (independent noise; anatomy that changes
  between slices adds power, again mostly at low frequencies).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def quadratic_detrend(roi: np.ndarray) -> np.ndarray:
    """``roi`` minus its least-squares 2nd-order polynomial surface."""
    n, m = roi.shape
    y, x = np.mgrid[0:n, 0:m].astype(float)
    y, x = y / n - 0.5, x / m - 0.5
    basis = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1).reshape(-1, 6)
    coef, *_ = np.linalg.lstsq(basis, roi.reshape(-1).astype(float), rcond=None)
    return roi - (basis @ coef).reshape(n, m)


def nps_2d(rois: np.ndarray, pixel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """2D NPS (HU^2 mm^2) of noise ROIs (M, N, N), each detrended, and the
    frequencies (1/mm) of its axes (fftshifted, zero in the middle)."""
    rois = np.asarray(rois, dtype=float)
    if rois.ndim != 3 or rois.shape[1] != rois.shape[2]:
        raise ValueError(f"ROIs must be (M, N, N), got {rois.shape}")
    m, n, _ = rois.shape
    power = np.zeros((n, n))
    for roi in rois:
        power += np.abs(np.fft.fft2(quadratic_detrend(roi))) ** 2
    nps = np.fft.fftshift(power) * pixel_mm ** 2 / (n * n * m)
    freqs = np.fft.fftshift(np.fft.fftfreq(n, d=pixel_mm))
    return nps, freqs


def radial_nps(nps: np.ndarray, freqs: np.ndarray, bins: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Radial average of a 2D NPS: (bin centre |f| in 1/mm, mean NPS), up to
    Nyquist; the zero frequency (removed by the detrending) is left out."""
    fy, fx = np.meshgrid(freqs, freqs, indexing="ij")
    radius = np.hypot(fx, fy)
    nyquist = np.abs(freqs).max()
    bins = bins or len(freqs) // 2
    edges = np.linspace(0.0, nyquist, bins + 1)
    index = np.digitize(radius.ravel(), edges) - 1
    keep = (index >= 0) & (index < bins) & (radius.ravel() > 0)
    total = np.bincount(index[keep], weights=nps.ravel()[keep], minlength=bins)
    count = np.bincount(index[keep], minlength=bins)
    centre = 0.5 * (edges[1:] + edges[:-1])
    ok = count > 0
    return centre[ok], total[ok] / count[ok]


def nps_summary(nps: np.ndarray, freqs: np.ndarray) -> dict:
    """Noise std (HU, from the NPS integral), mean and peak radial frequency (1/mm)."""
    df = freqs[1] - freqs[0]
    fy, fx = np.meshgrid(freqs, freqs, indexing="ij")
    radius = np.hypot(fx, fy)
    f, radial = radial_nps(nps, freqs)
    return {"std_hu": float(np.sqrt(nps.sum() * df * df)),
            "mean_frequency_per_mm": float((radius * nps).sum() / nps.sum()),
            "peak_frequency_per_mm": float(f[int(np.argmax(radial))])}


def uniform_roi_corners(slice_hu: np.ndarray, size: int, hu_range=(0.0, 120.0), stride: int | None = None,
                        smooth: int = 5) -> list[tuple[int, int]]:
    """Top-left corners of ``size`` ROIs in uniform soft tissue: every pixel's
    ``smooth`` x ``smooth`` local mean lies in ``hu_range`` (liver, spleen,
    muscle; no fat, bone, air or organ edge). ROIs do not overlap."""
    local = ndimage.uniform_filter(np.asarray(slice_hu, dtype=float), smooth, mode="nearest")
    inside = (local >= hu_range[0]) & (local <= hu_range[1])
    stride = stride or size
    h, w = inside.shape
    corners = []
    for r in range(0, h - size + 1, stride):
        for c in range(0, w - size + 1, stride):
            if inside[r:r + size, c:c + size].all():
                corners.append((r, c))
    return corners


def crop_rois(image: np.ndarray, corners, size: int) -> np.ndarray:
    return np.stack([image[r:r + size, c:c + size] for r, c in corners]) if corners else np.zeros((0, size, size))
