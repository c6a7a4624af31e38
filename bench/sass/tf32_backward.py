"""Why the TF32 backward costs more than its FLOPs, from the compiled SASS, and the
configs of its sm_90 variant.

The H200 measured the fp32 (TF32) batch backward at 46.6 ms against 16.6 ms in bf16
(bench/results/gpu_h200_2026-12-04_5fa40b9.md): 2.8x, where the tensor-core rate is 2x.
The main loops of the two differ in how the other side's tile reaches the dx dot: Hopper's
warpgroup MMA reads 32-bit operands from shared memory only K-major, and the dx dot's K is
the other side's rows. The generic kernel then loads each fp32 tile through registers
(LDG, not cp.async, so not pipelined), stores it once as loaded and once transposed,
element by element, behind an extra barrier; the transposed stores put 16 lanes on each
of two banks (``banks.py``: 16 wavefronts each, 32 stores per warp and tile). The
"sm90_tf32_transposed" variant (``kernels.VARIANTS``, flag OTHER_T) takes the dx dot's
tile from a transposed copy that the launcher makes once per backward.

For every GPU backward config whose tiles fit (``kernels.fits``, the transposed tiles
counted), at D = 128 (resident) and 192 (D in chunks), this compiles each flavour (dq, dr,
the symmetric batch kernel, the class dq and dr) as the generic kernel and as the variant,
counts the loop's memory and barrier instructions, simulates the loop
(``latency.simulate_cubin``) and predicts the time at N = M = 65536. The best config of
each (variant, kernel, bucket), summed over its flavours with no spill, is what
``configs.TABLE`` holds under the variant's key "sm90_tf32t".

    python bench/sass/tf32_backward.py [--out bench/results/tf32_backward_sm90.json]

*Predicted from compiled SASS* (triton's sm_90 compiler on a CPU), never measured; the
latency model was 2.3x optimistic on the TF32 backward the H200 timed (its bank conflicts
counted, ``banks.py``; 4.2x before), so these rank configs and variants and are not
times. About 5 minutes on 2 CPU cores.
"""
import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.sass import build, latency, sass  # noqa: E402

FLAVOURS = {"bwd": (False, True, "sym"), "bwd_class": (False, True)}
BUCKETS = {"128": 128, "chunked": build.TABLE_D_BWD["chunked"]}
# the loop instructions that tell the two ways of feeding the dx dot apart
COUNTED = ("LDG", "LDGSTS", "STS", "BAR", "HGMMA", "SHFL")


def _loop_counts(cubin, name, num_warps):
    func = sass.disassemble(cubin)[name]
    lp = sass.main_loop(func, num_warps)
    ops = [i for i in func.instrs if lp.start <= i.addr <= lp.end]
    counts = Counter(i.base for i in ops if i.base in COUNTED)
    counts["LDGSTS.128"] = sum(1 for i in ops if i.base == "LDGSTS" and ".128" in i.op)
    counts["BAR.SYNC"] = sum(1 for i in ops if i.base == "BAR" and ".SYNC" in i.op)
    return dict(sorted(counts.items()))


def _one(variant, kernel, rm, cfg, d):
    bm, bn, w, s = build._config_tuple(cfg, "bwd")
    cls = kernel == "bwd_class"
    vals = build._launch_values("bwd", "fp32", "sqeuclidean", cls, rm, bm, bn, d)
    vals = build._fill_unknown(variant.kernel, build.with_variant(vals, variant))
    side = {False: "dq", True: "dr", "sym": "sym"}[rm]
    tag = f"tf32bwd_{variant.name}_{kernel}_{side}_d{d}_{bm}x{bn}w{w}s{s}"
    c = build.compile_triton(variant.kernel, vals, w, s, tag)
    sim, pred = latency.simulate_grid(c, vals, d, "bwd", bm, bn, w, build.N * build.M * 4 * d)
    usage = sass.resource_usage(c.cubin)[c.name]
    return dict(flavour=side, regs=sim.regs, spill=bool(usage.get("stack", 0)),
                shared=c.shared, ctas_per_sm=sim.ctas_per_sm,
                cycles_per_iter=sim.cycles_per_iter, predicted_ms=1e3 * pred["time_s"],
                loop=_loop_counts(c.cubin, c.name, w))


def sweep():
    from nbkernels.backends.triton import kernels as tk
    generic = {k: next(v for v in tk.VARIANTS if v.kind == k and v.name == "generic")
               for k in FLAVOURS}
    # the variant itself, whatever triton versions it is enabled for (those are decided
    # from these results)
    chosen = {k: next(v for v in tk.VARIANTS if v.kind == k and v.name == "sm90_tf32_transposed")
              for k in FLAVOURS}
    out = []
    for kernel, rms in FLAVOURS.items():
        for bucket, d in BUCKETS.items():
            block_d = 128 if d <= 128 else 64
            for variant in (generic[kernel], chosen[kernel]):
                block_t = (128 if variant.flag("OTHER_T") else 0)
                for cfg in tk.GPU_BWD_CONFIGS:
                    if not tk.fits(cfg, 4, block_d, False, block_t):
                        continue
                    rows = [_one(variant, kernel, rm, cfg, d) for rm in rms]
                    rec = dict(variant=variant.name, kernel=kernel, bucket=bucket, d=d,
                               config=list(build._config_tuple(cfg, "bwd")),
                               predicted_ms=sum(r["predicted_ms"] for r in rows),
                               spill=any(r["spill"] for r in rows), flavours=rows)
                    print(f"{variant.name:22s} {kernel:9s} d{d} {rec['config']} "
                          f"{rec['predicted_ms']:7.2f} ms"
                          + (" spill" if rec["spill"] else ""), flush=True)
                    out.append(rec)
    return out


def best(rows):
    """{(variant, kernel, bucket): the fastest predicted config with no spill}."""
    out = {}
    for r in rows:
        if r["spill"]:
            continue
        key = (r["variant"], r["kernel"], r["bucket"])
        if key not in out or r["predicted_ms"] < out[key]["predicted_ms"]:
            out[key] = r
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "tf32_backward_sm90.json"))
    args = ap.parse_args(argv)
    import torch
    sys.path.insert(0, str(ROOT / "bench"))
    import _harness
    rows = sweep()
    picks = best(rows)
    for (variant, kernel, bucket), r in sorted(picks.items()):
        print(f"best {variant:22s} {kernel:9s} {bucket:8s} {tuple(r['config'])} "
              f"{r['predicted_ms']:.2f} ms")
    env = _harness.env_info(torch.device("cpu"))
    data = dict(label="predicted from compiled SASS (latency model), not measured",
                triton=env["triton"], git_commit=env["git_commit"], git_dirty=env["git_dirty"],
                target="sm_90", n=build.N, m=build.M,
                best=[dict(variant=v, kernel=k, bucket=b, config=r["config"],
                           predicted_ms=r["predicted_ms"])
                      for (v, k, b), r in sorted(picks.items())],
                rows=rows)
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
