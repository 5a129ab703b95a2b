#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (see scripts/device_prepare.sh, run here first):
# installs the carried wheels, then runs the gpu-marked tests and the task benchmark on CUDA.
# Everything it reports lands in $OUT (the device tool brings it back).
set -uo pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, monai; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'diffusers', diffusers.__version__, 'monai', monai.__version__)" | tee -a "$OUT/gpu.txt"
failed=""
# the gpu tests: every task on CUDA against the CPU, fp32 and auto precision, synthesis, training steps
timeout 300 python3 -m pytest -m gpu -p no:cacheprovider -p no:xvfb -q tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.txt"
rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || failed="$failed gpu-tests(rc $rc)"
# seconds per 512 x 512 slice of every task on the GPU (the sample CT when ../shared is absent there)
timeout 200 python3 benchmarks/bench_tasks.py --device cuda --skip memory --out "$OUT/tasks_cuda.md" 2>&1 | tail -20
rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || failed="$failed benchmark(rc $rc)"
ls -la "$OUT"
# the device tool reports this status: non-zero when either step failed or timed out (124)
if [ -n "$failed" ]; then echo "device check FAILED:$failed"; exit 1; fi
echo "device check passed"
