"""Choose the launchers' config table (nbkernels/backends/triton/configs.py) from the SASS
model: for each sm_90 entry, every GPU config whose tiles fit is compiled in each flavour
the entry serves (the lse forward; the class forward; dq, dr and the symmetric backward;
the class dq and dr), at a feature dim in the entry's bucket, and the config kept is the
one with the lowest time summed over the flavours, as the latency model predicts it
(``latency.py``; the pipe model's is recorded beside it), among those where no flavour
spills and every 16-bit / TF32 flavour runs its dots on HGMMA (fp64 and fp32 with IEEE
dots: the widest that does not spill); where every candidate spills, the least stack.

    python bench/sass/table.py [--out bench/results/config_table_sm90.json]
    python bench/sass/table.py --fix    # under an older triton: TABLE_BY_TRITON's rows
    python bench/sass/table.py [--fix] --kernels fwd_class   # those entries only, merged

Predicted from compiled SASS, not measured (bench/sass/latency.py, bench/sass/model.py);
prints the table as Python literal rows for configs.TABLE. About 10 minutes on 2 CPU cores.

``--fix`` chooses every entry again, by the same rule, with the triton that runs it
(another version: put it first on PYTHONPATH), whose compiler schedules and allocates
registers differently, and names the entries of ``TABLE`` (chosen under triton 3.9) that
break the rule there (``violation``); it writes
bench/results/config_table_sm90_triton<major><minor>.json and prints the rows of
``configs.TABLE_BY_TRITON``: every entry whose choice there is not TABLE's (and of
``SPILL_ALLOWANCE_BY_TRITON`` where every config spills).
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.sass import analyze, build, latency  # noqa: E402


def _stack(row):
    """Bytes of stack and local memory of a compiled flavour (``analyze`` row)."""
    return row.get("stack_bytes", 0) + row.get("local_bytes", 0)


def _on_hgmma(row):
    """Whether a compiled flavour's main loop runs its dots on warpgroup MMA."""
    return any("GMMA" in k for k in row.get("shapes", {}))


def latency_s(v, d):
    """The latency model's time (``latency.simulate_grid``) of one compiled flavour at
    N = M = ``build.N``, feature dim ``d``."""
    c = build.compile_variant(v)
    return latency.simulate_grid(c, v.values, d, v.kind, v.block_m, v.block_n,
                                 v.num_warps)[1]["time_s"]


def _score(rows, dtype, ieee=False):
    """(no spill and HGMMA, -stack, -predicted time) of one config's flavours: higher wins.
    The time is the latency model's (``latency_s``, in each row): on the kernels the GPU
    timed it is 1.7-2.4x optimistic where the pipe model is 3.7-10.5x, its ratios 1.4x
    apart against 2.8x, so it is the one that ranks."""
    stack = sum(_stack(r) for r in rows)
    ok = not any(r.get("spills") for r in rows)
    if dtype != "fp64" and not ieee:
        ok = ok and all(_on_hgmma(r) for r in rows)
        t = sum(r["latency_s"] for r in rows)
    else:
        t = -rows[0]["block_m"] * rows[0]["block_n"]   # fp64: the widest tile
    return (ok, -stack, -t)


def entry_key(v):
    """(kernel, dtype class, bucket) of a ``build.table_variants`` variant: the key of
    ``configs.SPILL_ALLOWANCE`` and ``configs.NO_HGMMA``."""
    kind = v.kind + ("_class" if v.cls else "")
    dclass = v.name.split("_")[2 if v.ref_major is None else 3]
    bucket = next(b for b, d in (build.TABLE_D if v.kind == "fwd" else build.TABLE_D_BWD).items()
                  if f"_d{d}_" in v.name)
    return kind, dclass, bucket


def violation(v, row, allowance, no_hgmma):
    """How a compiled table entry (``build.table_variants`` variant ``v``, its
    ``analyze.analyze_variant`` row) breaks the table's rule, or None: a spill, beyond the
    entry's stack in ``allowance`` where it has one, or a 16-bit / TF32 dot off HGMMA
    (but for the entries in ``no_hgmma``)."""
    key = entry_key(v)
    stack = _stack(row)
    allowed = allowance.get(key)
    if allowed is None and row["spills"]:
        return f"spills ({stack} B of stack)"
    if allowed is not None and stack > allowed:
        return f"{stack} B of stack > {allowed} B allowed"
    if key[1] in ("16", "32") and key not in no_hgmma and not _on_hgmma(row):
        return f"no HGMMA in the main loop ({row.get('shapes')})"
    return None


def choose(only=None, kernels=None):
    from nbkernels.backends.triton import configs as tc
    from nbkernels.backends.triton import kernels as tk
    out = []
    for (arch, kernel, dclass, bucket) in sorted(tc.TABLE):
        if arch != "sm90" or (only and dclass not in only) or (kernels and kernel not in kernels):
            continue
        kind, cls = kernel[:3], kernel.endswith("class")
        precision = "ieee" if dclass == "32ieee" else None
        d = (build.TABLE_D if kind == "fwd" else build.TABLE_D_BWD)[bucket]
        dtype = build.TABLE_DTYPE[dclass]
        elem = {"bf16": 2, "fp32": 4, "fp64": 8}[dtype]
        block_d = tc._block_d(kernel, d)
        # what sm_90 launches under this triton: a variant with configs of its own (the
        # TF32 transposed backward, "sm90_tf32t") is chosen by its own script; one that
        # takes this entry's config (the AHEAD forward) is ranked with its flags
        variant = tk.variant_for(kernel, build.SM90, build.launch_precision(dtype, precision))
        if variant.configs is not None:
            variant = next(v for v in tk.VARIANTS if v.kind == kernel and v.name == "generic")
        jit = variant.kernel
        rms = (None,) if kind == "fwd" else (False, True) if cls else (False, True, "sym")
        cands = []
        for cfg in (tk.GPU_FWD_CONFIGS if kind == "fwd" else tk.GPU_BWD_CONFIGS):
            if not tk.fits(cfg, elem, block_d, cls and kind == "fwd"):
                continue
            bm, bn, w, s = build._config_tuple(cfg, kind)
            rows = []
            for rm in rms:
                vals = build._fill_unknown(jit, build.with_variant(build._launch_values(
                    kind, dtype, "sqeuclidean", cls, rm, bm, bn, d, precision), variant))
                v = build.Variant(name=f"{kernel}_{dclass}_d{d}_{rm}_{bm}x{bn}w{w}s{s}", kind=kind,
                                  dtype=dtype, metric="sqeuclidean", cls=cls, ref_major=rm,
                                  block_m=bm, block_n=bn, block_d=vals["BLOCK_D"], num_warps=w,
                                  num_stages=s, config=f"{bm}x{bn} w{w} s{s}",
                                  flop_per_pair=2 * d if kind == "fwd" else 4 * d, values=vals,
                                  fn=jit)
                row = analyze.analyze_variant(v)
                if dtype != "fp64" and precision != "ieee" and "error" not in row:
                    row["latency_s"] = latency_s(v, d)
                rows.append(row)
            cands.append(((bm, bn, w, s), _score(rows, dtype, precision == "ieee"), rows))
        best = max(cands, key=lambda c: c[1])
        rec = dict(kernel=kernel, dtype_class=dclass, bucket=bucket, d=d, chosen=best[0],
                   variant=variant.name,
                   no_spill_hgmma=best[1][0],
                   candidates=[dict(config=c, ok=sc[0], stack=-sc[1],
                                    predicted_s=(sum(r["predicted"]["overlap"]["time_s"]
                                                     for r in rows) if dtype != "fp64" else None),
                                    latency_s=(sum(r["latency_s"] for r in rows)
                                               if all("latency_s" in r for r in rows) else None),
                                    regs=[r.get("regs") for r in rows],
                                    stacks=[_stack(r) for r in rows],
                                    loop_spill_instrs=[r.get("spill_instrs") for r in rows],
                                    hgmma=[_on_hgmma(r) for r in rows])
                               for c, sc, rows in cands])
        print(f'    ("sm90", "{kernel}", "{dclass}", "{bucket}"): ({best[0]}, ...),'
              f'  # ok={best[1][0]} stack={-best[1][1]}', flush=True)
        out.append(rec)
    return out


def broken(kernels=None):
    """{sm90 key of TABLE: [how each flavour breaks the rule]} under the running triton,
    for the entries of ``TABLE`` itself (not the version's replacements), of ``kernels``
    only where given."""
    from nbkernels.backends.triton import configs as tc
    base = {k: e for k, e in tc.TABLE.items()
            if k[0] == "sm90" and (not kernels or k[1] in kernels)}
    out = {}
    for v in build.table_variants(entries=base):
        why = violation(v, analyze.analyze_variant(v), tc.SPILL_ALLOWANCE, tc.NO_HGMMA)
        if why:
            out.setdefault(("sm90",) + entry_key(v), []).append(f"{v.name}: {why}")
    return out


def _merged(path, rows, kernels):
    """The entries of the JSON at ``path`` (chosen under this triton), in its order, those
    chosen again (``rows``, of ``kernels``) in their place; ``rows`` alone without
    ``kernels`` or without that JSON."""
    if not kernels or not Path(path).exists():
        return rows
    import triton
    key = lambda r: (r["kernel"], r["dtype_class"], r["bucket"])  # noqa: E731
    new = {key(r): r for r in rows}
    run = json.loads(Path(path).read_text())
    if run["triton"] != triton.__version__:
        raise ValueError(f"{path} was chosen under triton {run['triton']}, not "
                         f"{triton.__version__}: choose every entry again (no --kernels)")
    return [new.pop(key(r), r) for r in run["entries"]] + list(new.values())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="default: bench/results/config_table_sm90.json, or with "
                                  "--fix config_table_sm90_triton<major><minor>.json")
    ap.add_argument("--only", nargs="*", help="dtype classes to choose (default: all)")
    ap.add_argument("--fix", action="store_true",
                    help="under an older triton: choose every entry again, name those of TABLE "
                         "that break the rule there (TABLE_BY_TRITON's rows)")
    ap.add_argument("--kernels", nargs="*",
                    help="choose only these kernels' entries (e.g. fwd_class), replacing "
                         "them in the JSON already at --out (the other entries kept)")
    args = ap.parse_args()
    import triton
    from nbkernels.backends import variants
    if args.fix:
        from nbkernels.backends.triton import configs as tc
        bad = broken(args.kernels)
        for key, why in sorted(bad.items()):
            print(key, *why, sep="\n    ", flush=True)
        rows = choose(args.only, kernels=args.kernels)
        print("# TABLE_BY_TRITON: the entries whose choice under this triton is not TABLE's")
        for r in rows:
            key = ("sm90", r["kernel"], r["dtype_class"], r["bucket"])
            r["broken"] = bad.get(key, [])
            r["table"] = list(tc.TABLE[key][0])
            r["replaces"] = tuple(r["chosen"]) != tuple(tc.TABLE[key][0])
            if r["replaces"]:
                print(f'    {key}: ({tuple(r["chosen"])}, ...),  # TABLE {tuple(r["table"])}'
                      f'{", breaks the rule" if r["broken"] else ""}', flush=True)
        ver = "".join(map(str, variants.triton_version()))
        out = args.out or ROOT / "bench" / "results" / f"config_table_sm90_triton{ver}.json"
        rows = _merged(out, rows, args.kernels)
        what = (f"bench/sass/table.py --fix under triton {triton.__version__}: every sm_90 entry "
                "of configs.TABLE chosen again by the table's rule under this triton (each "
                "GPU config that fits, compiled in every flavour); 'replaces': the choice "
                "differs from TABLE's (chosen under 3.9), 'broken': how TABLE's own entry "
                "breaks the rule here; predicted from compiled SASS, not measured")
        Path(out).write_text(json.dumps(dict(what=what, triton=triton.__version__,
                                             entries=rows), indent=1))
        return
    out = args.out or ROOT / "bench" / "results" / "config_table_sm90.json"
    rows = _merged(out, choose(args.only, kernels=args.kernels), args.kernels)
    what = ("bench/sass/table.py: every sm_90 entry of nbkernels/backends/triton_configs.TABLE, "
            "each GPU config that fits compiled in each flavour at a D of the bucket; "
            "predicted from compiled SASS (bench/sass/model.py), not measured")
    Path(out).write_text(json.dumps(dict(what=what, triton=triton.__version__,
                                         entries=rows), indent=1))


if __name__ == "__main__":
    main()
