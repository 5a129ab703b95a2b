#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call (docs/benchmarks/gpu.md):
#   1. the gpu-marked tests (every task on cuda against the CPU, synthesis, training steps);
#   2. the task benchmark on cuda (seconds per 512 x 512 slice, peak GPU memory);
#   3. optionally, a training run from a pack (python -m training pack) for what is left of the budget.
#
#   bash benchmarks/gpu_session.sh OUT SECONDS [CT_SLAB] [CONFIG PACK]
#
# OUT: folder for the results; SECONDS: the whole call's budget (the training
# gets what the tests and the benchmark leave, less a minute for its export);
# CT_SLAB: the benchmark's CT where ../shared/data is absent. The machine has
# no package registry: wheels of the missing packages travel in .whl/ and are
# installed into /tmp/site first.
set -u
out=${1:?OUT folder}
budget=${2:?budget in seconds}
ct=${3:-}
config=${4:-}
pack=${5:-}
start=$SECONDS
mkdir -p "$out"
exec > >(tee "$out/session.txt") 2>&1

if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

echo "== gpu tests ($((SECONDS - start)) s)"
timeout 200 python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider -o addopts="-ra" \
    --junitxml="$out/gpu_tests.xml"

echo "== task benchmark on cuda ($((SECONDS - start)) s)"
bench_args=(--device cuda --skip memory --tasks denoise sr anomaly inpaint translate --out "$out/tasks_cuda.md")
[ -n "$ct" ] && bench_args+=(--ct "$ct")
timeout 240 python3 benchmarks/bench_tasks.py "${bench_args[@]}"

if [ -n "$config" ]; then
    left=$((budget - (SECONDS - start) - 75))
    if [ "$left" -lt 60 ]; then
        echo "== no time left to train ($left s)"
    else
        echo "== training $config for $left s ($((SECONDS - start)) s)"
        minutes=$(python3 -c "print($left / 60)")
        timeout $((left + 45)) python3 -m training train --config "$config" --packed "$pack" \
            --output /tmp/run --device cuda --max-minutes "$minutes"
        python3 -m training export /tmp/run --output /tmp/export/model --fp16 --skip-evaluation \
            && cp /tmp/run/log.jsonl /tmp/run/config.yaml /tmp/export/ \
            && tar czf "$out/trained.tgz" -C /tmp/export .
    fi
fi
echo "== done ($((SECONDS - start)) s)"
