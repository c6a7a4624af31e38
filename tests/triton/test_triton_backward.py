"""The backward kernel's paths (``kernels.neighbor_bwd_kernel``) against the fp64
oracle of tests/conformance/, under the interpreter (or on a GPU):

* the batch loss's one SYMMETRIC kernel (``r is q``, one label vector): its summed
  gradient equals the oracle's dq + dr, and the dq + dr of the two-kernel path on a copy;
* the one-exp positives, with the fix-up launch in some rows only (rows whose
  lse_all - lse_pos exceeds 2^64 in exp2 units), on both paths; the fix-up's rows grouped
  by label (it visits only the other rows of its own rows' labels);
* a resident (D <= 32 here) and a chunked feature dim;
* fp16 ds scaling of the symmetric kernel under a tiny upstream gradient;
* int64 labels that agree in their low 32 bits (ranked, never truncated);
* bitwise determinism of the symmetric kernel.
"""
import math
import types

import pytest
import torch

import launcher_cases as cases
from conformance import oracle_lse, upstream_lse

TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (2e-4, 2e-4), torch.float16: (2e-2, 2e-2)}
ALL = dict(need_q=True, need_r=True, need_t=True)


def _batch(h, n, d, dtype, **kw):
    case = h.make_case(n=n, m=n, d=d, dtype=dtype, **kw)
    return types.SimpleNamespace(q=case.q, r=case.q, a=case.a, b=case.a, t=case.t, c=case.c)


def _copy(case):
    """The same problem with references that are not the queries: the two-kernel path."""
    return types.SimpleNamespace(q=case.q, r=case.q.clone(), a=case.a, b=case.a.clone(),
                                 t=case.t, c=case.c)


def _run(tb, case, metric, offset, g_all, g_pos):
    # the batch (r is q) asks for the one symmetric kernel; a copy runs the dq and dr kernels
    kw = dict(metric=metric, offset=offset, precision="ieee", symmetric=case.r is case.q)
    lse = tb.lse_forward(case.q, case.r, case.a, case.b, case.t, **kw)
    grads = tb.lse_backward(case.q, case.r, case.a, case.b, case.t, *lse, g_all, g_pos, **kw,
                            **ALL)
    return lse, grads


@pytest.fixture
def one_exp(monkeypatch):
    """The launcher's choice per symmetric backward (``rows.one_exp_rows``): ``.ok``, its
    flags in call order (1: the one-exp kernel worked, 0: the two-exp one); ``.force_two()``
    sends every later call to the two-exp kernel (a spread limit no rows meet)."""
    from nbkernels.backends.triton import kernels as tk
    from nbkernels.backends.triton import rows as tr
    spy = types.SimpleNamespace(ok=[])
    orig = tr.one_exp_rows

    def rows(*args):
        out = orig(*args)
        spy.ok.append(int(out[1][0]))
        return out

    def force_two():
        for lim in tk.ONE_EXP_LIMITS.values():
            monkeypatch.setitem(lim, "spread", -1.0)
    monkeypatch.setattr(tr, "one_exp_rows", rows)
    # these small batches take both forms, as the GPU's batches above the threshold do
    monkeypatch.setattr(tk, "ONE_EXP_MIN_ROWS", 0)
    spy.force_two = force_two
    return spy


def _check_batch(tb, h, case, metric, offset, tol, g=None):
    """Symmetric and two-kernel paths against the oracle; returns the oracle's lse."""
    want, (g_all, g_pos) = oracle_lse(case, metric, offset, *(g or upstream_lse(case)))
    lse, (dx, none, dt) = _run(tb, case, metric, offset, g_all, g_pos)
    assert none is None, "the symmetric kernel returns the whole gradient as dq"
    shift = h.row_shift(case, metric)
    atol, rtol = tol
    for name, got, ref in (("lse_all", lse[0] + shift, want[0]),
                           ("lse_pos", lse[1] + shift, want[1]),
                           ("dx", dx, want[2] + want[3]), ("dt", dt, want[4])):
        h.close(got, ref, atol, rtol, msg=lambda m, name=name: f"symmetric {name}: {m}")
    _, (dq, dr, dt2) = _run(tb, _copy(case), metric, offset, g_all, g_pos)
    h.close(dq.double() + dr.double(), want[2] + want[3], atol, rtol,
            msg=lambda m: f"two-kernel dq + dr: {m}")
    h.close(dt2, want[4], atol, rtol, msg=lambda m: f"two-kernel dt: {m}")
    return want


@pytest.mark.parametrize("d", [19, 40], ids=["resident", "chunked"])
@pytest.mark.parametrize("offset", [0, None])
@pytest.mark.parametrize("metric", ["sqeuclidean", "dot"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_symmetric_matches_oracle(tb, h, one_exp, dtype, metric, offset, d):
    case = _batch(h, 37, d, dtype, scale=min(0.5, 2.5 / math.sqrt(d)))
    _check_batch(tb, h, case, metric, offset, TOL[dtype])
    assert one_exp.ok == [1], "these rows should take the one-exp kernel"


@pytest.mark.parametrize("offset", [0, None])
@pytest.mark.parametrize("metric", ["sqeuclidean", "dot"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_symmetric_two_exp_form_matches_oracle(tb, h, one_exp, dtype, metric, offset):
    # the kernel that runs where the rows' normalizers spread too far for one exp2
    one_exp.force_two()
    case = _batch(h, 37, 19, dtype, scale=0.5)
    _check_batch(tb, h, case, metric, offset, TOL[dtype])
    assert one_exp.ok == [0]


def test_the_one_exp_kernel_is_what_the_tests_see(tb, h, one_exp, monkeypatch):
    # the one-exp form's output is the run's (it launches last): weights the launcher
    # got wrong, with its test passed, must show in dx, not be covered by the other form
    from nbkernels.backends.triton import rows as tr
    case = _batch(h, 37, 19, torch.float32, scale=0.5)
    _, (g_all, g_pos) = oracle_lse(case, "sqeuclidean", 0, *upstream_lse(case))
    _, (dx, _, _) = _run(tb, case, "sqeuclidean", 0, g_all, g_pos)
    right = tr.one_exp_rows

    def wrong(*args):
        sym_w, ok, scale = right(*args)
        sym_w = sym_w.clone()
        sym_w[2:] *= 2.0
        return sym_w, ok, scale
    monkeypatch.setattr(tr, "one_exp_rows", wrong)
    _, (dx_wrong, _, _) = _run(tb, case, "sqeuclidean", 0, g_all, g_pos)
    assert one_exp.ok == [1, 1]
    assert (dx_wrong - dx).norm() > 0.5 * dx.norm()


def test_small_batches_take_the_two_exp_kernel_alone(tb, h, one_exp, monkeypatch):
    # below kernels.ONE_EXP_MIN_ROWS the launcher skips the one-exp form and its test
    from nbkernels.backends.triton import configs as tc
    from nbkernels.backends.triton import kernels as tk
    monkeypatch.setattr(tk, "ONE_EXP_MIN_ROWS", 38)
    tc.LAUNCHED.clear()
    case = _batch(h, 37, 19, torch.float32, scale=0.5)
    _check_batch(tb, h, case, "sqeuclidean", 0, TOL[torch.float32])
    assert one_exp.ok == []
    assert not any(dict(flags).get("ONE_EXP") == "True" for *_, flags in tc.LAUNCHED)
    monkeypatch.setattr(tk, "ONE_EXP_MIN_ROWS", 37)
    _check_batch(tb, h, case, "sqeuclidean", 0, TOL[torch.float32])
    assert one_exp.ok == [1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_symmetric_wide_spread_takes_two_exps(tb, h, one_exp, dtype):
    # points far apart at T = 0.05: the rows' log2 normalizers spread over about 600
    # (fp32's limit is 140, fp64's 1000)
    case = _batch(h, 29, 6, dtype, scale=2.0, temperature=0.05, seed=5)
    _check_batch(tb, h, case, "sqeuclidean", 0, (1e-9, 1e-9) if dtype == torch.float64
                 else (1e-3, 1e-3))
    assert one_exp.ok == [0 if dtype == torch.float32 else 1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_positives_fixup_in_some_rows_only(tb, h, dtype):
    # T = 0.02 on unit-scale points: logits spread over hundreds of units, so the
    # nearest positive of some rows sits more than 2^64 below the nearest negative
    case = _batch(h, 37, 5, dtype, c=6, temperature=0.02, seed=3)
    want = _check_batch(tb, h, case, "sqeuclidean", 0, (1e-9, 1e-9) if dtype == torch.float64
                        else (1e-3, 1e-3))
    gap = (want[0] - want[1]) / math.log(2)
    flagged = int((gap > 64).sum())
    assert 0 < flagged < case.q.shape[0], f"{flagged} rows flagged: the case misses the mix"


@pytest.mark.parametrize("metric, temperature, scale, d", [("sqeuclidean", 0.02, 0.5, 5),
                                                          ("dot", 0.01, 0.3, 19)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_exp_form_with_the_fixup_launch(tb, h, one_exp, dtype, metric, temperature, scale,
                                            d):
    # rows whose positives sit more than 2^64 below their lse (the fix-up launch) while
    # the normalizers spread over 89 / 117 binades: the one-exp kernel, then the fix-up
    case = _batch(h, 37, d, dtype, c=6, temperature=temperature, seed=3, scale=scale)
    want = _check_batch(tb, h, case, metric, 0, (1e-9, 1e-9) if dtype == torch.float64
                        else (1e-3, 1e-3))
    assert one_exp.ok == [1]
    gap = (want[0] - want[1]) / math.log(2)
    assert int((gap > 64).sum()) > 0, "the case misses the fix-up rows"


@pytest.mark.parametrize("wide, scale", [(True, 2.0 ** -24), (False, 2.0 ** -110)],
                         ids=["spread117-2^-24", "narrow-2^-110"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_exp_form_under_a_tiny_upstream_gradient(tb, h, one_exp, dtype, wide, scale):
    # the one-exp kernel's weights 2^(R - g) w carry one power of two (the kernel divides
    # its sums by it): with normalizers spread over 117 binades and a 2^-24 upstream
    # gradient the top rows' weights need it to stay normal; at 2^-110 on close rows it
    # would pass fp32's range and is held within it
    if wide:
        case = _batch(h, 37, 19, dtype, c=6, temperature=0.01, seed=3, scale=0.3)
        metric = "dot"
    else:
        case = _batch(h, 37, 19, dtype, scale=0.4)
        metric = "sqeuclidean"
    g = [x * scale for x in upstream_lse(case)]
    want, (g_all, g_pos) = oracle_lse(case, metric, 0, *g)
    _, (dx, _, dt) = _run(tb, case, metric, 0, g_all, g_pos)
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    h.close(dx.double() / scale, (want[2] + want[3]) / scale, tol, tol,
            msg=lambda m: f"dx: {m}")
    h.close(dt.double() / scale, want[4] / scale, tol, tol, msg=lambda m: f"dt: {m}")
    assert one_exp.ok == [1]


@pytest.mark.parametrize("scale", [1e-5, 1e-6])
def test_fp16_symmetric_tiny_upstream(tb, h, scale):
    # ds ~ g / N sits below fp16's normal range before the gradient dot: the launcher's
    # power-of-two scale keeps it. Compared in units of the upstream scale; the fp16
    # output itself rounds to multiples of 2^-24 (an absolute 2^-25 / scale).
    case = _batch(h, 37, 19, torch.float16, scale=0.4)
    g = [x * scale for x in upstream_lse(case)]
    want, (g_all, g_pos) = oracle_lse(case, "sqeuclidean", 0, *g)
    _, (dx, _, dt) = _run(tb, case, "sqeuclidean", 0, g_all, g_pos)
    h.close(dx.double() / scale, (want[2] + want[3]) / scale, 2e-2 + 2.0 ** -25 / scale, 1e-2,
            msg=lambda m: f"dx: {m}")
    h.close(dt.double() / scale, want[4] / scale, 2e-2, 1e-2, msg=lambda m: f"dt: {m}")


def test_int64_labels_are_ranked_not_truncated(tb, h):
    # labels 3 and 3 + 2^32 agree in their low 32 bits and must stay different
    case = h.make_case(n=23, m=29, d=7, dtype=torch.float64)
    case.a = torch.where(case.a % 2 == 0, 3, 3 + 2 ** 32).to(case.a)
    case.b = torch.where(case.b % 2 == 0, 3, 3 + 2 ** 32).to(case.b)
    want, (g_all, g_pos) = oracle_lse(case, "sqeuclidean", None, *upstream_lse(case))
    lse, grads = _run(tb, case, "sqeuclidean", None, g_all, g_pos)
    shift = h.row_shift(case, "sqeuclidean")
    h.close(lse[1] + shift, want[1], 1e-9, 1e-9, msg=lambda m: f"lse_pos: {m}")
    for name, got, ref in zip(("dq", "dr", "dt"), grads, want[2:]):
        h.close(got, ref, 1e-9, 1e-9, msg=lambda m, name=name: f"{name}: {m}")


def test_symmetric_is_deterministic(tb, h):
    case = _batch(h, 45, 19, torch.float32)
    g_all, g_pos = upstream_lse(case)
    first = _run(tb, case, "sqeuclidean", 0, g_all, g_pos)[1]
    second = _run(tb, case, "sqeuclidean", 0, g_all, g_pos)[1]
    assert torch.equal(first[0], second[0]) and torch.equal(first[2], second[2])


@pytest.mark.parametrize("mode", ["dq", "dr", "sym"])
def test_fixup_rows_are_grouped_by_label(mode):
    """The fix-up launch visits, per block of its own rows, only the other side's rows of
    the block's labels: own rows grouped by label (dq: the flagged queries first), the
    other side in label order, and each label rank's range there (``_fixup_rows``)."""
    from nbkernels.backends.triton import backward as tbw
    a = torch.tensor([3, 1, 2, 3, 1, 5, 2], dtype=torch.int32)
    b = a if mode == "sym" else torch.tensor([2, 3, 3, 1, 4, 2, 2, 1, 3], dtype=torch.int32)
    flags = torch.tensor([1, 0, 1, 0, 1, 0, 0], dtype=torch.int8)
    n, m = a.shape[0], b.shape[0]
    got = tbw._fixup_rows(mode, (a, b), flags, n, m)
    own, other = (b, a) if mode == "dr" else (a, b)
    perm, order, ptr = (got[k].long() for k in ("own_perm", "other_order", "label_ptr"))
    assert sorted(perm.tolist()) == list(range(own.shape[0]))
    if mode == "dq":
        flagged = int((flags != 0).sum())
        assert (flags[perm[:flagged]] != 0).all() and (flags[perm[flagged:]] == 0).all()
        assert own[perm[:flagged]].tolist() == sorted(own[flags != 0].tolist())
    else:
        assert own[perm].tolist() == sorted(own.tolist())
    assert other[order].tolist() == sorted(other.tolist())
    for v in range(n + m + 1):
        assert (other[order[ptr[v]:ptr[v + 1]]] == v).all()
        assert int(ptr[v + 1] - ptr[v]) == int((other == v).sum())


@pytest.mark.parametrize("dtype, gap_sq", [(torch.float32, 150.0), (torch.float64, 900.0)])
def test_fixup_over_far_positives(tb, h, dtype, gap_sq):
    """The fix-up launch where 40 rows, of 40 labels interleaved over the batch, have all
    their positives far below their nearest reference (``launcher_cases.far_positives``):
    the symmetric kernel and, on a copy, the dq and dr kernels against the oracle (the
    fix-up's terms are most of these rows' gradient)."""
    case, offset, far = cases.far_positives(h.device, dtype, gap_sq, True)
    eps = torch.finfo(dtype).eps
    tol = (1e-9, 1e-9) if dtype == torch.float64 else (1e-3, 1e-3)
    want = _check_batch(tb, h, case, "sqeuclidean", offset,
                        tuple(x + 8 * eps * gap_sq for x in tol))
    gap = (want[0] - want[1]) / math.log(2)
    limit = 960 if dtype == torch.float64 else 64
    # the fix-up's rows: exactly the far-positive ones (rows without a positive have
    # lse_pos = -inf and no positive term)
    assert (gap[far] > limit).all() and not (gap[~far & (want[1] > -math.inf)] > limit).any()
