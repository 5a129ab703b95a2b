"""How faint and how small a lesion a lesion segmenter finds, in held-out patients (issue 18 item 4).

    PYTHONPATH=. python benchmarks/segmenter_sensitivity.py MODEL [MODEL ...]
        [--contrasts 15 30 60 90 150 300] [--diameters 10 30] [--where body tissue] [--repeats 2] [--seed 0]
        [--out docs/evaluation/segmenter_sensitivity.md]

The slices are the anomaly evaluation's OpenKBP validation slices (``python -m
training.evaluate anomaly-real --cases openkbp-inserted``: 16 patients never
trained on, neck to upper chest, 4 mm). Into each goes one lesion of the
segmenters' own training kind (:func:`training.healing.corrupt`: a soft blob,
added), its contrast drawn in one band of ``--contrasts`` (HU, either sign),
its diameter in one band of ``--diameters`` (mm), its centre anywhere in the
body or in soft tissue (``--where``; -100..200 HU,
:data:`training.healing.LESION_TISSUE_HU`). Each model runs as the anomaly
task's learned method (two flipped views, probability smoothed by 3 mm) on the
slices without and with their lesion; per band: pixel AUROC in the body, Dice
of the map above 0.5 (the task's mask) and the share of lesions found (any of
their pixels in the mask).

The inserted-lesion case of the evaluation asks for 30-90 HU in soft tissue with
its own lesion generator (:mod:`training.lesions`); here the lesions are each
model's own kind, so a low score is a model that cannot see lesions this faint
or small, not one that meets an unfamiliar kind. Writes ``<out>`` (Markdown), ``.json``
and ``.png`` (AUROC against contrast).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def lesion_slices(clean: np.ndarray, body: np.ndarray, spacing_mm, band, diameters, where: str,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One blob per slice of ``clean`` (HU, (S, H, W)), contrast in ``band`` (HU),
    diameter in ``diameters`` (mm), centred in the body or in its soft tissue:
    ``(slices with lesions, masks)``."""
    from training.healing import corrupt

    images, masks = [], []
    for image, inside in zip(clean, body):
        out, weight = corrupt(image, spacing_mm, rng, body=inside, max_lesions=1, diameter_mm=diameters,
                              contrast_hu=band, replace_probability=0.0, texture_hu=(0.0, 10.0),
                              tissue_probability=1.0 if where == "tissue" else 0.0)
        images.append(out)
        masks.append(weight >= 0.5)
    return np.stack(images), np.stack(masks)


def segmenter_heatmap(model: str, images: np.ndarray, body: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The anomaly task's learned heatmap (probability, 2 views, 3 mm smoothing) of ``images``."""
    from napari_mediffuse.io.volume import Volume
    from napari_mediffuse.tasks.anomaly import LEARNED_TASKS, probability_heatmap
    from napari_mediffuse.tasks.common import RunOptions, learned_slices

    volume = Volume(data=images.astype(np.float32), affine=affine, modality="CT", name="benchmark slices")
    prob, _, _ = learned_slices(volume, volume.data, task=LEARNED_TASKS, label="segmenter benchmark", model=model,
                                options=RunOptions(device="cpu"), ensemble=2, region="head-neck",
                                message="segmenter benchmark")
    return probability_heatmap(prob, body, volume.spacing, smooth_mm=3.0)


def scores(heat: np.ndarray, truth: np.ndarray, roi: np.ndarray) -> dict:
    from napari_mediffuse.tasks.anomaly import SEGMENTATION_THRESHOLD
    from training.evaluate.anomaly import auroc, dice

    flagged = (heat > SEGMENTATION_THRESHOLD) & roi
    lesion = truth & roi
    # one lesion per slice: found when some of its pixels are in the task's mask
    found = [bool(flagged[k][lesion[k]].any()) for k in range(len(heat)) if lesion[k].any()]
    return {"pixel_auroc": auroc(heat[roi], truth[roi]), "dice": dice(flagged, lesion),
            "lesions_found": float(np.mean(found)) if found else float("nan"),
            "lesion_probability": float(heat[lesion].mean())}


def main(argv=None) -> int:
    import torch

    from training.evaluate.anomaly_real import openkbp_inserted_case
    from training.report import write_report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="lesion segmenter checkpoints (names or folders)")
    parser.add_argument("--contrasts", type=float, nargs="+", default=[15, 30, 60, 90, 150, 300],
                        help="band edges (HU): one band between each two neighbours")
    parser.add_argument("--diameters", type=float, nargs="+", default=[10, 30],
                        help="band edges (mm) of the lesions' diameters")
    parser.add_argument("--where", nargs="+", choices=["body", "tissue"], default=["body", "tissue"])
    parser.add_argument("--repeats", type=int, default=2, help="lesions per slice and band (each a new draw)")
    parser.add_argument("--patients", default=None,
                        help="folder of OpenKBP patients the slices come from (default: the evaluation's validation "
                             "patients; the training patients' folder asks whether a model learnt its lesions at all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="Markdown table (.json and .png beside it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    # the evaluation's slices (its own lesions are not used here), or as many of other patients
    case = openkbp_inserted_case() if args.patients is None else openkbp_inserted_case(args.patients)
    n = len(case.image) // 2
    clean, body = case.image[:n], case.roi[:n]
    bands = list(zip(args.contrasts[:-1], args.contrasts[1:]))
    sizes = list(zip(args.diameters[:-1], args.diameters[1:]))
    rows = []
    for where in args.where:
        for size in sizes:
            for band in bands:
                # the same lesions for every model
                rng = np.random.default_rng([args.seed, int(band[0]), int(size[0]), int(where == "tissue")])
                drawn = [lesion_slices(clean, body, case.spacing[1:], band, size, where, rng)
                         for _ in range(args.repeats)]
                images = np.concatenate([clean] + [d[0] for d in drawn])
                truth = np.concatenate([np.zeros_like(body)] + [d[1] for d in drawn])
                roi = np.concatenate([body] * (1 + args.repeats))
                for model in args.models:
                    heat = segmenter_heatmap(model, images, roi, case.affine)
                    row = {"model": model, "where": where, "contrast_hu": list(band), "diameter_mm": list(size),
                           **scores(heat, truth, roi)}
                    rows.append(row)
                    print(row, flush=True)

    command = "PYTHONPATH=. python benchmarks/segmenter_sensitivity.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    lines = [f"<!-- {command} -->", "",
             (f"{n} OpenKBP validation slices (4 mm, never trained on)" if args.patients is None
              else f"{n} slices of the OpenKBP patients in `{args.patients}` (4 mm)")
             + ", each without and with one blob of the "
             f"segmenters' own kind (added, {args.repeats} draws per slice and band); heatmap = the task's learned "
             "method (2 views, 3 mm smoothing); pixel AUROC in the body / Dice of the map above 0.5 (the task's "
             "mask) / lesions found (any of its pixels in the mask).",
             "", "| lesion centre | diameter (mm) | contrast (HU) | "
             + " | ".join(f"`{model_label(m)}`" for m in args.models) + " |",
             "|---|---|---|" + "---:|" * len(args.models)]
    by_key = index_rows(rows)
    for r in rows[::len(args.models)]:
        found = [by_key[model, r["where"], tuple(r["contrast_hu"]), tuple(r["diameter_mm"])] for model in args.models]
        cells = [f"{o['pixel_auroc']:.3f} / {o['dice']:.3f} / {100 * o['lesions_found']:.0f} %" for o in found]
        lines.append(f"| {'soft tissue' if r['where'] == 'tissue' else 'body'} | "
                     f"{r['diameter_mm'][0]:g}-{r['diameter_mm'][1]:g} | "
                     f"{r['contrast_hu'][0]:g}-{r['contrast_hu'][1]:g} | " + " | ".join(cells) + " |")
    if args.out:
        lines += ["", f"![AUROC against contrast]({Path(args.out).with_suffix('.png').name})"]
    print(write_report(lines, args.out, {"command": command, "rows": rows}))
    if args.out:
        plot(rows, args.models, args.where, bands, sizes, Path(args.out).with_suffix(".png"))
    return 0


def index_rows(rows) -> dict:
    """The rows by (model, placement, contrast band, diameter band)."""
    return {(r["model"], r["where"], tuple(r["contrast_hu"]), tuple(r["diameter_mm"])): r for r in rows}


def model_label(model: str) -> str:
    """A run's name for an exported folder (``runs/NAME/ema``), else the model as given."""
    path = Path(model)
    return path.parent.name if path.name in ("ema", "model") and path.parent.name else model


def plot(rows, models, places, bands, sizes, path) -> None:
    """AUROC against contrast: a panel per size band, a colour per model, a line style per placement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centres = [np.sqrt(a * b) for a, b in bands]
    colours = plt.get_cmap("tab10")
    by_key = index_rows(rows)
    fig, axes = plt.subplots(1, len(sizes), figsize=(3.2 * len(sizes) + 1, 3.8), sharey=True, squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for k, model in enumerate(models):
            for where in places:
                ys = [by_key[model, where, tuple(band), tuple(size)]["pixel_auroc"] for band in bands]
                ax.plot(centres, ys, marker="o", color=colours(k), linestyle="-" if where == "tissue" else "--",
                        label=f"{model_label(model)} ({'soft tissue' if where == 'tissue' else 'body'})")
        ax.set_xscale("log")
        ax.set_title(f"{size[0]:g}-{size[1]:g} mm", fontsize=9)
        ax.set_xlabel("contrast (HU, band centre)")
        ax.axhline(0.9, color="grey", linewidth=0.5)
    axes[0][0].set_ylabel("pixel AUROC")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7)
    fig.tight_layout(rect=(0, 0.08 + 0.035 * ((len(labels) + 1) // 2), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
