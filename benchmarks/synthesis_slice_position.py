"""Does the 3D position help synthesis? The prior trained with it from random
weights (runs/ct-prior-multi-slicepos-scratch) with the position given and
not known, against the same network trained without it for about as many
steps (runs/size-small: 3575 against 3800), for a head-and-neck volume (64^3 at 4 mm), with the coarse
layout (the task's default) and from noise (axial slices, slice-correlated
noise), 2 seeds each, against 8 OpenKBP validation patients.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/synthesis_slice_position.py --out docs/evaluation/prior_slicepos_scratch

Writes synthesis_position.json, synthesis_position.md (the command first) and
synthesis_position.png (seed 0 of every row, then a real patient). About 5
minutes on one thread.
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

import numpy as np

import napari_mediffuse.tasks.synthesize as synthesis
from napari_mediffuse.tasks.common import RunOptions
from training.evaluate.synthesis import adjacent_slice_difference, body_mask, histogram_distance, picture, real_volumes

ROWS = [("no position (size-small)", "runs/size-small/ema", False),
        ("3D position, given", "runs/ct-prior-multi-slicepos-scratch/ema", True),
        ("3D position, not known", "runs/ct-prior-multi-slicepos-scratch/ema", False)]
PATHS = [("coarse layout", {}),
         ("from noise, axial, rho 0.97", dict(coarse_model=None, planes=("axial",), slice_correlation=0.97))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    patients = sorted(glob.glob("../shared/data/ct/openkbp/validation/*/ct.nii.gz"))[:8]
    reals = real_volumes(patients, 4.0, ["rot90_PL", "flip_S"])
    pooled = np.concatenate([r[body_mask(r)] for r in reals])
    real_mad = float(np.mean([adjacent_slice_difference(r) for r in reals]))
    takes = synthesis.takes_slice_position
    results, volumes, labels = {}, [], []
    try:
        for name, model, given in ROWS:
            # 'not known': the same network, never given the position
            synthesis.takes_slice_position = takes if given else (lambda predictor: False)
            for path, kwargs in PATHS:
                rows = []
                for seed in (0, 1):
                    vol = synthesis.synthesize((64, 64, 64), spacing=(4, 4, 4), region="head-neck", model=model,
                                               steps=20, options=RunOptions(device="cpu", seed=seed, batch_size=8),
                                               **kwargs)
                    assert vol.metadata["parameters"]["slice_positions"] == given
                    rows.append({"seed": seed, "hu_wasserstein_to_real": histogram_distance(vol.data, pooled),
                                 "continuity_ratio": adjacent_slice_difference(vol.data) / real_mad})
                    if seed == 0:
                        volumes.append(vol.data)
                        labels.append(f"{name}; {path}")
                results[f"{name}; {path}"] = rows
    finally:
        synthesis.takes_slice_position = takes
    command = "PYTHONPATH=. OMP_NUM_THREADS=1 python " + " ".join(sys.argv)
    (out / "synthesis_position.json").write_text(json.dumps({"command": command, "patients": patients,
                                                              "results": results}, indent=2) + "\n")
    lines = [f"<!-- {command} -->", "",
             "Head-and-neck synthesis, 64^3 at 4 mm, 20 DDIM steps, seeds 0 and 1, against 8 OpenKBP "
             "validation patients.", "",
             "| prior; path | HU histogram distance (HU), seed 0 / 1 | continuity (x real), seed 0 / 1 |",
             "|---|---|---|"]
    for label, rows in results.items():
        lines.append(f"| {label} | " + " / ".join(f"{r['hu_wasserstein_to_real']:.1f}" for r in rows) + " | "
                     + " / ".join(f"{r['continuity_ratio']:.2f}" for r in rows) + " |")
    (out / "synthesis_position.md").write_text("\n".join(lines) + "\n")
    picture(volumes + [reals[0]], labels + ["real CT"], out / "synthesis_position.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
