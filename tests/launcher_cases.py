"""Launcher-level test cases shared by tests/triton and tests/cuda.

The oracle is ``nbkernels.backends.reference`` on the same (rounded) inputs upcast to
fp64, differentiated by autograd.
"""
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
