"""Noise power spectrum of the simulated low-dose noise against a CT's own noise.

    python -m training.evaluate noise-power --ct ../shared/data/ct/abdomen_ct_3mm.nii.gz --roi 12 --out docs/evaluation

On the axial slices of a real normal-dose CT, in uniform soft-tissue ROIs
(:func:`training.noise_power.uniform_roi_corners`), it compares three NPS
(:mod:`training.noise_power`): the CT's own noise estimated as the
quadratically detrended ROI (``residual``) and as the difference of two
adjacent slices over sqrt(2) (``slice difference``), and the extra noise of
the simulated dose reduction (:func:`training.degrade.low_dose_noise`) in
the same ROIs. A quarter dose should add sqrt(1/0.25 - 1) = sqrt(3) times
the scan's own noise, with the same texture. Writes ``<name>.json``,
``<name>.md`` and ``<name>.png`` (radial NPS curves).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from napari_mediffuse import io

from . import command_line
from ..degrade import low_dose_noise
from ..noise_power import crop_rois, nps_2d, nps_summary, radial_nps, uniform_roi_corners


def evaluate(ct: str, *, roi: int = 12, dose: float = 0.25, max_slices: int = 0, hu_range=(0.0, 120.0),
             seed: int = 0, filter_name: str = "ramp") -> dict:
    """NPS summaries and radial curves of the three noise estimates (see module doc)."""
    volume = io.read(ct)[0]
    data = np.asarray(volume.data, dtype=float)
    pixel_mm = float(np.mean(volume.spacing[1:]))
    rng = np.random.default_rng(seed)
    candidates = [i for i in range(data.shape[0] - 1) if uniform_roi_corners(data[i], roi, hu_range)]
    if max_slices and len(candidates) > max_slices:  # evenly spread over the scan
        candidates = [candidates[int(k)] for k in np.linspace(0, len(candidates) - 1, max_slices)]
    sets = {"residual": [], "slice_difference": [], "simulated": []}
    start = time.perf_counter()
    for i in candidates:
        corners = uniform_roi_corners(data[i], roi, hu_range)
        nxt = set(uniform_roi_corners(data[i + 1], roi, hu_range))
        sets["residual"].append(crop_rois(data[i], corners, roi))
        sets["slice_difference"].append(crop_rois((data[i] - data[i + 1]) / np.sqrt(2.0),
                                                  [c for c in corners if c in nxt], roi))
        noise = low_dose_noise(data[i].astype(np.float32), pixel_mm, dose, rng=rng, filter_name=filter_name)
        sets["simulated"].append(crop_rois(noise, corners, roi))
    seconds = time.perf_counter() - start
    results = {"ct": str(ct), "pixel_mm": pixel_mm, "slice_mm": float(volume.spacing[0]), "roi_px": roi,
               "roi_mm": roi * pixel_mm, "hu_range": list(hu_range), "dose_fraction": dose,
               "filter": filter_name,
               "slices": len(candidates), "seconds": round(seconds, 1), "estimates": {}}
    for name, rois in sets.items():
        rois = np.concatenate(rois) if rois else np.zeros((0, roi, roi))
        if not len(rois):
            raise ValueError(f"{ct}: no uniform soft-tissue ROI of {roi} px in HU {hu_range}")
        nps, freqs = nps_2d(rois, pixel_mm)
        f, radial = radial_nps(nps, freqs)
        results["estimates"][name] = {"rois": len(rois), **nps_summary(nps, freqs),
                                      "radial_frequency_per_mm": [round(float(x), 4) for x in f],
                                      "radial_nps_hu2mm2": [round(float(x), 2) for x in radial]}
    own = results["estimates"]["slice_difference"]["std_hu"]
    results["expected_extra_std_hu"] = own * float(np.sqrt(1.0 / dose - 1.0))
    return results


def markdown(results: dict, command: str) -> str:
    e = results["estimates"]
    lines = [f"Command: `{command}`", "",
             f"{results['ct']}: {results['slices']} axial slices, {e['residual']['rois']} "
             f"ROIs of {results['roi_px']} px ({results['roi_mm']:.0f} mm) where the 5x5 local mean is in "
             f"{results['hu_range'][0]:.0f}..{results['hu_range'][1]:.0f} HU; pixel {results['pixel_mm']:.2f} mm, "
             f"slice {results['slice_mm']:.2f} mm; simulated dose {results['dose_fraction']:g}, "
             f"{results.get('filter', 'ramp')} filter.", "",
             "| noise | ROIs | std (HU) | mean frequency (1/mm) | peak frequency (1/mm) | radial NPS, normalised to its maximum |",
             "|---|---|---|---|---|---|"]
    for name, label in (("residual", "CT's own: ROI minus quadratic trend"),
                        ("slice_difference", "CT's own: adjacent-slice difference / sqrt(2)"),
                        ("simulated", f"simulated extra noise, dose {results['dose_fraction']:g}")):
        r = e[name]
        peak = max(r["radial_nps_hu2mm2"])
        shape = " ".join(f"{v / peak:.2f}" for v in r["radial_nps_hu2mm2"])
        lines.append(f"| {label} | {r['rois']} | {r['std_hu']:.1f} | {r['mean_frequency_per_mm']:.3f} | "
                     f"{r['peak_frequency_per_mm']:.3f} | {shape} |")
    freqs = " ".join(f"{f:.3f}" for f in e["simulated"]["radial_frequency_per_mm"])
    lines += ["", f"Radial bins (1/mm): {freqs}. Expected extra std at this dose from the slice-difference "
                  f"estimate: {results['expected_extra_std_hu']:.1f} HU (sqrt(1/dose - 1) x own noise); "
                  f"simulated: {e['simulated']['std_hu']:.1f} HU."]
    return "\n".join(lines) + "\n"


def picture(results: dict, path: Path, width: int = 640, height: int = 360) -> Path:
    """Radial NPS of the three estimates, each normalised to its maximum (shape), linear axes."""
    colours = {"residual": (44, 160, 44), "slice_difference": (31, 119, 180), "simulated": (214, 39, 40)}
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    margin = 50
    fmax = max(max(r["radial_frequency_per_mm"]) for r in results["estimates"].values())

    def xy(f, v):
        return margin + f / fmax * (width - 2 * margin), height - margin - v * (height - 2 * margin)

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    for k in range(5):
        x, _ = xy(fmax * k / 4, 0)
        draw.text((x - 12, height - margin + 6), f"{fmax * k / 4:.2f}", fill="black")
        _, y = xy(0, k / 4)
        draw.text((8, y - 6), f"{k / 4:.2f}", fill="black")
    draw.text((width // 2 - 40, height - 22), "frequency (1/mm)", fill="black")
    for k, (name, r) in enumerate(results["estimates"].items()):
        peak = max(r["radial_nps_hu2mm2"])
        pts = [xy(f, v / peak) for f, v in zip(r["radial_frequency_per_mm"], r["radial_nps_hu2mm2"])]
        draw.line(pts, fill=colours[name], width=2)
        draw.text((margin + 8, margin + 6 + 14 * k), f"{name}: std {r['std_hu']:.1f} HU", fill=colours[name])
    draw.text((margin, 16), "radial NPS / its maximum: CT's own noise vs simulated dose noise", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def add_command(subparsers) -> None:
    p = subparsers.add_parser("noise-power", help="NPS of the simulated low-dose noise against a CT's own noise")
    p.add_argument("--ct", default="../shared/data/ct/abdomen_ct_3mm.nii.gz")
    p.add_argument("--roi", type=int, default=12, help="ROI side in pixels")
    p.add_argument("--dose", type=float, default=0.25)
    p.add_argument("--max-slices", type=int, default=0, help="at most this many slices, evenly spread (0: all)")
    p.add_argument("--hu-range", type=float, nargs=2, default=[0.0, 120.0])
    p.add_argument("--filter", default="ramp", help="reconstruction filter of the simulated noise (ramp, hann, ...)")
    p.add_argument("--name", default="noise_power")
    p.add_argument("--out", default="docs/evaluation")

    def run(args) -> int:
        command = command_line()
        results = evaluate(args.ct, roi=args.roi, dose=args.dose, max_slices=args.max_slices,
                           hu_range=tuple(args.hu_range), filter_name=args.filter)
        results["command"] = command
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.json").write_text(json.dumps(results, indent=2))
        table = markdown(results, command)
        (out / f"{args.name}.md").write_text(table)
        picture(results, out / f"{args.name}.png")
        print(table)
        return 0

    p.set_defaults(func=run)
