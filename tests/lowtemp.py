"""Row-by-row checks of the NCA loss against a direct fp64 formula, for numerics regimes
(low temperature, large squared distances, few or many classes).

The oracle computes ``-||q_i - r_j||^2 / T`` from the differences themselves, in fp64,
on the same (rounded) inputs as the backend, and differentiates the loss rows with
autograd. Every row of the loss and every element of every gradient is compared with a
tolerance of its own, made of two parts:

* rounding: each term of a row is exact to a few ulps of the accumulation dtype, so an
  element may be off by ``ROUND_ULPS`` ulps of the sum of its terms' magnitudes (for
  d/dq_i: (2/T) sum_j |ds_ij| (|r_j| + |q_i|), summed over both roles in the batch form);
* conditioning: an fp32 (or fp64) logit built from ``||q||^2 - 2 q.r + ||r||^2`` is exact
  only to eps (||q|| + ||r||)^2 / T, as is a log-sum-exp written at that magnitude. A
  softmax weight moves with such an error by at most 2 eps p (1 - p), and a normalizer
  rounded at that magnitude moves every weight of its row by min(1 - max p, eps),
  relatively, so the rows where one reference holds all the weight (the usual case at
  low T) must come out exact, while rows with near ties may move by that much. A row
  whose loss lies below the resolution of its log-sum-exps (a positive holding all but
  less than eps of the mass) may also lose that last bit of its positives' weight, and
  terms below ``TINY`` of their row may underflow away.

A bug that moves a dominant weight (a shift that does not reproduce the forward's
normalizer, a term lost from a sum) breaks the bound on exactly the rows that are
well conditioned; tests/triton/test_triton_lowtemp.py shows it does for the kernels of
commit 5fa40b9.
"""
import math

import torch
from torch.utils.checkpoint import checkpoint

ROUND_ULPS = 256    # per-term rounding (of the kernel and of the oracle), summed over a row
COND_ULPS = 4       # logit / log-sum-exp error: (1 + sqrt(D)) times this many ulps of
#                     (|q| + |r|)^2 / T (a dot over D terms, then the expansion)
# The one-exp backward shares a row's shift between all its pairs and weighs positives
# by up to 2^64 (fp32; 2^960 fp64), so a positive below 2^-62 (fp32; 2^-114 fp64) of its
# row's positive mass may underflow away, as may any term that small.
TINY = {torch.float32: 2.0 ** -60, torch.float64: 2.0 ** -110}


CHUNK_ELEMENTS = 1 << 25   # of the [rows, M, D] differences (256 MB in fp64)


def _neg_sq_dist(q, r):
    """-||q_i - r_j||^2 from the exact differences, [len(q), len(r)]."""
    return -(q[:, None, :] - r[None, :, :]).square().sum(-1)


def oracle(q, a, r=None, b=None, temperature=0.1, weight=None):
    """fp64 loss rows, gradients and the tolerances of each (see the module docstring).

    q: (N, D), a: (N,) labels; r, b: the references (None: the batch against itself,
    the pair i = j excluded). weight (N,): the upstream gradient of the rows (default 1).
    Returns dict(loss, grads, loss_tol, grad_tols) with grads / grad_tols (dq,) or (dq, dr).
    """
    batch = r is None
    eps = torch.finfo(torch.float64 if q.dtype == torch.float64 else torch.float32).eps
    T = float(temperature)
    qd = q.detach().double().requires_grad_()
    rd = qd if batch else r.detach().double().requires_grad_()
    b = a if batch else b
    n, m = qd.shape[0], rd.shape[0]
    # the differences taken exactly, [rows, M, D] at a time, recomputed in the backward
    # (checkpoint): the whole [N, M, D] and its square, kept for autograd, took 24 GB at
    # N = 2000, D = 256
    rows = max(1, CHUNK_ELEMENTS // max(1, m * qd.shape[1]))
    s = torch.cat([checkpoint(_neg_sq_dist, qd[i:i + rows], rd, use_reentrant=False)
                   for i in range(0, n, rows)]) / T
    keep = torch.ones(n, m, dtype=torch.bool)
    if batch:
        keep &= ~torch.eye(n, dtype=torch.bool)
    pos = keep & (a[:, None] == b[None, :])
    s = s.masked_fill(~keep, float("-inf"))
    lse_all = torch.logsumexp(s, 1)
    lse_pos = torch.logsumexp(s.masked_fill(~pos, float("-inf")), 1)
    valid = pos.any(1)
    loss = torch.where(valid, lse_all - torch.where(valid, lse_pos, 0.0), 0.0)
    w = torch.ones(n, dtype=torch.float64) if weight is None else weight.double()
    leaves = (qd,) if batch else (qd, rd)
    grads = torch.autograd.grad((loss * w).sum(), leaves)
    with torch.no_grad():
        g = torch.where(valid, w, 0.0).abs()[:, None]
        p = torch.exp(s - lse_all[:, None])
        pp = torch.where(pos, torch.exp(s - torch.where(valid, lse_pos, 0.0)[:, None]), 0.0)
        nq, nr = qd.norm(dim=1), rd.norm(dim=1)
        # the logits' (and lse values') absolute error scale, per query row
        ulps = COND_ULPS * (1 + math.sqrt(qd.shape[1]))
        eps_row = ulps * eps * (nq + nr.max()).square() / T
        gap = lse_all - lse_pos
        unresolved = (valid & (gap < eps_row))[:, None]
        size = g * (p + pp)
        # a logit error moves p by eps_row p (1 - p); a normalizer written at the logits'
        # magnitude moves every p of its row by rho = min(1 - max p, eps_row), relative
        rho = torch.minimum(1 - p.amax(1), eps_row)[:, None]
        rho_pos = torch.minimum(1 - pp.amax(1), eps_row)[:, None]
        tiny = TINY[torch.float64 if eps < 1e-10 else torch.float32]
        cond = g * (eps_row[:, None] * (p * (1 - p) + pp * (1 - pp)) + p * rho + pp * rho_pos
                    + torch.where(unresolved, pp, 0.0)
                    + torch.where(p < tiny, p, 0.0) + torch.where(pp < tiny, pp, 0.0))
        loss_tol = ROUND_ULPS * eps * (lse_all.abs() + lse_pos.abs().nan_to_num(0, 0, 0)) \
            + 2 * eps_row
        loss_tol = torch.where(valid, loss_tol, 0.0) + ROUND_ULPS * eps * loss.abs()
        # values below the smallest normal number of the inputs' dtype need not come out
        floor = torch.finfo(q.dtype).tiny
        grad_tols = [t + floor for t in _grad_tols(qd.detach(), rd.detach(), size, cond, T, eps,
                                                   batch)]
    return dict(loss=loss.detach(), grads=[x.detach() for x in grads], loss_tol=loss_tol,
                grad_tols=grad_tols)


def _grad_tols(q, r, size, cond, T, eps, batch, chunk=64):
    """Elementwise bounds for d/dq (and d/dr): ds enters dq_i as (2/T) sum_j ds_ij (r_j - q_i)
    and dr_j as (2/T) sum_i ds_ij (q_i - r_j). ``size`` / ``cond``: (N, M) weights of the
    rounding and conditioning parts. Rows in chunks: no (N, M, D) tensor."""
    out = []
    for w_size, w_cond, own, other in ((size, cond, q, r), (size.T, cond.T, r, q)):
        tol = torch.empty_like(own)
        for i in range(0, own.shape[0], chunk):
            x = own[i:i + chunk]
            spread = (other[None, :, :] - x[:, None, :]).abs()
            magnitude = other.abs()[None, :, :] + x.abs()[:, None, :]
            tol[i:i + chunk] = (2 / T) * (
                (w_cond[i:i + chunk, :, None] * spread).sum(1)
                + ROUND_ULPS * eps * (w_size[i:i + chunk, :, None] * magnitude).sum(1))
        out.append(tol)
    return [out[0] + out[1]] if batch else out


def assert_rows_close(got_loss, got_grads, want):
    """Every loss row and every gradient element within its own tolerance; the message
    names the worst rows."""
    fails = []
    err = (got_loss.double() - want["loss"]).abs()
    bad = ~(err <= want["loss_tol"])
    if bad.any():
        i = int(torch.argmax(torch.where(bad, err / want["loss_tol"].clamp_min(1e-300), 0.0)))
        fails.append(f"loss: {int(bad.sum())} rows out of tolerance, e.g. row {i}: got "
                     f"{float(got_loss[i]):.9g}, want {float(want['loss'][i]):.9g}, "
                     f"tolerance {float(want['loss_tol'][i]):.3g}")
    for name, got, ref, tol in zip(("dq", "dr"), got_grads, want["grads"], want["grad_tols"]):
        err = (got.double() - ref).abs()
        bad = ~(err <= tol)
        if bad.any():
            rows = bad.any(1)
            ratio = torch.where(bad, err / tol.clamp_min(1e-300), 0.0).amax(1)
            i = int(torch.argmax(ratio))
            fails.append(f"{name}: {int(rows.sum())} rows out of tolerance, worst row {i}: "
                         f"error {float(err[i].norm()):.3g} (tolerance {float(tol[i].norm()):.3g}) "
                         f"on a row of norm {float(ref[i].norm()):.3g}")
    assert not fails, "; ".join(fails)
