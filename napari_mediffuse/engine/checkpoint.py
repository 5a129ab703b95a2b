"""The checkpoint format: a folder with ``model.safetensors`` and ``mediffuse.json``.

``mediffuse.json`` (the model card in machine-readable form)::

    {
      "format": "mediffuse-checkpoint", "format_version": 1,
      "name": "ct-prior-demo", "task": "ct_prior", "modality": "CT",
      "architecture": {...},            # DiffusionNetwork config
      "schedule": {...},                # noise schedule (diffusers names)
      "normalization": {...},           # see engine.intensity
      "pixel_spacing_mm": [3.0, 3.0], "patch_size": [64, 64],
      "regions": ["unknown", "head-neck", "chest", "abdomen"],
      "training": {"data": [...], "steps": ..., "command": ..., ...},
      "metrics": {...},
      "summary": "one line shown in model choosers"
    }

Weights load with safetensors only: no pickle, no code execution.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .intensity import DEFAULT_CT_NORMALIZATION
from .networks import REGIONS, DiffusionNetwork, complete_architecture
from .schedulers import complete_schedule

FORMAT = "mediffuse-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "mediffuse.json"

#: Tasks a checkpoint can be made for.
TASKS = ("ct_prior", "ct_prior_coarse", "ct_prior_detail", "image_prior", "translation", "super_resolution",
         "denoising", "lesion_healing", "lesion_segmentation")
#: The task of segmentation checkpoints (the only one whose network outputs logits).
SEGMENTATION_TASK = "lesion_segmentation"
#: What a network was trained to output (card ``objective``; :attr:`Checkpoint.objective`).
OBJECTIVES = ("diffusion", "segmentation")


def task_mismatch(task: str, wanted: str | tuple[str, ...] | None) -> str | None:
    """None when a checkpoint of ``task`` does for ``wanted`` (a task, several that
    all do, or None: any); else what was wanted, in words for a message."""
    if wanted is None:
        return None
    wanted = (wanted,) if isinstance(wanted, str) else tuple(wanted)
    if task in wanted:
        return None
    return " or ".join(f"a {w!r} model" for w in wanted)


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, incompatible or for another task."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the network (eval mode, on CPU) and its card."""

    network: DiffusionNetwork
    card: dict[str, Any]
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.card.get("name", self.path.name if self.path else "checkpoint")

    @property
    def task(self) -> str:
        return self.card["task"]

    @property
    def schedule(self) -> dict:
        return self.card["schedule"]

    @property
    def normalization(self) -> dict:
        return self.card["normalization"]

    @property
    def objective(self) -> str:
        """What the network was trained to output: ``'diffusion'`` (noise, velocity or
        sample of its schedule) or ``'segmentation'`` (per-pixel logits,
        :func:`~.inference.segmentation_logits`)."""
        return self.card.get("objective", "diffusion")

    def require(self, *, task: str | tuple[str, ...] | None = None, modality: str | None = None) -> "Checkpoint":
        """Raise :class:`CheckpointError` unless this is for ``task`` (one or
        several, :func:`task_mismatch`) / ``modality``."""
        where = f"checkpoint {self.name!r}" + (f" ({self.path})" if self.path else "")
        if (wanted := task_mismatch(self.task, task)) is not None:
            raise CheckpointError(f"{where} is a {self.task!r} model; this needs {wanted}")
        if modality is not None and self.card.get("modality") not in (modality, "any"):
            raise CheckpointError(
                f"{where} was trained on {self.card.get('modality')} images; the input is {modality}")
        return self


def make_card(*, name: str, task: str, modality: str, architecture: dict | None = None,
              schedule: dict | None = None, normalization: dict | None = None,
              pixel_spacing_mm=None, patch_size=None, training: dict | None = None,
              metrics: dict | None = None, summary: str = "", **extra) -> dict[str, Any]:
    """A complete card dict with defaults filled in (saved next to the weights)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {TASKS}")
    card = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "task": task,
        "modality": modality,
        "architecture": complete_architecture(architecture),
        "schedule": complete_schedule(schedule),
        "normalization": dict(normalization or DEFAULT_CT_NORMALIZATION),
        "pixel_spacing_mm": list(pixel_spacing_mm) if pixel_spacing_mm is not None else None,
        "patch_size": list(patch_size) if patch_size is not None else None,
        "regions": list(REGIONS),
        "training": training or {},
        "metrics": metrics or {},
        "summary": summary,
    }
    card.update(extra)
    return card


def save_checkpoint(folder, network: DiffusionNetwork, card: dict, *,
                    dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    """Write ``network`` and ``card`` to ``folder`` (created).

    ``dtype=torch.float16`` halves the size (weights are cast back to float32
    on load); the architecture in the card is taken from the network.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if (folder / WEIGHTS_FILE).exists() and not overwrite:
        raise CheckpointError(f"{folder}: a checkpoint exists there already (nothing was written)")
    folder.mkdir(parents=True, exist_ok=True)
    card = dict(card)
    card["architecture"] = network.config
    card["weights_dtype"] = str(dtype).replace("torch.", "")
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in network.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
    (folder / CARD_FILE).write_text(json.dumps(card, indent=2, default=_json_default) + "\n")
    return folder


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_card(folder) -> dict[str, Any]:
    """Read and check a checkpoint's JSON without loading weights."""
    folder = Path(folder)
    path = folder / CARD_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a mediffuse checkpoint (no {CARD_FILE})")
    try:
        card = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint description ({exc})") from exc
    if card.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a mediffuse checkpoint (format {card.get('format')!r})")
    if int(card.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {card['format_version']} is newer than this "
            f"napari-mediffuse understands ({FORMAT_VERSION}); update the plugin")
    for key in ("task", "modality", "architecture", "schedule", "normalization"):
        if key not in card:
            raise CheckpointError(f"{path}: checkpoint description lacks {key!r}")
    objective = card.get("objective", "diffusion")
    if objective not in OBJECTIVES:
        raise CheckpointError(f"{path}: unknown objective {objective!r} (known: {', '.join(OBJECTIVES)})")
    if (card["task"] == SEGMENTATION_TASK) != (objective == "segmentation"):
        raise CheckpointError(f"{path}: a {card['task']!r} checkpoint with objective {objective!r}: a lesion "
                              "segmenter and only it has objective 'segmentation'")
    return card


def load_checkpoint(folder, *, task: str | tuple[str, ...] | None = None, modality: str | None = None) -> Checkpoint:
    """Load a checkpoint folder (safetensors + JSON) into a :class:`Checkpoint`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    card = read_card(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{folder}: checkpoint has no {WEIGHTS_FILE}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: cannot read weights ({exc})") from exc
    try:
        network = DiffusionNetwork(card["architecture"])
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        network.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(
            f"{folder}: weights do not match the architecture in {CARD_FILE} ({str(exc)[:300]})") from exc
    network.eval().requires_grad_(False)
    return Checkpoint(network=network, card=card, path=folder).require(task=task, modality=modality)
