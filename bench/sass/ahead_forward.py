"""The loss forward with and without AHEAD (the "sm90_fwd_ahead" variant,
``nbkernels/backends/triton/kernels.py``), compiled for sm_90 by the running triton: for
each GPU forward config (bf16, D = 128, squared distances), the registers, the stack, the
main loop's order of HGMMA and MUFU (``overlap_probe``), how many exps sit under the
wgmma, and the latency model's cycles per tile and time at N = M = 65536.

    python bench/sass/ahead_forward.py [--out FILE]   # default: bench/results/
                                                      # ahead_forward_sm90_triton<ver>.json

Run it under another triton by putting that one first on PYTHONPATH
(``bench/sass/other_tritons.sh`` does, for 3.6, 3.7 and 3.8). *Predicted from compiled
SASS*, never measured.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.sass import build, latency, overlap_probe, report, sass  # noqa: E402

N = M = 65536


def measure(cfg, ahead):
    from nbkernels.backends.triton import kernels as tk
    bm, bn, w, s = build._config_tuple(cfg, "fwd")
    jit = next(v.kernel for v in tk.VARIANTS if v.kind == "fwd" and v.name == "generic")
    vals = build._fill_unknown(jit, build._launch_values("fwd", "bf16", "sqeuclidean", False,
                                                         None, bm, bn))
    vals["AHEAD"] = ahead
    c = build.compile_triton(jit, vals, w, s, f"fwd_ahead{int(ahead)}_{bm}x{bn}w{w}s{s}")
    sim = latency.simulate_cubin(c.cubin, c.name, c.shared, w)
    seq = overlap_probe._loop(sim.ops)
    pred = latency.predict(sim.cycles_per_iter, M // bn, N // bm, sim.ctas_per_sm,
                           2 * N * M * build.D)
    return dict(config=[bm, bn, w, s], ahead=ahead, regs=sim.regs,
                stack=sass.resource_usage(c.cubin)[c.name]["stack"], ctas_per_sm=sim.ctas_per_sm,
                warp_instrs_per_iter=len(sim.ops), cycles_per_iter=sim.cycles_per_iter,
                exps_under_mma=overlap_probe.exps_under_mma(seq),
                loop=" | ".join(f"{t} x{n}" for t, n in seq), predicted_ms=1e3 * pred["time_s"])


def main(argv=None):
    from nbkernels.backends.triton import kernels as tk
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    rows = []
    for cfg in tk.GPU_FWD_CONFIGS:
        for ahead in (False, True):
            rows.append(measure(cfg, ahead))
            r = rows[-1]
            print(f"{'x'.join(map(str, r['config']))} AHEAD={ahead!s:5} regs {r['regs']} stack "
                  f"{r['stack']} CTAs {r['ctas_per_sm']} exps under MMA "
                  f"{r['exps_under_mma'][0]}/{r['exps_under_mma'][1]} cycles "
                  f"{r['cycles_per_iter']:.0f} -> {r['predicted_ms']:.2f} ms", flush=True)
    report.write_predicted("ahead_forward", __doc__.split("\n\n")[0], rows, args.out)


if __name__ == "__main__":
    main()
