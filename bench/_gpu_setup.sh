# Sourced by bench/gpu_check.sh and bench/gpu_perf.sh (after setting LOG, the log's file
# name): run from the repository root, results and the log under $OUT (default ./gpu_out),
# the Python of $PYTHON (default python3), unbuffered.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/$LOG") 2>&1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
