"""The class forward's main loop (soft_knn_predict) in Gluon, for the latency model.

    python bench/sass/gluon_class_probe.py   # bench/results/gluon_class_probe_sm90[_tritonXY].json

*Compiled, not run*: a probe of how a v4 class forward can be built, beside
``bench/sass/class_forward.py``'s Triton one (the same problem: bf16, D = 128, 1000 classes
over 65536 references, 16-wide class tiles, the self pair excluded). No launcher, no GPU
run, and not exact in every regime: it has the main pass's lazy shift but not its flags
for the exact pass.

A program owns BLOCK_M query rows (in shared memory) and one class tile, and streams the
class tile's references (in label order, from any position: rows past the tile weigh
nothing) through a cp.async ring. Per reference tile: the next tile's logit wgmma is
issued before this tile's softmax (as in the loss forward's, ``gluon_lse``), the self
pair masked by position, the lazy shift; then the class mass ``y += p . onehot`` as two asynchronous
TF32 wgmmas with p from registers, p = hi + lo (hi truncated to TF32, lo the exact rest,
the Triton kernel's ``tf32x2``). p's columns are permuted by a reshape and a permute that
make the logit accumulator's registers the TF32 operand's as they are (the conversion is
asserted trivial: no shuffle); the one-hot's rows follow the same permutation. The
one-hot is not built per tile: it streams from a launcher-made [BLOCK_C, M] fp32 matrix
(each reference's place in its class tile, transposed: TF32 operands are K-major in
shared memory), 4 bytes per reference and class-tile column, its columns permuted within
each aligned group of 8 as p's are. That holds for tiles that start at multiples of 8:
a launcher for this loop pads each class tile's references in label order to such a start
(with references that weigh nothing), which this probe assumes.
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
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: E402
    fence_async_shared, warpgroup_mma, warpgroup_mma_wait)

from nbkernels.backends.triton import gluon_lse as G  # noqa: E402
from bench.sass import build, class_forward, latency, overlap_probe, report, sass  # noqa: E402

BLOCK_C, D = 16, 128
CONFIGS = [(128, 64, 8), (64, 64, 4)]   # BLOCK_M, BLOCK_N, warps


@gluon.jit
def _request(r_s, h_s, w_s, r, hot, pack, i_n, k, M, o_nl, o_d, o_hr, o_hc,
             BN: gl.constexpr, D: gl.constexpr):
    """cp.async of the k-th tile (references [i_n, i_n + BN)): rows (zeros past M), the
    one-hot's columns (slot k % 3: tile k's mass wgmma reads it after tile k + 2 is
    requested) and the packed column terms."""
    o_n = i_n + o_nl
    G.async_load(r_s.index(k % 2), r + o_n[:, None] * D + o_d[None, :],
                 mask=(o_n < M)[:, None] & (o_d < D)[None, :])
    G.async_load(h_s.index(k % 3), hot + o_hc[:, None] * M + (i_n + o_hr)[None, :],
                 mask=(o_hc >= 0)[:, None] & (i_n + o_hr < M)[None, :])
    G.async_load(w_s.index(k % 2), pack + i_n + G._o_w(BN))
    G.async_copy.commit_group()


@gluon.jit
def _step(q_s, r_s, h_s, w_s, r, hot, pack, k, n, lo, hi, M, b_s, b_self, b_c, b_m, b_l, b_y,
          zero, o_nl, o_d, o_hr, o_hc, BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr,
          FIRST: gl.constexpr, cols: gl.constexpr, a_l: gl.constexpr, mmc: gl.constexpr):
    """Tile k: its terms, tile k + 1's logit wgmma issued, tile k's softmax and mass."""
    i_n = lo + k * BN
    w = w_s.index(k % 2).load(cols)
    o_s = i_n + gl.arange(0, BN, layout=cols)
    b_col = gl.where(o_s < hi, (w >> 32).to(gl.int32).to(gl.float32, bitcast=True),
                     float("-inf"))
    G.async_copy.wait_group(0)
    fence_async_shared()
    G.barrier()
    if k + 2 < n:
        _request(r_s, h_s, w_s, r, hot, pack, i_n + 2 * BN, k + 2, M, o_nl, o_d, o_hr, o_hc,
                 BN, D)
    tok = warpgroup_mma(q_s, r_s.index((k + 1) % 2).permute((1, 0)), zero, use_acc=False,
                        is_async=True)
    b_z = gl.fma(b_s, b_c, b_col[None, :])
    b_z = gl.where(o_s[None, :] == b_self[:, None], float("-inf"), b_z)
    if FIRST:
        b_m = gl.max(b_z, axis=1)
    b_sh = G._shift(b_m)
    b_p = gl.exp2(gl.fma(b_z, G.LOG2E, b_sh[:, None]))
    b_t = gl.sum(b_p, axis=1)
    b_k = gl.where(b_t > G.RESCALE, gl.minimum(gl.ceil(gl.log2(b_t)), G.MAX_MOVE), 0.0)
    b_m = gl.where(b_k > 0, b_m + b_k * G.LN2, b_m)
    b_f = gl.exp2(G._shift(b_m) - b_sh)
    b_l = (b_l + b_t) * b_f
    # p's columns in the TF32 operand's register order: {2t, 2t + 1} of each 8 become
    # {t, t + 4}
    b_p = gl.reshape(gl.permute(gl.reshape(b_p, [BM, BN // 8, 4, 2]), (0, 1, 3, 2)), [BM, BN])
    b_hi = (b_p.to(gl.int32, bitcast=True) & -8192).to(gl.float32, bitcast=True)
    hs = h_s.index(k % 3).permute((1, 0))
    b_y = warpgroup_mma(gl.convert_layout(b_hi, a_l, assert_trivial=True), hs, b_y,
                        is_async=True)
    b_y = warpgroup_mma(gl.convert_layout(b_p - b_hi, a_l, assert_trivial=True), hs, b_y,
                        is_async=True)
    b_y = warpgroup_mma_wait(num_outstanding=1, deps=(b_y,))
    b_s = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
    b_y = b_y * gl.convert_layout(b_f, gl.SliceLayout(1, mmc))[:, None]
    return b_s, b_m, b_l, b_y


@gluon.jit
def class_fwd_sm90(q, r, hot, pack, self_pos, tile_ptr, scale, mass, tile_max, tile_sum, N, M,
                   n_tiles, BM: gl.constexpr, BN: gl.constexpr, BC: gl.constexpr,
                   D: gl.constexpr):
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[gl.num_warps(), 1], instr_shape=[16, BN, 16])
    mmc: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[gl.num_warps(), 1], instr_shape=[16, BC, 8])
    a_l: gl.constexpr = gl.DotOperandLayout(0, mmc, 1)
    rows: gl.constexpr = gl.SliceLayout(1, mma)
    cols: gl.constexpr = gl.SliceLayout(0, mma)
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [gl.num_warps(), 1], [1, 0])
    hl: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [gl.num_warps(), 1], [1, 0])
    i_m = gl.program_id(0) * BM
    i_c = gl.program_id(1)
    lo = gl.load(tile_ptr + i_c).to(gl.int32)
    hi = gl.load(tile_ptr + i_c + 1).to(gl.int32)
    n = gl.cdiv(hi - lo, BN)
    o_ml = i_m + gl.arange(0, BM, layout=gl.SliceLayout(1, ld))
    o_d = gl.arange(0, D, layout=gl.SliceLayout(0, ld))
    o_nl = gl.arange(0, BN, layout=gl.SliceLayout(1, ld))
    o_hr = gl.arange(0, BN, layout=gl.SliceLayout(0, hl))
    o_hc = gl.arange(0, BC, layout=gl.SliceLayout(1, hl))
    q_s = gl.allocate_shared_memory(
        gl.bfloat16, [BM, D], gl.NVMMASharedLayout.get_default_for([BM, D], gl.bfloat16),
        gl.load(q + o_ml[:, None] * D + o_d[None, :], mask=(o_ml < N)[:, None], other=0.0))
    r_s = gl.allocate_shared_memory(gl.bfloat16, [2, BN, D],
                                    gl.NVMMASharedLayout.get_default_for([BN, D], gl.bfloat16))
    h_s = gl.allocate_shared_memory(gl.float32, [3, BC, BN],
                                    gl.NVMMASharedLayout.get_default_for([BC, BN], gl.float32))
    w_s = gl.allocate_shared_memory(gl.int64, [2, BN], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    o_m = i_m + gl.arange(0, BM, layout=rows)
    b_self = gl.load(self_pos + o_m, mask=o_m < N, other=-1)
    b_c = gl.load(scale)
    zero = gl.zeros([BM, BN], gl.float32, mma)
    b_y = gl.zeros([BM, BC], gl.float32, mmc)
    b_m = gl.full([BM], float("-inf"), gl.float32, rows)
    b_l = gl.zeros([BM], gl.float32, rows)
    _request(r_s, h_s, w_s, r, hot, pack, lo, 0, M, o_nl, o_d, o_hr, o_hc, BN, D)
    G.async_copy.wait_group(0)
    fence_async_shared()
    G.barrier()
    if n > 1:
        _request(r_s, h_s, w_s, r, hot, pack, lo + BN, 1, M, o_nl, o_d, o_hr, o_hc, BN, D)
    tok = warpgroup_mma(q_s, r_s.index(0).permute((1, 0)), zero, use_acc=False, is_async=True)
    b_s = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
    b_s, b_m, b_l, b_y = _step(q_s, r_s, h_s, w_s, r, hot, pack, 0, n, lo, hi, M, b_s, b_self,
                               b_c, b_m, b_l, b_y, zero, o_nl, o_d, o_hr, o_hc, BM, BN, D,
                               True, cols, a_l, mmc)
    for k in range(1, n):
        b_s, b_m, b_l, b_y = _step(q_s, r_s, h_s, w_s, r, hot, pack, k, n, lo, hi, M, b_s,
                                   b_self, b_c, b_m, b_l, b_y, zero, o_nl, o_d, o_hr, o_hc, BM,
                                   BN, D, False, cols, a_l, mmc)
    # the mass and the sums relative to the anchor's shift (the class forward's outputs)
    o_mc = i_m + gl.arange(0, BM, layout=gl.SliceLayout(1, mmc))
    o_cc = i_c * BC + gl.arange(0, BC, layout=gl.SliceLayout(0, mmc))
    gl.store(mass + o_mc[:, None] * (n_tiles * BC) + o_cc[None, :], b_y,
             mask=(o_mc < N)[:, None])
    gl.store(tile_max + o_m * n_tiles + i_c, b_m, mask=o_m < N)
    gl.store(tile_sum + o_m * n_tiles + i_c, b_l, mask=o_m < N)


def modelled(block_m, block_n, num_warps):
    """The latency model's record of one config (the class forward's grid at 1000 classes)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    def t(dtype):
        return torch.empty(0, dtype=dtype, device="meta")
    values = dict(q=t(torch.bfloat16), r=t(torch.bfloat16), hot=t(torch.float32),
                  pack=t(torch.int64), self_pos=t(torch.int32), tile_ptr=t(torch.int64),
                  scale=t(torch.float32), mass=t(torch.float32), tile_max=t(torch.float32),
                  tile_sum=t(torch.float32), N=build.N, M=build.M, n_tiles=63, BM=block_m,
                  BN=block_n, BC=BLOCK_C, D=D)
    src, _ = build.ast_source(class_fwd_sm90, values)
    k = triton.compile(GluonASTSource(class_fwd_sm90, src.signature, src.constants, src.attrs),
                       target=build._target(), options=dict(num_warps=num_warps))
    cubin = build.cache_dir() / f"gluon_class_{block_m}x{block_n}w{num_warps}.cubin"
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
    tag = "" if ver >= (3, 9) else f"_triton{ver[0]}{ver[1]}"
    return ROOT / "bench" / "results" / f"gluon_class_probe_sm90{tag}.json"


def main():
    out = results_path()
    rows = []
    for cfg in CONFIGS:
        rows.append(modelled(*cfg))
        r = rows[-1]
        print(f"{r['config']}: {r['regs']} regs, {r['ctas_per_sm']} CTA/SM, "
              f"{r['instrs_per_pair']:.1f} instr/pair, {r['cycles_per_tile']:.0f} cycles a "
              f"tile, {r['predicted_ms']:.2f} ms (predicted)", flush=True)
    out.write_text(json.dumps(dict(env=report.env(), what=__doc__.split("\n\n")[0],
                                   problem=dict(n=build.N, m=build.M, d=D,
                                                classes=class_forward.CLASSES,
                                                block_c=BLOCK_C, exclude_self=True),
                                   rows=rows), indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("compiles for sm_90: run without TRITON_INTERPRET")
    main()
