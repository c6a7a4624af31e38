"""The class forward's main pass (``soft_knn_predict``, the class distribution) for sm_90
in Gluon: the Triton main pass's arithmetic with each reference tile's logit wgmma issued
under the previous tile's softmax and the class mass summed by asynchronous TF32 wgmmas.

Variant "sm90_gluon" of kind "fwd_class_main" (``kernels.VARIANTS``): opt-in, as the loss
forward's (``gluon_lse``), since Gluon has no interpreter (``NBK_VARIANTS=sm90_gluon``, or
``variants.pinned``); tests/triton/test_gluon_main.py checks it against the fp64 oracle on
an sm_90 GPU, tests/test_gluon_fwd.py what the CPU can (the arguments it refuses and those
it hands the kernel, the one-hot layout, the compiled SASS through
``bench/sass/gluon_class_probe.py``, which writes the latency model's estimate).

It is the main pass of ``forward._probs_fwd`` (its ``main``), with the Triton main pass's
contract (``neighbor_fwd_kernel`` with CLASS): per row and class tile, the tile's anchor
(``tile_max``), its sum and class mass relative to exp(anchor) (``tile_sum``, ``mass``)
and the exact pass's flag (``redo``: a sum that is not finite, or terms under no anchor);
the launcher's Triton exact pass then recomputes the flagged rows. The arithmetic: logits
``s = fma(q.r, c, col)`` over the references in label order, the self pair masked by
position (``self_pos``), the first tile of a class tile sets each row's anchor, the
later ones run under its lazy shift (moved by whole powers of two when a tile's sum passes
2^64), and the mass ``y += p . onehot`` in two TF32 wgmmas, p = hi + lo (hi truncated to
TF32, lo the exact rest; the one-hot is exact in TF32).

The pipeline: a program owns BLOCK_M query rows (in shared memory) and one class tile,
and streams the class tile's references, their column terms and their one-hot columns
through cp.async rings (two slots; three for the one-hot, which the mass wgmma of tile k
reads after tile k + 2 is requested). The mass wgmma takes p from registers: p's columns
are permuted within each group of 8 by a reshape and a permute, so that the logit
accumulator's registers are the TF32 operand's as they are (the conversion is asserted
trivial); the one-hot's columns follow the same permutation. The launcher lays the
one-hot out so (``one_hot``): a [BLOCK_C, H] fp32 matrix, each class tile's columns from
a multiple of 8 (``hot_ptr``), in that order.
"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma,
                                                              warpgroup_mma_wait)

from . import configs
from .gluon_lse import (LN2, LOG2E, MAX_MOVE, RESCALE, _o_w, _shift, async_copy, async_load,
                        barrier)

# reference tiles per self-pair mode (``class_main_sm90``'s SELF): 128 wide where the main
# loop has no self mask (at 255 registers a thread, no spill; the latency model, 1000
# classes, the batch: 3.29 ms under triton 3.6 against 3.89 at 64 wide, 3.48 against 3.99
# under 3.9; bench/results/gluon_class_probe_sm90*.json), 64 with the mask in every tile
# (128 wide: 11.7 against 4.0 ms under 3.9)
D, BLOCK_M, NUM_WARPS = 128, 128, 8
TILE_N = {0: 128, 1: 64, 2: 128}
BLOCK_N = max(TILE_N.values())   # the one-hot's padding past its end
BLOCK_CS = (16,)   # the class tile the model was compiled for (M >= 20 C: class_block_cap)


@gluon.jit
def _seq(k, k_a, e):
    """The class tile's reference tile streamed k-th: the e tiles from k_a (those that hold
    the block's self pairs) first, then the others in order."""
    return gl.where(k < e, k_a + k, k - e + gl.where(k - e >= k_a, e, 0))


@gluon.jit
def _request(r_s, h_s, c_s, r, hot, r_col, k, k_a, e, lo, h_lo, M, H, o_nl, o_d, o_hr, o_hc,
             BN: gl.constexpr, D: gl.constexpr):
    """cp.async of the k-th streamed tile: its references (zeros past M), their column
    terms (``r_col`` is padded past M) and its one-hot columns (padded a tile past the
    one-hot's end)."""
    t = _seq(k, k_a, e) * BN
    o_n = lo + t + o_nl
    async_load(r_s.index(k % 2), r + o_n[:, None] * D + o_d[None, :],
               mask=(o_n < M)[:, None] & (o_d < D)[None, :])
    async_load(h_s.index(k % 3), hot + o_hc[:, None] * H + (h_lo + t + o_hr)[None, :])
    async_load(c_s.index(k % 2), r_col + lo + t + _o_w(BN))
    async_copy.commit_group()


@gluon.jit
def _step(q_s, r_s, h_s, c_s, r, hot, r_col, k, k_a, e, n, lo, hi, h_lo, M, H, b_s, b_self,
          b_c, b_m, b_l, b_y, zero, o_nl, o_d, o_hr, o_hc, BM: gl.constexpr, BN: gl.constexpr,
          D: gl.constexpr, FIRST: gl.constexpr, SELF: gl.constexpr, COL: gl.constexpr,
          cols: gl.constexpr, a_l: gl.constexpr, mmc: gl.constexpr, NEXT: gl.constexpr = True):
    """The k-th streamed tile: its terms, the next tile's logit wgmma issued (NEXT: there
    is one), this tile's softmax and mass. SELF: the self pairs masked; COL: the columns
    past the class tile."""
    b_col = c_s.index(k % 2).load(cols)
    o_s = lo + _seq(k, k_a, e) * BN + gl.arange(0, BN, layout=cols)
    if COL:
        b_col = gl.where(o_s < hi, b_col, float("-inf"))
    async_copy.wait_group(0)
    fence_async_shared()
    barrier()
    if k + 2 < n:
        _request(r_s, h_s, c_s, r, hot, r_col, k + 2, k_a, e, lo, h_lo, M, H, o_nl, o_d, o_hr,
                 o_hc, BN, D)
    if NEXT:
        tok = warpgroup_mma(q_s, r_s.index((k + 1) % 2).permute((1, 0)), zero, use_acc=False,
                            is_async=True)
    b_z = gl.fma(b_s, b_c, b_col[None, :])
    if SELF:
        b_z = gl.where(o_s[None, :] == b_self[:, None], float("-inf"), b_z)
    if FIRST:
        b_m = gl.max(b_z, axis=1)
    b_sh = _shift(b_m)
    b_p = gl.exp2(gl.fma(b_z, LOG2E, b_sh[:, None]))
    b_t = gl.sum(b_p, axis=1)
    b_k = gl.where(b_t > RESCALE, gl.minimum(gl.ceil(gl.log2(b_t)), MAX_MOVE), 0.0)
    b_m = gl.where(b_k > 0, b_m + b_k * LN2, b_m)
    b_f = gl.exp2(_shift(b_m) - b_sh)
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
    # both wgmmas done (they complete in order: the next tile's logits, then the mass)
    if NEXT:
        b_y, b_s = warpgroup_mma_wait(num_outstanding=0, deps=(b_y, tok))
    else:
        b_y = warpgroup_mma_wait(num_outstanding=0, deps=(b_y,))
    b_y = b_y * gl.convert_layout(b_f, gl.SliceLayout(1, mmc))[:, None]
    return b_s, b_m, b_l, b_y


@gluon.jit(do_not_specialize=["N", "M"])
def class_main_sm90(q, r, hot, hot_ptr, r_col, self_pos, order, tile_ptr, scale, mass,
                    tile_max, tile_sum, redo, N, M, H, s_qn, BM: gl.constexpr,
                    BN: gl.constexpr, BC: gl.constexpr, D: gl.constexpr, SELF: gl.constexpr):
    """SELF: 0 no pair excluded; 1 each row's excluded reference at ``self_pos`` (label
    order), masked in every tile; 2 the batch (the queries are the references, offset 0):
    the program's rows are those at label-order positions [i_m, i_m + BM) (``q`` is
    unused, the rows are read from ``r``, its outputs go to rows ``order``), so its self
    pairs lie in at most 3 reference tiles (2 where BN >= BM), streamed first and masked;
    the others not."""
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
    n_tiles = gl.num_programs(1)
    lo = gl.load(tile_ptr + i_c).to(gl.int32)
    hi = gl.load(tile_ptr + i_c + 1).to(gl.int32)
    # in units of 8 columns: the compiler then knows the one-hot loads' alignment
    h_lo = gl.load(hot_ptr + i_c) * 8
    n = gl.cdiv(hi - lo, BN)
    # the tiles holding self pairs, streamed first (SELF == 2): [k_a, k_a + e)
    k_a = 0
    e = 0
    if SELF == 2:
        if (i_m < hi) & (i_m + BM > lo):
            k_a = (gl.maximum(i_m, lo) - lo) // BN
            e = (gl.minimum(i_m + BM, hi) - 1 - lo) // BN - k_a + 1
    o_ml = gl.arange(0, BM, layout=gl.SliceLayout(1, ld))
    o_d = gl.arange(0, D, layout=gl.SliceLayout(0, ld))
    o_nl = gl.arange(0, BN, layout=gl.SliceLayout(1, ld))
    o_hr = gl.arange(0, BN, layout=gl.SliceLayout(0, hl))
    o_hc = gl.arange(0, BC, layout=gl.SliceLayout(1, hl))
    src = r if SELF == 2 else q
    q_s = gl.allocate_shared_memory(
        q.dtype.element_ty, [BM, D],
        gl.NVMMASharedLayout.get_default_for([BM, D], q.dtype.element_ty),
        gl.load(src + i_m.to(gl.int64) * s_qn + (o_ml[:, None] * s_qn + o_d[None, :]),
                mask=(o_ml < N - i_m)[:, None], other=0.0))
    r_s = gl.allocate_shared_memory(
        q.dtype.element_ty, [2, BN, D],
        gl.NVMMASharedLayout.get_default_for([BN, D], q.dtype.element_ty))
    h_s = gl.allocate_shared_memory(gl.float32, [3, BC, BN],
                                    gl.NVMMASharedLayout.get_default_for([BC, BN], gl.float32))
    c_s = gl.allocate_shared_memory(gl.float32, [2, BN],
                                    gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    o_m = i_m + gl.arange(0, BM, layout=rows)
    m_m = o_m < N
    b_self = o_m
    if SELF == 1:
        b_self = gl.load(self_pos + o_m, mask=m_m, other=-1)
    b_c = gl.load(scale)
    zero = gl.zeros([BM, BN], gl.float32, mma)
    b_y = gl.zeros([BM, BC], gl.float32, mmc)
    b_m = gl.full([BM], float("-inf"), gl.float32, rows)
    b_l = gl.zeros([BM], gl.float32, rows)
    if n > 0:
        _request(r_s, h_s, c_s, r, hot, r_col, 0, k_a, e, lo, h_lo, M, H, o_nl, o_d, o_hr, o_hc,
                 BN, D)
        async_copy.wait_group(0)
        fence_async_shared()
        barrier()
        if n > 1:
            _request(r_s, h_s, c_s, r, hot, r_col, 1, k_a, e, lo, h_lo, M, H, o_nl, o_d, o_hr,
                     o_hc, BN, D)
        tok = warpgroup_mma(q_s, r_s.index(0).permute((1, 0)), zero, use_acc=False,
                            is_async=True)
        b_s = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
        # the first tile sets the anchors; with SELF == 2 it and the next (at most 2) hold
        # the self pairs, the loop none; the class tile's last, part-filled tile is
        # streamed last (or among the first), the loop's are full. The last step issues
        # no next tile (a first one that is the last, n = 1 or n = e, issues one on a
        # stale slot, its result unused)
        b_s, b_m, b_l, b_y = _step(q_s, r_s, h_s, c_s, r, hot, r_col, 0, k_a, e, n, lo, hi,
                                   h_lo, M, H, b_s, b_self, b_c, b_m, b_l, b_y, zero, o_nl,
                                   o_d, o_hr, o_hc, BM, BN, D, True, SELF != 0, True, cols, a_l,
                                   mmc)
        k0 = 1
        if SELF == 2:
            # unrolled (e <= 3, 2 where BM <= BN): the loop below is the kernel's one main
            # loop
            if e > 1:
                b_s, b_m, b_l, b_y = _step(q_s, r_s, h_s, c_s, r, hot, r_col, 1, k_a, e, n, lo,
                                           hi, h_lo, M, H, b_s, b_self, b_c, b_m, b_l, b_y,
                                           zero, o_nl, o_d, o_hr, o_hc, BM, BN, D, False, True,
                                           True, cols, a_l, mmc)
            if BM > BN:
                if e > 2:
                    b_s, b_m, b_l, b_y = _step(q_s, r_s, h_s, c_s, r, hot, r_col, 2, k_a, e, n,
                                               lo, hi, h_lo, M, H, b_s, b_self, b_c, b_m, b_l,
                                               b_y, zero, o_nl, o_d, o_hr, o_hc, BM, BN, D,
                                               False, True, True, cols, a_l, mmc)
            k0 = gl.maximum(e, 1)
        for k in range(k0, n - 1):
            b_s, b_m, b_l, b_y = _step(q_s, r_s, h_s, c_s, r, hot, r_col, k, k_a, e, n, lo, hi,
                                       h_lo, M, H, b_s, b_self, b_c, b_m, b_l, b_y, zero, o_nl,
                                       o_d, o_hr, o_hc, BM, BN, D, False, SELF == 1, False,
                                       cols, a_l, mmc)
        if n - 1 >= k0:
            b_s, b_m, b_l, b_y = _step(q_s, r_s, h_s, c_s, r, hot, r_col, n - 1, k_a, e, n, lo,
                                       hi, h_lo, M, H, b_s, b_self, b_c, b_m, b_l, b_y, zero,
                                       o_nl, o_d, o_hr, o_hc, BM, BN, D, False, SELF == 1, True,
                                       cols, a_l, mmc, False)
    # the sums were taken under fl(b_m log2 e): relative to exp(b_m), each times 2^-d
    # (``kernel_fwd``'s class epilogue)
    b_ms = gl.where(b_m == float("-inf"), 0.0, b_m)
    b_sc = gl.exp2(-gl.fma(b_ms, LOG2E, -(b_ms * LOG2E)))
    # the exact pass's rows: a sum that is not finite, or no anchor (a first tile all
    # masked: with SELF == 2 it may hold the row's own reference alone) where the class
    # tile has more references (``kernel_fwd``'s class epilogue)
    b_bad = ~(b_l < float("inf")) | ((b_m == float("-inf")) & (hi - lo > 1))
    # int64 row offsets: N (n_tiles BC) may pass 2^31
    w_m = o_m.to(gl.int64)
    if SELF == 2:
        w_m = gl.load(order + o_m, mask=m_m, other=0).to(gl.int64)
    gl.store(redo + w_m * n_tiles + i_c, b_bad.to(gl.int8), mask=m_m)
    gl.store(tile_max + w_m * n_tiles + i_c, b_m, mask=m_m)
    gl.store(tile_sum + w_m * n_tiles + i_c, b_l * b_sc, mask=m_m)
    o_cc = i_c * BC + gl.arange(0, BC, layout=gl.SliceLayout(0, mmc))
    w_mc = gl.convert_layout(w_m, gl.SliceLayout(1, mmc))
    m_mc = gl.convert_layout(m_m, gl.SliceLayout(1, mmc))
    b_yc = b_y * gl.convert_layout(b_sc, gl.SliceLayout(1, mmc))[:, None]
    gl.store(mass + w_mc[:, None] * (n_tiles * BC) + o_cc[None, :], b_yc, mask=m_mc[:, None])


KERNEL = class_main_sm90


def _permuted(t):
    """The reference (tile-local column) that register column ``t`` of p holds after the
    kernel's permutation: {2t, 2t + 1} of each group of 8 become {t, t + 4}."""
    return (t // 8) * 8 + (t % 4) * 2 + (t % 8) // 4


def one_hot(labels, tile_ptr, block_c, m):
    """([BLOCK_C, H] fp32 one-hot, (tiles,) int32 first column of each class tile over 8):
    class tile t's references [tile_ptr[t], tile_ptr[t + 1]) (``labels``: class labels in
    label order, -1 for none) from column 8 hot_ptr[t], in the order of p's
    permuted columns; zero columns past each tile's references and a tile past the end.
    H = M + 8 tiles + BLOCK_N (rounded up to 16) bounds the extent without a host
    synchronisation."""
    tiles = tile_ptr.shape[0] - 1
    dev = labels.device
    size = (tile_ptr[1:] - tile_ptr[:-1]).to(torch.int64)
    padded = (size + 7) // 8 * 8
    hot_ptr = torch.zeros(tiles, dtype=torch.int64, device=dev)
    hot_ptr[1:] = torch.cumsum(padded, 0)[:-1]
    # a multiple of 16 (every launch the same specialisation): the one-hot's rows then
    # start 64-byte aligned, and a thread's 4 columns load as one 16-byte cp.async
    h = (m + 8 * tiles + BLOCK_N + 15) // 16 * 16
    u = torch.arange(h, dtype=torch.int64, device=dev)
    t = (torch.searchsorted(hot_ptr, u, right=True) - 1).clamp(0, tiles - 1)
    local = _permuted(u - hot_ptr[t])
    j = tile_ptr[:-1].to(torch.int64)[t] + local
    inside = local < size[t]
    slot = labels[j.clamp(0, max(m - 1, 0))].to(torch.int64) - t * block_c if m else local
    inside &= (slot >= 0) & (slot < block_c)
    hot = torch.zeros(block_c, h, dtype=torch.float32, device=dev)
    hot[slot.clamp(0, block_c - 1)[inside], u[inside]] = 1.0
    return hot, (hot_ptr // 8).to(torch.int32)


def why_not(args):
    """Why the main pass cannot take these ``_probs_fwd`` arguments; None if it can."""
    q, r = args["q"], args["r"]
    if q.dtype not in (torch.bfloat16, torch.float16) or args["D"] != D:
        return f"takes bf16 / fp16 rows of D = {D}, got {q.dtype} D = {args['D']}"
    if q.stride(1) != 1 or r.stride(1) != 1 or r.stride(0) != D or r.data_ptr() % 16:
        return "takes rows with unit feature stride and contiguous, 16-byte aligned references"
    if args["BLOCK_C"] not in BLOCK_CS:
        return f"takes class tiles of {BLOCK_CS} classes, got {args['BLOCK_C']}"
    if (r.shape[0] + BLOCK_N) * D >= 2 ** 31:
        return "takes references whose offsets fit in int32"
    return None


def main_pass(args, grid, order=None):
    """``_probs_fwd``'s main pass (``main``): the Gluon kernel on its arguments, recorded
    in ``configs.LAUNCHED`` as kind "fwd_class_main". ``order``: for the batch (the
    queries are the references, the pair i = i excluded), the references' label order
    (the queries are then streamed in it, ``class_main_sm90``'s SELF == 2)."""
    reason = why_not(args)
    if reason:
        raise ValueError(f"the Gluon class main pass {reason}")
    q, r = args["q"], args["r"]
    tiles = args["tile_ptr"].shape[0] - 1
    hot, hot_ptr = one_hot(args["r_labels"], args["tile_ptr"], args["BLOCK_C"], args["M"])
    self_pos = args["self_pos"]
    mode = 0 if self_pos is None else 1 if order is None else 2
    class_main_sm90[(triton.cdiv(args["N"], BLOCK_M), tiles)](
        q, r, hot, hot_ptr, args["r_col"], q if self_pos is None else self_pos,
        q if order is None else order, args["tile_ptr"], args["scale"], args["mass"],
        args["tile_max"], args["tile_sum"], args["redo"], args["N"], args["M"], hot.shape[1],
        r.stride(0) if mode == 2 else q.stride(0), BLOCK_M, TILE_N[mode], args["BLOCK_C"], D,
        mode, num_warps=NUM_WARPS)
    configs.LAUNCHED.setdefault(("fwd_class_main", str(q.dtype), D, (("SELF", str(mode)),)),
                                set()).add(f"{BLOCK_M}x{TILE_N[mode]}w{NUM_WARPS}")
