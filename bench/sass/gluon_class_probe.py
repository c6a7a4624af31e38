"""The class forward's Gluon main pass (``nbkernels.backends.triton.gluon_class``, the
opt-in variant "sm90_gluon" of kind "fwd_class_main") in the latency model.

    python bench/sass/gluon_class_probe.py   # bench/results/gluon_class_probe_sm90[_tritonXY].json

*Compiled, not run*: the kernel compiled for sm_90 without a GPU, beside
``bench/sass/class_forward.py``'s Triton one (the same problem: bf16, D = 128, 1000 classes
over 65536 references, 16-wide class tiles), in each of its self-pair modes, and
simulated (``bench/sass/latency.py``). The kernel's design is in its module's docstring.
"""
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402
import triton  # noqa: E402

from nbkernels.backends.triton import gluon_class as C  # noqa: E402
from nbkernels.backends.triton import gluon_lse as G  # noqa: E402
from bench.sass import build, class_forward, latency, overlap_probe, report, sass  # noqa: E402

BLOCK_C = 16
# BLOCK_M, BLOCK_N, warps: both reference-tile widths (``gluon_class.TILE_N`` takes one
# per self-pair mode)
CONFIGS = [(C.BLOCK_M, 128, C.NUM_WARPS), (C.BLOCK_M, 64, C.NUM_WARPS)]


MODES = {2: "the batch, self pair excluded (streamed in label order)",
         1: "self pairs at any positions (an offset other than 0)", 0: "no pair excluded"}


def modelled(block_m, block_n, num_warps, mode=2):
    """The latency model's record of one config and self-pair ``mode`` (the kernel's SELF,
    ``MODES``) of the class forward's grid at 1000 classes. Its main loop: with mode 2
    the tiles holding self pairs (at most 3 of a program's) and the last of each class
    tile run outside it, with their masks."""
    from triton.experimental.gluon._runtime import GluonASTSource

    def t(dtype):
        return torch.empty(0, dtype=dtype, device="meta")
    values = dict(q=t(torch.bfloat16), r=t(torch.bfloat16), hot=t(torch.float32),
                  hot_ptr=t(torch.int32), r_col=t(torch.float32), self_pos=t(torch.int32),
                  order=t(torch.int64), tile_ptr=t(torch.int64), scale=t(torch.float32),
                  mass=t(torch.float32), tile_max=t(torch.float32), tile_sum=t(torch.float32),
                  redo=t(torch.int8),
                  N=build.N, M=build.M, H=(build.M + 8 * 63 + block_n + 15) // 16 * 16, s_qn=C.D, BM=block_m,
                  BN=block_n, BC=BLOCK_C, D=C.D, SELF=mode)
    src, _ = build.ast_source(C.KERNEL, values)
    k = triton.compile(GluonASTSource(C.KERNEL, src.signature, src.constants, src.attrs),
                       target=build._target(), options=dict(num_warps=num_warps))
    name = f"gluon_class_{block_m}x{block_n}w{num_warps}_self{mode}.cubin"
    cubin = build.cache_dir() / name
    cubin.write_bytes(k.asm["cubin"])
    sim = latency.simulate_cubin(cubin, k.metadata.name, int(k.metadata.shared), num_warps)
    trips = class_forward._tiles_per_class_tile(BLOCK_C, block_n)
    grid = -(-build.N // block_m) * -(-class_forward.CLASSES // BLOCK_C)
    pred = latency.predict(sim.cycles_per_iter, trips, grid, sim.ctas_per_sm, 1)
    seq = overlap_probe._loop(sim.ops)
    local = sass.resource_usage(cubin)[k.metadata.name]["local"]
    return dict(config=[block_m, block_n, num_warps], regs=sim.regs, local_bytes=local,
                shared_bytes=int(k.metadata.shared), ctas_per_sm=sim.ctas_per_sm,
                warp_instrs_per_tile=len(sim.ops),
                instrs_per_pair=len(sim.ops) * 32 * num_warps / (block_m * block_n),
                loop=" | ".join(f"{a} x{c}" for a, c in seq),
                exps_under_mma=overlap_probe.exps_under_mma(seq),
                ptxas_advice=overlap_probe._ptxas_advice(k.asm["ptx"]),
                cycles_per_tile=sim.cycles_per_iter, predicted_ms=pred["time_s"] * 1e3)


def results_path(ver=G.VERSION):
    from bench import _gluon_rows
    return _gluon_rows.results_path("gluon_class_probe", ver)


def main():
    out = results_path()
    rows = []
    for cfg in CONFIGS:
        for mode, what in MODES.items():
            rows.append(dict(modelled(*cfg, mode), self_mode=mode, self_pairs=what,
                             kernel=cfg[1] == C.TILE_N[mode]))
            r = rows[-1]
            print(f"{r['config']} {what}: {r['regs']} regs, {r['ctas_per_sm']} CTA/SM, "
                  f"{r['instrs_per_pair']:.1f} instr/pair, {r['cycles_per_tile']:.0f} cycles a "
                  f"tile, {r['predicted_ms']:.2f} ms (predicted)", flush=True)
    out.write_text(json.dumps(dict(env=report.env(), what=__doc__.split("\n\n")[0],
                                   problem=dict(n=build.N, m=build.M, d=C.D,
                                                classes=class_forward.CLASSES,
                                                block_c=BLOCK_C),
                                   rows=rows), indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("compiles for sm_90: run without TRITON_INTERPRET")
    main()
