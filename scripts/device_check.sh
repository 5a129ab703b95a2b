#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (see scripts/device_prepare.sh, run here first):
# installs the carried wheels, runs the gpu-marked tests and the task benchmark on CUDA and,
# given a config and a pack (python -m training pack), trains from the pack for what is left of
# BUDGET_S (less 75 s for the export). Everything it reports lands in $OUT (the device tool brings
# it back: at most 8 files, 16 MiB each, so the trained model comes back as one trained.tgz).
#
#   bash scripts/device_check.sh [BUDGET_S CONFIG PACK]
#   DEVICE_TRAIN_ONLY=1 bash scripts/device_check.sh BUDGET_S CONFIG PACK   # no tests, no benchmark
set -uo pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
budget=${1:-520}
config=${2:-}
pack=${3:-}
start=$SECONDS
if [ "${DEVICE_TRAIN_ONLY:-0}" = 1 ] && [ -z "$config" ]; then echo "DEVICE_TRAIN_ONLY=1 needs CONFIG and PACK"; exit 2; fi
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, monai; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'diffusers', diffusers.__version__, 'monai', monai.__version__)" | tee -a "$OUT/gpu.txt"
failed=""
if [ "${DEVICE_TRAIN_ONLY:-0}" != 1 ]; then
# the gpu tests: every task on CUDA against the CPU, fp32 and auto precision, synthesis, training steps
timeout 300 python3 -m pytest -m gpu -p no:cacheprovider -p no:xvfb -q --junitxml="$OUT/gpu_tests.xml" \
    tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.txt"
rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || failed="$failed gpu-tests(rc $rc)"
# seconds per 512 x 512 slice of every task on the GPU: on a slab of the 1 mm chest CT that
# device_prepare.sh cut (../shared does not travel), else on the sample CT resampled to 512 x 512
ct_args=()
[ -f .gpu/chest_slab.nii.gz ] && ct_args=(--ct .gpu/chest_slab.nii.gz)
timeout 240 python3 benchmarks/bench_tasks.py --device cuda --skip memory \
    --tasks denoise sr anomaly inpaint translate "${ct_args[@]}" --out "$OUT/tasks_cuda.md" 2>&1 | tail -20
rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || failed="$failed benchmark(rc $rc)"
fi
if [ -n "$config" ]; then
    left=$((budget - (SECONDS - start) - 75))
    if [ "$left" -lt 60 ]; then
        echo "no time left to train ($left s)"; failed="$failed training(no time)"
    else
        echo "training $config from $pack for $left s"
        minutes=$(python3 -c "print($left / 60)")
        timeout $((left + 45)) python3 -m training train --config "$config" --packed "$pack" \
            --output /tmp/run --device cuda --max-minutes "$minutes" 2>&1 | tail -30
        rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || failed="$failed training(rc $rc)"
        # what it saved is exported even after a failure or a timeout (the last checkpoint's EMA)
        if python3 -m training export /tmp/run --output /tmp/export/model --fp16 --skip-evaluation; then
            cp /tmp/run/log.jsonl /tmp/run/config.yaml /tmp/export/ && tar czf "$OUT/trained.tgz" -C /tmp/export .
        else
            failed="$failed training"
        fi
    fi
fi
ls -la "$OUT"
echo "device check took $((SECONDS - start)) s"
# the device tool reports this status: non-zero when a step failed or timed out (124)
if [ -n "$failed" ]; then echo "device check FAILED:$failed"; exit 1; fi
echo "device check passed"
