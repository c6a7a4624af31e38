"""Bitwise determinism of the fused backward (issue 3): same inputs, same bits, every time.

    python bench/check_determinism.py --device cuda --out $OUT/determinism.json
    python bench/check_determinism.py --device cpu --backend torch --n 512   # plumbing check

For each dtype, runs each case ``--repeats`` times from identical inputs and compares every
output and every gradient (queries, references, temperature) with ``torch.equal`` against
the first run. The cases: the batch loss (references = queries, whose gradient is the sum
of both roles), the cross-batch loss, and soft_knn_predict with a random upstream
gradient. Exit status 1 if any run differs.

The Triton kernels run with one fixed config (NBK_TRITON_AUTOTUNE=0 unless set
otherwise): every config is deterministic by construction (one writer per output
element), and autotuning would only add benchmark time.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("NBK_TRITON_AUTOTUNE", "0")  # before nbkernels imports triton

import _harness as H  # noqa: E402
import nbkernels  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_case(case, n, d, classes, dtype, device, backend):
    """One run from seeded inputs: the tuple of all outputs and gradients."""
    g = torch.Generator().manual_seed(0)
    x = (0.1 * torch.randn(n, d, generator=g)).to(device, dtype).requires_grad_(True)
    r = (0.1 * torch.randn(n + 7, d, generator=g)).to(device, dtype).requires_grad_(True)
    a = torch.randint(0, classes, (n,), generator=g).to(device)
    b = torch.randint(0, classes, (n + 7,), generator=g).to(device)
    t = torch.tensor(0.1, device=device, requires_grad=True)
    if case == "batch":
        out = nbkernels.nca_loss(x, a, temperature=t, backend=backend)
        out.backward()
        return out.detach(), x.grad, t.grad
    if case == "cross":
        out = nbkernels.nca_loss(x, a, ref_embeddings=r, ref_labels=b, temperature=t,
                                 backend=backend)
        out.backward()
        return out.detach(), x.grad, r.grad, t.grad
    if case == "soft_knn":
        out = nbkernels.soft_knn_predict(x, r, b, classes, temperature=t, backend=backend)
        up = torch.randn(out.shape, generator=g).to(device, out.dtype)
        out.backward(up)
        return out.detach(), x.grad, r.grad, t.grad
    raise ValueError(case)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    results, ok_all = [], True
    for dtype in args.dtypes.split(","):
        for case in ("batch", "cross", "soft_knn"):
            rec = dict(case=case, dtype=dtype, n=args.n, d=args.d, classes=args.classes,
                       backend=args.backend, repeats=args.repeats)
            try:
                first = run_case(case, args.n, args.d, args.classes, DTYPES[dtype], device,
                                 args.backend)
                same = all(
                    all(torch.equal(u, v) for u, v in zip(first, run_case(
                        case, args.n, args.d, args.classes, DTYPES[dtype], device, args.backend)))
                    for _ in range(args.repeats - 1))
                finite = all(bool(torch.isfinite(u).all()) for u in first)
                rec.update(status="ok" if same and finite else "FAIL", bitwise_equal=same,
                           finite=finite)
            except Exception as e:
                rec.update(status="error", reason=f"{type(e).__name__}: {e}"[:500])
            ok_all &= rec["status"] == "ok"
            results.append(rec)
            print(f"determinism {case:9s} {dtype:9s} N={args.n}: {rec['status']}"
                  + (f" ({rec.get('reason')})" if rec.get("reason") else ""), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"env": H.env_info(device), "records": results},
                                       indent=1) + "\n")
    sys.exit(0 if ok_all else 1)


if __name__ == "__main__":
    main()
