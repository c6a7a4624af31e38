"""What a first training step costs: Triton compiles on a cold and a warm cache.

On a GPU (``bench/gpu_check.sh`` runs it)::

    python bench/first_call.py --out DIR

runs, per dtype (fp32, bf16), the first ``nca_loss(x, y).backward()`` of a 300 x 64 batch
in a new process with an empty Triton cache (cold), again in a new process with the cache
it left (warm), and the steady-state step at N = 8192, D = 128 (median of 20); it records
import, first forward and first backward seconds and the kernel variants compiled.
Appends to DIR/first_call.json as each measurement ends.

Without a GPU::

    python bench/first_call.py --predict [--out bench/results]

compiles, for sm_90 and with an empty cache, the kernel variants that first step launches
(forward: main and exact pass; backward: the symmetric kernel and its fix-up pass), at the
configs the launchers pick (triton_configs.TABLE), timing each compile on this CPU: a
prediction of the cold first call's compile time (the GPU machine's CPU compiles, and
loading the compiled module takes little), written to first_call_predicted.json.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(dtype_name):
    t0 = time.perf_counter()
    import torch
    import nbkernels
    from nbkernels.backends.triton import configs as triton_configs
    t_import = time.perf_counter() - t0
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 64, generator=g).to("cuda", dtype).requires_grad_()
    y = torch.randint(0, 10, (300,), generator=g).cuda()
    t0 = time.perf_counter()
    loss = nbkernels.nca_loss(x, y)
    torch.cuda.synchronize()
    t_fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    loss.backward()
    torch.cuda.synchronize()
    t_bwd = time.perf_counter() - t0
    variants = sorted(k[0] + str(dict(k[3])) for k in triton_configs.LAUNCHED)
    # steady state at a training-sized batch
    x = torch.randn(8192, 128, generator=g).to("cuda", dtype).requires_grad_()
    y = torch.randint(0, 100, (8192,), generator=g).cuda()
    times = []
    for i in range(23):
        x.grad = None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        nbkernels.nca_loss(x, y).backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times = sorted(times[3:])
    print(json.dumps(dict(dtype=dtype_name, import_s=t_import, first_forward_s=t_fwd,
                          first_backward_s=t_bwd, first_step_s=t_fwd + t_bwd,
                          variants_launched=len(variants),
                          steady_step_ms_n8192_d128=1e3 * times[len(times) // 2])))


def measure(out):
    path = out / "first_call.json"
    records = []
    for dtype in ("float32", "bfloat16"):
        cache = tempfile.mkdtemp(prefix="nbk-triton-cache-")
        for state in ("cold", "warm"):
            env = dict(os.environ, TRITON_CACHE_DIR=cache, PYTHONPATH=str(ROOT))
            env.pop("NBK_TRITON_AUTOTUNE", None)
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, __file__, "--child", dtype], env=env,
                                 capture_output=True, text=True, timeout=240)
            rec = dict(state=state, dtype=dtype, process_s=time.perf_counter() - t0)
            if res.returncode == 0:
                rec.update(json.loads(res.stdout.strip().splitlines()[-1]))
            else:
                rec["error"] = res.stderr[-2000:]
            records.append(rec)
            path.write_text(json.dumps(records, indent=1))
            print(json.dumps(rec), flush=True)


def predict(out):
    """Compile the first step's variants for sm_90 with an empty cache, timed (this CPU)."""
    with tempfile.TemporaryDirectory() as cache:
        code = f"import sys; sys.path[:0] = [{str(ROOT)!r}]; import first_call; first_call._predict()"
        env = dict(os.environ, TRITON_CACHE_DIR=cache,
                   PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "bench")]))
        env.pop("TRITON_INTERPRET", None)
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=600, cwd=str(ROOT / "bench"))
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    (out / "first_call_predicted.json").write_text(json.dumps(rec, indent=1))
    print(json.dumps(rec, indent=1))


def _predict():
    import platform

    import torch
    import triton
    from sass import build
    from nbkernels.backends.triton import configs as tc
    from nbkernels.backends.triton import kernels as tk
    d = 64
    rows = []
    for dtype in ("fp32", "bf16"):
        elem = 4 if dtype == "fp32" else 2
        # the symmetric backward's two-exp kernel and its fix-up pass (a batch this small
        # skips the one-exp form: kernels.ONE_EXP_MIN_ROWS), then that form, which batches
        # from that size on compile too
        for kind, flags in (("fwd", dict(POS_PASS=False)), ("fwd", dict(POS_PASS=True)),
                            ("bwd", dict(FIXUP=False, ONE_EXP=False, SCALE_DS=False)),
                            ("bwd", dict(FIXUP=True, ONE_EXP=False, SCALE_DS=False)),
                            ("bwd", dict(FIXUP=False, ONE_EXP=True))):
            # torch's default (allow_tf32 off): fp32 dots in IEEE precision
            cfg, source = tc.select(kind, elem, d, torch.device("cpu"), "ieee")
            bm, bn, w, s = build._config_tuple(cfg, kind)
            jit = tk.kernel_for(kind, build.SM90)
            vals = build._launch_values(kind, dtype, "sqeuclidean", False,
                                        None if kind == "fwd" else "sym", bm, bn, d, "ieee")
            vals.update(flags)
            if flags.get("POS_PASS"):
                # the exact pass's row order, and the references in label order with
                # each label's range (its positives-only blocks)
                vals.update(perm=build._meta(torch.int32), r_order=build._meta(torch.int32),
                            tile_ptr=build._meta(torch.int64))
            if flags.get("FIXUP"):
                # the flags, and its rows grouped by label with each label's range
                vals.update(flags=build._meta(torch.int8), own_perm=build._meta(torch.int32),
                            other_order=build._meta(torch.int32),
                            label_ptr=build._meta(torch.int64))
            vals = build._fill_unknown(jit, vals)
            t0 = time.perf_counter()
            build.compile_triton(jit, vals, w, s, f"first_{dtype}_{kind}_{flags}")
            rows.append(dict(dtype=dtype, kernel=kind, flags=flags, config=str(cfg),
                             compile_s=round(time.perf_counter() - t0, 2)))
    first = [r for r in rows if not r["flags"].get("ONE_EXP")]
    per = {}
    for r in first:
        key = (r["dtype"], r["kernel"])
        per[key] = per.get(key, 0) + r["compile_s"]
    print(json.dumps(dict(
        what="sm_90 compiles of a first nca_loss(x, y).backward(), 300 x 64, from an empty "
             "cache, timed on this CPU (predicted: the GPU machine's CPU compiles them)",
        cpu=platform.processor() or platform.machine(), cpus=os.cpu_count(),
        triton=triton.__version__, torch=torch.__version__, d=d, compiles=rows,
        compiles_per_direction={f"{k[0]} {k[1]}": sum(1 for r in first
                                                      if (r["dtype"], r["kernel"]) == k)
                                for k in per},
        seconds_per_dtype={dt: round(sum(r["compile_s"] for r in first if r["dtype"] == dt), 1)
                           for dt in ("fp32", "bf16")},
        # the symmetric backward's one-exp form: batches of kernels.ONE_EXP_MIN_ROWS rows
        # and more compile it too (nbkernels.warmup does, at any size)
        one_exp_form_s={r["dtype"]: r["compile_s"] for r in rows if r["flags"].get("ONE_EXP")})))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    ap.add_argument("--predict", action="store_true", help="no GPU: time the sm_90 compiles")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args.child)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return predict(out) if args.predict else measure(out)


if __name__ == "__main__":
    main()
