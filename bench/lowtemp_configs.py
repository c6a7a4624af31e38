"""The H200's failing inputs at full size, under the interpreter's device numerics, with
every GPU config pair: every loss row and gradient element against the direct fp64
formula of tests/lowtemp.py.

    TRITON_INTERPRET=1 NBK_TRITON_SIZES=gpu python bench/lowtemp_configs.py [--out FILE]

Inputs (CPU generator, seed 0): the batch NCA loss with squared distances at T = 1e-4,
x ~ N(0, 2.6^2), N = 1500, D = 64, 20 classes; and at T = 0.05, x ~ N(0, 0.3^2),
N = 1031, D = 100, 37 classes; fp32. About 5 minutes on 2 CPU cores. Writes
bench/results/lowtemp_interpreter.json: per input and config, the rows out of tolerance
(0 to pass), the worst error / tolerance ratio and the relative errors.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "triton")]

if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("NBK_TRITON_SIZES") != "gpu":
    raise SystemExit("run with TRITON_INTERPRET=1 NBK_TRITON_SIZES=gpu (see the docstring)")

import device_numerics  # noqa: E402
device_numerics.install()

import torch  # noqa: E402

import lowtemp  # noqa: E402
import nbkernels  # noqa: E402
from nbkernels.backends.triton import kernels as tk  # noqa: E402

INPUTS = {"t1e-4": (1500, 64, 20, 2.6, 1e-4), "t0.05": (1031, 100, 37, 0.3, 0.05)}


def run(name, config):
    n, d, c, scale, t = INPUTS[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g) * scale
    y = torch.randint(0, c, (n,), generator=g)
    w = torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = lowtemp.oracle(x, y, temperature=t, weight=w)
    xx = x.clone().requires_grad_()
    t0 = time.time()
    with tk.fixed_configs(tk.GPU_FWD_CONFIGS[config], tk.GPU_BWD_CONFIGS[config]):
        loss = nbkernels.nca_loss(xx, y, temperature=t, reduction="none", backend="triton")
        (dx,) = torch.autograd.grad((loss * w.float()).sum(), (xx,))
    err_l = (loss.detach().double() - want["loss"]).abs()
    err_g = (dx.double() - want["grads"][0]).abs()
    ratio = torch.maximum(err_l / want["loss_tol"].clamp_min(1e-300),
                          (err_g / want["grad_tols"][0].clamp_min(1e-300)).amax(1))
    ref = want["grads"][0]
    return dict(input=name, config=str(tk.GPU_FWD_CONFIGS[config]) + " / "
                + str(tk.GPU_BWD_CONFIGS[config]), seconds=round(time.time() - t0, 1),
                rows_out_of_tolerance=int((ratio > 1).sum()), worst_ratio=float(ratio.max()),
                loss_rel=float(err_l.norm() / want["loss"].norm()),
                dx_rel=float(err_g.norm() / ref.norm()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lowtemp_interpreter.json"))
    args = ap.parse_args()
    import triton
    records = []
    for name in INPUTS:
        for config in range(len(tk.GPU_FWD_CONFIGS)):
            rec = run(name, config)
            records.append(rec)
            print(json.dumps(rec), flush=True)
    out = dict(what=__doc__.split("\n\n")[0], triton=triton.__version__, torch=torch.__version__,
               device_numerics=True, records=records,
               all_pass=all(r["rows_out_of_tolerance"] == 0 for r in records))
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
