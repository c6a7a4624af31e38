"""Choose the launchers' config table (nbkernels/backends/triton/configs.py) from the SASS
model: for each sm_90 entry, every GPU config whose tiles fit is compiled in each flavour
the entry serves (the lse forward; the class forward; dq, dr and the symmetric backward;
the class dq and dr), at a feature dim in the entry's bucket, and the config kept is the
one with the lowest predicted time summed over the flavours among those where no flavour
spills and every 16-bit / TF32 flavour runs its dots on HGMMA (fp64: the widest that does
not spill); where every candidate spills, the least stack.

    python bench/sass/table.py [--out bench/results/config_table_sm90.json]

Predicted from compiled SASS, not measured (bench/sass/model.py); prints the table as
Python literal rows for triton_configs.TABLE. About 5 minutes on 2 CPU cores.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.sass import analyze, build  # noqa: E402


def _score(rows, dtype, ieee=False):
    """(no spill and HGMMA, -stack, -predicted time) of one config's flavours: higher wins."""
    stack = sum(r.get("stack_bytes", 0) + r.get("local_bytes", 0) for r in rows)
    ok = not any(r.get("spills") for r in rows)
    if dtype != "fp64" and not ieee:
        ok = ok and all(any("GMMA" in k for k in r.get("shapes", {})) for r in rows)
        t = sum(r["predicted"]["overlap"]["time_s"] for r in rows)
    else:
        t = -rows[0]["block_m"] * rows[0]["block_n"]   # fp64: the widest tile
    return (ok, -stack, -t)


def choose(only=None):
    from nbkernels.backends.triton import configs as tc
    from nbkernels.backends.triton import kernels as tk
    out = []
    for (arch, kernel, dclass, bucket) in sorted(tc.TABLE):
        if arch != "sm90" or (only and dclass not in only):
            continue
        kind, cls = kernel[:3], kernel.endswith("class")
        precision = "ieee" if dclass == "32ieee" else None
        d = (build.TABLE_D if kind == "fwd" else build.TABLE_D_BWD)[bucket]
        dtype = build.TABLE_DTYPE[dclass]
        elem = {"bf16": 2, "fp32": 4, "fp64": 8}[dtype]
        block_d = tc._block_d(kernel, d)
        jit = tk.kernel_for(kernel, build.SM90)
        rms = (None,) if kind == "fwd" else (False, True) if cls else (False, True, "sym")
        cands = []
        for cfg in (tk.GPU_FWD_CONFIGS if kind == "fwd" else tk.GPU_BWD_CONFIGS):
            if not tk.fits(cfg, elem, block_d, cls and kind == "fwd"):
                continue
            bm, bn, w, s = build._config_tuple(cfg, kind)
            rows = []
            for rm in rms:
                vals = build._fill_unknown(jit, build._launch_values(
                    kind, dtype, "sqeuclidean", cls, rm, bm, bn, d, precision))
                v = build.Variant(name=f"{kernel}_{dtype}_d{d}_{rm}_{bm}x{bn}w{w}s{s}", kind=kind,
                                  dtype=dtype, metric="sqeuclidean", cls=cls, ref_major=rm,
                                  block_m=bm, block_n=bn, block_d=vals["BLOCK_D"], num_warps=w,
                                  num_stages=s, config=f"{bm}x{bn} w{w} s{s}",
                                  flop_per_pair=2 * d if kind == "fwd" else 4 * d, values=vals,
                                  fn=jit)
                rows.append(analyze.analyze_variant(v))
            cands.append(((bm, bn, w, s), _score(rows, dtype, precision == "ieee"), rows))
        best = max(cands, key=lambda c: c[1])
        rec = dict(kernel=kernel, dtype_class=dclass, bucket=bucket, d=d, chosen=best[0],
                   no_spill_hgmma=best[1][0],
                   candidates=[dict(config=c, ok=sc[0], stack=-sc[1],
                                    predicted_s=(sum(r["predicted"]["overlap"]["time_s"]
                                                     for r in rows) if dtype != "fp64" else None),
                                    regs=[r.get("regs") for r in rows])
                               for c, sc, rows in cands])
        print(f'    ("sm90", "{kernel}", "{dclass}", "{bucket}"): ({best[0]}, ...),'
              f'  # ok={best[1][0]} stack={-best[1][1]}', flush=True)
        out.append(rec)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "config_table_sm90.json"))
    ap.add_argument("--only", nargs="*", help="dtype classes to choose (default: all)")
    args = ap.parse_args()
    import triton
    rows = choose(args.only)
    what = ("bench/sass/table.py: every sm_90 entry of nbkernels/backends/triton_configs.TABLE, "
            "each GPU config that fits compiled in each flavour at a D of the bucket; "
            "predicted from compiled SASS (bench/sass/model.py), not measured")
    Path(args.out).write_text(json.dumps(dict(what=what, triton=triton.__version__,
                                              entries=rows), indent=1))


if __name__ == "__main__":
    main()
