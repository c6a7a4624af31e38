"""A v4 forward prototype for sm_90, in Gluon: the batch NCA loss's two row log-sum-exps
with the reference tile's wgmma running under the previous tile's softmax.

Not part of nbkernels, and not exact in every regime: a measurement candidate for
``bench/gpu_perf.py``, which checks its per-row losses against backend "torch" before
timing it. It runs only on an sm_90 GPU (Gluon has no interpreter); on the CPU,
``python bench/gluon_fwd.py`` compiles it for sm_90 and prints the latency model's
estimate of its main loop (``bench/sass/latency.py``).

What it does: one warpgroup per program owns BLOCK_M query rows (in shared memory); the
reference tiles stream through a ring of STAGES shared buffers (cp.async). Each
iteration issues tile j + 1's wgmma asynchronously, runs tile j's softmax, and waits for
the wgmma before the back edge (the form of ``bench/sass/overlap_probe.py`` that ptxas
does not serialize); tile j's column terms and labels are loaded before the issue, so that
ptxas keeps the softmax under the MMA. Logits in natural units, ``z = fma(q.r, 2/T, -||r||^2/T)``
(sqeuclidean, the rows centred as nbkernels centres them), the self pair masked, an
online max per tile, the sums of all terms and of the positives (same label).

Left out, compared with nbkernels' forward: the lazy shift (one max per pair here), the
exact pass for rows whose positives underflow, D other than 128, N not a multiple of
the tiles, metrics other than sqeuclidean, fp16 / fp32.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.ampere import async_copy  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: E402
    fence_async_shared, warpgroup_mma, warpgroup_mma_wait)

# names that triton 3.6 and 3.7 (the GPU image has 3.6) give otherwise, with the same
# arguments: the 16-byte cp.async into shared memory, and the CTA barrier
async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
barrier = getattr(gl, "barrier", None) or gl.thread_barrier

BLOCK_M, BLOCK_N, D, STAGES, NUM_WARPS = 64, 128, 128, 3, 4


@gluon.jit
def _tile_terms(i_n, r_col, r_labels, BLOCK_N: gl.constexpr, cols: gl.constexpr):
    """[BN] indices, column terms and labels of the reference tile at ``i_n``."""
    o_n = i_n + gl.arange(0, BLOCK_N, layout=cols)
    return o_n, gl.load(r_col + o_n), gl.load(r_labels + o_n)


@gluon.jit
def _softmax_tile(b_s, o_n, b_col, b_b, o_m, b_a, b_c, b_m, b_l, b_lp):
    """Tile ``o_n`` into the row state (max b_m, sums b_l and b_lp): logits in natural
    units, the self pair at -inf, an online max."""
    b_z = b_s * b_c + b_col[None, :]
    b_z = gl.where(o_n[None, :] == o_m[:, None], float("-inf"), b_z)
    b_new = gl.maximum(b_m, gl.max(b_z, axis=1))
    b_alpha = gl.exp2((b_m - b_new) * 1.4426950408889634)
    b_p = gl.exp2((b_z - b_new[:, None]) * 1.4426950408889634)
    m_pos = b_a[:, None] == b_b[None, :]
    b_l = b_l * b_alpha + gl.sum(b_p, axis=1)
    b_lp = b_lp * b_alpha + gl.sum(gl.where(m_pos, b_p, 0.0), axis=1)
    return b_new, b_l, b_lp


@gluon.jit
def stage(q, r, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr,
          STAGES: gl.constexpr):
    """The program's BLOCK_M rows of ``q`` in shared memory, and a ring of STAGES shared
    buffers for the tiles of ``r``, its first STAGES - 2 requested (cp.async):
    ``(q_s, r_s, o_nl, o_d)``, the last two the load offsets of a tile."""
    ld: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8],
                                        warps_per_cta=[4, 1], order=[1, 0])
    q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], gl.bfloat16)
    r_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], gl.bfloat16)
    o_ml = gl.program_id(0) * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld))
    o_d = gl.arange(0, D, layout=gl.SliceLayout(0, ld))
    q_s = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M, D], q_sl,
                                    gl.load(q + o_ml[:, None] * D + o_d[None, :]))
    r_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, D], r_sl)
    o_nl = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ld))
    for s in gl.static_range(STAGES - 2):
        async_load(r_s.index(s), r + (s * BLOCK_N + o_nl)[:, None] * D + o_d[None, :])
        async_copy.commit_group()
    return q_s, r_s, o_nl, o_d


@gluon.jit
def issue(q_s, r_s, r, o_nl, o_d, t, n, zero, BLOCK_N: gl.constexpr, D: gl.constexpr,
          STAGES: gl.constexpr):
    """Request tile t + STAGES - 2 into the ring (the slot of tile t - 2, whose wgmma is
    done), wait for tile t, and issue its wgmma asynchronously (``S = q r_t^T``)."""
    nxt = t + STAGES - 2
    if nxt < n:
        async_load(r_s.index(nxt % STAGES),
                              r + (nxt * BLOCK_N + o_nl)[:, None] * D + o_d[None, :])
    async_copy.commit_group()
    async_copy.wait_group(STAGES - 2)
    barrier()
    fence_async_shared()
    return warpgroup_mma(q_s, r_s.index(t % STAGES).permute((1, 0)), zero, use_acc=False,
                         is_async=True)


@gluon.jit
def lse_fwd_sm90(q, r_col, labels, scale, lse_all, lse_pos, N,
                 BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr,
                 STAGES: gl.constexpr):
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, BLOCK_N, 16])
    rows: gl.constexpr = gl.SliceLayout(1, mma)
    cols: gl.constexpr = gl.SliceLayout(0, mma)
    q_s, r_s, o_nl, o_d = stage(q, q, BLOCK_M, BLOCK_N, D, STAGES)
    o_m = gl.program_id(0) * BLOCK_M + gl.arange(0, BLOCK_M, layout=rows)
    b_a = gl.load(labels + o_m)
    b_c = gl.load(scale)
    b_m = gl.full([BLOCK_M], float("-inf"), gl.float32, rows)
    b_l = gl.zeros([BLOCK_M], gl.float32, rows)
    b_lp = gl.zeros([BLOCK_M], gl.float32, rows)
    zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
    n = N // BLOCK_N
    tok = issue(q_s, r_s, q, o_nl, o_d, 0, n, zero, BLOCK_N, D, STAGES)
    b_s = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
    for j in range(n - 1):
        # tile j's terms are loaded before tile j + 1's wgmma is issued, so that its
        # softmax needs only registers: ptxas then keeps the exps under the MMA (loaded
        # after the issue, they were scheduled ahead of it); the wgmma is waited for
        # before the back edge
        o_n, b_col, b_b = _tile_terms(j * BLOCK_N, r_col, labels, BLOCK_N, cols)
        tok = issue(q_s, r_s, q, o_nl, o_d, j + 1, n, zero, BLOCK_N, D, STAGES)
        b_m, b_l, b_lp = _softmax_tile(b_s, o_n, b_col, b_b, o_m, b_a, b_c, b_m, b_l, b_lp)
        b_s = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
    o_n, b_col, b_b = _tile_terms((n - 1) * BLOCK_N, r_col, labels, BLOCK_N, cols)
    b_m, b_l, b_lp = _softmax_tile(b_s, o_n, b_col, b_b, o_m, b_a, b_c, b_m, b_l, b_lp)
    gl.store(lse_all + o_m, b_m + gl.log(b_l))
    gl.store(lse_pos + o_m, b_m + gl.log(b_lp))


def nca_rows(x, y, temperature):
    """Per-row NCA losses of the batch ``x`` (N, 128) bf16 with labels ``y``: 0 where a
    row has no positive, as ``nbkernels.nca_loss(..., reduction="none")``."""
    from nbkernels import kernel_inputs
    n, d = x.shape
    if x.dtype != torch.bfloat16 or d != D or n % BLOCK_N or n % BLOCK_M:
        raise ValueError(f"the prototype takes bf16 (N, {D}) with N a multiple of "
                         f"{max(BLOCK_M, BLOCK_N)}, got {tuple(x.shape)} {x.dtype}")
    if x.device.type != "cuda" or torch.cuda.get_device_capability(x.device)[0] != 9:
        raise RuntimeError("the Gluon prototype runs on an sm_90 GPU only (no interpreter)")
    q = kernel_inputs.prepare(x, x, "sqeuclidean")[0].contiguous()
    col = -(q.float().pow(2).sum(1)) / temperature
    scale = torch.full((), 2.0 / temperature, dtype=torch.float32, device=x.device)
    lse_all = torch.empty(n, dtype=torch.float32, device=x.device)
    lse_pos = torch.empty_like(lse_all)
    lse_fwd_sm90[(n // BLOCK_M,)](q, col, y.contiguous(), scale, lse_all, lse_pos, n,
                                  BLOCK_M, BLOCK_N, D, STAGES, num_warps=NUM_WARPS)
    return torch.where(torch.isneginf(lse_pos), 0.0, lse_all - lse_pos)


def compile_sm90():
    """(cubin path, kernel name, dynamic shared bytes, PTX), compiled for sm_90 without a GPU."""
    import triton
    from triton.experimental.gluon._runtime import GluonASTSource

    from bench.sass import build
    bf16 = torch.empty(0, dtype=torch.bfloat16, device="meta")
    f32 = torch.empty(0, dtype=torch.float32, device="meta")
    i64 = torch.empty(0, dtype=torch.int64, device="meta")
    values = dict(q=bf16, r_col=f32, labels=i64, scale=f32, lse_all=f32, lse_pos=f32, N=65536,
                  BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, D=D, STAGES=STAGES)
    src, _ = build.ast_source(lse_fwd_sm90, values)
    k = triton.compile(GluonASTSource(lse_fwd_sm90, src.signature, src.constants, src.attrs),
                       target=build._target(), options=dict(num_warps=NUM_WARPS))
    path = build.cache_dir() / f"gluon_lse_fwd_{BLOCK_M}x{BLOCK_N}s{STAGES}.cubin"
    path.write_bytes(k.asm["cubin"])
    return path, k.metadata.name, int(k.metadata.shared), k.asm["ptx"]


OUT = ROOT / "bench" / "results" / "gluon_fwd_sm90.json"


def main():
    import json

    from bench.sass import latency, overlap_probe, report
    cubin, name, shared, ptx = compile_sm90()
    sim = latency.simulate_cubin(cubin, name, shared, NUM_WARPS)
    ops, ctas, cycles = sim.ops, sim.ctas_per_sm, sim.cycles_per_iter
    n = 65536
    pred = latency.predict(cycles, n // BLOCK_N, n // BLOCK_M, ctas, 2 * n * n * D)
    seq = overlap_probe._loop(ops)
    print(f"regs {sim.regs}, shared {shared} B, {ctas} CTAs/SM, "
          f"{len(ops)} instructions per warp per tile")
    print("loop:", " | ".join(f"{t} x{c}" for t, c in seq))
    print("ptxas advisories:", overlap_probe._ptxas_advice(ptx) or "none")
    print(f"predicted (latency model, not measured): {cycles:.0f} cycles per tile per SM, "
          f"{1e3 * pred['time_s']:.2f} ms at N = M = {n}, D = {D} "
          f"({pred['pct_bf16_peak']:.1f}% of the bf16 peak by 2NMD)")
    OUT.write_text(json.dumps(dict(
        env=report.env(), what=__doc__.split("\n\n")[0],
        config=dict(block_m=BLOCK_M, block_n=BLOCK_N, d=D, stages=STAGES, num_warps=NUM_WARPS),
        regs=sim.regs, shared_bytes=shared, ctas_per_sm=ctas,
        warp_instrs_per_tile=len(ops), loop=" | ".join(f"{t} x{c}" for t, c in seq),
        exps_under_mma=overlap_probe.exps_under_mma(seq),
        mma_overlaps_exps=overlap_probe._overlapped(seq),
        ptxas_advice=overlap_probe._ptxas_advice(ptx), cycles_per_tile=cycles,
        predicted_latency_model=pred), indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
