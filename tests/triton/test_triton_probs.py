"""probs_forward / probs_backward (class distribution) of the triton backend."""
import os

import pytest
import torch

from nbkernels.backends import reference

CUDA = os.environ.get("NBK_TEST_DEVICE", "cpu") == "cuda"

# (dtype, atol, rtol) for yhat, lse_all and every gradient, against the fp64 reference
# on the same rounded inputs (see test_triton_lse.py for the fp32 dT and 16-bit notes).
TOLS = [
    (torch.float64, 1e-10, 1e-10),
    (torch.float32, 2e-4, 2e-5),
    (torch.float16, 2e-2, 1e-2),
] + ([(torch.bfloat16, 1.5e-1, 5e-2)] if CUDA else [])  # the interpreter has no bf16
METRICS = ["sqeuclidean", "dot"]
F64 = (1e-10, 1e-10)


def run(tb, case, metric, offset, g, need=(True, True, True), precision="ieee"):
    yhat, lse_all = tb.probs_forward(case.q, case.r, case.b, case.t, case.c, metric=metric,
                                     offset=offset, precision=precision)
    grads = tb.probs_backward(case.q, case.r, case.b, case.t, yhat, lse_all, g, metric=metric,
                              offset=offset, need_q=need[0], need_r=need[1], need_t=need[2],
                              precision=precision)
    return yhat, lse_all, grads


def upstream(h, case, seed=2):
    g = torch.Generator().manual_seed(seed)
    acc = h.acc_dtype(case.q.dtype)
    return torch.randn(case.q.shape[0], case.c, generator=g, dtype=torch.float64).to(acc).to(h.device)


def check(tb, h, case, metric, offset, atol, rtol, g=None):
    g = upstream(h, case) if g is None else g
    ref_y, ref_lse, rdq, rdr, rdt = h.ref_probs(case, metric, offset, g)
    yhat, lse_all, (dq, dr, dt) = run(tb, case, metric, offset, g)
    acc = h.acc_dtype(case.q.dtype)
    assert yhat.dtype == lse_all.dtype == acc and yhat.shape == (case.q.shape[0], case.c)
    assert (dq.dtype, dr.dtype, dt.dtype) == (case.q.dtype, case.r.dtype, case.t.dtype)
    h.close(yhat, ref_y, atol, rtol)
    h.close(lse_all + h.row_shift(case, metric), ref_lse, atol, rtol)
    for got, want in ((dq, rdq), (dr, rdr), (dt, rdt)):
        h.close(got, want, atol, rtol)
    return yhat, lse_all, (dq, dr, dt)


@pytest.mark.parametrize("offset", [None, 0, 3, -2])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype, atol, rtol", TOLS)
def test_matches_reference(tb, h, dtype, atol, rtol, metric, offset):
    check(tb, h, h.make_case(dtype=dtype), metric, offset, atol, rtol)


@pytest.mark.parametrize("c", [1, 37, 4096])
def test_class_tiles(tb, h, c):
    # C = 37: three class tiles under the interpreter, the last one partial; C = 4096:
    # hundreds of tiles, most of them without references
    n, m = 19, 23
    g = torch.Generator().manual_seed(3)
    b = torch.randint(0, c, (m,), generator=g)
    b[:3] = torch.tensor([0, c - 1, c // 2])  # the first and last classes are present
    case = h.make_case(n=n, m=m, d=7, c=c, dtype=torch.float64, r_labels=b)
    yhat, _, _ = check(tb, h, case, "sqeuclidean", 0, *F64)
    torch.testing.assert_close(yhat.sum(1), torch.ones_like(yhat[:, 0]), atol=1e-12, rtol=0)


def test_feature_dim_and_block_edges(tb, h):
    for n, m, d in ((1, 1, 1), (1, 29, 33), (37, 1, 3), (17, 40, 130)):
        check(tb, h, h.make_case(n=n, m=m, d=d, dtype=torch.float64), "dot", None, *F64)


def test_row_without_references(tb, h):
    # one query, one reference, offset 0: no term. yhat NaN (the reference has NaN in
    # the classes present), lse -inf, and no gradient whatever G is
    case = h.make_case(n=1, m=1, d=4, c=3, dtype=torch.float64)
    g = torch.full((1, 3), 5.0, dtype=torch.float64, device=h.device)
    yhat, lse_all, (dq, dr, dt) = run(tb, case, "sqeuclidean", 0, g)
    ref_y = reference.class_probs(case.q, case.r, case.b, case.t, 3, offset=0)
    assert torch.isnan(yhat).all() and torch.isnan(ref_y).any()
    assert torch.isneginf(lse_all).all()
    for grad in (dq, dr, dt):
        assert torch.equal(grad, torch.zeros_like(grad))


def test_labels_outside_classes(tb, h):
    # labels >= C or < 0 count in lse_all (the softmax) but in no class of yhat
    case = h.make_case(n=13, m=17, d=5, c=4, dtype=torch.float64)
    b = case.b.clone()
    b[:3] = torch.tensor([4, 9, -1])
    case.b = b
    s = reference.logits(case.q, case.r, case.t, "dot", 1)
    p = torch.softmax(s, 1)
    inside = (b >= 0) & (b < 4)
    want = torch.zeros(13, 4, dtype=torch.float64, device=h.device).index_add(1, b[inside], p[:, inside])
    yhat, lse_all = tb.probs_forward(case.q, case.r, b, case.t, 4, metric="dot", offset=1)
    torch.testing.assert_close(yhat, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse_all, torch.logsumexp(s, 1), atol=1e-12, rtol=1e-12)
    # gradient: G only sees the classes; the softmax normalization sees every reference
    g = upstream(h, case)
    q, r, t = (x.clone().requires_grad_() for x in (case.q, case.r, case.t))
    p = torch.softmax(reference.logits(q, r, t, "dot", 1), 1)
    y = torch.zeros(13, 4, dtype=torch.float64, device=h.device).index_add(1, b[inside], p[:, inside])
    want = torch.autograd.grad((g * y).sum(), (q, r, t))
    got = tb.probs_backward(case.q, case.r, b, case.t, yhat, lse_all, g, metric="dot", offset=1,
                            need_q=True, need_r=True, need_t=True)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("need", [(True, False, False), (False, True, True), (False, False, True)])
def test_need_flags(tb, h, need):
    case = h.make_case(dtype=torch.float64)
    g = upstream(h, case)
    _, _, full = run(tb, case, "sqeuclidean", None, g)
    _, _, part = run(tb, case, "sqeuclidean", None, g, need=need)
    for wanted, got, want in zip(need, part, full):
        if wanted:
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
        else:
            assert got is None


def test_strided_upstream(tb, h):
    # G as an expanded (stride 0) or transposed tensor, as autograd may hand it over
    case = h.make_case(n=21, m=18, d=6, c=4, dtype=torch.float64)
    g_rows = torch.randn(4, dtype=torch.float64, device=h.device)
    for g in (g_rows.expand(21, 4), upstream(h, case).T.contiguous().T):
        check(tb, h, case, "sqeuclidean", 0, *F64, g=g)


def test_no_classes(tb, h):
    # C = 0 (the API asks for C >= 1): yhat is empty, lse_all still sums every reference
    case = h.make_case(n=9, m=11, d=5, dtype=torch.float64)
    yhat, lse_all = tb.probs_forward(case.q, case.r, case.b, case.t, 0, metric="dot", offset=None)
    want, _ = tb.lse_forward(case.q, case.r, case.a, case.b, case.t, metric="dot", offset=None)
    assert yhat.shape == (9, 0)
    torch.testing.assert_close(lse_all, want, atol=1e-12, rtol=1e-12)
    g = torch.zeros(9, 0, dtype=torch.float64, device=h.device)
    for grad in tb.probs_backward(case.q, case.r, case.b, case.t, yhat, lse_all, g, metric="dot",
                                  offset=None, need_q=True, need_r=True, need_t=True):
        assert torch.equal(grad, torch.zeros_like(grad))
