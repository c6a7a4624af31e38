"""The loss forward's Gluon main pass (``gluon_lse``, variant "sm90_gluon" of kind
"fwd_main", opt-in) on an sm_90 GPU, against the fp64 oracles.

Gluon has no interpreter: these tests run on an sm_90 GPU only (``NBK_TEST_DEVICE=cuda``,
``bench/gpu_check.sh``'s "gluon" stage) and skip elsewhere; what the CPU can check of
the same kernel (the arguments it refuses and those it hands the kernel, its compiled
SASS) is in tests/test_gluon_fwd.py. Each test pins the variant and asserts that the
Gluon main pass ran (``configs.LAUNCHED``): inputs it does not take would otherwise pass
through the Triton main pass unnoticed. The shapes are those it takes (bf16 / fp16 rows
of D = 128, at least two reference tiles) and odd: the last row block and the last
reference tile part-filled, the diagonal tile anywhere.

Every row of lse_all and lse_pos, and of the loss they give, is compared with the fp64
formula at the forward's own precision (fp32 accumulation over rounded 16-bit inputs);
the gradients, which the Triton backward computes from those lse values, with those of
the Triton main pass's (within the conformance suite's 16-bit tolerances). Without the
pin (the Triton main pass in its place) some of these cases passed under the interpreter
in fp16 (4 loss-forward cases, both low-temperature ones, 6 class-forward ones, both
special-row ones): the oracles and tolerances hold for a correct main pass.
"""
import os
import types

import pytest
import torch

import launcher_cases as cases
import lowtemp
from conformance import TOL, Launchers, oracle_lse, oracle_probs, upstream_lse, upstream_probs
from nbkernels.backends import variants

DEVICE = os.environ.get("NBK_TEST_DEVICE", "cpu")
ON_SM90 = DEVICE == "cuda" and torch.cuda.is_available() and \
    torch.cuda.get_device_capability()[0] == 9
if not ON_SM90:
    pytest.skip("the Gluon main pass runs on an sm_90 GPU only (Gluon has no interpreter): "
                "tests/test_gluon_fwd.py checks it on the CPU", allow_module_level=True)
D = 128
# lse values: fp32 accumulation of exact 16-bit products (TOL's fp32 row); the logits
# reach |2 q.r - |r|^2| / T, so the absolute part scales with 1 / T
FWD_RTOL = 2e-5


KINDS = ("fwd_main", "fwd_class_main")


@pytest.fixture
def gluon(tb):
    """The Gluon main passes pinned; yields a function that asserts the one of ``kind``
    ran since the last call (and clears the record)."""
    from nbkernels.backends.triton import configs as tc
    from nbkernels.backends.triton import kernels as tk

    def ran(kind="fwd_main"):
        keys = [k for k in tc.LAUNCHED if k[0] == kind]
        for k in keys:
            del tc.LAUNCHED[k]
        assert keys, f"the Gluon {kind} pass did not run (its why_not refused the inputs)"
        return [dict(k[3]) for k in keys]
    with variants.pinned(tk.VARIANTS, KINDS, "sm90_gluon"):
        yield ran


@pytest.fixture(params=[False, True], ids=["row_order", "label_order"])
def lse_form(request, monkeypatch):
    """The loss forward's Gluon form this triton takes (``gluon_lse.form``) with its rows
    in their order and in label order (``ORDERED``): both run, whichever FORMS holds."""
    from nbkernels.backends.triton import gluon_lse as L
    f = L.form()._replace(ordered=request.param)
    monkeypatch.setattr(L, "form", lambda version=None: f)
    return f


def _case(n, m, c, dtype, temperature, batch, seed=0):
    """Rows ~ N(0, 0.3^2); ``batch``: the queries are the first N references (the self
    pair i = j excluded, offset 0)."""
    case = cases.make_case(DEVICE, n=m if batch else n, m=m, d=D, c=c, dtype=dtype, seed=seed,
                           scale=0.3, temperature=temperature)
    if batch:   # N = M: the same tensors (``r is q``), as the public API's batch passes them
        case.q, case.a = (case.r, case.b) if n == m else (case.r[:n], case.b[:n])
    return case


def _logit_atol(case):
    """A few ulps of the largest logit magnitude, (2 |q| |r| + |r|^2) / T: the forward's
    absolute error on an lse, and relative on a probability."""
    q, r = case.q.double(), case.r.double()
    big = (2 * q.norm(dim=1)[:, None] * r.norm(dim=1)[None, :] + r.pow(2).sum(1)).amax()
    return 8 * torch.finfo(torch.float32).eps * float(big / case.t.double())


def _forward_close(case, metric, offset, got):
    """lse_all and lse_pos, every row, against the fp64 oracle at fp32 precision."""
    want, _ = oracle_lse(case, metric, offset, *upstream_lse(case))
    shift = cases.row_shift(case, metric)
    for name, x, y in zip(("lse_all", "lse_pos"), got[:2], want[:2]):
        cases.close(x + shift, y, _logit_atol(case), FWD_RTOL,
                    msg=lambda m, name=name: f"{name}: {m}")


def _grads_close(got, plain, dtype):
    """The gradients (the Triton backward's) against those with the Triton main pass."""
    atol, rtol = TOL[dtype]
    for name, x, y in zip(("dq", "dr", "dt"), got, plain):
        cases.close(x.double(), y.double(), atol, rtol, msg=lambda m, name=name: f"{name}: {m}")


# bf16 over the whole grid, fp16 (the other dtype it takes: another compile) on a corner
BF16, FP16 = pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")


@pytest.mark.parametrize("dtype, n, m, batch, c, temperature", [
    (BF16, n, m, batch, c, t) for n, m, batch in ((300, 300, True), (1000, 1000, True),
                                                  (129, 1031, True), (333, 700, False))
    for c, t in ((3, 1.0), (40, 0.1), (400, 0.05))] + [(FP16, 129, 1031, True, 40, 0.1)])
def test_matches_oracle(tb, gluon, lse_form, dtype, n, m, batch, c, temperature):
    """The batch (self pair excluded; N <= M) and a cross batch (no pair excluded), few
    classes to more than a row has positives for (rows without one: lse_pos -inf), T from
    1 to 0.05, each form in row and in label order (the batch with N < M, whose queries
    are not the references, in row order): the lse values against the fp64 oracle, and
    the gradients (the Triton backward's, from these lse values) against those of the
    Triton main pass's."""
    from nbkernels.backends.triton import kernels as tk
    case = _case(n, m, c, dtype, temperature, batch)
    offset = 0 if batch else None
    g_all, g_pos = upstream_lse(case)
    ordered = lse_form.ordered and (not batch or n == m)
    for metric in ("sqeuclidean", "dot"):
        got = Launchers(tb, precision="ieee").lse(case, metric, offset, g_all, g_pos)
        (ran,) = gluon()
        assert ran["FORM"].endswith("_ordered") == ordered, ran
        _forward_close(case, metric, offset, got)
        with variants.pinned(tk.VARIANTS, KINDS, "generic"):
            plain = Launchers(tb, precision="ieee").lse(case, metric, offset, g_all, g_pos)
        _grads_close(got[2:], plain[2:], dtype)


@pytest.mark.parametrize("kind", ["query_labels_absent", "one_class", "labels_above_all",
                                  "block64_m257"])
def test_label_order_edge_spans(tb, gluon, monkeypatch, kind):
    """The ORDERED form where a row block's labels span no tile (the queries' labels absent
    from the references, or above every one of them with M a whole number of tiles), every
    tile (one class: the last tile among the block's), and the 64-row form with a part-
    filled last tile (M = 257): lse values against the fp64 oracle on every row."""
    from nbkernels.backends.triton import gluon_lse as L
    f = L.form()._replace(ordered=True)
    if kind == "block64_m257":
        f = f._replace(block_m=64, num_warps=4)
    monkeypatch.setattr(L, "form", lambda version=None: f)
    batch = kind in ("one_class", "block64_m257")
    n, m, c = {"query_labels_absent": (333, 700, 20), "one_class": (300, 300, 1),
               "labels_above_all": (333, 768, 20), "block64_m257": (257, 257, 10)}[kind]
    case = _case(n, m, c, torch.bfloat16, 0.1, batch)
    if kind == "query_labels_absent":
        case.a = case.a + c          # labels no reference has
    elif kind == "labels_above_all":
        case.a = torch.full_like(case.a, 10 * c)
    offset = 0 if batch else None
    got = Launchers(tb, precision="ieee").lse(case, "sqeuclidean", offset, *upstream_lse(case))
    (ran,) = gluon()
    assert ran["FORM"] == f.name, ran
    _forward_close(case, "sqeuclidean", offset, got)


@pytest.mark.parametrize("dtype, n, m, c, batch, temperature", [
    (BF16, n, m, c, batch, t) for n, m, c, batch in ((300, 300, 10, True), (1000, 1000, 40, True),
                                                     (129, 1031, 40, True), (333, 1031, 40, False))
    for t in (1.0, 0.1, 0.05)] + [(FP16, 1000, 1000, 40, True, 0.1),
                                  # the last row's self tile holds its own reference alone
                                  # (M = 2 x 128 + 1): no anchor there
                                  (BF16, 257, 257, 10, True, 0.05)])
def test_class_forward_matches_oracle(tb, gluon, dtype, n, m, c, batch, temperature):
    """The class forward (soft_knn_predict's yhat and lse_all), with M >= 20 C (the class
    tiles of 16 it takes): the batch with its self pair excluded (N = M, ``r is q``: the
    queries streamed in label order, SELF 2; N < M: the pairs at positions, 1) and a
    cross batch (0), every row and class against the fp64 oracle at fp32 precision; the
    gradients against the Triton main pass's."""
    from nbkernels.backends.triton import kernels as tk
    case = _case(n, m, c, dtype, temperature, batch)
    offset = 0 if batch else None
    g = upstream_probs(case)
    for metric in ("sqeuclidean", "dot"):
        got = Launchers(tb, precision="ieee").probs(case, metric, offset, g)
        mode = 0 if not batch else 2 if case.q is case.r else 1
        assert gluon("fwd_class_main") == [{"SELF": str(mode)}]
        want = oracle_probs(case, metric, offset, g)
        atol = _logit_atol(case)
        cases.close(got[0], want[0], atol, FWD_RTOL, msg=lambda m: f"yhat: {m}")
        cases.close(got[1] + cases.row_shift(case, metric), want[1], atol, FWD_RTOL,
                    msg=lambda m: f"lse_all: {m}")
        with variants.pinned(tk.VARIANTS, KINDS, "generic"):
            plain = Launchers(tb, precision="ieee").probs(case, metric, offset, g)
        _grads_close(got[2:], plain[2:], dtype)


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "cross"])
def test_special_rows(tb, gluon, lse_form, batch):
    """Rows the launcher prepares before a main pass runs: rows at infinity (squared
    distances: a reference there weighs nothing, a query's row is NaN), a query with a NaN
    (cross batch only: in the batch it is a reference too, and NaN reaches every row),
    reference labels outside [0, C) (in lse_all, in no class). NaN on the same rows as
    with the Triton main pass, every other row as with it (fp32 precision) and, for the
    cross batch, as the fp64 oracle on the rows without the special ones."""
    from nbkernels.backends.triton import kernels as tk
    n, m, c = (517, 517, 20) if batch else (333, 700, 20)
    case = _case(n, m, c, torch.bfloat16, 0.1, batch)
    b = case.b.clone()
    b[::7] = -1
    b[3::11] = c + 2
    case.b = b
    r = case.r.clone()
    r[5, 1] = float("inf")
    case.r = r
    if batch:
        case.q, case.a = case.r, case.b
    case.q[4, 2] = float("-inf")
    if not batch:
        case.q[9, 0] = float("nan")
    offset = 0 if batch else None

    def run():
        lse = tb.lse_forward(case.q, case.r, case.a, case.b, case.t, metric="sqeuclidean",
                             offset=offset)
        return (*lse, *tb.probs_forward(case.q, case.r, case.b, case.t, c,
                                        metric="sqeuclidean", offset=offset))
    got = run()
    gluon()
    gluon("fwd_class_main")
    with variants.pinned(tk.VARIANTS, KINDS, "generic"):
        plain = run()
    atol = _logit_atol(types.SimpleNamespace(q=torch.nan_to_num(case.q.double(), 0, 0, 0),
                                             r=torch.nan_to_num(case.r.double(), 0, 0, 0),
                                             t=case.t))
    special = torch.isnan(plain[0])
    assert int(special.sum()) == 2
    for name, x, y in zip(("lse_all", "lse_pos", "yhat", "lse_all (probs)"), got, plain):
        nan = torch.isnan(y)
        assert torch.equal(torch.isnan(x), nan), name
        cases.close(x[~nan], y[~nan], atol, FWD_RTOL, msg=lambda m, name=name: f"{name}: {m}")
    if batch:
        return
    # the cross batch against the oracle, the special rows and the reference at infinity
    # (weight 0) left out
    keep_r = torch.ones(case.r.shape[0], dtype=torch.bool, device=DEVICE)
    keep_r[5] = False
    rest = types.SimpleNamespace(q=case.q[~special], a=case.a[~special], r=case.r[keep_r],
                                 b=case.b[keep_r], t=case.t, c=c)
    want, _ = oracle_lse(rest, "sqeuclidean", None, *upstream_lse(rest))
    shift = cases.row_shift(rest, "sqeuclidean")
    cases.close(got[0][~special] + shift, want[0], atol, FWD_RTOL)
    cases.close(got[1][~special] + shift, want[1], atol, FWD_RTOL)
    cases.close(got[2][~special], oracle_probs(rest, "sqeuclidean", None,
                                               upstream_probs(rest))[0], atol, FWD_RTOL)


@pytest.mark.parametrize("temperature", [1e-4, 0.01])
def test_low_temperature_rows_exact(tb, gluon, lse_form, temperature):
    """The regime where rows need the exact pass (a row's mass far above or below its first
    tile's anchor: flagged 1, or its positives below 2^-64 of it: flagged 2), x ~ N(0,
    2.6^2) as in the H200's failing input: the loss rows, lse_all - lse_pos from the
    launcher's fp32 lse values (the loss itself comes back in the inputs' 16 bits),
    against ``lowtemp``'s fp64 formula and per-row tolerances, as the Triton forward's
    are (tests/triton/test_triton_lowtemp.py)."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(700, D, generator=g, dtype=torch.float64) * 2.6).to(torch.bfloat16)
    y = torch.randint(0, 20, (700,), generator=g)
    want = lowtemp.oracle(x, y, temperature=temperature)
    xd, yd = x.to(DEVICE), y.to(DEVICE)
    t = torch.tensor(temperature, dtype=torch.float32, device=DEVICE)
    lse_all, lse_pos = tb.lse_forward(xd, xd, yd, yd, t, metric="sqeuclidean", offset=0)
    gluon()
    lse_all, lse_pos = lse_all.double().cpu(), lse_pos.double().cpu()
    loss = torch.where(torch.isneginf(lse_pos), 0.0, lse_all - lse_pos)
    err = (loss - want["loss"]).abs()
    bad = ~(err <= want["loss_tol"])
    assert not bad.any(), (f"{int(bad.sum())} rows out of tolerance, worst error "
                           f"{float(err.max()):.3g}", torch.nonzero(bad).flatten()[:10].tolist())


def test_opted_in_through_the_environment(tb, monkeypatch):
    """NBK_VARIANTS=sm90_gluon makes the public API take both main passes (no pin): the
    loss rows and gradients, and soft_knn_predict's yhat, those of the Triton main
    passes."""
    import nbkernels
    from nbkernels.backends.triton import configs as tc
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(517, D, generator=g) * 0.3).to(DEVICE, torch.bfloat16)
    y = torch.randint(0, 20, (517,), generator=g).to(DEVICE)

    def run():
        leaf = x.clone().requires_grad_()
        loss = nbkernels.nca_loss(leaf, y, temperature=0.1, reduction="none", backend="triton")
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
        yhat = nbkernels.soft_knn_predict(x, x, y, 20, temperature=0.1, exclude_self=True,
                                          backend="triton")
        return loss.detach(), grad, yhat
    monkeypatch.delenv("NBK_VARIANTS", raising=False)
    plain = run()
    tc.LAUNCHED.clear()
    monkeypatch.setenv("NBK_VARIANTS", "sm90_gluon")
    opted = run()
    assert {k[0] for k in tc.LAUNCHED} >= set(KINDS)
    # the loss rows in bf16 (one rounding step: 2^-7 relative); the gradients within TOL
    cases.close(opted[0].double(), plain[0].double(), 1e-4, 2 ** -7)
    atol, rtol = TOL[torch.bfloat16]
    cases.close(opted[1].double(), plain[1].double(), atol, rtol)
    cases.close(opted[2].double(), plain[2].double(), 1e-4, 2 ** -7)
