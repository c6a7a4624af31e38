"""The latency model's ladder: minimal forms of the forward's main loop, from the exps
alone to the loop with its wgmma issued ahead, predicted from compiled SASS here and timed
on a GPU, so that the model's error on a whole kernel (1.74x on the bf16 forward) can be
pinned to a part of the loop: the exp unit, the tensor cores and the loads, their overlap,
two CTAs per SM, explicit async wgmma.

    python bench/sass/ladder.py                  # predict: bench/results/ladder_sm90[_tritonXY].json
    python bench/sass/ladder.py --time --out DIR # on a GPU: DIR/ladder.json, each rung timed
    python bench/sass/ladder.py --compare DIR/ladder.json   # measured / predicted, per rung

Every rung runs at N = M = 65536, D = 128 in bf16 (the target shape), one program per
BLOCK_M rows streaming all M references, as our forward. The predictions are the latency
model's (``latency.simulate_cubin``, ``latency.predict``: cycles at ``model.CLOCK_HZ``);
``--compare`` predicts each timed rung at the SM clock sampled while it ran
(``gpu_perf.sh``'s clocks.csv, ``_harness.annotate_clocks``), where there is one.
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from bench.sass import latency, overlap_probe  # noqa: E402

N = M = 65536
D = 128


@triton.jit
def exps(q, r, out, M, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """The exp unit alone: a register tile's exp2 and row sums per reference tile (no
    load, no MMA in the loop). The tile is one dot's, made before the loop, so that it
    has the wgmma accumulator's layout, as in the forwards (row sums mostly in-thread)."""
    o_m, o_d, b_q, b_l = overlap_probe._query_tile(q, BLOCK_M, D)
    o_n = tl.arange(0, BLOCK_N)
    b_base = tl.dot(b_q, tl.trans(tl.load(r + o_n[:, None] * D + o_d[None, :])))
    f = tl.full([], 1.0, tl.float32)
    for i_n in range(0, M, BLOCK_N):
        # by a factor that changes, which no compiler folds into the dot's accumulator (it
        # folds an added term)
        f += 1e-6
        b_l += tl.sum(tl.math.exp2(b_base * f), 1)
    tl.store(out + o_m, b_l)


@triton.jit
def mma(q, r, out, M, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """The loads and the tensor cores alone: each reference tile's dot and its row sums
    (no exp)."""
    o_m, o_d, b_q, b_l = overlap_probe._query_tile(q, BLOCK_M, D)
    for i_n in range(0, M, BLOCK_N):
        o_n = i_n + tl.arange(0, BLOCK_N)
        b_l += tl.sum(tl.dot(b_q, tl.trans(tl.load(r + o_n[:, None] * D + o_d[None, :]))), 1)
    tl.store(out + o_m, b_l)


# (name, kernel: a Triton function or an overlap_probe form, BLOCK_M, BLOCK_N, warps,
# stages); what each adds to the one before it is in RUNG_NOTES
RUNGS = [("exp", exps, 128, 128, 8, 1),
         ("mma", mma, 128, 128, 8, 3),
         ("plain", "plain", 128, 128, 8, 3),
         ("ahead", "ahead", 128, 128, 8, 3),
         ("plain_2cta", "plain", 64, 128, 4, 3),
         ("gluon_ahead", "gluon_ahead", 64, 128, 4, 3)]
RUNG_NOTES = {
    "exp": "exp2 + row sum of a register tile: the exp unit (16 a clock per SM) and issue",
    "mma": "cp.async reference tiles + wgmma + row sum: loads and tensor cores, no exp",
    "plain": "dot, exp2, row sum: the two serialised (Triton waits for its wgmma at once)",
    "ahead": "the next tile's dot written before this tile's exps (Triton's scheduling)",
    "plain_2cta": "plain at 64 x 128, 4 warps: two CTAs per SM drift apart and overlap",
    "gluon_ahead": "Gluon: the next wgmma issued async under this tile's exps, 2 CTAs per SM",
}


def _kernel(rung):
    fn = rung[1]
    if not isinstance(fn, str):
        return fn
    if fn.startswith("gluon"):
        return overlap_probe._gluon_kernel()
    return overlap_probe.FORMS[fn][0]


def _values(rung, q, r, out):
    name, fn, bm, bn, w, s = rung
    v = dict(q=q, r=r, out=out, M=M, BLOCK_M=bm, BLOCK_N=bn, D=D)
    if isinstance(fn, str) and fn.startswith("gluon"):
        v.update(STAGES=s, CARRY=False)
    return v


def predict(rung):
    """The latency model's record of one rung (compiled for sm_90 by this triton)."""
    import torch

    from bench.sass import build
    name, fn, bm, bn, w, s = rung
    bf16 = torch.empty(0, dtype=torch.bfloat16, device="meta")
    values = _values(rung, bf16, bf16, torch.empty(0, dtype=torch.float32, device="meta"))
    if isinstance(fn, str):
        # overlap_probe compiles its forms (the Gluon one through its own source)
        cubin, fn_name, shared = overlap_probe._compile(fn, values, w, s)
    else:
        c = build.compile_triton(fn, values, w, s, f"ladder_{name}_{bm}x{bn}w{w}s{s}")
        cubin, fn_name, shared = c.cubin, c.name, c.shared
    sim = latency.simulate_cubin(cubin, fn_name, shared, w)
    pred = latency.predict(sim.cycles_per_iter, M // bn, N // bm, sim.ctas_per_sm, 2 * N * M * D)
    return dict(rung=name, config=f"{bm}x{bn} w{w} s{s}", adds=RUNG_NOTES[name], regs=sim.regs,
                ctas_per_sm=sim.ctas_per_sm, cycles_per_iter=sim.cycles_per_iter,
                cycles_per_pair=sim.cycles_per_iter / (sim.ctas_per_sm * bm * bn),
                predicted_s=pred["time_s"])


def results_path(version=None):
    import _gluon_rows
    return _gluon_rows.results_path("ladder", version)


def time_rungs(out_dir, budget_s=40.0, dry=False):
    """Each rung launched at the target shape on the GPU and timed (CUDA events), its
    record written as it is taken (DIR/ladder.json); the output checked finite. ``dry``:
    on the CPU through the Triton interpreter at N = M = 256 (the launches' plumbing; the
    Gluon rung cannot run there and is recorded as an error)."""
    import torch

    import _harness as H
    deadline = time.monotonic() + budget_s
    dev = torch.device("cpu" if dry else "cuda")
    n = m = 256 if dry else N
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(n, D, generator=g) * 0.05).to(dev, torch.bfloat16 if not dry else
                                                    torch.float16)
    r = (torch.randn(m, D, generator=g) * 0.05).to(dev, q.dtype)
    out = torch.empty(n, device=dev, dtype=torch.float32)
    env = dict(H.env_info(dev), dry=dry)
    res = H.ResultFile(Path(out_dir) / "ladder.json", env)
    for rung in RUNGS:
        name, fn, bm, bn, w, s = rung
        rec = dict(name=name, rung=name, config=f"{bm}x{bn} w{w} s{s}", n=n, m=m)
        if time.monotonic() > deadline:
            res.add(**rec, status="skipped", reason=f"past the {budget_s:.0f} s budget")
            continue
        if dry and isinstance(fn, str) and fn.startswith("gluon"):
            res.add(**rec, status="skipped", reason="Gluon has no interpreter")
            continue
        try:
            kernel = _kernel(rung)
            args = dict(_values(rung, q, r, out), M=m)
            opts = dict(num_warps=w) if isinstance(fn, str) and fn.startswith("gluon") \
                else dict(num_warps=w, num_stages=s)

            def launch():
                kernel[(n // bm,)](**args, **opts)
            timing = H.timed(launch, dry, budget_s=0.2)
            ok = bool(torch.isfinite(out).all())
            res.add(**rec, status="ok" if ok else "error", time_s=timing,
                    **({} if ok else {"reason": "non-finite output"}))
        except Exception as e:  # noqa: BLE001 (a compile error is a result)
            res.add(**rec, status="error", reason=f"{type(e).__name__}: {str(e)[:300]}")
        H.log(f"ladder {name}: {res.records[-1]['status']} {res.records[-1].get('reason', '')}")
    return res.path


def compare(measured_path, predicted_path=None):
    """Markdown rows: each timed rung, measured against predicted (at its sampled clock)."""
    from bench.sass import model
    if not Path(measured_path).exists():
        return f"no {measured_path}: the ladder did not run"
    meas = json.loads(Path(measured_path).read_text())
    ver = tuple(int(x) for x in meas["env"]["triton"].split(".")[:2])
    pred = {p["rung"]: p for p in json.loads(
        Path(predicted_path or results_path(ver)).read_text())["rungs"]}
    rows = ["| rung | config | adds | measured | predicted | measured / predicted |",
            "|---|---|---|---:|---:|---:|"]
    for m in meas["records"]:
        p = pred.get(m["rung"])
        if m["status"] != "ok" or not p:
            rows.append(f"| {m['rung']} | {m['config']} | - | {m['status']} | - | - |")
            continue
        t = m["time_s"]["median"]
        tp = p["predicted_s"] * model.at_clock(m)
        rows.append(f"| {m['rung']} | {m['config']} | {p['adds']} | {1e3 * t:.3f} ms | "
                    f"{1e3 * tp:.3f} ms | {t / tp:.2f} |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--time", action="store_true", help="time each rung on the GPU")
    ap.add_argument("--out", help="with --time: the folder for ladder.json; else the "
                    "predictions' file (default bench/results/ladder_sm90[_tritonXY].json)")
    ap.add_argument("--budget-s", type=float, default=40.0)
    ap.add_argument("--dry", action="store_true",
                    help="with --time: CPU, Triton interpreter (TRITON_INTERPRET=1), N = 256")
    ap.add_argument("--compare", metavar="LADDER_JSON")
    args = ap.parse_args(argv)
    if args.compare:
        print(compare(args.compare))
        return 0
    if args.time:
        print(f"wrote {time_rungs(args.out or '.', args.budget_s, args.dry)}")
        return 0
    from bench.sass import build, report
    why = build.unavailable_reason()
    if why:
        sys.exit(f"cannot compile for sm_90 here: {why}")
    rows = []
    for rung in RUNGS:
        try:
            rows.append(predict(rung))
        except Exception as e:  # noqa: BLE001 (a form this triton cannot compile is a result)
            rows.append(dict(rung=rung[0], error=f"{type(e).__name__}: {str(e)[:300]}"))
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out) if args.out else results_path()
    out.write_text(json.dumps(dict(env=report.env(), what=__doc__.split("\n\n")[0],
                                   shape=dict(n=N, m=M, d=D, dtype="bf16"), rungs=rows),
                              indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
