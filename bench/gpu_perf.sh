#!/usr/bin/env bash
# bench/gpu_perf.sh: the prepared speed check, under 4 minutes of wall time on an H100 /
# H200 with a cold Triton cache.
#
#     OUT=/some/folder bash bench/gpu_perf.sh          (OUT defaults to ./gpu_out)
#
# Run from the repository root on a machine with a CUDA GPU. bench/gpu_perf.py times, in
# one process and at N = M = 65536, D = 128, 1000 classes: our bf16 forward and
# forward+backward with the sm_90 table's configs, the forward, forward+backward and
# soft_knn_predict with the Gluon main passes (the opt-in variant "sm90_gluon"),
# soft_knn_predict, SDPA flash and the
# FlashAttention-2 anchor (bench/sass/anchor_fa2.py), FlexAttention and torch.compile of the
# plain formula (forward, forward+backward), then the other candidate configs of the
# SASS model (its ranking against the GPU's), TF32 (its backward both ways: the sm_90
# transposed variant and the generic kernel), soft_knn_predict with 32-wide class tiles
# (against the default 16), the Gluon loss forward's second form. Each of our variants is
# checked against backend "torch" before it is timed. Files under $OUT: gpu_perf.log,
# perf_env.txt, gpu_perf.json (rewritten after each record: a kill keeps what ran),
# gpu_perf.md (the table, also printed last) and clocks.csv (nvidia-smi's SM and memory
# clocks, power and temperature every 100 ms; each timed record gets the median SM clock
# of its timing, which bench/sass/latency_report.py --perf predicts it at).
# GPU_PERF_TOTAL_S (default 230) bounds it.
set -u
LOG=gpu_perf.log
source "$(dirname "$0")/_gpu_setup.sh"
TOTAL=${GPU_PERF_TOTAL_S:-230}
export PYTHONPATH=$PWD:$PWD/tests
export NBK_TRITON_AUTOTUNE=0
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  git log -1 --format='commit %h %s' 2>/dev/null
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch',
torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__)"; } \
    > "$OUT/perf_env.txt" 2>&1
cat "$OUT/perf_env.txt"
# the GPU's clocks, power and temperature every 100 ms while it runs: each timed record
# gets the median SM clock of its timing window (the model assumes 1.83 GHz)
CLOCK_QUERY=$("$PY" -c "import sys; sys.path.insert(0, 'bench'); import _harness as H; print(H.CLOCK_QUERY)")
$(command -v stdbuf > /dev/null && echo stdbuf -oL) nvidia-smi --query-gpu="$CLOCK_QUERY" --format=csv,noheader,nounits -lms 100 \
    > "$OUT/clocks.csv" 2> "$OUT/clocks.err" &
SAMPLER=$!
# first the latency model's ladder (bench/sass/ladder.py: minimal forms of the loop, from
# the exps alone to the Gluon form, each timed; about 20 s cold), then the speed check in
# the time left: it stops starting steps 15 s before its limit; the timeout is the backstop
timeout -k 5 50 "$PY" bench/sass/ladder.py --time --out "$OUT" --budget-s 35
LEFT=$(( TOTAL - SECONDS > 5 ? TOTAL - SECONDS : 5 ))
timeout -k 5 "$LEFT" "$PY" bench/gpu_perf.py --out "$OUT" --budget-s $(( LEFT - 15 ))
rc=$?
(( rc == 124 || rc == 137 )) && echo "=== gpu_perf.py TIMED OUT after $LEFT s (records kept)"
kill "$SAMPLER" 2> /dev/null
"$PY" -c "import sys; sys.path.insert(0, 'bench'); import _harness as H
for f in ('gpu_perf', 'ladder'):
    print(f, 'records with the clocks of their timing:', H.annotate_clocks(f'$OUT/{f}.json', '$OUT/clocks.csv'))"
"$PY" bench/sass/ladder.py --compare "$OUT/ladder.json" | tee "$OUT/ladder.md"
exit $rc
