"""The conformance suite: one set of tests that every fused backend must pass.

A plain module, not a conftest: a thin test module binds it to one backend by defining

* ``CAPS``, a :class:`Capabilities` (the backend's name, device, dtypes, ...), and
* a ``backend`` fixture that returns the launcher module, ready to run,

then ``from conformance import *`` (the tests, the ``caps`` / ``launch`` fixtures and the
``pytest_generate_tests`` hook that parametrizes them from ``CAPS``). The bindings are
tests/test_conformance_torch.py, tests/triton/test_conformance_triton.py and
tests/cuda/test_conformance_cuda.py.

Two levels are checked: the launchers (``lse_forward``, ``lse_backward``,
``probs_forward``, ``probs_backward``; see ``nbkernels.backends``) and the public API
(``nca_loss``, ``soft_knn_predict``, ``prototype_loss`` with ``backend=<name>``, through
``nbkernels.autograd``). The oracle is written here, independently of
``nbkernels.backends.reference``: the direct differences ``-||q_i - r_j||^2 / T`` (or the
dot products) in fp64, a masked logsumexp, ``yhat`` by a one-hot matmul, and gradients by
autograd on that formula, on the same (rounded) inputs as the backend. Non-finite inputs
follow the spec in ``reference``'s docstring, implemented here on its own.
"""
import copy
import dataclasses
import functools
import math
import warnings

import pytest
import torch

import nbkernels
from helpers import assert_match
from helpers import run as api_run
import launcher_cases as cases

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16

# (dtype, atol, rtol) for every output and gradient, against the fp64 oracle on the same
# rounded inputs. fp32: dT sums N*M terms ds * logit of both signs (seen: 1e-4 on
# |dT| ~ 10). fp16 / bf16: the kernels round ds to the input dtype for the gradient
# products and return gradients in that dtype (seen in fp16: 1.1e-2 on |grad| ~ 25; bf16
# has 3 fewer mantissa bits).
TOLERANCES = [
    (F64, 1e-10, 1e-10),
    (F32, 2e-4, 2e-5),
    (F16, 2e-2, 1e-2),
    (BF16, 1.5e-1, 5e-2),
]
TOL = {dtype: (atol, rtol) for dtype, atol, rtol in TOLERANCES}

METRICS = ["sqeuclidean", "dot"]          # the launchers' metrics
API_METRICS = ["sqeuclidean", "cosine", "dot"]
OFFSETS = [None, 0, 3, -2]
ALL = (True, True, True)
NAN, INF = float("nan"), float("inf")

# (n, m, d, offset): N or M = 1, D = 1, odd sizes, several feature chunks (33, 130);
# N = M = 1 with offset 0 has no term at all
SHAPES = [(1, 1, 1, 0), (1, 1, 3, None), (1, 29, 3, 0), (37, 1, 5, 0), (16, 16, 5, None),
          (17, 40, 5, 0), (21, 18, 33, 0), (21, 18, 130, None), (37, 29, 19, 3)]


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a backend claims; the suite parametrizes and checks accordingly.

    name: ``backend=`` for the public API. device: where its tensors live.
    dtypes: the dtypes its launchers run (their own kernels). fp64: "native", or
    "fallback" (fp64 inputs run on backend "torch", with a warning). precision: the
    launchers take ``precision=`` (the suite passes "ieee"). deterministic: two runs are
    bitwise equal. shape_dtypes: the dtypes of the shape tests (default: the most exact).
    tile_shapes: extra (n, m, d, offset) that cross this backend's tile edges.
    large: (n, m, d) spanning many tiles. api_backends: the ``backend=`` values of the
    public-API tests (default: ``(name,)``). loose_labels: probs_forward takes labels
    outside [0, C) (they count in lse_all, in no class). emulated: run by an
    interpreter or emulator (slow): gradcheck runs in fast mode. fp32_dot_inf_is_nan: see
    below.
    """
    name: str
    device: str
    dtypes: tuple
    fp64: str = "native"
    precision: bool = False
    deterministic: bool = True
    shape_dtypes: tuple = ()
    tile_shapes: tuple = ()
    large: tuple = (60, 70, 40)
    api_backends: tuple = ()
    loose_labels: bool = True
    emulated: bool = False
    # fp32 as 3xTF32 splits each entry into a high and a low part: inf - inf = NaN, so under
    # "dot" an infinite entry acts as NaN (documented for backend "cuda")
    fp32_dot_inf_is_nan: bool = False

    @property
    def exact(self):
        """The most exact dtype the launchers run themselves."""
        return F64 if F64 in self.dtypes else F32


def _tols(dtypes):
    """The (dtype, atol, rtol) rows of TOLERANCES for ``dtypes``, as pytest params."""
    return [pytest.param((d, a, r), id=str(d).removeprefix("torch.")) for d, a, r in TOLERANCES
            if d in dtypes]


def pytest_generate_tests(metafunc):
    """Parametrize from the binding module's ``CAPS``: ``dtype_tol`` over its dtypes,
    ``shape_tol`` over its shape dtypes, ``exact_tol`` over fp64 / fp32, ``coarse_tol`` over
    fp32 and its least precise dtype, ``shape`` over SHAPES and its tile shapes,
    ``api_backend`` over its public-API backends."""
    caps = getattr(metafunc.module, "CAPS", None)
    if caps is None:
        return
    names = metafunc.fixturenames
    for arg, dtypes in (("dtype_tol", caps.dtypes),
                        ("shape_tol", caps.shape_dtypes or (caps.exact,)),
                        ("exact_tol", [d for d in caps.dtypes if d in (F64, F32)]),
                        ("coarse_tol", [F32, caps.dtypes[-1]])):
        if arg in names:
            metafunc.parametrize(arg, _tols(dtypes))
    if "shape" in names:
        shapes = SHAPES + list(caps.tile_shapes)
        metafunc.parametrize("shape", shapes, ids=["x".join(map(str, s)) for s in shapes])
    if "api_backend" in names:
        metafunc.parametrize("api_backend", caps.api_backends or (caps.name,))


@pytest.fixture
def caps(request, backend):
    """The binding's CAPS; requests ``backend``, which readies it (e.g. the emulator)."""
    return request.module.CAPS


class Launchers:
    """A backend's launchers with its extra keyword arguments bound (``precision``)."""

    def __init__(self, module, **extra):
        self.module, self.extra = module, extra

    def __getattr__(self, name):
        return functools.partial(getattr(self.module, name), **self.extra)

    def lse(self, case, metric, offset, g_all, g_pos, need=ALL):
        """(lse_all, lse_pos, dq, dr, dt), the lse shifted as the launchers return it."""
        lse_all, lse_pos = self.lse_forward(case.q, case.r, case.a, case.b, case.t,
                                            metric=metric, offset=offset)
        grads = self.lse_backward(case.q, case.r, case.a, case.b, case.t, lse_all, lse_pos,
                                  g_all, g_pos, metric=metric, offset=offset, need_q=need[0],
                                  need_r=need[1], need_t=need[2])
        return (lse_all, lse_pos, *grads)

    def probs(self, case, metric, offset, g, need=ALL):
        """(yhat, lse_all, dq, dr, dt)."""
        yhat, lse_all = self.probs_forward(case.q, case.r, case.b, case.t, case.c,
                                           metric=metric, offset=offset)
        grads = self.probs_backward(case.q, case.r, case.b, case.t, yhat, lse_all, g,
                                    metric=metric, offset=offset, need_q=need[0],
                                    need_r=need[1], need_t=need[2])
        return (yhat, lse_all, *grads)


@pytest.fixture
def launch(backend, caps):
    return Launchers(backend, **({"precision": "ieee"} if caps.precision else {}))


# ------------------------------------------------------------------------- the oracle


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


# ------------------------------------------------------------ launcher-level checks


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


def _inf_as_nan(x):
    return torch.where(torch.isinf(x), float("nan"), x)


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


# ---------------------------------------------------------------------- public API


def api_nca(x, t, r=None, *, backend, y, ry=None, metric, reduction="none"):
    """nbkernels.nca_loss, or for backend=None the oracle; without r the batch loss."""
    if backend is not None:
        refs = {} if r is None else dict(ref_embeddings=r, ref_labels=ry)
        return nbkernels.nca_loss(x, y, temperature=t, metric=metric, reduction=reduction,
                                  backend=backend, **refs)
    r, ry, offset = (x, y, 0) if r is None else (r, ry, None)
    lse_all, lse_pos, _, valid = oracle_rows(x, r, y, ry, t, 0, metric, offset)
    undefined = torch.where(torch.isnan(lse_all), lse_all, torch.zeros_like(lse_all))
    loss = torch.where(valid, lse_all - lse_pos, undefined)
    if reduction == "none":
        return loss
    return loss.sum() / (valid.sum().clamp_min(1) if reduction == "mean" else 1)


def api_knn(x, t, r, *, backend, ry, c, metric, exclude_self=False):
    if backend is not None:
        return nbkernels.soft_knn_predict(x, r, ry, c, temperature=t, metric=metric,
                                          exclude_self=exclude_self, backend=backend)
    return oracle_rows(x, r, None, ry, t, c, metric, 0 if exclude_self else None)[2]


def api_proto(x, t, p=None, *, backend, y, metric):
    """prototype_loss with learned prototypes p (labels arange), or the class means."""
    if backend is not None:
        return nbkernels.prototype_loss(x, y, prototypes=p, temperature=t, metric=metric,
                                        reduction="none", backend=backend)
    if p is None:
        classes = torch.unique(y)
        member = (classes[:, None] == y[None, :]).double()
        p, py = (member @ x) / member.sum(1, keepdim=True), classes
    else:
        py = torch.arange(p.shape[0], device=p.device)
    return api_nca(x, t, p, backend=None, y=y, ry=py, metric=metric)


def api_data(caps, dtype, n=15, m=13, d=6, c=4, seed=5):
    """(x, y, r, ry, p, t, c): queries, references, prototypes (c, d) and T, in ``dtype``
    (T in its accumulation dtype), drawn in fp64 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    x, r, p = (torch.randn(k, d, generator=g, dtype=F64).to(caps.device, dtype)
               for k in (n, m, c))
    y, ry = (torch.randint(0, c, (k,), generator=g).to(caps.device) for k in (n, m))
    t = torch.tensor(0.3, dtype=cases.acc_dtype(dtype), device=caps.device)
    return x, y, r, ry, p, t, c


def api_cases(data, metric):
    """[(name, fn(*tensors, backend), tensors)] for every public function."""
    x, y, r, ry, p, t, c = data
    return [
        ("nca_batch", functools.partial(api_nca, y=y, metric=metric), [x, t]),
        ("nca_refs", functools.partial(api_nca, y=y, ry=ry, metric=metric), [x, t, r]),
        ("knn", functools.partial(api_knn, ry=ry, c=c, metric=metric), [x, t, r]),
        ("knn_exclude_self", functools.partial(api_knn, ry=y, c=c, metric=metric,
                                               exclude_self=True), [x, t, x.clone()]),
        ("proto_means", functools.partial(api_proto, y=y, metric=metric), [x, t]),
        ("proto_learned", functools.partial(api_proto, y=y, metric=metric), [x, t, p]),
    ]


def check_api(fn, tensors, backend, atol, rtol, what):
    """Output and gradients (of a random projection) of ``fn`` on ``backend`` against the
    oracle on the same rounded inputs in fp64."""
    want = api_run(fn, [x.double() for x in tensors], None)
    got = api_run(fn, tensors, backend)
    assert got[0].dtype == tensors[0].dtype
    assert [g.dtype for g in got[1:]] == [x.dtype for x in tensors]
    assert_match(got, want, atol, rtol, what=what)
    return got


@pytest.mark.parametrize("metric", API_METRICS)
def test_api_matches_oracle(caps, api_backend, dtype_tol, metric):
    dtype, atol, rtol = dtype_tol
    for name, fn, tensors in api_cases(api_data(caps, dtype), metric):
        check_api(fn, tensors, api_backend, atol, rtol, f"{name} {metric}")


def _fp64_runs(caps, monkeypatch):
    """A context for fp64 inputs: backends that fall back to "torch" must warn."""
    if caps.fp64 != "fallback":
        return warnings.catch_warnings()
    from nbkernels import backends
    monkeypatch.setattr(backends, "_warned", set())
    return pytest.warns(UserWarning, match="float64")


def test_api_gradcheck_fp64(caps, api_backend, monkeypatch):
    x, y, r, ry, p, t, c = api_data(caps, F64, n=6, m=5, d=3, c=3)
    fns = [(functools.partial(api_nca, y=y, metric="sqeuclidean"), [x, t]),
           (functools.partial(api_nca, y=y, ry=ry, metric="cosine"), [x, t, r]),
           (functools.partial(api_knn, ry=ry, c=c, metric="dot"), [x, t, r]),
           (functools.partial(api_knn, ry=ry, c=c, metric="sqeuclidean"), [x, t, r]),
           (functools.partial(api_proto, y=y, metric="sqeuclidean"), [x, t, p])]
    with _fp64_runs(caps, monkeypatch):
        for fn, tensors in fns:
            leaves = [a.detach().clone().requires_grad_() for a in tensors]
            assert torch.autograd.gradcheck(functools.partial(fn, backend=api_backend), leaves,
                                            fast_mode=caps.emulated)


@pytest.mark.parametrize("kind", ["float", "tensor"])
def test_api_float_temperature_fp64(caps, api_backend, kind):
    # a float T with fp64 inputs is exact in fp64 (not rounded through fp32)
    x, y, r, ry, _, _, c = api_data(caps, F64)
    atol, rtol = TOL[F64]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fp64 fallback warning
        for temperature in (0.05, 0.1, 0.3):
            t = temperature if kind == "float" else torch.tensor(temperature, dtype=F64,
                                                                  device=caps.device)
            exact = torch.tensor(temperature, dtype=F64, device=caps.device)
            for fn in (functools.partial(api_nca, y=y, ry=ry, metric="sqeuclidean"),
                       functools.partial(api_knn, ry=ry, c=c, metric="cosine")):
                torch.testing.assert_close(fn(x, t, r, backend=api_backend),
                                           fn(x, exact, r, backend=None), atol=atol, rtol=rtol)


@pytest.mark.parametrize("n, m", [(0, 5), (4, 0)])
def test_api_empty(caps, api_backend, n, m):
    # nca_loss: a differentiable 0 for "mean" / "sum", (N,) zeros for "none" (no row has a
    # positive); soft_knn_predict: (0, C) without queries, a ValueError without references.
    # Gradients: zeros (or None). Every backend, "reference" included, must give exactly this.
    x, y, r, ry, _, t, c = api_data(caps, caps.exact, n=n, m=m)
    for reduction in ("mean", "sum", "none"):
        q, refs, temp = (a.clone().requires_grad_() for a in (x, r, t))
        runs = [(nbkernels.nca_loss(q, y, ref_embeddings=refs, ref_labels=ry, temperature=temp,
                                    reduction=reduction, backend=api_backend), [q, refs, temp])]
        if n == 0:  # the batch loss too
            runs.append((nbkernels.nca_loss(q, y, temperature=temp, reduction=reduction,
                                            backend=api_backend), [q, temp]))
        for out, leaves in runs:
            assert out.shape == ((n,) if reduction == "none" else ()) and out.dtype == caps.exact
            assert not out.any()
            assert out.requires_grad, f"{reduction}: an empty loss must stay differentiable"
            for leaf, g in zip(leaves, torch.autograd.grad(out.sum(), leaves, allow_unused=True)):
                assert g is None or (g.shape == leaf.shape and not g.any())
    if n == 0:
        q = x.clone().requires_grad_()
        yhat = nbkernels.soft_knn_predict(q, r, ry, c, temperature=t, backend=api_backend)
        assert yhat.shape == (0, c) and yhat.dtype == caps.exact
    else:
        with pytest.raises(ValueError, match="ref_embeddings"):
            nbkernels.soft_knn_predict(x, r, ry, c, temperature=t, backend=api_backend)


@pytest.mark.parametrize("where", ["query", "reference"])
@pytest.mark.parametrize("metric", API_METRICS)
def test_api_nan(caps, api_backend, metric, where):
    # a NaN entry makes every output it enters NaN, never a finite number
    x, y, r, ry, _, t, c = api_data(caps, caps.exact)
    (x if where == "query" else r)[3, 1] = NAN
    atol, rtol = TOL[caps.exact]
    for name, fn, tensors in api_cases((x, y, r, ry, None, t, c), metric)[1:3]:
        with torch.no_grad():
            got = fn(*tensors, backend=api_backend)
            want = fn(*[a.double() for a in tensors], backend=None)
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, equal_nan=True)
        rows = torch.isnan(got).reshape(got.shape[0], -1)
        assert rows.all(1).equal(rows.any(1)), f"{name}: a row only partly NaN"
        assert rows.any(1).sum() == (1 if where == "query" else got.shape[0])


@pytest.mark.parametrize("where", ["query", "reference"])
@pytest.mark.parametrize("metric", API_METRICS)
def test_api_points_at_infinity(caps, api_backend, metric, where):
    # a row with infinite entries (and no NaN): see the oracle and reference's docstring
    x, y, r, ry, _, t, c = api_data(caps, caps.exact)
    target = x if where == "query" else r
    target[3, 1], target[3, 4] = INF, -INF
    atol, rtol = TOL[caps.exact]
    for name, fn, tensors in api_cases((x, y, r, ry, None, t, c), metric)[:3]:
        if name == "nca_batch" and where == "reference":
            continue  # no reference but the batch
        what = f"{name} {metric} {where} at infinity"
        if metric == "dot":  # gradients through infinite entries may be NaN
            as_nan = caps.fp32_dot_inf_is_nan and tensors[0].dtype == F32
            with torch.no_grad():
                got = fn(*tensors, backend=api_backend)
                want = fn(*[(_inf_as_nan(a) if as_nan else a).double() for a in tensors],
                          backend=None)
            torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, equal_nan=True,
                                       msg=lambda m, what=what: f"{what}: {m}")
            continue
        got = check_api(fn, tensors, api_backend, atol, rtol, what)
        assert all(torch.isfinite(g).all() for g in got[1:]), what
        far = got[1] if where == "query" else got[3]   # tensors: x, t, r
        assert not far[3].any(), f"{what}: gradient at the point at infinity"
        rows = torch.isnan(got[0]).reshape(got[0].shape[0], -1).any(1)
        undefined = metric == "sqeuclidean" and where == "query"
        assert rows.tolist() == [undefined and i == 3 for i in range(rows.shape[0])], what


DOUBLE_BACKWARD = r'double backward.*backend="reference"'


@pytest.mark.parametrize("output", ["nca_loss", "soft_knn_predict"])
@pytest.mark.parametrize("metric", API_METRICS)
def test_api_double_backward(caps, api_backend, metric, output):
    # backend="reference" is differentiable twice; a fused backend's first derivative
    # (create_graph=True: e.g. a gradient penalty) is fine, differentiating it again raises
    dtype = F64 if api_backend == "reference" else F32
    x, y, r, ry, _, t, c = api_data(caps, dtype, n=5, m=4, d=3, c=3)
    if output == "nca_loss":
        fn, tensors = functools.partial(api_nca, y=y, metric=metric), [x, t]
    else:
        fn, tensors = functools.partial(api_knn, ry=ry, c=c, metric=metric), [x, t, r]
    leaves = [a.detach().clone().requires_grad_() for a in tensors]
    fn = functools.partial(fn, backend=api_backend)
    if api_backend == "reference":
        assert torch.autograd.gradgradcheck(fn, leaves)
        return
    out = fn(*leaves)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device)
    grads = torch.autograd.grad((out.reshape(-1) * weight).sum(), leaves, create_graph=True)
    assert all(torch.isfinite(g).all() for g in grads)
    penalty = sum(g.square().sum() for g in grads)
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD) as error:
        torch.autograd.grad(penalty, leaves)
    assert "double backward" in str(error.value)
    assert 'backend="reference"' in str(error.value)


# ------------------------------------- the reference itself (bound by the torch module)


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("metric", API_METRICS)
def test_reference_matches_oracle(metric, offset):
    """nbkernels.backends.reference, the other oracle, against the one written here."""
    from nbkernels.backends import reference
    atol, rtol = TOL[F64]
    case = cases.make_case("cpu", dtype=F64, c=5)
    case.q[4, 2], case.r[6, 0] = INF, -INF   # points at infinity
    case.q[8, 1] = NAN

    def ref(q, r, t):
        lse_all, lse_pos = reference.neighbor_lse(q, r, case.a, case.b, t, metric=metric,
                                                  offset=offset)
        yhat = reference.class_probs(q, r, case.b, t, case.c, metric=metric, offset=offset)
        return lse_all, lse_pos, yhat

    def ours(q, r, t):
        return oracle_rows(q, r, case.a, case.b, t, case.c, metric, offset)[:3]

    outs = []
    for fn in (ref, ours):
        leaves = _leaves(case)
        got = fn(*leaves)
        total = sum(x.masked_fill(~torch.isfinite(x), 0.0).sum() * (k + 1)
                    for k, x in enumerate(got))
        grads = torch.autograd.grad(total, leaves) if metric != "dot" else ()
        outs.append([x.detach() for x in got] + list(grads))
    assert_match(outs[0], outs[1], atol, rtol, what=f"reference {metric} offset={offset}")


__all__ = ["Capabilities", "caps", "launch", "pytest_generate_tests",
           *[name for name in list(globals()) if name.startswith("test_")
             and not name.startswith("test_reference_")]]
