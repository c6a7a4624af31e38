"""The latency-aware estimate (``latency.py``) of the Triton kernels, against the GPU's
measurements.

    python bench/sass/latency_report.py            # compile, simulate, write JSON + README
    python bench/sass/latency_report.py --render   # README block from the committed JSON
    # the measured points with the triton the GPU ran (3.6), installed beside this one:
    pip install --no-deps --target /tmp/triton36 triton==3.6.0
    python bench/sass/latency_report.py --triton 3.6=/tmp/triton36

*Predicted from compiled SASS*, never measured. Two parts:

* **Measured points** (``points.json`` beside this file): kernels a GPU has timed, each at
  the commit that was timed. That commit is checked out in a temporary git worktree and
  its own ``bench/sass/build.py`` compiles the variants the autotuner was given there,
  with the triton the GPU ran (the point's ``triton``) where ``--triton`` names an
  install of it, else with this checkout's (the row says which);
  the prediction of a point is the fastest of them (the autotuner keeps the fastest).
  Each row gives the prediction, the measurement and their ratio, and the same for the
  pipe model of ``model.py`` (raw, and calibrated by the anchor's factor).
* **Current kernels**: every GPU config of the bf16 and TF32 forward and backward
  (sqeuclidean, no class output) of this checkout, and the FA2-style anchor, with the
  what-ifs that say where the forward's time goes.

Writes ``bench/results/sass_latency_sm90.json`` and the block between
``<!-- latency:begin -->`` and ``<!-- latency:end -->`` in bench/sass/README.md.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.sass import analyze, anchor_fa2, build, latency, model, report, sass  # noqa: E402

POINTS = Path(__file__).with_name("points.json")
# a symmetric backward variant's name suffix for its two-exp kernel (ONE_EXP off), where
# the launcher's test sent the rows there
TWO_EXP = "_twoexp"
RESULTS = ROOT / "bench" / "results" / "sass_latency_sm90.json"
README = report.README
BEGIN, END = "<!-- latency:begin -->", "<!-- latency:end -->"
# the model's error on the measured points, also in bench/README.md
BENCH_README = ROOT / "bench" / "README.md"
ERR_BEGIN, ERR_END = "<!-- latency-error:begin -->", "<!-- latency-error:end -->"

# run inside a worktree of the measured commit: its build compiles its kernels
_AT_COMMIT = r"""
import json, re, sys
sys.path.insert(0, ".")
import hashlib
import triton
from bench.sass import build
_compile = triton.compile


def _keep_ptx(*args, **kwargs):   # the PTX beside the cubin, for bench/sass/banks.py
    k = _compile(*args, **kwargs)
    name = hashlib.sha1(k.asm["cubin"]).hexdigest()[:12] + ".ptx"
    (build.cache_dir() / name).write_text(k.asm["ptx"])
    return k


triton.compile = _keep_ptx
want = set(json.loads(sys.argv[1]))
out = []
vs = build.variants(dtypes=("bf16", "fp32"), metrics=("sqeuclidean",), classes=(False,))
# the second launches of a call (PASSES): a variant's kernel with that pass's flags
from dataclasses import replace
import torch
PASSES = {"_pospass": dict(POS_PASS=True, perm=build._meta(torch.int32)),
          "_fixup": dict(FIXUP=True, flags=build._meta(torch.int8))}
for name in sorted(want - {v.name for v in vs}):
    for suffix, flags in PASSES.items():
        base = next((v for v in vs if name == v.name + suffix), None)
        if base is not None:
            vs.append(replace(base, name=name, values=dict(base.values, **flags)))
# a config outside that commit's GPU lists (timed through an override): built as they are
for name in sorted(want - {v.name for v in vs}):
    kind, side, dtype, bm, bn, w, s, two = re.match(
        r"(fwd|bwd)_?(sym|dq|dr)?_(bf16|fp32)_sqeuclidean_(\d+)x(\d+)w(\d+)s(\d+)(_twoexp)?$",
        name).groups()
    bm, bn, w, s = int(bm), int(bn), int(w), int(s)
    rm = {None: None, "dq": False, "dr": True, "sym": "sym"}[side]
    from nbkernels.backends.triton import kernels as tk  # this layout: commits after 7fef025
    fn = tk.kernel_for(kind, build.SM90)
    vals = build._fill_unknown(fn, build._launch_values(kind, dtype, "sqeuclidean", False, rm,
                                                        bm, bn))
    if two:
        vals.update(ONE_EXP=False, SCALE_DS=dtype == "fp16")
    vs.append(build.Variant(name=name, kind=kind, dtype=dtype, metric="sqeuclidean", cls=False,
                            ref_major=rm, block_m=bm, block_n=bn, block_d=vals["BLOCK_D"],
                            num_warps=w, num_stages=s, config=f"{bm}x{bn} w{w} s{s}",
                            flop_per_pair=(2 if kind == "fwd" else 4) * build.D, values=vals,
                            fn=fn))
for v in vs:
    if v.name in want:
        c = build.compile_variant(v)
        out.append(dict(name=v.name, kind=v.kind, cubin=str(c.cubin), fn=c.name,
                        shared=c.shared, block_m=v.block_m, block_n=v.block_n,
                        num_warps=v.num_warps, flop_per_pair=v.flop_per_pair,
                        dtype=v.dtype, ref_major=v.ref_major, inner_trips=v.inner_trips,
                        triton=triton.__version__))
print("JSON" + json.dumps(out))
"""


def simulate(c, kind, dtype, flop_per_pair, block_m, block_n, num_warps, inner_trips=1,
             n=build.N, m=build.M):
    """One compiled kernel: occupancy, the simulated SM and the predictions of both models."""
    sim = latency.simulate_cubin(c["cubin"], c["fn"], c["shared"], num_warps, inner_trips)
    func, ops, ctas, cycles = sim.func, sim.ops, sim.ctas_per_sm, sim.cycles_per_iter
    pairs = block_m * block_n
    tiles = -(-n // block_m)
    iters = -(-m // block_n)
    pred = latency.predict(cycles, iters, tiles, ctas, n * m * flop_per_pair)
    mix = sass.loop_mix(func, num_warps, pairs, inner_trips)
    hbm = analyze.hbm_bytes_per_pair("anchor" if kind == "anchor" else kind, dtype)
    pipe = model.predict(model.pipes(mix.per_pair, mix.tensor_flop_per_pair, hbm), flop_per_pair)
    shared = [o for o in ops if o.base in ("LDS", "STS", "LDSM", "STSM")]
    return dict(regs=sim.regs, ctas_per_sm=ctas, warp_instrs_per_iter=len(ops),
                issue_only_cycles=len(ops) * num_warps * ctas / 4, cycles_per_iter=cycles,
                # LDS / STS / LDSM wavefronts of one warp's iteration (banks.py), and what
                # their widths alone give (every lane its own bytes, no conflict)
                smem_wavefronts=sum(o.smem_bytes for o in shared) / 128,
                smem_wavefronts_by_width=sum(latency._smem_bytes(o) for o in shared) / 128,
                banks=sim.banks, latency=pred, pipe_raw=pipe["overlap"])


def _compile_at(commit, names, triton_path=None):
    """{variant name: compiled record} of ``names`` at ``commit`` (a temporary worktree),
    by the triton installed at ``triton_path`` (default: this one)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"nbk-{commit}-"))
    wt = tmp / "src"
    try:
        return _compile_in(tmp, wt, commit, names, triton_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _compile_in(tmp, wt, commit, names, triton_path):
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(wt), commit],
                   check=True)
    try:
        # the cubins outlive the worktree: they are simulated after it is gone
        tag = f"commit-{commit}" + (f"-{Path(triton_path).name}" if triton_path else "")
        env = dict(os.environ, NBK_SASS_CACHE=str(build.cache_dir() / tag))
        if triton_path:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(triton_path),
                                                              env.get("PYTHONPATH"))))
        out = subprocess.run([sys.executable, "-c", _AT_COMMIT, json.dumps(sorted(names))],
                             cwd=wt, env=env, capture_output=True, text=True, check=True).stdout
        recs = json.loads(out[out.index("JSON") + 4:])
        return {r["name"]: r for r in recs}
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(wt)],
                       check=False)


def _minor(version):
    return ".".join(str(version).split(".")[:2])


def measured_points(factor, tritons=None):
    """Each point of points.json: the predictions of its variants against the measurement.
    ``tritons``: {"3.6": install path}, the tritons the points may be compiled with."""
    rows = []
    tritons = tritons or {}
    for p in json.loads(POINTS.read_text())["points"]:
        compiled = _compile_at(p["commit"], p["variants"], tritons.get(_minor(p.get("triton"))))
        preds = {}
        for name in p["variants"]:
            c = compiled[name]
            preds[name] = simulate(c, c["kind"], c["dtype"], c["flop_per_pair"], c["block_m"],
                                   c["block_n"], c["num_warps"], c["inner_trips"])
        best = min(preds, key=lambda k: preds[k]["latency"]["time_s"])
        pipe_best = min(preds, key=lambda k: preds[k]["pipe_raw"]["time_s"])
        ms = p["measured_ms"]
        lat_ms = 1e3 * preds[best]["latency"]["time_s"] * model.at_clock(p)
        pipe_ms = 1e3 * preds[pipe_best]["pipe_raw"]["time_s"] * model.at_clock(p)
        rows.append(dict(p, variants=preds, compiled_with=compiled[best]["triton"],
                         latency_pick=best, latency_ms=lat_ms,
                         latency_ratio=ms / lat_ms, pipe_raw_ms=pipe_ms,
                         pipe_raw_ratio=ms / pipe_ms, pipe_calibrated_ratio=ms * factor / pipe_ms))
    return rows


def points_from_perf(perf):
    """Measured points from a ``bench/gpu_perf.py`` result (its parsed JSON): each bf16
    forward timed at a pinned config, and each batch backward (fwd+bwd less the forward of
    the same run at the same forward config). A dry run gives none."""
    if perf["env"].get("dry") or not perf["env"].get("git_commit", "").isalnum():
        return []
    ok = [r for r in perf["records"] if r["name"] == "nbkernels-triton"
          and r["dtype"] == "bfloat16" and r["status"] == "ok" and r.get("fwd_config")]
    # the commit to compile at; a dirty tree's kernels may differ from it (flagged)
    commit, dirty = perf["env"]["git_commit"][:7], bool(perf["env"].get("git_dirty"))
    gpu = perf["env"].get("gpu_name", "GPU")
    inputs = perf["env"].get("inputs")

    def name(kind, cfg):
        return f"{kind}_bf16_sqeuclidean_{cfg[0]}x{cfg[1]}w{cfg[2]}s{cfg[3]}"
    fwd = {tuple(r["fwd_config"]): 1e3 * r["time_s"]["median"] for r in ok if r["mode"] == "fwd"}
    ran = perf["env"].get("triton")
    # the SM clock sampled while each was timed (H.annotate_clocks), where there is one
    fwd_clock = {tuple(r["fwd_config"]): r.get("sm_clock_mhz") for r in ok if r["mode"] == "fwd"}
    out = [dict(what=f"bf16 forward, {name('fwd', c)[21:]} ({gpu}, gpu_perf)", commit=commit,
                dirty=dirty, triton=ran, measured_ms=ms, variants=[name("fwd", c)])
           for c, ms in fwd.items()]
    for p, c in zip(out, fwd):
        if fwd_clock[c]:
            p["sm_clock_mhz"] = fwd_clock[c]
    for p in out:   # what was timed: the exact pass's share depends on it
        if inputs:
            p["inputs"] = inputs
    for r in ok:
        cfg, both = tuple(r["fwd_config"]), 1e3 * r["time_s"]["median"]
        # the symmetric kernel's form that worked (records before it had one form: that
        # commit's kernel); a record where both worked is no point
        form = {None: "", (1,): "", (0,): TWO_EXP}.get(
            tuple(r["sym_one_exp"]) if r.get("sym_one_exp") else None)
        if r["mode"] == "fwdbwd" and r.get("bwd_config") and cfg in fwd and form is not None:
            what = f"{name('bwd_sym', r['bwd_config'])[25:]}{form}" + (
                f", {r['inputs']}" if r.get("inputs") else "")
            out.append(dict(what=f"bf16 batch backward, {what} ({gpu}, gpu_perf: fwd+bwd - fwd)",
                            commit=commit, dirty=dirty, triton=ran, measured_ms=both - fwd[cfg],
                            variants=[name("bwd_sym", r["bwd_config"]) + form]))
            if r.get("sm_clock_mhz"):
                out[-1]["sm_clock_mhz"] = r["sm_clock_mhz"]
            if inputs:
                out[-1]["inputs"] = inputs
    return out


def add_points(perf_path, points_path=POINTS):
    """Append the points of a gpu_perf.json to points.json (those not there yet)."""
    data = json.loads(Path(points_path).read_text())
    have = {(p["what"], p["commit"]) for p in data["points"]}
    new = [p for p in points_from_perf(json.loads(Path(perf_path).read_text()))
           if (p["what"], p["commit"]) not in have]
    data["points"] += new
    Path(points_path).write_text(json.dumps(data, indent=1) + "\n")
    return new


def _current(v):
    c = build.compile_variant(v)
    rec = dict(cubin=str(c.cubin), fn=c.name, shared=c.shared)
    kind = "anchor" if v.kind == "anchor" else v.kind
    out = simulate(rec, kind, v.dtype, v.flop_per_pair, v.block_m, v.block_n, v.num_warps,
                   v.inner_trips)
    return dict(name=v.name, config=v.config,
                config_tuple=[v.block_m, v.block_n, v.num_warps, v.num_stages], **out)


# forward configs beyond the GPU lists (kernels.GPU_FWD_CONFIGS), for the model to rank:
# one warpgroup per CTA, with two CTAs per SM where they fit (their MMA and softmax may
# overlap). Tiles stay within PAD (configs._check_tiles).
SWEEP_FWD = [(128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 4, 3)]


def sweep_variants():
    from nbkernels.backends.triton import kernels as tk
    jit = tk.kernel_for("fwd", build.SM90)
    out = []
    for bm, bn, w, s in SWEEP_FWD:
        vals = build._fill_unknown(jit, build._launch_values("fwd", "bf16", "sqeuclidean", False,
                                                             None, bm, bn))
        out.append(build.Variant(
            name=f"fwd_bf16_sqeuclidean_{bm}x{bn}w{w}s{s}", kind="fwd", dtype="bf16",
            metric="sqeuclidean", cls=False, ref_major=None, block_m=bm, block_n=bn,
            block_d=vals["BLOCK_D"], num_warps=w, num_stages=s, config=f"{bm}x{bn} w{w} s{s}",
            flop_per_pair=2 * build.D, values=vals, fn=jit))
    return out


def what_ifs(v):
    """Where the forward's time goes: the simulation again with one cost removed."""
    c = build.compile_variant(v)
    func, hi = latency.disassemble(c.cubin)[c.name]
    ops = latency.body(func, hi, v.num_warps, v.inner_trips,
                       latency.loop_banks(c.cubin, func, v.num_warps)[0])
    base = latency.simulate(ops, v.num_warps)
    out = {"simulated": base, "issue_only": len(ops) * v.num_warps / 4}
    out["no tensor-core time (MMA fully overlapped)"] = latency.simulate(
        [replace(o, tensor=0.0) for o in ops], v.num_warps)
    saved = latency.LATENCY["LDGSTS"]
    latency.LATENCY["LDGSTS"] = 0
    try:
        out["no global-load latency (loads issued far enough ahead)"] = latency.simulate(
            ops, v.num_warps)
    finally:
        latency.LATENCY["LDGSTS"] = saved
    out["no CTA barriers"] = latency.simulate(
        [o for o in ops if not (o.base == "BAR" and ".SYNC" in o.op)], v.num_warps)
    return out


def current_kernels():
    vs = build.variants(dtypes=("bf16", "fp32"), metrics=("sqeuclidean",), classes=(False,))
    rows = [_current(v) for v in vs]
    sweep = [_current(v) for v in sweep_variants()]
    anchor = _current(anchor_fa2.variant())
    fwd = next(v for v in vs if v.name.startswith("fwd_bf16") and "128x128" in v.name)
    return rows, sweep, anchor, {"variant": fwd.name, "cycles_per_iter": what_ifs(fwd)}


def constants():
    return dict(latency=latency.LATENCY, default_latency=latency.DEFAULT_LATENCY,
                read_release=latency.READ_RELEASE, hgmma_latency=latency.HGMMA_LATENCY,
                smem_bytes_per_cycle=latency.SMEM_BYTES_PER_CYCLE,
                mufu_cycles=latency.MUFU_CYCLES, int_cycles=latency.INT_CYCLES,
                sms=model.SMS, clock_hz=model.CLOCK_HZ)


def _ms(x):
    return f"{1e3 * x:.2f}"


def block(data):
    """The README block, from the JSON."""
    env = data["env"]
    out = [f"*Predicted from compiled SASS*, never measured: the latency-aware estimate "
           f"(`bench/sass/latency.py`), triton {env['triton']}, sm_90, {env['date']}, commit "
           f"`{(env['git_commit'] or '?')[:7]}`; written by `python bench/sass/latency_report.py` "
           f"to `bench/results/sass_latency_sm90.json`. N = M = 65536, D = 128; "
           f"{model.SMS} SMs at {model.CLOCK_HZ / 1e9:.2f} GHz.", "",
           "**Against the GPU's measurements** (H200, `bench/results/gpu_h200_2026-12-04_"
           "5fa40b9.json`; each point's kernels compiled at the measured commit, by the "
           "triton in the second column (the GPU ran 3.6); the model's "
           "pick is its fastest of the configs the autotuner was given). Ratio = measured / "
           "predicted: 1.0 is exact, above 1 the model is optimistic.", "",
           "The last column scales the latency model by its error on the bf16 forward "
           "(one factor, fitted on that one point): what is left is what the model misses "
           "elsewhere.", "",
           "| measured point | compiled by triton | measured | latency model (its pick) | "
           "ratio | pipe model raw | ratio | ratio, calibrated pipe model | ratio, latency "
           "model scaled on the bf16 forward |", "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    first = data["points"][0]["latency_ratio"]
    for p in data["points"]:
        out.append(f"| {p['what']} | {p.get('compiled_with', '?')} | {p['measured_ms']:.2f} ms "
                   f"| {p['latency_ms']:.2f} ms "
                   f"(`{p['latency_pick']}`) | {p['latency_ratio']:.2f} | {p['pipe_raw_ms']:.2f} "
                   f"ms | {p['pipe_raw_ratio']:.2f} | {p['pipe_calibrated_ratio']:.2f} | "
                   f"{p['latency_ratio'] / first:.2f} |")
    a = data["anchor"]
    out += ["", f"FA2-style anchor (Triton tutorial forward, `anchor_fa2.py`): latency model "
            f"{a['latency']['tflops']:.0f} TFLOP/s, pipe model {a['pipe_raw']['tflops']:.0f} "
            f"raw; the cited H100 measurement is {anchor_fa2.MEASURED_TFLOPS:.0f} (not measured "
            "here).", "", "**Current kernels** (this commit; per config; the dr kernels, which "
            "mirror dq, are in the JSON):", "",
            "The last three forward rows are configs outside the GPU lists "
            "(`SWEEP_FWD`), for the model to rank; `bench/gpu_perf.sh` times the model's "
            "best ones beside the table's.", "",
            "| kernel | CTAs/SM | warp instr./iter | issue-only cycles/iter | simulated "
            "cycles/iter | latency model ms | % bf16 peak | pipe model raw ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["variants"] + data["sweep"]:
        if "_dr_" in r["name"]:
            continue   # the dr kernels mirror dq (they are in the JSON)
        out.append(f"| {r['name']} | {r['ctas_per_sm']} | {r['warp_instrs_per_iter']} | "
                   f"{r['issue_only_cycles']:.0f} | {r['cycles_per_iter']:.0f} | "
                   f"{_ms(r['latency']['time_s'])} | {r['latency']['pct_bf16_peak']:.1f} | "
                   f"{_ms(r['pipe_raw']['time_s'])} |")
    w = data["what_ifs"]
    base = w["cycles_per_iter"]["simulated"]
    out += ["", f"**Where the bf16 forward's time goes** (`{w['variant']}`, simulated cycles "
            "per main-loop iteration of one SM, each line removing one cost):", ""]
    for k, cyc in w["cycles_per_iter"].items():
        saves = "" if k in ("simulated", "issue_only") else \
            f" (saves {100 * (base - cyc) / base:.0f}% of the time)"
        out.append(f"- {k}: {cyc:.0f}{saves}")
    return "\n".join(out)


def error_block(data):
    """bench/README's summary: each measured point against both models."""
    out = ["| measured point (H200, 5fa40b9) | compiled by triton | measured | latency model "
           "| measured / predicted | pipe model raw, measured / predicted |",
           "|---|---|---:|---:|---:|---:|"]
    for p in data["points"]:
        out.append(f"| {p['what']} | {p.get('compiled_with', '?')} | {p['measured_ms']:.2f} ms "
                   f"| {p['latency_ms']:.2f} ms | {p['latency_ratio']:.2f} | "
                   f"{p['pipe_raw_ratio']:.2f} |")
    ratios = [p["latency_ratio"] for p in data["points"]]
    out += ["", f"The latency model is {min(ratios):.2f}-{max(ratios):.2f}x optimistic "
            "(the goal is within 1.25x on every point): the details and the current "
            "kernels are in [`sass/README.md`](sass/README.md)."]
    return "\n".join(out)


def write_readme(text, readme=README, begin=BEGIN, end=END, title="Latency-aware estimate"):
    s = readme.read_text()
    if begin not in s:
        s = s.rstrip("\n") + f"\n\n## {title}\n\n{begin}\n{end}\n"
    head, rest = s.split(begin, 1)
    readme.write_text(head + begin + "\n" + text + "\n" + end + rest.split(end, 1)[1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render", action="store_true", help="README block from the JSON only")
    ap.add_argument("--perf", metavar="GPU_PERF_JSON",
                    help="first add the points of a bench/gpu_perf.py result to points.json")
    ap.add_argument("--triton", action="append", default=[], metavar="MAJOR.MINOR=PATH",
                    help="a triton installed at PATH (pip install --target), to compile the "
                         "measured points that version ran")
    args = ap.parse_args(argv)
    tritons = dict(t.split("=", 1) for t in args.triton)
    if args.perf:
        print(f"added {len(add_points(args.perf))} points to {POINTS.relative_to(ROOT)}")
    if not args.render:
        why = build.unavailable_reason()
        if why:
            sys.exit(f"cannot compile for sm_90 here: {why}")
        t0 = time.time()
        factor = json.loads((ROOT / "bench" / "results" / "sass_sm90.json").read_text())[
            "calibration_factor"]
        rows, sweep, anchor, whatifs = current_kernels()
        data = dict(env=report.env(), constants=constants(), calibration_factor=factor,
                    points=measured_points(factor, tritons), anchor=anchor, variants=rows,
                    sweep=sweep,
                    what_ifs=whatifs)
        data["seconds"] = round(time.time() - t0, 1)
        RESULTS.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {RESULTS.relative_to(ROOT)}")
    data = json.loads(RESULTS.read_text())
    write_readme(block(data))
    write_readme(error_block(data), BENCH_README, ERR_BEGIN, ERR_END,
                 "The latency model against the GPU")
    print(f"updated {README.relative_to(ROOT)} and {BENCH_README.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
