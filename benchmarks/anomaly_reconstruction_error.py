"""Why the healthy reconstruction does not find the inserted lesions: how much
of each lesion it removes, against its own error on normal soft tissue and
how much of that error is sampling noise (which more seeds average away)
rather than bias (which they do not).

On the OpenKBP case of ``python -m training.evaluate anomaly-real --cases
openkbp-inserted`` (16 validation patients, each slice with and without one
lesion), for each noise step t, with ``--ensemble`` seeds averaged:

* removed: the share of the inserted contrast that the reconstruction takes
  away (reconstruction of the slice with its lesion minus that of the same
  slice without, along the lesion's sign);
* normal |error|: mean |image - reconstruction| over soft tissue
  (-160..240 HU) outside the lesions, in the soft-tissue window;
* spread: mean per-voxel standard deviation over the seeds there, and the
  error the ensemble mean would have if spread were all of it (pure
  variance: sqrt(2 / pi) x spread / sqrt(ensemble)). The spread is of the
  unwindowed HU, so that figure overstates the variance share, if anything.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/anomaly_reconstruction_error.py --t 5 50 150 400 \\
        --ensemble 4 --out docs/evaluation/anomaly_reconstruction_error.md

With ``--scores`` a second table scores the same reconstructions as
heatmaps other than the task's (pixel AUROC over the body): is the bias
smooth enough to subtract, or is the lesion a coherent offset that
averaging the *signed* residual would bring out?

* task: |residual| smoothed (6 mm; the task's pipeline before its
  normalisation, which does not change a single volume's AUROC much);
* signed: the signed residual smoothed (6 mm), then its magnitude (a matched
  filter for a uniform-contrast blob; texture error averages out);
* detrended D mm: the signed residual minus its own smoothing at D mm (the
  reconstruction's slowly varying bias removed), then as the task.

About 1.5 minutes per t on one thread.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from napari_mediffuse.tasks.anomaly import DEFAULT_STEPS, DEFAULT_WINDOW_HU, healthy_reconstruction
from napari_mediffuse.tasks.common import RunOptions
from training.evaluate.anomaly_real import _stack_volume, case_prior, openkbp_inserted_case
from training.report import write_markdown


def error_budget(image, truth, roi, reconstruction, spread, ensemble: int, window=DEFAULT_WINDOW_HU) -> dict:
    """The figures of the module docstring for one reconstruction. ``image``
    holds each slice twice, first without, then with its lesion."""
    half = len(image) // 2
    inserted = image[half:] - image[:half]
    lesion = truth[half:].astype(bool)
    sign = np.sign(inserted[lesion])
    residual = np.clip(image, *window) - np.clip(reconstruction, *window)
    normal = roi & ~truth.astype(bool) & (image > window[0]) & (image < window[1])
    spread_mean = float(spread[normal].mean())
    return {"inserted_hu": float(np.abs(inserted[lesion]).mean()),
            # the same slice reconstructed with and without its lesion: what survives of the lesion
            "removed_fraction": float(1.0 - ((reconstruction[half:] - reconstruction[:half])[lesion] * sign).mean()
                                      / np.abs(inserted[lesion]).mean()),
            "normal_abs_error_hu": float(np.abs(residual[normal]).mean()),
            "spread_hu": spread_mean,
            "pure_variance_error_hu": float(np.sqrt(2 / np.pi) * spread_mean / np.sqrt(ensemble))}


def score_variants(image, truth, roi, reconstruction, spacing, *, smooth_mm: float = 6.0,
                   detrend_mm=(8.0, 16.0, 32.0), window=DEFAULT_WINDOW_HU) -> dict:
    """Pixel AUROC over ``roi`` of the heatmaps of the module docstring."""
    from napari_mediffuse.tasks.anomaly import smooth_in_roi
    from training.evaluate.anomaly import auroc

    roi = roi.astype(bool)
    residual = np.clip(image, *window) - np.clip(reconstruction, *window)
    smooth = lambda values, mm: smooth_in_roi(values, roi, spacing, smooth_mm=mm)  # noqa: E731
    score = lambda heatmap: auroc(heatmap[roi], truth[roi])  # noqa: E731
    out = {"task": score(smooth(np.abs(residual), smooth_mm)),
           "signed": score(np.abs(smooth(residual, smooth_mm)))}
    for mm in detrend_mm:
        out[f"detrended {mm:g} mm"] = score(smooth(np.abs(residual - smooth(residual, mm)), smooth_mm))
    return out


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ct-prior-multi")
    p.add_argument("--t", type=int, nargs="+", default=[5, 50, 150, 400])
    p.add_argument("--ensemble", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scores", action="store_true", help="also score other heatmaps (module docstring)")
    p.add_argument("--window", type=int, help="evaluate the prior in sliding windows of this many pixels "
                                              "(the patch size it was trained at: 64) instead of whole slices")
    p.add_argument("--out", default="docs/evaluation/anomaly_reconstruction_error.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    case = openkbp_inserted_case(seed=args.seed)
    vol = _stack_volume(case.image, case.affine, case.name)
    options = RunOptions(device="cpu", seed=args.seed, window=args.window)
    prior, _ = case_prior(case, vol, args.model, options, task="benchmark")
    rows = []
    for t in args.t:
        rec, spread = healthy_reconstruction(vol, case.roi, prior, t=t, ensemble=args.ensemble, steps=DEFAULT_STEPS,
                                             options=options, return_spread=True)
        rows.append((t, error_budget(case.image, case.truth, case.roi, rec, spread, args.ensemble)))
        if args.scores:
            rows[-1][1]["auroc"] = score_variants(case.image, case.truth, case.roi, rec, vol.spacing)
    lines = [f"<!-- PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/anomaly_reconstruction_error.py "
             f"{' '.join(sys.argv[1:] if argv is None else argv)} -->", "",
             f"{case.name}, model `{args.model}`, {args.ensemble} seeds averaged, {DEFAULT_STEPS} DDIM steps, "
             f"{'whole slices' if args.window is None else f'{args.window}-pixel sliding windows'}; "
             f"mean inserted |contrast| {rows[0][1]['inserted_hu']:.1f} HU.", "",
             "| t | lesion contrast removed | normal soft tissue: mean abs. error of the average (HU) | spread per seed (HU) "
             "| abs. error if it were all spread (HU) |", "|---|---|---|---|---|"]
    for t, r in rows:
        lines.append(f"| {t} | {100 * r['removed_fraction']:.0f} % | {r['normal_abs_error_hu']:.1f} | "
                     f"{r['spread_hu']:.1f} | {r['pure_variance_error_hu']:.1f} |")
    if args.scores:
        names = list(rows[0][1]["auroc"])
        lines += ["", "Pixel AUROC (ROI body) of heatmaps made from the same reconstructions:", "",
                  "| t | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {t} | " + " | ".join(f"{r['auroc'][n]:.3f}" for n in names) + " |" for t, r in rows]
    print(write_markdown(lines, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
