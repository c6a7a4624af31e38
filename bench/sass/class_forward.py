"""The class forward (``soft_knn_predict``) against the loss forward, in the latency model.

The H200 measured soft_knn_predict at 13.31 ms against 5.81 ms for the loss forward
(bench/results/gpu_h200_2026-12-04_5fa40b9.md): 2.29x, where the goal is 1.3x. This
compiles the class forward's main loop at the config the launcher runs under the running
triton (``configs.table``: the bf16 and TF32 entries at D = 128) with the self pair
excluded or not and class tiles 16 and 32 wide, simulates it (``latency.simulate_cubin``)
and sets its cycles per pair, the pairs wasted in part-filled reference tiles counted (1000
classes over 65536 references), and its grid's time (``latency.predict``) against the bf16
loss forward's, at its table config and in the sm_90 variant this triton launches.

    python bench/sass/class_forward.py [--at COMMIT] [--out bench/results/class_forward_sm90.json]

``--at``: also the kernels of another commit (the "before" of a change), compiled by
this file run in a temporary git worktree of it (kernel arguments filled by name, as
``build`` does).
*Predicted from compiled SASS*, never measured. About 2 minutes on 2 CPU cores.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.sass import build, latency  # noqa: E402

CLASSES = 1000
D = 128


def _tiles_per_class_tile(block_c, block_n, m=build.M, c=CLASSES):
    """Reference tiles a program streams per class tile, with the part-filled last one."""
    return math.ceil(block_c * m / c / block_n)


def _config(kernel, dclass):
    """The config the launcher runs for ``kernel`` at D = 128 under the running triton
    (``configs.table``)."""
    from nbkernels.backends.triton import configs as tc
    return tuple(tc.table()[("sm90", kernel, dclass, "128")][0])


def _simulate(fn, vals, cfg, tag):
    bm, bn, w, s = cfg
    c = build.compile_triton(fn, vals, w, s, tag)
    return latency.simulate_cubin(c.cubin, c.name, c.shared, w)


def _loss_forward():
    """(config, variant name, Simulated, predicted seconds) of the bf16 lse forward as the
    launcher runs it at D = 128: its table config and sm_90 variant (the AHEAD forward
    where this triton takes it)."""
    from nbkernels.backends.triton import kernels as tk
    cfg = _config("fwd", "16")
    bm, bn, w, s = cfg
    variant = tk.variant_for("fwd", build.SM90, build.launch_precision("bf16"))
    vals = build._fill_unknown(variant.kernel, build.with_variant(build._launch_values(
        "fwd", "bf16", "sqeuclidean", False, None, bm, bn, D), variant))
    c = build.compile_triton(variant.kernel, vals, w, s, f"classfwd_loss_{variant.name}")
    sim, pred = latency.simulate_grid(c, vals, D, "fwd", bm, bn, w)
    return cfg, variant.name, sim, pred["time_s"]


def measure():
    """The class forward's rows (bf16 and fp32 with TF32 dots; the self pair excluded or
    not; class tiles 16 and 32 wide) at the launcher's configs, against the loss forward:
    cycles per tile and per pair (the pairs of part-filled tiles counted), and the grid's
    predicted time, N = M = 65536, D = 128, 1000 classes."""
    import torch
    from nbkernels.backends.triton import kernels as tk
    params = {p.name for p in tk.neighbor_fwd_kernel.params}
    loss_cfg, loss_variant, loss, loss_s = _loss_forward()
    loss_pair = loss.cycles_per_iter / (loss_cfg[0] * loss_cfg[1])
    rows = []
    jit = tk.kernel_for("fwd_class", build.SM90)
    for dtype, dclass in (("bf16", "16"), ("fp32", "32")):
        cfg = _config("fwd_class", dclass)
        bm, bn, w, s = cfg
        for exclude_self in (False, True):
            for block_c in (32, 16):
                vals = build._launch_values("fwd", dtype, "sqeuclidean", True, None, bm, bn, D)
                vals.update(BLOCK_C=block_c, HAS_OFFSET=exclude_self)
                if exclude_self:   # the self-pair mask's input, by the name the kernel has
                    key = "self_pos" if "self_pos" in params else "perm"
                    vals[key] = build._meta(torch.int32 if key == "self_pos" else torch.int64)
                vals = build._fill_unknown(jit, vals)
                sim = _simulate(jit, vals, cfg, f"classfwd_{dtype}_{int(exclude_self)}_{block_c}"
                                f"_{bm}x{bn}w{w}s{s}")
                cyc = sim.cycles_per_iter
                trips = _tiles_per_class_tile(block_c, bn)
                # the pairs the tiles hold, over the pairs there are
                waste = (trips * bn * CLASSES / block_c) / build.M
                pair = cyc / (bm * bn) * waste
                t = latency.predict(cyc, trips, -(-build.N // bm) * -(-CLASSES // block_c),
                                    sim.ctas_per_sm, 1)["time_s"]
                rows.append(dict(dtype=dtype, config=cfg, exclude_self=exclude_self,
                                 block_c=block_c, cycles_per_tile=cyc, regs=sim.regs,
                                 tile_fill=1 / waste, cycles_per_pair=pair,
                                 vs_loss_forward=pair / loss_pair, predicted_ms=t * 1e3,
                                 vs_loss_forward_time=t / loss_s))
                print(f"{dtype} {bm}x{bn}w{w}s{s} exclude_self={exclude_self!s:5} "
                      f"BC={block_c}: {cyc:.0f} cycles per tile, {t * 1e3:.2f} ms, "
                      f"{t / loss_s:.2f}x the bf16 loss forward ({loss_s * 1e3:.2f} ms)",
                      flush=True)
    return dict(loss_config=loss_cfg, loss_variant=loss_variant,
                loss_forward_cycles_per_tile=loss.cycles_per_iter,
                loss_forward_cycles_per_pair=loss_pair, loss_forward_ms=loss_s * 1e3, rows=rows)


def _at(commit):
    """measure() on ``commit``'s kernels and tools: this file is copied into a temporary
    worktree of ``commit`` and run there."""
    with tempfile.TemporaryDirectory() as tmp:
        wt = Path(tmp) / "wt"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(wt), commit],
                       check=True, capture_output=True)
        try:
            shutil.copy(__file__, wt / "bench" / "sass" / "class_forward.py")
            out = Path(tmp) / "out.json"
            code = ("import json; from bench.sass import class_forward as cf; "
                    f"json.dump(cf.measure(), open({str(out)!r}, 'w'))")
            subprocess.run([sys.executable, "-c", code], cwd=str(wt), check=True,
                           env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (
                               str(wt), os.environ.get("PYTHONPATH"))))))
            return json.loads(out.read_text())
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(wt)],
                           check=False, capture_output=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--at", help="also the kernels of this commit (the before)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "class_forward_sm90.json"))
    args = ap.parse_args(argv)
    import torch
    sys.path.insert(0, str(ROOT / "bench"))
    import _harness
    env = _harness.env_info(torch.device("cpu"))
    data = dict(label="predicted from compiled SASS (latency model), not measured",
                triton=env["triton"], git_commit=env["git_commit"], git_dirty=env["git_dirty"],
                target="sm_90", m=build.M, d=D, classes=CLASSES, current=measure())
    if args.at:
        data["before"] = dict(commit=args.at, **_at(args.at))
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
