"""How much of a lesion a lesion-healing model removes, on training and on held-out patients.

    PYTHONPATH=. python benchmarks/healing_removal.py MODEL [--config training/configs/ct_heal_multi.yaml]
                                         [--slices 12] [--seed 0] [--out docs/evaluation/healing_removal.md]

For ``--slices`` axial slices of the config's training patients and as many
of its validation patients, synthetic lesions of the training kind
(:func:`training.healing.corrupt`, the config's ``data.lesions``) are pasted
in and the model's healthy version (the anomaly task's learned path,
:func:`napari_mediffuse.tasks.common.learned_slices`) is compared with the
truth:

* **contrast removed**: 1 - sum(w |healed - truth|) / sum(w |with lesions - truth|)
  over the lesions' soft mask w (1 = every lesion gone, 0 = left as it was);
* **healthy change**: mean |healed - truth| (HU) on body pixels away from any lesion.

A model that removes its lesions on training patients and not on held-out
ones has learnt the patients, not the lesions.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from napari_mediffuse.engine.intensity import denormalize
from napari_mediffuse.io.volume import Volume
from napari_mediffuse.tasks.anomaly import HEALING_TASK
from napari_mediffuse.tasks.common import RunOptions, learned_slices
from training.data import load_volumes
from training.healing import body_mask, corrupt
from training.report import write_report
from training.trainer import load_config


def pick_slices(volumes, count: int, window, rng: np.random.Generator):
    """``count`` (volume, axial index) pairs whose slice is at least 10 % body, volumes drawn in turn."""
    picks = []
    order = rng.permutation(len(volumes))
    for k in range(count * 20):
        vol = volumes[order[k % len(order)]]
        index = int(rng.integers(vol.data.shape[0]))
        if body_mask(denormalize(vol.data[index], window)).mean() >= 0.1:
            picks.append((vol, index))
        if len(picks) == count:
            break
    return picks


def measure(model, volumes, count: int, lesions: dict, window, rng: np.random.Generator) -> list[dict]:
    rows = []
    for vol, index in pick_slices(volumes, count, window, rng):
        truth = denormalize(vol.data[index], window).astype(np.float32)
        body = body_mask(truth)
        corrupted, weight = corrupt(truth, vol.spacing_mm[1:], rng, body=body, **lesions)
        affine = np.diag([*vol.spacing_mm, 1.0])
        volume = Volume(data=corrupted[None], affine=affine, modality="CT", name=vol.patient)
        healed, _, _ = learned_slices(volume, volume.data, task=HEALING_TASK, label="healing benchmark",
                                      model=model, options=RunOptions(device="cpu", seed=int(index)),
                                      region=None)
        healed = healed[0]
        before = float((weight * np.abs(corrupted - truth)).sum())
        after = float((weight * np.abs(healed - truth)).sum())
        healthy = body & (weight < 1e-3)
        rows.append({"patient": vol.patient, "slice": index, "pixel_mm": float(vol.spacing_mm[1]),
                     "contrast_removed": 1.0 - after / before if before > 0 else float("nan"),
                     "healthy_change_hu": float(np.abs(healed - truth)[healthy].mean())})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="lesion-healing checkpoint folder or name")
    parser.add_argument("--config", default="training/configs/ct_heal_multi.yaml",
                        help="its training config: the patients and the lesions")
    parser.add_argument("--slices", type=int, default=12, help="slices per split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="Markdown table (and .json beside it)")
    args = parser.parse_args(argv)

    config = load_config(args.config)
    window = (config["normalization"]["low"], config["normalization"]["high"])
    lesions = dict(config["data"].get("lesions") or {})
    results = {}
    for split in ("train", "validation"):
        volumes = load_volumes(config["data"], config["normalization"], split=split)
        rows = measure(args.model, volumes, args.slices, lesions, window, np.random.default_rng(args.seed))
        results[split] = rows
        removed = np.nanmean([r["contrast_removed"] for r in rows])
        change = np.mean([r["healthy_change_hu"] for r in rows])
        print(f"{split}: {len(rows)} slices, contrast removed {removed:.3f}, healthy change {change:.1f} HU",
              flush=True)

    command = "PYTHONPATH=. python benchmarks/healing_removal.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"<!-- {command} -->", "",
             f"Lesion-healing model `{args.model}`; lesions of the training kind (`{args.config}`'s "
             "data.lesions) pasted into axial slices; mean over the slices.", "",
             "| patients | slices | contrast removed | healthy change (HU) |", "|---|---:|---:|---:|"]
    for split, rows in results.items():
        lines.append(f"| {split} | {len(rows)} | {np.nanmean([r['contrast_removed'] for r in rows]):.3f} | "
                     f"{np.mean([r['healthy_change_hu'] for r in rows]):.1f} |")
    print(write_report(lines, args.out, {"command": command, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
