"""The forward kernel, ``neighbor_fwd_kernel`` (see ``kernels``)."""
import triton
import triton.language as tl

from .common import (
    FWD_NO_SPECIALIZE, LN2, MAX_MOVE_F32, MAX_MOVE_F64,
    POS_FLOOR_F32, POS_FLOOR_F64, RESCALE_F32, RESCALE_F64, _col_term, _diagonal,
    _diagonal_tiles, _exp, _gather_index, _gathered_pairs, _load_rows, _lse, _online_lse,
    _peeled, _residue, _rows_dot, _shift)


@triton.jit
def _lazy_move(b_m, b_sh, b_t, ACC: tl.constexpr):
    """The lazy shift's step after a tile whose terms under shift ``b_sh`` (the anchor
    b_m's) sum to b_t: (the anchor, moved by k ln 2 with k = 0 unless b_t passed RESCALE,
    at most MAX_MOVE; the factor the sums follow the shift's actual move by, its float
    difference, exact)."""
    RESCALE: tl.constexpr = RESCALE_F64 if ACC == tl.float64 else RESCALE_F32
    MAX_MOVE: tl.constexpr = MAX_MOVE_F64 if ACC == tl.float64 else MAX_MOVE_F32
    b_k = tl.where(b_t > RESCALE, tl.minimum(tl.math.ceil(tl.log2(b_t)), MAX_MOVE), 0.0)
    b_m = tl.where(b_k > 0, b_m + b_k * LN2, b_m)
    return b_m, tl.math.exp2(_shift(b_m) - b_sh)


@triton.jit
def _main_tile(t, e_lo, e_n, BLOCK_N: tl.constexpr):
    """The first reference of the main loop's t-th tile: the tiles [e_lo, e_lo + e_n) are
    peeled off it."""
    return (t + tl.where(t >= e_lo, e_n, 0)) * BLOCK_N


@triton.jit
def _fwd_lse_dot(b_q, q, r, o_m, m_m, hi, D, s_qn, s_qd, s_rm, s_rd, RESIDENT: tl.constexpr,
                 ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, i_n):
    """[BM, BN] q.r of the reference tile [i_n, i_n + BN) (``_fwd_lse_tile``'s dot)."""
    o_n = tl.arange(0, BLOCK_N)
    b_qr, _ = _rows_dot(b_x=b_q, x=q, y=r + i_n * s_rm, o_x=o_m, m_x=m_m, o_y=o_n,
                        m_y=o_n < hi - i_n, D=D, s_xn=s_qn, s_xd=s_qd, s_yn=s_rm, s_yd=s_rd,
                        RESIDENT=RESIDENT, ACC=ACC, PRECISION=PRECISION, BLOCK_X=BLOCK_M,
                        BLOCK_Y=BLOCK_N, BLOCK_D=BLOCK_D)
    return b_qr


@triton.jit
def _fwd_lse_tile(b_m, b_l, b_mp, b_lp, b_q, b_a, q, r, r_labels, r_col, r_pack, o_m, m_m, hi, D,
                  offset, s_qn, s_qd, s_rm, s_rd, b_c, PACKED: tl.constexpr, RESIDENT: tl.constexpr,
                  ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, i_n, i_m0, DIAG: tl.constexpr,
                  FIRST: tl.constexpr, POS_PASS: tl.constexpr, b_qr=None):
    """One reference tile [i_n, i_n + BN) of the lse forward: the row state (see below),
    updated. DIAG: the tile may meet the diagonal (masked).

    Main pass: FIRST sets the row's anchor b_m to the tile's max logit; later tiles keep
    the shift (``_shift(b_m)``) fixed, with no per-pair max, and only move the anchor, by
    k ln 2 for a whole number k, when a tile's sum passes RESCALE, rescaling both sums by
    the move the shift really made (2^-k up to its rounding): the anchor stays within
    log2(BN) + 1 of the running max, in log2 units. k is at most MAX_MOVE, so that the
    rescale factor is a normal number (ex2.approx.ftz flushes 2^-127 and below to 0); a
    term that overflows before the anchor catches up makes the sum inf, and the row is
    flagged for the exact pass. POS_PASS: the exact pass, each sum with its own running
    max (``_online_lse``: b_m, b_l and b_mp, b_lp). ``b_qr``: the tile's dot
    (``_fwd_lse_dot``), when the caller has issued it already.
    """
    # tile-local int32 row offsets from tile base pointers: 32-bit address math per element
    o_n = tl.arange(0, BLOCK_N)
    m_n = o_n < hi - i_n
    if b_qr is None:
        b_qr = _fwd_lse_dot(b_q, q, r, o_m, m_m, hi, D, s_qn, s_qd, s_rm, s_rd, RESIDENT, ACC,
                            PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, i_n)
    # [BN] column terms and labels (padded: no mask)
    if PACKED:
        # one int64 per reference: the fp32 column term's bits high, the label rank low
        b_w = tl.load(r_pack + i_n + o_n)
        b_b = b_w.to(tl.int32)
        b_col = (b_w >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    else:
        b_b = tl.load(r_labels + i_n + o_n)
        b_col = _col_term(r_col + i_n, o_n, m_n, False, ACC)
    # [BM, BN] logits, natural units (one explicit FFMA: the backward recomputes the same)
    b_s = tl.fma(b_qr, b_c, b_col[None, :])
    if DIAG:
        if POS_PASS:
            # rows o_m in the launcher's order: the pairs j = o_m + offset, anywhere
            m_self = (i_n + o_n)[None, :] == o_m[:, None] + offset
        else:
            m_self = _diagonal(i_m0, i_n, offset, BLOCK_M, BLOCK_N)
        b_s = tl.where(m_self, float("-inf"), b_s)
    m_pos = b_a[:, None] == b_b[None, :]
    if POS_PASS:
        b_m, b_l, _, _ = _online_lse(b_m, b_l, b_s)
        b_mp, b_lp, _, _ = _online_lse(b_mp, b_lp, tl.where(m_pos, b_s, float("-inf")))
    elif FIRST:
        # a row whose first tile is all masked gets anchor -inf: its sums turn inf / NaN,
        # and it is flagged
        b_m = tl.max(b_s, 1)
        # [BM, BN] the one exponential of each pair
        b_p = _exp(b_s, _shift(b_m)[:, None])
        b_l = tl.sum(b_p, 1)
        b_lp = tl.sum(tl.where(m_pos, b_p, 0.0), 1)
    else:
        b_sh = _shift(b_m)
        b_p = _exp(b_s, b_sh[:, None])
        b_t = tl.sum(b_p, 1)
        b_tp = tl.sum(tl.where(m_pos, b_p, 0.0), 1)
        b_m, b_sc = _lazy_move(b_m, b_sh, b_t, ACC)
        b_l = (b_l + b_t) * b_sc
        b_lp = (b_lp + b_tp) * b_sc
    return b_m, b_l, b_mp, b_lp


@triton.jit
def _fwd_pos_tile(b_mp, b_lp, b_q, b_a, q, r, r_labels, r_col, r_order, o_m, m_m, hi_p, D, offset,
                  s_qn, s_qd, s_rm, s_rd, b_c, HAS_OFFSET: tl.constexpr, RESIDENT: tl.constexpr,
                  ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, i_n):
    """A tile of the exact pass's positives-only blocks: the references at label-order
    positions [i_n, i_n + BN) below hi_p (``r_order``: their indices), gathered, into the
    positives' own online log-sum-exp (b_mp, b_lp)."""
    b_j, m_s = _gather_index(r_order, i_n, hi_p, BLOCK_N)
    b_qr, _, b_col, m_pos = _gathered_pairs(
        b_x=b_q, x=q, y=r, y_labels=r_labels, y_col=r_col, o_x=o_m, m_x=m_m, b_xl=b_a, b_j=b_j,
        m_j=m_s, D=D, offset=offset, s_xn=s_qn, s_xd=s_qd, s_yn=s_rm, s_yd=s_rd,
        HAS_OFFSET=HAS_OFFSET, Y_QUERIES=False, RESIDENT=RESIDENT, ACC=ACC, PRECISION=PRECISION,
        BLOCK_X=BLOCK_M, BLOCK_Y=BLOCK_N, BLOCK_D=BLOCK_D)
    b_s = tl.fma(b_qr, b_c, b_col[None, :])
    b_mp, b_lp, _, _ = _online_lse(b_mp, b_lp, tl.where(m_pos, b_s, float("-inf")))
    return b_mp, b_lp


@triton.jit
def _fwd_class_tile(b_m, b_l, b_y, b_q, b_self, q, r, r_labels, r_col, o_m, m_m, hi, i_c, D,
                    s_qn, s_qd, s_rm, s_rd, b_c, HAS_OFFSET: tl.constexpr, RESIDENT: tl.constexpr,
                    ACC: tl.constexpr, PRECISION: tl.constexpr, MASS_PRECISION: tl.constexpr,
                    MMA_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, i_n, FIRST: tl.constexpr,
                    EXACT: tl.constexpr):
    """One reference tile [i_n, i_n + BN) of the class forward: the row state (anchor b_m,
    sum b_l) and the class mass b_y [BM, BC], updated.

    Main pass: as the lse forward's (``_fwd_lse_tile``), FIRST sets the anchor to the
    tile's max logit and later tiles keep its shift, with no per-pair max, moving it by
    whole powers of two when a tile's sum passes RESCALE; a term that overflows past a
    lagging anchor makes the sum inf, and the launcher redoes the row with EXACT (each
    tile's max, ``_online_lse``). MMA_P: the logit dot is an MMA (see the kernel).
    """
    # r, r_col and r_labels arrive in label order: tile-local offsets, no gather
    o_n = tl.arange(0, BLOCK_N)
    # the references left in this class tile
    n_left = hi - i_n
    if MMA_P:
        n_left = n_left.to(tl.int32)
    m_n = o_n < n_left
    b_qr, _ = _rows_dot(b_x=b_q, x=q, y=r + i_n * s_rm, o_x=o_m, m_x=m_m, o_y=o_n, m_y=m_n,
                        D=D, s_xn=s_qn, s_xd=s_qd, s_yn=s_rm, s_yd=s_rd, RESIDENT=RESIDENT,
                        ACC=ACC, PRECISION=PRECISION, BLOCK_X=BLOCK_M, BLOCK_Y=BLOCK_N,
                        BLOCK_D=BLOCK_D)
    # r_col and r_labels are padded a tile past M: unmasked loads, the columns past the
    # class tile at -inf after (a masked load costs triton 3.6 a predicate and an address
    # per element: compiled SASS, bf16 128 x 64, 2 stages, 3397 -> 2572 cycles a tile)
    b_col = tl.where(m_n, _col_term(r_col + i_n, o_n, m_n, False, ACC), float("-inf"))
    b_s = tl.fma(b_qr, b_c, b_col[None, :])
    if HAS_OFFSET:
        # each row's self pair as a column of this tile (int32, |.| < M): one 32-bit
        # compare per pair, and per-row work only (the diagonal can be anywhere in label
        # order)
        b_sc = (b_self - i_n).to(tl.int32)
        b_s = tl.where(b_sc[:, None] == o_n[None, :], float("-inf"), b_s)
    if EXACT:
        b_m, b_l, b_p, b_alpha = _online_lse(b_m, b_l, b_s)
        b_y = b_y * b_alpha[:, None]
    elif FIRST:
        # a row whose first tile is all masked gets anchor -inf: flagged for the exact
        # pass where the class tile has more references (the kernel's epilogue)
        b_m = tl.max(b_s, 1)
        b_p = _exp(b_s, _shift(b_m)[:, None])
        b_l = tl.sum(b_p, 1)
    else:
        b_sh = _shift(b_m)
        b_p = _exp(b_s, b_sh[:, None])
        b_t = tl.sum(b_p, 1)
        b_m, b_scale = _lazy_move(b_m, b_sh, b_t, ACC)
        b_l = (b_l + b_t) * b_scale
    o_k = o_n
    if MASS_PRECISION == "tf32x2" and MMA_P:
        # the mass dot takes p as its register operand: in TF32 a thread holds the
        # columns {t, t + 4} of each 8-wide k block, where the logit dot's accumulator
        # gave it {2t, 2t + 1}. Permuting p's columns so (and the one-hot's rows alike:
        # the same products) makes that a relabelling instead of a shuffle per element
        # (compiled SASS, triton 3.9, bf16 128 x 64: 64 SHFL.IDX and 94 SEL per thread
        # and tile gone)
        o_k = (o_n // 8) * 8 + (o_n % 4) * 2 + (o_n % 8) // 4
        b_p = tl.reshape(tl.permute(tl.reshape(b_p, [BLOCK_M, BLOCK_N // 8, 4, 2]),
                                    (0, 1, 3, 2)), [BLOCK_M, BLOCK_N])
    # [BN] sorted labels (-1: in no class), in the order of p's columns; those past the
    # class tile are another tile's (or padding's), and their p is 0
    b_b = tl.load(r_labels + i_n + o_k)
    # [BN, BC] one-hot; mass_ic = sum_{b_j=c} of the pair's _exp, rescaled like b_l
    if MMA_P:
        b_hot = ((b_b - (i_c * BLOCK_C).to(tl.int32))[:, None]
                 == tl.arange(0, BLOCK_C)[None, :]).to(ACC)
    else:
        b_hot = (b_b[:, None] == (i_c * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]).to(ACC)
    if MASS_PRECISION == "tf32x2":
        # p = hi + lo, hi truncated to TF32's 10 mantissa bits and lo the exact rest: the
        # one-hot is exact in TF32, so two TF32 dots carry p to 2^-21 relative, as 3xTF32
        # would (its third product, lo x lo of the one-hot, is 0)
        b_hi = (b_p.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
        b_y = tl.dot(b_hi, b_hot, b_y, input_precision="tf32", out_dtype=ACC)
        b_y = tl.dot(b_p - b_hi, b_hot, b_y, input_precision="tf32", out_dtype=ACC)
    else:
        b_y = tl.dot(b_p, b_hot, b_y, input_precision=MASS_PRECISION, out_dtype=ACC)
    if not (EXACT or FIRST):
        b_y = b_y * b_scale[:, None]
    return b_m, b_l, b_y


@triton.jit(do_not_specialize=FWD_NO_SPECIALIZE)
def neighbor_fwd_kernel(q, r, q_labels, r_labels, scale, r_col, r_pack, perm, self_pos, tile_ptr,
                        r_order, lse_all, lse_pos, has_pos, redo, mass, tile_max, tile_sum,
                        row_state, N, M, D, offset, s_qn, s_qd, s_rm, s_rd,
                        N_KEY, M_KEY, D_KEY,
                        SQEUCLID: tl.constexpr, HAS_OFFSET: tl.constexpr,
                        CLASS: tl.constexpr, POS_PASS: tl.constexpr, PACKED: tl.constexpr,
                        RESIDENT: tl.constexpr,
                        ACC: tl.constexpr, PRECISION: tl.constexpr, MASS_PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_C: tl.constexpr, AHEAD: tl.constexpr = False):
    """Online log-sum-exps (CLASS=False) or per-class-tile mass (CLASS=True).

    Logit tile, natural units: ``s = fma(q.r, c, colterm)`` with the launcher's scale
    c = (2 or 1)/T and the column term of ``_col_term`` (the row constant -||q||^2/T is
    left out: shifted lse); every exponential is ``_exp``, one FFMA and one exp2.

    CLASS=False writes lse_all, lse_pos (N,) with one exp2 per pair: the positives' sum
    uses the same exponentials under the shared row shift (``_fwd_lse_tile``: set by the
    first tile, moved only by powers of two). That sum is exact unless positives
    underflow against the shift (extreme T: they sit far below the nearest negative).
    ``has_pos`` (N,) int8 is the launcher's has-a-positive mask; ``redo`` (N,) int8 comes
    out as the rows for the exact passes (every input is read-only, so a launch can be
    repeated, as the autotuner does): 1 for those whose total is not a normal number (no
    term, an overflow past a lagging shift, NaN), 2 for those with a positive whose sum
    ends below POS_FLOOR. A launch with POS_PASS=True, the exact pass, takes the rows in
    the order of ``perm`` (the launcher's: those flagged 1 first, then those flagged 2
    grouped by label, then the others) and recomputes, each sum with its own running max,
    both sums of every flagged row of a block that holds a row flagged 1, over every
    reference, and lse_pos alone of the rows of the other blocks, over the references of
    their labels only (``r_order`` (M,): the references in label order; ``tile_ptr``: the
    label-order range [tile_ptr[a], tile_ptr[a + 1]) of each label rank; the block's
    labels span one range). Programs without a flagged row skip both loops.
    Terms lost to underflow are each below 2^-126 of the shift (fp32), so a sum >=
    POS_FLOOR = 2^-64 is exact to 2^-31 relative for M < 2^31; fp64: 2^-1022 and 2^-960.

    CLASS=True reads the references in label order (the launcher sorts r, r_col and
    r_labels; ``self_pos`` (N,) int32: the position in that order of each query's
    excluded reference, -1 for none, for the self-pair mask; tile_ptr: the
    references of class tile c are rows tile_ptr[c]:tile_ptr[c+1]) and writes mass
    (N, n_tiles * BLOCK_C), every column (those >= C are cut off by the launcher),
    relative to tile_max, plus tile_max (a logit: the anchor) and tile_sum (N, n_tiles),
    both sums relative to exp(tile_max). Where the logit dot is an MMA its main pass keeps
    the lazy shift of the lse forward (``_fwd_class_tile``) and writes ``redo`` (N,
    n_tiles) int8 for the rows to redo; a second launch with POS_PASS=True takes the rows
    in the order of ``perm`` with ``redo`` (N,) flagging them, and recomputes every class
    tile of the flagged ones with each tile's max. With FMA logit dots the main pass
    takes each tile's max itself and flags no row.

    ``row_state`` (3, N) or None: the main pass also writes each row's anchor and its two
    sums there (for diagnostics; None compiles it out). AHEAD: the lse main loop issues
    each tile's dot one tile ahead (the "sm90_fwd_ahead" variant; 16-bit, D <= 128).
    """
    i_m = tl.program_id(0).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < N
    if POS_PASS:
        # the exact pass takes its rows in the launcher's order (``perm``: the flagged
        # rows first), so that only the first few programs find one
        o_m = tl.load(perm + o_m, mask=m_m, other=0).to(tl.int64)
        # [BM] its rows' flags (``redo``, (N,)): a block without one skips every tile
        b_redo = tl.load(redo + o_m, mask=m_m, other=0)
    b_c = tl.load(scale).to(ACC)
    b_q = tl.zeros([BLOCK_M, BLOCK_D], dtype=q.dtype.element_ty)
    if RESIDENT:
        m_q = m_m
        if POS_PASS and CLASS:
            # only the flagged rows: the class exact pass's many programs without one
            # should not read their queries
            m_q = m_m & (b_redo != 0)
        b_q = _load_rows(q, o_m, m_q, D, s_qn, s_qd, BLOCK_D)
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    b_l = tl.zeros([BLOCK_M], dtype=ACC)
    if CLASS:
        i_c = tl.program_id(1).to(tl.int64)
        o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
        lo = tl.load(tile_ptr + i_c)
        hi = tl.load(tile_ptr + i_c + 1)
        b_y = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
        b_self = tl.zeros([BLOCK_M], dtype=tl.int64)
        if HAS_OFFSET:
            # [BM] the position in label order of each row's excluded reference (-1: none)
            b_self = tl.load(self_pos + o_m, mask=m_m, other=-1).to(tl.int64)
        if POS_PASS:
            hi = tl.where(tl.max(b_redo, 0) > 0, hi, lo)
    else:
        lo = 0
        hi = M
        # [BM]
        b_a = tl.load(q_labels + o_m, mask=m_m, other=0)
        b_lp = tl.zeros([BLOCK_M], dtype=ACC)
        b_mp = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
        if POS_PASS:
            # a block with a row flagged 1 redoes both sums of its flagged rows over every
            # reference; one whose rows are flagged 2 (grouped by label by the launcher)
            # their positives' sums only, over their labels' references: a range of label
            # order (``tile_ptr`` by label rank; ``r_order``: the references in it)
            n_full = tl.max((b_redo == 1).to(tl.int32), 0)
            # [BM] (the interpreter takes no scalar in a mask)
            m_full = (tl.zeros([BLOCK_M], dtype=tl.int32) + n_full) > 0
            hi = tl.where(n_full > 0, M, 0)
            m_f = m_m & (b_redo == 2) & ~m_full
            lo_p = tl.min(tl.load(tile_ptr + b_a, mask=m_f, other=M), 0)
            hi_p = tl.max(tl.load(tile_ptr + b_a + 1, mask=m_f, other=0), 0)
    if CLASS:
        # the logit dot is an MMA (16-bit inputs, or fp32 with TF32 dots): p comes in a
        # tensor-core accumulator's layout. There the masks and the one-hot compare in
        # int32 and p's columns are permuted (``_fwd_class_tile``); with FMA logit dots
        # (fp32 IEEE, fp64) the same changes make ptxas spill (compiled SASS, triton 3.9)
        MMA_P: tl.constexpr = (q.dtype.element_ty != tl.float32 or PRECISION != "ieee") and \
            q.dtype.element_ty != tl.float64
        if POS_PASS or not MMA_P:
            # the exact pass: each tile's max (the rows flagged by the main pass only);
            # with FMA logit dots the main pass is exact too (the lazy shift made ptxas
            # spill there, compiled SASS, triton 3.9), and flags no row
            for i_n in range(lo, hi, BLOCK_N):
                b_m, b_l, b_y = _fwd_class_tile(
                    b_m, b_l, b_y, b_q, b_self, q, r, r_labels, r_col, o_m, m_m, hi, i_c, D,
                    s_qn, s_qd, s_rm, s_rd, b_c, HAS_OFFSET, RESIDENT, ACC, PRECISION,
                    MASS_PRECISION, MMA_P, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_C, i_n=i_n,
                    FIRST=False, EXACT=True)
        else:
            # the first tile sets the anchor, then the loop has no per-pair max
            if lo < hi:
                b_m, b_l, b_y = _fwd_class_tile(
                    b_m, b_l, b_y, b_q, b_self, q, r, r_labels, r_col, o_m, m_m, hi, i_c, D,
                    s_qn, s_qd, s_rm, s_rd, b_c, HAS_OFFSET, RESIDENT, ACC, PRECISION,
                    MASS_PRECISION, MMA_P, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_C, i_n=lo,
                    FIRST=True, EXACT=False)
            for i_n in range(lo + BLOCK_N, hi, BLOCK_N):
                b_m, b_l, b_y = _fwd_class_tile(
                    b_m, b_l, b_y, b_q, b_self, q, r, r_labels, r_col, o_m, m_m, hi, i_c, D,
                    s_qn, s_qd, s_rm, s_rd, b_c, HAS_OFFSET, RESIDENT, ACC, PRECISION,
                    MASS_PRECISION, MMA_P, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_C, i_n=i_n,
                    FIRST=False, EXACT=False)
    elif POS_PASS:
        # rows in any order: every tile with the general self-pair mask
        for i_n in range(0, hi, BLOCK_N):
            b_m, b_l, b_mp, b_lp = _fwd_lse_tile(
                b_m, b_l, b_mp, b_lp, b_q, b_a, q, r, r_labels, r_col, r_pack, o_m, m_m, hi, D,
                offset, s_qn, s_qd, s_rm, s_rd, b_c, PACKED, RESIDENT, ACC, PRECISION, BLOCK_M,
                BLOCK_N, BLOCK_D, i_n=i_n, i_m0=i_m * BLOCK_M, DIAG=HAS_OFFSET, FIRST=False,
                POS_PASS=True, b_qr=None)
        for i_n in range(lo_p, hi_p, BLOCK_N):
            b_mp, b_lp = _fwd_pos_tile(
                b_mp, b_lp, b_q, b_a, q, r, r_labels, r_col, r_order, o_m, m_m, hi_p, D, offset,
                s_qn, s_qd, s_rm, s_rd, b_c, HAS_OFFSET, RESIDENT, ACC, PRECISION, BLOCK_M,
                BLOCK_N, BLOCK_D, i_n=i_n)
    else:
        # the first tile (the first one that meets the diagonal, else tile 0) sets the row
        # shift; the other diagonal tiles follow, unrolled (straight-line code), then the
        # main loop over the rest, which has no mask and no per-pair max at all
        n_t = tl.cdiv(hi, BLOCK_N)
        t_lo, t_hi = _diagonal_tiles(i_m * BLOCK_M, offset, hi, HAS_OFFSET, BLOCK_M, BLOCK_N)
        n_diag = t_hi - t_lo
        # the tiles [e_lo, e_lo + e_n) are peeled off the main loop
        e_lo = tl.where(n_diag > 0, t_lo, 0)
        e_n = tl.where(n_diag > 0, n_diag, tl.minimum(n_t, 1))
        if n_t > 0:
            b_m, b_l, b_mp, b_lp = _fwd_lse_tile(
                b_m, b_l, b_mp, b_lp, b_q, b_a, q, r, r_labels, r_col, r_pack, o_m, m_m, hi, D,
                offset, s_qn, s_qd, s_rm, s_rd, b_c, PACKED, RESIDENT, ACC, PRECISION, BLOCK_M,
                BLOCK_N, BLOCK_D, i_n=e_lo * BLOCK_N, i_m0=i_m * BLOCK_M, DIAG=HAS_OFFSET,
                FIRST=True, POS_PASS=POS_PASS, b_qr=None)
        for k in tl.static_range(1, _peeled(HAS_OFFSET, BLOCK_M, BLOCK_N)):
            if k < n_diag:
                b_m, b_l, b_mp, b_lp = _fwd_lse_tile(
                    b_m, b_l, b_mp, b_lp, b_q, b_a, q, r, r_labels, r_col, r_pack, o_m, m_m, hi, D,
                    offset, s_qn, s_qd, s_rm, s_rd, b_c, PACKED, RESIDENT, ACC, PRECISION, BLOCK_M,
                    BLOCK_N, BLOCK_D, i_n=(t_lo + k) * BLOCK_N, i_m0=i_m * BLOCK_M, DIAG=True,
                    FIRST=False, POS_PASS=POS_PASS, b_qr=None)
        # AHEAD (the "sm90_fwd_ahead" variant, ``kernels.VARIANTS``), 16-bit inputs with
        # D <= 128 resident: each tile's dot issued before the softmax of the tile before
        # it (the last tile's softmax after the loop), the same arithmetic in another
        # order, so that the compiler may run the wgmma under the exps. With the carried
        # second logit tile, D = 256 spills (48 B, triton 3.6), as fp32 inputs do (TF32)
        AHEAD_ON: tl.constexpr = AHEAD and RESIDENT and BLOCK_D <= 128 and (
            q.dtype.element_ty == tl.float16 or q.dtype.element_ty == tl.bfloat16)
        if AHEAD_ON:
            n_main = n_t - e_n
            if n_main > 0:
                i_n = _main_tile(0, e_lo, e_n, BLOCK_N)
                b_qr = _fwd_lse_dot(b_q, q, r, o_m, m_m, hi, D, s_qn, s_qd, s_rm, s_rd,
                                    RESIDENT, ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, i_n)
                for t in range(1, n_main):
                    i_cur = i_n
                    b_cur = b_qr
                    i_n = _main_tile(t, e_lo, e_n, BLOCK_N)
                    b_qr = _fwd_lse_dot(b_q, q, r, o_m, m_m, hi, D, s_qn, s_qd, s_rm, s_rd,
                                        RESIDENT, ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D,
                                        i_n)
                    b_m, b_l, b_mp, b_lp = _fwd_lse_tile(
                        b_m, b_l, b_mp, b_lp, b_q, b_a, q, r, r_labels, r_col, r_pack, o_m, m_m,
                        hi, D, offset, s_qn, s_qd, s_rm, s_rd, b_c, PACKED, RESIDENT, ACC,
                        PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, i_n=i_cur, i_m0=i_m * BLOCK_M,
                        DIAG=False, FIRST=False, POS_PASS=POS_PASS, b_qr=b_cur)
                b_m, b_l, b_mp, b_lp = _fwd_lse_tile(
                    b_m, b_l, b_mp, b_lp, b_q, b_a, q, r, r_labels, r_col, r_pack, o_m, m_m, hi,
                    D, offset, s_qn, s_qd, s_rm, s_rd, b_c, PACKED, RESIDENT, ACC, PRECISION,
                    BLOCK_M, BLOCK_N, BLOCK_D, i_n=i_n, i_m0=i_m * BLOCK_M, DIAG=False,
                    FIRST=False, POS_PASS=POS_PASS, b_qr=b_qr)
        else:
            for t in range(0, n_t - e_n):
                i_n = _main_tile(t, e_lo, e_n, BLOCK_N)
                b_m, b_l, b_mp, b_lp = _fwd_lse_tile(
                    b_m, b_l, b_mp, b_lp, b_q, b_a, q, r, r_labels, r_col, r_pack, o_m, m_m, hi,
                    D, offset, s_qn, s_qd, s_rm, s_rd, b_c, PACKED, RESIDENT, ACC, PRECISION,
                    BLOCK_M, BLOCK_N, BLOCK_D, i_n=i_n, i_m0=i_m * BLOCK_M, DIAG=False,
                    FIRST=False, POS_PASS=POS_PASS, b_qr=None)
    if CLASS:
        n_tiles = tl.num_programs(1)
        # the sums were taken under fl(b_m L): relative to exp(b_m), each times 2^-d
        b_ms = tl.where(b_m == float("-inf"), 0.0, b_m)
        b_sc = tl.math.exp2(-_residue(b_ms))
        m_out = m_m
        if POS_PASS:
            m_out = m_m & (b_redo != 0)
        elif not MMA_P:
            tl.store(redo + o_m * n_tiles + i_c, tl.zeros([BLOCK_M], dtype=tl.int8), mask=m_m)
        else:
            # the exact pass's rows (per class tile; the launcher ORs them): a sum that is
            # not finite (inf: a term overflowed past a lagging anchor; NaN inputs stay
            # NaN there), or no anchor (a first tile all masked: its references at
            # infinity, or the row's own) where the class tile has more references: the
            # later tiles' terms were taken under no shift, and may have underflowed to 0
            # ([BM]: the interpreter takes no scalar operand of a tensor's &)
            b_more = (tl.zeros([BLOCK_M], dtype=tl.int64) + (hi - lo)) > 1
            b_bad = ~(b_l < float("inf")) | ((b_m == float("-inf")) & b_more)
            tl.store(redo + o_m * n_tiles + i_c, b_bad.to(tl.int8), mask=m_m)
        tl.store(mass + o_m[:, None] * (n_tiles * BLOCK_C) + o_c[None, :], b_y * b_sc[:, None],
                 mask=m_out[:, None])
        tl.store(tile_max + o_m * n_tiles + i_c, b_m, mask=m_out)
        tl.store(tile_sum + o_m * n_tiles + i_c, b_l * b_sc, mask=m_out)
    elif POS_PASS:
        # no term: max -inf and sum 0 give -inf
        m_out = m_m & (b_redo != 0)
        tl.store(lse_all + o_m, _lse(b_m, b_l), mask=m_out & m_full)
        tl.store(lse_pos + o_m, _lse(b_mp, b_lp), mask=m_out)
    else:
        tl.store(lse_all + o_m, _lse(b_m, b_l), mask=m_m)
        tl.store(lse_pos + o_m, _lse(b_m, b_lp), mask=m_m)
        # the exact passes' rows: 1, both sums again (a sum that is not a normal number:
        # 0, no term; inf, the shift lagged; NaN, +inf logits or NaN inputs, which stay
        # NaN there; an anchor that is not finite: -inf, a first tile all masked); 2,
        # the positives' sum only (they underflowed against the shift, in a row that has
        # a positive, ``has_pos``; a row without one has b_lp = 0 exactly, and lse_pos =
        # -inf is already exact), redone over its label's references only
        if row_state is not None:
            # diagnostics only (bench/gpu_diagnose.py): the main pass's anchor and sums
            tl.store(row_state + o_m, b_m, mask=m_m)
            tl.store(row_state + N + o_m, b_l, mask=m_m)
            tl.store(row_state + 2 * N + o_m, b_lp, mask=m_m)
        b_has = tl.load(has_pos + o_m, mask=m_m, other=0) != 0
        FLOOR: tl.constexpr = POS_FLOOR_F64 if ACC == tl.float64 else POS_FLOOR_F32
        b_all = ~(b_l >= FLOOR) | (b_l == float("inf")) | (b_m == float("inf")) | \
            (b_m == float("-inf"))
        b_redo = tl.where(b_all, 1, tl.where((b_lp < FLOOR) & b_has, 2, 0))
        tl.store(redo + o_m, b_redo.to(tl.int8), mask=m_m)
