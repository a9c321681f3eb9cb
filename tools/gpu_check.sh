#!/usr/bin/env bash
# GPU check, on a CUDA machine with gift_quant[gpu] installed (a few minutes, under 10; nothing is downloaded: the
# models are built in-tree). Runs, on device $GPU_CHECK_DEVICE (default cuda):
#   1. the CUDA tests (gptqmodel kernel vs the reference path in fp16 and bf16, GPTQ on the GPU, the fallbacks);
#   2. a tiny recipe end to end with `device: cuda`, its export reloaded in fp16 and bf16 on gptq_cuda
#      (tools/gpu_tiny_recipe.py);
#   3. the kernel check and benchmark (tools/check_gptq_kernel.py, tools/bench_kernel.py) in fp16 and bf16;
#   4. the KD teacher's peak memory, resident vs layer by layer (tools/measure_teacher.py).
# Prints "=== <step>: ok|FAILED" per step and a summary; exits 1 if any step failed (or no GPU / no gptqmodel).
# GPU_CHECK_DEVICE=cpu runs the same steps on the CPU (no gptqmodel needed: step 3's kernel check is skipped), to
# check the script itself on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
STEP_TIMEOUT="${STEP_TIMEOUT:-300}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
failed=()

step() {  # step NAME COMMAND...: run it under a time limit, report, remember failures
    local name=$1 rc
    shift
    echo "=== $name"
    timeout "$STEP_TIMEOUT" "$@"
    rc=$?
    if [ "$rc" -eq 0 ]; then echo "=== $name: ok"; else echo "=== $name: FAILED (exit $rc)"; failed+=("$name"); fi
}

no_skips() {  # pytest that also fails when a test skipped (a CUDA test skipping on a GPU machine is a failure)
    local log rc
    log=$(mktemp)
    "$PY" -m pytest -q -rs -p no:cacheprovider "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ] && grep -q "^SKIPPED" "$log"; then echo "(a test skipped: failure here)"; rc=1; fi
    rm -f "$log"
    return "$rc"
}

if [ "$DEVICE" = cuda ]; then
    "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { echo "gpu_check: FAILED: torch sees no CUDA device"; exit 1; }
    "$PY" -c "import gptqmodel" \
        || { echo "gpu_check: FAILED: gptqmodel does not import (pip install -e '.[gpu]')"; exit 1; }
    "$PY" -c "import torch; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__)"
    step "CUDA tests" no_skips tests/test_gptq_cuda.py tests/test_kernels.py tests/test_gptq.py -k "cuda or weight_device"
else
    step "GPU-path tests (CPU side)" "$PY" -m pytest -q -p no:cacheprovider tests/test_gptq_cuda.py
fi
step "tiny recipe on $DEVICE" "$PY" tools/gpu_tiny_recipe.py --device "$DEVICE"
for dtype in float16 bfloat16; do
    if [ "$DEVICE" = cuda ]; then
        step "kernel check $dtype" "$PY" tools/check_gptq_kernel.py --device cuda --dtype "$dtype"
        step "kernel benchmark $dtype" "$PY" tools/bench_kernel.py --device cuda --dtype "$dtype"
    else
        step "kernel benchmark $dtype" "$PY" tools/bench_kernel.py --device cpu --dtype "$dtype" \
            --shapes 512x512 --rows 1,128 --repeats 3
    fi
done
# the KD teacher's top-k pass, resident vs layer by layer: CUDA's max allocated against the estimate (docs/scaling.md)
step "kd teacher memory on $DEVICE" "$PY" tools/measure_teacher.py --device "$DEVICE"

if [ "${#failed[@]}" -eq 0 ]; then
    echo "gpu_check ($DEVICE): all steps ok"
else
    echo "gpu_check ($DEVICE): FAILED: ${failed[*]}"
    exit 1
fi
