"""The fp64 oracle, written independently of ``nbkernels.backends.reference``: the direct
differences ``-||q_i - r_j||^2 / T`` (or the dot products), a masked logsumexp, ``yhat`` by
a one-hot matmul, gradients by autograd on that formula, and the random upstream gradients
the checks use. Non-finite inputs follow the spec in ``reference``'s docstring."""
import torch

import launcher_cases as cases

from .harness import F64, INF, NAN

def _far(x):
    """Rows at infinity: an infinite entry and no NaN."""
    return torch.isinf(x).any(1) & ~torch.isnan(x).any(1)


def _unit(x):
    """Unit rows; a row at infinity is its limit direction (a constant: no gradient)."""
    limit = torch.where(torch.isinf(x), torch.sign(x), torch.zeros_like(x)).detach()
    x = torch.where(_far(x)[:, None], limit, x)
    return x / x.norm(dim=1, keepdim=True)


def _excluded(n, m, offset, device):
    """(N, M) bool: the excluded pairs j == i + offset."""
    if offset is None:
        return torch.zeros(n, m, dtype=torch.bool, device=device)
    i, j = torch.arange(n, device=device), torch.arange(m, device=device)
    return j[None, :] == i[:, None] + offset


def oracle_logits(q, r, t, metric, offset):
    """fp64 (N, M) logits by the direct formula; the excluded pair is -inf.

    sqeuclidean: a reference at infinity has logit -inf (and no gradient), a query at
    infinity a NaN row (and no gradient). dot: a +inf logit is NaN (the softmax is
    undefined there: lse_all, yhat and the loss of its row are NaN).
    """
    q, r, t = q.double(), r.double(), t.double()
    if metric == "cosine":
        q, r = _unit(q), _unit(r)
    if metric == "sqeuclidean":
        q_far, r_far = _far(q), _far(r)
        qz = torch.where(q_far[:, None], torch.zeros_like(q), q)
        rz = torch.where(r_far[:, None], torch.zeros_like(r), r)
        s = -(qz[:, None, :] - rz[None, :, :]).square().sum(-1) / t
        s = s.masked_fill(r_far[None, :], -INF).masked_fill(q_far[:, None], NAN)
    else:
        s = (q[:, None, :] * r[None, :, :]).sum(-1) / t
    s = s.masked_fill(_excluded(q.shape[0], r.shape[0], offset, q.device), -INF)
    if metric == "dot":
        s = s.masked_fill(s == INF, NAN)
    return s


def _masked_lse(s, mask):
    """Row logsumexp over ``mask``: -inf, with no gradient, for a row without an entry."""
    return torch.logsumexp(s.masked_fill(~mask, -INF), 1)


def oracle_rows(q, r, a, b, t, c, metric, offset):
    """fp64 ``(lse_all, lse_pos, yhat, has_pos)`` of queries q (labels a; None: no
    positives) against references r (labels b) with ``c`` classes. ``has_pos``: a positive
    of nonzero weight (a logit above -inf, or NaN): one at infinity weighs nothing."""
    s = oracle_logits(q, r, t, metric, offset)
    keep = ~_excluded(s.shape[0], s.shape[1], offset, s.device)
    pos = keep & (False if a is None else a[:, None] == b[None, :])
    lse_all, lse_pos = _masked_lse(s, keep), _masked_lse(s, pos)
    onehot = (b[:, None] == torch.arange(c, device=b.device)[None, :]).double()
    yhat = torch.exp(s - lse_all[:, None]) @ onehot
    # a row without a reference is undefined (also when M = 0)
    yhat = yhat.masked_fill(~keep.any(1)[:, None], NAN)
    return lse_all, lse_pos, yhat, (pos & (s != -INF)).any(1)


def _leaves(case):
    return [x.detach().double().requires_grad_() for x in (case.q, case.r, case.t)]


def oracle_lse(case, metric, offset, g_all, g_pos):
    """Oracle (lse_all, lse_pos, dq, dr, dt) of sum(g_all lse_all + g_pos lse_pos), and the
    upstream with 0 on rows whose lse is -inf (no term: no gradient from them)."""
    q, r, t = _leaves(case)
    lse_all, lse_pos, _, _ = oracle_rows(q, r, case.a, case.b, t, 0, metric, offset)
    g_all = torch.where(torch.isneginf(lse_all), 0.0, g_all)
    g_pos = torch.where(torch.isneginf(lse_pos), 0.0, g_pos)
    total = sum((g.double() * x.masked_fill(torch.isneginf(x), 0.0)).sum()
                for g, x in ((g_all, lse_all), (g_pos, lse_pos)))
    grads = torch.autograd.grad(total, (q, r, t))
    return (lse_all.detach(), lse_pos.detach(), *grads), (g_all, g_pos)


def oracle_probs(case, metric, offset, g):
    """Oracle (yhat, lse_all, dq, dr, dt) of sum(g yhat)."""
    q, r, t = _leaves(case)
    lse_all, _, yhat, _ = oracle_rows(q, r, case.a, case.b, t, case.c, metric, offset)
    grads = torch.autograd.grad((g.double() * yhat).sum(), (q, r, t))
    return (yhat.detach(), lse_all.detach(), *grads)


def upstream_lse(case, seed=1):
    """Random (g_all, g_pos) in the accumulation dtype."""
    g = torch.Generator().manual_seed(seed)
    acc = cases.acc_dtype(case.q.dtype)
    n = case.q.shape[0]
    return [torch.randn(n, generator=g, dtype=F64).to(case.q.device, acc) for _ in range(2)]


def upstream_probs(case, seed=2):
    g = torch.Generator().manual_seed(seed)
    acc = cases.acc_dtype(case.q.dtype)
    return torch.randn(case.q.shape[0], case.c, generator=g, dtype=F64).to(case.q.device, acc)


def _inf_as_nan(x):
    """What a backend that reads an infinite entry as NaN sees (``fp32_dot_inf_is_nan``)."""
    return torch.where(torch.isinf(x), float("nan"), x)
