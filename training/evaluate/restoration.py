"""Low-dose denoising and thick -> thin super-resolution, side by side.

    python -m training.evaluate denoise --model ct-prior-demo --out docs/evaluation
    python -m training.evaluate sr --model ct-prior-demo --factor 5 --out docs/evaluation

Degradations are simulated from a real CT (:mod:`training.degrade`; there
is no real low-dose or thick/thin pair): quarter dose (Poisson + electronic
noise in the sinogram, FBP, added to the original) on axial slices, and
thick slices as slab averages. Only what the demo prior never saw is scored:
the held-out block (the most superior ``--holdout-fraction`` of axial
slices, as in the prior's training config).

For the diffusion method and every baseline, on the same slices, it reports
PSNR and SSIM in the [-160, 240] HU window (MedDiff-FM Table 5) and in
[-1024, 3072] HU, their gain over the degraded input, seconds per slice (or
plane) and the peak resident memory above the starting point while the
method ran. It writes ``<name>.json``, ``<name>.md`` (table) and
``<name>.png`` (input / each method / reference) to ``--out``.

* ``denoise``: every method goes through
  :func:`napari_mediffuse.tasks.denoise.denoise` (noise estimated from the
  image, as a user gets it).
* ``sr``: thick slices of ``factor`` thin ones; scored on coronal planes
  (rows of the held-out block). Interpolation baselines run on the whole
  volume; the diffusion method runs
  :func:`napari_mediffuse.tasks.superres.diffpir_planes` on the chosen
  coronal planes only (``--planes``; the task averages coronal and
  sagittal, ``--full-volume`` runs the full task instead).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

from napari_mediffuse import io
from napari_mediffuse.tasks.common import RunOptions

from . import command_line
from ..degrade import DEFAULT_PHOTONS, matched_photons, simulate_low_dose, simulate_thick_slices
from ..metrics import psnr_hu, ssim_hu

log = logging.getLogger(__name__)

DEFAULT_CT = "../shared/data/ct/abdomen_ct_3mm.nii.gz"
SOFT_WINDOW = (-160.0, 240.0)
FULL_WINDOW = (-1024.0, 3072.0)
WINDOWS = {"soft": SOFT_WINDOW, "full": FULL_WINDOW}


# -- measuring -------------------------------------------------------------------

class PeakMemory:
    """Peak resident memory (MB) above the level at ``start``, sampled every 5 ms (Linux)."""

    def __init__(self):
        self.peak = 0.0
        self._stop = threading.Event()

    @staticmethod
    def rss_mb() -> float:
        try:
            with open("/proc/self/statm") as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
        except (OSError, ValueError):  # pragma: no cover - not Linux
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    def __enter__(self):
        self.base = self.rss_mb()
        self.peak = self.base

        def watch():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, self.rss_mb())

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss_mb())

    @property
    def above_start_mb(self) -> float:
        return float(self.peak - self.base)


def scores(image: np.ndarray, reference: np.ndarray) -> dict:
    """PSNR / SSIM of a stack of 2D images against the reference in both windows."""
    out = {}
    for key, window in WINDOWS.items():
        out[f"psnr_{key}"] = psnr_hu(image, reference, window)
        out[f"ssim_{key}"] = ssim_hu(image, reference, window)
    return out


def with_gains(metrics: dict, degraded: dict) -> dict:
    out = dict(metrics)
    for key, value in degraded.items():
        out[f"{key}_gain"] = metrics[key] - value
    return out


def holdout_start(n: int, fraction: float) -> int:
    """First axial index of the held-out block (as :func:`training.data.load_volumes`)."""
    return n - int(round(fraction * n)) if fraction else 0


# -- denoising -------------------------------------------------------------------

def evaluate_denoising(ct_path, *, model=None, denoise_model=None, methods=("diffusion", "bm3d", "nlm"),
                       slices: int = 8,
                       holdout_fraction: float = 0.2, dose: float = 0.25, steps: int | None = None,
                       strength: float = 1.0, lam: float | None = None, seed: int = 0,
                       device: str = "cpu", batch_size: int = 8,
                       white_noise_hu: float | None = None, filter_name: str = "ramp",
                       photons: float | str | None = None,
                       central_fraction: float = 1.0, ensemble: int = 1,
                       window: int | None = None) -> tuple[dict, dict]:
    """Scores of every method on simulated low-dose held-out slices.

    ``central_fraction``: draw the slices from this central part of the
    held-out block only (e.g. 0.6 for the OpenKBP boxes, whose first and last
    slices lie partly outside the scan, in air).

    ``filter_name``, ``photons``: the low-dose simulator's reconstruction
    filter and full-dose photon count (:func:`training.degrade.low_dose_noise`;
    Shepp-Logan with about 4e5 photons matches the noise power spectrum of the
    1 mm chest CT, see docs/evaluation/restoration.md). ``photons="auto"``:
    the count at which the simulator's full-dose noise matches the CT's own
    (:func:`training.degrade.matched_photons`, on the scored slices), so
    ``dose`` is relative to the CT's actual dose (the JSON records the count).

    ``white_noise_hu``: add white Gaussian noise of this std (HU) instead of
    the low-dose simulation (the noise model the prior and BM3D assume; it
    separates what the prior lacks from what the CT noise texture costs).

    Returns the result dict (JSON) and the images (for the picture).
    """
    from napari_mediffuse.tasks.denoise import DEFAULT_STEPS, denoise, estimate_noise_hu

    volume = io.read(ct_path)[0]
    data = np.asarray(volume.data, dtype=np.float32)
    start = holdout_start(data.shape[0], holdout_fraction)
    count = data.shape[0] - start
    if count < 1:
        raise ValueError("no held-out slices: raise --holdout-fraction")
    margin = int(round(count * (1.0 - central_fraction) / 2.0))
    first, last = start + margin, data.shape[0] - 1 - margin
    index = np.unique(np.linspace(first, last, min(slices or count, last - first + 1)).round().astype(int))
    clean = data[index]
    pixel_mm = float(np.mean(volume.spacing[1:]))
    if white_noise_hu:
        noise = np.random.default_rng(seed).normal(0.0, white_noise_hu, clean.shape)
        low = (clean + noise).astype(np.float32)
    else:
        if photons == "auto":
            photons = matched_photons(clean, pixel_mm, filter_name=filter_name, seed=seed)
            log.info("%s: simulated full dose matched to the CT's own noise: %.3g photons", ct_path, photons)
        low = simulate_low_dose(clean, pixel_mm, dose, seed=seed, filter_name=filter_name,
                                **({"photons": photons} if photons else {}))
    degraded_volume = io.Volume(low, volume.affine, modality="CT", name="low dose")
    degraded = scores(low, clean)
    results = {"input": dict(degraded)}
    images = {"input": low, "reference": clean}
    options = RunOptions(device=device, seed=seed, batch_size=batch_size, window=window)
    steps = DEFAULT_STEPS if steps is None else steps
    for method in methods:
        kwargs = dict(method=method, strength=strength, options=options)
        if method == "diffusion":
            kwargs.update(model=model, steps=steps)
            if lam is not None:
                kwargs["lam"] = lam
        if method == "learned":
            kwargs.update(model=denoise_model, strength=min(strength, 1.0), ensemble=ensemble)
        if method in ("diffusion", "learned"):
            # load the model once outside the timing (a user's session has it loaded)
            denoise(io.Volume(low[:2], volume.affine, modality="CT"), **kwargs)
        with PeakMemory() as memory:
            started = time.perf_counter()
            result = denoise(degraded_volume, **kwargs)
            seconds = time.perf_counter() - started
        entry = with_gains(scores(result.data, clean), degraded)
        entry.update(seconds_per_slice=seconds / len(index), peak_memory_mb=memory.above_start_mb,
                     parameters=result.metadata["parameters"],
                     # the pooled PSNR is dominated by the noisiest slices; each slice's own gain shows the rest
                     psnr_soft_gain_per_slice=[psnr_hu(result.data[i], clean[i], SOFT_WINDOW)
                                               - psnr_hu(low[i], clean[i], SOFT_WINDOW) for i in range(len(index))])
        results[method] = entry
        images[method] = result.data
        log.info("%s: PSNR %.2f dB (gain %+.2f), SSIM %.4f (gain %+.4f), %.2f s/slice", method,
                 entry["psnr_soft"], entry["psnr_soft_gain"], entry["ssim_soft"], entry["ssim_soft_gain"],
                 entry["seconds_per_slice"])
    noise = float(np.median(estimate_noise_hu(low)))
    added = low - clean
    report = {
        "evaluation": "denoise",
        "ct": str(ct_path),
        "ct_shape": list(data.shape),
        "ct_spacing_mm": list(volume.spacing),
        "slices": [int(i) for i in index],
        "holdout_fraction": holdout_fraction,
        "central_fraction": central_fraction,
        "dose_fraction": None if white_noise_hu else dose,
        "white_noise_hu": white_noise_hu,
        "simulator": None if white_noise_hu else {"filter": filter_name, "photons": photons or DEFAULT_PHOTONS},
        "added_noise_std_hu": float(added.std()),
        "added_noise_std_hu_per_slice": [float(a.std()) for a in added],
        "estimated_noise_hu": noise,
        "model": model,
        "denoise_model": denoise_model,
        "seed": seed,
        "window": window,
        "device": device,
        "threads": _threads(),
        "results": results,
    }
    return report, images


def evaluate_denoising_many(ct_paths, **kwargs) -> tuple[dict, dict]:
    """:func:`evaluate_denoising` on several CTs (patients), pooled.

    The pooled ``results`` are the means over the CTs of every score, gain,
    time and memory figure (each CT weighs the same, whatever its slice
    count); ``per_ct`` keeps each CT's own results. The picture shows the
    first CT.
    """
    reports, first_images = [], None
    for path in ct_paths:
        report, images = evaluate_denoising(path, **kwargs)
        reports.append(report)
        first_images = first_images if first_images is not None else images
        log.info("%s done (%d of %d)", path, len(reports), len(ct_paths))
    pooled = {}
    for method in reports[0]["results"]:
        entries = [r["results"][method] for r in reports]
        pooled[method] = {key: float(np.mean([e[key] for e in entries])) for key, value in entries[0].items()
                          if isinstance(value, (int, float))}
        if "parameters" in entries[0]:
            pooled[method]["parameters"] = entries[0]["parameters"]
    report = dict(reports[0], ct=[str(p) for p in ct_paths], ct_shape=None, ct_spacing_mm=None, slices=None,
                  results=pooled,
                  per_ct=[{"ct": r["ct"], "ct_shape": r["ct_shape"], "ct_spacing_mm": r["ct_spacing_mm"],
                           "slices": r["slices"], "simulator": r["simulator"],
                           "added_noise_std_hu": r["added_noise_std_hu"],
                           "estimated_noise_hu": r["estimated_noise_hu"], "results": r["results"]}
                          for r in reports])
    report["added_noise_std_hu"] = float(np.mean([r["added_noise_std_hu"] for r in reports]))
    report["estimated_noise_hu"] = float(np.mean([r["estimated_noise_hu"] for r in reports]))
    if reports[0]["simulator"] and len({r["simulator"]["photons"] for r in reports}) > 1:
        report["simulator"] = dict(reports[0]["simulator"], photons="matched per CT (see per_ct)")
    return report, first_images


# -- super-resolution ----------------------------------------------------------------

def evaluate_super_resolution(ct_path, *, model=None, sr_model=None, methods=("diffusion", "cubic", "sinc"),
                              factor: int = 5,
                              planes: int = 8, holdout_fraction: float = 0.2, steps: int | None = None,
                              strength: float = 1.0, lam: float | None = None, seed: int = 0,
                              device: str = "cpu", batch_size: int = 8,
                              full_volume: bool = False, learned_steps: int | None = None,
                              ensemble: int = 1, window: int | None = None) -> tuple[dict, dict]:
    """Scores of every method on thick slices simulated from the CT, on coronal planes.

    ``model`` is the CT prior of ``'diffusion'``, ``sr_model`` the
    super-resolution model of ``'learned'`` (run on the whole volume, both
    plane directions, as the task does)."""
    from napari_mediffuse.tasks import superres

    volume = io.read(ct_path)[0]
    thick = simulate_thick_slices(volume, factor)
    n_thin = thick.data.shape[0] * factor
    reference = np.asarray(volume.data[:n_thin], dtype=np.float32)
    rows = slice(holdout_start(volume.data.shape[0], holdout_fraction), n_thin)
    if rows.start >= n_thin:
        raise ValueError("no held-out rows inside the thick series: raise --holdout-fraction")
    n_cor = reference.shape[1]
    chosen = np.unique(np.linspace(0.15 * n_cor, 0.85 * n_cor, min(planes or n_cor, n_cor)).round().astype(int))

    def pick(vol: np.ndarray) -> np.ndarray:  # (planes, held-out rows, L)
        return np.moveaxis(vol, 1, 0)[chosen][:, rows]

    ref = pick(reference)
    nearest = np.repeat(np.asarray(thick.data, dtype=np.float32), factor, axis=0)
    degraded = scores(pick(nearest), ref)
    results = {"input": dict(degraded)}
    images = {"input": np.moveaxis(nearest, 1, 0)[chosen], "reference": np.moveaxis(reference, 1, 0)[chosen]}
    options = RunOptions(device=device, seed=seed, batch_size=batch_size, window=window)
    steps = superres.DEFAULT_STEPS if steps is None else steps
    for method in methods:
        kwargs = dict(strength=strength, steps=steps) if method == "diffusion" else {}
        if method == "learned":
            kwargs = dict(steps=learned_steps, ensemble=ensemble)  # steps None: the task's default
        if lam is not None and method == "diffusion":
            kwargs["lam"] = lam
        if method == "diffusion" and not full_volume:
            from napari_mediffuse.tasks.common import load_prior
            from napari_mediffuse.tasks.denoise import estimate_noise_hu

            checkpoint, predictor = load_prior(model, options)
            data = np.asarray(thick.data, dtype=np.float32)
            spacing = float(thick.spacing[0])
            op = superres.slab_operator(data.shape[0], factor, spacing, superres.slice_thickness(thick))
            with PeakMemory() as memory:
                started = time.perf_counter()
                initial = superres.cubic_along(data, factor, axis=0)
                planes_in = np.ascontiguousarray(np.moveaxis(data, 1, 0)[chosen])
                init = np.ascontiguousarray(np.moveaxis(initial, 1, 0)[chosen])
                out = superres.diffpir_planes(
                    planes_in, op, init, predictor=predictor, checkpoint=checkpoint,
                    plane_spacing_mm=(spacing / factor, float(thick.spacing[2])),
                    noise_hu=float(np.median(estimate_noise_hu(data))), batch_size=batch_size,
                    seed=seed, **kwargs)
                out = np.clip(out, float(data.min()), float(data.max()))  # as super_resolve
                seconds = time.perf_counter() - started
            count, unit = len(chosen), "plane"
            sr_planes = out
            params = dict(method=method, planes="coronal", steps=steps, strength=strength,
                          lam=kwargs.get("lam", superres.DEFAULT_LAMBDA),
                          start_sigma=superres.DEFAULT_START_SIGMA, end_hu=superres.DEFAULT_END_HU,
                          smooth=False, thick_noise_hu=float(np.median(estimate_noise_hu(data))))
        else:
            with PeakMemory() as memory:
                started = time.perf_counter()
                result = superres.super_resolve(thick, factor=factor, method=method,
                                                model=sr_model if method == "learned" else model,
                                                options=options, **kwargs)
                seconds = time.perf_counter() - started
            sr_planes = np.moveaxis(result.data, 1, 0)[chosen]
            count, unit = n_cor, "plane"  # the whole volume: all its coronal planes
            params = result.metadata["parameters"]
        entry = with_gains(scores(sr_planes[:, rows], ref), degraded)
        entry.update(seconds=seconds, seconds_per_unit=seconds / count, unit=unit,
                     peak_memory_mb=memory.above_start_mb, parameters=params)
        results[method] = entry
        images[method] = sr_planes
        log.info("%s: PSNR %.2f dB (gain %+.2f), SSIM %.4f, %.2f s per %s", method, entry["psnr_soft"],
                 entry["psnr_soft_gain"], entry["ssim_soft"], entry["seconds_per_unit"], unit)
    report = {
        "evaluation": "sr",
        "ct": str(ct_path),
        "ct_shape": list(volume.data.shape),
        "ct_spacing_mm": list(volume.spacing),
        "factor": factor,
        "thick_spacing_mm": float(thick.spacing[0]),
        "thin_spacing_mm": float(volume.spacing[0]),
        "coronal_planes": [int(i) for i in chosen],
        "scored_rows": [rows.start, rows.stop],
        "holdout_fraction": holdout_fraction,
        "input_is": "thick slices repeated over their slabs (nearest)",
        "model": model,
        "sr_model": sr_model,
        "seed": seed,
        "window": window,
        "device": device,
        "threads": _threads(),
        "results": results,
    }
    return report, images


# -- output -------------------------------------------------------------------------

def _threads() -> int:
    import torch

    return int(torch.get_num_threads())


def markdown_table(report: dict) -> str:
    """The side-by-side table of a report."""
    sr = report["evaluation"] == "sr"
    unit = "s / plane" if sr else "s / slice"
    lines = [
        f"| method | PSNR [-160, 240] (dB) | gain | SSIM [-160, 240] | gain | PSNR [-1024, 3072] (dB) "
        f"| gain | SSIM [-1024, 3072] | gain | {unit} | peak memory (MB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method, r in report["results"].items():
        if method == "input":
            if sr:
                label = "input (thick, nearest)"
            elif report.get("white_noise_hu"):
                label = f"input (+{report['white_noise_hu']:g} HU white noise)"
            else:
                label = f"input ({report['dose_fraction']:g} dose)"
            lines.append(f"| {label} | {r['psnr_soft']:.2f} | | {r['ssim_soft']:.4f} | | "
                         f"{r['psnr_full']:.2f} | | {r['ssim_full']:.4f} | | | |")
            continue
        per_label = f"{r.get('seconds_per_slice', r.get('seconds_per_unit')):.3f}"
        lines.append(
            f"| {method} | {r['psnr_soft']:.2f} | {r['psnr_soft_gain']:+.2f} | {r['ssim_soft']:.4f} | "
            f"{r['ssim_soft_gain']:+.4f} | {r['psnr_full']:.2f} | {r['psnr_full_gain']:+.2f} | "
            f"{r['ssim_full']:.4f} | {r['ssim_full_gain']:+.4f} | {per_label} | {r['peak_memory_mb']:.0f} |")
    methods = [m for m in report["results"] if "psnr_soft_gain_per_slice" in report["results"][m]]
    if methods and not report.get("per_ct"):
        gains = {m: report["results"][m]["psnr_soft_gain_per_slice"] for m in methods}
        lines += ["", "PSNR gain in [-160, 240] HU per slice (the table above pools the slices' squared "
                      "errors, so the noisiest slices weigh most):", "",
                  "| slice | added noise std (HU) | " + " | ".join(methods) + " |",
                  "| --- | ---: |" + " ---: |" * len(methods)]
        for i, (number, noise) in enumerate(zip(report["slices"], report["added_noise_std_hu_per_slice"])):
            lines.append(f"| {number} | {noise:.1f} | " + " | ".join(f"{gains[m][i]:+.2f}" for m in methods) + " |")
        lines.append("| median | | " + " | ".join(f"{np.median(gains[m]):+.2f}" for m in methods) + " |")
    if report.get("per_ct"):  # pooled over patients: the mean above, each patient's gains below
        methods = [m for m in report["results"] if m != "input"]
        lines += ["", f"Means over {len(report['per_ct'])} CTs (each weighs the same). PSNR / SSIM gain "
                      "in [-160, 240] HU per CT:", "",
                  "| CT | added noise (HU) | full-dose photons | " + " | ".join(methods) + " |",
                  "| --- | ---: | ---: |" + " ---: |" * len(methods)]
        for entry in report["per_ct"]:
            cells = [f"{entry['results'][m]['psnr_soft_gain']:+.2f} dB / {entry['results'][m]['ssim_soft_gain']:+.4f}"
                     for m in methods]
            simulator = entry.get("simulator") or {}
            photons = f"{simulator['photons']:.3g}" if isinstance(simulator.get("photons"), float) else ""
            noise = f"{entry['added_noise_std_hu']:.1f}" if "added_noise_std_hu" in entry else ""
            lines.append(f"| {Path(entry['ct']).parent.name or entry['ct']} | {noise} | {photons} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_picture(path: Path, images: dict, *, index: int = 0, window=SOFT_WINDOW, scale: int = 3,
                 flip_rows: bool = False) -> None:
    """One row: input / each method / reference, in ``window``, labelled."""
    from PIL import Image, ImageDraw

    names = ["input"] + [k for k in images if k not in ("input", "reference")] + ["reference"]
    tiles = []
    for name in names:
        tile = np.asarray(images[name][index], dtype=np.float32)
        if flip_rows:
            tile = tile[::-1]
        tiles.append(np.clip((tile - window[0]) / (window[1] - window[0]), 0, 1))
    gap = np.ones((tiles[0].shape[0], 2), dtype=np.float32)
    row = np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=1)
    image = Image.fromarray((row * 255).astype(np.uint8)).resize(
        (row.shape[1] * scale, row.shape[0] * scale), Image.NEAREST)
    header = 18
    canvas = Image.new("L", (image.width, image.height + header), 255)
    canvas.paste(image, (0, header))
    draw = ImageDraw.Draw(canvas)
    width = tiles[0].shape[1] + 2
    for i, name in enumerate(names):
        draw.text((i * width * scale + 4, 3), name, fill=0)
    canvas.save(path)


def write_outputs(report: dict, images: dict, out: Path, name: str, *, flip_rows: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    table = markdown_table(report)
    (out / f"{name}.md").write_text(f"<!-- {report['command']} -->\n\n" + table)
    middle = len(images["reference"]) // 2  # a central slice / plane
    save_picture(out / f"{name}.png", images, index=middle, flip_rows=flip_rows)
    print(table)
    print(f"wrote {out / (name + '.json')}, {name}.md, {name}.png")


# -- CLI ----------------------------------------------------------------------------

def _common(p, *, slices_name: str, slices_default: int, methods):
    p.add_argument("--model", default="ct-prior-demo", help="CT prior: name or folder")
    p.add_argument("--ct", default=DEFAULT_CT, help="real CT in HU (NIfTI or DICOM)")
    p.add_argument("--holdout-fraction", type=float, default=0.2,
                   help="score only the most superior fraction of axial slices (the prior's held-out block)")
    p.add_argument(slices_name, type=int, default=slices_default, help="how many to score (0 = all)")
    p.add_argument("--methods", nargs="+", default=list(methods), choices=list(methods))
    p.add_argument("--steps", type=int, help="diffusion steps (default: the task's)")
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--lambda", dest="lam", type=float, help="DiffPIR lambda (default: the task's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--window", type=int, help="networks in sliding windows of this many pixels (the tasks' "
                                              "--window; default whole images)")
    p.add_argument("--out", default="docs/evaluation", help="output folder")


def add_command(subparsers) -> None:
    p = subparsers.add_parser("denoise", help="low-dose CT denoising: diffusion vs BM3D vs NLM",
                              description=__doc__.split("\n\n")[0])
    _common(p, slices_name="--slices", slices_default=8, methods=("diffusion", "learned", "bm3d", "nlm"))
    p.set_defaults(methods=["diffusion", "bm3d", "nlm"])
    p.add_argument("--denoise-model", help="denoising model of the 'learned' method: name or folder")
    p.add_argument("--dose", type=float, default=0.25, help="simulated dose fraction (default 0.25)")
    p.add_argument("--white-noise-hu", type=float,
                   help="add white Gaussian noise of this std (HU) instead of simulating low dose")
    p.add_argument("--filter", default="ramp",
                   help="reconstruction filter of the simulated dose noise (ramp, shepp-logan, ...)")
    p.add_argument("--photons", type=_photons,
                   help="full-dose photons per detector bin and view (default 8e5), or 'auto': the count at "
                        "which the simulated full-dose noise matches each CT's own")
    p.add_argument("--ct-glob", help="score every CT matching this glob instead of --ct (several patients, "
                                     "pooled: each CT weighs the same)")
    p.add_argument("--central-fraction", type=float, default=1.0,
                   help="draw the slices from this central part of the held-out block (default 1 = all of it)")
    p.add_argument("--max-cts", type=int, default=0, help="with --ct-glob: the first N (sorted; 0 = all)")
    p.add_argument("--ensemble", type=int, default=1,
                   help="'learned': estimates averaged per slice (the task's ensemble; default 1)")
    p.add_argument("--name", default="restoration_denoise", help="output file stem")
    p.set_defaults(func=_cmd_denoise)

    p = subparsers.add_parser("sr", help="thick -> thin slice super-resolution: diffusion vs interpolation",
                              description=__doc__.split("\n\n")[0])
    _common(p, slices_name="--planes", slices_default=8, methods=("diffusion", "learned", "cubic", "sinc"))
    p.set_defaults(methods=["diffusion", "cubic", "sinc"])
    p.add_argument("--sr-model", help="super-resolution model of the 'learned' method: name or folder")
    p.add_argument("--learned-steps", type=int, help="network evaluations per plane of 'learned' "
                                                     "(default: the task's, 1 = posterior mean)")
    p.add_argument("--factor", type=int, default=5)
    p.add_argument("--full-volume", action="store_true",
                   help="run the full diffusion task (coronal + sagittal, whole volume); slow")
    p.add_argument("--ensemble", type=int, default=1,
                   help="'learned': estimates averaged per plane (the task's ensemble; default 1)")
    p.add_argument("--name", default="restoration_sr", help="output file stem")
    p.set_defaults(func=_cmd_sr)


def _photons(text: str):
    return "auto" if text == "auto" else float(text)


def _cmd_denoise(args) -> int:
    evaluate, target = evaluate_denoising, args.ct
    if args.ct_glob:
        import glob

        target = sorted(glob.glob(args.ct_glob))[: args.max_cts or None]
        if not target:
            raise SystemExit(f"--ct-glob {args.ct_glob!r}: no file matches")
        evaluate = evaluate_denoising_many
    report, images = evaluate(
        target, model=args.model, denoise_model=args.denoise_model, methods=args.methods, slices=args.slices,
        holdout_fraction=args.holdout_fraction, dose=args.dose, steps=args.steps, strength=args.strength,
        lam=args.lam, seed=args.seed, device=args.device, batch_size=args.batch_size,
        white_noise_hu=args.white_noise_hu, filter_name=args.filter, photons=args.photons,
        central_fraction=args.central_fraction, ensemble=args.ensemble, window=args.window)
    report["command"] = command_line()
    write_outputs(report, images, Path(args.out), args.name)
    return 0


def _cmd_sr(args) -> int:
    report, images = evaluate_super_resolution(
        args.ct, model=args.model, methods=args.methods, factor=args.factor, planes=args.planes,
        holdout_fraction=args.holdout_fraction, steps=args.steps, strength=args.strength, lam=args.lam,
        seed=args.seed, device=args.device, batch_size=args.batch_size, full_volume=args.full_volume,
        sr_model=args.sr_model, learned_steps=args.learned_steps, ensemble=args.ensemble,
        window=args.window)
    report["command"] = command_line()
    write_outputs(report, images, Path(args.out), args.name, flip_rows=True)
    return 0
