"""How much do anatomy channels or the 3D position help a CT prior? One-step denoising of held-out slices.

    python -m training.evaluate prior --config training/configs/ct_prior_multi_anatomy.yaml \\
        --model bundled=ct-prior-multi control=runs/ct-prior-multi-anatomy-control/ema \\
        anatomy=runs/ct-prior-multi-anatomy/ema --out docs/evaluation/prior_anatomy

Each model denoises the same held-out slices with the same noise in one
network evaluation (:func:`training.evaluate_prior.one_step_denoising`:
up to ``--max-slices`` per region of the config's ``data.validation``
patients, Gaussian noise of 25, 50, 100 and 400 HU); a model with anatomy
channels does it twice, with each slice's structures (where its patient has
them: the OpenKBP neck) and with none ('unknown', what a new patient gets);
a model with the 3D position (``position_axes: 3``) also does it twice, with
each slice's place in its scan and with none ('not known').
PSNR in the [-160, 240] HU window, per region.

Writes ``prior.json``, ``prior_table.md`` (the command first) and
``prior.png``: one held-out neck slice at 100 HU of noise, denoised by each
row, and the structures it was given.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from napari_mediffuse.engine.inference import NoisePredictor
from napari_mediffuse.engine.intensity import denormalize, hu_per_unit, intensity_range
from napari_mediffuse.engine.registry import load as load_model
from napari_mediffuse.engine.sampling import make_generator

from ..data import anatomy_channels
from ..evaluate_prior import heldout_slices, one_step_denoising, one_step_estimate, slice_condition
from . import command_line

#: Noise levels (HU): the tasks' range (a quarter-dose CT has 10-40 HU) and one far
#: above it, where a prior must draw layout rather than keep detail.
NOISE_HU = (25.0, 50.0, 100.0, 400.0)


def rows_of(models: dict) -> list[tuple[str, object, bool, bool]]:
    """(label, network, structures given, slice position given) for every
    evaluation row: a model with anatomy channels gives two rows, one with
    the 3D position two more."""
    rows = []
    for name, network in models.items():
        structures = ([(", structures given", True), (", structures unknown", False)]
                      if getattr(network, "condition_channels", 0) else [("", False)])
        positions = ([(", position given", True), (", position not known", False)]
                     if getattr(network, "uses_slice_position", False) else [("", False)])
        rows += [(name + s_label + p_label, network, given, placed)
                 for s_label, given in structures for p_label, placed in positions]
    return rows


def evaluate(config: dict, models: dict, picks, *, noise_hu=NOISE_HU) -> dict:
    """One-step denoising PSNR of every row of :func:`rows_of` on the same
    slices (``picks``, from :func:`heldout_slices`) and noise."""
    return {label: one_step_denoising(network, config, noise_hu=noise_hu, structures=given,
                                      slice_position=placed, picks=picks)
            for label, network, given, placed in rows_of(models)}


def noise_levels(results: dict) -> list[int]:
    first = next(iter(results.values()))
    return [int(key[len("noise_"):-len("HU")]) for key in first if key.startswith("noise_")]


def markdown(results: dict, command: str) -> str:
    regions = sorted({r for res in results.values() for r in res.get("by_region", {})})
    levels = noise_levels(results)
    head = " | ".join(f"{r} {n} HU" for r in regions for n in levels)
    lines = [f"<!-- {command} -->", "",
             "One-step denoising of held-out slices, PSNR (dB) in [-160, 240] HU; the noisy input's PSNR "
             "in the first row.", "",
             f"| model | {head} |", "|---|" + "---|" * (len(regions) * len(levels))]
    first = next(iter(results.values()))
    noisy = [first["by_region"][r][f"noise_{n}HU"]["psnr_noisy_soft"] for r in regions for n in levels]
    lines.append("| noisy input | " + " | ".join(f"{v:.2f}" for v in noisy) + " |")
    for label, res in results.items():
        values = [res["by_region"][r][f"noise_{n}HU"]["psnr_denoised_soft"] for r in regions for n in levels]
        lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    slices = {r: first["by_region"][r][f"noise_{levels[0]}HU"]["slices"] for r in regions}
    lines += ["", "Slices per region: " + ", ".join(f"{r} {n}" for r, n in slices.items()) + "."]
    return "\n".join(lines) + "\n"


def picture(config: dict, models: dict, picks, path: Path, *, noise_hu: float = 100.0,
            seed: int = 0) -> list[str]:
    """One held-out slice of ``picks`` (the evaluated ones), noised, and each
    row's estimate, side by side in the soft-tissue window. With anatomy
    channels: the slice with the most structure pixels, and a last tile
    showing its structures; without: the middle slice of the first region."""
    from skimage import io as skio

    hu_range = intensity_range(None, config["normalization"])
    scale = hu_per_unit(config["normalization"])
    channels = anatomy_channels(config["data"])
    with_labels = [p for p in picks if p.labels is not None]
    if channels and with_labels:
        slice_2d, region, labels, position = max(
            with_labels, key=lambda p: int(np.isin(p.labels, [v for c in channels for v in c]).sum()))
    elif picks:
        first = [p for p in picks if p.region == picks[0].region]
        slice_2d, region, labels, position = first[len(first) // 2]
    else:
        return []
    clean = torch.from_numpy(np.ascontiguousarray(slice_2d))[None, None]
    to_hu = lambda x: denormalize(x[0, 0].numpy(), hu_range)  # noqa: E731
    tiles, labels_out = [to_hu(clean)], ["clean"]
    for label, network, given, placed in rows_of(models):
        predictor = NoisePredictor(network, schedule=config.get("schedule"))
        noisy, estimate = one_step_estimate(
            predictor, clean, noise_hu / scale, config.get("schedule"), generator=make_generator(seed),
            condition=slice_condition(slice_2d, labels, channels if network.condition_channels else [], given),
            region=region, slice_position=position if placed else None)
        if len(tiles) == 1:
            tiles.append(to_hu(noisy))
            labels_out.append(f"noisy ({noise_hu:g} HU)")
        tiles.append(to_hu(estimate))
        labels_out.append(label)
    window = [np.clip((t + 160.0) / 400.0, 0, 1) for t in tiles]
    if channels and labels is not None:
        structures = np.zeros(slice_2d.shape)
        for k, c in enumerate(channels):
            structures[np.isin(labels, c)] = (k + 1) / len(channels)
        window.append(structures)
        labels_out.append("structures (grey level = channel)")
    row = np.concatenate([np.pad(t, ((0, 0), (0, 4))) for t in window], axis=1)
    skio.imsave(str(path), (row * 255).astype(np.uint8), check_contrast=False)
    path.with_suffix(".txt").write_text("tiles, left to right: " + ", ".join(labels_out) + "\n")
    return labels_out


def add_command(subparsers) -> None:
    p = subparsers.add_parser("prior", help="one-step denoising of held-out slices by CT priors, "
                                             "with and without anatomy channels")
    p.add_argument("--config", required=True, help="a config naming the held-out patients (data.validation) "
                                                   "and, for anatomy channels, their structures")
    p.add_argument("--model", nargs="+", required=True, metavar="LABEL=NAME|FOLDER",
                   help="models to compare: an installed checkpoint's name or a checkpoint folder")
    p.add_argument("--max-slices", type=int, default=16, help="slices per region")
    p.add_argument("--noise-hu", type=float, nargs="+", default=list(NOISE_HU), help="noise levels (HU)")
    p.add_argument("--out", required=True, help="folder for prior.json, prior_table.md, prior.png")

    def run(args) -> int:
        from ..trainer import load_config

        config = load_config(args.config)
        models = {}
        for item in args.model:
            label, _, name = item.partition("=")
            models[label] = load_model(name or label, task="ct_prior", modality="CT").network.float().eval()
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        command = command_line()
        picks = heldout_slices(config, config["normalization"], args.max_slices)  # read once for every row
        with torch.no_grad():  # not set_grad_enabled(False): the caller's autograd state is theirs
            results = evaluate(config, models, picks, noise_hu=args.noise_hu)
            tiles = picture(config, models, picks, out / "prior.png")
        (out / "prior.json").write_text(json.dumps({"command": command, "config": args.config,
                                                    "models": dict(m.partition("=")[::2] for m in args.model),
                                                    "picture_tiles": tiles, "results": results}, indent=2))
        table = markdown(results, command)
        (out / "prior_table.md").write_text(table)
        print(table)
        return 0

    p.set_defaults(func=run)
