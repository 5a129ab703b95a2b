"""How good is a translation model? Held-out pairs, metrics inside the mask.

    python -m training.evaluate translation CHECKPOINT --config CONFIG --output FOLDER

For every pair of the config (``data.pairs``; simulated pairs get new bias
and noise draws, ``--same-noise`` keeps the training ones), the held-out
block of axial slices (``holdout_fraction`` at ``holdout_side``, as in
training) is translated with :func:`napari_mediffuse.tasks.translate.translate`
exactly as a user would run it, and compared with the real target inside the
pair's mask (body):

* **PSNR** and **SSIM** inside the mask. MR targets: both images on [0, 1]
  (the reference through its own robust range, the same rule the model was
  trained with; the synthetic MR's 0-1000 a.u. / 1000), data range 1. CT
  targets: HU clipped to the model's HU window, data range = window width.
  SSIM is the mean of the SSIM map over mask pixels.
* **MAE** inside the mask: HU for MR -> CT (the SynthRAD2023 metric), the
  [0, 1] units for CT -> MR.
* **Seconds per slice** of the held-out run, and of a 256 x 256 run at the
  model's pixel size (the speed target), on this machine's CPU threads.
* A **lookup-table baseline** on the same slices and mask: the mean target
  value for each level of the (slightly smoothed) source on the training
  slices. The simulator maps HU to MR voxel by voxel after a 0.7-voxel blur,
  so on simulated pairs this is close to the best any model can do; on real
  pairs it is the floor a learned model should clear.

Held-out patients (``data.heldout_pairs``, never trained on) are translated
whole (``--max-slices``: their central slices). **Per region** (head-neck,
chest, abdomen: the pairs' ``region``) the report pools the model's metrics
over that region's held-out slices and scores the lookup table fitted on the
training slices of the same region beside it, with a verdict (does the model
beat the table on PSNR?) and a picture per region.

Writes ``translation_<direction>.json``, ``translation_<direction>.md`` and a
picture (source | synthetic | reference of one held-out slice; with several
regions also ``translation_<direction>_<region>.png``).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from napari_mediffuse.engine.checkpoint import load_checkpoint
from napari_mediffuse.engine.intensity import intensity_range, normalize
from napari_mediffuse.io.volume import Volume, slab_affine

log = logging.getLogger(__name__)

#: Mediffuse's published CT -> MR figures (SD 1.5 InstructPix2Pix, 512 x 512, A5000),
#: quoted for reference: different data, different hardware.
MEDIFFUSE_REFERENCE = {"instruct-pix2pix": {"psnr_db": 26.8, "ssim": 0.715, "seconds_per_slice": 3.5},
                       "controlnet": {"psnr_db": 8.5}}


# -- metrics ------------------------------------------------------------------------

def masked_psnr(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray, data_range: float) -> float:
    """PSNR (dB) over the mask's voxels: ``10 log10(range^2 / MSE)``."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        raise ValueError("empty mask")
    mse = float(np.mean((np.asarray(pred, np.float64)[mask] - np.asarray(ref, np.float64)[mask]) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(data_range ** 2 / mse))


def masked_mae(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute error over the mask's voxels (same units as the images)."""
    mask = np.asarray(mask, bool)
    return float(np.mean(np.abs(np.asarray(pred, np.float64)[mask] - np.asarray(ref, np.float64)[mask])))


def masked_ssim(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray, data_range: float) -> float:
    """Mean of the 2D SSIM maps (per axial slice) over the mask's pixels."""
    from skimage.metrics import structural_similarity

    pred, ref = np.asarray(pred, np.float64), np.asarray(ref, np.float64)
    mask = np.asarray(mask, bool)
    values, weights = [], []
    for p, r, m in zip(pred.reshape(-1, *pred.shape[-2:]), ref.reshape(-1, *ref.shape[-2:]),
                       mask.reshape(-1, *mask.shape[-2:])):
        if not m.any():
            continue
        win = min(7, *(s if s % 2 else s - 1 for s in p.shape))
        _, smap = structural_similarity(p, r, data_range=data_range, full=True, win_size=max(3, win))
        values.append(float(smap[m].mean()))
        weights.append(int(m.sum()))
    if not values:
        raise ValueError("empty mask")
    return float(np.average(values, weights=weights))


# -- evaluation ---------------------------------------------------------------------

def _to_unit_mr(mr: np.ndarray, full: np.ndarray, rule: dict) -> np.ndarray:
    return (normalize(mr, rule, intensity_range(full, rule)) + 1.0) / 2.0


def _pooled(triples, data_range: float) -> dict:
    """PSNR, SSIM, MAE over several (pred, ref, mask) stacks of any in-plane
    size: PSNR and MAE from the pooled masked voxels, SSIM the mask-weighted
    mean of the per-slice SSIM maps (as :func:`masked_ssim` over one stack)."""
    err2, err1, count, ssim_sum = 0.0, 0.0, 0, 0.0
    for pred, ref, mask in triples:
        mask = np.asarray(mask, bool)
        n = int(mask.sum())
        if not n:
            continue
        diff = np.asarray(pred, np.float64)[mask] - np.asarray(ref, np.float64)[mask]
        err2 += float(np.sum(diff ** 2))
        err1 += float(np.sum(np.abs(diff)))
        ssim_sum += masked_ssim(pred, ref, mask, data_range) * n
        count += n
    if not count:
        raise ValueError("empty mask")
    mse = err2 / count
    return {"psnr_db": float("inf") if mse == 0 else float(10.0 * np.log10(data_range ** 2 / mse)),
            "ssim": ssim_sum / count, "mae": err1 / count, "voxels": count}


def _lookup_keys(pair, direction: str, source_rule: dict, target_rule: dict, bins: int, smooth_voxels: float):
    from scipy import ndimage

    source, target = (pair.ct, pair.mr) if direction == "ct2mr" else (pair.mr, pair.ct)
    key = normalize(source, source_rule, intensity_range(source, source_rule))
    key = ndimage.gaussian_filter(key, smooth_voxels) if smooth_voxels else key
    index = np.clip(((key + 1.0) / 2.0 * (bins - 1)).round().astype(int), 0, bins - 1)
    if direction == "ct2mr":
        value = _to_unit_mr(target, target, target_rule)
    else:
        value = np.clip(target, *intensity_range(None, target_rule))
    return index, value


def lookup_baseline(pairs, data_config: dict, direction: str, source_rule: dict, target_rule: dict, *,
                    bins: int = 512, smooth_voxels: float = 0.7, evaluate=None, max_slices: int | None = None) -> dict:
    """PSNR / SSIM / MAE of a source-level -> target lookup table on the held-out blocks.

    The table is fitted on the training slices of every pair of ``pairs``
    (the mean target, in the evaluation's units, per bin of the source
    normalised to [-1, 1] and Gaussian-smoothed by ``smooth_voxels``); bins
    never seen are interpolated from their neighbours. It is scored on the
    held-out blocks of ``evaluate`` (default: ``pairs``; held-out patients
    whole, or their central ``max_slices``), the same slices as the model.
    """
    from ..paired import holdout_block

    keys, values, held = [], [], []
    for pair in pairs:
        if pair.held_out:
            continue
        index, value = _lookup_keys(pair, direction, source_rule, target_rule, bins, smooth_voxels)
        block = _eval_block(pair, data_config)
        train = np.ones(index.shape[0], bool)
        train[holdout_block(index.shape[0], pair, data_config)] = False
        keys.append(index[train].ravel())
        values.append(value[train].ravel())
        if evaluate is None and block.stop > block.start:
            held.append((index[block], value[block], pair.mask[block]))
    for pair in evaluate or ():
        block = _eval_block(pair, data_config, max_slices)
        if block.stop > block.start:
            index, value = _lookup_keys(pair, direction, source_rule, target_rule, bins, smooth_voxels)
            held.append((index[block], value[block], pair.mask[block]))
    keys, values = np.concatenate(keys), np.concatenate(values)
    count = np.bincount(keys, minlength=bins)
    total = np.bincount(keys, weights=values, minlength=bins)
    seen = np.flatnonzero(count)
    table = np.interp(np.arange(bins), seen, total[seen] / count[seen])
    rng = 1.0 if direction == "ct2mr" else float(np.subtract(*intensity_range(None, target_rule)[::-1]))
    pooled = _pooled([(table[i], v, m) for i, v, m in held], rng)
    out = {"psnr_db": pooled["psnr_db"], "ssim": pooled["ssim"], "bins": bins, "smooth_voxels": smooth_voxels}
    out["mae" if direction == "ct2mr" else "mae_hu"] = pooled["mae"]
    return out


def _eval_block(pair, data_config: dict, max_slices: int | None = None) -> slice:
    """The held-out slices of a pair that the evaluation translates: its
    held-out block (the first ``max_slices`` of it), or for a held-out
    patient the central ``max_slices``."""
    from ..paired import holdout_block

    n = pair.ct.shape[0]
    block = holdout_block(n, pair, data_config)
    if max_slices and block.stop - block.start > int(max_slices):
        start = block.start + (block.stop - block.start - int(max_slices)) // 2 if pair.held_out else block.start
        block = slice(start, start + int(max_slices))
    return block


def evaluate_translation(checkpoint, config: dict, *, steps: int | None = None, guidance: float | None = None,
                         ensemble: int | None = None,
                         sampler: str = "ddim", max_slices: int | None = None, new_noise: bool = True,
                         device: str = "cpu", seed: int = 0, speed_size: int | None = 256,
                         batch_size: int = 4, command: str | None = None, force: bool = False) -> dict:
    """Metrics of a translation checkpoint on the held-out slices of ``config``'s pairs.

    ``force``: run the model on regions it never saw (the task refuses them),
    to measure it against a model that did.

    Returns a dict with per-pair, per-region and overall ``psnr_db``,
    ``ssim``, ``mae`` (``mae_hu`` for MR -> CT) and ``seconds_per_slice``,
    and the lookup-table baseline overall and per region.
    """
    from napari_mediffuse.engine.networks import REGIONS
    from napari_mediffuse.tasks.common import RunOptions
    from napari_mediffuse.tasks.translate import DEFAULT_ENSEMBLE, DEFAULT_GUIDANCE, DEFAULT_STEPS, translate

    from ..paired import check_pair_split, load_heldout_pairs, load_pairs

    ckpt = load_checkpoint(checkpoint, task="translation")
    card = ckpt.card
    direction = card["direction"]
    data_config = copy.deepcopy(config["data"])
    check_pair_split(data_config)  # a patient in both lists, a missing file: before anything runs
    if new_noise:
        for entry in list(data_config["pairs"]) + list(data_config.get("heldout_pairs") or []):
            if "simulate" in entry:
                entry["simulate"]["seed"] = int(entry["simulate"].get("seed", 0)) + 1000
    pairs = load_pairs(data_config)
    evaluated = [p for p in pairs + load_heldout_pairs(data_config)
                 if (lambda b: b.stop > b.start)(_eval_block(p, data_config))]
    if not evaluated:
        raise ValueError("no held-out slices: set data.holdout_fraction or data.heldout_pairs in the config")
    steps = DEFAULT_STEPS if steps is None else steps
    guidance = DEFAULT_GUIDANCE if guidance is None else guidance
    ensemble = DEFAULT_ENSEMBLE if ensemble is None else int(ensemble)
    options = RunOptions(device=device, seed=seed, batch_size=batch_size)
    target_rule = card["normalization"]
    data_range = 1.0 if direction == "ct2mr" else float(np.subtract(*intensity_range(None, target_rule)[::-1]))
    per_pair, triples, pictures = [], [], {}
    total_slices, total_seconds, result = 0, 0.0, None
    for pair in evaluated:
        block = _eval_block(pair, data_config, max_slices)
        region = REGIONS[pair.region] if 0 < pair.region < len(REGIONS) else None
        source, target = (pair.ct, pair.mr) if direction == "ct2mr" else (pair.mr, pair.ct)
        affine = pair.affine if pair.affine is not None else np.diag(list(pair.spacing) + [1.0])
        # the held-out block as its own volume (an MR source is normalised on the block)
        sub = Volume(data=source[block], affine=slab_affine(affine, block.start),
                     modality="CT" if direction == "ct2mr" else "MR", name=Path(str(pair.source)).name)
        started = time.perf_counter()
        result = translate(sub, direction=direction, model=str(checkpoint), steps=steps, guidance=guidance,
                           ensemble=ensemble, sampler=sampler, region=region, options=options, force=force)
        seconds = time.perf_counter() - started
        mask = pair.mask[block]
        if direction == "ct2mr":
            pred = result.data / 1000.0
            ref = _to_unit_mr(target[block], target, target_rule)
            metrics = {"mae": masked_mae(pred, ref, mask)}
        else:
            low, high = intensity_range(None, target_rule)
            pred, ref = np.clip(result.data, low, high), np.clip(target[block], low, high)
            metrics = {"mae_hu": masked_mae(result.data, target[block], mask)}
        metrics.update(psnr_db=masked_psnr(pred, ref, mask, data_range),
                       ssim=masked_ssim(pred, ref, mask, data_range),
                       slices=int(sub.data.shape[0]), seconds_per_slice=seconds / max(1, sub.data.shape[0]),
                       pair=str(pair.source), region=region or "unknown", patient=pair.patient,
                       held_out_patient=bool(pair.held_out), voxels=int(np.asarray(mask, bool).sum()))
        per_pair.append(metrics)
        triples.append((pred, ref, mask))
        total_slices += sub.data.shape[0]
        total_seconds += seconds
        if metrics["region"] not in pictures:
            mid = sub.data.shape[0] // 2
            pictures[metrics["region"]] = (sub.data[mid], pred[mid], ref[mid])
    pooled = _pooled(triples, data_range)
    overall = {"psnr_db": pooled["psnr_db"], "ssim": pooled["ssim"],
               "slices": int(total_slices), "seconds_per_slice": total_seconds / max(1, total_slices)}
    if direction == "ct2mr":
        overall["mae"] = pooled["mae"]
    else:
        overall["mae_hu"] = float(np.average([p["mae_hu"] for p in per_pair], weights=[p["slices"] for p in per_pair]))
    source_rule = card["source_normalization"]
    regions = {}
    for name in dict.fromkeys(p["region"] for p in per_pair):
        idx = [i for i, p in enumerate(per_pair) if p["region"] == name]
        mine = _pooled([triples[i] for i in idx], data_range)
        model = {"psnr_db": mine["psnr_db"], "ssim": mine["ssim"], "slices": sum(per_pair[i]["slices"] for i in idx)}
        if direction == "ct2mr":
            model["mae"] = mine["mae"]
        else:
            model["mae_hu"] = float(np.average([per_pair[i]["mae_hu"] for i in idx],
                                               weights=[per_pair[i]["voxels"] for i in idx]))
        fit = [p for p in pairs if REGIONS[p.region] == name] if name in REGIONS else []
        fit = [p for p in fit if not p.held_out] or [p for p in pairs if not p.held_out]
        baseline = lookup_baseline(fit, data_config, direction, source_rule, target_rule,
                                   evaluate=[evaluated[i] for i in idx], max_slices=max_slices)
        baseline["fitted_on"] = "training slices of this region" if name in {REGIONS[p.region] for p in fit} \
            else "training slices of every region"
        regions[name] = {"model": model, "baseline_lookup": baseline,
                         "model_beats_lookup_psnr": bool(model["psnr_db"] > baseline["psnr_db"]),
                         "patients": sorted({per_pair[i]["patient"] for i in idx}),
                         "pairs": [per_pair[i]["pair"] for i in idx]}
    report = {
        "checkpoint": str(checkpoint), "model": ckpt.name, "direction": direction, "command": command,
        "trained_on_simulated_pairs": bool(card.get("trained_on_simulated_pairs")),
        "steps": int(steps), "guidance": float(guidance), "ensemble": ensemble, "sampler": sampler, "seed": seed,
        "spacing": result.metadata["parameters"]["spacing"],  # as the task recorded it
        "model_pixel_mm": card.get("slice_spacing_mm"),
        "new_noise_draws": bool(new_noise), "overall": overall, "regions": regions, "pairs": per_pair,
        "machine": {"cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "platform": platform.platform(), "torch": torch.__version__, "device": device},
        "reference_mediffuse": MEDIFFUSE_REFERENCE,
        "baseline_lookup": lookup_baseline(pairs, data_config, direction, source_rule, target_rule,
                                           evaluate=evaluated, max_slices=max_slices),
    }
    if speed_size:
        report["speed"] = measure_speed(checkpoint, card, size=int(speed_size), steps=steps, guidance=guidance,
                                        ensemble=ensemble,
                                        sampler=sampler, device=device, batch_size=batch_size)
    report["_picture"] = next(iter(pictures.values()))
    report["_region_pictures"] = pictures if len(pictures) > 1 else {}
    return report


def measure_speed(checkpoint, card: dict, *, size: int = 256, slices: int = 4, steps: int = 4,
                  guidance: float = 1.0, ensemble: int = 1, sampler: str = "ddim", device: str = "cpu", batch_size: int = 4) -> dict:
    """Seconds per ``size`` x ``size`` slice at the model's pixel size (model
    already loaded once: a warm-up run is not timed)."""
    from napari_mediffuse.tasks.common import RunOptions
    from napari_mediffuse.tasks.translate import translate

    direction = card["direction"]
    spacing = float((card.get("pixel_spacing_mm") or [1.0])[0])
    rng = np.random.default_rng(0)
    if direction == "ct2mr":
        data = rng.normal(40.0, 20.0, (slices, size, size)).astype(np.float32)
        data[:, :, : size // 8] = -1000.0
    else:
        data = rng.normal(500.0, 100.0, (slices, size, size)).clip(0).astype(np.float32)
    volume = Volume(data=data, affine=np.diag([spacing, spacing, spacing, 1.0]),
                    modality="CT" if direction == "ct2mr" else "MR", name="speed")
    options = RunOptions(device=device, seed=0, batch_size=batch_size)
    warm = Volume(data=data[:1], affine=volume.affine, modality=volume.modality, name="warm-up")
    translate(warm, direction=direction, model=str(checkpoint), steps=1,
              guidance=guidance, sampler=sampler, options=options)
    started = time.perf_counter()
    translate(volume, direction=direction, model=str(checkpoint), steps=steps, guidance=guidance,
              ensemble=ensemble, sampler=sampler, options=options)
    seconds = (time.perf_counter() - started) / slices
    return {"slice_size": [size, size], "slices": slices, "seconds_per_slice": round(seconds, 3),
            "steps": steps, "guidance": guidance, "ensemble": ensemble, "cpu_threads": torch.get_num_threads()}


def markdown(report: dict) -> str:
    """A Markdown summary of :func:`evaluate_translation`'s report."""
    o, d = report["overall"], report["direction"]
    mae = f"{o['mae_hu']:.1f} HU" if "mae_hu" in o else f"{o['mae']:.4f}"
    lines = [
        f"## Translation {d}: {report['model']}",
        "",
        f"Held-out {'simulated ' if report['trained_on_simulated_pairs'] else ''}pairs, metrics inside the "
        f"body mask; {report['steps']} {report['sampler'].upper()} steps"
        f"{' (' + report['spacing'] + ' spacing)' if report.get('spacing') else ''}, "
        f"{report.get('ensemble', 1)} sample(s) averaged, guidance {report['guidance']:g}, seed {report['seed']}.",
        "",
    ]
    if report.get("command"):
        lines[1:1] = ["", f"`{report['command']}`"]
    if report.get("regions"):
        lines += ["Per region: the model and, beside it, the lookup table fitted on that region's training "
                  "slices, on the same held-out slices.", "",
                  "| region | slices | patients | model PSNR (dB) | SSIM | MAE | lookup PSNR (dB) | SSIM | MAE | "
                  "model beats lookup (PSNR) |",
                  "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]

        def mae_text(m):
            return f"{m['mae_hu']:.1f} HU" if "mae_hu" in m else f"{m['mae']:.4f}"

        for name, r in report["regions"].items():
            m, b = r["model"], r["baseline_lookup"]
            lines.append(f"| {name} | {m['slices']} | {len(r['patients'])} | {m['psnr_db']:.2f} | {m['ssim']:.3f} | "
                         f"{mae_text(m)} | {b['psnr_db']:.2f} | {b['ssim']:.3f} | {mae_text(b)} | "
                         f"{'yes' if r['model_beats_lookup_psnr'] else '**no**'} |")
        lines.append("")
    lines += [
        "| pair | slices | PSNR (dB) | SSIM | MAE | s / slice |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in report["pairs"]:
        m = f"{p['mae_hu']:.1f} HU" if "mae_hu" in p else f"{p['mae']:.4f}"
        lines.append(f"| {p['pair']} | {p['slices']} | {p['psnr_db']:.2f} | {p['ssim']:.3f} | {m} | "
                     f"{p['seconds_per_slice']:.2f} |")
    lines.append(f"| **all** | {o['slices']} | **{o['psnr_db']:.2f}** | **{o['ssim']:.3f}** | **{mae}** | "
                 f"{o['seconds_per_slice']:.2f} |")
    if "baseline_lookup" in report:
        b = report["baseline_lookup"]
        bm = f"{b['mae_hu']:.1f} HU" if "mae_hu" in b else f"{b['mae']:.4f}"
        lines.append(f"| baseline: lookup table (source level -> mean target, training slices) | {o['slices']} | "
                     f"{b['psnr_db']:.2f} | {b['ssim']:.3f} | {bm} | |")
    if "speed" in report:
        s = report["speed"]
        lines += ["", f"Speed: {s['seconds_per_slice']:.2f} s per {s['slice_size'][0]} x {s['slice_size'][1]} "
                      f"slice ({s['steps']} steps x {s.get('ensemble', 1)} sample(s), {s['cpu_threads']} CPU threads, {report['machine']['device']})."]
    ref = report["reference_mediffuse"]["instruct-pix2pix"]
    lines += ["", f"For reference only (other data, other hardware): Mediffuse's SD 1.5 InstructPix2Pix "
                  f"CT -> MR reached PSNR {ref['psnr_db']} dB, SSIM {ref['ssim']} at {ref['seconds_per_slice']} s "
                  "per 512 x 512 slice on an A5000 GPU."]
    if report["trained_on_simulated_pairs"]:
        lines += ["", "The pairs are simulated (training/paired.py): these numbers say how well the model "
                      "learned the simulator, not how it would do on real MR. Not for diagnosis."]
    return "\n".join(lines) + "\n"


def save_picture(picture, path: Path, direction: str) -> None:
    """Source | synthetic | reference, each scaled to [0, 255]."""
    from PIL import Image

    source, pred, ref = picture

    def grey(x, low, high):
        return (np.clip((np.asarray(x, np.float64) - low) / max(high - low, 1e-6), 0, 1) * 255).astype(np.uint8)

    if direction == "ct2mr":
        panels = [grey(source, -160, 240), grey(pred, 0, 1), grey(ref, 0, 1)]
    else:
        lo, hi = np.percentile(source, [0.5, 99.5])
        panels = [grey(source, lo, hi), grey(pred, -160, 240), grey(ref, -160, 240)]
    Image.fromarray(np.concatenate(panels, axis=1)).save(path)


def write_report(report: dict, output) -> list[Path]:
    """JSON, Markdown and picture into ``output`` (created)."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    stem = f"translation_{report['direction']}"
    picture = report.pop("_picture", None)
    region_pictures = report.pop("_region_pictures", None) or {}
    paths = [output / f"{stem}.json", output / f"{stem}.md"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(markdown(report))
    if picture is not None:
        paths.append(output / f"{stem}.png")
        save_picture(picture, paths[-1], report["direction"])
    for region, pic in region_pictures.items():
        paths.append(output / f"{stem}_{region}.png")
        save_picture(pic, paths[-1], report["direction"])
    return paths


# -- CLI -----------------------------------------------------------------------------

def add_command(subparsers) -> None:
    p = subparsers.add_parser("translation", help="PSNR, SSIM, MAE in the mask and speed of a translation model",
                              description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="translation checkpoint folder")
    p.add_argument("--config", required=True, help="the training config (its pairs and held-out block)")
    p.add_argument("--output", required=True, help="folder for the JSON, Markdown and picture")
    p.add_argument("--steps", type=int, help="sampler steps (default: the task's)")
    p.add_argument("--guidance", type=float, help="image guidance scale (default: the task's)")
    p.add_argument("--ensemble", type=int, help="samples averaged per slice (default: the task's)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "dpm"])
    p.add_argument("--max-slices", type=int,
                   help="at most this many held-out slices per pair (held-out patients: the central ones)")
    p.add_argument("--same-noise", action="store_true",
                   help="simulated pairs: keep the training bias/noise draws (default: new ones)")
    p.add_argument("--speed-size", type=int, default=256, help="slice size for the speed run (0: skip)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true",
                   help="run the model on regions it never saw (the task refuses them), to compare it")
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    from . import command_line

    from ..trainer import load_config

    config = load_config(args.config)  # resolves base: configs
    command = command_line()
    report = evaluate_translation(args.checkpoint, config, steps=args.steps, guidance=args.guidance,
                                  ensemble=args.ensemble,
                                  sampler=args.sampler, max_slices=args.max_slices, new_noise=not args.same_noise,
                                  device=args.device, seed=args.seed, speed_size=args.speed_size or None,
                                  command=command, force=args.force)
    for path in write_report(report, args.output):
        print(f"wrote {path}")
    print(markdown(report))
    return 0
