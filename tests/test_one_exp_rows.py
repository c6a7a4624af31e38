"""The symmetric backward's one exp2 per pair, launcher side (``rows.one_exp_rows``): the
factors it hands the kernel give, pair by pair, the two-exp kernel's ds in both
directions (checked here in fp64 against that formula, independently of any kernel), and
its device-side test sends every case the factors cannot carry to the two-exp kernel.
The kernels themselves are compared with the fp64 oracle in tests/triton."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nbkernels.backends.triton import backward as tb
from nbkernels.backends.triton import rows as tr
from nbkernels.backends.triton.kernels import ONE_EXP_LIMITS

L = tr.LOG2E


def _rows(n, dtype, spread=8.0, seed=0, g_scale=1.0):
    """Column terms, lse and the main pass's (shift, w_neg, w_pos) of n rows whose log2
    normalizers n L + lse L spread over about ``spread``."""
    g = torch.Generator().manual_seed(seed)
    col = -torch.rand(n, generator=g, dtype=torch.float64) * 30.0
    lse = -col + torch.rand(n, generator=g, dtype=torch.float64) * spread / L
    g_all = torch.randn(n, generator=g, dtype=torch.float64) * g_scale
    g_pos = -g_all * torch.rand(n, generator=g, dtype=torch.float64)
    lse_pos = lse - torch.rand(n, generator=g, dtype=torch.float64) * 5.0
    col, lse, lse_pos, g_all, g_pos = (x.to(dtype) for x in (col, lse, lse_pos, g_all, g_pos))
    main, _, _ = tb.lse_backward_rows(lse, lse_pos, g_all, g_pos)
    return tr.padded(col, float("-inf")), lse, main


def _exp2_fl(x, dtype):
    """exp2 of x rounded to ``dtype`` first, as the kernels' fma argument is."""
    return torch.exp2(x.to(dtype).double())


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 2e-6), (torch.float64, 2e-14)])
def test_factors_give_both_directions(dtype, rtol):
    n = 53
    col, lse, (shift, w_neg, w_pos) = _rows(n, dtype)
    sym_w, ok, scale = tr.one_exp_rows(col, lse, shift, w_neg, w_pos)
    assert sym_w.dtype == dtype and sym_w.shape == (4, col.shape[0]) and int(ok) == 1
    s, a, b_neg, b_pos = (x[:n].double() for x in sym_w)
    log2e = torch.tensor(L, dtype=dtype).double()
    c = col[:n].double()
    g = torch.Generator().manual_seed(1)
    # logits u_kj = c x_k.x_j + n_j of a symmetric problem: z_kj = u_kj + n_k <= lse_k
    z = -torch.rand(n, n, generator=g, dtype=torch.float64) * 4.0
    z = torch.minimum(z + z.t(), torch.minimum(lse[:, None].double(), lse[None, :].double()))
    u = z - c[:, None]
    pos = torch.rand(n, n, generator=g) < 0.3
    pos = pos | pos.t()
    sh, wn, wp = (x.double() for x in (shift, w_neg, w_pos))
    w_k = torch.where(pos, wp[:, None], wn[:, None])
    w_j = torch.where(pos, wp[None, :], wn[None, :])
    # the two-exp kernel: ds_kj = exp2(u L + shift_k) w_k, ds_jk = exp2(u' L + shift_j) w_j
    two_kj = _exp2_fl(u * log2e + sh[:, None], dtype) * w_k
    two_jk = _exp2_fl((u + c[:, None] - c[None, :]) * log2e + sh[None, :], dtype) * w_j
    # the one-exp kernel: e = exp2(u L + s_k), ds_kj = e A_k B_k, ds_jk = e A_k B_j
    e = _exp2_fl(u * log2e + s[:, None], dtype)
    one_kj = e * a[:, None] * torch.where(pos, b_pos[:, None], b_neg[:, None])
    one_jk = e * a[:, None] * torch.where(pos, b_pos[None, :], b_neg[None, :])
    # and the exact values, exp(z - lse_k) times the row's weight without its residue
    corr = tr.exp_shift(lse)[1].double()
    exact_kj = torch.exp2((u - lse[:, None].double()) * log2e) * w_k / corr[:, None]
    exact_jk = torch.exp2((z - c[None, :] - lse[None, :].double()) * log2e) * w_j / corr[None, :]
    for got, two, exact in ((one_kj, two_kj, exact_kj), (one_jk, two_jk, exact_jk)):
        rel = ((got - exact).abs() / exact.abs()).max()
        rel_two = ((two - exact).abs() / exact.abs()).max()
        print(f"{dtype}: one-exp {rel:.2e}, two-exp {rel_two:.2e} relative to exact")
        assert rel <= rtol and rel_two <= rtol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_without_terms_and_at_infinity_weigh_nothing(dtype):
    n = 9
    col, lse, (shift, w_neg, w_pos) = _rows(n, dtype)
    col = col.clone()
    col[2] = float("-inf")                  # a row at infinity
    lse = lse.clone()
    lse[5] = float("-inf")                  # a row without terms
    sym_w, ok, scale = tr.one_exp_rows(col, lse, shift, w_neg, w_pos)
    assert int(ok) == 1
    for i in (2, 5):
        assert sym_w[0, i] == float("-inf") and sym_w[1, i] == 1
        assert sym_w[2, i] == 0 and sym_w[3, i] == 0
    pad = sym_w[:, n:]
    assert (pad[0] == float("-inf")).all() and (pad[1] == 1).all() and (pad[2:] == 0).all()
    assert torch.isfinite(sym_w[:, :n][:, [0, 1, 3, 4, 6, 7, 8]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spread_limit(dtype):
    # with the weights' power of two free to move (grow given, as for fp32 and bf16), the
    # spread alone decides: one exp2 of the top row's pairs would pass 2^(spread - 16)
    lim = ONE_EXP_LIMITS["fp64" if dtype == torch.float64 else "fp32"]["spread"]
    n = 20
    for spread, want in ((lim - 2.0, 1), (lim + 2.0, 0)):
        col, lse, (shift, w_neg, w_pos) = _rows(n, dtype, spread=0.5)
        lse = lse.clone()
        lse[3] = lse[3] + spread / L        # one row's normalizer far above the others
        main, _, _ = tb.lse_backward_rows(lse, lse - 1.0, torch.ones_like(lse),
                                          -0.5 * torch.ones_like(lse))
        _, ok, _ = tr.one_exp_rows(col, lse, *main, grow=torch.tensor(2.0 ** 20))
        assert int(ok) == want, f"spread {spread} (limit {lim}): ok {int(ok)}"


@pytest.mark.parametrize("what", ["nan lse", "inf lse", "nan weight", "tiny weight",
                                  "no rows with terms"])
def test_cases_the_factors_cannot_carry_take_two_exps(what):
    n = 11
    dtype = torch.float32
    col, lse, (shift, w_neg, w_pos) = _rows(n, dtype)
    lse, w_neg = lse.clone(), w_neg.clone()
    if what == "nan lse":
        lse[4] = float("nan")
    elif what == "inf lse":
        lse[4] = float("inf")
    elif what == "nan weight":
        w_neg[4] = float("nan")
    elif what == "tiny weight":
        w_neg[4] = 2.0 ** -140          # B = 2^(R - g) w below fp32's normal range
    else:
        lse = torch.full_like(lse, float("-inf"))
    _, ok, _ = tr.one_exp_rows(col, lse, shift, w_neg, w_pos)
    assert int(ok) == 0, what


def test_zero_rows():
    col, lse, (shift, w_neg, w_pos) = _rows(0, torch.float32)
    sym_w, ok, scale = tr.one_exp_rows(col, lse, shift, w_neg, w_pos)
    assert sym_w.shape == (4, 0) and ok.shape == (1,) and ok.dtype == torch.int32
    assert int(ok) == 0


def test_one_power_of_two_keeps_the_weights_normal():
    # a mean over 2^16 rows (weights ~ 2^-16) whose normalizers spread over 132 binades:
    # unscaled, the weights of the top rows fall below fp32's normal range; scaled by one
    # power of two (the kernel divides its sums by it) they all stay normal, and the
    # power is centred between that and the sums' overflow
    lim = ONE_EXP_LIMITS["fp32"]
    n = 40
    col, lse, _ = _rows(n, torch.float32, spread=0.5)
    lse = lse.clone()
    lse[7] = lse[7] + 131.0 / L
    g_all = torch.full((n,), 2.0 ** -16)
    main, _, _ = tb.lse_backward_rows(lse, lse - 1.0, g_all, -0.5 * g_all)
    plain, ok, scale = tr.one_exp_rows(col, lse, *main)
    assert int(ok) == 0 and float(scale) == 1.0
    grow = torch.tensor(2.0 ** 20)
    sym_w, ok, scale = tr.one_exp_rows(col, lse, *main, grow=grow)
    assert int(ok) == 1
    k = math.log2(float(scale))
    assert k == round(k) and k > 0
    nz = sym_w[2:] != 0
    lo = math.log2(float(sym_w[2:][nz].abs().min()))
    w_top = math.log2(max(float(x.abs().max()) for x in main[1:])) + k
    assert lo >= -lim["weight"] and w_top + 20 <= lim["sums"]
    # centred: the margins below and above differ by less than two binades (k is whole)
    assert abs((lo + lim["weight"]) - (lim["sums"] - 20 - w_top)) < 2.0
    # the same weights up to one power of two (where both are normal, exactly)
    both = nz & (plain[2:].abs() >= 2.0 ** -126)
    ratio = sym_w[2:][both].double() / plain[2:][both].double()
    assert both.sum() > n and torch.unique(ratio).numel() == 1 and float(ratio[0]) == 2.0 ** k
    # sums that would grow past fp32's range: no power of two fits, two exps
    _, ok, _ = tr.one_exp_rows(col, lse, *main, grow=torch.tensor(2.0 ** 140))
    assert int(ok) == 0


def _f32(x):
    """Round fp64 values to fp32 (and back to fp64 for the next exact step)."""
    return x.float().double()


def _ex2_ftz(x):
    """The kernels' exp2 of an fp32 argument: fp32 result, 0 below 2^-126 (ex2.approx.ftz)."""
    e = _f32(torch.exp2(x))
    return torch.where(e < 2.0 ** -126, 0.0, e)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(n=st.integers(2, 40), spread=st.floats(0.0, 150.0),
       norm=st.sampled_from([0.0, 3.0, 300.0, 1e4]), w_log2=st.floats(-100.0, 30.0),
       gap=st.floats(0.0, 63.0), seed=st.integers(0, 2**31 - 1))
def test_where_the_test_holds_one_exp_gives_every_term(n, spread, norm, w_log2, gap, seed):
    """Property: on rows the launcher's test accepts, e A_k (B_k + B_j) / scale, evaluated
    as the kernel does (fp32 arguments and factors, exp2 flushed below 2^-126), is
    ds_kj + ds_jk of the exact formula for every pair, up to fp32 rounding and terms
    below 2^-100 of the largest weight."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    # column terms (-||x||^2 / T: up to -1e4 here) and the rows' true log-normalizers
    # gam = n + lse (natural units) spread over `spread` binades
    col = _f32(-torch.rand(n, generator=g, dtype=f64) * norm)
    gam = torch.rand(n, generator=g, dtype=f64) * spread / L
    gam[0], gam[-1] = 0.0, spread / L
    lse = _f32(gam - col)
    # symmetric logits below both rows' normalizers, u_kj = z_kj - n_k (fp32, as computed)
    z = torch.minimum(gam[:, None], gam[None, :]) - torch.rand(n, n, generator=g, dtype=f64) * 30.0
    z = torch.minimum(z, z.t())
    u = _f32(z - col[:, None])
    pos = torch.rand(n, n, generator=g) < 0.3
    pos = pos | pos.t()
    g_all = (torch.randn(n, generator=g, dtype=f64) * 2.0 ** w_log2).float()
    g_pos = (-g_all.double() * torch.rand(n, generator=g, dtype=f64)).float()
    lse_pos = (lse.double() - torch.rand(n, generator=g, dtype=f64) * gap / L).float()
    lse32 = lse.float()
    main, _, _ = tb.lse_backward_rows(lse32, lse_pos, g_all, g_pos)
    shift, w_neg, w_pos = main
    sym_w, ok, scale = tr.one_exp_rows(tr.padded(col.float(), float("-inf")), lse32, shift, w_neg,
                                       w_pos, grow=torch.tensor(2.0 ** 20))
    if int(ok) == 0:
        return
    s, a, b_neg, b_pos = (x[:n].double() for x in sym_w)
    log2e = torch.tensor(L, dtype=torch.float32).double()
    e = _ex2_ftz(_f32(u * log2e + s[:, None]))
    b_j = torch.where(pos, b_pos[None, :], b_neg[None, :])
    b_k = torch.where(pos, b_pos[:, None], b_neg[:, None])
    got = _f32(e * _f32(a[:, None] * b_j + _f32(a[:, None] * b_k))) / scale.double()
    # exact: exp((u - lse_k)) w_k + exp((u + n_k - n_j - lse_j)) w_j, w without residue
    corr = tr.exp_shift(lse32)[1].double()
    wk = torch.where(pos, w_pos.double()[:, None], w_neg.double()[:, None]) / corr[:, None]
    wj = torch.where(pos, w_pos.double()[None, :], w_neg.double()[None, :]) / corr[None, :]
    l32 = lse32.double()
    ds_kj = torch.exp((u - l32[:, None])) * wk
    ds_jk = torch.exp((u + col[:, None] - col[None, :] - l32[None, :])) * wj
    want = ds_kj + ds_jk
    wmax = torch.maximum(w_neg.double().abs().max(), w_pos.double().abs().max())
    err = (got - want).abs()
    bound = 2e-5 * (ds_kj.abs() + ds_jk.abs()) + 2.0 ** -100 * wmax
    assert (err <= bound).all(), f"worst {float((err / bound).max()):.3g} of the bound"
