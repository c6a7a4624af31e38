"""What only the triton backend has: the ``precision`` of fp32 logit dots (tf32, tf32x3)
and its default, which follows torch's matmul setting; launchers that take C = 0."""
import pytest
import torch

from conformance import TOL, Launchers, check_probs, upstream_lse


def test_fp32_dot_precisions(tb, h):
    # tf32 / tf32x3 change only the logit dot of fp32 inputs; the interpreter computes all
    # of them in fp32, a GPU rounds tf32 operands to 10 mantissa bits
    case = h.make_case(dtype=torch.float32)
    g_all, g_pos = upstream_lse(case)
    exact = Launchers(tb, precision="ieee").lse(case, "dot", None, g_all, g_pos)[2:]
    for precision, atol, rtol in (("tf32x3", 2e-4, 2e-5), ("tf32", 5e-2, 2e-2)):
        got = Launchers(tb, precision=precision).lse(case, "dot", None, g_all, g_pos)[2:]
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


def test_bad_precision(tb, h):
    case = h.make_case(n=3, m=3)
    with pytest.raises(ValueError, match="precision"):
        tb.lse_forward(case.q, case.r, case.a, case.b, case.t, metric="dot", offset=None,
                       precision="fp8")


def test_no_classes(tb, h):
    # C = 0 (the API asks for C >= 1): yhat is empty, lse_all still sums every reference
    zeros = torch.zeros(11, dtype=torch.int64)
    case = h.make_case(n=9, m=11, d=5, c=0, dtype=torch.float64, q_labels=zeros[:9],
                       r_labels=zeros)
    yhat, _, *grads = check_probs(Launchers(tb, precision="ieee"), case, "dot", None,
                                  *TOL[torch.float64])
    assert yhat.shape == (9, 0)
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))
