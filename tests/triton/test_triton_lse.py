"""lse_forward / lse_backward of the triton backend against the reference."""
import os

import pytest
import torch

CUDA = os.environ.get("NBK_TEST_DEVICE", "cpu") == "cuda"

# (dtype, atol, rtol) for the lse and every gradient, against the fp64 reference on the
# same rounded inputs. fp32: dT sums N*M terms ds * logit of both signs (seen: 1e-4 on
# |dT| ~ 10, a 4x smaller error than the fp32 reference's). fp16 / bf16: the kernels
# round ds to the input dtype for the gradient dot and return gradients in that dtype
# (seen in fp16: 1.1e-2 on |grad| ~ 25; bf16 has 3 fewer mantissa bits).
TOLS = [
    (torch.float64, 1e-10, 1e-10),
    (torch.float32, 2e-4, 2e-5),
    (torch.float16, 2e-2, 1e-2),
] + ([(torch.bfloat16, 1.5e-1, 5e-2)] if CUDA else [])  # the interpreter has no bf16
METRICS = ["sqeuclidean", "dot"]
OFFSETS = [None, 0, 3, -2]
F64 = (torch.float64, 1e-10, 1e-10)


def run(tb, case, metric, offset, g_all, g_pos, need=(True, True, True), precision="ieee"):
    lse_all, lse_pos = tb.lse_forward(case.q, case.r, case.a, case.b, case.t, metric=metric,
                                      offset=offset, precision=precision)
    grads = tb.lse_backward(case.q, case.r, case.a, case.b, case.t, lse_all, lse_pos, g_all, g_pos,
                            metric=metric, offset=offset, need_q=need[0], need_r=need[1],
                            need_t=need[2], precision=precision)
    return lse_all, lse_pos, grads


def upstream(h, case, seed=1):
    """Random (g_all, g_pos) in the accumulation dtype."""
    g = torch.Generator().manual_seed(seed)
    n = case.q.shape[0]
    acc = h.acc_dtype(case.q.dtype)
    return [torch.randn(n, generator=g, dtype=torch.float64).to(acc).to(h.device) for _ in range(2)]


def check(tb, h, case, metric, offset, atol, rtol):
    """Forward and all three gradients against the reference; returns the kernel outputs."""
    g_all, g_pos = upstream(h, case)
    ref_all, ref_pos, *_ = h.ref_lse(case, metric, offset, g_all, g_pos)
    # rows without a term: -inf lse, and autograd gives no gradient there; keep g finite-safe
    g_all = torch.where(torch.isinf(ref_all), 0.0, g_all)
    g_pos = torch.where(torch.isinf(ref_pos), 0.0, g_pos)
    ref_all, ref_pos, rdq, rdr, rdt = h.ref_lse(case, metric, offset, g_all, g_pos)
    lse_all, lse_pos, (dq, dr, dt) = run(tb, case, metric, offset, g_all, g_pos)
    acc = h.acc_dtype(case.q.dtype)
    assert lse_all.dtype == lse_pos.dtype == acc
    assert (dq.dtype, dr.dtype, dt.dtype) == (case.q.dtype, case.r.dtype, case.t.dtype)
    shift = h.row_shift(case, metric)
    h.close(lse_all + shift, ref_all, atol, rtol)
    h.close(lse_pos + shift, ref_pos, atol, rtol)
    for got, want in ((dq, rdq), (dr, rdr), (dt, rdt)):
        h.close(got, want, atol, rtol)
    return lse_all, lse_pos, (dq, dr, dt)


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype, atol, rtol", TOLS)
def test_matches_reference(tb, h, dtype, atol, rtol, metric, offset):
    check(tb, h, h.make_case(dtype=dtype), metric, offset, atol, rtol)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("d", [1, 3, 33, 130])
def test_feature_dims(tb, h, d, metric):
    # D = 33 and 130 take several BLOCK_D chunks, and 130 several dq / dr slices
    check(tb, h, h.make_case(n=21, m=18, d=d, dtype=torch.float64), metric, 0, *F64[1:])


@pytest.mark.parametrize("offset", [None, 0])
@pytest.mark.parametrize("n, m", [(1, 1), (1, 29), (37, 1), (16, 16), (17, 40)])
def test_block_edges(tb, h, n, m, offset):
    # N = M = 1 with offset 0 has no term at all: -inf, zero gradients
    check(tb, h, h.make_case(n=n, m=m, d=5, c=3, dtype=torch.float64), "sqeuclidean", offset,
          *F64[1:])


@pytest.mark.parametrize("metric", METRICS)
def test_all_distinct_labels(tb, h, metric):
    n, m = 19, 23
    case = h.make_case(n=n, m=m, dtype=torch.float64, q_labels=torch.arange(n),
                       r_labels=torch.arange(n, n + m))
    _, lse_pos, _ = check(tb, h, case, metric, None, *F64[1:])
    assert torch.isneginf(lse_pos).all()


@pytest.mark.parametrize("offset", [None, 0])
def test_one_class(tb, h, offset):
    n = 23
    zeros = torch.zeros(n, dtype=torch.int64)
    case = h.make_case(n=n, m=n, dtype=torch.float64, q_labels=zeros, r_labels=zeros)
    lse_all, lse_pos, _ = check(tb, h, case, "sqeuclidean", offset, *F64[1:])
    torch.testing.assert_close(lse_pos, lse_all, atol=1e-12, rtol=1e-12)


def test_upstream_on_rows_without_terms_contributes_zero(tb, h):
    # rows 0..2 have no positive (label 9 is absent from the references); with N = M,
    # offset 0 and one reference, query 0 has no term at all
    for n, m in ((11, 13), (1, 1)):
        a = torch.tensor([9, 9, 9] + [0, 1] * 4)[:n]
        case = h.make_case(n=n, m=m, c=2, dtype=torch.float64, q_labels=a)
        la, lp = tb.lse_forward(case.q, case.r, case.a, case.b, case.t, metric="sqeuclidean",
                                offset=0)
        g_all, g_pos = upstream(h, case)
        g_all_clean = torch.where(torch.isinf(la), 0.0, g_all)
        g_pos_clean = torch.where(torch.isinf(lp), 0.0, g_pos)
        g_pos_dirty = torch.where(torch.isinf(lp), float("inf"), g_pos)
        g_all_dirty = torch.where(torch.isinf(la), 1e30, g_all)

        def grads(ga, gp, case=case, la=la, lp=lp):
            return tb.lse_backward(case.q, case.r, case.a, case.b, case.t, la, lp, ga, gp,
                                   metric="sqeuclidean", offset=0, need_q=True, need_r=True,
                                   need_t=True)

        for got, want in zip(grads(g_all_dirty, g_pos_dirty), grads(g_all_clean, g_pos_clean)):
            assert torch.equal(got, want)
            assert torch.isfinite(got).all()


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, True, True), (True, False, True)])
def test_need_flags(tb, h, need):
    case = h.make_case(dtype=torch.float64)
    g_all, g_pos = upstream(h, case)
    g_pos = torch.zeros_like(g_pos)  # no row without a positive matters here
    _, _, full = run(tb, case, "sqeuclidean", 0, g_all, g_pos)
    _, _, part = run(tb, case, "sqeuclidean", 0, g_all, g_pos, need=need)
    for wanted, got, want in zip(need, part, full):
        if wanted:
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
        else:
            assert got is None


def test_strided_inputs_and_int32_labels(tb, h):
    case = h.make_case(n=37, m=29, d=19, dtype=torch.float64)
    # q: every other column of a wider matrix; r: a transposed (D, M) matrix
    wide = torch.zeros(37, 38, dtype=torch.float64, device=h.device)
    wide[:, ::2] = case.q
    case.q = wide[:, ::2]
    case.r = case.r.T.contiguous().T
    case.a, case.b = case.a.to(torch.int32), case.b.to(torch.int32)
    assert not case.q.is_contiguous() and not case.r.is_contiguous()
    for metric in METRICS:
        check(tb, h, case, metric, 3, *F64[1:])


def test_fp32_dot_precisions(tb, h):
    # tf32 / tf32x3 change only the logit dot of fp32 inputs; the interpreter computes all
    # of them in fp32, a GPU rounds tf32 operands to 10 mantissa bits
    case = h.make_case(dtype=torch.float32)
    g_all, g_pos = upstream(h, case)
    _, _, exact = run(tb, case, "dot", None, g_all, g_pos, precision="ieee")
    for precision, atol, rtol in (("tf32x3", 2e-4, 2e-5), ("tf32", 5e-2, 2e-2)):
        _, _, got = run(tb, case, "dot", None, g_all, g_pos, precision=precision)
        for x, y in zip(got, exact):
            torch.testing.assert_close(x, y, atol=atol, rtol=rtol)


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"),
                    reason="torch without the fp32_precision API")
def test_default_precision_follows_torch(tb):
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    try:
        for setting, want in (("tf32", "tf32"), ("ieee", "ieee")):
            matmul.fp32_precision = setting
            assert tb._default_precision() == want
    finally:
        matmul.fp32_precision = saved


def test_bad_arguments(tb, h):
    case = h.make_case(n=3, m=3)
    with pytest.raises(ValueError, match="precision"):
        tb.lse_forward(case.q, case.r, case.a, case.b, case.t, metric="dot", offset=None,
                       precision="fp8")
    with pytest.raises(ValueError, match="metric"):
        tb.lse_forward(case.q, case.r, case.a, case.b, case.t, metric="cosine", offset=None)
