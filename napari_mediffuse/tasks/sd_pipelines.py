"""Running Mediffuse-style Stable Diffusion checkpoints slice by slice.

The Mediffuse project fine-tuned Stable Diffusion 1.5 for CT <-> MR as an
InstructPix2Pix pipeline (the source image concatenated to the latent,
prompt "translate CT scan image to MRI scan image") and as a ControlNet on
Canny edges of the CT. A user holding such a checkpoint in diffusers format
(a folder with ``model_index.json`` naming
``StableDiffusionInstructPix2PixPipeline`` or
``StableDiffusionControlNetPipeline``) can run it over a volume here:

* each axial slice is windowed to [0, 1] (CT: ``ct_window``, default
  [-1000, 1000] HU as in Mediffuse's preprocessing; MR: the volume's
  minimum-maximum), made RGB and resized to ``resolution`` x ``resolution``
  (stretched, as Mediffuse's training slices were);
* ControlNet gets the Canny edges of that image (scikit-image, thresholds
  100/200 on the 0-255 scale, as Mediffuse's OpenCV ones) as white-on-black
  RGB;
* every slice uses the same seed (consistent appearance along the volume);
* the output's grey level (mean of RGB) is resized back to the slice: MR in
  arbitrary units ``1000 x grey``, CT in HU ``low + grey (high - low)``.

Nothing is downloaded: the folder is loaded with ``local_files_only``; the
text encoder needs the ``transformers`` package.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.control import check_cancel, report
from ..engine.devices import autocast_dtype, resolve_batch_size, select_device
from ..io.volume import Volume
from .common import RunOptions, TaskInputError, result_volume

#: diffusers pipeline class -> kind.
SUPPORTED_PIPELINES = {
    "StableDiffusionInstructPix2PixPipeline": "instruct-pix2pix",
    "StableDiffusionControlNetPipeline": "controlnet",
}
#: Mediffuse's prompts.
DEFAULT_PROMPTS = {"ct2mr": "translate CT scan image to MRI scan image",
                   "mr2ct": "translate MRI scan image to CT scan image"}
DEFAULT_NEGATIVE_PROMPTS = {"ct2mr": "CT scan like", "mr2ct": "MRI scan like"}
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 7.5
DEFAULT_IMAGE_GUIDANCE = 1.5
#: HU window of CT images (Mediffuse: clipped to [-1000, 1000], scaled to [0, 1]).
CT_WINDOW = (-1000.0, 1000.0)
CANNY_THRESHOLDS = (100.0, 200.0)
MR_OUTPUT_SCALE = 1000.0
INDEX_FILE = "model_index.json"


def is_pipeline_folder(path) -> bool:
    """True if ``path`` is a folder with a diffusers ``model_index.json``."""
    try:
        return (Path(path).expanduser() / INDEX_FILE).is_file()
    except (TypeError, OSError):
        return False


def pipeline_kind(folder) -> str:
    """'instruct-pix2pix' or 'controlnet' for a diffusers folder.

    Raises
    ------
    TaskInputError
        No ``model_index.json``, unreadable, or another pipeline class.
    """
    folder = Path(folder).expanduser()
    index = folder / INDEX_FILE
    if not index.is_file():
        raise TaskInputError(f"{folder}: not a diffusers pipeline folder (no {INDEX_FILE})")
    try:
        cls = json.loads(index.read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise TaskInputError(f"{index}: unreadable ({exc})") from exc
    if cls not in SUPPORTED_PIPELINES:
        raise TaskInputError(
            f"{folder}: a diffusers {cls or 'unknown'} pipeline; translation runs "
            f"{' or '.join(SUPPORTED_PIPELINES)} folders only. Nothing was written")
    return SUPPORTED_PIPELINES[cls]


def load_pipeline(folder, *, device="auto", precision="auto"):
    """Load a supported pipeline from disk (never downloads); returns (pipeline, kind)."""
    kind = pipeline_kind(folder)
    try:
        import transformers  # noqa: F401  (the CLIP text encoder)
    except ImportError as exc:
        raise TaskInputError("Stable Diffusion pipelines need the 'transformers' package "
                             "(pip install transformers)") from exc
    import diffusers

    device = device if isinstance(device, torch.device) else select_device(device)
    # the project's precision rule (bf16 where the GPU computes it, else fp16 on GPUs, fp32 on CPU)
    dtype = autocast_dtype(device, precision) or torch.float32
    cls = getattr(diffusers, {v: k for k, v in SUPPORTED_PIPELINES.items()}[kind])
    try:
        pipe = cls.from_pretrained(str(Path(folder).expanduser()), local_files_only=True,
                                   safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:
        raise TaskInputError(f"{folder}: cannot load the {cls.__name__} ({str(exc)[:300]})") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype), kind


def to_unit(data: np.ndarray, modality: str, ct_window=CT_WINDOW) -> np.ndarray:
    """Scanner units -> [0, 1]: CT through ``ct_window``, MR by the volume's min-max."""
    data = np.asarray(data, dtype=np.float32)
    if modality == "CT":
        low, high = ct_window
    else:
        low, high = float(data.min()), float(data.max())
    return np.clip((data - low) / max(high - low, 1e-6), 0.0, 1.0)


def canny_edges(image01: np.ndarray, low: float = CANNY_THRESHOLDS[0], high: float = CANNY_THRESHOLDS[1],
                sigma: float = 1.0) -> np.ndarray:
    """Canny edges (bool) of a [0, 1] image, thresholds on the 0-255 scale."""
    from skimage.feature import canny

    return canny(np.asarray(image01, dtype=np.float64) * 255.0, sigma=sigma, low_threshold=low,
                 high_threshold=high)


def _rgb(batch01: np.ndarray, size: int) -> torch.Tensor:
    """(B, H, W) in [0, 1] -> (B, 3, size, size) in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(batch01, dtype=np.float32))[:, None]
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return t.expand(-1, 3, -1, -1).contiguous()


def translate_with_pipeline(volume: Volume, folder, *, direction: str = "ct2mr", prompt: Optional[str] = None,
                            negative_prompt: Optional[str] = None, steps: Optional[int] = None,
                            guidance: Optional[float] = None, image_guidance: Optional[float] = None,
                            resolution: int = 512, ct_window=CT_WINDOW, canny_thresholds=CANNY_THRESHOLDS,
                            controlnet_scale: float = 1.0, options: Optional[RunOptions] = None) -> Volume:
    """Run an InstructPix2Pix or ControlNet pipeline over the axial slices of ``volume``.

    Parameters
    ----------
    volume : Volume
        Source CT (HU) or MR, display orientation; its modality must match
        ``direction`` (checked by :func:`~.translate.translate`).
    folder : str or Path
        diffusers pipeline folder.
    direction : {'ct2mr', 'mr2ct'}
    prompt, negative_prompt : str, optional
        Text prompts (default: Mediffuse's, see :data:`DEFAULT_PROMPTS`).
    steps : int, optional
        Denoising steps (default 20).
    guidance : float, optional
        Text guidance scale (default 7.5).
    image_guidance : float, optional
        InstructPix2Pix image guidance scale (default 1.5; ignored by ControlNet).
    resolution : int
        Square size (px, multiple of 8) the slices are resized to.
    ct_window : (float, float)
        HU mapped to [0, 1] for CT input, and back for CT output.
    canny_thresholds : (float, float)
        ControlNet: Canny hysteresis thresholds on the 0-255 scale.
    controlnet_scale : float
        ControlNet conditioning scale.
    options : RunOptions

    Returns
    -------
    Volume
        Synthetic MR (arbitrary units, 0-1000) or CT (HU) on the input's grid.
    """
    from .translate import SOURCE_MODALITY, SYNTHETIC_WARNING, TARGET_MODALITY, check_direction

    options = options or RunOptions()
    check_direction(volume, direction)
    kind = pipeline_kind(folder)
    resolution = int(resolution)
    if resolution < 8 or resolution % 8:
        raise TaskInputError(f"resolution must be a positive multiple of 8, got {resolution}")
    started = time.perf_counter()
    pipe, kind = load_pipeline(folder, device=options.device, precision=options.precision)
    prompt = prompt or DEFAULT_PROMPTS[direction]
    negative_prompt = DEFAULT_NEGATIVE_PROMPTS[direction] if negative_prompt is None else negative_prompt
    steps = DEFAULT_STEPS if steps is None else int(steps)
    guidance = DEFAULT_GUIDANCE if guidance is None else float(guidance)
    image_guidance = DEFAULT_IMAGE_GUIDANCE if image_guidance is None else float(image_guidance)
    seed = 0 if options.seed is None else int(options.seed)

    data = np.asarray(volume.data, dtype=np.float32)
    n, h, w = data.shape
    unit = to_unit(data, SOURCE_MODALITY[direction], ct_window)
    # Stable Diffusion at 512 px needs gigabytes of GPU memory and this loop does not halve a
    # batch that runs out of it: no device, so 4 unless told
    batch = resolve_batch_size(options.batch_size)
    out = np.empty_like(data)
    total = n * steps
    for start in range(0, n, batch):
        check_cancel(options.cancel)
        stop = min(n, start + batch)
        images = _rgb(unit[start:stop], resolution)
        if kind == "controlnet":
            edges = np.stack([canny_edges(im[0].numpy(), *canny_thresholds) for im in images])
            images = torch.from_numpy(edges.astype(np.float32))[:, None].expand(-1, 3, -1, -1).contiguous()
        count = stop - start
        generators = [torch.Generator("cpu").manual_seed(seed) for _ in range(count)]

        def on_step_end(_pipe, step, _t, kwargs, start=start):
            check_cancel(options.cancel)
            report(options.progress, start * steps + (step + 1) * (stop - start), total,
                   f"slices {start + 1}-{stop}/{n}, step {step + 1}/{steps}")
            return {}

        common = dict(prompt=[prompt] * count, negative_prompt=[negative_prompt] * count,
                      num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                      output_type="np", callback_on_step_end=on_step_end)
        if kind == "instruct-pix2pix":
            result = pipe(image=images, image_guidance_scale=image_guidance, **common)
        else:
            result = pipe(image=images, height=resolution, width=resolution,
                          controlnet_conditioning_scale=float(controlnet_scale), **common)
        grey = torch.from_numpy(np.asarray(result.images, dtype=np.float32).mean(axis=-1))[:, None]
        out[start:stop] = F.interpolate(grey, size=(h, w), mode="bilinear", align_corners=False)[:, 0].numpy()

    target = TARGET_MODALITY[direction]
    out = np.clip(out, 0.0, 1.0)
    if target == "CT":
        values = ct_window[0] + out * (ct_window[1] - ct_window[0])
        units = "HU"
    else:
        values = out * MR_OUTPUT_SCALE
        units = "arbitrary units (0-1000)"
    seconds = time.perf_counter() - started
    name = Path(folder).expanduser().name
    params = {"direction": direction, "pipeline": kind, "prompt": prompt, "negative_prompt": negative_prompt,
              "steps": steps, "guidance": guidance, "seed": seed, "resolution": resolution,
              "ct_window": list(ct_window), "seconds": round(seconds, 3),
              "seconds_per_slice": round(seconds / max(1, n), 4)}
    if kind == "instruct-pix2pix":
        params["image_guidance"] = image_guidance
    else:
        params.update(canny_thresholds=list(canny_thresholds), controlnet_scale=float(controlnet_scale))
    result = result_volume(volume, values.astype(np.float32), task="translate",
                           suffix=f"synthetic {target} ({name})", params=params, modality=target,
                           synthetic=True, model=str(folder))
    result.metadata.update(units=units, translation_direction=direction)
    result.metadata["warnings"].append(SYNTHETIC_WARNING)
    return result
