"""Seconds per 512 x 512 slice and peak memory of every task, on whatever device is there.

    python benchmarks/bench_tasks.py [--device auto] [--slices 300] [--time-slices 2]
                                     [--out docs/benchmarks/tasks.md]

The test CT is 512 x 512 pixels: the real chest CT of ../shared/data
(chest_ct_lidc0314_1mm, 0.78 mm, padded with air from 399 to 512 rows, its
275 slices mirrored to ``--slices``), or the bundled sample CT resampled to
that grid when the shared data is absent.

Each measurement runs in a fresh process, so ``ru_maxrss`` is its own:

* **time**: the task on ``--time-slices`` slices of the volume (super-resolution:
  ``2 x`` that many thick slices, factor 2), with the bundled demo models and
  the task's defaults, on ``--device``; seconds per 512 x 512 input slice,
  after one warm-up call of the network. The peak memory of that run is the
  network's working memory on real slices (a batch of ``--batch-size``, default 4).
* **memory**: the task on the whole ``512 x 512 x --slices`` volume with the
  network on PyTorch's ``meta`` device (shapes, no arithmetic), so everything
  the task holds besides the network's activations (the volume, its
  normalised copy, the output, resampled grids, masks) is measured at full
  size in seconds. The table's estimate of a full CPU run adds the two:
  full-volume host peak + (time run's peak - the process's peak before the task).

BM3D (the denoising baseline) is timed on the same slices for the issue's
comparison: diffusion denoising per slice should be no slower than BM3D.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHEST = REPO.parent / "shared" / "data" / "ct" / "chest_ct_lidc0314_1mm.nii.gz"

TASKS = ("denoise", "denoise-bm3d", "sr", "sr-cubic", "anomaly", "inpaint", "translate")
#: BM3D has no network: its full-volume run would be real work (minutes per slice on 2 cores)
NO_MEMORY_RUN = ("denoise-bm3d",)

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np
import torch
from napari_mediffuse import io
from napari_mediffuse.io.volume import Volume
from napari_mediffuse.engine.devices import describe_device, select_device
from napari_mediffuse.tasks import anomaly, denoise, inpaint, superres, translate
from napari_mediffuse.tasks.common import RunOptions

task, mode, device, n_slices, time_slices, chest, fallback, batch = sys.argv[1:9]
n_slices, time_slices = int(n_slices), int(time_slices)

def clinical_ct(n):
    # a 512 x 512 x n CT in HU, 0.78 mm pixels, 1 mm slices
    try:
        ct, = io.read(chest)
    except Exception:
        if fallback != "1":  # a CT named with --ct must be the one measured
            raise
        from napari_mediffuse.plugin import sample_ct_path
        from scipy import ndimage
        ct, = io.read(sample_ct_path())
        data = ndimage.zoom(ct.data.astype(np.float32), (1, 512 / ct.data.shape[1], 512 / ct.data.shape[2]), order=1)
        ct = Volume(data=data.astype(np.int16), affine=np.diag([3.0, 0.78, 0.78, 1]), modality="CT", name="sample")
    data = np.full((ct.data.shape[0], 512, 512), -1000, dtype=np.int16)
    rows, cols = min(512, ct.data.shape[1]), min(512, ct.data.shape[2])
    data[:, :rows, :cols] = ct.data[:, :rows, :cols]
    reps = -(-n // data.shape[0])
    data = np.concatenate([data if k % 2 == 0 else data[::-1] for k in range(reps)])[:n]
    return Volume(data=np.ascontiguousarray(data), affine=np.diag([1.0, 0.78125, 0.78125, 1.0]), modality="CT",
                  name=f"bench CT from {Path(ct.source).name if ct.source else ct.name}")

if mode == "time":
    start_slice = 60
    n = 2 * time_slices if task.startswith("sr") else time_slices
    full = clinical_ct(start_slice + n)
    volume = full.slab(start_slice, start_slice + n)
    options = RunOptions(device=device, batch_size=int(batch), seed=0)
    dev = select_device(device)
else:
    volume = clinical_ct(n_slices)
    options = RunOptions(device=torch.device("meta"), batch_size=int(batch), seed=0)
    dev = torch.device("meta")
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
mask = np.zeros(volume.data.shape, bool)
mask[:, 240:270, 300:330] = True

def run():
    if task == "denoise":
        return denoise.denoise(volume, options=options)
    if task == "denoise-bm3d":
        return denoise.denoise(volume, method="bm3d", options=options)
    if task == "sr":  # DiffPIR, as measured before method 'auto' (session 17) could pick the learned model
        return superres.super_resolve(volume, factor=2, method="diffusion", options=options)
    if task == "sr-cubic":
        return superres.super_resolve(volume, factor=2, method="cubic", options=options)
    if task == "anomaly":
        return anomaly.detect_anomalies(volume, options=options)
    if task == "inpaint":
        return inpaint.inpaint(volume, mask, options=options)
    if task == "translate":
        return translate.translate(volume, direction="ct2mr", options=options)
    raise SystemExit(f"unknown task {task}")

if mode == "time" and task not in ("denoise-bm3d", "sr-cubic"):
    # one warm-up call of the task on the first slice(s): model load and allocator
    warm = volume.slab(0, 2)  # the tasks need a volume: two slices
    volume, keep = warm, volume
    run()
    volume = keep
t0 = time.perf_counter()
run()
seconds = time.perf_counter() - t0
print(json.dumps({"task": task, "mode": mode, "slices": int(volume.data.shape[0]),
                  "seconds": seconds, "seconds_per_slice": seconds / volume.data.shape[0],
                  "rss_before_mb": rss_before,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "ct": volume.name,
                  "gpu_peak_mb": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
                  "device": describe_device(dev) if dev.type != "meta" else "meta"}))
"""


def measure(task: str, mode: str, args) -> dict:
    cmd = [sys.executable, "-c", CHILD, task, mode, args.device, str(args.slices), str(args.time_slices),
           str(args.ct), "1" if args.ct == str(CHEST) else "0", str(args.batch_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"task": task, "mode": mode, "error": " | ".join(tail)}
    return json.loads(lines[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--ct", default=str(CHEST),
                        help="the test CT (default: the 1 mm chest CT of ../shared/data, or the sample CT where "
                             "that folder is absent; on a lent GPU machine the slab device_prepare.sh cuts)")
    parser.add_argument("--slices", type=int, default=300, help="slices of the memory run's volume")
    parser.add_argument("--time-slices", type=int, default=2, help="slices of the timing run (at least 2)")
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=TASKS)
    parser.add_argument("--out", default=None, help="Markdown table (and .json beside it)")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="slices (super-resolution: planes) a network call takes (default %(default)s)")
    parser.add_argument("--skip", choices=["time", "memory"], help="leave out one of the two measurements")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.time_slices < 2:
        parser.error("--time-slices must be at least 2 (the tasks need a volume)")

    rows = []
    for task in args.tasks:
        timed = measure(task, "time", args) if args.skip != "time" else {"error": "not run"}
        memory = (measure(task, "memory", args) if task not in NO_MEMORY_RUN and args.skip != "memory"
                  else {"error": "not run"})
        row = {"task": task, "time": timed, "memory": memory}
        if "error" not in timed and "error" not in memory:
            row["estimated_full_run_peak_mb"] = memory["peak_rss_mb"] + timed["peak_rss_mb"] - timed["rss_before_mb"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    device = next((r["time"].get("device") for r in rows if "device" in r["time"]), args.device)
    command = "python benchmarks/bench_tasks.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Task benchmark: seconds per 512 x 512 slice and peak memory",
        "",
        f"`{command.strip()}` on {device}; {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}. Bundled demo models, task defaults, batch {args.batch_size}.",
        "",
        f"| task | s / slice ({device}) | peak RSS, {args.time_slices}-slice run (MB) | "
        f"peak RSS, 512x512x{args.slices} with the network on meta (MB) | estimated full CPU run (MB) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        t, m = r["time"], r["memory"]
        cells = [r["task"],
                 f"{t['seconds_per_slice']:.2f}" if "error" not in t else f"error: {t['error']}",
                 f"{t['peak_rss_mb']:.0f}" if "error" not in t else "",
                 f"{m['peak_rss_mb']:.0f}" if "error" not in m else f"error: {m['error']}",
                 f"{r['estimated_full_run_peak_mb']:.0f}" if "estimated_full_run_peak_mb" in r else ""]
        lines.append("| " + " | ".join(cells) + " |")
    gpu = [f"{r['task']} {r['time']['gpu_peak_mb']:.0f}" for r in rows if r["time"].get("gpu_peak_mb")]
    if gpu:
        lines += ["", "Peak GPU memory allocated by PyTorch in the timing run (MB): " + ", ".join(gpu) + "."]
    lines += ["", "Super-resolution times are per thick input slice (factor 2). The estimate adds the "
              "full-volume host peak and the network's working memory of the timing run (see the script's "
              "docstring)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps({"command": command, "device": device, "rows": rows},
                                                       indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
