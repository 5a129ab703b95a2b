"""Does a coarse prior draw bone, and where does it lose it? (issue 18 item 5)

A coarse prior's layout is what the detail stage draws the anatomy from; a
held-out patient's own 16 mm box gives vertebrae, mandible and airway
(docs/evaluation/synthesis_detail_oracle_16mm.md), the 3D coarse priors
trained on the CPU have not. Two measurements, in the share of the body
above 300 HU (``training.evaluate.synthesis.bone_share``):

* draws: ``--seeds`` boxes drawn from noise with ``--steps`` DDIM steps (as
  synthesis draws them: ``tasks.synthesize.draw_coarse_layout``), beside the
  validation patients' own boxes (the config's ``data.validation`` for the
  region, unaugmented);
* partial diffusion: ``--patients`` of those boxes noised to each step of
  ``--from-t`` and drawn back from there (steps in proportion). Bone kept
  from a low step but lost from a high one says the prior keeps bone that is
  there but does not place it (the layout, not the detail, is what it lacks).

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/coarse_prior_draws.py MODEL \\
        --config training/configs/ct_prior_coarse_3d_v_aug8_wide.yaml --out docs/evaluation/coarse_prior_draws_NAME

About 2 minutes for the [32, 64, 128] 3D prior on two threads. Writes
``<out>.json``, ``<out>.md`` and ``<out>.png`` with its ``<out>.txt`` legend
(rows: two patients' boxes, the first draws, one partial draw from the
highest step; mid-planes in a soft-tissue and a bone window).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from training.report import write_markdown


def partial_draw(predictor, checkpoint, box: np.ndarray, t: int, *, region: int, steps: int, seed: int) -> np.ndarray:
    """``box`` (normalised, S x P x L) noised to step ``t`` and drawn back with DDIM
    by ``predictor`` (of ``checkpoint``, region class ``region``); HU."""
    import torch

    from napari_mediffuse.engine.intensity import denormalize, intensity_range
    from napari_mediffuse.engine.sampling import add_noise, ddim_sample, make_generator
    from napari_mediffuse.engine.schedulers import alphas_cumprod
    from napari_mediffuse.tasks.common import bind_region

    generator = make_generator(seed)
    lead = (1, 1) if getattr(predictor, "spatial_dims", 2) == 3 else (1,)
    x0 = torch.from_numpy(np.ascontiguousarray(box, dtype=np.float32)).reshape(lead + box.shape)
    x_t = add_noise(x0.to(predictor.device), t, alphas_cumprod(checkpoint.schedule), generator)
    out = ddim_sample(bind_region(predictor, region), x_t, checkpoint.schedule, steps=steps,
                      t_start=t, generator=generator)
    return denormalize(out.cpu().numpy().reshape(box.shape), intensity_range(None, checkpoint.normalization))


def main(argv=None) -> int:
    import torch

    from napari_mediffuse.engine.checkpoint import CheckpointError
    from napari_mediffuse.engine.intensity import denormalize, intensity_range
    from napari_mediffuse.engine.networks import REGIONS
    from napari_mediffuse.engine.sampling import make_generator
    from napari_mediffuse.engine.schedulers import alphas_cumprod
    from napari_mediffuse.tasks.common import RunOptions, TaskInputError, predictor_for
    from napari_mediffuse.tasks.synthesize import draw_coarse_layout, resolve_coarse_prior
    from training.data import CoarseVolumes, ConfigError, block_mean, load_volumes, loading_config
    from training.evaluate.synthesis import BODY_HU, BONE_HU, bone_share, body_mask, picture
    from training.trainer import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="coarse prior (name or folder)")
    p.add_argument("--config", required=True, help="its training config (the validation patients' boxes)")
    p.add_argument("--region", default="head-neck", choices=[r for r in REGIONS if r != "unknown"])
    p.add_argument("--seeds", type=int, default=6, help="draws from noise")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of a draw from noise")
    p.add_argument("--patients", type=int, default=4, help="validation boxes drawn back from --from-t")
    p.add_argument("--from-t", type=int, nargs="+", default=[300, 500, 700, 900])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True, help="output stem (writes .json, .md, .png)")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.patients < 0 or args.steps < 1 or args.threads < 1:
        raise SystemExit("--seeds, --steps and --threads must be >= 1, --patients >= 0")
    torch.set_num_threads(args.threads)

    try:
        checkpoint, region = resolve_coarse_prior(args.model, args.region)
        if checkpoint is None:
            raise SystemExit(f"{args.model}: no coarse prior installed for {args.region}; give its folder")
        num_steps = len(alphas_cumprod(checkpoint.schedule))
        if any(not 0 < t < num_steps for t in args.from_t):
            raise SystemExit(f"--from-t: steps must be in 1..{num_steps - 1}, got {args.from_t}")
        config = load_config(args.config)
        data = config["data"]
        if data.get("kind") != "coarse_volume" or not data.get("validation"):
            raise SystemExit(f"{args.config}: not a coarse prior's config with validation patients "
                             "(data.kind coarse_volume, data.validation)")
        volumes = load_volumes(loading_config(data), config["normalization"], split="validation")
        validation = CoarseVolumes(volumes, data, part="val")
    except (TaskInputError, CheckpointError, ConfigError, OSError) as error:
        raise SystemExit(f"coarse_prior_draws: {error}")
    predictor = predictor_for(checkpoint, RunOptions())
    hu_range = intensity_range(None, checkpoint.normalization)
    boxes = [block_mean(box, validation.factor) for box, r in zip(validation.boxes, validation.regions)
             if r == region]
    if not boxes:
        raise SystemExit(f"{args.config}: no validation patients of region {args.region}")
    if boxes[0].shape != tuple(checkpoint.card["volume_shape"]):
        raise SystemExit(f"{args.config} makes boxes of {boxes[0].shape}, {checkpoint.name} draws "
                         f"{tuple(checkpoint.card['volume_shape'])}: not its config?")
    real_hu = [denormalize(b, hu_range) for b in boxes]
    real_bone = [bone_share(b) for b in real_hu]
    real_body = [float(body_mask(b).mean() * 100) for b in real_hu]

    started = time.perf_counter()
    draws = [draw_coarse_layout(checkpoint, predictor, region=region, steps=args.steps,
                                generator=make_generator(seed)) for seed in range(args.seeds)]
    draw_seconds = (time.perf_counter() - started) / args.seeds
    draw_rows = [{"seed": seed, "bone_percent": bone_share(v), "body_percent": float(body_mask(v).mean() * 100)}
                 for seed, v in enumerate(draws)]
    picked = np.linspace(0, len(boxes) - 1, min(args.patients, len(boxes))).round().astype(int)
    partial_rows, last_partial = [], None
    for k in picked:
        for t in sorted(set(args.from_t)):
            steps = max(5, round(args.steps * t / 1000))
            drawn = partial_draw(predictor, checkpoint, boxes[k], t, region=region, steps=steps, seed=10_000 + int(k))
            partial_rows.append({"patient": int(k), "from_t": t, "steps": steps, "bone_percent": bone_share(drawn),
                                 "patient_bone_percent": real_bone[k]})
            last_partial = (k, t, drawn)
        print(partial_rows[-len(set(args.from_t)):], flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    p10, p50, p90 = np.nanpercentile(real_bone, [10, 50, 90])  # NaN: a box without a body
    report = {"command": command, "model": checkpoint.name, "region": args.region,
              "validation_patients": len(boxes), "patients_bone_percent": real_bone,
              "patients_body_percent": real_body,
              "draws": draw_rows, "seconds_per_draw": round(draw_seconds, 1), "partial": partial_rows}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    labels = [f"validation patient {k}: own box" for k in picked[:2]] + [f"draw seed {s}" for s in range(min(4, len(draws)))]
    volumes = [real_hu[k] for k in picked[:2]] + draws[:4]
    if last_partial is not None:
        labels.append(f"validation patient {last_partial[0]}: drawn back from step {last_partial[1]}")
        volumes.append(last_partial[2])
    picture(volumes, labels, out.with_suffix(".png"))

    bones = [r["bone_percent"] for r in draw_rows]
    lines = [f"<!-- PYTHONPATH=. OMP_NUM_THREADS={args.threads} python benchmarks/coarse_prior_draws.py {command} -->", "",
             f"Coarse prior `{checkpoint.name}` ({tuple(checkpoint.card['volume_shape'])} voxels of "
             f"{checkpoint.card.get('voxel_spacing_mm')} mm), region {args.region}. Bone: share of the body "
             f"(above {BODY_HU:g} HU) above {BONE_HU:g} HU.", "",
             f"**{len(boxes)} validation patients' own boxes**: bone {p10:.1f} / {p50:.1f} / {p90:.1f} % "
             "(10th / 50th / 90th percentile), body " + " / ".join(f"{v:.1f}" for v in np.percentile(real_body, [10, 50, 90]))
             + " % of the box.", "",
             f"**Draws from noise** ({args.steps} DDIM steps, {draw_seconds:.1f} s each): "
             f"{np.nanmin(bones):.1f}-{np.nanmax(bones):.1f} % (mean {np.nanmean(bones):.1f}).", "",
             "| seed | bone (%) | body (% of the box) |", "|---:|---:|---:|"]
    lines += [f"| {r['seed']} | {r['bone_percent']:.1f} | {r['body_percent']:.1f} |" for r in draw_rows]
    if partial_rows:
        lines += ["", "**Drawn back from step t** (a validation box noised to t; bone of the result, the patient's "
                  "own in the header):", "",
                  "| patient (own bone %) | " + " | ".join(f"t = {t}" for t in sorted(set(args.from_t))) + " |",
                  "|---|" + "---:|" * len(set(args.from_t))]
        for k in picked:
            row = [r for r in partial_rows if r["patient"] == k]
            lines.append(f"| {int(k)} ({real_bone[k]:.1f}) | " + " | ".join(f"{r['bone_percent']:.1f}" for r in row) + " |")
    lines += ["", f"![draws]({out.with_suffix('.png').name}) (rows: {'; '.join(labels)}; columns: axial, coronal, "
              "sagittal mid-planes, soft tissue then bone window)"]
    print(write_markdown(lines, out.with_suffix(".md")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
