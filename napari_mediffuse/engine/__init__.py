"""Diffusion engine (Qt-free): networks, schedules, checkpoints, inference, sampling.

Kept apart like diffusers' models / schedulers / pipelines:

* :mod:`.networks` -- :class:`DiffusionNetwork`, the one network definition;
* :mod:`.position` -- MedDiff-FM sinusoidal position channels;
* :mod:`.schedulers` -- noise schedules (diffusers DDPM / DDIM / DPM-Solver);
* :mod:`.intensity` -- HU window / MR normalisation;
* :mod:`.checkpoint`, :mod:`.registry` -- safetensors + JSON checkpoints, lookup;
* :mod:`.devices` -- CUDA / MPS / CPU and precision;
* :mod:`.inference` -- whole-image or sliding-window noise prediction;
* :mod:`.sampling` -- the shared reverse-diffusion loop with hooks;
* :mod:`.control` -- progress callbacks and cancellation.
"""
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, make_card, save_checkpoint
from .control import Cancelled
from .devices import select_device
from .inference import NoisePredictor
from .networks import REGIONS, DiffusionNetwork
from .registry import list_checkpoints, resolve_checkpoint
from .sampling import ddim_sample, make_generator

__all__ = [
    "Cancelled", "Checkpoint", "CheckpointError", "DiffusionNetwork", "NoisePredictor", "REGIONS",
    "ddim_sample", "list_checkpoints", "load_checkpoint", "make_card", "make_generator",
    "resolve_checkpoint", "save_checkpoint", "select_device",
]
