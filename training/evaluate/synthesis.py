"""Evaluation of volume synthesis against real CT.

    python -m training.evaluate synthesis --real ../shared/data/ct/abdomen_ct_3mm.nii.gz \
        --shape 64 101 122 --samples 2 --steps 50 --out docs/evaluation/synthesis

Reports, for samples of the CT prior and for the real CT:

* slice-to-slice continuity: mean absolute HU difference between adjacent
  axial slices inside the body (independent 2D draws give large values);
* HU histogram distance: 1-D Wasserstein distance (HU) between the body
  voxels of a sample and of the real CT(s); beside it, how far real patients
  are from the same pool (each of several ``--real`` patients against the
  others, and each ``--reference`` CT against all of them), so the samples'
  distance can be read against the spread between real patients; and all
  samples pooled against the real pool (the model's HU population), beside
  real patients pooled as many at a time against the others;
* bone: the share of the body above 300 HU, samples beside the real
  patients (a neck without vertebrae or mandible can still have a close
  histogram);
* diversity: MS-SSIM between the axial slices of different samples (lower =
  more diverse);
* closeness to the training CT: the highest correlation between a sample and
  any same-sized block of the real CT, both at 8 mm (near 1 = a copy of the
  real patient; a prior trained on one CT can only vary that one body);
* seconds per volume.

Samples use the two-stage method (coarse layout, then the 2D prior) when a
coarse prior is installed; the 2D prior alone and independent axial draws
are reported beside them.

It writes ``synthesis.json``, ``synthesis_table.md`` and ``synthesis.png`` (axial,
coronal and sagittal mid-planes of each sample beside the real CT).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import wasserstein_distance

from napari_mediffuse import io
from napari_mediffuse.tasks.common import RunOptions
from napari_mediffuse.tasks.synthesize import PLANES as PLANES_ALL
from napari_mediffuse.tasks.synthesize import synthesize

BODY_HU = -500.0


def body_mask(volume_hu: np.ndarray) -> np.ndarray:
    return volume_hu > BODY_HU


#: HU above which a body voxel counts as bone in :func:`bone_share` (cortical and
#: trabecular bone partial-volumed at 4 mm stays above it; muscle, vessels with
#: contrast and glands stay below).
BONE_HU = 300.0


def bone_share(volume_hu: np.ndarray) -> float:
    """Share of the body's voxels above :data:`BONE_HU` (percent): whether a
    synthetic volume holds vertebrae, mandible and skull as a patient's does
    (a neck drawn without them scores near 0)."""
    body = body_mask(volume_hu)
    return float((volume_hu[body] > BONE_HU).mean() * 100.0) if body.any() else float("nan")


def adjacent_slice_difference(volume_hu: np.ndarray) -> float:
    """Mean |HU difference| between neighbouring axial slices, inside the body."""
    diff = np.abs(np.diff(volume_hu, axis=0))
    inside = body_mask(volume_hu)[1:] | body_mask(volume_hu)[:-1]
    return float(diff[inside].mean()) if inside.any() else float("nan")


def histogram_distance(a_hu: np.ndarray, b_hu: np.ndarray, max_samples: int = 200_000) -> float:
    """Wasserstein-1 distance (HU) between body-voxel HU distributions."""
    return voxel_distance(a_hu[body_mask(a_hu)], b_hu[body_mask(b_hu)], max_samples)


def voxel_distance(a: np.ndarray, b: np.ndarray, max_samples: int = 200_000) -> float:
    """Wasserstein-1 distance (HU) between two sets of voxel values, each
    subsampled to at most ``max_samples`` (a fixed seed: repeatable)."""
    rng = np.random.default_rng(0)
    a = rng.choice(a, min(max_samples, a.size), replace=False) if a.size else a
    b = rng.choice(b, min(max_samples, b.size), replace=False) if b.size else b
    return float(wasserstein_distance(a, b)) if a.size and b.size else float("nan")


def pooled_group_spread(reals: list[np.ndarray], group_size: int, references: list[np.ndarray] = ()) -> dict:
    """Like-for-like comparison for pooled samples, named by what it is:
    ``{"hu_wasserstein_real_groups_to_pool": [...]}``, real patients taken
    ``group_size`` at a time (consecutive groups; a remainder is left out),
    each group's body voxels pooled against those of all other patients; with
    fewer than ``2 x group_size`` patients ``{"hu_wasserstein_references_pooled":
    d}``, the ``references`` pooled against all of ``reals``; ``{}`` without
    references."""
    bodies = [r[body_mask(r)] for r in reals]
    if len(bodies) >= 2 * group_size:
        groups = [list(range(k, k + group_size)) for k in range(0, len(bodies) - group_size + 1, group_size)]
        return {"hu_wasserstein_real_groups_to_pool": [
            voxel_distance(np.concatenate([bodies[i] for i in g]),
                           np.concatenate([b for i, b in enumerate(bodies) if i not in g])) for g in groups]}
    if len(references):
        return {"hu_wasserstein_references_pooled": voxel_distance(
            np.concatenate([r[body_mask(r)] for r in references]), np.concatenate(bodies))}
    return {}


def real_histogram_spread(reals: list[np.ndarray], references: list[np.ndarray] = ()) -> list[float]:
    """How far real patients are from a pool of real patients (HU, as
    :func:`histogram_distance`): each of ``reals`` against the body voxels of
    the others (leave one out; needs two or more), then each of
    ``references`` (CTs not in the pool) against all of ``reals``."""
    bodies = [r[body_mask(r)] for r in reals]
    distances = []
    if len(reals) >= 2:
        for i, r in enumerate(reals):
            distances.append(histogram_distance(r, np.concatenate([b for j, b in enumerate(bodies) if j != i])))
    if len(references):
        pooled = np.concatenate(bodies)
        distances += [histogram_distance(r, pooled) for r in references]
    return distances


def ms_ssim_between(a_hu: np.ndarray, b_hu: np.ndarray, window=(-1024.0, 2048.0)) -> float:
    """Mean MS-SSIM (MONAI, 3 scales, 7-pixel kernel) between axial slices."""
    from monai.metrics import MultiScaleSSIMMetric

    def prep(x):
        x = (np.clip(x, *window) - window[0]) / (window[1] - window[0])
        return torch.from_numpy(x.astype(np.float32))[:, None]

    metric = MultiScaleSSIMMetric(spatial_dims=2, data_range=1.0, kernel_size=7,
                                  weights=(0.0448, 0.2856, 0.3001))
    n = min(len(a_hu), len(b_hu))
    return float(metric(prep(a_hu[:n]), prep(b_hu[:n])).mean())


def _window(x, level=40.0, width=400.0):
    return (np.clip((x - (level - width / 2)) / width, 0, 1) * 255).astype(np.uint8)


#: Windows of the picture's columns (level, width HU): soft tissue, then bone
#: (mandible, vertebrae and skull are what a reader checks a neck volume for).
PICTURE_WINDOWS = ((40.0, 400.0), (400.0, 1800.0))


def picture(volumes: list[np.ndarray], labels: list[str], path: Path) -> None:
    """Axial / coronal / sagittal mid-planes of each volume, one row each, in
    each of :data:`PICTURE_WINDOWS` side by side."""
    from skimage.transform import resize
    from skimage import io as skio

    rows = []
    for vol in volumes:
        z, y, x = (s // 2 for s in vol.shape)
        planes = [vol[z], vol[:, y][::-1], vol[:, :, x][::-1]]
        height = 128
        tiles = [resize(p, (height, max(1, int(round(p.shape[1] * height / p.shape[0])))), order=1,
                        preserve_range=True) for p in planes]
        rows.append(np.concatenate([_window(t, level, window_width) for level, window_width in PICTURE_WINDOWS
                                    for t in tiles], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]))) for r in rows]
    skio.imsave(str(path), np.concatenate(rows, axis=0), check_contrast=False)
    windows = " then ".join(f"W{window_width:g} L{level:g}" for level, window_width in PICTURE_WINDOWS)
    path.with_suffix(".txt").write_text("rows: " + ", ".join(labels) + "\ncolumns: axial, coronal, sagittal"
                                        f" (mid-planes), in {windows} (soft tissue, bone)\n")


def correlation_to_real(sample_hu: np.ndarray, real_hu: np.ndarray, voxel_mm: float = 3.0,
                        coarse_mm: float = 8.0) -> float:
    """Highest Pearson correlation between ``sample_hu`` and a block of ``real_hu``
    of the same shape (every offset along the first axis; the other axes
    centre-cropped or padded with air), both smoothed to ``coarse_mm``."""
    from scipy import ndimage

    from training.data import centre_fit

    sigma = 0.4 * coarse_mm / voxel_mm
    n = sample_hu.shape[0]
    a = ndimage.gaussian_filter(sample_hu.astype(np.float32), sigma)
    real = ndimage.gaussian_filter(real_hu.astype(np.float32), sigma)
    if real.shape[0] < n:
        real = centre_fit(real, (n,) + real.shape[1:], fill=-1024.0)
    best = -1.0
    for start in range(0, real.shape[0] - n + 1, 2):
        block = centre_fit(real[start:start + n], a.shape, fill=-1024.0)
        best = max(best, float(np.corrcoef(a.ravel(), block.ravel())[0, 1]))
    return best


def in_sample_field(real_hu: np.ndarray, shape, body_hu: float = -700.0) -> np.ndarray:
    """A real CT as a sample's field of view holds it: cropped to its body
    (voxels above ``body_hu``, as the coarse prior's training boxes) and
    centred in ``shape`` (cropped or padded with air), as synthesis centres
    the drawn body in its grid. Scored whole, a 256 mm sample is compared
    with scans from the skull to the chest: that scores the field of view,
    not the tissue."""
    from training.data import body_box, centre_fit

    return centre_fit(np.asarray(real_hu, dtype=np.float32)[body_box(real_hu, body_hu)], tuple(shape),
                      fill=-1024.0)


def real_volumes(paths, voxel_mm: float, orientation_fix=None) -> list[np.ndarray]:
    """The real CTs (HU) resampled to the samples' isotropic ``voxel_mm``, so
    adjacent-slice differences compare like with like (a 2.5 mm scan's
    neighbours differ less than a 4 mm sample's); ``orientation_fix`` as in
    the training configs (OpenKBP's boxes: ``rot90_PL flip_S``), so the
    picture and the closeness score see the anatomy as the samples do."""
    from training.data import fix_orientation, resample_isotropic

    out = []
    for path in paths:
        vol = io.read(path)[0]
        data, spacing = fix_orientation(vol.data.astype(np.float32), vol.spacing, orientation_fix)
        out.append(resample_isotropic(data, spacing, voxel_mm).astype(np.float32))
    return out


def evaluate(real_path, shape, *, samples: int = 2, steps: int = 50, model=None, region="abdomen",
             device="cpu", coarse_model="auto", refine_from=None, planes=None, slice_correlation=None,
             detail_model="auto", out=None, spacing=None, references=(),
             orientation_fix=None, match_fov: bool = False, command: str | None = None) -> dict:
    """Scores of ``samples`` synthetic volumes against the real CT(s) ``real_path``
    (one path or several patients: continuity and histogram against all of
    them pooled, closeness against the first). ``references``: other real
    CTs of the region, not pooled, scored against the pool beside the
    patients' leave-one-out distances (:func:`real_histogram_spread`).
    ``command`` (the command line that ran it) heads the table and is kept in
    the JSON. ``match_fov``: every real CT is scored as the samples' field of
    view holds it (:func:`in_sample_field`)."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1 (the scores describe generated volumes), got {samples}")
    paths = [real_path] if isinstance(real_path, (str, Path)) else list(real_path)
    results = {"command": command, "samples": [],
               "settings": {"shape": list(shape), "steps": steps, "region": region,
                            "model": model or "default ct_prior", "device": device, "spacing_mm": spacing,
                            "torch_threads": torch.get_num_threads()}}
    volumes = []
    reals: list[np.ndarray] = []
    refs: list[np.ndarray] = []
    pooled: list[np.ndarray] = []  # the real patients' body voxels, once

    def scored(vol, seconds) -> dict:
        if not reals:  # on the first sample's grid
            reals.extend(real_volumes(paths, float(vol.spacing[0]), orientation_fix))
            refs.extend(real_volumes(references, float(vol.spacing[0]), orientation_fix))
            if match_fov:
                if not np.allclose(vol.spacing, vol.spacing[0]):
                    raise ValueError(f"--match-fov needs isotropic samples, got {tuple(vol.spacing)} mm")
                reals[:] = [in_sample_field(r, vol.data.shape) for r in reals]
                refs[:] = [in_sample_field(r, vol.data.shape) for r in refs]
            pooled.append(np.concatenate([r[body_mask(r)] for r in reals]))
            spread = real_histogram_spread(reals, refs)
            results["real"] = {"paths": [str(p) for p in paths], "voxel_mm": float(vol.spacing[0]),
                               "field_of_view": "the samples'" if match_fov else "whole scans",
                               "adjacent_slice_mad_hu": float(np.mean([adjacent_slice_difference(r)
                                                                       for r in reals])),
                               "references": [str(p) for p in references],
                               "hu_wasserstein_real_to_pool": spread,
                               "bone_share_percent": [bone_share(r) for r in reals]}
        return {"seconds": round(seconds, 1), "adjacent_slice_mad_hu": adjacent_slice_difference(vol.data),
                "hu_wasserstein_to_real": histogram_distance(vol.data, pooled[0]),
                "bone_share_percent": bone_share(vol.data),
                "correlation_to_real": correlation_to_real(vol.data, reals[0], voxel_mm=float(vol.spacing[0]))}

    for seed in range(samples):
        start = time.monotonic()
        vol = synthesize(shape, spacing=spacing, region=region, model=model, steps=steps, coarse_model=coarse_model,
                         refine_from=refine_from, planes=planes, slice_correlation=slice_correlation,
                         detail_model=detail_model, options=RunOptions(device=device, seed=seed, batch_size=8))
        volumes.append(vol.data)
        params = vol.metadata["parameters"]
        results["samples"].append({"seed": seed, **scored(vol, time.monotonic() - start)})
    results["settings"].update(coarse_model=params["coarse_model"], detail_model=params.get("detail_model"),
                               refine_from=params["refine_from"],
                               planes=params["planes"], slice_correlation=params["slice_correlation"])
    # For contrast: the 2D prior alone (alternating planes from noise) and
    # independent 2D draws (axial plane only, no 3D coupling).
    baselines = {"prior_2d_alone": {"planes": PLANES_ALL}, "axial_only_baseline": {"planes": ("axial",)}}
    extra_volumes = []
    for key, kwargs in baselines.items():
        start = time.monotonic()
        vol = synthesize(shape, spacing=spacing, region=region, model=model, steps=steps, coarse_model=None,
                         options=RunOptions(device=device, seed=0, batch_size=8), **kwargs)
        results[key] = scored(vol, time.monotonic() - start)
        extra_volumes.append(vol.data)
    # the samples as a population against the patients as one: per-sample
    # distances also hold how much one patient differs from the others
    results["samples_pooled_hu_wasserstein"] = voxel_distance(
        np.concatenate([v[body_mask(v)] for v in volumes]), pooled[0])
    results["real"].update(pooled_group_spread(reals, samples, refs))
    if samples >= 2:
        results["ms_ssim_between_samples"] = ms_ssim_between(volumes[0], volumes[1])
    real_mad = results["real"]["adjacent_slice_mad_hu"]
    results["continuity_ratio_to_real"] = float(np.mean([s["adjacent_slice_mad_hu"] for s in results["samples"]])
                                                / real_mad)
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "synthesis.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "synthesis_table.md").write_text(markdown(results))  # synthesis.md is the hand-written page
        picture(volumes + extra_volumes + [reals[0]],
                [f"sample seed {i}" for i in range(len(volumes))]
                + ["2D prior alone", "axial-only draws", "real CT"], out / "synthesis.png")
    return results


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = ([f"<!-- {results['command']} -->", ""] if results.get("command") else []) + [
        f"Shape {tuple(s['shape'])}, {s['steps']} DDIM steps, region {s['region']}, model {s['model']}, "
        f"device {s['device']} ({s['torch_threads']} threads); coarse layout: {s.get('coarse_model') or 'none'}"
        + (f"; detail stage: {s['detail_model']}" if s.get("detail_model") else "")
        + (f", refined from step {s['refine_from']} in plane(s) {'/'.join(s.get('planes') or [])}, "
           f"slice noise correlation {s.get('slice_correlation', 0):g}." if s.get("refine_from")
           else f" (its draw is the result), slice noise correlation {s.get('slice_correlation', 0):g}."
           if s.get("detail_model") else "."),
        "",
        "| volume | adjacent-slice MAD (HU) | HU Wasserstein to real (HU) | correlation to real CT (8 mm) "
        "| seconds |",
        "|---|---|---|---|---|",
        f"| real CT ({len(results['real']['paths'])} patient(s) at {results['real']['voxel_mm']:g} mm"
        + (", body centred in the samples' field of view" if results["real"].get("field_of_view") == "the samples'"
           else "") + ") | "
        f"{results['real']['adjacent_slice_mad_hu']:.1f} | 0 | 1 | - |",
    ]

    def row(label, r):
        return (f"| {label} | {r['adjacent_slice_mad_hu']:.1f} | {r['hu_wasserstein_to_real']:.1f} | "
                f"{r.get('correlation_to_real', float('nan')):.2f} | {r['seconds']:.0f} |")

    planes = s.get("planes") or list(PLANES_ALL)
    stage = ("axial slices" if planes == ["axial"] else "alternating planes") + (
        ", slice-correlated noise" if s.get("slice_correlation") else "")
    if s.get("detail_model"):
        stage = "detail stage" + (f" + {stage}" if s.get("refine_from") else "")
    method = f"coarse layout + {stage}" if s.get("coarse_model") else stage
    lines += [row(f"sample seed {r['seed']} ({method})", r) for r in results["samples"]]
    if "prior_2d_alone" in results:
        lines.append(row("2D prior alone (alternating planes from noise)", results["prior_2d_alone"]))
    lines.append(row("axial-only (independent 2D draws)", results["axial_only_baseline"]))
    distances = [r["hu_wasserstein_to_real"] for r in results["samples"]]
    lines += ["", f"Continuity ratio (samples / real): {results['continuity_ratio_to_real']:.2f} (target <= 1.5).",
              f"HU histogram distance of the samples: mean {np.mean(distances):.1f} HU, range "
              f"{min(distances):.1f}-{max(distances):.1f} (target <= 20)."]
    spread = results["real"].get("hu_wasserstein_real_to_pool") or []
    if spread:
        n_loo = len(results["real"]["paths"]) if len(results["real"]["paths"]) >= 2 else 0
        who = " and ".join(([f"each of the {n_loo} patients against the other {n_loo - 1}"] if n_loo else [])
                           + ([f"{len(spread) - n_loo} other real CT(s) of the region against "
                               + ("them" if n_loo else "the real CT")]
                              if len(spread) > n_loo else []))
        lines.append(f"Real patients, for comparison ({who}): mean {np.mean(spread):.1f} HU, range "
                     f"{min(spread):.1f}-{max(spread):.1f}; {sum(d <= 20 for d in spread)} of {len(spread)} "
                     f"within 20 HU.")
    bones = [r["bone_share_percent"] for r in results["samples"] if "bone_share_percent" in r]
    real_bones = results["real"].get("bone_share_percent") or []
    if bones and real_bones:
        lines.append(f"Body above {BONE_HU:g} HU (bone): samples {min(bones):.1f}-{max(bones):.1f} % (mean "
                     f"{np.mean(bones):.1f}); real patients {np.percentile(real_bones, 10):.1f}-"
                     f"{np.percentile(real_bones, 90):.1f} % (10th-90th percentile, mean {np.mean(real_bones):.1f}).")
    if "samples_pooled_hu_wasserstein" in results:
        groups = results["real"].get("hu_wasserstein_real_groups_to_pool")
        refs_pooled = results["real"].get("hu_wasserstein_references_pooled")
        n = len(results["samples"])
        lines.append(f"All {n} samples pooled against the real patients pooled: "
                     f"{results['samples_pooled_hu_wasserstein']:.1f} HU"
                     + (f"; real patients pooled {n} at a time against the others: mean {np.mean(groups):.1f} HU, "
                        f"range {min(groups):.1f}-{max(groups):.1f} ({len(groups)} groups)" if groups else
                        f"; the other real CT(s) pooled against them: {refs_pooled:.1f} HU"
                        if refs_pooled is not None else "")
                     + ".")
    if "ms_ssim_between_samples" in results:
        lines.append(f"MS-SSIM between two samples: {results['ms_ssim_between_samples']:.3f} (lower = more diverse).")
    return "\n".join(lines) + "\n"


def add_command(subparsers) -> None:
    p = subparsers.add_parser("synthesis", help="continuity, HU histogram, diversity and time of synthesis")
    p.add_argument("--real", nargs="+", default=["../shared/data/ct/abdomen_ct_3mm.nii.gz"],
                   help="real CT(s) of the region: several patients are pooled (continuity, HU histogram)")
    p.add_argument("--shape", type=int, nargs=3, default=[64, 101, 122])
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--model")
    p.add_argument("--region", default="abdomen")
    p.add_argument("--device", default="cpu")
    p.add_argument("--coarse-model", default="auto", help="coarse whole-body prior (default: installed one; 'none')")
    p.add_argument("--detail-model", default="auto",
                   help="detail stage after the coarse layout (default: the installed one for the region; 'none')")
    p.add_argument("--refine-from", type=int, help="refinement start step (default: the task's)")
    p.add_argument("--planes", nargs="+", choices=list(PLANES_ALL), default=None,
                   help="planes of the 2D stage (default: the task's)")
    p.add_argument("--slice-correlation", type=float, default=None,
                   help="noise correlation of neighbouring axial slices (default: the task's)")
    p.add_argument("--spacing", type=float, nargs=3, help="voxel size (mm) of the samples (default: the model's)")
    p.add_argument("--reference", nargs="+", default=[],
                   help="other real CT(s) of the region, not pooled: their histogram distance to the pool is "
                        "reported beside the samples' (how far apart real patients are)")
    p.add_argument("--orientation-fix", nargs="*", default=None,
                   help="orientation fixes of the real CTs, as in the training configs (OpenKBP: rot90_PL flip_S)")
    p.add_argument("--match-fov", action="store_true",
                   help="score the real CTs as the samples' field of view holds them (body-cropped, centred in "
                        "the samples' shape) instead of whole")
    p.add_argument("--out", default="docs/evaluation/synthesis")

    def run(args) -> int:
        from . import command_line

        results = evaluate(args.real, args.shape, samples=args.samples, steps=args.steps, model=args.model,
                           region=args.region, device=args.device, coarse_model=args.coarse_model,
                           refine_from=args.refine_from, planes=args.planes,
                           slice_correlation=args.slice_correlation, detail_model=args.detail_model,
                           out=args.out, spacing=args.spacing,
                           references=args.reference, orientation_fix=args.orientation_fix,
                           match_fov=args.match_fov, command=command_line())
        print(markdown(results))
        return 0

    p.set_defaults(func=run)
