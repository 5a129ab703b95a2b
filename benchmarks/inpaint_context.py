"""Inpainting on the mask's box plus context against whole slices: time and
error to the real tissue.

Square masks are put on soft tissue of the held-out 1 mm chest CT
(LIDC-0314, 512 x 399 slices of 0.78 mm), the real tissue under them is
removed and inpainted (``masked_reconstruction`` from pure noise, as
``mediffuse inpaint`` runs it) with whole slices (``context_mm=None``) and
cropped to the mask's box plus ``--context-mm`` on each side. Reported: seconds, and the mean
absolute error (HU) of the inpainted voxels to the real ones (lower = closer to
this patient's tissue; a prior cannot know what was under the mask, so this
measures plausibility, not recovery).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/inpaint_context.py \\
        --context-mm 16 32 --out docs/evaluation/inpaint_context.md

About 2 minutes per mask on whole slices, seconds cropped, on one thread.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from training.report import write_markdown

REPO = Path(__file__).resolve().parents[1]
CHEST = REPO.parent / "shared" / "data" / "ct" / "chest_ct_lidc0314_1mm.nii.gz"
#: (axial slice, row, column) of each mask's corner, in the held-out half: mediastinum (38 HU on
#: average), chest wall (44 HU), subcutaneous fat of the back (-88 HU).
MASKS = ((200, 192, 232), (160, 150, 120), (240, 328, 224))


def main(argv=None) -> int:
    import torch

    from napari_mediffuse import io
    from napari_mediffuse.tasks.common import Normalizer, RunOptions
    from napari_mediffuse.tasks.inpaint import masked_reconstruction, prepare_prior

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context-mm", type=float, nargs="+", default=[16.0, 32.0])
    p.add_argument("--size-px", type=int, default=16, help="mask side (pixels)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seeds", type=int, default=2, help="reconstructions averaged per mask")
    p.add_argument("--out", default="docs/evaluation/inpaint_context.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ct, = io.read(CHEST)
    options = RunOptions(device="cpu", seed=0, batch_size=1)
    rows = {}
    for s, r, c in MASKS:
        affine = np.array(ct.affine)
        affine[:3, 3] = (affine @ np.array([s, 0, 0, 1.0]))[:3]
        volume = ct.with_data(np.array(ct.data[s:s + 1], np.float32), affine=affine)
        unknown = np.zeros(volume.data.shape, bool)
        unknown[:, r:r + args.size_px, c:c + args.size_px] = True
        prior = prepare_prior(volume, None, options, task="inpainting")
        norm = Normalizer(prior.normalization, volume.data)
        for context in [None, *args.context_mm]:
            started = time.perf_counter()
            rec = masked_reconstruction(volume, unknown, prior, t_start=None, steps=args.steps, resample=1,
                                        seeds=tuple(range(args.seeds)), options=options, context_mm=context)
            seconds = time.perf_counter() - started
            error = float(np.abs(norm.inverse(rec)[unknown] - volume.data[unknown]).mean())
            rows.setdefault(context, []).append((seconds, error))
            print(f"slice {s} ({r}, {c}), context {context}: {seconds:.1f} s, {error:.1f} HU", flush=True)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"<!-- PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/inpaint_context.py {command} -->", "",
             f"LIDC-0314 (held out), {len(MASKS)} masks of {args.size_px} x {args.size_px} px "
             f"({args.size_px * 0.78:.1f} mm) on soft tissue, one 512 x 399 slice each, "
             f"model `{prior.name}`, {args.steps} DDIM steps with 1 RePaint resampling, "
             f"{args.seeds} seeds averaged, one CPU thread.", "",
             "| slices the prior runs on | seconds per mask (mean) | mean abs. error to the real tissue, per mask (HU) |",
             "|---|---:|---|"]
    for context, values in rows.items():
        label = "whole slice" if context is None else f"mask box + {context:g} mm"
        lines.append(f"| {label} | {np.mean([v[0] for v in values]):.1f} | "
                     f"{' / '.join(f'{v[1]:.0f}' for v in values)} |")
    print(write_markdown(lines, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
