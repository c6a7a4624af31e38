"""The backward kernel, ``neighbor_bwd_kernel`` (see ``kernels``)."""
import triton
import triton.language as tl

from .common import (
    BWD_NO_SPECIALIZE, _col_term, _diagonal, _diagonal_tiles, _exp, _gather_index,
    _gathered_pairs, _load_rows, _peeled, _rows_dot)


@triton.jit
def _ds_dir(b_u, b_pos, b_shift, b_wneg, b_wpos, FIXUP: tl.constexpr):
    """ds of one direction: _exp(u, shift) * (w_pos where positive, else w_neg).

    FIXUP (positives only, shifted by lse_pos): the negatives' exp2 may overflow, so
    they are selected out after the product rather than weighted by 0.
    """
    if FIXUP:
        return tl.where(b_pos, _exp(b_u, b_shift) * b_wpos, 0.0)
    else:
        return _exp(b_u, b_shift) * tl.where(b_pos, b_wpos, b_wneg)


@triton.jit
def _dt_add(b_dt, b_ds, b_u, b_xn, b_yn, REF_MAJOR: tl.constexpr):
    """dt_part's row sums of ds * logit, the true logit being u + the query's own norm
    term; ds = 0 wherever the logit is -inf (masked, or underflow): 0 * -inf kept out."""
    if REF_MAJOR:
        b_z = b_u + b_yn[None, :]
    else:
        b_z = b_u + b_xn[:, None]
    return b_dt + tl.sum(tl.where(b_ds != 0, b_ds * b_z, 0), 1)


@triton.jit
def _dx_dot(b_acc, b_sum, b_ds, b_yt, SQEUCLID: tl.constexpr, ACC: tl.constexpr,
            PRECISION: tl.constexpr):
    """The tile's share of dx: ds (rounded to the inputs' dtype for the tensor-core dot,
    16-bit inputs) times the other rows, and its row sums (sqeuclidean)."""
    b_dsr = b_ds.to(b_yt.dtype)
    if SQEUCLID:
        b_sum += tl.sum(b_dsr.to(ACC), 1)
    return tl.dot(b_dsr, b_yt, b_acc, input_precision=PRECISION, out_dtype=ACC), b_sum


@triton.jit
def _bwd_tile(b_acc, b_sum, b_dt, i_o0, b_x, x, y, y_tt, s_ytt, s_x, s_xk, s_y, s_yk, y_labels, y_col,
              row_shift,
              w_neg, w_pos, g_cls, s_gn, s_gc, b_xn, b_xl, b_sh, b_wn, b_wp, o_own,
              m_own, o_dx, m_dx, n_other, D, offset, b_c, SQEUCLID: tl.constexpr,
              CLASS: tl.constexpr, REF_MAJOR: tl.constexpr, SYMMETRIC: tl.constexpr,
              NEED_DX: tl.constexpr, NEED_DT: tl.constexpr,
              RESIDENT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_OWN: tl.constexpr, BLOCK_OTHER: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_DX: tl.constexpr, OTHER_T: tl.constexpr, ONE_EXP: tl.constexpr, sym_w, s_sw,
              b_s1, b_a1, b_ap, b_an, i_t, DIAG: tl.constexpr):
    """One other-side tile [i_t, i_t + BOTHER) of ``neighbor_bwd_kernel``: the dx
    accumulator, the row sums of ds and the dT partial sums, updated. DIAG: the tile meets
    the diagonal, whose pairs get ds = 0. Own-side terms (b_x*, b_sh, b_w*; with
    ONE_EXP b_s1, b_a1, b_ap, b_an) come from the caller; the other side's are loaded here
    from the padded vectors."""
    # tile-local int32 row offsets from tile base pointers: 32-bit address math per element
    o_t = tl.arange(0, BLOCK_OTHER)
    m_t = o_t < n_other - i_t
    y_t = y + i_t * s_y
    b_xy, b_yt = _rows_dot(b_x, x, y=y_t, o_x=o_own, m_x=m_own, o_y=o_t, m_y=m_t, D=D, s_xn=s_x,
                           s_xd=s_xk, s_yn=s_y, s_yd=s_yk, RESIDENT=RESIDENT, ACC=ACC,
                           PRECISION=PRECISION, BLOCK_X=BLOCK_OWN, BLOCK_Y=BLOCK_OTHER,
                           BLOCK_D=BLOCK_D)
    # [BOTHER] the other rows' terms (padded vectors: no mask)
    b_yn = _col_term(y_col + i_t, o_t, m_t, False, ACC)
    if not CLASS:
        b_yl = tl.load(y_labels + i_t + o_t)
        m_pos = b_xl[:, None] == b_yl[None, :]
    elif not REF_MAJOR:
        b_yl = tl.load(y_labels + i_t + o_t)
    if REF_MAJOR:
        # [BOTHER] query rows' terms; u = own reference's logit, as the forward's FFMA
        b_u = tl.fma(b_xy, b_c, b_xn[:, None])
        b_sht = tl.load(row_shift + i_t + o_t).to(ACC)
        b_wnt = tl.load(w_neg + i_t + o_t).to(ACC)
        if CLASS:
            m_g = m_own & (b_xl >= 0)
            # [BOWN, BOTHER] G_{i, b_j} of query i (other) and reference j (own)
            b_g = tl.load(g_cls + (i_t + o_t)[None, :] * s_gn
                          + b_xl.to(tl.int64)[:, None] * s_gc,
                          mask=m_g[:, None] & m_t[None, :], other=0).to(ACC)
            b_ds = _exp(b_u, b_sht[None, :]) * (b_g - b_wnt[None, :])
        else:
            b_wpt = tl.load(w_pos + i_t + o_t).to(ACC)
            b_ds = _ds_dir(b_u, m_pos, b_sht[None, :], b_wnt[None, :], b_wpt[None, :], False)
    else:
        b_u = tl.fma(b_xy, b_c, b_yn[None, :])
        if CLASS:
            m_g = m_t & (b_yl >= 0)
            # [BOWN, BOTHER] G_{i, b_j}, gathered (labels in no class: 0)
            b_g = tl.load(g_cls + o_own[:, None] * s_gn + b_yl.to(tl.int64)[None, :] * s_gc,
                          mask=m_own[:, None] & m_g[None, :], other=0).to(ACC)
            b_ds = _exp(b_u, b_sh[:, None]) * (b_g - b_wn[:, None])
        elif ONE_EXP:
            # the symmetric kernel's one exp2 for both directions (see
            # neighbor_bwd_kernel): e under the launcher's own-row shift s_k, then
            # ds_kj = e A_k B_k and ds_jk = e A_k B_j (B: a row's weight as the query,
            # positive or negative, times 2^(R - its log2 normalizer)); b_tot their sum
            b_bnt = tl.load(sym_w + 2 * s_sw + i_t + o_t).to(ACC)
            b_bpt = tl.load(sym_w + 3 * s_sw + i_t + o_t).to(ACC)
            b_e = _exp(b_u, b_s1[:, None])
            b_wk = tl.where(m_pos, b_ap[:, None], b_an[:, None])
            b_ds = b_e * b_wk
            b_tot = b_e * tl.fma(b_a1[:, None],
                                 tl.where(m_pos, b_bpt[None, :], b_bnt[None, :]), b_wk)
        else:
            b_ds = _ds_dir(b_u, m_pos, b_sh[:, None], b_wn[:, None], b_wp[:, None], False)
        if SYMMETRIC and not ONE_EXP:
            # the same pairs with the other rows as queries: ds_jk, k the reference
            b_sht = tl.load(row_shift + i_t + o_t).to(ACC)
            b_wnt = tl.load(w_neg + i_t + o_t).to(ACC)
            b_wpt = tl.load(w_pos + i_t + o_t).to(ACC)
            b_dsj = _ds_dir(tl.fma(b_xy, b_c, b_xn[:, None]), m_pos, b_sht[None, :],
                            b_wnt[None, :], b_wpt[None, :], False)
    if DIAG:
        if REF_MAJOR:
            # own rows are the references: j = i + offset, i in the other tile
            m_d = tl.trans(_diagonal(i_t, i_o0, offset, BLOCK_OTHER, BLOCK_OWN))
        else:
            m_d = _diagonal(i_o0, i_t, offset, BLOCK_OWN, BLOCK_OTHER)
        b_ds = tl.where(m_d, 0.0, b_ds)
        if ONE_EXP:
            b_tot = tl.where(m_d, 0.0, b_tot)
        elif SYMMETRIC:
            b_dsj = tl.where(m_d, 0.0, b_dsj)
    if NEED_DT:
        b_dt = _dt_add(b_dt, b_ds, b_u, b_xn, b_yn, REF_MAJOR)
    if ONE_EXP:
        b_ds = b_tot
    elif SYMMETRIC:
        b_ds = b_ds + b_dsj
    if NEED_DX:
        if OTHER_T:
            # [BOTHER, BDX] from the launcher's transposed copy [D, n_other padded with
            # zeros to PAD]: the other rows contiguous (K-major for the TF32 dot), and
            # no mask along them, so that the load vectorises
            b_yt = tl.trans(tl.load(y_tt + i_t + o_t[None, :] + o_dx[:, None] * s_ytt,
                                    mask=m_dx[:, None], other=0))
        elif not RESIDENT:
            # [BOTHER, BDX]
            b_yt = tl.load(y_t + o_t[:, None] * s_y + o_dx[None, :] * s_yk,
                           mask=m_t[:, None] & m_dx[None, :], other=0)
        b_acc, b_sum = _dx_dot(b_acc, b_sum, b_ds, b_yt, SQEUCLID, ACC, PRECISION)
    return b_acc, b_sum, b_dt


@triton.jit
def _bwd_fix_tile(b_acc, b_sum, b_dt, b_x, x, y, s_x, s_xk, s_y, s_yk, y_labels, y_col, row_shift,
                  w_neg, w_pos, flags, other_order, b_xn, b_xl, b_sh, b_wn, b_wp, b_fl, o_own,
                  m_own, o_dx, m_dx, hi_t, D, offset, b_c, HAS_OFFSET: tl.constexpr,
                  SQEUCLID: tl.constexpr, REF_MAJOR: tl.constexpr, SYMMETRIC: tl.constexpr,
                  NEED_DX: tl.constexpr, NEED_DT: tl.constexpr, RESIDENT: tl.constexpr,
                  ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_OWN: tl.constexpr,
                  BLOCK_OTHER: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DX: tl.constexpr, i_t):
    """One tile of the FIXUP launch: the other rows at label-order positions [i_t, i_t +
    BOTHER) below hi_t (``other_order``: their indices), gathered, and their pairs with the
    own rows that share a label (the positives' terms are the only ones a fix-up adds),
    the excluded pair masked by index. Skipped when neither side holds a flagged query."""
    b_j, m_t = _gather_index(other_order, i_t, hi_t, BLOCK_OTHER)
    if REF_MAJOR:
        run = tl.max(tl.load(flags + b_j, mask=m_t, other=0), 0) > 0
    elif SYMMETRIC:
        run = (tl.max(tl.load(flags + b_j, mask=m_t, other=0), 0) > 0) | (tl.max(b_fl, 0) > 0)
    else:
        run = tl.max(b_fl, 0) > 0
    if run:
        b_xy, b_yt, b_yn, m_pos = _gathered_pairs(
            b_x, x, y, y_labels, y_col, o_x=o_own, m_x=m_own, b_xl=b_xl, b_j=b_j, m_j=m_t, D=D,
            offset=offset, s_xn=s_x, s_xd=s_xk, s_yn=s_y, s_yd=s_yk, HAS_OFFSET=HAS_OFFSET,
            Y_QUERIES=REF_MAJOR, RESIDENT=RESIDENT, ACC=ACC, PRECISION=PRECISION,
            BLOCK_X=BLOCK_OWN, BLOCK_Y=BLOCK_OTHER, BLOCK_D=BLOCK_D)
        if REF_MAJOR:
            b_u = tl.fma(b_xy, b_c, b_xn[:, None])
            b_sht = tl.load(row_shift + b_j, mask=m_t, other=0).to(ACC)
            b_ds = _ds_dir(b_u, m_pos, b_sht[None, :], 0.0,
                           tl.load(w_pos + b_j, mask=m_t, other=0).to(ACC)[None, :], True)
        else:
            b_u = tl.fma(b_xy, b_c, b_yn[None, :])
            b_ds = _ds_dir(b_u, m_pos, b_sh[:, None], b_wn[:, None], b_wp[:, None], True)
        if NEED_DT:
            b_dt = _dt_add(b_dt, b_ds, b_u, b_xn, b_yn, REF_MAJOR)
        if SYMMETRIC:
            # the same pairs with the other rows as queries
            b_ds += _ds_dir(tl.fma(b_xy, b_c, b_xn[:, None]), m_pos,
                            tl.load(row_shift + b_j, mask=m_t, other=0).to(ACC)[None, :], 0.0,
                            tl.load(w_pos + b_j, mask=m_t, other=0).to(ACC)[None, :], True)
        if NEED_DX:
            if not RESIDENT:
                # [BOTHER, BDX]
                b_yt = tl.load(y + b_j[:, None] * s_y + o_dx[None, :] * s_yk,
                               mask=m_t[:, None] & m_dx[None, :], other=0)
            b_acc, b_sum = _dx_dot(b_acc, b_sum, b_ds, b_yt, SQEUCLID, ACC, PRECISION)
    return b_acc, b_sum, b_dt


@triton.jit(do_not_specialize=BWD_NO_SPECIALIZE)
def neighbor_bwd_kernel(q, r, q_t, r_t, q_labels, r_labels, scale, r_col, q_col, row_shift,
                        w_neg, w_pos, flags, g_cls, ds_scale, dx, dt_part, sym_w, one_exp,
                        own_perm, other_order, label_ptr, N, M, D, C, offset, s_qn, s_qd, s_rm,
                        s_rd, s_qt, s_rt, s_gn, s_gc, s_xn, s_xd, s_sw,
                        N_KEY, M_KEY, D_KEY,
                        SQEUCLID: tl.constexpr, HAS_OFFSET: tl.constexpr, CLASS: tl.constexpr,
                        REF_MAJOR: tl.constexpr, SYMMETRIC: tl.constexpr, FIXUP: tl.constexpr,
                        NEED_DX: tl.constexpr, NEED_DT: tl.constexpr, SCALE_DS: tl.constexpr,
                        RESIDENT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_OWN: tl.constexpr, BLOCK_OTHER: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_DX: tl.constexpr,
                        OTHER_T: tl.constexpr = False, ONE_EXP: tl.constexpr = False):
    """dq (REF_MAJOR=False), dr (REF_MAJOR=True) or, SYMMETRIC, the whole batch gradient.

    A program owns BLOCK_OWN rows of x (q, or r) and the feature slice BLOCK_DX of dx
    (all of it when RESIDENT), and streams the other side y in BLOCK_OTHER tiles. Each
    tile is computed once, in the program's orientation [own, other]: the logit
    ``u = fma(x.y, c, reference norm term)``, in natural units and by the same FFMA as the
    forward's, and per query row i the launcher passes a shift and two weights, so that

        ds_ij = _exp(u_ij, row_shift_i) * (w_pos_i if b_j = a_i else w_neg_i)

    is one FFMA, one exp2 and no per-pair branch. The shift is -fl(lse_i log2 e) and
    every weight carries 2^-d_i, d_i = lse_i log2 e - fl(lse_i log2 e) (exact), so that
    ``_exp(u, shift) 2^-d = exp(u - lse)`` holds to rounding whatever the size of the
    logits: a row dominated by one reference, whose lse the forward wrote as that very
    logit, gets p = 1 for it. Main pass: w_neg = g_all, w_pos = g_all + g_pos
    exp(lse_all - lse_pos), since p+_ij = p_ij exp(lse_all_i - lse_pos_i); the launcher
    forms it as (g_all + g_pos) + g_pos expm1(gap), without cancellation. That factor
    is exact while (lse_all - lse_pos) log2(e) <= 64 (fp32; 960 fp64): the positives
    that matter then sit above 2^-126 of the shared shift. Rows beyond (extreme T) are
    ``flags``; their main-pass w_pos is w_neg, and a FIXUP launch adds their positives'
    term with its own shift (that of lse_pos; w_neg = 0, w_pos = g_pos; -inf / 0
    elsewhere), accumulating into dx and dt_part. Positives share a label, so it takes
    its own rows in the launcher's order (``own_perm``: grouped by label; dq: the flagged
    queries first) and visits only the other rows of the block's labels, a range of label
    order (``label_ptr`` by label rank, ``other_order`` the rows there), gathered, skipping
    a tile where neither side holds a flagged query. dx is written in ACC and cast by the
    launcher, so the two passes round once.

    CLASS: ds_ij = p_ij (G_{i,b_j} - delta_i), with G gathered from g_cls and delta in
    w_neg (p from row_shift as above); one pass.

    SYMMETRIC (the batch loss, r is q, one label vector): one launch instead of a dq
    and a dr launch. The logits are symmetric, z_ij = z_ji, so the tile of own rows k
    against other rows j gives both ds_kj (k as the query) and ds_jk (j as the query)
    from one dot, and dx_k = 2/T sum_j (ds_kj + ds_jk)(x_j - x_k): half the dots of
    the two-kernel backward. Chosen over a shared recompute with an ordered
    (semaphore) accumulation of the other side because it needs neither a second pass
    over dq nor any inter-program waiting, and it is the common case. Its main pass is
    two launches, of which the launcher's device-side test (``one_exp``, from
    ``rows.one_exp_rows``) lets one work; the other's programs return without a write.
    ONE_EXP: one exp2 per pair for both directions. The two exponentials of a pair
    differ by a factor of rank one, 2^(g_k - g_j) with g a row's log2 normalizer, so
    with the launcher's own-row shift s_k = fl(n_k L - R) (``sym_w`` row 0), its
    residue factor A_k (row 1) and per-row weights B_i = 2^(R - g_i) w_i (rows 2 and 3,
    negative and positive), e = exp2(fma(u, L, s_k)) gives ds_kj = e A_k B_k and
    ds_jk = e A_k B_j: one exp2, two selects, one FFMA and one multiply per pair for
    their sum. It runs where the rows' normalizers spread little enough that e neither
    overflows nor flushes a term that matters (``ONE_EXP_LIMITS``); else the two-exp
    kernel, two exp2 per pair, each direction under its own row's shift.

    "dot": dx = c sum ds y, c = 1/T; "sqeuclidean": dx = c (sum ds y - x sum ds), c = 2/T
    (``scale``, the launcher's, as in the forward).
    OTHER_T (the "sm90_tf32_transposed" variant, ``kernels.VARIANTS``): the dx dot takes
    the other side's tile from ``q_t`` / ``r_t``, the launcher's [D, rows padded to PAD]
    copy of q / r (row stride ``s_qt`` / ``s_rt``, zeros in the padding), K-major for
    a TF32 warpgroup MMA; the same values as the generic load, so the same arithmetic.

    dt_part[own] = sum_other ds * logit (own as the query, or as the reference when
    REF_MAJOR), written by the slice-0 programs only. SCALE_DS: the weights carry the
    powers of two of ``ds_scale``: per own row (dq), or one (1,) for dr / SYMMETRIC.
    """
    tl.static_assert(not ONE_EXP or (SYMMETRIC and not FIXUP and not CLASS),
                     "ONE_EXP is the symmetric kernel's main pass")
    i_o = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1).to(tl.int64)
    o_own = i_o * BLOCK_OWN + tl.arange(0, BLOCK_OWN)
    if FIXUP:
        # the fix-up takes its own rows in the launcher's order (grouped by label)
        m_perm = o_own < (M if REF_MAJOR else N)
        o_own = tl.load(own_perm + o_own, mask=m_perm, other=0).to(tl.int64)
    o_dx = i_d * BLOCK_DX + tl.arange(0, BLOCK_DX)
    m_dx = o_dx < D
    b_c = tl.load(scale).to(ACC)
    if REF_MAJOR:
        n_own, n_other = M, N
        x, s_x, s_xk, x_labels, x_col = r, s_rm, s_rd, r_labels, r_col
        y, s_y, s_yk, y_labels, y_col = q, s_qn, s_qd, q_labels, q_col
        y_tt, s_ytt = q_t, s_qt
    else:
        n_own, n_other = N, M
        x, s_x, s_xk, x_labels, x_col = q, s_qn, s_qd, q_labels, q_col
        y, s_y, s_yk, y_labels, y_col = r, s_rm, s_rd, r_labels, r_col
        y_tt, s_ytt = r_t, s_rt
    m_own = o_own < n_own
    if FIXUP:
        m_own = m_perm
    b_x = tl.zeros([BLOCK_OWN, BLOCK_D], dtype=x.dtype.element_ty)
    if RESIDENT:
        b_x = _load_rows(x, o_own, m_own, D, s_x, s_xk, BLOCK_D)
    # [BOWN] per-row terms of the own rows
    b_xn = _col_term(x_col + o_own, 0, m_own, True, ACC)
    if REF_MAJOR or not CLASS:  # class dq needs only the references' labels
        b_xl = tl.load(x_labels + o_own, mask=m_own, other=-1)
    if not REF_MAJOR:
        b_sh = tl.load(row_shift + o_own, mask=m_own, other=0).to(ACC)
        b_wn = tl.load(w_neg + o_own, mask=m_own, other=0).to(ACC)
        if not CLASS:
            b_wp = tl.load(w_pos + o_own, mask=m_own, other=0).to(ACC)
    if not (REF_MAJOR or not CLASS):
        b_xl = tl.zeros([BLOCK_OWN], dtype=tl.int32)
    if REF_MAJOR:  # the query rows' terms are the other side's
        b_sh = tl.zeros([BLOCK_OWN], dtype=ACC)
        b_wn = b_sh
    if REF_MAJOR or CLASS:
        b_wp = tl.zeros([BLOCK_OWN], dtype=ACC)
    hi = n_other
    b_s1 = b_sh
    b_a1 = b_sh
    b_ap = b_sh
    b_an = b_sh
    if SYMMETRIC and not FIXUP:
        # of the two main launches (ONE_EXP and not), the one the launcher's test chose
        # runs; the other's programs do nothing and write nothing
        b_ok = tl.load(one_exp + tl.zeros([BLOCK_OWN], dtype=tl.int32))
        if ONE_EXP:
            m_own = m_own & (b_ok != 0)
        else:
            m_own = m_own & (b_ok == 0)
        hi = tl.where(tl.max(m_own.to(tl.int32), 0) > 0, n_other, 0)
        if ONE_EXP:
            b_s1 = tl.load(sym_w + o_own, mask=m_own, other=0).to(ACC)
            b_a1 = tl.load(sym_w + s_sw + o_own, mask=m_own, other=0).to(ACC)
            b_an = b_a1 * tl.load(sym_w + 2 * s_sw + o_own, mask=m_own, other=0).to(ACC)
            b_ap = b_a1 * tl.load(sym_w + 3 * s_sw + o_own, mask=m_own, other=0).to(ACC)
    b_fl = tl.zeros([BLOCK_OWN], dtype=tl.int8)
    if FIXUP:
        if not REF_MAJOR:
            # the own rows are queries (dr: references, none flagged)
            b_fl = tl.load(flags + o_own, mask=m_own, other=0)
    b_acc = tl.zeros([BLOCK_OWN, BLOCK_DX], dtype=ACC)
    b_sum = tl.zeros([BLOCK_OWN], dtype=ACC)
    b_dt = tl.zeros([BLOCK_OWN], dtype=ACC)
    if FIXUP:
        # only the positives' terms: the other rows of the own rows' labels, a range of
        # label order (``label_ptr`` by label rank, ``other_order`` the rows in it)
        lo_t = tl.min(tl.load(label_ptr + b_xl, mask=m_own, other=n_other), 0)
        hi_t = tl.max(tl.load(label_ptr + b_xl + 1, mask=m_own, other=0), 0)
        if not (REF_MAJOR or SYMMETRIC):
            hi_t = tl.where(tl.max(b_fl, 0) > 0, hi_t, lo_t)
        for i_t in range(lo_t, hi_t, BLOCK_OTHER):
            b_acc, b_sum, b_dt = _bwd_fix_tile(
                b_acc, b_sum, b_dt, b_x, x, y, s_x, s_xk, s_y, s_yk, y_labels, y_col, row_shift,
                w_neg, w_pos, flags, other_order, b_xn, b_xl, b_sh, b_wn, b_wp, b_fl, o_own,
                m_own, o_dx, m_dx, hi_t, D, offset, b_c, HAS_OFFSET, SQEUCLID, REF_MAJOR,
                SYMMETRIC, NEED_DX, NEED_DT, RESIDENT, ACC, PRECISION, BLOCK_OWN, BLOCK_OTHER,
                BLOCK_D, BLOCK_DX, i_t=i_t)
    else:
        # the other side's tiles that meet the diagonal first, unrolled (straight-line code),
        # then the main loop over the others, which has no mask at all. Own rows o, other
        # rows t: the excluded pairs are t = o + offset (own queries) or t = o - offset.
        i_o0 = i_o * BLOCK_OWN
        t_lo, t_hi = _diagonal_tiles(i_o0, -offset if REF_MAJOR else offset, hi, HAS_OFFSET,
                                     BLOCK_OWN, BLOCK_OTHER)
        for k in tl.static_range(_peeled(HAS_OFFSET, BLOCK_OWN, BLOCK_OTHER)):
            if t_lo + k < t_hi:
                b_acc, b_sum, b_dt = _bwd_tile(
                    b_acc, b_sum, b_dt, i_o0, b_x, x, y, y_tt, s_ytt, s_x, s_xk, s_y, s_yk,
                    y_labels, y_col, row_shift, w_neg, w_pos, g_cls, s_gn, s_gc, b_xn,
                    b_xl, b_sh, b_wn, b_wp, o_own, m_own, o_dx, m_dx, n_other, D, offset,
                    b_c, SQEUCLID, CLASS, REF_MAJOR, SYMMETRIC, NEED_DX, NEED_DT,
                    RESIDENT, ACC, PRECISION, BLOCK_OWN, BLOCK_OTHER, BLOCK_D, BLOCK_DX, OTHER_T,
                    ONE_EXP, sym_w, s_sw, b_s1, b_a1, b_ap, b_an, i_t=(t_lo + k) * BLOCK_OTHER,
                    DIAG=True)
        n_diag = t_hi - t_lo
        for t in range(0, tl.cdiv(hi, BLOCK_OTHER) - n_diag):
            i_t = (t + tl.where(t >= t_lo, n_diag, 0)) * BLOCK_OTHER
            b_acc, b_sum, b_dt = _bwd_tile(
                b_acc, b_sum, b_dt, i_o0, b_x, x, y, y_tt, s_ytt, s_x, s_xk, s_y, s_yk, y_labels,
                y_col, row_shift, w_neg, w_pos, g_cls, s_gn, s_gc, b_xn, b_xl, b_sh, b_wn,
                b_wp, o_own, m_own, o_dx, m_dx, n_other, D, offset, b_c, SQEUCLID, CLASS,
                REF_MAJOR, SYMMETRIC, NEED_DX, NEED_DT, RESIDENT, ACC, PRECISION,
                BLOCK_OWN, BLOCK_OTHER, BLOCK_D, BLOCK_DX, OTHER_T, ONE_EXP, sym_w, s_sw, b_s1,
                b_a1, b_ap, b_an, i_t=i_t, DIAG=False)
    if SCALE_DS:
        if REF_MAJOR or SYMMETRIC:
            b_sc = tl.zeros([BLOCK_OWN], dtype=ACC) + tl.load(ds_scale).to(ACC)
        else:
            b_sc = tl.load(ds_scale + o_own, mask=m_own, other=1).to(ACC)
        b_acc = b_acc / b_sc[:, None]
        b_sum = b_sum / b_sc
        b_dt = b_dt / b_sc
    if NEED_DX:
        if SQEUCLID:
            # [BOWN, BDX]
            b_xs = tl.load(x + o_own[:, None] * s_x + o_dx[None, :] * s_xk,
                           mask=m_own[:, None] & m_dx[None, :], other=0).to(ACC)
            b_acc = (b_acc - b_xs * b_sum[:, None]) * b_c
        else:
            b_acc = b_acc * b_c
        p_dx = dx + o_own[:, None] * s_xn + o_dx[None, :] * s_xd
        m_out = m_own[:, None] & m_dx[None, :]
        if FIXUP:
            b_acc += tl.load(p_dx, mask=m_out, other=0)
        tl.store(p_dx, b_acc.to(dx.dtype.element_ty), mask=m_out)
    if NEED_DT:  # compile-time flag, then a runtime test: kept as two ifs
        if i_d == 0:
            if FIXUP:
                b_dt += tl.load(dt_part + o_own, mask=m_own, other=0)
            tl.store(dt_part + o_own, b_dt, mask=m_own)
