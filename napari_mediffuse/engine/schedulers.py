"""Noise schedules and samplers' schedulers (diffusers), built from the
checkpoint's ``schedule`` dict so training and inference agree."""
from __future__ import annotations

import copy

import torch

#: Training noise schedule used by default (DDPM, 1000 steps, cosine betas).
DEFAULT_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": False,
}

SCHEDULER_KINDS = ("ddpm", "ddim", "dpm")


def complete_schedule(schedule: dict | None) -> dict:
    out = copy.deepcopy(DEFAULT_SCHEDULE)
    out.update(schedule or {})
    return out


def make_scheduler(schedule: dict | None = None, kind: str = "ddim", *, prediction_type: str | None = None):
    """A diffusers scheduler for a checkpoint's noise schedule.

    Parameters
    ----------
    schedule : dict
        ``num_train_timesteps``, ``beta_schedule``, ``beta_start``,
        ``beta_end``, ``prediction_type`` (see :data:`DEFAULT_SCHEDULE`).
    kind : {'ddpm', 'ddim', 'dpm'}
        Ancestral DDPM, deterministic DDIM, or DPM-Solver++ (multistep).
    prediction_type : str, optional
        What the model outputs passed to ``step`` are, when not the
        schedule's own: ``'epsilon'`` for a :class:`NoisePredictor`, which
        already converts v / sample outputs to noise.
    """
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    s = complete_schedule(schedule)
    common = dict(num_train_timesteps=s["num_train_timesteps"], beta_schedule=s["beta_schedule"],
                  beta_start=s["beta_start"], beta_end=s["beta_end"],
                  prediction_type=prediction_type or s["prediction_type"])
    if kind == "ddpm":
        return DDPMScheduler(clip_sample=s["clip_sample"], **common)
    if kind == "ddim":
        return DDIMScheduler(clip_sample=s["clip_sample"], set_alpha_to_one=True, **common)
    if kind == "dpm":
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **common)
    raise ValueError(f"unknown scheduler {kind!r}; choose one of {SCHEDULER_KINDS}")


def alphas_cumprod(schedule: dict | None = None) -> torch.Tensor:
    """abar_t for t = 0..T-1 (float64), the quantity every sampler needs."""
    return make_scheduler(schedule, "ddpm").alphas_cumprod.to(torch.float64)


def timestep_for_noise_level(sigma: float, schedule: dict | None = None) -> int:
    """The step t whose noise-to-signal ratio sqrt((1-abar)/abar) is closest
    to ``sigma`` (noise std in normalised intensity units).

    Used to start a restoration at the step matched to the image's noise.
    """
    abar = alphas_cumprod(schedule)
    ratio = torch.sqrt((1 - abar) / abar)
    return int(torch.argmin((ratio - float(sigma)).abs()))
