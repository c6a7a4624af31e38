"""Static sm_90 performance model of every kernel: bench/results/sass_sm90.json + a table.

    python bench/sass/report.py              # compile all, write the JSON and bench/sass/README.md
    python bench/sass/report.py --print      # print the table, write nothing
    python bench/sass/report.py --quick      # first autotune config only (faster)
    python bench/sass/report.py --render     # README block from the committed JSONs only

Compiles every Triton variant (build.variants: 3 dtypes x 2 metrics x class or not, the
forward and both backward kernels, each GPU autotune config), the FA-2 anchor and the
kernels of csrc/cuda/*.cu for sm_90 without a GPU, reads their SASS (sass.py) and
predicts cycles per pair on H100 SXM pipes (model.py). Every number is *predicted from
compiled SASS*, never measured; the calibrated column scales each prediction by the
anchor's measured / predicted throughput. The README table shows, per kernel, the
autotune config with the best prediction (the one the model expects a Hopper to pick);
the JSON holds every config. Takes ~5-10 minutes on 2 cores on a cold triton cache.
The README block ends with previous kernels (PREVIOUS, or --previous PATH) vs current.
"""
import argparse
import datetime
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.sass import analyze, anchor_fa2, budgets, build, model  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "sass_sm90.json"
PREVIOUS = ROOT / "bench" / "results" / "sass_sm90_62a178c.json"  # the previous kernels' JSON
README = ROOT / "bench" / "sass" / "README.md"
BEGIN, END = "<!-- sass:begin -->", "<!-- sass:end -->"


def _one(index_and_quick):
    i, quick = index_and_quick
    v = build.variants(configs=[0] if quick else None)[i]
    try:
        return analyze.analyze_variant(v)
    except Exception as e:  # a variant that does not compile is a row with the reason
        return dict(name=v.name, kind=v.kind, dtype=v.dtype, metric=v.metric, cls=v.cls,
                    ref_major=v.ref_major, config=v.config,
                    error=f"{type(e).__name__}: {str(e)[:400]}")


def collect(quick=False, jobs=2):
    n = len(build.variants(configs=[0] if quick else None))
    with ProcessPoolExecutor(jobs) as ex:
        rows = list(ex.map(_one, [(i, quick) for i in range(n)]))
    anchor = analyze.analyze_variant(anchor_fa2.variant())
    cuda, cuda_errors = [], {}
    for src in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        try:
            cuda += analyze.analyze_cuda(src)
        except Exception as e:
            cuda_errors[str(src.relative_to(ROOT))] = f"{type(e).__name__}: {str(e)[:600]}"
    factor = analyze.calibrate(rows + cuda + [anchor], anchor)
    return rows, anchor, cuda, cuda_errors, factor


def write_predicted(stem, what, rows, out=None):
    """Write the ``rows`` of a comparison by the latency model, labelled as predictions, to
    ``out`` (default bench/results/<stem>_sm90_triton<major><minor>.json, the running
    triton's version); returns the path."""
    import triton

    from nbkernels.backends import variants
    ver = "".join(map(str, variants.triton_version()))
    path = Path(out or ROOT / "bench" / "results" / f"{stem}_sm90_triton{ver}.json")
    path.write_text(json.dumps(dict(
        label="predicted from compiled SASS (latency model), not measured", env=env(),
        triton=triton.__version__, what=what, rows=rows), indent=1) + "\n")
    print("wrote", path)
    return path


def env():
    import torch
    import triton
    commit = os.popen(f"git -C {ROOT} rev-parse HEAD 2>/dev/null").read().strip()
    # uncommitted changes to what is compiled: the commit alone does not name the code
    dirty = os.popen(f"git -C {ROOT} status --porcelain -- nbkernels csrc bench/sass "
                     "bench/gluon_fwd.py 2>/dev/null").read().strip()
    commit = commit + "+dirty" if commit and dirty else commit
    return {"triton": triton.__version__, "torch": torch.__version__,
            "target": f"cuda sm_{build.SM} (GPUTarget('cuda', {build.SM}, 32)), deviceless",
            "nvcc": os.popen("nvcc --version 2>/dev/null").read().strip().splitlines()[-1:] or None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": commit or None,
            "problem": {"N": build.N, "M": build.M, "D": build.D, "classes": build.NUM_CLASSES}}


def family(name):
    """A kernel's name without its autotune config suffix `_<BM>x<BN>w<W>s<S>`."""
    return re.sub(r"_\d+x\d+w\d+s\d+$", "", name)


def best_configs(rows):
    """Per kernel (all but the config), the row with the highest raw prediction."""
    best = {}
    for r in rows:
        key = family(r["name"])
        if "predicted" not in r:
            best.setdefault(key, r)
            continue
        cur = best.get(key)
        if cur is None or "predicted" not in cur or \
                r["predicted"]["overlap"]["tflops"] > cur["predicted"]["overlap"]["tflops"]:
            best[key] = r
    return list(best.values())

# ---------------------------------------------------------------------------- table


def _f(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def _md_table(head, rows):
    """A markdown table: the header, its rule, one line per row of cells."""
    lines = ["| " + " | ".join(str(c) for c in cells) + " |" for cells in [head, *rows]]
    return "\n".join([lines[0], "|" + "---|" * len(head), *lines[1:]])


def table(data):
    head = ["kernel", "config", "regs", "spill", "smem KB", "occ. (CTAs)", "all", "HGMMA / HMMA",
            "EX2", "FMUL+FADD+FFMA", "FSEL+FSETP", "int", "LDS / LDSM", "cyc tensor", "cyc MUFU",
            "cyc FP32", "cyc issue", "bound", "tensor FLOP / useful", "TFLOP/s (% peak) raw",
            "TFLOP/s (% peak) cal."]

    def row(r):
        if "per_pair" not in r:
            return [r["name"], r.get("config", ""), *["-"] * (len(head) - 3),
                    (r.get("error") or "?")[:80].replace("|", "/")]
        pp, cy, pr = r["per_pair"], r["cycles_per_pair"], r["predicted"]
        shapes = ", ".join(sorted({s.split(".", 1)[1] for s in r["shapes"]})) or "-"
        mma = f"{_f(pp['hgmma'])} / {_f(pp['hmma'])} ({shapes})"
        spill = f"{r['stack_bytes']} B" if r["spills"] else "0"
        return [r["name"], r["config"], r["regs"], spill, _f(r["smem_bytes"] / 1024, 1),
                f"{100 * r['occupancy']:.1f}% ({r['ctas_per_sm']})", _f(pp["all"], 1), mma,
                _f(pp["mufu_ex2"]), _f(pp["fp32_mul_add_fma"], 1), _f(pp["fp32_sel_setp"], 1),
                _f(pp["int_addr"], 1), f"{_f(pp['lds'])} / {_f(pp['ldsm'])}", _f(cy["tensor"], 3),
                _f(cy["mufu"], 3), _f(cy["fp32"], 3), _f(cy["issue"], 3), pr["bound_by"],
                _f(r.get("tensor_flop_ratio")),
                f"{pr['overlap']['tflops']:.0f} ({pr['overlap']['pct_bf16_peak']:.1f}%)",
                f"{_f(pr.get('calibrated_tflops'), 0)} "
                f"({_f(pr.get('calibrated_pct_bf16_peak'), 1)}%)"]

    by_name = {r["name"]: r for r in data["variants"]}
    rows = [data["anchor"]] + [by_name[n] for n in sorted(data["best"])] + data["cuda"]
    sums_head = ["forward + backward (fwd + dq + dr; `_batch`: fwd + symmetric bwd; best "
                 "config each)",
                 "predicted TFLOP/s raw (overlap / no overlap)", "% bf16 peak raw",
                 "calibrated TFLOP/s", "% peak cal."]
    sums = [[s["name"], f"{p['overlap']['tflops']:.0f} / {p['no_overlap']['tflops']:.0f}",
             f"{p['overlap']['pct_bf16_peak']:.1f}", _f(p.get("calibrated_tflops"), 0),
             _f(p.get("calibrated_pct_bf16_peak"), 1)]
            for s, p in ((s, s["predicted"]) for s in data["fwd_bwd"])]
    return _md_table(head, [row(r) for r in rows]) + "\n\n" + _md_table(sums_head, sums)


# ----------------------------------------------------------- previous vs current

ANCHOR = "FA-2 anchor"
FWD_BWD_COMPARED = tuple(f"fwd+bwd_bf16_{metric}{batch}" for metric in ("sqeuclidean", "dot")
                         for batch in ("", "_batch"))  # _batch: fwd + the symmetric bwd
COMPARED = [  # (column, the cell of one JSON's row); a KeyError is a cell that does not apply
    ("best config", lambda r: r["config"]),
    ("regs", lambda r: r["regs"]),
    ("spills", lambda r: f"{r['stack_bytes']} B" if r["spills"] else "no"),
    ("instr. / pair", lambda r: _f(r["per_pair"]["all"], 1)),
    ("MUFU.EX2 / pair", lambda r: _f(r["per_pair"]["mufu_ex2"])),
    ("bound", lambda r: r["predicted"]["bound_by"]),
    ("% bf16 peak raw", lambda r: _f(r["predicted"]["overlap"]["pct_bf16_peak"], 1)),
    ("% peak cal.", lambda r: _f(r["predicted"].get("calibrated_pct_bf16_peak"), 1)),
]


def _kernels(data):
    """{row label: row} of one JSON: the anchor, each kernel's best config, the fwd+bwd sums."""
    by_name = {r["name"]: r for r in data["variants"]}
    out = {ANCHOR: data["anchor"]}
    out.update((family(n), by_name[n]) for n in data["best"])
    for s in data["fwd_bwd"]:
        parts = [by_name[n] for n in s["parts"] if n in by_name]
        if s["name"] in FWD_BWD_COMPARED and len(parts) == len(s["parts"]):
            summed = {k: sum(p["per_pair"][k] for p in parts) for k in ("all", "mufu_ex2")}
            out[s["name"]] = dict(s, per_pair=summed)
    return out


def _cell(get, r):
    if r is None:
        return "—"
    try:
        return str(get(r))
    except KeyError:
        return "error" if "error" in r else "-"


def _old_new(get, old, new):
    a, b = _cell(get, old), _cell(get, new)
    if {a, b} <= {"-", "—"} and "-" in (a, b):  # no value on either side: does not apply
        return "-"
    return f"{a} → {b}" if a == b else f"{a} → **{b}**"


def _commit(data):
    return f"`{(data['env'].get('git_commit') or 'unknown')[:7]}`"


def comparison(old, new, old_path=PREVIOUS):
    """Previous vs current kernels vs the FA-2 anchor, one row per kernel: a markdown text."""
    a, b = _kernels(old), _kernels(new)
    sums = [k for k in FWD_BWD_COMPARED if k in a or k in b]
    labels = [ANCHOR] + sorted((set(a) | set(b)) - {ANCHOR, *sums}) + sums
    rows = [[k] + [_old_new(get, a.get(k), b.get(k)) for _, get in COMPARED] for k in labels]
    caption = (
        "**Previous → current kernels**, *predicted from compiled SASS*, never measured: "
        f"previous = commit {_commit(old)} (`{os.path.relpath(old_path, ROOT)}`), "
        f"current = commit {_commit(new)} (`{RESULTS.relative_to(ROOT)}`). Each cell is "
        "previous → current, **bold** where it changed, - where it does not apply, — where "
        "the kernel is in one JSON only; each side at its own best-predicted config, the "
        "FA-2 anchor first as the reference. \"% peak cal.\" uses each JSON's own "
        f"calibration factor ({old['calibration_factor']:.3f} → "
        f"{new['calibration_factor']:.3f}). The fwd+bwd rows sum instructions and EX2 per "
        "pair over the row's kernels (fwd + dq + dr; `_batch`: fwd + the symmetric backward) "
        "and repeat the fwd+bwd table's % peak."
        + (f" Previous: {old['env']['note']}." if old["env"].get("note") else ""))
    return caption + "\n\n" + _md_table(["kernel"] + [c for c, _ in COMPARED], rows)


def block(data, previous=None, previous_path=PREVIOUS):
    e, a = data["env"], data["anchor"]
    pa = a["predicted"]["overlap"]
    by_name = {r["name"]: r for r in data["variants"]}
    bounds = [by_name[n]["predicted"]["bound_by"] for n in data["best"] if n in by_name]
    lines = [
        f"*Predicted from compiled SASS*, not measured: triton {e['triton']}, {e['target']}, "
        f"{e['date']}; problem N = M = {e['problem']['N']}, D = {e['problem']['D']} "
        f"(`bench/results/sass_sm90.json`, written by `python bench/sass/report.py`).",
        "",
        f"Anchor: predicted {pa['tflops']:.0f} TFLOP/s ({pa['pct_bf16_peak']:.1f}% of the "
        f"{model.BF16_PEAK_TFLOPS:.1f} bf16 dense peak), "
        f"measured {anchor_fa2.MEASURED_TFLOPS:.0f}: "
        f"calibration factor **{data['calibration_factor']:.3f}** (measured / predicted), "
        "applied to every row's \"% peak cal.\". The measurement lies between the anchor's "
        f"no-overlap ({a['predicted']['no_overlap']['tflops']:.0f} TFLOP/s) and overlap bounds. "
        f"The anchor is tensor-bound; of the {len(bounds)} nbkernels Triton kernels shown, "
        f"{bounds.count('tensor')} are tensor-bound and the others issue-bound, where the "
        "factor carries the anchor's latency and scheduling losses over to a different "
        "bottleneck: read calibrated figures as a rough estimate, raw ones as a ceiling.",
        "",
        "Per-pair columns are thread-operations per query-reference pair in one main-loop "
        "iteration (Triton: inner D-loop counted ceil(D / BLOCK_D) times; csrc: per-loop "
        "trip counts of tile.cuh, `analyze.cuda_trips`); \"cyc\" columns are cycles per "
        "pair per SM on each pipe, \"bound\" the largest. \"spill\": stack bytes where "
        "the kernel spills. \"tensor FLOP / useful\" checks the loop finding: the "
        "tensor-core FLOP found in the loop over the FLOP the kernel's dots must do (1 = "
        "exact; the class forward adds its one-hot mass dot (in Triton two TF32 dots, p's high "
        "and low parts), 3xTF32 (csrc fp32) triples, the csrc fp32 "
        "backward recomputes the logits in each of its 2 dx slices). % peak counts 2·D FLOP "
        "per pair forward, 4·D per backward kernel (logit recompute + dx), 4·D for the "
        "anchor, of the bf16 dense peak for every dtype; calibrated = raw x the anchor's "
        "factor. One row per Triton kernel at its best-predicted autotune config (every "
        "config is in the JSON); the fwd+bwd table counts 8·N·M·D (the convention of "
        "Triton's attention benchmarks) over fwd + dq + dr, and for the `_batch` rows over "
        "fwd + the one symmetric backward kernel, whose tensor work is 6·N·M·D in all (so these "
        "rows can pass 100% of peak: they count work the symmetric kernel does not need).",
        "",
        table(data),
    ]
    if data["cuda_errors"]:
        lines += ["", "csrc/cuda not analysed: " + "; ".join(
            f"{k}: {v.splitlines()[0]}" for k, v in data["cuda_errors"].items())]
    if previous is not None:
        lines += ["", comparison(previous, data, previous_path)]
    return "\n".join(lines)


def _rounded(x):
    """Floats to 5 significant digits (the JSON stays diffable and small)."""
    if isinstance(x, float):
        return float(f"{x:.5g}")
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def _dump(data):
    """JSON with one line per record of the row lists (diffable, a few hundred KB)."""
    parts = []
    for k, v in data.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            body = ",\n".join("  " + json.dumps(r, default=str) for r in v)
            parts.append(f" {json.dumps(k)}: [\n{body}\n ]")
        else:
            parts.append(f" {json.dumps(k)}: {json.dumps(v, default=str)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def update_readme(text_block, readme=README):
    text = readme.read_text()
    pat = re.compile(re.escape(BEGIN) + r"\n.*?" + re.escape(END), re.S)
    if not pat.search(text):
        sys.exit(f"{readme}: markers {BEGIN} / {END} not found")
    readme.write_text(pat.sub(lambda m: BEGIN + "\n" + text_block + "\n" + END, text))


def compile_data(quick=False, jobs=2):
    """Compile and analyse every kernel: the JSON's content."""
    reason = build.unavailable_reason()
    if reason:
        sys.exit(f"cannot compile deviceless here: {reason}")
    t0 = time.time()
    rows, anchor, cuda, cuda_errors, factor = collect(quick, jobs)
    best = best_configs(rows)
    return {"env": env(), "model": {
                "sms": model.SMS, "clock_hz": model.CLOCK_HZ, "hbm_bytes_s": model.HBM_BYTES_S,
                "tensor_flop_per_clk_sm": model.TENSOR_RATE, "mufu_per_clk_sm": model.MUFU_RATE,
                "fp32_per_clk_sm": model.FP32_RATE,
                "issue_thread_instr_per_clk_sm": model.ISSUE_RATE,
                "bf16_peak_tflops": model.BF16_PEAK_TFLOPS},
            "calibration_factor": factor,
            "anchor_measured_tflops": anchor_fa2.MEASURED_TFLOPS,
            "budgets": {"mufu_ex2": {f"{k[0]}{'_class' if k[1] else ''}": v
                                     for k, v in budgets.MUFU_EX2_BUDGET.items()},
                        "peak_tolerance": budgets.PEAK_TOLERANCE},
            "anchor": anchor, "best": [r["name"] for r in best],
            "fwd_bwd": analyze.fwd_bwd_rows(best),
            "cuda": cuda, "cuda_errors": cuda_errors, "variants": rows,
            "seconds": round(time.time() - t0, 1)}


def load_previous(path):
    """The previous kernels' JSON, or None (no comparison) where it is missing."""
    if not Path(path).exists():
        print(f"{path} not found: no previous-kernels comparison", file=sys.stderr)
        return None
    return json.loads(Path(path).read_text())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--print", action="store_true", help="print the README block, write nothing")
    ap.add_argument("--quick", action="store_true", help="first autotune config only")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--render", "--from-json", dest="render", action="store_true",
                    help=f"re-render the README block from {RESULTS.name} and the previous "
                         "JSON, compile nothing")
    ap.add_argument("--previous", type=Path, default=PREVIOUS,
                    help=f"the previous kernels' JSON (default {PREVIOUS.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    data = json.loads(RESULTS.read_text()) if args.render else compile_data(args.quick, args.jobs)
    text = block(data, load_previous(args.previous), args.previous)
    if args.print:
        print(text)
        return
    if not args.render:
        RESULTS.write_text(_dump(_rounded(data)))
        print(f"wrote {RESULTS.relative_to(ROOT)} ({len(data['variants'])} variants, "
              f"{data['seconds']} s)")
    update_readme(text)
    print(f"updated {README.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
