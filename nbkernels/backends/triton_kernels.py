"""Triton kernels for the fused neighbor losses; the math is in ``reference.py``.

Two kernels, each one body with ``tl.constexpr`` flags (metric, self-exclusion,
class output, accumulation dtype, dot precision):

* ``neighbor_fwd_kernel``: a program owns BLOCK_M queries and streams BLOCK_N
  reference tiles with an online log-sum-exp. Without CLASS it keeps two (all
  references, positives), each with its own running max. With CLASS the grid has a
  second axis over BLOCK_C class tiles; references are pre-sorted by label, so the
  program for class tile ``c`` streams only the references whose labels fall in it
  (``tile_ptr``) and accumulates their mass with a one-hot ``tl.dot``. It writes the
  mass relative to its own running max plus that max and sum; the launcher merges the
  class tiles with a logsumexp. Every reference is visited once per query block, so
  the cost does not grow with ``num_classes``, and one pass suffices (no lse pass).
* ``neighbor_bwd_kernel``: recomputes logit tiles and ``ds``. REF_MAJOR=False: a
  program owns queries and writes dq; REF_MAJOR=True: it owns references and writes
  dr. Either writes per-row partial sums of ``ds * logit`` for dT, which the launcher
  reduces with torch. No atomics: every output element has exactly one writer, so
  gradients are bitwise deterministic.

Blocks: BLOCK_D (inner loop over the feature dim for the logit dot) and BLOCK_DX
(the slice of dq / dr a program writes; a second grid axis when D > BLOCK_DX) are
chosen by the launcher from D; BLOCK_M / BLOCK_N / BLOCK_OWN / BLOCK_OTHER are
autotuned on power-of-two buckets of (N, M, D), the input dtype and the flags that
change the kernel. Under the interpreter (TRITON_INTERPRET=1) a single 16-wide config
keeps the tests fast and still exercises multi-block paths; NBK_TRITON_AUTOTUNE=0
(read at import) fixes the smallest GPU config, for tests that must not autotune. All
blocks are >= 16, the smallest ``tl.dot``.

fp16 gradient dot: ds is rounded to fp16 for the tensor-core dot, and |ds| <= |g| can
sit far below fp16's normal range (g ~ 1/N for a mean loss). With SCALE_DS the
launcher passes powers of two (``ds_scale``) that bring the largest |ds| near 2^12:
per query row for dq, one for all rows for dr. The kernel multiplies before the cast
and divides after the dot, exactly; the row sums of ds ("sqeuclidean") use the same
rounded values, so ``x sum ds`` cancels against the dot consistently.

Known costs, kept for simplicity: the query tile is reloaded (from cache) for every
reference tile, since D is looped in BLOCK_D chunks; for D > BLOCK_DX the backward
recomputes the logits once per dq / dr slice.
"""
import contextlib
import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Floors of the positives' sum under the shared max (neighbor_fwd_kernel): 2^-64, 2^-960
POS_FLOOR_F32 = tl.constexpr(2.0 ** -64)
POS_FLOOR_F64 = tl.constexpr(2.0 ** -960)

# Feature-dim chunk of the logit dot, and widest dq / dr slice one program writes.
MAX_BLOCK_D = 16 if INTERPRET else 64
MAX_BLOCK_DX = 64 if INTERPRET else 128
# Class tile width of the class-distribution forward (one-hot dot of [BN, BC]).
MAX_BLOCK_C = 16 if INTERPRET else 64

# The configs a GPU autotunes over (also run one by one by the GPU tests).
GPU_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3), (32, 32, 4, 2)]
]
GPU_BWD_CONFIGS = [
    triton.Config({"BLOCK_OWN": bo, "BLOCK_OTHER": bt}, num_warps=w, num_stages=s)
    for bo, bt, w, s in [(128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3), (32, 32, 4, 2)]
]
if INTERPRET:
    FWD_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16})]
    BWD_CONFIGS = [triton.Config({"BLOCK_OWN": 16, "BLOCK_OTHER": 16})]
elif os.environ.get("NBK_TRITON_AUTOTUNE", "1") == "0":
    # one config: no benchmarking; the smallest fits every dtype's shared memory
    FWD_CONFIGS, BWD_CONFIGS = GPU_FWD_CONFIGS[-1:], GPU_BWD_CONFIGS[-1:]
else:
    FWD_CONFIGS, BWD_CONFIGS = GPU_FWD_CONFIGS, GPU_BWD_CONFIGS
# Tuning keys: power-of-two buckets of (N, M, D) and every flag that changes the kernel;
# the tensor dtypes join the key (and fix ACC, MASS_PRECISION, SCALE_DS), D_KEY fixes
# BLOCK_D and BLOCK_DX.
FWD_KEY = ["N_KEY", "M_KEY", "D_KEY", "SQEUCLID", "HAS_OFFSET", "REF_MASK", "CLASS", "POS_PASS",
           "PRECISION", "BLOCK_C"]
BWD_KEY = ["N_KEY", "M_KEY", "D_KEY", "SQEUCLID", "HAS_OFFSET", "REF_MASK", "CLASS", "REF_MAJOR",
           "NEED_DX", "NEED_DT", "PRECISION"]
# Integers that vary per call and gain nothing from specialization (== 1, % 16): one
# compiled kernel for every size. Strides and D stay specialized.
FWD_NO_SPECIALIZE = ["N", "M", "offset", "N_KEY", "M_KEY", "D_KEY"]
BWD_NO_SPECIALIZE = FWD_NO_SPECIALIZE + ["C"]


@contextlib.contextmanager
def fixed_configs(fwd, bwd):
    """Run both kernels with one given config each (tests go through every GPU config)."""
    saved = neighbor_fwd_kernel.configs, neighbor_bwd_kernel.configs
    neighbor_fwd_kernel.configs, neighbor_bwd_kernel.configs = [fwd], [bwd]
    try:
        yield
    finally:
        neighbor_fwd_kernel.configs, neighbor_bwd_kernel.configs = saved


@triton.jit
def _online_lse(b_m, b_l, b_s):
    """One step of an online log-sum-exp over the rows of b_s [BM, BN].

    Returns the new running max and sum, the tile's exp(s - max) and the rescale
    factor of the old sum. tl.max may drop NaN; b_l still turns NaN through exp.
    """
    b_mn = tl.maximum(b_m, tl.max(b_s, 1))
    # all terms so far masked (-inf): shift by 0 so that exp sees -inf, not NaN
    b_ms = tl.where(b_mn == float("-inf"), 0.0, b_mn)
    b_alpha = tl.exp(b_m - b_ms)
    b_p = tl.exp(b_s - b_ms[:, None])
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    return b_mn, b_l, b_p, b_alpha


@triton.jit
def _tile_logits(q, r, ref_mask, o_m, m_m, o_r, m_r, D, offset, b_it,
                 s_qn, s_qd, s_rm, s_rd,
                 SQEUCLID: tl.constexpr, HAS_OFFSET: tl.constexpr, REF_MASK: tl.constexpr,
                 ACC: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """Shifted logits [BM, BN] of queries o_m against references o_r, -inf where masked.

    "sqeuclidean": (2 q.r - ||r||^2) / T; "dot": q.r / T. The norms come from the
    tiles already loaded for the dot (no extra pass or buffer, any strides). REF_MASK:
    references flagged in ``ref_mask`` (M,) are masked out. Also returns the validity
    mask and ||q||^2 [BM] (zeros for "dot").
    """
    b_qr = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    b_qn = tl.zeros([BLOCK_M], dtype=ACC)
    b_rn = tl.zeros([BLOCK_N], dtype=ACC)
    for i_k in range(0, D, BLOCK_D):
        o_k = (i_k + tl.arange(0, BLOCK_D)).to(tl.int64)
        m_k = o_k < D
        # [BM, BD]
        b_q = tl.load(q + o_m[:, None] * s_qn + o_k[None, :] * s_qd,
                      mask=m_m[:, None] & m_k[None, :], other=0)
        # [BD, BN]
        b_rt = tl.load(r + o_r[None, :] * s_rm + o_k[:, None] * s_rd,
                       mask=m_r[None, :] & m_k[:, None], other=0)
        b_qr = tl.dot(b_q, b_rt, b_qr, input_precision=PRECISION)
        if SQEUCLID:
            b_qn += tl.sum(b_q.to(ACC) * b_q.to(ACC), 1)
            b_rn += tl.sum(b_rt.to(ACC) * b_rt.to(ACC), 0)
    if SQEUCLID:
        b_s = (2 * b_qr - b_rn[None, :]) * b_it
    else:
        b_s = b_qr * b_it
    if REF_MASK:
        # [BN] references at infinity (zeroed by the launcher): weight 0
        m_r = m_r & (tl.load(ref_mask + o_r, mask=m_r, other=1) == 0)
    m_s = m_m[:, None] & m_r[None, :]
    if HAS_OFFSET:
        m_s = m_s & (o_r[None, :] != o_m[:, None] + offset)
    b_s = tl.where(m_s, b_s, float("-inf"))
    return b_s, m_s, b_qn


@triton.autotune(configs=FWD_CONFIGS, key=FWD_KEY)
@triton.jit(do_not_specialize=FWD_NO_SPECIALIZE)
def neighbor_fwd_kernel(q, r, q_labels, r_labels, temperature, perm, tile_ptr, ref_mask,
                        lse_all, lse_pos, redo, mass, tile_max, tile_sum,
                        N, M, D, offset, s_qn, s_qd, s_rm, s_rd,
                        N_KEY, M_KEY, D_KEY,
                        SQEUCLID: tl.constexpr, HAS_OFFSET: tl.constexpr, REF_MASK: tl.constexpr,
                        CLASS: tl.constexpr, POS_PASS: tl.constexpr,
                        ACC: tl.constexpr, PRECISION: tl.constexpr, MASS_PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """Online log-sum-exps (CLASS=False) or per-class-tile mass (CLASS=True).

    CLASS=False writes lse_all, lse_pos (N,) with one exp2 per pair: logits are taken in
    log2 units (log2(e)/T folded into one scale, as FlashAttention does), and the
    positives' sum uses the same exponentials under the shared running max. That sum is
    exact unless positives underflow against the max (extreme T: they sit far below the
    nearest negative): rows whose positives' sum ends below POS_FLOOR (or is 0) are
    flagged in ``redo`` (N,) int8, and a second launch with POS_PASS=True recomputes
    lse_pos of the flagged rows only, with the positives' own running max (programs
    without a flagged row skip the loop). Terms lost to underflow are each below 2^-126
    of the shared max (fp32), so a sum >= POS_FLOOR = 2^-64 is exact to 2^-31 relative
    for M < 2^31; fp64: 2^-1022 and 2^-960.

    CLASS=True reads the references in
    label order (perm, sorted r_labels, tile_ptr: references of class tile c are
    perm[tile_ptr[c]:tile_ptr[c+1]]) and writes mass (N, n_tiles * BLOCK_C), every
    column (those >= C are cut off by the launcher), relative to tile_max, plus
    tile_max, tile_sum (N, n_tiles).
    """
    i_m = tl.program_id(0).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < N
    b_it = 1 / tl.load(temperature).to(ACC)
    if not CLASS:
        b_it = b_it * LOG2E  # logits in log2 units: exp2 below
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    b_l = tl.zeros([BLOCK_M], dtype=ACC)
    if CLASS:
        i_c = tl.program_id(1).to(tl.int64)
        o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
        lo = tl.load(tile_ptr + i_c)
        hi = tl.load(tile_ptr + i_c + 1)
        b_y = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    else:
        lo = 0
        hi = M
        # [BM]
        b_a = tl.load(q_labels + o_m, mask=m_m, other=0)
        b_lp = tl.zeros([BLOCK_M], dtype=ACC)
        if POS_PASS:
            b_redo = tl.load(redo + o_m, mask=m_m, other=0)
            # no flagged row in this block: no reference tile at all
            hi = tl.where(tl.max(b_redo, 0) > 0, M, 0)
    for i_n in range(lo, hi, BLOCK_N):
        o_n = (i_n + tl.arange(0, BLOCK_N)).to(tl.int64)
        m_n = o_n < hi
        if CLASS:
            # [BN] original index of the references, in label order
            o_r = tl.load(perm + o_n, mask=m_n, other=0)
        else:
            o_r = o_n
        b_s, _, _ = _tile_logits(q, r, ref_mask, o_m, m_m, o_r, m_n, D, offset, b_it,
                                 s_qn, s_qd, s_rm, s_rd, SQEUCLID=SQEUCLID,
                                 HAS_OFFSET=HAS_OFFSET, REF_MASK=REF_MASK, ACC=ACC,
                                 PRECISION=PRECISION,
                                 BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
        if CLASS:
            b_m, b_l, b_p, b_alpha = _online_lse(b_m, b_l, b_s)
            # [BN] sorted labels
            b_b = tl.load(r_labels + o_n, mask=m_n, other=-1)
            # [BN, BC] one-hot; mass_ic = sum_{b_j=c} exp(s_ij - max_i), rescaled like b_l
            b_hot = (b_b[:, None] == o_c[None, :]).to(ACC)
            b_y = tl.dot(b_p, b_hot, b_y * b_alpha[:, None], input_precision=MASS_PRECISION)
        else:
            # [BN]
            b_b = tl.load(r_labels + o_r, mask=m_n, other=0)
            m_pos = b_a[:, None] == b_b[None, :]
            if POS_PASS:
                # the positives alone, with their own running max
                b_s = tl.where(m_pos, b_s, float("-inf"))
            b_mn = tl.maximum(b_m, tl.max(b_s, 1))
            # all terms so far masked (-inf): shift by 0 so that exp2 sees -inf, not NaN
            b_ms = tl.where(b_mn == float("-inf"), 0.0, b_mn)
            b_alpha = tl.math.exp2(b_m - b_ms)
            # [BM, BN] the one exponential of each pair
            b_p = tl.math.exp2(b_s - b_ms[:, None])
            b_l = b_l * b_alpha + tl.sum(b_p, 1)
            if not POS_PASS:
                b_lp = b_lp * b_alpha + tl.sum(tl.where(m_pos, b_p, 0.0), 1)
            b_m = b_mn
    if CLASS:
        n_tiles = tl.num_programs(1)
        tl.store(mass + o_m[:, None] * (n_tiles * BLOCK_C) + o_c[None, :], b_y,
                 mask=m_m[:, None])
        tl.store(tile_max + o_m * n_tiles + i_c, b_m, mask=m_m)
        tl.store(tile_sum + o_m * n_tiles + i_c, b_l, mask=m_m)
    elif POS_PASS:
        tl.store(lse_pos + o_m, (b_m + tl.log2(b_l)) * LN2, mask=m_m & (b_redo != 0))
    else:
        # no term: max -inf and sum 0 give -inf; back to natural units
        tl.store(lse_all + o_m, (b_m + tl.log2(b_l)) * LN2, mask=m_m)
        tl.store(lse_pos + o_m, (b_m + tl.log2(b_lp)) * LN2, mask=m_m)
        # positives underflowed against the shared max, or none, or the max is +inf (dot
        # at infinity: exp2(inf - inf) is NaN for every term): exact second pass
        if ACC == tl.float64:
            b_redo = b_lp < POS_FLOOR_F64
        else:
            b_redo = b_lp < POS_FLOOR_F32
        b_redo = b_redo | (b_m == float("inf"))
        tl.store(redo + o_m, b_redo.to(tl.int8), mask=m_m)


@triton.jit
def _tile_dlogits(q, r, ref_mask, q_labels, r_labels, lse_all, lse_pos, g_all, g_pos, g_cls,
                  delta, o_m, o_n, N, M, D, C, offset, b_it,
                  s_qn, s_qd, s_rm, s_rd, s_gn, s_gc,
                  SQEUCLID: tl.constexpr, HAS_OFFSET: tl.constexpr, REF_MASK: tl.constexpr,
                  CLASS: tl.constexpr,
                  ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Recompute ds [BM, BN] = dloss / dlogit and ds * logit (true logit) for dT."""
    m_m = o_m < N
    m_n = o_n < M
    b_s, m_s, b_qn = _tile_logits(q, r, ref_mask, o_m, m_m, o_n, m_n, D, offset, b_it,
                                  s_qn, s_qd, s_rm, s_rd, SQEUCLID=SQEUCLID,
                                  HAS_OFFSET=HAS_OFFSET, REF_MASK=REF_MASK, ACC=ACC,
                                  PRECISION=PRECISION,
                                  BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    # [BM]
    b_lse = tl.load(lse_all + o_m, mask=m_m, other=0).to(ACC)
    # p_ij = exp(s_ij - lse_all_i), both shifted by the same row constant. Each term of
    # ds is selected by tl.where, so rows without terms (lse -inf, delta NaN) give 0
    b_p = tl.exp(b_s - b_lse[:, None])
    # [BN]
    b_b = tl.load(r_labels + o_n, mask=m_n, other=-1)
    if CLASS:
        m_g = m_s & (b_b >= 0)[None, :] & (b_b < C)[None, :]
        # [BM, BN] G_{i, b_j}, gathered
        b_g = tl.load(g_cls + o_m[:, None] * s_gn + b_b.to(tl.int64)[None, :] * s_gc, mask=m_g,
                      other=0).to(ACC)
        b_delta = tl.load(delta + o_m, mask=m_m, other=0).to(ACC)
        # ds_ij = p_ij (G_{i,b_j} - delta_i)
        b_ds = tl.where(m_s, b_p * (b_g - b_delta[:, None]), 0)
    else:
        b_a = tl.load(q_labels + o_m, mask=m_m, other=0)
        b_lsep = tl.load(lse_pos + o_m, mask=m_m, other=0).to(ACC)
        b_ga = tl.load(g_all + o_m, mask=m_m, other=0).to(ACC)
        b_gp = tl.load(g_pos + o_m, mask=m_m, other=0).to(ACC)
        m_pos = m_s & (b_a[:, None] == b_b[None, :])
        # p+_ij = [b_j = a_i] exp(s_ij - lse_pos_i)
        b_pp = tl.exp(b_s - b_lsep[:, None])
        # ds_ij = g_all_i p_ij + g_pos_i p+_ij
        b_ds = tl.where(m_s, b_ga[:, None] * b_p, 0) + tl.where(m_pos, b_gp[:, None] * b_pp, 0)
    if SQEUCLID:
        # true logit: restore the row constant -||q_i||^2 / T
        b_z = b_s - b_qn[:, None] * b_it
    else:
        b_z = b_s
    # ds = 0 wherever the logit is -inf (masked, or underflow): keep 0 * -inf out
    b_dsz = tl.where(b_ds != 0, b_ds * b_z, 0)
    return b_ds, b_dsz


@triton.autotune(configs=BWD_CONFIGS, key=BWD_KEY)
@triton.jit(do_not_specialize=BWD_NO_SPECIALIZE)
def neighbor_bwd_kernel(q, r, ref_mask, q_labels, r_labels, temperature, lse_all, lse_pos,
                        g_all, g_pos, g_cls, delta, ds_scale, dx, dt_part,
                        N, M, D, C, offset, s_qn, s_qd, s_rm, s_rd, s_gn, s_gc, s_xn, s_xd,
                        N_KEY, M_KEY, D_KEY,
                        SQEUCLID: tl.constexpr, HAS_OFFSET: tl.constexpr, REF_MASK: tl.constexpr,
                        CLASS: tl.constexpr,
                        REF_MAJOR: tl.constexpr, NEED_DX: tl.constexpr, NEED_DT: tl.constexpr,
                        SCALE_DS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_OWN: tl.constexpr, BLOCK_OTHER: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_DX: tl.constexpr):
    """dq (REF_MAJOR=False) or dr (REF_MAJOR=True) and per-row sums of ds * logit.

    A program owns BLOCK_OWN rows of x (q or r) and the feature slice BLOCK_DX of dx,
    and streams the other side y (r or q) in BLOCK_OTHER tiles:
        "dot":          dx = 1/T sum ds y
        "sqeuclidean":  dx = 2/T (sum ds y - x sum ds)
    dt_part[own] = sum_other ds * logit, written by the slice-0 programs only.
    SCALE_DS: ds_scale holds the scale of each query (N,), or of all (1,) when REF_MAJOR.
    """
    i_o = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1).to(tl.int64)
    o_own = i_o * BLOCK_OWN + tl.arange(0, BLOCK_OWN)
    o_dx = i_d * BLOCK_DX + tl.arange(0, BLOCK_DX)
    m_dx = o_dx < D
    b_it = 1 / tl.load(temperature).to(ACC)
    if REF_MAJOR:
        n_own, n_other = M, N
        x, s_x, s_xk = r, s_rm, s_rd
        y, s_y, s_yk = q, s_qn, s_qd
    else:
        n_own, n_other = N, M
        x, s_x, s_xk = q, s_qn, s_qd
        y, s_y, s_yk = r, s_rm, s_rd
    m_own = o_own < n_own
    if SCALE_DS:
        # [BOWN] powers of two
        if REF_MAJOR:
            b_sc = tl.zeros([BLOCK_OWN], dtype=ACC) + tl.load(ds_scale).to(ACC)
        else:
            b_sc = tl.load(ds_scale + o_own, mask=m_own, other=1).to(ACC)
    b_acc = tl.zeros([BLOCK_OWN, BLOCK_DX], dtype=ACC)
    b_sum = tl.zeros([BLOCK_OWN], dtype=ACC)
    b_dt = tl.zeros([BLOCK_OWN], dtype=ACC)
    for i_t in range(0, n_other, BLOCK_OTHER):
        o_other = (i_t + tl.arange(0, BLOCK_OTHER)).to(tl.int64)
        if REF_MAJOR:
            b_ds, b_dsz = _tile_dlogits(q, r, ref_mask, q_labels, r_labels, lse_all, lse_pos,
                                        g_all, g_pos, g_cls, delta, o_other, o_own, N, M, D, C,
                                        offset, b_it, s_qn, s_qd, s_rm, s_rd, s_gn, s_gc,
                                        SQEUCLID=SQEUCLID, HAS_OFFSET=HAS_OFFSET, REF_MASK=REF_MASK,
                                        CLASS=CLASS,
                                        ACC=ACC, PRECISION=PRECISION, BLOCK_M=BLOCK_OTHER,
                                        BLOCK_N=BLOCK_OWN, BLOCK_D=BLOCK_D)
            # [BOWN, BOTHER]
            b_ds = tl.trans(b_ds)
            b_dsz = tl.trans(b_dsz)
        else:
            b_ds, b_dsz = _tile_dlogits(q, r, ref_mask, q_labels, r_labels, lse_all, lse_pos,
                                        g_all, g_pos, g_cls, delta, o_own, o_other, N, M, D, C,
                                        offset, b_it, s_qn, s_qd, s_rm, s_rd, s_gn, s_gc,
                                        SQEUCLID=SQEUCLID, HAS_OFFSET=HAS_OFFSET, REF_MASK=REF_MASK,
                                        CLASS=CLASS,
                                        ACC=ACC, PRECISION=PRECISION, BLOCK_M=BLOCK_OWN,
                                        BLOCK_N=BLOCK_OTHER, BLOCK_D=BLOCK_D)
        b_dt += tl.sum(b_dsz, 1)
        if NEED_DX:
            # [BOTHER, BDX]
            b_y = tl.load(y + o_other[:, None] * s_y + o_dx[None, :] * s_yk,
                          mask=(o_other < n_other)[:, None] & m_dx[None, :], other=0)
            # 16-bit inputs: ds rounded to their dtype for the tensor-core dot (fp16: scaled)
            if SCALE_DS:
                b_dsr = (b_ds * b_sc[:, None]).to(b_y.dtype)
            else:
                b_dsr = b_ds.to(b_y.dtype)
            if SQEUCLID:
                b_sum += tl.sum(b_dsr.to(ACC), 1)
            b_acc = tl.dot(b_dsr, b_y, b_acc, input_precision=PRECISION)
    if NEED_DX:
        if SCALE_DS:
            b_acc = b_acc / b_sc[:, None]
            b_sum = b_sum / b_sc
        if SQEUCLID:
            # [BOWN, BDX]
            b_x = tl.load(x + o_own[:, None] * s_x + o_dx[None, :] * s_xk,
                          mask=m_own[:, None] & m_dx[None, :], other=0).to(ACC)
            b_acc = 2 * (b_acc - b_x * b_sum[:, None]) * b_it
        else:
            b_acc = b_acc * b_it
        tl.store(dx + o_own[:, None] * s_xn + o_dx[None, :] * s_xd,
                 b_acc.to(dx.dtype.element_ty), mask=m_own[:, None] & m_dx[None, :])
    if NEED_DT:  # compile-time flag, then a runtime test: kept as two ifs
        if i_d == 0:
            tl.store(dt_part + o_own, b_dt, mask=m_own)
