"""The "ahead" form of ``overlap_probe`` (and ``ladder``) in Gluon, with the Gluon main
pass's staging: one warpgroup, the reference tiles through a cp.async ring of STAGES
buffers, the next tile's wgmma issued async before the current tile's exps. Imported
only where Gluon is wanted (it needs ``triton.experimental.gluon``)."""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma,
                                                              warpgroup_mma_wait)

from nbkernels.backends.triton.gluon_lse import async_copy, async_load, barrier


@gluon.jit
def stage(q, r, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr,
          STAGES: gl.constexpr):
    """The program's rows of ``q`` in shared memory, a ring of STAGES buffers for the
    tiles of ``r``, its first STAGES - 2 requested: ``(q_s, r_s, o_nl, o_d)``."""
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    o_ml = gl.program_id(0) * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld))
    o_d = gl.arange(0, D, layout=gl.SliceLayout(0, ld))
    q_s = gl.allocate_shared_memory(
        gl.bfloat16, [BLOCK_M, D], gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], gl.bfloat16),
        gl.load(q + o_ml[:, None] * D + o_d[None, :]))
    r_s = gl.allocate_shared_memory(
        gl.bfloat16, [STAGES, BLOCK_N, D],
        gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], gl.bfloat16))
    o_nl = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ld))
    for s in gl.static_range(STAGES - 2):
        async_load(r_s.index(s), r + (s * BLOCK_N + o_nl)[:, None] * D + o_d[None, :])
        async_copy.commit_group()
    return q_s, r_s, o_nl, o_d


@gluon.jit
def issue(q_s, r_s, r, o_nl, o_d, t, n, zero, BLOCK_N: gl.constexpr, D: gl.constexpr,
          STAGES: gl.constexpr):
    """Request tile t + STAGES - 2 into the ring (the slot of tile t - 2, whose wgmma is
    done), wait for tile t and issue its wgmma asynchronously (``S = q r_t^T``)."""
    nxt = t + STAGES - 2
    if nxt < n:
        async_load(r_s.index(nxt % STAGES), r + (nxt * BLOCK_N + o_nl)[:, None] * D + o_d[None, :])
    async_copy.commit_group()
    async_copy.wait_group(STAGES - 2)
    barrier()
    fence_async_shared()
    return warpgroup_mma(q_s, r_s.index(t % STAGES).permute((1, 0)), zero, use_acc=False,
                         is_async=True)


@gluon.jit
def gluon_ahead(q, r, out, M, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr,
                STAGES: gl.constexpr, CARRY: gl.constexpr):
    """CARRY: the wgmma waited for with one group left at the top of the next iteration
    (in flight across the back edge); else waited for before the back edge."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, BLOCK_N, 16])
    q_s, r_s, o_nl, o_d = stage(q, r, BLOCK_M, BLOCK_N, D, STAGES)
    n = M // BLOCK_N
    zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
    b_l = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, mma))
    tok = issue(q_s, r_s, r, o_nl, o_d, 0, n, zero, BLOCK_N, D, STAGES)
    if not CARRY:
        b_s = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
    for j in range(n - 1):
        nxt_tok = issue(q_s, r_s, r, o_nl, o_d, j + 1, n, zero, BLOCK_N, D, STAGES)
        if CARRY:
            b_s = warpgroup_mma_wait(num_outstanding=1, deps=(tok,))
            b_l += gl.sum(gl.exp2(b_s), axis=1)
            tok = nxt_tok
        else:
            b_l += gl.sum(gl.exp2(b_s), axis=1)
            b_s = warpgroup_mma_wait(num_outstanding=0, deps=(nxt_tok,))
    if CARRY:
        b_s = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
    b_l += gl.sum(gl.exp2(b_s), axis=1)
    o_m = gl.program_id(0) * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))
    gl.store(out + o_m, b_l)
