#!/usr/bin/env bash
# bench/gpu_check.sh: the prepared GPU check, 6.5 minutes of wall time on an H100 / H200
# with a cold Triton cache.
#
#     OUT=/some/folder bash bench/gpu_check.sh          (OUT defaults to ./gpu_out)
#
# Run from the repository root on a machine with a CUDA GPU and no internet; wheels in
# .whl/ (bench/README.md, "Wheels for the GPU machine") are installed first. The stages
# run in order of value, each under its own time limit (seconds; a stage gets at most
# what is left of GPU_CHECK_TOTAL_S, default 390):
#
#   stage        limit  what
#   env             20  GPU, driver, versions
#   diagnose        90  bench/gpu_diagnose.py: the inputs that failed on the H200, worst
#                       rows with every kernel intermediate, triton vs torch vs fp64
#   correctness     75  backend "triton" on CUDA, one config per kernel: the low-T rows
#                       (tests/triton/test_triton_lowtemp.py), the conformance oracle
#                       cases, NaN / determinism
#   configs         45  every GPU tile config on a few cases (fp32, bf16; D = 128)
#   gluon           90  the Gluon main passes of the loss and class forwards (opt-in
#                       variant "sm90_gluon", tests/triton/test_gluon_main.py)
#   speed           60  N = M = 65536, D = 128: nca_loss and soft_knn_predict against
#                       FlexAttention, torch.compile and SDPA flash (bench/bench_gpu.py,
#                       NBK_GPU_CASES=target)
#   rest               the time left, in this order: the first call (bench/first_call.py:
#                       cold and warm cache, steady step), the CUDA backend (build,
#                       tests/cuda), the rest of tests/triton, the nightly numerics,
#                       determinism
#
# Every test's outcome is appended to $OUT/tests.jsonl as it happens (tests/outcome_log.py)
# and every benchmark record to $OUT/gpu_<gpu>.json, so a kill keeps all results up to it.
# Files under $OUT: gpu_check.log tests.jsonl gpu_diagnose.json gpu_<gpu>.json
# first_call.json determinism.json table.md. Exit status: 0 if every stage that ran passed, else 1.
set -u
LOG=gpu_check.log
source "$(dirname "$0")/_gpu_setup.sh"
TOTAL=${GPU_CHECK_TOTAL_S:-390}
T0=$(date +%s)
export NBK_TEST_LOG=$OUT/tests.jsonl
FAILED=()

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( TOTAL - $(elapsed) )); }

# stage NAME CAP_S COMMAND...: run COMMAND under timeout min(CAP_S, time left - 5 s).
stage() {
    local name=$1 cap=$2; shift 2
    local limit=$(( $(left) - 5 )); (( limit > cap )) && limit=$cap
    if (( limit < 5 )); then
        echo "=== [$(elapsed) s] stage $name: SKIPPED, no time left"; FAILED+=("$name(no time)"); return
    fi
    echo "=== [$(elapsed) s] stage $name (limit ${limit} s): $*"
    timeout -k 5 "$limit" "$@"
    local rc=$?
    (( rc == 124 || rc == 137 )) && echo "=== stage $name: TIMED OUT after ${limit} s"
    echo "=== [$(elapsed) s] stage $name: rc=$rc"
    (( rc != 0 )) && FAILED+=("$name(rc=$rc)")
}

export PYTHONPATH=$PWD:$PWD/tests
if compgen -G ".whl/*.whl" > /dev/null; then
    stage wheels 40 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD:$PWD/tests
fi

stage env 20 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
    --format=csv; git log -1 --format='commit %h %s' 2>/dev/null; $PY -c \"
import sys, torch, triton, numpy
print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| triton', triton.__version__, '| numpy', numpy.__version__)
print('gpu', torch.cuda.get_device_name(), torch.cuda.get_device_capability())\""

# one fixed config per kernel (no autotuning); pytest-xdist if present
export NBK_TEST_DEVICE=cuda NBK_TRITON_AUTOTUNE=0
XDIST=(); "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -p outcome_log -rfE --maxfail=50)

stage diagnose 90 "$PY" bench/gpu_diagnose.py --out "$OUT"

stage correctness 75 "${PYTEST[@]}" "${XDIST[@]}" tests/triton/test_triton_lowtemp.py \
    tests/triton/test_conformance_triton.py tests/triton/test_triton_numerics.py \
    -k "lowtemp or test_matches_oracle or nan or deterministic or extreme"

stage configs 45 "${PYTEST[@]}" "${XDIST[@]}" tests/triton/test_triton_configs.py \
    -k "every_gpu_config and 128 and not float16"

# the Gluon main passes (opt-in variant "sm90_gluon"; no CPU check runs them)
stage gluon 90 "${PYTEST[@]}" "${XDIST[@]}" tests/triton/test_gluon_main.py

unset NBK_TEST_DEVICE NBK_TRITON_AUTOTUNE
BENCH_LIMIT=$(( $(left) - 10 )); (( BENCH_LIMIT > 75 )) && BENCH_LIMIT=75
export NBK_BENCH_RESULTS=$OUT NBK_BENCH_DEADLINE=$(( $(date +%s) + BENCH_LIMIT - 15 ))
stage speed 60 env NBK_GPU_CASES=target "$PY" -m pytest bench/bench_gpu.py -q -p no:cacheprovider

# --- the rest, while time remains ----------------------------------------------------------
# the first training step: cold and warm Triton cache, new processes, and the steady step
stage first-call 60 "$PY" bench/first_call.py --out "$OUT"
export NBK_TEST_DEVICE=cuda NBK_TRITON_AUTOTUNE=0
if [ -f setup.py ] && grep -q "CUDAExtension" setup.py; then
    ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" \
        2>/dev/null || echo "9.0")
    stage csrc-build 60 env FORCE_CUDA=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="$ARCH" \
        "$PY" setup.py build_ext --inplace
    stage tests-cuda 45 "${PYTEST[@]}" tests/cuda
fi
stage tests-triton-rest 120 "${PYTEST[@]}" "${XDIST[@]}" tests/triton \
    -k "not (lowtemp or test_matches_oracle or every_gpu_config or gluon_main)"
stage nightly 120 env NBK_NIGHTLY=1 "${PYTEST[@]}" tests/triton/test_triton_lowtemp.py -m nightly
unset NBK_TEST_DEVICE NBK_TRITON_AUTOTUNE
stage determinism 30 "$PY" bench/check_determinism.py --device cuda --n 8192 \
    --out "$OUT/determinism.json"
stage report 15 bash -c "$PY bench/report.py --results '$OUT' --print > '$OUT/table.md'"

echo "=== [$(elapsed) s] done. files in $OUT:"; ls -la "$OUT"
if (( ${#FAILED[@]} )); then echo "=== FAILED stages: ${FAILED[*]}"; exit 1; fi
echo "=== all stages passed"
