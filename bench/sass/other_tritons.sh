#!/usr/bin/env bash
# The compiled-SASS checks of the config table and of the kernel variants under each older
# supported triton (the GPU image runs 3.6; the table and the variants were chosen under
# 3.9), written to bench/results/*_triton<major><minor>.json:
#   table.py --fix          every table entry chosen again there (TABLE_BY_TRITON)
#   tf32_backward.py        the transposed TF32 backward against the generic one
#   class_forward.py --at   the class forward against fa2d95a's (masked loads; 3.6 only)
#   overlap_probe.py        whether the loop's minimal forms overlap the wgmma and the exps
#   ahead_forward.py        the loss forward with and without AHEAD (sm90_fwd_ahead)
#   one_exp_backward.py     the symmetric backward with one and two exp2 per pair
#   ../gluon_fwd.py         the loss forward's Gluon main pass (gluon_lse), each form (FORMS)
#   gluon_class_probe.py    the class forward's Gluon main pass (gluon_class), each self-pair mode
#   ladder.py               the latency model's ladder (minimal forms of the loop gpu_perf.sh times)
# Predicted from compiled SASS, never measured. Installs each triton beside this one:
#   bench/sass/other_tritons.sh [DIR]    (default /tmp/nbk-tritons; about 25 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${1:-/tmp/nbk-tritons}
for v in 3.6.0 3.7.1 3.8.0; do
    tag=$(echo "$v" | cut -d. -f1,2 | tr -d .)
    site="$dir/$v"
    [ -d "$site/triton" ] || python -m pip install -q --no-deps --target "$site" "triton==$v"
    run() { PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" NBK_SASS_CACHE="$dir/sass-$v" "$@"; }
    run python bench/sass/table.py --fix
    run python bench/sass/tf32_backward.py --out "bench/results/tf32_backward_sm90_triton$tag.json"
    run python bench/sass/overlap_probe.py --out "bench/results/overlap_probe_sm90_triton$tag.json"
    run python bench/sass/ahead_forward.py
    run python bench/sass/one_exp_backward.py
    run python bench/gluon_fwd.py
    run python bench/sass/gluon_class_probe.py
    run python bench/sass/ladder.py
    if [ "$tag" = 36 ]; then
        run python bench/sass/class_forward.py --at fa2d95a \
            --out "bench/results/class_forward_sm90_triton$tag.json"
    fi
done
