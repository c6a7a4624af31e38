"""Launcher-level test cases shared by tests/triton and tests/cuda.

The oracle is ``nbkernels.backends.reference`` on the same (rounded) inputs upcast to
fp64, differentiated by autograd.
"""
import math
import types

import torch

from nbkernels.backends import reference


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_case(device, n=37, m=29, d=19, c=5, dtype=torch.float32, *, seed=0, scale=1.0,
              temperature=0.7, q_labels=None, r_labels=None):
    """Random inputs on ``device``, drawn in fp64 on the CPU (the same on every machine)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    r = torch.randn(m, d, generator=g, dtype=torch.float64) * scale
    a = torch.randint(0, c, (n,), generator=g) if q_labels is None else q_labels
    b = torch.randint(0, c, (m,), generator=g) if r_labels is None else r_labels
    return types.SimpleNamespace(
        q=q.to(device, dtype), r=r.to(device, dtype), a=a.to(device), b=b.to(device),
        t=torch.tensor(temperature, dtype=acc_dtype(dtype), device=device), c=c)


def _leaves(case):
    return [x.detach().to(torch.float64).requires_grad_() for x in (case.q, case.r, case.t)]


def ref_lse(case, metric, offset, g_all, g_pos):
    """Reference (lse_all, lse_pos) and grads of sum(g_all lse_all + g_pos lse_pos)."""
    q, r, t = _leaves(case)
    lse_all, lse_pos = reference.neighbor_lse(q, r, case.a, case.b, t, metric=metric, offset=offset)
    loss = (g_all.to(lse_all) * lse_all).sum() + (g_pos.to(lse_pos) * lse_pos).sum()
    dq, dr, dt = torch.autograd.grad(loss, (q, r, t))
    return lse_all.detach(), lse_pos.detach(), dq, dr, dt


def ref_probs(case, metric, offset, g):
    """Reference yhat, lse_all and grads of sum(g yhat)."""
    q, r, t = _leaves(case)
    yhat = reference.class_probs(q, r, case.b, t, case.c, metric=metric, offset=offset)
    lse_all, _ = reference.neighbor_lse(q, r, case.a, case.b, t, metric=metric, offset=offset)
    dq, dr, dt = torch.autograd.grad((g.to(yhat) * yhat).sum(), (q, r, t))
    return yhat.detach(), lse_all.detach(), dq, dr, dt


def row_shift(case, metric):
    """The row constant -||q||^2 / T that the kernels leave out of the lse ("sqeuclidean")."""
    if metric != "sqeuclidean":
        return 0.0
    acc = acc_dtype(case.q.dtype)
    return -case.q.to(acc).pow(2).sum(1) / case.t.to(acc)


def close(actual, expected, atol, rtol, **kw):
    """assert_close in the expected (reference) dtype; NaN must match NaN."""
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=atol, rtol=rtol,
                               equal_nan=True, **kw)


def far_positives(device, dtype, gap_sq, batch, k=40, per=4, extra=30, d=3, seed=4):
    """``k`` labels, each with one row near the origin and a cluster of ``per`` rows at
    squared distance ``gap_sq`` in its own direction, and ``extra`` near rows with labels
    of their own, interleaved (label order is not row order); T = 1. The near rows of the
    k labels have their positives only far away (``gap_sq`` below their nearest reference
    in logit). ``batch``: the batch against itself (r is q); else the queries are the
    near rows and the references the rest. Returns (case, offset, the rows whose
    positives are all far)."""
    g = torch.Generator().manual_seed(seed)
    near = torch.randn(k + extra, d, generator=g, dtype=torch.float64) * 0.3
    centres = torch.nn.functional.normalize(torch.randn(k, d, generator=g,
                                                        dtype=torch.float64), dim=1)
    far = (centres * math.sqrt(gap_sq)).repeat_interleave(per, 0) + \
        torch.randn(k * per, d, generator=g, dtype=torch.float64) * 0.3
    x = torch.cat([near, far])
    y = torch.cat([torch.arange(k + extra), torch.arange(k).repeat_interleave(per)])
    mix = torch.randperm(x.shape[0], generator=g)
    x, y = x[mix], y[mix]
    t = torch.tensor(1.0, dtype=dtype, device=device)
    if batch:
        q = x.to(device, dtype)
        a = y.to(device)
        case = types.SimpleNamespace(q=q, r=q, a=a, b=a, t=t, c=k + extra)
        return case, 0, mix < k
    keep = mix >= k
    case = types.SimpleNamespace(q=near.to(device, dtype), r=x[keep].to(device, dtype),
                                 a=torch.arange(k + extra, device=device),
                                 b=y[keep].to(device), t=t, c=k + extra)
    return case, None, torch.arange(k + extra) < k
