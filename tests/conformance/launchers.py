"""Launcher-level tests: ``lse_forward``, ``lse_backward``, ``probs_forward`` and
``probs_backward`` of one backend (``nbkernels.backends``) against the fp64 oracle."""
import copy
import math

import pytest
import torch

import launcher_cases as cases

from .harness import ALL, F64, INF, METRICS, NAN, OFFSETS, TOL
from .oracle import (_inf_as_nan, oracle_logits, oracle_lse, oracle_probs, oracle_rows,
                     upstream_lse, upstream_probs)

def _close_all(names, got, want, atol, rtol, dt_spread=0.0):
    """Each output against the oracle. dT = -1/T sum_ij ds_ij z_ij sums N M terms whose
    ds is exact only to a few ulps of the accumulation dtype (on GPUs the exponential is
    ``ex2.approx``: 2 ulp): its absolute tolerance also allows 8 ulps of ``dt_spread``,
    sum_ij |ds_ij z_ij| / T."""
    for name, x, y in zip(names, got, want):
        a = atol
        if name == "dt":
            a = atol + 8 * torch.finfo(cases.acc_dtype(x.dtype)).eps * dt_spread
        cases.close(x, y, a, rtol, msg=lambda m, name=name: f"{name}: {m}")


def dt_spread(case, metric, offset, g_all=None, g_pos=None, g_cls=None):
    """sum_ij |ds_ij z_ij| / T from the fp64 oracle: ds_ij = g_all p_ij + g_pos p+_ij
    (lse), or p_ij (G_{i,b_j} - sum_c G_ic yhat_ic) (probs)."""
    with torch.no_grad():
        q, r, t = (x.detach().double() for x in (case.q, case.r, case.t))
        z = oracle_logits(q, r, t, metric, offset)
        lse_all, lse_pos, yhat, _ = oracle_rows(q, r, case.a, case.b, t, case.c, metric, offset)
        finite = lambda x: torch.where(torch.isfinite(x), x, 0.0)  # noqa: E731
        p = torch.exp(z - finite(lse_all)[:, None])
        if g_cls is None:
            pos = case.a[:, None] == case.b[None, :]
            p_pos = torch.where(pos, torch.exp(z - finite(lse_pos)[:, None]), 0.0)
            ds = g_all.double()[:, None] * p + g_pos.double()[:, None] * p_pos
        else:
            g = g_cls.double()
            inside = (case.b >= 0) & (case.b < case.c)
            cols = g[:, case.b.clamp(0, case.c - 1)] if case.c else torch.zeros_like(z)
            g_ref = torch.where(inside[None, :], cols, 0.0)
            ds = p * (g_ref - (g * finite(yhat)).sum(1, keepdim=True))
        return float(finite(ds * finite(z)).abs().sum() / t)


def _check_dtypes(case, out, n_rows):
    acc = cases.acc_dtype(case.q.dtype)
    assert all(x.dtype == acc for x in out[:n_rows])
    assert tuple(g.dtype for g in out[n_rows:]) == (case.q.dtype, case.r.dtype, case.t.dtype)


def check_lse(launch, case, metric, offset, atol, rtol):
    """lse_forward / lse_backward against the oracle; returns the launcher's outputs."""
    want, (g_all, g_pos) = oracle_lse(case, metric, offset, *upstream_lse(case))
    got = launch.lse(case, metric, offset, g_all, g_pos)
    _check_dtypes(case, got, 2)
    shift = cases.row_shift(case, metric)
    _close_all(("lse_all", "lse_pos", "dq", "dr", "dt"),
               (got[0] + shift, got[1] + shift, *got[2:]), want, atol, rtol,
               dt_spread(case, metric, offset, g_all, g_pos))
    return got


def check_probs(launch, case, metric, offset, atol, rtol, g=None):
    """probs_forward / probs_backward against the oracle; returns the launcher's outputs."""
    g = upstream_probs(case) if g is None else g
    want = oracle_probs(case, metric, offset, g)
    got = launch.probs(case, metric, offset, g)
    assert got[0].shape == (case.q.shape[0], case.c)
    _check_dtypes(case, got, 2)
    _close_all(("yhat", "lse_all", "dq", "dr", "dt"),
               (got[0], got[1] + cases.row_shift(case, metric), *got[2:]), want, atol, rtol,
               dt_spread(case, metric, offset, g_cls=g))
    return got


def make_case(caps, **kw):
    return cases.make_case(caps.device, **kw)


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("check", [check_lse, check_probs], ids=["lse", "probs"])
def test_matches_oracle(launch, caps, dtype_tol, check, metric, offset):
    dtype, atol, rtol = dtype_tol
    check(launch, make_case(caps, dtype=dtype), metric, offset, atol, rtol)


@pytest.mark.parametrize("metric", METRICS)
def test_shapes(launch, caps, shape_tol, shape, metric):
    n, m, d, offset = shape
    dtype, atol, rtol = shape_tol
    # logits of a few units whatever D (fp32 dT sums N*M terms ds * logit)
    case = make_case(caps, n=n, m=m, d=d, dtype=dtype, scale=min(0.5, 2.5 / math.sqrt(d)))
    check_lse(launch, case, metric, offset, atol, rtol)
    if metric == "dot":  # probs on one metric here, on both in test_matches_oracle
        check_probs(launch, case, metric, offset, atol, rtol)


def test_many_tiles(launch, caps, coarse_tol):
    n, m, d = caps.large
    dtype, atol, rtol = coarse_tol
    case = make_case(caps, n=n, m=m, d=d, c=20, dtype=dtype, scale=0.2, temperature=0.3)
    check_lse(launch, case, "sqeuclidean", 5, atol, rtol)
    check_probs(launch, case, "dot", None, atol, rtol)


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "two-sided"])
@pytest.mark.parametrize("offset", [0, None])
@pytest.mark.parametrize("metric", METRICS)
def test_batch_against_itself(launch, caps, shape_tol, metric, offset, symmetric):
    """``r is q`` with one label vector (self excluded or not). With ``symmetric=True`` the
    launchers may score the symmetric logits once, and ``dq`` is then the whole gradient
    (``dr`` None); without it they compute dq and dr. Against the oracle's dq + dr on a
    copy of the rows, on one tile and across tile edges."""
    dtype, atol, rtol = shape_tol
    for n in (21, caps.large[0]):
        case = make_case(caps, n=n, m=n, d=7, c=4, dtype=dtype, scale=0.5, temperature=0.4)
        case.r, case.b = case.q, case.a
        want, (g_all, g_pos) = oracle_lse(case, metric, offset, *upstream_lse(case))
        got = launch.lse(case, metric, offset, g_all, g_pos, symmetric=symmetric)
        dq, dr = got[2], got[3]
        assert symmetric or dr is not None, "without symmetric=True dr comes back on its own"
        whole = dq if dr is None else dq + dr
        shift = cases.row_shift(case, metric)
        _close_all(("lse_all", "lse_pos", "dx", "dt"),
                   (got[0] + shift, got[1] + shift, whole, got[4]),
                   (want[0], want[1], want[2] + want[3], want[4]), atol, rtol,
                   dt_spread(case, metric, offset, g_all, g_pos))


def test_symmetric_flag_is_checked(launch, caps):
    """``symmetric=True`` where the references are not the queries, or with an offset
    other than None or 0, is refused (forward and backward) instead of answering for
    another problem."""
    case = make_case(caps, n=9, m=9, d=5, c=3, dtype=caps.exact)
    batch = make_case(caps, n=9, m=9, d=5, c=3, dtype=caps.exact)
    batch.r, batch.b = batch.q, batch.a
    g = upstream_lse(case)
    for bad, offset in ((case, 0), (batch, 2)):
        with pytest.raises(ValueError, match="symmetric=True needs the batch against itself"):
            launch.lse(bad, "sqeuclidean", offset, *g, symmetric=True)
        la, lp = launch.lse_forward(bad.q, bad.r, bad.a, bad.b, bad.t, metric="sqeuclidean",
                                    offset=offset)
        with pytest.raises(ValueError, match="symmetric=True needs the batch against itself"):
            launch.lse_backward(bad.q, bad.r, bad.a, bad.b, bad.t, la, lp, *g,
                                metric="sqeuclidean", offset=offset, need_q=True, need_r=True,
                                need_t=True, symmetric=True)


@pytest.mark.parametrize("metric", METRICS)
def test_label_extremes(launch, caps, metric):
    atol, rtol = TOL[caps.exact]
    n, m = 19, 23
    # all labels distinct: no row has a positive
    case = make_case(caps, n=n, m=m, dtype=caps.exact, q_labels=torch.arange(n),
                     r_labels=torch.arange(n, n + m))
    lse_pos = check_lse(launch, case, metric, None, atol, rtol)[1]
    assert torch.isneginf(lse_pos).all()
    # one class: every reference is a positive
    zeros = torch.zeros(n, dtype=torch.int64)
    case = make_case(caps, n=n, m=n, dtype=caps.exact, q_labels=zeros, r_labels=zeros)
    for offset in (None, 0):
        lse_all, lse_pos = check_lse(launch, case, metric, offset, atol, rtol)[:2]
        torch.testing.assert_close(lse_pos, lse_all, atol=atol, rtol=rtol)


@pytest.mark.parametrize("c", [1, 33, 100, 4096])
def test_class_counts(launch, caps, c):
    # C = 33: a partial class tile after full ones; C = 4096: most tiles without references
    atol, rtol = TOL[caps.exact]
    n, m = 15, 70
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, c, (n,), generator=g)
    b = torch.randint(0, c, (m,), generator=g)
    b[:3] = torch.tensor([0, c - 1, c // 2])  # the first and last classes are present
    a[:2] = b[3:5]  # some rows have a positive even with many classes
    case = make_case(caps, n=n, m=m, d=9, c=c, dtype=caps.exact, q_labels=a, r_labels=b)
    yhat = check_probs(launch, case, "sqeuclidean", 0, atol, rtol)[0]
    torch.testing.assert_close(yhat.sum(1).double(), torch.ones(n, dtype=F64, device=yhat.device),
                               atol=atol, rtol=0)
    if c <= 100:
        check_lse(launch, case, "sqeuclidean", 0, atol, rtol)


def test_rows_without_terms(launch, caps):
    # rows 0..2 have no positive (label 9 is absent from the references); with N = M = 1
    # and offset 0, query 0 has no term at all. An upstream on such rows (even inf)
    # contributes nothing.
    dtype = caps.exact
    for n, m in ((11, 13), (1, 1)):
        a = torch.tensor([9, 9, 9] + [0, 1] * 4)[:n]
        case = make_case(caps, n=n, m=m, c=2, dtype=dtype, q_labels=a)
        la, lp = launch.lse_forward(case.q, case.r, case.a, case.b, case.t,
                                    metric="sqeuclidean", offset=0)
        g_all, g_pos = upstream_lse(case)
        clean = (torch.where(torch.isinf(la), 0.0, g_all), torch.where(torch.isinf(lp), 0.0, g_pos))
        dirty = (torch.where(torch.isinf(la), 1e30, g_all),
                 torch.where(torch.isinf(lp), INF, g_pos))
        grads = [launch.lse_backward(case.q, case.r, case.a, case.b, case.t, la, lp, *g,
                                     metric="sqeuclidean", offset=0, need_q=True, need_r=True,
                                     need_t=True) for g in (dirty, clean)]
        for got, want in zip(*grads):
            assert torch.equal(got, want) and torch.isfinite(got).all()
    # no reference for the single query: yhat NaN, lse -inf, no gradient whatever G is
    case = make_case(caps, n=1, m=1, d=4, c=3, dtype=dtype)
    g = torch.full((1, 3), 5.0, dtype=cases.acc_dtype(dtype), device=caps.device)
    yhat, lse_all, *grads = launch.probs(case, "sqeuclidean", 0, g)
    assert torch.isnan(yhat).all() and torch.isneginf(lse_all).all()
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, True, True), (True, False, True)])
def test_need_flags(launch, caps, need):
    atol, rtol = TOL[caps.exact]
    case = make_case(caps, n=13, m=11, d=5, dtype=caps.exact)
    g_all, g_pos = upstream_lse(case)
    g_pos = torch.zeros_like(g_pos)  # no row without a positive matters here
    g = upstream_probs(case)
    for run in (lambda need: launch.lse(case, "sqeuclidean", 0, g_all, g_pos, need)[2:],
                lambda need: launch.probs(case, "sqeuclidean", None, g, need)[2:]):
        for wanted, got, want in zip(need, run(need), run(ALL)):
            if wanted:
                torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
            else:
                assert got is None


def test_strided_inputs_and_int32_labels(launch, caps, shape_tol):
    dtype, atol, rtol = shape_tol
    case = make_case(caps, n=37, m=29, d=19, dtype=dtype)
    # q: every other column of a wider matrix; r: a transposed (D, M) matrix
    wide = torch.zeros(37, 38, dtype=dtype, device=caps.device)
    wide[:, ::2] = case.q
    case.q = wide[:, ::2]
    case.r = case.r.T.contiguous().T
    case.a, case.b = case.a.to(torch.int32), case.b.to(torch.int32)
    assert not case.q.is_contiguous() and not case.r.is_contiguous()
    for metric in METRICS:
        check_lse(launch, case, metric, 3, atol, rtol)
    # G as an expanded (stride 0) or transposed tensor, as autograd may hand it over
    g_rows = torch.randn(case.c, dtype=cases.acc_dtype(dtype), device=caps.device)
    for g in (g_rows.expand(37, case.c), upstream_probs(case).T.contiguous().T):
        check_probs(launch, case, "sqeuclidean", 0, atol, rtol, g=g)


def test_labels_outside_classes(launch, caps):
    # labels >= C or < 0 count in lse_all (the softmax) but in no class of yhat
    if not caps.loose_labels:
        pytest.skip(f"backend {caps.name!r} takes labels in [0, C) only (as the API checks)")
    atol, rtol = TOL[caps.exact]
    case = make_case(caps, n=13, m=17, d=5, c=4, dtype=caps.exact)
    case.b = case.b.clone()
    case.b[:3] = torch.tensor([4, 9, -1])
    check_probs(launch, case, "dot", 1, atol, rtol)


@pytest.mark.parametrize("n, m", [(0, 7), (6, 0)])
def test_empty_launchers(launch, caps, n, m):
    # no query: empty rows; no reference: lse -inf, yhat NaN. Gradients: zeros.
    atol, rtol = TOL[caps.exact]
    case = make_case(caps, n=n, m=m, d=5, c=3, dtype=caps.exact)
    lse_all, lse_pos, *grads = check_lse(launch, case, "sqeuclidean", None, atol, rtol)
    assert lse_all.shape == lse_pos.shape == (n,) and torch.isneginf(lse_all).all()
    grads += check_probs(launch, case, "dot", None, atol, rtol)[2:]
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))


def test_bad_metric(launch, caps):
    # cosine reaches the launchers as "dot" on normalized rows, never by name
    case = make_case(caps, n=3, m=3)
    with pytest.raises(ValueError, match="metric"):
        launch.lse_forward(case.q, case.r, case.a, case.b, case.t, metric="cosine", offset=None)
    with pytest.raises(ValueError, match="metric"):
        launch.probs_forward(case.q, case.r, case.b, case.t, 3, metric="cosine", offset=None)


def test_extreme_temperature(launch, caps, exact_tol):
    # T = 1e-4 with squared distances ~ 3000: logits ~ -3e7. Positives sit far below the
    # row max; with one shared running max their exp would underflow to lse_pos = -inf.
    dtype, _, rtol = exact_tol
    case = make_case(caps, n=23, m=31, d=19, c=4, dtype=dtype, scale=9.0, temperature=1e-4)
    g_all, g_pos = upstream_lse(case)
    (ref_all, ref_pos, *ref_grads), (g_all, g_pos) = oracle_lse(case, "sqeuclidean", 0,
                                                                g_all, g_pos)
    has_pos = torch.isfinite(ref_pos)
    assert has_pos.sum() > 15 and ((ref_all - ref_pos)[has_pos] > 1e4).sum() >= 5
    lse_all, lse_pos, *grads = launch.lse(case, "sqeuclidean", 0, g_all, g_pos)
    shift = cases.row_shift(case, "sqeuclidean")
    assert torch.isfinite(lse_all).all() and torch.equal(torch.isfinite(lse_pos), has_pos)
    cases.close(lse_all + shift, ref_all, 0, rtol)
    cases.close((lse_pos + shift)[has_pos], ref_pos[has_pos], 0, rtol)
    assert all(torch.isfinite(x).all() for x in grads)
    if dtype == F64:  # fp32 rounds logits of 3e7 by ~2: p is off by a factor up to e^2
        for x, y in zip(grads, ref_grads):
            # fp64 logits of 3e7 carry ~1e-8 absolute rounding, so p a relative 1e-8
            scale = y.abs().max()
            cases.close(x / scale, y / scale, 1e-8, 1e-6)
    yhat = launch.probs_forward(case.q, case.r, case.b, case.t, case.c, metric="sqeuclidean",
                                offset=0)[0]
    assert torch.isfinite(yhat).all()
    torch.testing.assert_close(yhat.sum(1).double(), torch.ones(23, dtype=F64, device=yhat.device),
                               atol=1e-5, rtol=0)
    # T = 1e4: every logit near 0, the softmax near uniform
    case = make_case(caps, n=23, m=31, d=19, c=4, dtype=dtype, temperature=1e4)
    atol, rtol = TOL[dtype]
    check_lse(launch, case, "sqeuclidean", 0, atol, rtol)
    check_probs(launch, case, "dot", None, atol, rtol)


@pytest.mark.parametrize("metric", METRICS)
def test_nan_propagates(launch, caps, exact_tol, metric):
    # max / fmax drop NaN: NaN must still reach the lse through the sum. A NaN query
    # poisons its row; a NaN reference every row but the one that excludes it.
    dtype, atol, rtol = exact_tol
    case = make_case(caps, dtype=dtype)
    case.q[10, 2] = NAN
    case.r[7, 0] = NAN
    for offset in (None, 3):
        g_all, g_pos = upstream_lse(case)
        lse_all, lse_pos, dq, dr, dt = launch.lse(case, metric, offset, g_all, g_pos)
        (want_all, want_pos, *_), _ = oracle_lse(case, metric, offset, g_all, g_pos)
        shift = cases.row_shift(case, metric)
        cases.close(lse_all + shift, want_all, atol, rtol)
        cases.close(lse_pos + shift, want_pos, atol, rtol)
        assert torch.isnan(lse_all).sum() == (37 if offset is None else 36)
        yhat, lse2 = launch.probs_forward(case.q, case.r, case.b, case.t, case.c, metric=metric,
                                          offset=offset)
        assert torch.equal(torch.isnan(lse2), torch.isnan(lse_all))
        assert torch.isnan(yhat).all(1).equal(torch.isnan(lse_all))
        assert torch.isnan(yhat).any(1).equal(torch.isnan(lse_all))
        assert torch.isnan(dq).any() and torch.isnan(dr).any() and torch.isnan(dt)


@pytest.mark.parametrize("metric", METRICS)
def test_points_at_infinity(launch, caps, metric):
    # reference 5 and query 4 at infinity (entries +inf and -inf). sqeuclidean: the
    # reference has weight 0 and no gradient, the query a NaN row and no gradient; the
    # oracle gives every other row as without them. dot: the direct formula (forward).
    atol, rtol = TOL[caps.exact]
    case = make_case(caps, dtype=caps.exact)
    case.r[5, 1], case.r[5, 3] = INF, -INF
    case.q[4, 2] = INF
    oracle_case = case
    if metric == "dot" and caps.fp32_dot_inf_is_nan:
        oracle_case = copy.copy(case)
        oracle_case.q, oracle_case.r = _inf_as_nan(case.q), _inf_as_nan(case.r)
    for offset in (None, 3):
        g_all, g_pos = upstream_lse(case)
        (want_lse, (g_all, g_pos)), want_probs = (
            oracle_lse(oracle_case, metric, offset, g_all, g_pos),
            oracle_probs(oracle_case, metric, offset, upstream_probs(case)))
        got_lse = launch.lse(case, metric, offset, g_all, g_pos)
        got_probs = launch.probs(case, metric, offset, upstream_probs(case))
        shift = cases.row_shift(case, metric)
        got_lse = (got_lse[0] + shift, got_lse[1] + shift, *got_lse[2:])
        got_probs = (got_probs[0], got_probs[1] + shift, *got_probs[2:])
        k = 5 if metric == "sqeuclidean" else 2
        _close_all(("lse_all", "lse_pos", "dq", "dr", "dt")[:k], got_lse, want_lse, atol, rtol)
        _close_all(("yhat", "lse_all", "dq", "dr", "dt")[:k], got_probs, want_probs, atol, rtol)
        if metric == "sqeuclidean":
            others = torch.arange(case.q.shape[0], device=caps.device) != 4
            assert torch.isnan(got_lse[0][4]) and torch.isfinite(got_lse[0][others]).all()
            for dq, dr in (got_lse[2:4], got_probs[2:4]):
                assert not dq[4].any() and not dr[5].any()


def test_deterministic(launch, caps, coarse_tol):
    if not caps.deterministic:
        pytest.skip(f"backend {caps.name!r} does not claim bitwise determinism")
    n, m, d = caps.large
    case = make_case(caps, n=n // 2 + 1, m=m // 2 + 1, d=d, c=11, dtype=coarse_tol[0],
                     scale=0.2, temperature=0.1)
    g_all, g_pos = upstream_lse(case)
    gp = upstream_probs(case)
    for run in (lambda: launch.lse(case, "sqeuclidean", 0, g_all, g_pos),
                lambda: launch.probs(case, "dot", None, gp)):
        first = run()
        for a, b in zip(run(), first):
            assert torch.equal(a, b)
