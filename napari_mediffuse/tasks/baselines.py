"""Classical baselines the diffusion methods are compared with (same CLI and widgets).

* Denoising, slice by slice: BM3D (Dabov et al. 2007; the ``bm3d``
  package, default settings) and non-local means (Buades et al. 2005;
  scikit-image), both given the noise std estimated from the image.
* Super-resolution across slices: cubic-spline and Lanczos-3 windowed-sinc
  interpolation along the slice axis, the thick slices taken as point
  samples at their centres (the thin-slice positions follow the slab model
  of :mod:`.superres`).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .common import TaskInputError


# -- denoising ------------------------------------------------------------------

def bm3d_slices(batch: np.ndarray, sigmas) -> np.ndarray:
    """BM3D (the ``bm3d`` package, default profile) of each 2D slice.

    Parameters
    ----------
    batch : ndarray (B, H, W)
        Slices (HU).
    sigmas : float or array (B,)
        White-noise std of each slice (HU); 0 leaves a slice as it is.
    """
    try:
        import bm3d
    except ImportError as exc:  # pragma: no cover - bm3d is a dependency
        raise TaskInputError("the BM3D baseline needs the 'bm3d' package (pip install bm3d)") from exc
    sigmas = np.broadcast_to(np.asarray(sigmas, dtype=np.float64), (len(batch),))
    out = np.empty_like(batch)
    for i, (s, sigma) in enumerate(zip(batch, sigmas)):
        out[i] = bm3d.bm3d(s, sigma_psd=float(max(sigma, 1e-3))) if sigma > 0 else s
    return out


def nlm_slices(batch: np.ndarray, sigmas) -> np.ndarray:
    """Non-local means (scikit-image, fast mode, 5x5 patches, 13x13 search,
    ``h = 0.8 sigma``) of each 2D slice; ``sigmas`` as :func:`bm3d_slices`."""
    from skimage.restoration import denoise_nl_means

    sigmas = np.broadcast_to(np.asarray(sigmas, dtype=np.float64), (len(batch),))
    out = np.empty_like(batch)
    for i, (s, sigma) in enumerate(zip(batch, sigmas)):
        out[i] = denoise_nl_means(s, h=0.8 * float(sigma), sigma=float(sigma), fast_mode=True,
                                  patch_size=5, patch_distance=6) if sigma > 0 else s
    return out


# -- interpolation across slices ---------------------------------------------------------

def thin_positions(n_thick: int, factor: int) -> np.ndarray:
    """Thin-slice centres in units of thick-slice indices."""
    return (np.arange(n_thick * factor) - (factor - 1) / 2.0) / factor


#: Bytes of float64 work space per chunk of columns in the interpolations along axis 0.
CHUNK_BYTES = 64 * 2 ** 20


def _along_axis0_in_chunks(thick: np.ndarray, n_out: int, fn, out_dtype) -> np.ndarray:
    """``fn(block)`` -> (n_out, m) on (n, m) column blocks of ``thick`` (axis 0 first),
    assembled into an (n_out, *thick.shape[1:]) array of ``out_dtype``.

    Interpolating along axis 0 treats every column apart, so a 512 x 512 x 600
    output needs a few tens of MB of float64 work space, not several GB.
    """
    flat = thick.reshape(thick.shape[0], -1)
    out = np.empty((n_out,) + thick.shape[1:], dtype=out_dtype)
    flat_out = out.reshape(n_out, -1)
    step = max(1, int(CHUNK_BYTES // (8 * max(thick.shape[0], n_out))))
    for c in range(0, flat.shape[1], step):
        flat_out[:, c:c + step] = fn(np.asarray(flat[:, c:c + step], dtype=np.float64))
    return out


def cubic_at(thick: np.ndarray, positions: np.ndarray, *, out_dtype=np.float64) -> np.ndarray:
    """Cubic-spline interpolation of rows ``thick`` (axis 0, point samples at
    integer positions) at fractional ``positions`` (clipped to the ends)."""
    thick = np.asarray(thick)
    n = thick.shape[0]
    pos = np.clip(np.asarray(positions, dtype=np.float64), 0, n - 1)
    if n == 1:
        return np.repeat(thick.astype(out_dtype), len(pos), axis=0)
    left = np.floor(pos).astype(int)
    # the 4 B-spline neighbours of each position and their weights
    taps = [(_mirror(left + offset, n), _bspline3(pos - (left + offset))[:, None]) for offset in range(-1, 3)]

    def interpolate(block):
        coeffs = ndimage.spline_filter1d(block, order=3, axis=0, mode="mirror")
        out = np.zeros((len(pos), block.shape[1]))
        for idx, w in taps:
            out += w * coeffs[idx]
        return out

    return _along_axis0_in_chunks(thick, len(pos), interpolate, out_dtype)


def cubic_along(thick: np.ndarray, factor: int, axis: int = 0) -> np.ndarray:
    """Cubic-spline interpolation of thick slices (point samples at their centres)
    onto the thin centres along ``axis`` (edges: nearest), float32."""
    thick = np.moveaxis(np.asarray(thick), axis, 0)
    out = cubic_at(thick, thin_positions(thick.shape[0], factor), out_dtype=np.float32)
    return np.moveaxis(out, 0, axis)


def cubic_matrix(n_thick: int, positions: np.ndarray) -> np.ndarray:
    """(len(positions), n_thick) matrix of :func:`cubic_at` (linear in the data)."""
    return cubic_at(np.eye(n_thick), positions)


def _bspline3(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1, 2 / 3 - x ** 2 + x ** 3 / 2, np.where(x < 2, (2 - x) ** 3 / 6, 0.0))


def _mirror(idx: np.ndarray, n: int) -> np.ndarray:
    period = 2 * (n - 1)
    idx = np.abs(idx) % period
    return np.where(idx >= n, period - idx, idx)


def sinc_along(thick: np.ndarray, factor: int, axis: int = 0, lobes: int = 3) -> np.ndarray:
    """Lanczos windowed-sinc interpolation (``lobes`` lobes) along ``axis`` (edges: replicate)."""
    thick = np.moveaxis(np.asarray(thick), axis, 0)
    n = thick.shape[0]
    pos = np.clip(thin_positions(n, factor), 0, n - 1)
    weights = np.zeros((len(pos), n))
    for i, p in enumerate(pos):
        taps = np.arange(int(np.floor(p)) - lobes + 1, int(np.floor(p)) + lobes + 1)
        w = np.sinc(p - taps) * np.sinc((p - taps) / lobes)
        np.add.at(weights[i], np.clip(taps, 0, n - 1), w)
        weights[i] /= weights[i].sum()
    out = _along_axis0_in_chunks(thick, len(pos), lambda block: weights @ block, np.float32)
    return np.moveaxis(out, 0, axis)
