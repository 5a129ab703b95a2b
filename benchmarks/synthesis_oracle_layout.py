"""What the 2D refinement makes of a perfect coarse layout (issue 18 item 5).

Synthesis draws a coarse layout (``ct-prior-coarse-multi``: a 40 x 40 x 64 box
of 8 mm) and refines it in axial slices with the 2D prior. The neck samples
have no mandible or vertebrae. Is that the layout's fault or the
refinement's? Here the layout is a held-out OpenKBP patient's own box, made
exactly as the coarse prior's training boxes are (body-cropped, low-pass
filtered, 8 mm, centred): what a perfect coarse prior would draw. It is
refined from several steps (``synthesize(..., layout=...)``) and scored as
``python -m training.evaluate synthesis`` scores samples: HU-histogram
(Wasserstein) distance to the other validation patients pooled, and
adjacent-slice differences as a ratio to the real CTs'. A coarse prior's own
draw (``--coarse-model``, default the installed one), refined from the same
steps and seed, is beside it.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/synthesis_oracle_layout.py \\
        --patients 0 5 10 20 --refine-from 450 600 750 --out docs/evaluation/synthesis_oracle_layout

About 15 minutes on one thread. With ``--detail-model NAME`` each layout
is also given to that detail stage (task ``ct_prior_detail``, drawing the
4 mm slices from the layout; refine column "detail"); the other rows run
without one. Writes ``<out>.json``, ``<out>.md`` and
``<out>.png`` (rows: each sample and the real patient; axial, coronal and
sagittal mid-planes in a soft-tissue and a bone window).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from training.report import write_markdown

REPO = Path(__file__).resolve().parents[1]
COARSE_CONFIG = REPO / "training" / "configs" / "ct_prior_coarse_multi.yaml"
SHAPE, VOXEL_MM = (64, 64, 64), 4.0  # as the item-5 evaluation (docs/evaluation/synthesis_head_neck)
#: The step each layout is pictured at: where it scores best (the coarse draw: the task's default);
#: the largest step run when that one is not among them.
PICTURED_STEP = {"the patient's own 8 mm box": 600, "the patient's own box at 16 mm": 750,
                 "coarse prior draw": 750}


def main(argv=None) -> int:
    import torch
    import yaml

    from napari_mediffuse.engine.intensity import denormalize, intensity_range
    from napari_mediffuse.tasks.common import RunOptions
    from napari_mediffuse.tasks.synthesize import synthesize
    from training.data import block_mean, centre_fit, load_volumes
    from training.evaluate.synthesis import (adjacent_slice_difference, body_mask, bone_share, histogram_distance,
                                             in_sample_field, picture, real_volumes)

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--patients", type=int, nargs="+", default=[0, 5, 10, 20],
                   help="indices into the sorted OpenKBP validation patients")
    p.add_argument("--refine-from", type=int, nargs="+", default=[450, 600, 750])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--coarse-model", default="auto",
                   help="coarse prior of the last row (default: the installed one; a name or folder)")
    p.add_argument("--detail-model", help="also run each layout through this detail stage (name or folder)")
    p.add_argument("--match-fov", action="store_true",
                   help="score against the real CTs as the samples' field of view holds them (body-cropped and "
                        "centred in the samples' shape), not whole")
    p.add_argument("--out", default="docs/evaluation/synthesis_oracle_layout")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    config = yaml.safe_load(COARSE_CONFIG.read_text())
    data = dict(config["data"])
    data["validation"] = [entry for entry in data["validation"] if "openkbp" in entry["path"]]
    boxes = load_volumes(data, config["normalization"], split="validation")  # sorted as the glob
    spec = data["validation"][0]
    paths = sorted((REPO / spec["path"]).glob(spec["glob"]))
    if len(paths) != len(boxes):
        raise SystemExit(f"{len(paths)} validation CTs but {len(boxes)} boxes")
    reals = real_volumes(paths, VOXEL_MM, spec.get("orientation_fix"))
    if args.match_fov:
        reals = [in_sample_field(r, SHAPE) for r in reals]
    real_mad = float(np.mean([adjacent_slice_difference(r) for r in reals]))
    hu_range = intensity_range(None, config["normalization"])
    rows, volumes, labels = [], [], []

    def score(name, patient, refine, volume, seconds, pool):
        row = {"patient": patient, "layout": name, "refine_from": refine,
               "hu_wasserstein_to_others": histogram_distance(volume, pool),
               "continuity_ratio_to_real": adjacent_slice_difference(volume) / real_mad,
               "dense_percent_of_body": bone_share(volume),
               "seconds": None if seconds is None else round(seconds, 1)}
        rows.append(row)
        print(row, flush=True)

    for k in args.patients:
        patient = paths[k].parent.name
        pool = np.concatenate([r[body_mask(r)] for i, r in enumerate(reals) if i != k])
        box_hu = denormalize(centre_fit(boxes[k].data, data["volume_shape"]), hu_range)
        score("the real CT itself", patient, None, reals[k], None, pool)
        # the same box at 16 mm (2 x 2 x 2 block means): the detail a 3D coarse network small enough
        # to train on 2 CPU cores would hold (20 x 20 x 32 voxels: 1 s per step of 4 boxes here)
        box16 = block_mean(box_hu, 2)
        for name, layout in (("the patient's own 8 mm box", (box_hu, data["spacing_mm"])),
                             ("the patient's own box at 16 mm", (box16, 2 * data["spacing_mm"])),
                             ("coarse prior draw", None)):
            runs = [(name, refine, "none") for refine in args.refine_from]
            # every layout goes to the detail stage too: one trained with blurred layouts (stage 2,
            # condition_blur_mm 16, card layout_blur_mm) details a 16 mm box; the volume's metadata
            # warns when the layout's voxel is coarser than the card's (tasks.synthesize.fits_layout)
            if args.detail_model:
                runs.append((f"{name} + detail stage", "detail", args.detail_model))
            pictured = PICTURED_STEP.get(name)
            if pictured not in args.refine_from:
                pictured = max(args.refine_from)
            for label, refine, detail in runs:
                started = time.perf_counter()
                # a seed per patient: the coarse prior draws another layout for each
                vol = synthesize(SHAPE, spacing=(VOXEL_MM,) * 3, region="head-neck", model="ct-prior-multi",
                                 steps=args.steps, refine_from=None if refine == "detail" else refine,
                                 layout=layout, detail_model=detail, coarse_model=args.coarse_model,
                                 options=RunOptions(seed=args.seed + k, batch_size=8))
                score(label, patient, refine, vol.data, time.perf_counter() - started, pool)
                if refine in ("detail", pictured):
                    volumes.append(vol.data)
                    labels.append(f"{patient}: {label}" + ("" if refine == "detail" else f", refined from {refine}"))
        volumes.append(reals[k])
        labels.append(f"{patient}: real CT")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "shape": SHAPE, "voxel_mm": VOXEL_MM,
                                                    "real_field_of_view": "the samples'" if args.match_fov
                                                    else "whole scans",
                                                    "steps": args.steps, "seed": args.seed,
                                                    "real_adjacent_slice_mad_hu": real_mad,
                                                    "rows": rows}, indent=2) + "\n")
    picture(volumes, labels, out.with_suffix(".png"))
    lines = [f"<!-- PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/synthesis_oracle_layout.py {command} -->", "",
             f"Head and neck, {SHAPE[0]} x {SHAPE[1]} x {SHAPE[2]} voxels of {VOXEL_MM:g} mm, {args.steps} DDIM "
             f"steps, seed {args.seed} + the patient's index, 2D prior `ct-prior-multi` refining in axial slices with slice-correlated "
             "noise (the task's defaults but the layout and the step it refines from). HU distance: to the "
             f"other {len(paths) - 1} OpenKBP validation patients pooled (target 20 HU)"
             + (", each as the samples' field of view holds it (body-cropped, centred in the samples' shape)"
                if args.match_fov else ", whole scans") + "; continuity: "
             "adjacent-slice differences against the real CTs' (target at most 1.5).", "",
             "| patient | layout | refined from | HU distance to the others (HU) | continuity (x real) "
             "| body above 300 HU (%) | seconds |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['patient']} | {r['layout']} | {r['refine_from'] if r['refine_from'] else '-'} | "
                     f"{r['hu_wasserstein_to_others']:.1f} | {r['continuity_ratio_to_real']:.2f} | "
                     f"{r['dense_percent_of_body']:.1f} | {r['seconds'] if r['seconds'] is not None else '-'} |")
    lines += ["", "Means over the patients:", "",
              "| layout | refined from | HU distance (HU) | continuity (x real) |", "|---|---:|---:|---:|"]
    for name in dict.fromkeys(r["layout"] for r in rows):
        for refine in sorted({r["refine_from"] for r in rows if r["layout"] == name}, key=str):
            group = [r for r in rows if r["layout"] == name and r["refine_from"] == refine]
            lines.append(f"| {name} | {refine or '-'} | "
                         f"{np.mean([r['hu_wasserstein_to_others'] for r in group]):.1f} | "
                         f"{np.mean([r['continuity_ratio_to_real'] for r in group]):.2f} |")
    lines += ["", f"![samples]({out.with_suffix('.png').name}) (rows: "
              + "; ".join(labels) + "; columns: axial, coronal, sagittal mid-planes, soft tissue then bone window)"]
    print(write_markdown(lines, out.with_suffix(".md")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
