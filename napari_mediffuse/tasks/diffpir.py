"""DiffPIR: plug-and-play image restoration with a pretrained diffusion prior.

Zhu et al., "Denoising Diffusion Models for Plug-and-Play Image
Restoration" (CVPR workshops 2023), as used by MedDiff-FM (sections 3.4.1
and 3.5.1). At every reverse step the prior's clean-image estimate ``x0``
(Tweedie's formula) is replaced by the solution of a small data-fidelity
problem,

    x0_hat = argmin_x ||y - H x||^2 + rho_t ||x - x0||^2,
    rho_t  = lambda * sigma_n^2 / sigma_t^2,   sigma_t^2 = (1 - abar_t) / abar_t,

and the sampler goes on from ``x0_hat`` (DDIM step, optional fresh noise
``eta``). Early (noisy) steps trust the prior, late steps the measurement.

This module holds the pieces shared by :mod:`.denoise` and
:mod:`.superres`: the schedule quantities, the two closed-form data steps
(identity ``H`` for denoising, slab averaging for super-resolution), the slab
operator with its adjoint, and the loop that plugs a data step into
:func:`~napari_mediffuse.engine.sampling.ddim_sample` through its
``x0_hook``. Everything works on normalised intensities ([-1, 1]).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from ..engine.control import CancelCheck, ProgressCallback
from ..engine.sampling import ddim_sample, make_generator, randn
from ..engine.schedulers import alphas_cumprod

#: Lambda of rho_t = lambda sigma_n^2 / sigma_t^2 (Zhu et al. use 1-10 for SR / deblurring).
DEFAULT_LAMBDA = 1.0


# -- schedule quantities ------------------------------------------------------

def sigma_t(abar_t: float) -> float:
    """Noise-to-signal ratio ``sqrt((1 - abar_t) / abar_t)`` of step t.

    ``x_t / sqrt(abar_t) = x0 + sigma_t * eps``: the std (normalised units) of
    the noise on the image scale.
    """
    abar_t = float(abar_t)
    return math.sqrt(max(1.0 - abar_t, 0.0) / max(abar_t, 1e-12))


def rho_t(abar_t: float, sigma_n: float, lam: float = DEFAULT_LAMBDA) -> float:
    """DiffPIR's weight of the prior estimate: ``lambda * sigma_n^2 / sigma_t^2``.

    Parameters
    ----------
    abar_t : float
        Cumulative alpha of the step.
    sigma_n : float
        Noise std of the measurement, normalised units.
    lam : float
        Lambda; larger trusts the prior more.
    """
    return float(lam) * float(sigma_n) ** 2 / max(sigma_t(abar_t) ** 2, 1e-12)


# -- data steps ---------------------------------------------------------------

def denoise_data_step(x0, y, rho: float):
    """Closed-form data step for denoising (``H = I``): ``(y + rho x0) / (1 + rho)``."""
    return (y + rho * x0) / (1.0 + rho)


def _along(matrix, x, axis: int):
    """Apply ``matrix`` (m, n) to axis ``axis`` of ``x`` (numpy or torch)."""
    if isinstance(x, torch.Tensor):
        m = torch.as_tensor(np.ascontiguousarray(matrix), dtype=x.dtype, device=x.device)
        moved = torch.movedim(x, axis, -1)
        return torch.movedim(moved @ m.T, -1, axis)
    moved = np.moveaxis(np.asarray(x), axis, -1)
    out = moved @ np.asarray(matrix, dtype=moved.dtype if moved.dtype.kind == "f" else np.float64).T
    return np.moveaxis(out, -1, axis)


class SlabOperator:
    """Slice-profile operator ``H`` of thick slices over a thin grid, along one axis.

    Each thick slice is the average of the thin grid over its slab (a box
    slice profile): ``H[j, i]`` is the length of thin pixel ``i`` inside slab
    ``j`` divided by the slab's length inside the grid, so rows sum to 1.

    Parameters
    ----------
    weights : ndarray, shape (n_thick, n_thin)
    geometry : dict, optional
        The slab geometry the weights came from (see :meth:`from_geometry`).
    """

    def __init__(self, weights: np.ndarray, geometry: dict | None = None):
        weights = np.asarray(weights, dtype=np.float64)
        if weights.ndim != 2:
            raise ValueError("slab weights must be a 2D matrix")
        self.weights = weights
        self._gram = weights @ weights.T  # H H^T, small (n_thick x n_thick)
        #: thick_centres_mm, thickness_mm, thin_centres_mm, thin_spacing_mm (from_geometry)
        self.geometry = geometry

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weights.shape)

    @classmethod
    def from_geometry(cls, thick_centres_mm, thickness_mm: float, thin_centres_mm,
                      thin_spacing_mm: float) -> "SlabOperator":
        """Box profiles of width ``thickness_mm`` at ``thick_centres_mm`` over
        thin pixels of width ``thin_spacing_mm`` centred at ``thin_centres_mm``."""
        thick = np.asarray(thick_centres_mm, dtype=np.float64)[:, None]
        thin = np.asarray(thin_centres_mm, dtype=np.float64)[None, :]
        half_t, half_p = float(thickness_mm) / 2.0, float(thin_spacing_mm) / 2.0
        overlap = (np.minimum(thick + half_t, thin + half_p)
                   - np.maximum(thick - half_t, thin - half_p)).clip(min=0.0)
        overlap[overlap < 1e-9 * thin_spacing_mm] = 0.0
        sums = overlap.sum(axis=1, keepdims=True)
        if np.any(sums <= 0):
            raise ValueError("a thick slice does not overlap the thin grid")
        return cls(overlap / sums, geometry={
            "thick_centres_mm": thick[:, 0], "thickness_mm": float(thickness_mm),
            "thin_centres_mm": thin[0], "thin_spacing_mm": float(thin_spacing_mm)})

    @classmethod
    def slab_average(cls, n_thick: int, factor: int, thickness: float | None = None) -> "SlabOperator":
        """Thick slice ``j`` = mean of thin pixels ``j*factor .. j*factor+factor-1``.

        ``thickness`` (in thin pixels, default ``factor``) models thicker
        (overlapping) or thinner (gapped) slabs around the same centres.
        """
        factor = int(factor)
        n_thin = n_thick * factor
        thin = np.arange(n_thin, dtype=np.float64)
        thick = np.arange(n_thick, dtype=np.float64) * factor + (factor - 1) / 2.0
        return cls.from_geometry(thick, factor if thickness is None else thickness, thin, 1.0)

    def forward(self, x, axis: int = 0):
        """``H x``: thick slices from a thin array along ``axis``."""
        return _along(self.weights, x, axis)

    def adjoint(self, y, axis: int = 0):
        """``H^T y``: thick values spread back over the thin pixels (weighted)."""
        return _along(self.weights.T, y, axis)

    def pseudo_inverse(self, y, axis: int = 0):
        """``H^T (H H^T)^-1 y``: the thin array nearest to zero that fits ``y``
        (for non-overlapping slabs, each thick value copied across its slab)."""
        return self.adjoint(_along(np.linalg.pinv(self._gram), y, axis), axis)

    def data_step(self, x0, y, rho: float, axis: int = 0, right_inverse=None):
        """Exact DiffPIR data step ``argmin ||y - H x||^2 + rho ||x - x0||^2``.

        ``x0 + H^T (H H^T + rho I)^-1 (y - H x0)``; when the rows of ``H`` are
        orthonormal (``H H^T = I``) this is MedDiff-FM's Eq. in section 3.5.1,
        ``x0 + H^T (y - H x0) / (1 + rho)``. For the slab average of ``k``
        thin pixels ``H H^T = I / k`` and the step is
        ``x0 + k H^T (y - H x0) / (1 + k rho)``, i.e. the residual of each slab
        added to its pixels, shrunk by ``1 / (1 + k rho)``.

        ``right_inverse`` (a (n_thin, n_thick) matrix ``P``, e.g. cubic
        interpolation from the thick centres) replaces the slab-constant
        correction ``H^T`` by a smooth one, ``x0 + P (H P + rho I)^-1
        (y - H x0)``: the result fits ``y`` just as exactly at ``rho = 0``
        but without steps at the slab borders.
        """
        if right_inverse is not None:
            # oblique (smooth) variant: x0 + P (H P + rho I)^-1 (y - H x0)
            p = np.asarray(right_inverse, dtype=np.float64)
            inverse = np.linalg.inv(self.weights @ p + float(rho) * np.eye(p.shape[1]))
            residual = y - self.forward(x0, axis)
            return x0 + _along(p, _along(inverse, residual, axis), axis)
        inverse = np.linalg.inv(self._gram + float(rho) * np.eye(self._gram.shape[0]))
        residual = y - self.forward(x0, axis)
        return x0 + self.adjoint(_along(inverse, residual, axis), axis)


# -- the sampling loop -----------------------------------------------------------

#: ``x0_hat = data_step(x0, t, abar_t)`` on a (B, 1, H, W) tensor.
DataStep = Callable[[torch.Tensor, int, float], torch.Tensor]


def start_sample(y: torch.Tensor, abar_t: float, noise_in_y,
                 generator) -> torch.Tensor:
    """``x_t`` at a step from an image ``y`` that already carries noise.

    ``y`` is taken as ``x0 + noise_in_y * eps``: it is scaled by
    ``sqrt(abar_t)`` and fresh noise tops its noise up to the step's
    ``sqrt(1 - abar_t)`` (none when ``y`` is already at least that noisy).
    ``noise_in_y`` is a float or a tensor broadcasting to ``y`` (per slice).
    """
    noise_in_y = torch.as_tensor(noise_in_y, dtype=y.dtype).to(y.device)
    extra = (1.0 - abar_t - abar_t * noise_in_y ** 2).clamp(min=0.0)
    # drawn even where extra is 0, so each slice's noise stream advances
    # the same way whichever slices share its batch
    return abar_t ** 0.5 * y + extra.sqrt() * randn(y.shape, generator, y.device, y.dtype)


def run_diffpir(predictor, y: torch.Tensor, schedule: dict, data_step: DataStep, *,
                t_start: int, steps: int, t_end: int = 0, noise_in_y=0.0, eta: float = 0.0,
                generator=None,
                progress: Optional[ProgressCallback] = None,
                cancel: Optional[CancelCheck] = None) -> torch.Tensor:
    """Restore ``y`` (normalised, (B, 1, H, W)) from step ``t_start``.

    Parameters
    ----------
    predictor : callable
        ``eps = predictor(x_t, t)``.
    y : Tensor
        Initial image on the output grid (the noisy image for denoising, an
        interpolation of the thick slices for super-resolution).
    data_step : callable
        ``x0_hat = data_step(x0, t, abar_t)``, applied to every x0 estimate.
    t_start : int
        Step the reverse process starts from (0 returns one data step of y).
    steps : int
        Network evaluations.
    t_end : int
        Last step: its (data-corrected) x0 estimate is returned. 0 runs the
        sampler to the end; a small positive step returns the prior's
        posterior-mean estimate at that noise level instead of drawn details
        (better PSNR, less hallucinated texture).
    noise_in_y : float or Tensor
        Noise std already in ``y`` (normalised; a (B, 1, 1, 1) tensor for
        one value per image), counted in the start noise.
    eta : float
        0: deterministic DDIM steps; 1: DDPM-like fresh noise (DiffPIR's zeta).
    """
    abar = alphas_cumprod(schedule)
    generator = generator or make_generator(None)
    a = float(abar[t_start])
    x_t = start_sample(y, a, noise_in_y, generator)

    def hook(x0: torch.Tensor, t: int) -> torch.Tensor:
        return data_step(x0, t, float(abar[t]))

    return ddim_sample(predictor, x_t, schedule, steps=steps, t_start=t_start, t_end=t_end, eta=eta,
                       generator=generator, x0_hook=hook, progress=progress, cancel=cancel)
