"""Reverse diffusion: one DDIM/DDPM loop that every task shares.

The loop works in the x0-prediction form so tasks can plug in at the two
places restoration methods need:

* ``x0_hook(x0, t)``: correct the clean-image estimate at each step
  (DiffPIR's data-consistency step for denoising and super-resolution);
* ``xt_hook(x_prev, t_prev)``: modify the next noisy sample (RePaint pastes
  the known region, noised to ``t_prev``).

With ``eta = 0`` the update is deterministic DDIM; ``eta = 1`` with all
steps is ancestral DDPM. :func:`sample_with_scheduler` runs diffusers'
schedulers (e.g. DPM-Solver++) for plain sampling without hooks.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from .control import CancelCheck, ProgressCallback, check_cancel, report
from .schedulers import alphas_cumprod, make_scheduler

#: eps = predictor(x_t, t)
Predictor = Callable[[torch.Tensor, int], torch.Tensor]


def make_generator(seed: Optional[int]) -> torch.Generator:
    """CPU generator: noise is drawn on the CPU so a seed gives the same
    result on every device."""
    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


def randn(shape, generator, device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the CPU and moved to ``device`` once.

    ``generator`` is a CPU ``torch.Generator`` or a per-sample
    :class:`~.runner.SliceNoise` (sample b from stream b).
    """
    if hasattr(generator, "randn"):
        noise = generator.randn(shape)
    else:
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


class AxisCorrelatedNoise:
    """Standard normal noise correlated along one axis (a first-order
    autoregressive process): ``n_0 = e_0``, ``n_k = rho n_(k-1) + sqrt(1 - rho^2) e_k``
    with independent ``e_k``, so every voxel is still N(0, 1) (what a network
    trained on i.i.d. noise expects of each slice) and neighbours along
    ``axis`` have correlation ``rho`` (``rho ** d`` at distance ``d``).

    Why: a 2D prior run slice by slice from i.i.d. noise draws every slice's
    detail independently, so a stack of them jumps from slice to slice; with
    deterministic DDIM (the output is a continuous function of the start
    noise) correlated start noise gives neighbouring slices related detail.
    :func:`randn`, :func:`add_noise` and :func:`ddim_sample` take it in place
    of a generator (diffusers' schedulers in :func:`sample_with_scheduler` do
    not).

    Parameters
    ----------
    generator : torch.Generator
        The CPU generator the independent draws come from.
    rho : float
        Correlation of neighbours along ``axis``, in [0, 1).
    axis : int
        Axis of the drawn tensor (default -3: S of (B, C, S, P, L)).
    """

    def __init__(self, generator: torch.Generator, rho: float, axis: int = -3):
        if not 0.0 <= float(rho) < 1.0:
            raise ValueError(f"rho must be in [0, 1), got {rho}")
        self.generator, self.rho, self.axis = generator, float(rho), int(axis)

    def randn(self, shape) -> torch.Tensor:
        noise = torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32).movedim(self.axis, 0)
        keep = (1.0 - self.rho ** 2) ** 0.5
        for k in range(1, noise.shape[0]):
            noise[k] = self.rho * noise[k - 1] + keep * noise[k]
        return noise.movedim(0, self.axis).contiguous()


#: How the sampled steps are spread between ``t_start`` and ``t_end``.
SPACINGS = ("linear", "quadratic")


def timestep_sequence(num_train_timesteps: int, steps: int, t_start: Optional[int] = None,
                      t_end: int = 0, spacing: str = "linear") -> list[int]:
    """The steps a sampler evaluates, from ``t_start`` (default T-1) down towards ``t_end``.

    ``steps`` is the number of network evaluations.

    * ``'linear'``: evenly spaced, including both ``t_start`` and ``t_end``.
    * ``'quadratic'`` (DDIM paper, Song et al. 2021, section 5): step ``i``
      of ``n`` at ``t_end + (t_start - t_end) * ((n - i) / n)^2``, denser
      where the noise is small and the details are drawn. ``t_end`` itself
      is not evaluated: at ``t_end = 0`` the image is already clean, so the
      last estimate (at ``(t_start - t_end) / n^2`` above it) is returned
      instead of spending a network evaluation on an identity step.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; known: {SPACINGS}")
    t_start = num_train_timesteps - 1 if t_start is None else int(t_start)
    if not 0 <= t_start < num_train_timesteps:
        raise ValueError(f"t_start must be in [0, {num_train_timesteps - 1}], got {t_start}")
    t_end = min(max(int(t_end), 0), t_start)
    steps = max(1, min(int(steps), t_start - t_end + 1))
    if spacing == "linear":
        seq = np.linspace(t_start, t_end, steps)
    else:
        seq = t_end + (t_start - t_end) * (np.arange(steps, 0, -1) / steps) ** 2
    return [int(t) for t in dict.fromkeys(np.round(seq).astype(int).tolist())]


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, abar_t: float) -> torch.Tensor:
    """Clean-image estimate from the noise estimate (Tweedie / DDPM Eq. 15)."""
    return (x_t - (1.0 - abar_t) ** 0.5 * eps) / abar_t ** 0.5


def add_noise(x0: torch.Tensor, t: int, abar: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Forward diffusion q(x_t | x0) at step ``t``."""
    a = float(abar[t])
    return a ** 0.5 * x0 + (1.0 - a) ** 0.5 * randn(x0.shape, generator, x0.device, x0.dtype)


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def to_epsilon(output: torch.Tensor, x_t: torch.Tensor, abar_t: float, prediction_type: str) -> torch.Tensor:
    """Noise estimate from a network output of the given ``prediction_type``.

    ``'v_prediction'``: ``eps = sqrt(abar) v + sqrt(1 - abar) x_t``;
    ``'sample'``: ``eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)``;
    ``'epsilon'``: unchanged. Runs in the dtype of ``x_t`` (near t = T abar is
    about 1e-9: pass float64 samples where that matters).
    """
    output = output.to(x_t.dtype)
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return abar_t ** 0.5 * output + (1.0 - abar_t) ** 0.5 * x_t
    if prediction_type == "sample":
        return (x_t - abar_t ** 0.5 * output) / max(1.0 - abar_t, 1e-12) ** 0.5
    raise ValueError(f"unknown prediction_type {prediction_type!r}; known: {PREDICTION_TYPES}")


def ddim_sample(predictor: Predictor, x_t: torch.Tensor, schedule: dict, *, steps: int = 50,
                t_start: Optional[int] = None, t_end: int = 0, eta: float = 0.0,
                generator: Optional[torch.Generator] = None,
                x0_hook: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None,
                xt_hook: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None,
                clip: Optional[tuple[float, float]] = (-1.0, 1.0), spacing: str = "linear",
                progress: Optional[ProgressCallback] = None,
                cancel: Optional[CancelCheck] = None) -> torch.Tensor:
    """Run the reverse process from ``x_t`` at ``t_start`` down to a clean image.

    Parameters
    ----------
    predictor : callable
        ``eps = predictor(x, t)`` (e.g. a :class:`~.inference.NoisePredictor`
        with its conditioning bound).
    x_t : Tensor (B, C, *spatial)
        Starting sample: pure noise for generation (``t_start = T-1``), or a
        noised image for restoration / partial diffusion.
    schedule : dict
        The checkpoint's noise schedule.
    steps : int
        Network evaluations.
    t_start : int, optional
        Step of ``x_t``; T-1 by default.
    t_end : int
        Last step (0 by default); the x0 estimate there is returned (a
        restoration can stop at the posterior-mean estimate of a small
        noise level rather than draw the last details).
    eta : float
        0 = deterministic DDIM, 1 = DDPM-like ancestral noise.
    generator : torch.Generator
        Source of the injected noise (``eta > 0``).
    x0_hook, xt_hook : callable, optional
        See the module docstring.
    clip : (float, float) or None
        Range the x0 estimate is clipped to (the data range, [-1, 1]).
    spacing : {'linear', 'quadratic'}
        How the steps are spread (:func:`timestep_sequence`).
    progress, cancel :
        Called / checked once per step.

    Returns
    -------
    Tensor
        The final x0 estimate.
    """
    abar = alphas_cumprod(schedule)
    seq = timestep_sequence(len(abar), steps, t_start, t_end, spacing)
    generator = generator or make_generator(None)
    x = x_t
    for i, t in enumerate(seq):
        check_cancel(cancel)
        a_t = float(abar[t])
        eps = predictor(x, t).to(x.dtype)
        x0 = predict_x0(x, eps, a_t)
        if clip is not None:
            x0 = x0.clamp(*clip)
        if x0_hook is not None:
            x0 = x0_hook(x0, t)
        if i + 1 == len(seq):
            x = x0
        else:
            t_prev = seq[i + 1]
            a_prev = float(abar[t_prev])
            # eps consistent with the (possibly corrected) x0
            eps_hat = (x - a_t ** 0.5 * x0) / max(1.0 - a_t, 1e-12) ** 0.5
            sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5 if eta else 0.0
            direction = max(1.0 - a_prev - sigma ** 2, 0.0) ** 0.5 * eps_hat
            x = a_prev ** 0.5 * x0 + direction
            if sigma:
                x = x + sigma * randn(x.shape, generator, x.device, x.dtype)
            if xt_hook is not None:
                x = xt_hook(x, t_prev)
        report(progress, i + 1, len(seq), f"step {i + 1}/{len(seq)}")
    return x


def conditional_estimate(predictor: Predictor, shape, schedule: dict, *, steps: int = 1, generator=None,
                         device="cpu", dtype=torch.float64, clip: Optional[tuple[float, float]] = (-1.0, 1.0),
                         progress: Optional[ProgressCallback] = None,
                         cancel: Optional[CancelCheck] = None) -> torch.Tensor:
    """A conditional model's estimate of its target, from pure noise.

    ``predictor`` has the condition bound. With ``steps=1`` it is the
    posterior mean given the condition (one network evaluation at the last
    step, where the noisy input carries no information): the best estimate in
    mean squared error, what the learned restoration models (super-resolution,
    denoising) return by default. More steps draw a deterministic DDIM
    sample (sharper, with drawn texture). ``dtype``: float64 where the device
    has it (x0 from eps at abar ~ 2e-9). ``clip``: range of the x0 estimates
    (None for a residual target, which is not bounded by the image range).
    """
    x_t = randn(shape, generator, device, dtype)
    return ddim_sample(predictor, x_t, schedule, steps=max(1, int(steps)),
                       t_start=len(alphas_cumprod(schedule)) - 1, generator=generator, clip=clip,
                       progress=progress, cancel=cancel)


def residual_scale(card: dict) -> Optional[float]:
    """The scale of a restoration model that predicts a residual, else None.

    Such a model (card ``residual_scale``: s) generates ``s (target -
    condition)`` rather than the target: the condition (the cubic
    interpolation, the low-dose slice) is already most of the answer, and a
    network reproduces it less exactly than it adds a correction to it.
    """
    value = card.get("residual_scale")
    return float(value) if value else None


def from_residual(x0: torch.Tensor, condition: torch.Tensor, card: dict) -> torch.Tensor:
    """The estimate in image units: ``condition + x0 / s`` for a residual model, else ``x0``."""
    scale = residual_scale(card)
    return x0 if scale is None else condition[:, :1].to(x0.dtype) + x0 / scale


def sample_with_scheduler(predictor: Predictor, shape, schedule: dict, *, kind: str = "dpm",
                          steps: int = 20, generator: Optional[torch.Generator] = None,
                          device="cpu", x_T: Optional[torch.Tensor] = None,
                          progress: Optional[ProgressCallback] = None,
                          cancel: Optional[CancelCheck] = None) -> torch.Tensor:
    """Generate from pure noise with a diffusers scheduler (DDPM, DDIM, DPM-Solver++).

    ``predictor`` returns noise estimates (as :class:`NoisePredictor` does
    for every prediction type), so the scheduler is told 'epsilon'.
    ``x_T`` gives the start noise (unit variance) instead of drawing it.
    """
    scheduler = make_scheduler(schedule, kind, prediction_type="epsilon")
    scheduler.set_timesteps(steps)
    generator = generator or make_generator(None)
    if x_T is None:
        x_T = randn(shape, generator, device)
    x = x_T * float(scheduler.init_noise_sigma)
    timesteps = list(scheduler.timesteps)
    for i, t in enumerate(timesteps):
        check_cancel(cancel)
        model_input = scheduler.scale_model_input(x, t)
        eps = predictor(model_input, int(t)).to(x.dtype)
        # diffusers schedulers take an optional CPU generator for their noise
        # diffusers take one CPU generator, or a list of them (one per sample)
        step_generator = getattr(generator, "generators", generator)
        x = scheduler.step(eps, t, x, generator=step_generator).prev_sample if kind == "ddpm" \
            else scheduler.step(eps, t, x).prev_sample
        report(progress, i + 1, len(timesteps), f"step {i + 1}/{len(timesteps)}")
    return x
