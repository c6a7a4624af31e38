"""Triton backend tests. They run in their own process, since triton reads
TRITON_INTERPRET once, when it is imported::

    TRITON_INTERPRET=1 python -m pytest tests/triton        # CPU, Triton interpreter
    NBK_TEST_DEVICE=cuda python -m pytest tests/triton      # GPU; adds bf16

On a GPU the kernels run with one fixed config (NBK_TRITON_AUTOTUNE=0, set here unless
already set, before the backend is imported): autotuning would benchmark every config
for every new shape bucket. ``test_triton_configs.py`` runs each tuned config instead.

The oracle is ``nbkernels.backends.reference`` on the same (rounded) inputs upcast to
fp64, differentiated by autograd: the tolerance tables then bound each kernel's own
error, not the sum of its error and an fp32 oracle's.
"""
import os
import types

import pytest
import torch

from nbkernels.backends import reference

# before the triton backend is imported (the tb fixture), which reads it
os.environ.setdefault("NBK_TRITON_AUTOTUNE", "0")
DEVICE = os.environ.get("NBK_TEST_DEVICE", "cpu")


def pytest_configure(config):
    # the interpreter evaluates both sides of tl.where: log(0), 0 * inf in masked lanes
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise pytest.UsageError(
            "tests/triton on CPU need the Triton interpreter, set before triton is imported: "
            "TRITON_INTERPRET=1 python -m pytest tests/triton (or NBK_TEST_DEVICE=cuda on a GPU); "
            f"TRITON_INTERPRET is {os.environ.get('TRITON_INTERPRET')!r}")
    if DEVICE not in ("cpu", "cuda"):
        raise pytest.UsageError(f"NBK_TEST_DEVICE must be 'cpu' or 'cuda', got {DEVICE!r}")
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("NBK_TEST_DEVICE=cuda but torch sees no CUDA device")


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_case(n=37, m=29, d=19, c=5, dtype=torch.float32, *, seed=0, scale=1.0, temperature=0.7,
              q_labels=None, r_labels=None):
    """Random inputs on the test device; drawn in fp64 on the CPU so every device sees the same."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    r = torch.randn(m, d, generator=g, dtype=torch.float64) * scale
    a = torch.randint(0, c, (n,), generator=g) if q_labels is None else q_labels
    b = torch.randint(0, c, (m,), generator=g) if r_labels is None else r_labels
    to = dict(device=DEVICE)
    return types.SimpleNamespace(
        q=q.to(dtype=dtype, **to), r=r.to(dtype=dtype, **to), a=a.to(**to), b=b.to(**to),
        t=torch.tensor(temperature, dtype=acc_dtype(dtype), **to),
        c=c)


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


@pytest.fixture(scope="session")
def tb():
    """The triton backend module (imported here, after the configure-time checks)."""
    from nbkernels.backends import triton as triton_backend
    return triton_backend


@pytest.fixture(scope="session")
def h():
    """Shared helpers: make_case, ref_lse, ref_probs, row_shift, close, acc_dtype."""
    return types.SimpleNamespace(make_case=make_case, ref_lse=ref_lse, ref_probs=ref_probs,
                                 row_shift=row_shift, close=close, acc_dtype=acc_dtype,
                                 device=DEVICE)
