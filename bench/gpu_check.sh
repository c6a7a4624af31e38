#!/usr/bin/env bash
# bench/gpu_check.sh: the one prepared GPU check of issue 3, about 6 minutes on an H100/H200.
#
# Run from the repository root on a machine with a CUDA GPU and no internet:
#     OUT=/some/folder bash bench/gpu_check.sh        (OUT defaults to ./gpu_out)
# Wheels in .whl/ (see bench/README.md, "Wheels for the GPU machine") are installed first.
# Stages, each under its own `timeout` so that a hang costs only that stage:
#     wheels -> env -> csrc build (the CUDA extension, this card's arch only)
#     -> tests/triton on cuda -> tests/cuda (backend "cuda") -> other tests that read
#     NBK_TEST_DEVICE -> determinism -> benchmarks (bench/bench_gpu.py, stopped by a
#     deadline) -> markdown table
# Writes at most 8 files, all directly under $OUT:
#     gpu_check.log  junit_triton.xml  junit_cuda.xml  junit_main.xml  determinism.json
#     gpu_<gpu name>.json  table.md  (and gpu_<gpu name>.json.tmp only if killed mid-write)
# Knobs: GPU_CHECK_TOTAL_S (default 360), GPU_CHECK_QUICK=1 (small benchmark sizes), PYTHON.
# Exit status: 0 if every stage that ran passed, else 1.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
PY=${PYTHON:-python3}
TOTAL=${GPU_CHECK_TOTAL_S:-420}
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
FAILED=()

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( TOTAL - $(elapsed) )); }

# stage NAME CAP_S COMMAND...: run COMMAND under timeout min(CAP_S, time left - 10 s).
stage() {
    local name=$1 cap=$2; shift 2
    local limit=$(( $(left) - 10 )); (( limit > cap )) && limit=$cap
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

# --- wheels: packages missing on the GPU machine (pytorch-metric-learning, pykeops) --------
export PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" > /dev/null; then
    stage wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    echo "=== stage wheels: none in .whl/ (pytorch-metric-learning and pykeops may be missing)"
fi

# --- env -----------------------------------------------------------------------------------
stage env 30 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
    --format=csv; $PY - <<'EOF'
import sys, torch
print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda)
print('gpu', torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))
for mod in ('triton', 'nbkernels', 'pytorch_metric_learning', 'pykeops'):
    try:
        m = __import__(mod); print(mod, getattr(m, '__version__', '?'), m.__file__)
    except Exception as e:
        print(mod, 'NOT importable:', type(e).__name__, e)
EOF"

# --- csrc: the CUDA extension nbkernels/_C*.so, in place, for this card's arch only --------
# (ninja builds the binding and the kernel files in parallel; the longest, the backward,
# took ~35 s single-threaded at -O3 for one arch on a CPU-only machine)
if [ -f setup.py ] && grep -q "CUDAExtension" setup.py; then
    ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" \
        2>/dev/null || echo "9.0")
    stage csrc-build 150 env FORCE_CUDA=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="$ARCH" \
        "$PY" setup.py build_ext --inplace
else
    echo "=== stage csrc-build: SKIPPED, setup.py has no CUDA extension (backend 'cuda' not built)"
fi

# --- tests on the GPU: the Triton kernel suite, every dtype, bf16 included -----------------
# one fixed Triton config (no autotuning); tests/triton/test_triton_configs.py runs each tuned one
export NBK_TEST_DEVICE=cuda NBK_TRITON_AUTOTUNE=0
XDIST=(); "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
if [ -d tests/triton ]; then
    stage tests-triton 150 "$PY" -m pytest tests/triton -q -p no:cacheprovider --maxfail=20 "${XDIST[@]}" \
        --junitxml="$OUT/junit_triton.xml"
else
    echo "=== stage tests-triton: SKIPPED, no tests/triton folder"
fi
# The CUDA C++ backend against the reference and the Triton backend, every dtype.
if [ -d tests/cuda ]; then
    stage tests-cuda 90 "$PY" -m pytest tests/cuda -q -p no:cacheprovider --maxfail=20 \
        --junitxml="$OUT/junit_cuda.xml"
else
    echo "=== stage tests-cuda: SKIPPED, no tests/cuda folder"
fi
# Other test files that honour NBK_TEST_DEVICE (the CPU suite proper runs in CI, not here).
MAIN_TESTS=$(grep -l NBK_TEST_DEVICE tests/*.py 2>/dev/null | grep -v conftest.py | tr '\n' ' ')
if [ -n "$MAIN_TESTS" ]; then
    stage tests-main 45 "$PY" -m pytest $MAIN_TESTS -q -p no:cacheprovider --maxfail=20 \
        --junitxml="$OUT/junit_main.xml"
else
    echo "=== stage tests-main: SKIPPED, no file in tests/ reads NBK_TEST_DEVICE"
fi
unset NBK_TEST_DEVICE NBK_TRITON_AUTOTUNE   # the benchmarks autotune

# --- determinism: bitwise-equal outputs and gradients over repeated runs -------------------
stage determinism 40 "$PY" bench/check_determinism.py --device cuda --n 8192 \
    --out "$OUT/determinism.json"

# --- benchmarks: stop starting new cases 25 s before the stage limit ----------------------
BENCH_LIMIT=$(( $(left) - 25 )); (( BENCH_LIMIT > 200 )) && BENCH_LIMIT=200
export NBK_BENCH_RESULTS=$OUT NBK_BENCH_DEADLINE=$(( $(date +%s) + BENCH_LIMIT - 25 ))
QUICK=(); [ "${GPU_CHECK_QUICK:-0}" != 0 ] && QUICK=(--quick)
stage bench 200 "$PY" -m pytest bench/bench_gpu.py -q "${QUICK[@]}"
# streamed bank (issue 5): 4M x 128 fp32 bank in pinned host memory, streamed vs on device
stage bench-bank 60 "$PY" -m pytest bench/bench_bank.py -q -k gpu "${QUICK[@]}"

# --- the markdown table, generated from the JSON just written -----------------------------
stage report 15 bash -c "$PY bench/report.py --results '$OUT' --print > '$OUT/table.md'"

echo "=== [$(elapsed) s] done. files in $OUT:"; ls -la "$OUT"
if (( ${#FAILED[@]} )); then echo "=== FAILED stages: ${FAILED[*]}"; exit 1; fi
echo "=== all stages passed"
