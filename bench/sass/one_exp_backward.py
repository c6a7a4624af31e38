"""The batch loss's symmetric backward with one and with two exp2 per pair (flag ONE_EXP,
``neighbor_bwd_kernel``; the launcher runs the first where ``rows.one_exp_rows`` allows
it), compiled for sm_90 by the running triton: for each GPU backward config (bf16 and
fp32 as TF32, D = 128, squared distances, the variant an sm_90 launches), the registers,
the stack, MUFU.EX2 per pair, the main loop's warp instructions, and the latency model's
cycles per tile and time at N = M = 65536.

    python bench/sass/one_exp_backward.py [--out FILE]   # default: bench/results/
                                                         # one_exp_backward_sm90_triton<ver>.json

Run it under another triton by putting that one first on PYTHONPATH
(``bench/sass/other_tritons.sh``). *Predicted from compiled SASS*, never measured.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.sass import build, latency, report, sass  # noqa: E402

N = M = 65536


def measure(v, one_exp):
    # the two-exp kernel scales ds for fp16 only
    vals = dict(v.values, ONE_EXP=one_exp, SCALE_DS=one_exp or v.dtype == "fp16")
    c = build.compile_triton(v.fn, vals, v.num_warps, v.num_stages, f"{v.name}_one{int(one_exp)}")
    sim = latency.simulate_cubin(c.cubin, c.name, c.shared, v.num_warps)
    mix = sass.loop_mix(sim.func, v.num_warps, v.block_m * v.block_n, v.inner_trips)
    pred = latency.predict(sim.cycles_per_iter, -(-M // v.block_n), -(-N // v.block_m),
                           sim.ctas_per_sm, N * M * v.flop_per_pair)
    return dict(variant=v.name, config=[v.block_m, v.block_n, v.num_warps, v.num_stages],
                dtype=v.dtype, one_exp=one_exp, regs=sim.regs,
                stack=sass.resource_usage(c.cubin)[c.name]["stack"],
                ctas_per_sm=sim.ctas_per_sm, mufu_ex2_per_pair=mix.per_pair.get("mufu_ex2"),
                warp_instrs_per_iter=len(sim.ops), cycles_per_iter=sim.cycles_per_iter,
                predicted_ms=1e3 * pred["time_s"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    rows = []
    for v in build.variants(dtypes=("bf16", "fp32"), metrics=("sqeuclidean",),
                            classes=(False,), kinds=("bwd",)):
        if v.ref_major != "sym":
            continue
        for one_exp in (False, True):
            rows.append(measure(v, one_exp))
            r = rows[-1]
            print(f"{r['variant']} ONE_EXP={one_exp!s:5} regs {r['regs']} stack {r['stack']} "
                  f"EX2/pair {r['mufu_ex2_per_pair']:.2f} instrs {r['warp_instrs_per_iter']} "
                  f"cycles {r['cycles_per_iter']:.0f} -> {r['predicted_ms']:.2f} ms", flush=True)
    report.write_predicted("one_exp_backward", __doc__.split("\n\n")[0], rows, args.out)


if __name__ == "__main__":
    main()
