"""The blocked fused algorithm in pure PyTorch: readable, on any device.

The same algorithm as the GPU kernels (see ``reference`` for the math):

* forward: stream (query block x reference block) tiles; per query keep only the
  running ``lse_all``, ``lse_pos`` (and, for the class distribution, the class mass
  relative to the running max), merged tile by tile (:class:`_OnlineLSE`);
* backward: recompute each tile's logits, turn them into ``ds`` with the final
  normalizers, and accumulate ``dQ``, ``dR`` and the row/column sums of ``ds``.

No N x M tensor is kept; working memory is a few tiles plus O((N + M) (D + C)).

One CPU-specific refinement: rows and references are first sorted by label. The
positives of a query then sit in a band of tiles around the diagonal, so the
positive log-sum-exp only touches tiles whose label ranges overlap, instead of
masking every tile. Results are scattered back to the caller's order.

This module holds the algorithm only (plain functions on tensors, with host reads of
label ranges); :mod:`nbkernels.backends.torch` wraps it in ``torch.library`` custom ops
and exposes the launchers. Tile sizes are the module globals ``BLOCK_M``, ``BLOCK_N``
and ``BLOCK_SYM``, read at each call (tests set them here).
"""
from __future__ import annotations

import math

import torch

from nbkernels._validation import acc_dtype as _acc_dtype
from nbkernels.backends.infinity import finite_or_zero

# Tile sizes. 256 x 1024 fp32 logits are 1 MiB, which stays in a core's L2 cache on
# current x86 servers while leaving the matrix products large enough to run at speed.
BLOCK_M = 256
BLOCK_N = 1024
# Symmetric (batch-loss) tiles are square: block I against block J, and J against I.
BLOCK_SYM = 512

_NEG_INF = float("-inf")


class _Problem:
    """Inputs sorted by label and cast to the accumulation dtype, plus tile bookkeeping."""

    def __init__(self, q, r, q_labels, r_labels, temperature, metric, offset,
                 block_m=None, block_n=None, r_far=None):
        acc = _acc_dtype(q.dtype)
        block_m, block_n = block_m or BLOCK_M, block_n or BLOCK_N
        self.n, self.m = q.shape[0], r.shape[0]
        self.metric = metric
        self.inv_t = 1.0 / temperature
        self.q_order = torch.argsort(q_labels, stable=True)
        self.ql = q_labels[self.q_order]
        self.q = q.to(acc)[self.q_order]
        if r is q and r_labels is q_labels:
            # the batch against itself: one sorted copy serves both sides
            self.r_order, self.rl, self.r = self.q_order, self.ql, self.q
        else:
            self.r_order = torch.argsort(r_labels, stable=True)
            self.rl = r_labels[self.r_order]
            self.r = r.to(acc)[self.r_order]
        scale = (2.0 if metric == "sqeuclidean" else 1.0) * self.inv_t
        if q.device.type == "cpu":
            # the products take the logit scale as their alpha (reading it costs no device
            # synchronisation here): no scaled [N, D] copy of the queries
            self.q_scaled, self.alpha = self.q, float(scale)
        else:
            self.q_scaled, self.alpha = self.q * scale, 1.0
        if metric == "sqeuclidean":
            # shifted logit (2 q.r - ||r||^2) / T; the row constant -||q||^2/T cancels
            self.r_sqnorm = self.r.pow(2).sum(1)
            self.bias = -self.r_sqnorm * self.inv_t
            if r_far is not None:  # references at infinity (zeroed rows): weight 0
                self.bias = self.bias.masked_fill(r_far[self.r_order], _NEG_INF)
        else:
            self.bias = torch.zeros(self.m, dtype=acc, device=q.device)
        # sorted position of each sorted query's excluded reference, -1 if none
        self.ex = None
        if offset is not None:
            r_pos = torch.empty_like(self.r_order)
            r_pos[self.r_order] = torch.arange(self.m, device=q.device)
            j = self.q_order + offset
            ok = (j >= 0) & (j < self.m)
            self.ex = torch.where(ok, r_pos[j.clamp(0, max(self.m - 1, 0))], -1)
        self.q_blocks = [(i, min(i + block_m, self.n)) for i in range(0, self.n, block_m)]
        self.r_blocks = [(j, min(j + block_n, self.m)) for j in range(0, self.m, block_n)]
        # label range of each block (one host read): positives only where ranges overlap
        qb = self.ql[[i for i, _ in self.q_blocks] + [e - 1 for _, e in self.q_blocks]].tolist()
        rb = self.rl[[j for j, _ in self.r_blocks] + [e - 1 for _, e in self.r_blocks]].tolist()
        nq, nr = len(self.q_blocks), len(self.r_blocks)
        self.q_range = list(zip(qb[:nq], qb[nq:]))
        self.r_range = list(zip(rb[:nr], rb[nr:]))

    def tiles(self):
        """Yield ((i0, i1), (j0, j1), has_positives)."""
        for bi, (i0, i1) in enumerate(self.q_blocks):
            for bj, (j0, j1) in enumerate(self.r_blocks):
                (qlo, qhi), (rlo, rhi) = self.q_range[bi], self.r_range[bj]
                yield (i0, i1), (j0, j1), (qlo <= rhi and rlo <= qhi)

    def pairs(self):
        """Symmetric problems: yield each unordered pair of blocks once, (I, J) with I <= J."""
        for (i0, i1), (j0, j1), has_pos in self.tiles():
            if j0 >= i0:
                yield (i0, i1), (j0, j1), has_pos

    def gram_pair(self, i0, i1, j0, j1):
        """Symmetric problems: the [BI, BJ] tiles of shifted logits for rows I (against
        J) and, transposed, for rows J (against I), from one matrix product."""
        g = torch.mm(self.q_scaled[i0:i1], self.r[j0:j1].T)
        if self.alpha != 1.0:
            g.mul_(self.alpha)
        return g + self.bias[j0:j1], g.add_(self.bias[i0:i1, None])

    def logits(self, i0, i1, j0, j1):
        # [BM, BN] shifted logits, excluded pair at -inf
        s = torch.addmm(self.bias[j0:j1], self.q_scaled[i0:i1], self.r[j0:j1].T,
                        alpha=self.alpha)
        if self.ex is not None:
            col = self.ex[i0:i1] - j0
            hit = (col >= 0) & (col < j1 - j0)
            col = col.clamp(0, j1 - j0 - 1)[:, None]
            s.scatter_(1, col, torch.where(hit[:, None], _NEG_INF, s.gather(1, col)))
        return s

    def pos_mask(self, i0, i1, j0, j1):
        return self.ql[i0:i1, None] == self.rl[None, j0:j1]

    def unsort_rows(self, x):
        out = torch.empty_like(x)
        out[self.q_order] = x
        return out

    def unsort_refs(self, x):
        out = torch.empty_like(x)
        out[self.r_order] = x
        return out

    def sort_rows(self, x):
        return x[self.q_order]


def _exp_(x, zero_tiny=True):
    """In-place exp of a tile whose entries are <= 0 (or NaN).

    x86 math and BLAS libraries take a slow path of ~50 ns per element on denormal
    numbers, 100x the normal cost, both in exp and in the matrix products that consume
    its results. Arguments are floored where exp is still normal (1e-38 in fp32), and
    with ``zero_tiny`` results below 1e-30 (fp32) become exactly 0, so that products with
    the upstream gradient stay normal too. A row's terms sum to >= 1 (the maximum's
    exp(0)), so either change is below the rounding of that sum for any M < 1e23.
    """
    fp64 = x.dtype == torch.float64
    x.clamp_(min=-708.0 if fp64 else -87.0).exp_()
    if zero_tiny:
        torch.nn.functional.threshold_(x, 1e-290 if fp64 else 1e-30, 0.0)
    return x


class _OnlineLSE:
    """Running (max, sum of exp(s - max)) per row: the mergeable partial state."""

    def __init__(self, n, dtype, device):
        self.m = torch.full((n,), _NEG_INF, dtype=dtype, device=device)
        self.l = torch.zeros(n, dtype=dtype, device=device)

    def update(self, i0, i1, s, dim=1):
        """Fold tile ``s`` into rows i0:i1, which index ``s`` along ``1 - dim`` (the sums
        run over ``dim``). ``s`` is overwritten by exp(s - max); returns the rescale
        factor of the old sums and that tile of exponentials."""
        m_old = self.m[i0:i1]
        m_new = torch.maximum(m_old, s.amax(dim))
        m_safe = finite_or_zero(m_new)
        alpha = torch.exp(m_old - m_safe)
        p = _exp_(s.sub_(m_safe.unsqueeze(dim)), zero_tiny=False)
        tile_sum = torch.where(m_new == _NEG_INF, torch.zeros_like(m_safe), p.sum(dim))
        self.l[i0:i1] = self.l[i0:i1] * alpha + tile_sum
        self.m[i0:i1] = m_new
        return alpha, p

    def lse(self):
        return self.m + torch.log(self.l)


def blocked_lse_forward(q, r, q_labels, r_labels, temperature, metric, offset, sym, r_far):
    block = (BLOCK_SYM, BLOCK_SYM) if sym else (None, None)
    pb = _Problem(q, r, q_labels, r_labels, temperature, metric, offset, *block, r_far=r_far)
    acc, dev = pb.q.dtype, pb.q.device
    run_all, run_pos = _OnlineLSE(pb.n, acc, dev), _OnlineLSE(pb.n, acc, dev)

    def fold(s, lo, hi, dim, pos):
        if pos is not None:
            # positives keep their own running max: at tiny T they can sit far below the
            # global max and would underflow against it
            run_pos.update(lo, hi, s.masked_fill(~pos, _NEG_INF), dim)
        run_all.update(lo, hi, s, dim)

    for (i0, i1), (j0, j1), has_pos in (pb.pairs() if sym else pb.tiles()):
        pos = pb.pos_mask(i0, i1, j0, j1) if has_pos else None
        if sym and j0 != i0:
            s_rows, s_cols = pb.gram_pair(i0, i1, j0, j1)
            fold(s_rows, i0, i1, 1, pos)
            fold(s_cols, j0, j1, 0, pos)
        else:
            fold(pb.logits(i0, i1, j0, j1), i0, i1, 1, pos)
    return pb.unsort_rows(run_all.lse()), pb.unsort_rows(run_pos.lse())


def blocked_probs_forward(q, r, r_labels, temperature, num_classes, metric, offset, r_far):
    q_labels = torch.zeros(q.shape[0], dtype=r_labels.dtype, device=q.device)
    pb = _Problem(q, r, q_labels, r_labels, temperature, metric, offset, r_far=r_far)
    acc, dev = pb.q.dtype, pb.q.device
    run = _OnlineLSE(pb.n, acc, dev)
    mass = torch.zeros(pb.n, num_classes, dtype=acc, device=dev)  # relative to the running max
    # _exp_'s floor (exp(-87) in fp32) is no weight: an excluded pair or a reference at
    # infinity (logit -inf) counts exactly 0 in its class, as one below the floor
    floor = math.exp(-708.0 if acc == torch.float64 else -87.0)
    for (i0, i1), (j0, j1), _ in pb.tiles():
        alpha, p = run.update(i0, i1, pb.logits(i0, i1, j0, j1))
        torch.nn.functional.threshold_(p, floor * (1 + 2 ** -20), 0.0)
        mass[i0:i1] *= alpha[:, None]
        mass[i0:i1].index_add_(1, pb.rl[j0:j1], p)
    # a row without any term (l = 0) is undefined: NaN, not tiny / 0
    yhat = torch.where(run.l[:, None] == 0, float("nan"), mass / run.l[:, None])
    return pb.unsort_rows(yhat), pb.unsort_rows(run.lse())


def _backward(pb, make_ds, q_dtype, r_dtype, need_q, need_r, need_t):
    """Accumulate dQ, dR, dT from per-tile ``ds`` (the gradient w.r.t. the logits)."""
    acc = pb.q.dtype
    dev = pb.q.device
    ds_r = torch.zeros_like(pb.q)  # sum_j ds_ij r_j
    ds_q = torch.zeros_like(pb.r) if need_r else None  # sum_i ds_ij q_i
    rowsum = torch.zeros(pb.n, dtype=acc, device=dev)
    colsum = torch.zeros(pb.m, dtype=acc, device=dev)
    sq = pb.metric == "sqeuclidean"
    for (i0, i1), (j0, j1), has_pos in pb.tiles():
        ds = make_ds(pb.logits(i0, i1, j0, j1), i0, i1, j0, j1, has_pos)
        ds_r[i0:i1].addmm_(ds, pb.r[j0:j1])
        if need_r:
            ds_q[j0:j1].addmm_(ds.T, pb.q[i0:i1])
        if sq:
            rowsum[i0:i1] += ds.sum(1)
            colsum[j0:j1] += ds.sum(0)
    inv_t = pb.inv_t
    dq = dr = dt = None
    # dT first (it reads ds_r), then dq and dr in place of ds_r and ds_q: no [N, D]
    # temporaries beside them
    q_ds_r = torch.vdot(pb.q.reshape(-1), ds_r.reshape(-1)) if need_t else None
    if sq:
        # s_ij = -(||q_i||^2 - 2 q_i.r_j + ||r_j||^2) / T
        # dq_i = 2/T (sum_j ds_ij r_j - q_i sum_j ds_ij), and symmetrically for dr_j
        if need_t:
            # sum_ij ds_ij s_ij, expanded so that no tile needs a second pass
            q_sqnorm = pb.q.pow(2).sum(1)
            ds_s = inv_t * (2.0 * q_ds_r - (rowsum * q_sqnorm).sum()
                            - (colsum * pb.r_sqnorm).sum())
            dt = -inv_t * ds_s  # dT = -1/T sum_ij ds_ij s_ij
        if need_q:
            dq = ds_r.addcmul_(rowsum[:, None], pb.q, value=-1.0).mul_(2.0 * inv_t)
        if need_r:
            dr = ds_q.addcmul_(colsum[:, None], pb.r, value=-1.0).mul_(2.0 * inv_t)
    else:
        # s_ij = q_i.r_j / T: dq_i = sum_j ds_ij r_j / T, dr_j = sum_i ds_ij q_i / T
        if need_t:
            dt = -inv_t * inv_t * q_ds_r
        if need_q:
            dq = ds_r.mul_(inv_t)
        if need_r:
            dr = ds_q.mul_(inv_t)
    if dq is not None:
        dq = pb.unsort_rows(dq).to(q_dtype)
    if dr is not None:
        dr = pb.unsort_refs(dr).to(r_dtype)
    return dq, dr, dt


def _row_terms(pb, lse, g):
    """Sorted (lse, upstream gradient); rows with no term (lse = -inf) get zero gradient."""
    lse = pb.sort_rows(lse.to(pb.q.dtype))
    g = pb.sort_rows(g.to(pb.q.dtype))
    empty = lse == _NEG_INF
    g = torch.where(empty.view(-1, *([1] * (g.dim() - 1))), torch.zeros_like(g), g)
    return finite_or_zero(lse), g


def _lse_ds(s, own, rows, pos, dim):
    """ds = g_all p + g_pos p+ for a tile whose owning rows (the softmax rows) are the
    slice ``own`` of ``rows``' vectors, laid along ``1 - dim`` of ``s``."""
    lse_all, lse_pos, g_all, g_pos = (v[own].unsqueeze(dim) for v in rows)
    # ds_ij = g_all_i p_ij + g_pos_i p+_ij
    if pos is not None:
        ds_pos = _exp_(s.masked_fill(~pos, _NEG_INF).sub_(lse_pos)).mul_(g_pos)
    ds = _exp_(s.sub_(lse_all)).mul_(g_all)
    return ds.add_(ds_pos) if pos is not None else ds


def blocked_lse_backward(q, r, q_labels, r_labels, temperature, lse_all, lse_pos, g_all, g_pos,
                         metric, offset, sym, r_far, need_q, need_r, need_t):
    block = (BLOCK_SYM, BLOCK_SYM) if sym else (None, None)
    pb = _Problem(q, r, q_labels, r_labels, temperature, metric, offset, *block, r_far=r_far)
    lse_all, g_all = _row_terms(pb, lse_all, g_all)
    lse_pos, g_pos = _row_terms(pb, lse_pos, g_pos)
    rows = (lse_all, lse_pos, g_all, g_pos)
    if sym:
        return _symmetric_backward(pb, rows, q.dtype)

    def make_ds(s, i0, i1, j0, j1, has_pos):
        pos = pb.pos_mask(i0, i1, j0, j1) if has_pos else None
        return _lse_ds(s, slice(i0, i1), rows, pos, 1)

    return _backward(pb, make_ds, q.dtype, r.dtype, need_q, need_r, need_t)


def _symmetric_backward(pb, rows, dtype):
    """Gradient of the batch loss w.r.t. x (= q = r), returned whole as ``dq``.

    With W = ds + ds^T, dx_k = 2/T (sum_j W_kj x_j - x_k sum_j W_kj) for "sqeuclidean"
    and sum_j W_kj x_j / T for "dot". Both logits are homogeneous of degree 2 in x, so
    sum_ij ds_ij s_ij = <x, dx> / 2 (Euler) and dT = -<x, dx> / (2T).
    """
    wx = torch.zeros_like(pb.q)  # sum_j W_kj x_j
    w_rowsum = torch.zeros(pb.n, dtype=pb.q.dtype, device=pb.q.device)
    for (i0, i1), (j0, j1), has_pos in pb.pairs():
        pos = pb.pos_mask(i0, i1, j0, j1) if has_pos else None
        if j0 == i0:
            ds = _lse_ds(pb.logits(i0, i1, i0, i1), slice(i0, i1), rows, pos, 1)
            w = ds.add_(ds.T.clone())
        else:
            s_rows, s_cols = pb.gram_pair(i0, i1, j0, j1)
            w = _lse_ds(s_rows, slice(i0, i1), rows, pos, 1)
            w += _lse_ds(s_cols, slice(j0, j1), rows, pos, 0)
            wx[j0:j1].addmm_(w.T, pb.q[i0:i1])
            w_rowsum[j0:j1] += w.sum(0)
        wx[i0:i1].addmm_(w, pb.r[j0:j1])
        w_rowsum[i0:i1] += w.sum(1)
    # in place: wx becomes dx (no [N, D] temporaries beside it)
    if pb.metric == "sqeuclidean":
        dx = wx.addcmul_(w_rowsum[:, None], pb.q, value=-1.0).mul_(2.0 * pb.inv_t)
    else:
        dx = wx.mul_(pb.inv_t)
    dt = -0.5 * pb.inv_t * torch.vdot(pb.q.reshape(-1), dx.reshape(-1))
    return pb.unsort_rows(dx).to(dtype), None, dt


def blocked_probs_backward(q, r, r_labels, temperature, yhat, lse_all, g, metric, offset, r_far,
                           need_q, need_r, need_t):
    q_labels = torch.zeros(q.shape[0], dtype=r_labels.dtype, device=q.device)
    pb = _Problem(q, r, q_labels, r_labels, temperature, metric, offset, r_far=r_far)
    acc = pb.q.dtype
    delta = pb.sort_rows((g.to(acc) * yhat.to(acc)).sum(1))  # delta_i = sum_c G_ic yhat_ic
    delta = torch.where(pb.sort_rows(lse_all) == _NEG_INF, torch.zeros_like(delta), delta)
    lse_all, g = _row_terms(pb, lse_all, g)

    def make_ds(s, i0, i1, j0, j1, has_pos):
        # ds_ij = p_ij (G_{i, b_j} - delta_i)
        p = _exp_(s.sub_(lse_all[i0:i1, None]))
        return p.mul_(g[i0:i1].index_select(1, pb.rl[j0:j1]).sub_(delta[i0:i1, None]))

    return _backward(pb, make_ds, q.dtype, r.dtype, need_q, need_r, need_t)
