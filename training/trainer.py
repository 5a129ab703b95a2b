"""The shared diffusion trainer: DDP, EMA, AMP, accumulation, resume, export.

Every model of the project trains through :func:`train` with a config dict
(one YAML file per model in ``training/configs``). Run state lives in an
output folder::

    OUTPUT/config.yaml      the resolved config
    OUTPUT/state.pt         model, EMA, optimiser, step (resume)
    OUTPUT/log.jsonl        one JSON line per log / validation event
    OUTPUT/ema/             the latest EMA weights in the plugin's format
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from napari_mediffuse.engine.checkpoint import OBJECTIVES, make_card, save_checkpoint
from napari_mediffuse.engine.devices import autocast_dtype
from napari_mediffuse.engine.networks import DiffusionNetwork
from napari_mediffuse.engine.schedulers import alphas_cumprod, complete_schedule

from . import distributed
from .data import CoarseVolumes, ConfigError, MultiLevelSlices, check_data_config, load_volumes, loading_config

log = logging.getLogger("training")

STATE_FILE = "state.pt"
LOG_FILE = "log.jsonl"


def load_config(path) -> dict:
    """Read a YAML config. ``base: other.yaml`` (relative to this file) loads
    that config first and merges this one over it, key by key (a fine-tune
    states only what it changes)."""
    path = Path(path)
    with open(path) as handle:
        config = yaml.safe_load(handle) or {}
    if "base" in config:
        config = merge_configs(load_config(path.parent / config.pop("base")), config)
    config.setdefault("train", {})
    config["config_path"] = str(path)
    return config


def merge_configs(base: dict, override: dict) -> dict:
    """``base`` with ``override``'s keys put over it; nested dicts merge, other values replace."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_configs(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def make_datasets(config: dict, *, seed: int = 0, rank: int = 0, start_step: int = 0, output=None):
    """(train, validation) datasets: multi-level CT slices (validation: the
    ``data.validation`` patients when the config names them, else the held-out
    block of each training volume), whole coarse
    volumes (``data.kind: coarse_volume``) for the coarse 3D prior, paired
    source/target slices (``data.pairs``, :mod:`training.paired`) for
    translation models, or whole 2D images (``data.kind: image_folder``,
    :mod:`training.images`) for the 2D image prior."""
    if "pairs" in config["data"]:
        from .paired import make_datasets as paired_datasets

        return paired_datasets(config, seed=seed, rank=rank)
    if config["data"].get("kind") == "image_folder":
        from .images import make_datasets as image_datasets

        return image_datasets(config, seed=seed, rank=rank)
    if config["data"].get("kind") == "low_dose":
        from .low_dose import make_datasets as low_dose_datasets

        return low_dose_datasets(config, seed=seed, rank=rank, start_step=start_step, output=output)
    if config["data"].get("kind") == "lesion_healing":
        from .healing import make_datasets as healing_datasets

        return healing_datasets(config, seed=seed, rank=rank, start_step=start_step)
    if config["data"].get("kind") == "thick_thin":
        from .thick_thin import make_datasets as thick_thin_datasets

        return thick_thin_datasets(config, seed=seed, rank=rank, start_step=start_step)
    if config["data"].get("kind") == "layout_detail":
        from .layout_detail import make_datasets as layout_detail_datasets

        return layout_detail_datasets(config, seed=seed, rank=rank, start_step=start_step)
    if config["data"].get("kind") == "coarse_volume":
        # boxes augmented at a finer grid are loaded there (training.data.CoarseVolumes averages them down)
        data = loading_config(config["data"])
        volumes = load_volumes(data, config["normalization"])
        # validated on held-out patients (data.validation) where there are some, else on the
        # training boxes without augmentation (one patient: a box with a hole is no body)
        val_volumes = (load_volumes(data, config["normalization"], split="validation")
                       if config["data"].get("validation") else volumes)
        return (CoarseVolumes(volumes, config["data"], seed=seed, rank=rank),
                CoarseVolumes(val_volumes, config["data"], seed=seed, part="val"))
    volumes = load_volumes(config["data"], config["normalization"])
    train_set = MultiLevelSlices(volumes, config["data"], seed=seed, rank=rank)
    train_set.start_step = start_step
    if config["data"].get("validation"):
        volumes = load_volumes(config["data"], config["normalization"], split="validation")
    return train_set, MultiLevelSlices(volumes, config["data"], seed=seed, part="val")


#: What the network predicts (the schedule's ``prediction_type``, diffusers names).
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def diffusion_loss(network, batch: dict, abar: torch.Tensor, generator: torch.Generator,
                   device: torch.device, timesteps: torch.Tensor | None = None,
                   prediction_type: str = "epsilon") -> torch.Tensor:
    """MSE of the network's prediction at uniformly drawn steps (DDPM objective).

    The target is the noise (``'epsilon'``, the default), the velocity
    ``v = sqrt(abar) eps - sqrt(1 - abar) x0`` (``'v_prediction'``, well
    conditioned at every step, used by translation models that sample in a
    few steps from pure noise) or the clean image (``'sample'``). A batch
    with ``weight_map`` (the image's shape) weighs each pixel's squared
    error by it; one with ``weight`` (one per sample) weighs each sample's
    mean squared error by it (normalised by the batch's total weight).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; known: {PREDICTION_TYPES}")
    x0 = batch["image"].to(device)
    n = x0.shape[0]
    if timesteps is None:
        timesteps = torch.randint(0, len(abar), (n,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    a = abar[timesteps].to(device, torch.float32).view(n, *([1] * (x0.dim() - 1)))
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    pred = network(x_t, timesteps.to(device), coords=batch["coords"].to(device),
                   condition=batch["condition"].to(device) if "condition" in batch else None,
                   region=batch["region"].to(device))
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = a.sqrt() * noise - (1 - a).sqrt() * x0
    else:
        target = x0
    squared = (pred.float() - target) ** 2
    if "weight_map" in batch:  # per pixel (lesion healing: the lesions' pixels count more)
        squared = squared * batch["weight_map"].to(device, torch.float32)
    if "weight" not in batch:
        return torch.mean(squared)
    per_sample = squared.flatten(1).mean(dim=1)
    weight = batch["weight"].to(device, torch.float32)
    return (weight * per_sample).sum() / weight.sum().clamp_min(1e-12)


def segmentation_loss(network, batch: dict, device: torch.device, num_steps: int) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice (MONAI) of the network's logits against
    ``batch['image']`` (a 0/1 mask) given ``batch['condition']``.

    The network is the diffusion network run as a plain image-to-image model:
    its noisy-image input is zero and its step the last one, where a
    conditional model has learnt to rely on its condition alone (so a warm
    start from a restoration model begins where its features are useful).
    The cross-entropy scores every pixel; the Dice term keeps small lesions
    (a 10 mm lesion is about 0.1 % of a crop at 4 mm) from being drowned by
    the background. A batch with ``weight_map`` makes the cross-entropy a
    weighted mean (the Dice term is not weighted).
    """
    from monai.losses import DiceLoss

    target = batch["image"].to(device, torch.float32)
    n = target.shape[0]
    timesteps = torch.full((n,), num_steps - 1, dtype=torch.long, device=device)
    logits = network(torch.zeros_like(target), timesteps, coords=batch["coords"].to(device),
                     condition=batch["condition"].to(device), region=batch["region"].to(device)).float()
    if "weight_map" in batch:  # per pixel (data.lesion_balance_mm: small lesions count as much as large)
        weight = batch["weight_map"].to(device, torch.float32)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
        bce = (weight * bce).sum() / weight.sum()
    else:
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    # batch=True: one Dice over the whole batch; per crop, each crop without lesions would score a
    # Dice of about 1 for predicting nothing and pull towards it
    return bce + DiceLoss(sigmoid=True, batch=True)(logits, target)


def draw_timesteps(n: int, num_steps: int, generator: torch.Generator,
                   last_step_fraction: float = 0.0) -> torch.Tensor:
    """Training steps, uniform over ``[0, num_steps)``; with
    ``last_step_fraction`` (``train.last_step_fraction``) that share of the
    batch at the last step instead, where a conditional model's prediction is
    its posterior mean given the condition alone (what the learned
    super-resolution returns with one network evaluation)."""
    timesteps = torch.randint(0, num_steps, (n,), generator=generator)
    if last_step_fraction > 0:
        last = torch.rand(n, generator=generator) < last_step_fraction
        timesteps[last] = num_steps - 1
    return timesteps


def _amp(device: torch.device, precision: str):
    """(autocast context factory, GradScaler or None). AMP only on GPU."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext, None
    # the inference rule: bf16 only where the GPU computes it natively (an explicit bf16 elsewhere is refused)
    dtype = autocast_dtype(device, precision)
    use_bf16 = dtype == torch.bfloat16
    scaler = None if use_bf16 else torch.amp.GradScaler("cuda")
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def check_training_data(config: dict) -> None:
    """Check a config's data before anything runs: missing files, a patient in two
    splits, a pack made from other data (the check its kind of data has)."""
    data = config["data"]
    if data.get("packed"):
        from .pack import check_pack

        check_pack(data, config["normalization"])
    elif "pairs" in data:
        from .paired import check_pair_split

        check_pair_split(data)
    elif data.get("kind") != "image_folder":
        check_data_config(data)


class RunExistsError(FileExistsError):
    """The output folder holds a run (its state file) and resuming was not asked for."""


def check_run_output(output, resume: bool) -> None:
    """Refuse to start a new run where one is (``STATE_FILE``) unless it is
    resumed: a new run there would overwrite that run's weights. Every rank
    of a distributed job checks before any process group exists, so all of
    them stop alike and none waits for the others."""
    state = Path(output) / STATE_FILE
    if state.exists() and not resume:
        raise RunExistsError(f"{output}: holds a run already ({state.name}); pass --resume to continue it, "
                             "or give another --output")


def train(config: dict, output, *, resume: bool = False, device: str = "auto",
          precision: str = "auto", max_steps: int | None = None, command: str | None = None) -> Path:
    """Train the model of ``config`` into ``output``; returns the EMA checkpoint folder.

    Raises :class:`RunExistsError` when ``output`` holds a run and ``resume`` is false."""
    check_run_output(output, resume)
    check_training_data(config)
    objective = training_objective(config)
    info = distributed.setup(device)
    output = Path(output)
    tcfg = dict(config["train"])
    if max_steps is not None:
        tcfg["max_steps"] = max_steps
    total_steps = int(tcfg["max_steps"])
    max_seconds = float(tcfg.get("max_minutes", 0) or 0) * 60
    seed = int(config.get("seed", 0))
    torch.manual_seed(seed)  # same initial weights on every rank

    if info.is_main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    distributed.barrier(info)

    state_path = output / STATE_FILE
    state = None
    if resume and state_path.exists():
        state = torch.load(state_path, map_location=info.device, weights_only=True)
    train_set, val_set = make_datasets(config, seed=seed, rank=info.rank, output=output,
                                       start_step=int(state["step"]) if state else 0)
    loader = torch.utils.data.DataLoader(train_set, batch_size=int(tcfg["batch_size"]),
                                         num_workers=int(tcfg.get("num_workers", 0)))
    val_batch = val_set.fixed_batch(int(tcfg.get("validation_samples", 64)))

    network = DiffusionNetwork(config["architecture"])
    if tcfg.get("init_from") and not (resume and (output / STATE_FILE).exists()):
        init_weights(network, tcfg["init_from"], config["architecture"])
    # read once: every exported card records where a fine-tune started and the pack it trained from
    init_from = _init_provenance(tcfg["init_from"]) if tcfg.get("init_from") else None
    packed = _pack_provenance(config["data"])
    network = network.to(info.device)
    ema = AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(float(tcfg.get("ema_decay", 0.999))))
    optimizer = torch.optim.AdamW(network.parameters(), lr=float(tcfg["learning_rate"]), weight_decay=0.0)
    autocast, scaler = _amp(info.device, precision)
    model = DistributedDataParallel(network) if info.enabled else network
    abar = alphas_cumprod(config.get("schedule")).float()
    prediction_type = complete_schedule(config.get("schedule"))["prediction_type"]

    step, elapsed_before = 0, 0.0
    if state is not None:
        network.load_state_dict(state["network"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        step, elapsed_before = int(state["step"]), float(state.get("elapsed", 0.0))
        log.info("resumed from %s at step %d", state_path, step)
        _log(output, info, {"step": step, "resumed": True, "seconds": round(elapsed_before, 1)})
        del state
    generator = torch.Generator().manual_seed(seed * 1000 + info.rank + step)

    accumulate = int(tcfg.get("grad_accumulation", 1))
    last_step_fraction = float(tcfg.get("last_step_fraction", 0.0))
    warmup = int(tcfg.get("warmup_steps", 0))
    base_lr = float(tcfg["learning_rate"])
    start = time.monotonic()
    batches = iter(loader)
    running = []
    # a state file at least every checkpoint_minutes of wall time as well as
    # every checkpoint_every steps; SIGTERM (end of a session) saves and stops
    checkpoint_seconds = float(tcfg.get("checkpoint_minutes", 0) or 0) * 60
    last_save = time.monotonic()
    stop = _StopFlag()

    def elapsed():
        return elapsed_before + time.monotonic() - start

    def save_state():
        if info.is_main:
            state = {"network": network.state_dict(), "ema": ema.state_dict(),
                     "optimizer": optimizer.state_dict(), "step": step, "elapsed": elapsed()}
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            tmp = state_path.with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(state_path)
            export_ema(config, ema.module, output / "ema", step=step, seconds=elapsed(),
                       world_size=info.world_size, command=command, init_from=init_from, packed=packed)

    while step < total_steps and not (max_seconds and elapsed() >= max_seconds) and not stop.requested:
        for group in optimizer.param_groups:
            group["lr"] = base_lr * _lr_factor(step, warmup, total_steps)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for micro in range(accumulate):
            batch = next(batches)
            sync = micro == accumulate - 1 or not info.enabled
            with (contextlib.nullcontext() if sync else model.no_sync()):
                with autocast():
                    if objective == "segmentation":
                        loss = segmentation_loss(model, batch, info.device, len(abar)) / accumulate
                    else:
                        loss = diffusion_loss(model, batch, abar, generator, info.device,
                                              timesteps=draw_timesteps(len(batch["image"]), len(abar), generator,
                                                                       last_step_fraction),
                                              prediction_type=prediction_type) / accumulate
                (scaler.scale(loss) if scaler is not None else loss).backward()
            loss_sum += float(loss.detach())
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        ema.update_parameters(network)
        step += 1
        running.append(loss_sum)

        if step % int(tcfg.get("log_every", 50)) == 0 or step == total_steps:
            _log(output, info, {"step": step, "loss": float(np.mean(running)),
                                "lr": optimizer.param_groups[0]["lr"], "seconds": round(elapsed(), 1)})
            running = []
        if step % int(tcfg.get("validate_every", 1000)) == 0 or step == total_steps:
            val = validation_loss(ema.module, val_batch, abar, info.device, prediction_type=prediction_type,
                                  objective=objective)
            _log(output, info, {"step": step, "val_loss": distributed.mean_across(val, info),
                                "seconds": round(elapsed(), 1)})
        if step % int(tcfg.get("checkpoint_every", 1000)) == 0 or (
                checkpoint_seconds and time.monotonic() - last_save >= checkpoint_seconds):
            save_state()
            last_save = time.monotonic()

    stop.restore()
    if stop.requested:
        log.info("SIGTERM: saving step %d and stopping", step)
    save_state()
    distributed.barrier(info)
    distributed.teardown(info)
    return output / "ema"


class _StopFlag:
    """Set by SIGTERM (main thread only), so the loop stops after the current step and saves."""

    def __init__(self):
        import signal
        import threading

        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        if self._previous is not None:
            import signal

            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def check_architecture(architecture: dict | None) -> None:
    """Build the config's network on the ``meta`` device (no memory, no
    weights), so a bad architecture (unknown backbone, a position axis too
    many...) is a :class:`~training.data.ConfigError` before any data loads."""
    from .data import ConfigError

    try:
        with torch.device("meta"):
            DiffusionNetwork(architecture)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"architecture: {exc}") from exc


def init_weights(network: DiffusionNetwork, checkpoint, architecture: dict) -> None:
    """Warm start: copy a checkpoint folder's weights into ``network``.

    The checkpoint's architecture must equal ``architecture`` (the run's
    config); the noise schedule and prediction type may differ, so a model can
    be fine-tuned to another parameterisation or on other data. One
    exception: a network may gain inputs over the checkpoint's, otherwise the
    same architecture: condition channels (the super-resolution model starts
    from the CT prior) and position axes (the prior learning its slice's
    place in the volume). The new inputs get zero weights, so the network
    starts as the checkpoint and learns to use them (ControlNet's zero
    initialisation, on the first convolution).
    """
    from napari_mediffuse.engine.checkpoint import CheckpointError, load_checkpoint
    from napari_mediffuse.engine.networks import complete_architecture, position_axes_of

    source = load_checkpoint(checkpoint)
    # position_axes written out, so a card without the key equals a config that states the default
    theirs, mine = (dict(c, position_axes=position_axes_of(c))
                    for c in map(complete_architecture, (source.card["architecture"], architecture)))
    if theirs == mine:
        network.load_state_dict(source.network.state_dict())
    elif _without_added_inputs(theirs) == _without_added_inputs(mine) and _only_gains_inputs(source.network, network):
        add_inputs(network, source.network)
    else:
        raise CheckpointError(f"train.init_from {checkpoint}: its architecture differs from the config's; "
                              "a warm start needs the same network (or the same one with fewer inputs: "
                              "no conditioning, fewer position axes)")
    log.info("initialised from %s (%s)", checkpoint, source.name)


def _without_added_inputs(architecture: dict) -> dict:
    return {k: v for k, v in architecture.items()
            if k not in ("condition_channels", "condition_windows", "position_axes")}


def _only_gains_inputs(old: DiffusionNetwork, new: DiffusionNetwork) -> bool:
    """``new`` has the inputs of ``old`` and maybe more: condition channels
    where ``old`` has none, position axes beyond ``old``'s."""
    return (old.condition_channels in (0, new.condition_channels)
            and (not old.condition_channels or old.condition_windows == new.condition_windows)
            and old.position_axes <= new.position_axes)


def _input_layout(network: DiffusionNetwork) -> dict[str, tuple[int, int]]:
    """(start, stop) of each input group of the network's first layer, before the stem."""
    image = network.image_channels
    condition = network.condition_channels * (1 + len(network.condition_windows))
    positions = 2 * network.position_frequencies * network.position_axes
    return {"image": (0, image), "condition": (image, image + condition),
            "positions": (image + condition, image + condition + positions)}


def add_inputs(network: DiffusionNetwork, smaller: DiffusionNetwork) -> None:
    """Copy ``smaller`` into ``network``, which takes more inputs (condition
    channels, position axes): every weight as is, except the first
    convolution, whose weights for the inputs both take are copied and those
    of the new inputs set to zero."""
    source = smaller.state_dict()
    target = network.state_dict()
    widened = [k for k in target if k in source and target[k].shape != source[k].shape]
    if len(widened) != 1 or target[widened[0]].dim() < 3 or \
            target[widened[0]].shape[0] != source[widened[0]].shape[0]:
        raise ValueError(f"expected one widened input convolution, found {widened}")
    key = widened[0]
    factor = network.stem_stride ** network.spatial_dims  # channels per input channel after the stem
    old, new = source[key], torch.zeros_like(target[key])
    old_layout, new_layout = _input_layout(smaller), _input_layout(network)
    for group, (a, b) in old_layout.items():
        # the encoding is axis-major, so the old position axes are the first channels of the new ones
        d = new_layout[group][0]
        new[:, d * factor:(d + b - a) * factor] = old[:, a * factor:b * factor]
    network.load_state_dict(dict(source, **{key: new}))


def _pack_provenance(data: dict) -> dict | None:
    """The pack a config trains from and whether it kept every axial slice, or None."""
    if not data.get("packed"):
        return None
    from .pack import read_pack_meta

    return {"path": str(data["packed"]), "slice_step": int(read_pack_meta(data["packed"]).get("slice_step", 1))}


def _init_provenance(folder) -> dict:
    """Where a fine-tune started: the folder and its card's training summary."""
    from napari_mediffuse.engine.checkpoint import CheckpointError, read_card

    out = {"path": str(folder)}
    try:
        card = read_card(folder)
    except (CheckpointError, OSError):
        return out
    training = card.get("training", {})
    out.update(name=card.get("name"), steps=training.get("steps"), wall_seconds=training.get("wall_seconds"),
               command=training.get("command"), config=training.get("config"))
    if training.get("init_from"):
        out["init_from"] = training["init_from"]
    return out


def training_objective(config: dict) -> str:
    """The config's ``train.objective`` (default ``'diffusion'``; what the
    network learns, :data:`~napari_mediffuse.engine.checkpoint.OBJECTIVES`), checked."""
    objective = config.get("train", {}).get("objective", "diffusion")
    if objective not in OBJECTIVES:
        raise ConfigError(f"train.objective: unknown {objective!r}; known: {OBJECTIVES}")
    data = config.get("data", {})
    segmenting = (data.get("kind"), data.get("target"), config.get("task")) == (
        "lesion_healing", "lesion_mask", "lesion_segmentation")
    if (objective == "segmentation") != segmenting:
        raise ConfigError("train.objective: segmentation goes with data.kind lesion_healing, data.target "
                         f"lesion_mask and task lesion_segmentation, and only with them (got objective "
                         f"{objective!r}, data.kind {data.get('kind')!r}, data.target {data.get('target')!r}, "
                         f"task {config.get('task')!r})")
    return objective


@torch.no_grad()
def validation_loss(network, batch: dict, abar: torch.Tensor, device, prediction_type: str = "epsilon",
                    objective: str = "diffusion") -> float:
    """Loss on fixed held-out samples at fixed steps (comparable across runs)."""
    network.eval()
    if objective == "segmentation":
        return float(segmentation_loss(network, batch, device, len(abar)))
    n = batch["image"].shape[0]
    timesteps = torch.linspace(0, len(abar) - 1, n).round().long()
    generator = torch.Generator().manual_seed(0)
    return float(diffusion_loss(network, batch, abar, generator, device, timesteps=timesteps,
                                prediction_type=prediction_type))


def _log(output: Path, info, record: dict) -> None:
    if not info.is_main:
        return
    line = json.dumps(record)
    log.info(line)
    with open(output / LOG_FILE, "a") as handle:
        handle.write(line + "\n")


def read_log(output) -> list[dict]:
    path = Path(output) / LOG_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def card_domain(config: dict) -> dict:
    """``{"domain": ...}`` for a multi-resolution prior (``data.pixel_sizes_mm``):
    its card has no single pixel spacing, so the pixel-size range it was
    trained on is what the tasks' domain check compares a scan with; plus
    the config's own ``domain`` block (the learned restoration models, which
    work at each scan's own voxel size, state the range they saw there)."""
    sizes = config.get("data", {}).get("pixel_sizes_mm")
    domain = {"pixel_spacing_mm": [float(sizes[0]), float(sizes[1])]} if sizes else {}
    domain.update(config.get("domain") or {})  # a config's own domain block (models kept at native size)
    return {"domain": domain} if domain else {}


def export_ema(config: dict, network: DiffusionNetwork, folder: Path, *, step: int, seconds: float,
               world_size: int = 1, command: str | None = None, dtype=torch.float32,
               metrics: dict | None = None, init_from: dict | None = None, packed: dict | None = None) -> Path:
    """Write EMA weights and a full card (plugin checkpoint format).

    ``init_from``: where a fine-tune started (:func:`_init_provenance`); ``packed``: the pack it
    trained from (:func:`_pack_provenance`); both recorded in the card."""
    records = read_log(folder.parent) if (folder.parent / LOG_FILE).exists() else []
    val = [r["val_loss"] for r in records if "val_loss" in r]
    data = config["data"]
    extra = {}
    if "pairs" in data:  # translation: direction, source normalisation, context...
        from .paired import card_fields

        extra = card_fields(config)
    if data.get("kind") == "coarse_volume":  # the box the coarse prior draws, in mm
        extra = {"volume_shape": [int(n) for n in data["volume_shape"]],
                 "voxel_spacing_mm": [float(data["spacing_mm"])] * 3}
    if data.get("kind") == "layout_detail":  # the coarse layout's voxel the detail stage was trained from
        extra = {"coarse_voxel_mm": float(data["coarse_mm"])}
        if data.get("condition_blur_mm"):  # and blurred up to this (coarser layouts: tasks.synthesize.fits_layout)
            extra["layout_blur_mm"] = float(data["condition_blur_mm"])
    extra.update(card_domain(config))
    if config.get("default"):  # the task's default among the models of its folder (engine.registry)
        extra["default"] = True
    objective = training_objective(config)
    if objective != "diffusion":  # what the network's output means (engine.checkpoint.OBJECTIVES)
        extra["objective"] = objective
    if data.get("residual_scale"):  # a restoration model generating s (target - condition)
        extra["residual_scale"] = float(data["residual_scale"])
    card = make_card(
        name=config["name"], task=config["task"], modality=config["modality"],
        architecture=network.config, schedule=complete_schedule(config.get("schedule")),
        normalization=config["normalization"],
        pixel_spacing_mm=[data.get("spacing_mm")] * 2 if data.get("spacing_mm") else None,
        patch_size=[patch] * 2 if (patch := data.get("patch_size") or data.get("image_size")) else None,
        training={
            "data": [dict(e) if isinstance(e, dict) else {"path": e} for e in data.get("train", data.get("pairs", []))],
            "holdout_fraction": data.get("holdout_fraction", 0.0),
            "orientations": data.get("orientations"),
            **({"pixel_sizes_mm": data["pixel_sizes_mm"]} if data.get("pixel_sizes_mm") else {}),
            **({"region_weights": data["region_weights"]} if data.get("region_weights") else {}),
            **({split: [dict(e) if isinstance(e, dict) else {"path": e} for e in data[split]]
                for split in ("validation", "evaluation_only") if data.get(split)}),
            "image_level_probability": data.get("image_level_probability"),
            "steps": step, "batch_size_per_process": config["train"]["batch_size"],
            "grad_accumulation": config["train"].get("grad_accumulation", 1),
            "processes": world_size, "wall_seconds": round(seconds, 1),
            "command": command or " ".join(sys.argv), "config": config.get("config_path"),
            "torch": torch.__version__,
            **({"init_from": init_from} if init_from else {}),
            **({"mr_target": data["mr_target"]} if data.get("mr_target") else {}),
            **({"packed": packed} if packed else {}),
        },
        metrics={"validation_loss": val[-1] if val else None, **(metrics or {})},
        summary=config.get("summary", ""),
        **extra,
    )
    return save_checkpoint(folder, network, card, dtype=dtype, overwrite=True)
