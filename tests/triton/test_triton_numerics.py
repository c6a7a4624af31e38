"""NaN propagation, extreme temperatures, determinism and fp64 gradcheck."""
import pytest
import torch

from nbkernels.backends import reference

METRICS = ["sqeuclidean", "dot"]
ALL = dict(need_q=True, need_r=True, need_t=True)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_propagates(tb, h, dtype, metric):
    # tl.max / tl.maximum drop NaN (fmax): NaN must still reach the lse through the sum.
    # A NaN query poisons its row; a NaN reference every row but the one that excludes it.
    case = h.make_case(dtype=dtype)
    case.q[10, 2] = float("nan")
    case.r[7, 0] = float("nan")
    for offset in (None, 3):
        lse_all, lse_pos = tb.lse_forward(case.q, case.r, case.a, case.b, case.t, metric=metric,
                                          offset=offset)
        ref_all, ref_pos = reference.neighbor_lse(case.q.double(), case.r.double(), case.a, case.b,
                                                  case.t.double(), metric=metric, offset=offset)
        shift = h.row_shift(case, metric)
        assert torch.equal(torch.isnan(lse_all + shift), torch.isnan(ref_all))
        assert torch.equal(torch.isnan(lse_pos + shift), torch.isnan(ref_pos))
        assert torch.isnan(lse_all).sum() == (37 if offset is None else 36)
        yhat, lse2 = tb.probs_forward(case.q, case.r, case.b, case.t, case.c, metric=metric,
                                      offset=offset)
        assert torch.equal(torch.isnan(lse2), torch.isnan(lse_all))
        assert torch.isnan(yhat).any(1).equal(torch.isnan(lse_all))
        g = torch.ones_like(lse_all)
        dq, dr, dt = tb.lse_backward(case.q, case.r, case.a, case.b, case.t, lse_all, lse_pos, g,
                                     -g, metric=metric, offset=offset, **ALL)
        assert torch.isnan(dq).any() and torch.isnan(dr).any() and torch.isnan(dt)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("offset", [None, 0, -2])
def test_positives_underflow_fallback_in_some_rows_only(tb, h, dtype, rtol, metric, offset):
    """The forward takes the positives' sum from the shared exponentials, and recomputes
    only the rows whose positives underflow against the row max. Rows 3k+1 here (outside
    rows 16..31): their
    positives (class 2) sit > 800 nats below the row max (exp underflows in fp32 and
    fp64); the other rows keep the one-pass value. Several query blocks (16 rows each
    under the interpreter), one without any flagged row; the exact pass takes the flagged
    rows first, in blocks of its own, with the self pair j = i + offset masked anywhere."""
    n, m, d = 45, 37, 5
    g = torch.Generator().manual_seed(11)
    q = torch.randn(n, d, generator=g, dtype=torch.float64).abs()
    r = torch.randn(m, d, generator=g, dtype=torch.float64) * 0.1
    a = torch.randint(0, 2, (n,), generator=g)
    b = torch.randint(0, 2, (m,), generator=g)
    b[5:8] = 2  # class 2: far from every query
    r[5:8] = 25.0 if metric == "sqeuclidean" else -25.0
    flagged = [i for i in range(1, n, 3) if not 16 <= i < 32]  # block 16..31: none
    a[flagged] = 2
    t = torch.tensor(0.05, dtype=torch.float64)
    case = h.make_case(n=n, m=m, d=d, dtype=dtype)
    case.q, case.r, case.a, case.b = q.to(h.device, dtype), r.to(h.device, dtype), a, b
    case.t = t.to(h.device, h.acc_dtype(dtype))
    lse_all, lse_pos = tb.lse_forward(case.q, case.r, case.a, case.b, case.t, metric=metric,
                                      offset=offset)
    ref_all, ref_pos = reference.neighbor_lse(case.q.double(), case.r.double(), a, b, t,
                                              metric=metric, offset=offset)
    gap = ref_all - ref_pos
    assert (gap[flagged] > 800).all()  # exp(-gap) underflows against the shared max
    others = torch.ones(n, dtype=torch.bool)
    others[flagged] = False
    assert (gap[others] < 50).all()
    shift = h.row_shift(case, metric)
    torch.testing.assert_close((lse_all + shift).double(), ref_all, atol=0, rtol=rtol)
    torch.testing.assert_close((lse_pos + shift).double(), ref_pos, atol=0, rtol=rtol)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_extreme_temperature_stays_finite(tb, h, dtype, rtol):
    # T = 1e-4 with squared distances ~ 1.5e4: logits ~ -1e8. Positives sit far below the
    # row max; with one shared running max their exp would underflow to lse_pos = -inf.
    case = h.make_case(n=23, m=31, d=19, c=4, dtype=dtype, scale=20.0, temperature=1e-4)
    lse_all, lse_pos = tb.lse_forward(case.q, case.r, case.a, case.b, case.t,
                                      metric="sqeuclidean", offset=0)
    ref_all, ref_pos = reference.neighbor_lse(case.q.double(), case.r.double(), case.a, case.b,
                                              case.t.double(), metric="sqeuclidean", offset=0)
    has_pos = torch.isfinite(ref_pos)
    assert has_pos.sum() > 15 and ((ref_all - ref_pos)[has_pos] > 1e5).sum() >= 5
    shift = h.row_shift(case, "sqeuclidean")
    assert torch.isfinite(lse_all).all() and torch.equal(torch.isfinite(lse_pos), has_pos)
    torch.testing.assert_close((lse_all + shift).double(), ref_all, atol=0, rtol=rtol)
    torch.testing.assert_close((lse_pos + shift).double()[has_pos], ref_pos[has_pos], atol=0,
                               rtol=rtol)
    g = has_pos.to(lse_all.dtype)
    grads = tb.lse_backward(case.q, case.r, case.a, case.b, case.t, lse_all, lse_pos, g, -g,
                            metric="sqeuclidean", offset=0, **ALL)
    assert all(torch.isfinite(x).all() for x in grads)
    yhat, _ = tb.probs_forward(case.q, case.r, case.b, case.t, case.c, metric="sqeuclidean",
                               offset=0)
    torch.testing.assert_close(yhat.sum(1), torch.ones_like(yhat[:, 0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("metric", METRICS)
def test_backward_is_deterministic(tb, h, metric):
    case = h.make_case(dtype=torch.float32)
    lse_all, lse_pos = tb.lse_forward(case.q, case.r, case.a, case.b, case.t, metric=metric,
                                      offset=0)
    g = torch.linspace(-1, 1, 37, device=h.device)
    g_pos = torch.where(torch.isinf(lse_pos), 0.0, -g)
    first = tb.lse_backward(case.q, case.r, case.a, case.b, case.t, lse_all, lse_pos, g, g_pos,
                            metric=metric, offset=0, **ALL)
    second = tb.lse_backward(case.q, case.r, case.a, case.b, case.t, lse_all, lse_pos, g, g_pos,
                             metric=metric, offset=0, **ALL)
    yhat, lse = tb.probs_forward(case.q, case.r, case.b, case.t, case.c, metric=metric, offset=0)
    gc = torch.ones_like(yhat).cumsum(1)
    third = tb.probs_backward(case.q, case.r, case.b, case.t, yhat, lse, gc, metric=metric,
                              offset=0, **ALL)
    fourth = tb.probs_backward(case.q, case.r, case.b, case.t, yhat, lse, gc, metric=metric,
                               offset=0, **ALL)
    for x, y in zip(first + third, second + fourth):
        assert torch.equal(x, y)


class _LSE(torch.autograd.Function):
    """(lse_all, lse_pos) with the row constant restored, as nbkernels.autograd does."""

    @staticmethod
    def forward(ctx, q, r, t, a, b, metric, offset, tb):
        lse_all, lse_pos = tb.lse_forward(q, r, a, b, t, metric=metric, offset=offset)
        ctx.save_for_backward(q, r, t, a, b, lse_all, lse_pos)
        ctx.args = metric, offset, tb
        shift = q.pow(2).sum(1) / t if metric == "sqeuclidean" else torch.zeros_like(lse_all)
        return lse_all - shift, lse_pos - shift

    @staticmethod
    def backward(ctx, g_all, g_pos):
        q, r, t, a, b, lse_all, lse_pos = ctx.saved_tensors
        metric, offset, tb = ctx.args
        dq, dr, dt = tb.lse_backward(q, r, a, b, t, lse_all, lse_pos, g_all, g_pos,
                                     metric=metric, offset=offset, need_q=ctx.needs_input_grad[0],
                                     need_r=ctx.needs_input_grad[1], need_t=ctx.needs_input_grad[2])
        return dq, dr, dt, None, None, None, None, None


class _Probs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, r, t, b, c, metric, offset, tb):
        yhat, lse_all = tb.probs_forward(q, r, b, t, c, metric=metric, offset=offset)
        ctx.save_for_backward(q, r, t, b, yhat, lse_all)
        ctx.args = metric, offset, tb
        return yhat

    @staticmethod
    def backward(ctx, g):
        q, r, t, b, yhat, lse_all = ctx.saved_tensors
        metric, offset, tb = ctx.args
        dq, dr, dt = tb.probs_backward(q, r, b, t, yhat, lse_all, g, metric=metric, offset=offset,
                                       need_q=True, need_r=True, need_t=True)
        return dq, dr, dt, None, None, None, None, None


@pytest.mark.parametrize("metric, offset", [("sqeuclidean", 0), ("dot", None)])
def test_gradcheck_fp64(tb, h, metric, offset):
    # every row has a positive (lse_pos finite), labels 0 / 1 alternate
    labels = torch.arange(6) % 2
    case = h.make_case(n=5, m=6, d=3, dtype=torch.float64, q_labels=labels[:5], r_labels=labels)
    inputs = [x.clone().requires_grad_() for x in (case.q, case.r, case.t)]
    assert torch.autograd.gradcheck(
        lambda q, r, t: _LSE.apply(q, r, t, case.a, case.b, metric, offset, tb), inputs)
    assert torch.autograd.gradcheck(
        lambda q, r, t: _Probs.apply(q, r, t, case.b, 3, metric, offset, tb), inputs)


def test_is_available(tb):
    assert tb.is_available("cpu") or tb.is_available("cuda")
    assert not tb.is_available("meta")


def _grads_close(h, got, want, scale):
    """Gradients of a loss whose upstream is scaled by ``scale``, compared in units of scale.

    fp16 gradients are returned in fp16: below its normal range (6.1e-5) they are rounded
    to multiples of 2^-24, an absolute error of 2^-25 on top of the usual tolerance.
    """
    for x, y in zip(got, want):
        atol = 2e-2 + (2.0 ** -25 / scale if x.dtype == torch.float16 else 0.0)
        h.close(x.double() / scale, y / scale, atol, 1e-2)


@pytest.mark.parametrize("scale", [1e-5, 1e-6])
@pytest.mark.parametrize("metric", METRICS)
def test_fp16_small_upstream(tb, h, metric, scale):
    # reduction="mean" at large N: upstream g ~ 1/N, and ds = g (p - p+) ~ g / M falls
    # below fp16's normal range before the gradient dot. The kernels scale ds by a power
    # of two before the cast and undo it after; dT never rounds ds (fp32 throughout).
    case = h.make_case(dtype=torch.float16)
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(37, generator=gen, dtype=torch.float64).float().to(h.device) * scale
    la, lp = tb.lse_forward(case.q, case.r, case.a, case.b, case.t, metric=metric, offset=0)
    g_pos = torch.where(torch.isinf(lp), 0.0, -g)
    *_, rdq, rdr, rdt = h.ref_lse(case, metric, 0, g, g_pos)
    got = tb.lse_backward(case.q, case.r, case.a, case.b, case.t, la, lp, g, g_pos, metric=metric,
                          offset=0, **ALL)
    _grads_close(h, got, (rdq, rdr, rdt), scale)
    gc = torch.randn(37, case.c, generator=gen, dtype=torch.float64).float().to(h.device) * scale
    *_, rdq, rdr, rdt = h.ref_probs(case, metric, 0, gc)
    yhat, lse = tb.probs_forward(case.q, case.r, case.b, case.t, case.c, metric=metric, offset=0)
    got = tb.probs_backward(case.q, case.r, case.b, case.t, yhat, lse, gc, metric=metric,
                            offset=0, **ALL)
    _grads_close(h, got, (rdq, rdr, rdt), scale)
