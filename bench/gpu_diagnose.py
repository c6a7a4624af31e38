"""Rerun the inputs on which backend "triton" went wrong on an H200 (commit 5fa40b9,
../shared/gpu-evidence) and show, for the worst rows, every intermediate of the kernels
beside backend "torch" and a direct fp64 formula. Run it first on the next GPU.

    python bench/gpu_diagnose.py [--out DIR] [--device cuda] [--quick]

Time budget: under 90 s on an H100 / H200 with a cold Triton cache (NBK_TRITON_AUTOTUNE=0
is set here, so each kernel variant compiles once: about 10 compiles of a few seconds;
the largest case, N = 1500, runs in milliseconds). On the CPU, under
``TRITON_INTERPRET=1 NBK_TRITON_SIZES=gpu``, ``--quick`` runs the same code on smaller
inputs (a few minutes).

Cases (each in fp32 and, on a GPU, bf16): the batch loss with squared distances at
T = 1e-4, x ~ N(0, 2.6^2), D = 64, 20 classes, N = 1500 (wrong gradients on the H200);
at T = 0.05, x ~ N(0, 0.3^2), D = 100, 37 classes, N = 1031, drawn on the device as
the H200 run drew them and with a CPU generator (rows whose loss came out 0); and a
constructed row whose later tile sits 127.5 log2 units above its first one (the forward
rescale that ex2.approx.ftz flushed).

For each case: the relative error of the loss, of d/dx and the number of rows out of the
per-row tolerance of ``tests/lowtemp.py`` for both backends; then for the worst rows:
the loss of each; the main forward pass's anchor, sum, positives' sum, lse values and
exact-pass flag; the exact pass's output; the backward's per-row shift, correction,
weights and fix-up flag (``triton.lse_backward_rows``); the gradient row norms. Each case's
record is appended to DIR/gpu_diagnose.json as soon as it is done (a kill keeps it).
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NBK_TRITON_AUTOTUNE", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

import lowtemp  # noqa: E402
if os.environ.get("TRITON_INTERPRET") == "1":  # on the CPU: the GPU's arithmetic
    sys.path.insert(0, str(ROOT / "tests" / "triton"))
    import device_numerics  # noqa: E402
    device_numerics.install()
import nbkernels  # noqa: E402
from nbkernels.backends import triton as tb  # noqa: E402

WORST = 6


def _case_inputs(name, device, quick):
    gen = torch.Generator(device="cpu").manual_seed(0)
    if name.startswith("t1e-4"):
        n, d, c, scale, t = (300 if quick else 1500), 64, 20, 2.6, 1e-4
    else:
        n, d, c, scale, t = (260 if quick else 1031), 100, 37, 0.3, 0.05
    if name.endswith("device-generator"):
        dgen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(n, d, generator=dgen, device=device) * scale
        y = torch.randint(0, c, (n,), generator=dgen, device=device)
        return x.cpu().double(), y.cpu(), t
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) * scale
    return x, torch.randint(0, c, (n,), generator=gen), t


def _run(backend, x, y, t, device, dtype, weight):
    xx = x.to(device).requires_grad_()
    loss = nbkernels.nca_loss(xx, y.to(device), temperature=t, reduction="none",
                              backend=backend)
    (dx,) = torch.autograd.grad((loss * weight.to(device, loss.dtype)).sum(), (xx,))
    return loss.detach().double().cpu(), dx.double().cpu()


def _row_errors(loss, dx, want, tolerances):
    """Summary and per-row score: the worst ratio of error to the row's tolerance
    (``tests/lowtemp.py``; fp32 / fp64), else the row's relative gradient error."""
    ref = want["grads"][0]
    err_l = (loss - want["loss"]).abs()
    err_g = (dx - ref).abs()
    summary = dict(loss_rel=float(err_l.norm() / want["loss"].norm()),
                   dx_rel=float(err_g.norm() / ref.norm()),
                   finite=bool(torch.isfinite(loss).all() and torch.isfinite(dx).all()))
    score = err_g.norm(dim=1) / ref.norm(dim=1).clamp_min(1e-30)
    if tolerances:
        ratio_l = err_l / want["loss_tol"].clamp_min(1e-300)
        ratio_g = (err_g / want["grad_tols"][0].clamp_min(1e-300)).amax(1)
        summary.update(rows_out_of_tolerance_loss=int((ratio_l > 1).sum()),
                       rows_out_of_tolerance_dx=int((ratio_g > 1).sum()))
        score = torch.maximum(ratio_l, ratio_g)
    return summary, score


def _trace(x, y, t, device, dtype, weight):
    """The kernels' intermediates for the batch loss (launcher-level calls)."""
    q = x.to(device)
    labels = y.to(device)
    temp = torch.tensor(t, device=device, dtype=torch.float32)
    trace = {}
    precision = tb._default_precision()
    lse_all, lse_pos = tb.lse_forward_passes(q, q, labels, labels, temp, "sqeuclidean", 0, True,
                                             precision, None, trace)
    valid = trace["has_pos"] != 0
    g = torch.where(valid, weight.to(device, lse_all.dtype), 0.0)
    main, fix, flags = tb.lse_backward_rows(lse_all, lse_pos, g, -g)
    out = {k: v for k, v in trace.items()}
    out.update(final_lse_all=lse_all, final_lse_pos=lse_pos, bwd_shift=main[0],
               bwd_w_neg=main[1], bwd_w_pos=main[2], fix_shift=fix[0], fix_w_pos=fix[2],
               fix_flag=flags)
    return {k: v.detach().double().cpu() if v.is_floating_point() else v.cpu()
            for k, v in out.items()}


def _num(v):
    v = float(v)
    return v if math.isfinite(v) else str(v)


def diagnose(name, device, dtype, quick):
    x, y, t = _case_inputs(name, device, quick)
    xr = x.to(dtype)  # the oracle sees the rounded inputs
    weight = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(1),
                        dtype=torch.float64)
    # per-row tolerances for fp32 / fp64 inputs (16-bit ones round ds for the gradient dot)
    tolerances = dtype in (torch.float32, torch.float64)
    want = lowtemp.oracle(xr if tolerances else xr.double(), y, temperature=t, weight=weight)
    rec = dict(case=name, dtype=str(dtype).removeprefix("torch."), n=x.shape[0], d=x.shape[1],
               temperature=t)
    rows = {}
    for backend in ("triton", "torch"):
        t0 = time.time()
        loss, dx = _run(backend, xr, y, t, device, dtype, weight)
        summary, score = _row_errors(loss, dx, want, tolerances)
        summary["seconds"] = round(time.time() - t0, 2)
        rec[backend] = summary
        rows[backend] = (loss, dx, score)
    trace = _trace(xr, y, t, device, dtype, weight)
    worst = torch.argsort(rows["triton"][2].nan_to_num(float("inf")), descending=True)
    worst = worst[:WORST].tolist()
    rec["worst_rows"] = []
    for i in worst:
        row = dict(row=i, oracle_loss=_num(want["loss"][i]),
                   triton_loss=_num(rows["triton"][0][i]), torch_loss=_num(rows["torch"][0][i]),
                   triton_score=_num(rows["triton"][2][i]), torch_score=_num(rows["torch"][2][i]),
                   oracle_dx_norm=_num(want["grads"][0][i].norm()))
        row.update({k: _num(v[i]) for k, v in trace.items()})
        rec["worst_rows"].append(row)
    return rec


def rescale_case(device, dtype):
    """A query whose later tile sits 127.5 log2 units above its first one (metric "dot",
    T = 1), the forward's shift moving as far as it can at once."""
    from nbkernels.backends.triton import kernels as tk
    bn = max(c.kwargs["BLOCK_N"] for c in tk.GPU_FWD_CONFIGS)
    r = torch.zeros(3 * bn, 4, dtype=torch.float64)
    b = torch.zeros(3 * bn, dtype=torch.int64)
    r[bn + 3, 0] = 127.5 * math.log(2)
    r[2 * bn + 5, 0] = 80.0
    b[2 * bn + 5] = 1
    q = torch.zeros(2, 4, dtype=torch.float64)
    q[:, 0] = 1.0
    a = torch.ones(2, dtype=torch.int64)
    s = q @ r.T
    rec = dict(case="rescale", dtype=str(dtype).removeprefix("torch."),
               oracle_loss=float(torch.logsumexp(s[0], 0) - s[0, 2 * bn + 5]))
    for backend in ("triton", "torch"):
        loss = nbkernels.nca_loss(q.to(device, dtype), a.to(device), metric="dot",
                                  ref_embeddings=r.to(device, dtype), ref_labels=b.to(device),
                                  temperature=1.0, reduction="none", backend=backend)
        rec[backend + "_loss"] = [_num(v) for v in loss.double().cpu()]
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="smaller inputs (CPU interpreter)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_diagnose.json"
    dtypes = [torch.float32] + ([torch.bfloat16] if args.device == "cuda" else [])
    names = ["t1e-4", "t0.05-cpu-generator", "t0.05-device-generator"]
    env = dict(torch=torch.__version__, triton=getattr(tb.triton, "__version__", None),
               device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               interpret=os.environ.get("TRITON_INTERPRET", "0"))
    records = [dict(env=env)]
    for name in names + ["rescale"]:
        for dtype in dtypes:
            t0 = time.time()
            try:
                rec = (rescale_case(args.device, dtype) if name == "rescale"
                       else diagnose(name, args.device, dtype, args.quick))
            except Exception as e:  # a failing case is a finding, not the end of the run
                rec = dict(case=name, dtype=str(dtype), error=f"{type(e).__name__}: {e}")
            rec["wall_s"] = round(time.time() - t0, 1)
            records.append(rec)
            path.write_text(json.dumps(records, indent=1))
            print(json.dumps({k: v for k, v in rec.items() if k != "worst_rows"}), flush=True)
            for row in rec.get("worst_rows", [])[:3]:
                print("   ", json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
