"""The speed check for a GPU session: every Triton kernel variant worth deciding between,
side by side in one process, beside FlexAttention, torch.compile of the plain formula,
SDPA flash attention and the FlashAttention-2 anchor of bench/sass/anchor_fa2.py, at the
target shape N = M = 65536, D = 128, 1000 classes, T = 0.1.

Variants: the sm_90 config table's entry and the next best predicted candidates
(``bench/results/config_table_sm90.json``, ``TOP`` of each) of the bf16 lse forward and
backward, and the two best of the class forward (soft_knn_predict); the TF32
forward+backward with the table's configs; the loss forward, forward+backward and
soft_knn_predict with the Gluon main passes (the opt-in variant "sm90_gluon", sm_90
only); each
through ``nbkernels.backends.triton.kernels.fixed_configs``, so that every timing
compiles only what it times. Each variant is first checked against backend "torch" on
the same inputs at N = CHECK_N (the sizes are not specialised: the same compiled kernel)
and is timed only if it passes. Each measured variant is stored with its SASS-model
prediction, so that the model's ranking can be checked against the GPU's.

Records go to ``$OUT/gpu_perf.json`` as they happen (rewritten atomically after each);
the table is printed last and written to ``$OUT/gpu_perf.md``. ``--budget-s`` bounds the
whole run: a step that would start with less than its need left is recorded as skipped.

``--dry``: the same code on the CPU through the Triton interpreter (TRITON_INTERPRET=1),
at tiny sizes with fp16 for bf16, so that CI runs every path of this script
(tests/triton/test_gpu_perf_dry.py). Its times are meaningless and labelled dry.
"""
import argparse
import functools
import gc
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402

import _harness as H  # noqa: E402
import _gluon_rows as GR  # noqa: E402
import _pins as V  # noqa: E402
import _providers as P  # noqa: E402

TARGET = dict(n=65536, d=128, classes=1000, t=0.1)
DRY = dict(n=256, d=16, classes=7, t=0.1)
CHECK_N = {"gpu": 4096, "dry": 48}
INPUTS = "rows N(0, 0.3^2) (unit-norm where a record says so), labels uniform (Run.inputs)"
# the kinds of the forwards' main passes (``kernels.VARIANTS``)
MAIN = ("fwd_main", "fwd_class_main")
TOP = 3
# the check: relative error (max over the output and the gradient, by norms) against
# backend "torch" on the same inputs, a sanity check of each compiled config (the
# accuracy tests are tests/triton): bf16 / fp16 gradients round ds to 8 / 11 bits, fp32
# runs TF32 dots (10 bits) on both sides
CHECK_TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-2}
TABLE_JSON = ROOT / "bench" / "results" / "config_table_sm90.json"


def _table_entry(kernel):
    """The bf16 D <= 128 entry of the config table as the running triton chooses it: from
    its --fix run's JSON (every entry chosen again there) where one exists, else from the
    table's own (triton 3.9)."""
    from nbkernels.backends import variants
    ver = "".join(map(str, variants.triton_version()))
    for path in (TABLE_JSON.with_name(f"config_table_sm90_triton{ver}.json"), TABLE_JSON):
        entries = json.loads(path.read_text())["entries"] if path.exists() else []
        entry = next((e for e in entries if e["kernel"] == kernel and e["dtype_class"] == "16"
                      and e["bucket"] == "128" and "candidates" in e), None)
        if entry:
            return entry
    raise LookupError(f"no {kernel} entry in {TABLE_JSON}")


def _candidates(kernel):
    """[(config tuple, predicted seconds, is the table's choice)] of the bf16 D <= 128 entry."""
    entry = _table_entry(kernel)
    # the table's ranking: the latency model's time (the pipe model's where a JSON predates it)
    def pred(c):
        return c.get("latency_s") or c["predicted_s"]
    ok = sorted((c for c in entry["candidates"] if c["ok"]), key=pred)
    chosen = tuple(entry["chosen"])
    picks = [c for c in ok if tuple(c["config"]) == chosen]
    picks += [c for c in ok if tuple(c["config"]) != chosen][:TOP - 1]
    return [(tuple(c["config"]), pred(c), tuple(c["config"]) == chosen) for c in picks]


LATENCY_JSON = ROOT / "bench" / "results" / "sass_latency_sm90.json"
LATENCY_TOP = 2


def _latency_candidates(kernel, taken):
    """[(config tuple, predicted seconds)]: the latency model's best bf16 configs
    (``bench/sass/latency_report.py``; ``fwd``: the lse forward, ``bwd``: the symmetric
    backward) that ``taken`` does not hold, so that the GPU checks its ranking too."""
    data = json.loads(LATENCY_JSON.read_text())
    prefix = "fwd_bf16_sqeuclidean_" if kernel == "fwd" else "bwd_sym_bf16_sqeuclidean_"
    rows = sorted((r for r in data["variants"] + data.get("sweep", [])
                   if r["name"].startswith(prefix)), key=lambda r: r["latency"]["time_s"])
    picks = [r for r in rows if tuple(r["config_tuple"]) not in taken][:LATENCY_TOP]
    return [(tuple(r["config_tuple"]), r["latency"]["time_s"]) for r in picks]


def latency_prediction(kernel, cfg):
    """The latency model's predicted seconds of bf16 ``kernel`` at ``cfg`` (None if absent)."""
    if cfg is None:
        return None
    data = json.loads(LATENCY_JSON.read_text())
    prefix = "fwd_bf16_sqeuclidean_" if kernel == "fwd" else "bwd_sym_bf16_sqeuclidean_"
    return next((r["latency"]["time_s"] for r in data["variants"] + data.get("sweep", [])
                 if r["name"].startswith(prefix) and tuple(r["config_tuple"]) == tuple(cfg)),
                None)


class Run:
    def __init__(self, args):
        self.dry = args.dry
        self.device = torch.device("cpu" if args.dry else "cuda")
        self.shape = DRY if args.dry else TARGET
        self.check_n = CHECK_N["dry" if args.dry else "gpu"]
        self.half = torch.float16 if args.dry else torch.bfloat16
        self.deadline = time.monotonic() + args.budget_s
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        env = H.env_info(self.device)
        env["dry"] = self.dry
        # the rows' distribution decides how many rows the exact pass redoes
        env["inputs"] = INPUTS
        self.file = H.ResultFile(self.out / "gpu_perf.json", env)
        self.peak = None if args.dry else _peak(env.get("gpu_name"))

    # -------------------------------------------------------------------- helpers
    def release(self):
        """Drop what a provider left cached (the next one may need the memory)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def left(self):
        return self.deadline - time.monotonic()

    def inputs(self, n, dtype, seed=0, unit=False):
        """N(0, 0.3^2) embeddings (``unit``: scaled to unit norm, as metric-learning
        embeddings usually are) and uniform labels."""
        d, c = self.shape["d"], self.shape["classes"]
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, d, generator=g) * 0.3
        if unit:
            x = torch.nn.functional.normalize(x, dim=1)
        y = torch.randint(0, c, (n,), generator=g).to(self.device)
        return x.to(self.device, dtype), y

    def time(self, fn, setup=None):
        """Seconds of ``fn()`` after one untimed call (``H.timed``)."""
        return H.timed(fn, self.dry, setup=setup)

    def record(self, name, mode, dtype, flop, need_s=10, **kw):
        """Run ``kw['run']()`` (returns a timing dict) and store it, or store why not."""
        run, info = kw.pop("run"), kw.pop("info", {})
        rec = dict(name=name, mode=mode, dtype=str(dtype).removeprefix("torch."), **kw,
                   n=self.shape["n"], d=self.shape["d"], classes=self.shape["classes"])
        if self.left() < need_s:
            rec.update(status="skipped", reason=f"{self.left():.0f} s left, needs ~{need_s} s")
            return self.file.add(**rec)
        t0 = time.monotonic()
        try:
            timing = run()
        except Exception as e:  # noqa: BLE001 (an OOM or a compile error is a result)
            rec.update(status="error", reason=f"{type(e).__name__}: {str(e)[:300]}")
        else:
            if isinstance(timing, str):
                rec.update(status="skipped", reason=timing)
            else:
                rec.update(status="ok", time_s=timing)
                if self.peak and flop:
                    tflops = flop / timing["median"] / 1e12
                    rec.update(tflops=tflops, peak_fraction=tflops / self.peak[rec["dtype"]])
        rec.update(info, wall_s=time.monotonic() - t0)
        H.log(f"{name} {mode}: {rec['status']} {rec.get('reason', '')}"
              f"{_ms(rec['time_s']['median']) if rec['status'] == 'ok' else ''}")
        return self.file.add(**rec)

    # -------------------------------------------------------------------- ours
    def check(self, call, dtype, backward, unit=False):
        """Relative error of ``call(x, y, backend)`` (and of dx of its mean) against backend
        "torch", by norms over every row."""
        x, y = self.inputs(self.check_n, dtype, seed=1, unit=unit)
        outs = []
        for backend in ("triton", "torch"):
            xi = x.clone().requires_grad_(backward)
            out = call(xi, y, backend)
            if backward:
                out.float().mean().backward()
            outs.append([out.detach().float()] + ([xi.grad.float()] if backward else []))
        errs = [float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(*outs)]
        finite = all(torch.isfinite(a).all() for a in outs[0])
        return max(errs) if finite else math.inf

    def ours(self, name, call, dtype, mode, fwd_cfg=None, bwd_cfg=None, predicted_s=None,
             need_s=25, unavailable=None, bwd_variant=None, class_tile=None, fwd_variant=None,
             sym_form=None, unit=False, main_variant=None, check_call=None):
        """Check and time ``call`` with the triton backend, at the given configs (None: the
        table's), backward and loss-forward variants (``kernels.VARIANTS``; None: the one
        chosen; ``main_variant``: the forwards' main passes, kinds in ``MAIN``), class tile
        width of the class forward (None: ``class_block_cap``'s) and
        form of the symmetric backward ("two": the two-exp kernel; None: as the rows allow,
        ``rows.one_exp_rows``), on N(0, 0.3^2) embeddings or, ``unit``, unit-norm ones;
        checked through ``check_call`` where given (at CHECK_N rows, a call whose loops
        run as the timed one's do)."""
        from nbkernels.backends import triton as tb
        from nbkernels.backends.triton import configs as tc
        from nbkernels.backends.triton import kernels as tk
        fwd = None if fwd_cfg is None else tc._config(*fwd_cfg, "fwd")
        bwd = None if bwd_cfg is None else tc._config(*bwd_cfg, "bwd")
        backward = mode == "fwdbwd"
        n, d = self.shape["n"], self.shape["d"]
        info = dict(fwd_config=fwd_cfg, bwd_config=bwd_cfg, predicted_s=predicted_s)
        if unit:
            info["inputs"] = "unit-norm rows"
        if sym_form:
            info["sym_form"] = sym_form
        if main_variant:
            info["main_pass"] = main_variant
        if class_tile:
            info["class_tile"] = class_tile
        if backward:
            precision = tb._default_precision() if dtype == torch.float32 else "ieee"
            info["bwd_precision"] = precision
        if dtype != torch.float32 and (fwd_cfg or bwd_cfg) and name == "nbkernels-triton":
            # the latency model's prediction of what this row times: the forward, or the
            # forward and the batch backward
            parts = [latency_prediction("fwd", fwd_cfg)] + (
                [latency_prediction("bwd", bwd_cfg)] if backward else [])
            info["predicted_latency_s"] = None if None in parts else sum(parts)

        def run():
            reason = unavailable and unavailable(self.device)
            if not reason and bwd_variant and backward:
                reason = V.variant_unavailable(bwd_variant, self.device, info["bwd_precision"])
            if reason:
                return reason
            tc.LAUNCHED.clear()
            with tk.fixed_configs(fwd, bwd), V.pinned(("bwd", "bwd_class"), bwd_variant), \
                    V.pinned(("fwd",), fwd_variant), V.pinned(MAIN, main_variant), \
                    V.class_tile(class_tile), \
                    V.sym_form(sym_form) as forms:
                err = self.check(check_call or call, dtype, backward, unit)
                info["check_rel_err"] = err
                # what ran, from the launchers' own bookkeeping
                info["fwd_variant"] = V.launched(("fwd",)) or None
                info["main_variant"] = V.launched(MAIN) or None
                if main_variant and info["main_variant"] != main_variant:
                    return f"main pass {main_variant!r} did not run (its why_not refused)"
                if backward:
                    info["bwd_variant"] = V.launched(("bwd", "bwd_class"))
                if not err <= CHECK_TOL[dtype]:
                    return f"check failed: rel err {err:.3g} > {CHECK_TOL[dtype]:g}"
                x, y = self.inputs(n, dtype, unit=unit)
                if call is nca or isinstance(call, GR.Forward):
                    # the rows the forward's exact pass redoes on these inputs (the
                    # backward's fix-up launch takes the rows flagged 2 alike)
                    info["exact_rows"] = exact_rows(x, y, self.shape["t"])
                if backward:
                    x.requires_grad_(True)
                    forms.clear()
                    timing = self.time(lambda: call(x, y, "triton").float().mean().backward(),
                                       setup=lambda: setattr(x, "grad", None))
                    # which symmetric kernel worked in the timed calls (1: one exp2 per pair)
                    info["sym_one_exp"] = sorted({int(ok) for ok in forms}) or None
                    if info["sym_one_exp"] != [1] and "predicted_latency_s" in info:
                        # the latency model's symmetric rows are the one-exp kernel's
                        info["predicted_latency_s"] = None
                    return timing
                with torch.no_grad():
                    return self.time(lambda: call(x, y, "triton"))
        flop = (8 if backward else 2) * n * n * d
        return self.record(name, mode, dtype, flop, need_s=need_s, run=run, info=info)

    # -------------------------------------------------------------------- others
    def provider(self, name, mode, dtype, flop, make, need_s=30):
        def run():
            reason = P.unavailable(name, self.device)
            if reason:
                return reason
            x, y = self.inputs(self.shape["n"], dtype)
            if mode == "fwdbwd":
                x.requires_grad_(True)
                fn = make(x, y)
                return self.time(lambda: fn().backward(), setup=lambda: setattr(x, "grad", None))
            fn = make(x, y)
            with torch.no_grad():
                return self.time(fn)
        return self.record(name, mode, dtype, flop, need_s=need_s, run=run)

    def fa2_anchor(self):
        """bench/sass/anchor_fa2.py's kernel over q = k = v = x as one head."""
        from sass import anchor_fa2 as A
        n, d = self.shape["n"], self.shape["d"]

        def run():
            x, _ = self.inputs(n, self.half)
            o = torch.empty_like(x)
            grid = (n // A.BLOCK_M, 1)

            def go():
                A.fa2_fwd_kernel[grid](x, x, x, o, d ** -0.5, n * d, d, 1, n, HEAD_DIM=d,
                                       BLOCK_M=A.BLOCK_M, BLOCK_N=A.BLOCK_N,
                                       num_warps=A.NUM_WARPS, num_stages=A.NUM_STAGES)
            go()
            return self.time(go)
        return self.record("anchor-fa2", "fwd", self.half, 4 * n * n * d, need_s=15, run=run)


def _peak(gpu_name):
    import bench_gpu
    peaks = {"bfloat16": bench_gpu.peak_tflops(gpu_name, "bfloat16"),
             "float32": bench_gpu.peak_tflops(gpu_name, "float32")}
    return peaks if all(peaks.values()) else None


def _ms(s):
    return f" {s * 1e3:.3f} ms"


def nca(x, y, backend, t=0.1):
    """Per-row losses (the check compares every row; the backward takes their mean)."""
    import nbkernels
    return nbkernels.nca_loss(x, y, temperature=t, reduction="none", backend=backend)


def exact_rows(x, y, t):
    """How many rows of the batch ``x`` (labels ``y``, temperature ``t``) the lse main pass
    flags for the exact pass: {"both": both sums again, "positives": lse_pos only}."""
    from nbkernels import kernel_inputs
    from nbkernels.backends import triton as tb
    q, _, kmetric = kernel_inputs.prepare(x.detach(), x.detach(), "sqeuclidean")
    trace = {}
    with torch.no_grad():
        tb.lse_forward_passes(q, q, y, y, torch.tensor(t, device=x.device), kmetric, 0, True,
                              tb._default_precision(), None, trace)
    return {"both": int((trace["redo"] == 1).sum()),
            "positives": int((trace["redo"] == 2).sum())}


def knn(classes):
    def call(x, y, backend, t=0.1):
        import nbkernels
        return nbkernels.soft_knn_predict(x, x, y, classes, temperature=t, exclude_self=True,
                                          backend=backend)
    return call


def _form(flags):
    """The symmetric backward's form that worked in a record's timed calls."""
    return {(1,): ", one exp2/pair", (0,): ", two exp2/pair"}.get(tuple(flags or ()),
                                                                   "" if not flags else ", mixed")


def table(records):
    rows = ["| variant | mode | dtype | config fwd / bwd | bwd kernel | "
            "predicted ms (pipe / latency) | measured ms | TFLOP/s | % peak | check |",
            "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in records:
        cfg = " / ".join("x".join(map(str, c)) if c else "table"
                         for c in (r.get("fwd_config"), r.get("bwd_config")))
        pred = " / ".join(f"{x * 1e3:.2f}" if x else "-"
                          for x in (r.get("predicted_s"), r.get("predicted_latency_s")))
        got = r.get("time_s", {}).get("median") if r["status"] == "ok" else None
        rows.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["name"] + (f" (class tile {r['class_tile']})" if r.get("class_tile") else "")
            + (f" (fwd {r['fwd_variant']})" if r.get("fwd_variant") else "")
            + (f" (main pass {r['main_variant']})" if r.get("main_variant") else "")
            + (f" ({r['inputs']})" if r.get("inputs") else "")
            + (" (exact pass: {both} + {positives} rows)".format(**r["exact_rows"])
               if r.get("exact_rows") else ""),
            r["mode"], r["dtype"], cfg if r.get("fwd_config") or r.get("bwd_config")
            else "-" if not r["name"].startswith("nbkernels") else "table",
            (r.get("bwd_variant") or "-") + _form(r.get("sym_one_exp")), pred,
            f"{got * 1e3:.3f}" if got else r["status"] + (f": {r['reason'][:60]}"
                                                          if r.get("reason") else ""),
            f"{r['tflops']:.0f}" if r.get("tflops") else "-",
            f"{100 * r['peak_fraction']:.1f}" if r.get("peak_fraction") else "-",
            f"{r['check_rel_err']:.1e}" if r.get("check_rel_err") is not None else "-"))
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=210.0)
    ap.add_argument("--dry", action="store_true", help="CPU, Triton interpreter, tiny sizes")
    args = ap.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        ap.error("no CUDA device here: run on a GPU, or --dry (CPU, TRITON_INTERPRET=1)")
    run = Run(args)
    # fp32 = TF32 dots, as bench_gpu (in the dry run too: the launchers then choose as
    # on an sm_90, which the interpreter stands in for)
    torch.backends.cuda.matmul.allow_tf32 = True
    n, d, c = run.shape["n"], run.shape["d"], run.shape["classes"]
    fwd_cands, bwd_cands = _candidates("fwd"), _candidates("bwd")
    (table_fwd, fwd_pred, _), (table_bwd, _, _) = fwd_cands[0], bwd_cands[0]
    half, t = run.half, run.shape["t"]
    # most wanted first: ours with the table's configs, the alternatives and anchors at the
    # same shape, then the other candidate configs (the model's ranking) and TF32
    run.ours("nbkernels-triton", nca, half, "fwd", table_fwd, table_bwd, fwd_pred)
    # on unit-norm rows too, which flag no row for the exact pass (N(0, 0.3^2) rows at T =
    # 0.1 flag 29% of them: bench/results/exact_pass_rows.json; the records count them)
    run.ours("nbkernels-triton", nca, half, "fwd", table_fwd, table_bwd, fwd_pred, unit=True)
    run.ours("nbkernels-triton", nca, half, "fwdbwd", table_fwd, table_bwd)
    # the loss forward's Gluon main pass (the opt-in variant "sm90_gluon"), the forward the
    # latency model has fastest under triton 3.6 to 3.9, checked against backend "torch"
    # first: through nbkernels (its form in gluon_lse.FORMS; the model's second form last)
    gluon = GR.candidates()
    for mode in ("fwd", "fwdbwd"):
        run.ours("nbkernels-triton", nca, half, mode, main_variant="sm90_gluon",
                 predicted_s=gluon[0][2] if gluon and mode == "fwd" else None,
                 unavailable=GR.unavailable)
    # the symmetric backward's two forms (one or two exp2 per pair) on unit-norm rows (the
    # N(0, 0.3^2) rows' normalizers spread over 137.5 binades, within the one-exp kernel's
    # 140 but near it: the records say which form worked)
    run.ours("nbkernels-triton", nca, half, "fwdbwd", table_fwd, table_bwd, unit=True)
    run.ours("nbkernels-triton", nca, half, "fwdbwd", table_fwd, table_bwd, unit=True,
             sym_form="two")
    knn_cands = _candidates("fwd_class")
    run.ours("nbkernels-triton-knn", knn(c), half, "fwd", predicted_s=knn_cands[0][1])
    # with the class forward's Gluon main pass (the opt-in variant "sm90_gluon"; it takes
    # class tiles of 16, the launcher's choice at the target shape, also at the check's,
    # which has C / 10 classes: several reference tiles a class tile, as at the target)
    run.ours("nbkernels-triton-knn", knn(c), half, "fwd", main_variant="sm90_gluon",
             class_tile=16, predicted_s=GR.class_prediction(), unavailable=GR.unavailable,
             check_call=knn(max(1, c // 10)))
    run.provider("sdpa-flash", "fwd", half, 4 * n * n * d, lambda x, y: P.sdpa_anchor(x, t),
                 need_s=10)
    run.fa2_anchor()
    for name, make in (("flex", lambda x, y: P.FlexNCA(x, y, t)),
                       ("compile", lambda x, y: functools.partial(
                           P.compiled(P.plain_nca_loss, False), x, y, t))):
        for mode, flop in (("fwd", 2 * n * n * d), ("fwdbwd", 8 * n * n * d)):
            run.provider(name, mode, half, flop, make, need_s=40)
            run.release()
    # the latency model's own picks (bench/sass/latency_report.py), where they differ
    for cfg, pred in _latency_candidates("fwd", {c for c, _, _ in fwd_cands}):
        run.ours("nbkernels-triton", nca, half, "fwd", cfg, table_bwd)
    for cfg, pred in _latency_candidates("bwd", {c for c, _, _ in bwd_cands}):
        run.ours("nbkernels-triton", nca, half, "fwdbwd", table_fwd, cfg)
    for cfg, pred, chosen in fwd_cands[1:]:
        run.ours("nbkernels-triton", nca, half, "fwd", cfg, table_bwd, pred)
    for cfg, pred, chosen in bwd_cands[1:]:
        run.ours("nbkernels-triton", nca, half, "fwdbwd", table_fwd, cfg)
    run.ours("nbkernels-triton", nca, torch.float32, "fwd")
    # TF32 backward: the sm_90 transposed variant (chosen there) and the generic kernel
    run.ours("nbkernels-triton", nca, torch.float32, "fwdbwd",
             bwd_variant="sm90_tf32_transposed")
    run.ours("nbkernels-triton", nca, torch.float32, "fwdbwd", bwd_variant="generic")
    # the 16-bit loss forward both ways at the table's config: the variant the launcher did
    # not choose (the ahead forward holds under triton 3.6 and 3.7)
    from nbkernels.backends.triton import kernels as tk
    chosen = tk.choose("fwd", run.device, "ieee").name
    run.ours("nbkernels-triton", nca, half, "fwd",
             fwd_variant="generic" if chosen == "sm90_fwd_ahead" else "sm90_fwd_ahead")
    # the class forward at the model's next best config (the 2 stages it took under 3.6
    # before its loads were unmasked)
    for cfg, pred, _ in knn_cands[1:2]:
        run.ours("nbkernels-triton-knn", knn(c), half, "fwd", cfg, predicted_s=pred)
    # the class forward's tile: class_block_cap's 16 (M >= 20 C) against the 32 before it
    run.ours("nbkernels-triton-knn", knn(c), half, "fwd", class_tile=32)
    # the Gluon loss forward's second form by the latency model (its ranking on the GPU)
    for form, name, pred in gluon[1:]:
        run.ours(f"v4-gluon {name}", GR.Forward(form, nca), half, "fwd", predicted_s=pred,
                 unavailable=GR.unavailable)
    text = table(run.file.records)
    (run.out / "gpu_perf.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
