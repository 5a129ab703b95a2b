"""CPU seconds per network evaluation and peak memory of the bundled CT prior.

    python benchmarks/bench_prior.py [--model ct-prior-demo] [--out docs/benchmarks/prior.md]

Each configuration (slice size x batch size) runs in a fresh process so its
peak resident memory (ru_maxrss) is its own. Timings are the median of
``--repeats`` evaluations after one warm-up, with torch's default threads
(2 on the reference machine).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, statistics
import torch
from napari_mediffuse.engine.registry import load
from napari_mediffuse.engine.inference import NoisePredictor
size, batch, repeats, model = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ckpt = load(model)
pred = NoisePredictor(ckpt.network, device="cpu", schedule=ckpt.schedule)
x = torch.randn(batch, 1, size, size)
pred(x, 500)
times = []
for _ in range(repeats):
    t = time.perf_counter(); pred(x, 500); times.append(time.perf_counter() - t)
print(json.dumps({"size": size, "batch": batch, "seconds_per_eval": statistics.median(times),
                  "seconds_per_slice": statistics.median(times) / batch,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "threads": torch.get_num_threads()}))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ct-prior-demo")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="write a Markdown table (and .json beside it)")
    args = parser.parse_args(argv)
    rows = []
    for size in args.sizes:
        for batch in args.batches:
            result = subprocess.run([sys.executable, "-c", CHILD, str(size), str(batch), str(args.repeats), args.model],
                                    capture_output=True, text=True, check=True)
            row = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            f"Measured with `python benchmarks/bench_prior.py --model {args.model}` on "
            f"{platform.processor() or platform.machine()}, {rows[0]['threads']} torch threads, torch CPU build.",
            "",
            "| slice (px) | batch | s / evaluation | s / slice | peak RSS (MB) |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {r['size']}x{r['size']} | {r['batch']} | {r['seconds_per_eval']:.3f} | "
                  f"{r['seconds_per_slice']:.3f} | {r['peak_rss_mb']:.0f} |" for r in rows]
        out.write_text("\n".join(lines) + "\n")
        out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
