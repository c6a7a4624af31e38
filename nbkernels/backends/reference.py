r"""Reference backend: the formula in plain torch ops, differentiated by autograd.

This module is the oracle every other backend is tested against. It materializes
the full N x M logit matrix and is meant for small inputs and for checking.

The math
========

Queries ``q_i`` (N x D) with labels ``a_i``; references ``r_j`` (M x D) with labels
``b_j``; temperature ``T > 0``.

Logits::

    logit_ij = sim(q_i, r_j) / T
    sim = -||q - r||^2      ("sqeuclidean")
        = q . r             ("dot")
        = q . r / |q||r|    ("cosine", i.e. "dot" on L2-normalized rows)

Self-exclusion with offset ``o``: the pair ``(i, j = i + o)`` is removed from every
sum below (``o = 0`` when the references are the queries themselves).

Row statistics::

    lse_all_i = log sum_j        exp(logit_ij)
    lse_pos_i = log sum_{b_j=a_i} exp(logit_ij)        (-inf when no positive)
    loss_i    = lse_all_i - lse_pos_i = -log sum_{b_j=a_i} p_ij
    yhat_ic   = sum_{b_j=c} p_ij,       p_ij = exp(logit_ij - lse_all_i)

Gradients. With upstream ``g_all``, ``g_pos`` for the two log-sum-exps::

    dlogit_ij = g_all_i p_ij + g_pos_i p+_ij,   p+_ij = [b_j=a_i] exp(logit_ij - lse_pos_i)

so for the loss (``g_all = g``, ``g_pos = -g``) ``dlogit_ij = g_i (p_ij - p+_ij)``.
With upstream ``G`` (N x C) for yhat::

    dlogit_ij = p_ij (G_{i,b_j} - delta_i),    delta_i = sum_c G_ic yhat_ic

and then, writing ``ds = dlogit``::

    "dot":          dq_i = sum_j ds_ij r_j / T        dr_j = sum_i ds_ij q_i / T
    "sqeuclidean":  dq_i = 2/T (sum_j ds_ij r_j - q_i sum_j ds_ij)
                    dr_j = 2/T (sum_i ds_ij q_i - r_j sum_i ds_ij)
    all metrics:    dT   = -1/T sum_ij ds_ij logit_ij

Non-finite inputs
=================

NaN in a row makes every output it enters NaN. A row with an infinite entry and no NaN
is a *point at infinity*:

* "sqeuclidean": as a reference it is infinitely far from every finite query, its logit
  is -inf, so it has weight 0 and gets no gradient, and the other rows are as if it were
  absent (the direct formula -||q - r||^2; the expansion ||q||^2 - 2 q.r + ||r||^2 would
  give inf - inf). As a query every logit is -inf and its softmax is undefined: its
  rows (lse, loss, yhat) are NaN and it gets no gradient.
* "cosine": the row is normalized to its limit direction (the signs of its infinite
  entries, at unit length), with zero gradient.
* "dot": the direct formula: a -inf logit has weight 0; a +inf logit leaves the softmax
  undefined, so that query's row is NaN. Gradients through infinite entries are NaN.

For "sqeuclidean" the fused backends use the shifted logit
``(2 q.r - ||r||^2) / T``; the dropped ``-||q||^2/T`` is constant along a row, so it
cancels in every softmax and in the loss and is added back to the returned lse.
"""
from __future__ import annotations

import torch

from nbkernels._validation import acc_dtype
from nbkernels.backends.infinity import at_infinity, finite_or_zero
from nbkernels.kernel_inputs import centre_of, symmetric_flag


def unit_rows(x):
    """L2-normalized rows (as ``torch.nn.functional.normalize``); a row at infinity
    becomes its limit direction, the signs of its infinite entries, at unit length."""
    far = at_infinity(x)
    x = torch.where(far[:, None], torch.where(torch.isinf(x), torch.sign(x), 0.0), x)
    return torch.nn.functional.normalize(x, dim=1)


def logits(q, r, temperature, metric, offset):
    """Materialized (N, M) logits in the accumulation dtype, excluded pair at -inf.

    Points at infinity (see the module docstring): under "sqeuclidean" a reference at
    infinity has logit -inf (weight 0, no gradient) and a query at infinity a NaN row
    (no gradient); under "dot" a +inf logit is NaN (the softmax is undefined there).
    Autocast does not apply: the products run in the accumulation dtype.
    """
    acc = acc_dtype(q.dtype)
    with torch.autocast(q.device.type, enabled=False):
        q = q.to(acc)
        r = r.to(acc)
        if metric == "cosine":
            q, r = unit_rows(q), unit_rows(r)
        if metric == "sqeuclidean":
            q_far, r_far = at_infinity(q), at_infinity(r)
            q = torch.where(q_far[:, None], 0.0, q)
            r = torch.where(r_far[:, None], 0.0, r)
            # distances do not change under translation: centred on the queries' mean,
            # the expansion cancels nothing that matters for rows far from the origin
            centre = centre_of(q)
            q, r = q - centre, r - centre
            sim = -(q.pow(2).sum(1, keepdim=True) - 2.0 * q @ r.T + r.pow(2).sum(1))
        else:
            sim = q @ r.T
        s = sim / temperature
        if metric == "sqeuclidean":  # after the division: no gradient to T from them either
            s = s.masked_fill(r_far[None, :], float("-inf"))
            s = s.masked_fill(q_far[:, None], float("nan"))
        if metric == "dot":
            s = s.masked_fill(s == float("inf"), float("nan"))
    if offset is not None:
        s = s.masked_fill(_excluded(q.shape[0], r.shape[0], offset, q.device), float("-inf"))
    return s
def _excluded(n, m, offset, device):
    """Boolean (N, M) mask of the excluded pairs j == i + offset."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(m, device=device)[None, :]
    return j == i + offset


def _masked_lse(s, mask):
    """Row logsumexp over ``mask``; -inf (and zero gradient) for rows with no entry."""
    has = mask.any(1)
    safe = torch.where(mask, s, float("-inf"))
    safe = torch.where(has[:, None], safe, torch.zeros_like(s))
    empty = torch.full(s.shape[:1], float("-inf"), dtype=s.dtype, device=s.device)
    return torch.where(has, torch.logsumexp(safe, 1), empty)


def neighbor_lse(q, r, q_labels, r_labels, temperature, *, metric="sqeuclidean", offset=None):
    """Return ``(lse_all, lse_pos)``, each (N,), in the accumulation dtype (autograd-differentiable)."""
    s = logits(q, r, temperature, metric, offset)
    present = torch.ones_like(s, dtype=torch.bool)
    if offset is not None:
        present = ~_excluded(s.shape[0], s.shape[1], offset, s.device)
    pos = present & (q_labels[:, None] == r_labels[None, :])
    # NaN logits must propagate: the masks come from labels, never from values.
    lse_all = _masked_lse(s, present)
    lse_pos = _masked_lse(s, pos)
    return lse_all, lse_pos


def class_probs(q, r, r_labels, temperature, num_classes, *, metric="sqeuclidean", offset=None):
    """Return yhat (N, num_classes) in q's dtype; row i sums to 1 when it has references."""
    s = logits(q, r, temperature, metric, offset)
    p = torch.softmax(s, dim=1)
    yhat = torch.zeros(s.shape[0], num_classes, dtype=s.dtype, device=s.device)
    yhat = yhat.index_add(1, r_labels, p)
    # a row without any reference (M = 0, or its only one excluded) is undefined: NaN
    has_ref = ((s > float("-inf")) | torch.isnan(s)).any(1, keepdim=True)
    yhat = yhat.masked_fill(torch.logical_not(has_ref), float("nan"))
    return yhat.to(q.dtype)


# ---------------------------------------------------------------- the launcher interface
# (``nbkernels.backends``), over the materialized formula, so that every chunked and
# distributed path also runs with backend="reference". Its lse values are unshifted.

SHIFTED = False


def _row_g(lse, g):
    """Rows without any term (lse = -inf) get no gradient."""
    empty = (lse == float("-inf")).view(-1, *([1] * (g.dim() - 1)))
    return torch.where(empty, torch.zeros_like(g), g.to(lse.dtype))


def lse_forward(q, r, q_labels, r_labels, temperature, *, metric, offset, symmetric=False):
    symmetric_flag(symmetric, q, r, q_labels, r_labels, offset)  # checked, not needed here
    with torch.no_grad():
        return neighbor_lse(q, r, q_labels, r_labels, temperature, metric=metric, offset=offset)


def probs_forward(q, r, r_labels, temperature, num_classes, *, metric, offset):
    with torch.no_grad():
        s = logits(q, r, temperature, metric, offset)
        lse_all = torch.logsumexp(s, 1)
        p = torch.exp(s - lse_all[:, None])
        yhat = torch.zeros(s.shape[0], num_classes, dtype=s.dtype, device=s.device)
        return yhat.index_add(1, r_labels, p), lse_all


def _grads(q, r, temperature, metric, offset, make_ds, need_q, need_r, need_t):
    # the gradient of sum_ij ds_ij s_ij(q, r, T) with ds held constant
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(need)
                  for x, need in ((q, need_q), (r, need_r), (temperature, need_t))]
        s = logits(*leaves, metric, offset)
        with torch.no_grad():
            ds = make_ds(s.detach())
        if offset is not None:  # ds is 0 there; keep -inf * 0 out of the sum
            s = s.masked_fill(_excluded(s.shape[0], s.shape[1], offset, s.device), 0.0)
        wanted = [x for x in leaves if x.requires_grad]
        got = iter(torch.autograd.grad((s * ds).sum(), wanted) if wanted else ())
    return tuple(next(got) if x.requires_grad else None for x in leaves)


def lse_backward(q, r, q_labels, r_labels, temperature, lse_all, lse_pos, g_all, g_pos,
                 *, metric, offset, need_q, need_r, need_t, symmetric=False):
    symmetric_flag(symmetric, q, r, q_labels, r_labels, offset)  # checked, not needed here

    def make_ds(s):
        # ds_ij = g_all_i p_ij + g_pos_i p+_ij
        pos = q_labels[:, None] == r_labels[None, :]
        ds = _row_g(lse_all, g_all)[:, None] * torch.exp(s - finite_or_zero(lse_all)[:, None])
        p_pos = torch.exp(s - finite_or_zero(lse_pos)[:, None])
        return ds + torch.where(pos, _row_g(lse_pos, g_pos)[:, None] * p_pos, 0.0)

    return _grads(q, r, temperature, metric, offset, make_ds, need_q, need_r, need_t)


def probs_backward(q, r, r_labels, temperature, yhat, lse_all, g, *, metric, offset,
                   need_q, need_r, need_t):
    def make_ds(s):
        # ds_ij = p_ij (G_{i,b_j} - delta_i), delta_i = sum_c G_ic yhat_ic
        g_rows = _row_g(lse_all, g.to(s.dtype))
        delta = (g_rows * torch.nan_to_num(yhat.to(s.dtype))).sum(1, keepdim=True)
        p = torch.exp(s - finite_or_zero(lse_all)[:, None])
        return p * (g_rows.index_select(1, r_labels) - delta)

    return _grads(q, r, temperature, metric, offset, make_ds, need_q, need_r, need_t)
